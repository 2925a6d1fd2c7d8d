"""`lowband-sim run` end to end: a short simulation with a SIGKILL, and a run interrupted by SIGINT.

Both run the simulator as a real subprocess and then look for any process whose
command line names the run folder (every child the simulator starts carries
its token file path): none may be left behind, whatever happened.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sim_leftovers import leftovers, reap

SHORT_RUN = """
[model]
stages = 3
seq_len = 64

[train]
# Long enough (in steps) that the replacement, a fresh process, joins and copies its replica
# before the run ends even on an idle machine where the surviving replica trains fast.
steps = 80
eval_every = 10
microbatches = 2
microbatch_size = 4

[diloco]
inner_steps = 6
fragments = 1
codec = "fp4"

[skippipe]
skip_ratio = 0.0
planner = "full"

[membership]
heartbeat_interval_s = 0.3
lease_s = 1.5

[sim]
origins = 1
replicas_per_stage = 2
replacement_delay_s = 0.5
max_wall_s = 150

[[sim.preemptions]]
target = "replica:1"
signal = "KILL"
at_step = 5
"""


def _start(out: Path, config: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "sim.cli", "run", "--config", str(config), "--out", str(out), "--no-progress", *extra],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )


@pytest.mark.timeout(240)
def test_short_simulation_with_a_sigkill(tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = tmp_path / "sim.toml"
    config.write_text(SHORT_RUN)
    proc = _start(out, config)
    try:
        output, _ = proc.communicate(timeout=200)
        text = output.decode(errors="replace")
        assert proc.returncode == 0, text[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["initial_val_loss"] is not None and summary["final_val_loss"] is not None
        assert summary["final_val_loss"] < summary["initial_val_loss"]
        assert summary["failures"] >= 1
        assert summary["recoveries"] >= 1, (out / "events.jsonl").read_text()
        assert summary["activation_bytes_sent"] > 0
        events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
        kinds = [e["kind"] for e in events]
        assert "preempt" in kinds and "recovery" in kinds
        assert any(e["kind"] == "death" for e in events)  # the coordinator noticed the SIGKILL
        for name in ("metrics.jsonl", "loss.png", "bytes.png", "membership.png", "report.html"):
            assert (out / name).stat().st_size > 0, name
    finally:
        left = reap(proc, str(out))
    assert left == [], f"processes left behind: {left}"


@pytest.mark.timeout(120)
def test_sigint_stops_every_process(tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = tmp_path / "sim.toml"
    config.write_text(SHORT_RUN)
    proc = _start(out, config, "--steps", "1000")
    try:
        # Wait until the nodes are up (their logs appear), then interrupt like Ctrl-C would.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list((out / "logs").glob("stage*.log"))) < 4:
            time.sleep(0.2)
        assert len(leftovers(str(out))) >= 5, "simulation did not start its processes"
        time.sleep(2)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
        assert proc.returncode == 130
    finally:
        left = reap(proc, str(out))
    assert left == [], f"processes left behind: {left}"


def test_the_runs_end_is_read_from_origins_that_finished_not_from_killed_ones() -> None:
    from sim.run import _finished
    origins = [
        {"stage": 0, "step": 26, "val_loss": 2.7, "alive": False, "state": "dead"},     # SIGKILLed mid-run
        {"stage": 0, "step": 60, "val_loss": 2.5, "alive": False, "state": "left"},     # finished
        {"stage": 0, "step": 12, "val_loss": 3.9, "alive": False, "state": "left"},     # preempted early
    ]
    assert [m["val_loss"] for m in _finished(origins)] == [2.5]
    # nobody left cleanly: the last known values are all there is
    assert len(_finished([origins[0]])) == 1
