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
from collections.abc import Callable
from pathlib import Path

import pytest
from sim_leftovers import leftovers

from lowband.node.train.export import load_model

SHORT_RUN = """
[model]
stages = 3
seq_len = 64
subspace_rank = 16

[train]
# the hops send a subspace model's coordinates in int8 (the simulator's default): through real node
# processes, a SIGKILL and the replica copy that replaces it
activation_codec = "subspace-int8"
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


@pytest.mark.timeout(240)
def test_short_simulation_with_a_sigkill(tmp_path: Path, sim_process: Callable[..., subprocess.Popen]) -> None:
    out = tmp_path / "run"
    config = tmp_path / "sim.toml"
    config.write_text(SHORT_RUN)
    proc = sim_process(out, "--config", str(config))
    output, _ = proc.communicate(timeout=200)
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["initial_val_loss"] is not None and summary["final_val_loss"] is not None
    assert summary["final_val_loss"] < summary["initial_val_loss"]
    assert summary["failures"] >= 1
    assert summary["recoveries"] >= 1, (out / "events.jsonl").read_text()
    assert summary["activation_bytes_sent"] > 0
    kinds_sent = ("activation_bytes_sent", "sync_bytes_sent", "state_bytes_sent", "control_bytes_sent")
    assert all(summary[kind] > 0 for kind in kinds_sent), summary
    assert summary["total_bytes_sent"] == sum(summary[kind] for kind in kinds_sent)
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    kinds = [e["kind"] for e in events]
    assert "preempt" in kinds and "recovery" in kinds
    assert any(e["kind"] == "death" for e in events)  # the coordinator noticed the SIGKILL
    for name in ("metrics.jsonl", "loss.png", "bytes.png", "membership.png", "report.html"):
        assert (out / name).stat().st_size > 0, name
    # the run yields a model: every stage's last θ_global from the nodes' state directories, and a sample
    model = load_model(out / "model.pt")
    assert model.num_stages == 3 and model.config.subspace_rank == 16
    assert summary["model_file"] == str(out / "model.pt")
    assert all(step >= 1 for steps in summary["model_outer_steps"].values() for step in steps.values()), summary
    assert summary["sample"] and summary["sample_prompt"] == "def "
    assert "Sample from model.pt" in (out / "report.html").read_text()


@pytest.mark.timeout(120)
def test_sigint_stops_every_process(tmp_path: Path, sim_process: Callable[..., subprocess.Popen]) -> None:
    out = tmp_path / "run"
    config = tmp_path / "sim.toml"
    config.write_text(SHORT_RUN)
    proc = sim_process(out, "--config", str(config), "--steps", "1000")
    # Wait until the nodes are up (their logs appear), then interrupt like Ctrl-C would.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list((out / "logs").glob("stage*.log"))) < 4:
        time.sleep(0.2)
    assert len(leftovers(str(out))) >= 5, "simulation did not start its processes"
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode == 130


def test_the_runs_end_is_read_from_origins_that_finished_not_from_killed_ones() -> None:
    from lowband.sim.run import _finished
    origins = [
        {"stage": 0, "step": 26, "val_loss": 2.7, "alive": False, "state": "dead"},     # SIGKILLed mid-run
        {"stage": 0, "step": 60, "val_loss": 2.5, "alive": False, "state": "left"},     # finished
        {"stage": 0, "step": 12, "val_loss": 3.9, "alive": False, "state": "left"},     # preempted early
    ]
    assert [m["val_loss"] for m in _finished(origins)] == [2.5]
    # nobody left cleanly: the last known values are all there is
    assert len(_finished([origins[0]])) == 1


def test_a_node_that_exits_before_joining_is_started_again_on_a_new_port(tmp_path: Path) -> None:
    """A node that cannot bind its port (taken meanwhile) exits before it ever joins: the simulator
    starts it again on another port instead of waiting for a stage that never comes, and gives up
    with the log's path once it keeps failing."""
    from lowband.sim.config import load_sim_config
    from lowband.sim.run import MAX_RELAUNCHES, Simulation

    sim = Simulation(load_sim_config(None), tmp_path, progress=False)
    launched: list[str] = []

    def failing_launch(node: object) -> None:   # stands for a node process that exits at once
        launched.append(node.address)  # type: ignore[attr-defined]
        node.child = sim.sup.spawn(node.name, [sys.executable, "-c", "raise SystemExit(3)"])  # type: ignore[attr-defined]
        node.child.popen.wait(timeout=30)  # type: ignore[attr-defined]

    sim.launch = failing_launch  # type: ignore[method-assign]
    try:
        node = sim.add_node(1)
        sim.launch(node)
        joined = sim.add_node(2)
        sim.launch(joined)
        sim.state.node_stage[joined.name] = 2   # this one joined before it exited: left alone
        for _ in range(MAX_RELAUNCHES):
            sim.relaunch_failed_starts()
        assert len(launched) == 2 + MAX_RELAUNCHES
        with pytest.raises(RuntimeError, match=f"{node.name} exited before joining .* see .*{node.name}.log"):
            sim.relaunch_failed_starts()
    finally:
        sim.close()
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    relaunches = [e for e in events if e["kind"] == "relaunch"]
    assert [e["node_id"] for e in relaunches] == [node.name] * MAX_RELAUNCHES
    assert all("code 3" in e["detail"] for e in relaunches)


def test_progress_without_a_terminal_is_a_line_per_event_or_every_few_seconds(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Piped into a log (CI, nohup), the live ``\\r`` line would pile up into one endless line: there each
    update is a line of its own, printed when something happens or every PLAIN_PROGRESS_S."""
    from lowband.sim.config import load_sim_config
    from lowband.sim.run import PLAIN_PROGRESS_S, Simulation

    sim = Simulation(load_sim_config(None), tmp_path, progress=True)
    with sim.sup:   # no process is started; the supervisor is closed anyway
        def rec(t: float) -> dict[str, object]:
            return {"t": t, "step": int(t), "loss": 3.0, "val_loss": None, "tokens": 100, "sync_bytes_sent": 0,
                    "activation_bytes_sent": 0, "live_nodes": 8}

        sim.state.last_event = "join origin-1 (stage 0)"
        for t in (1.0, 1.5, 2.0):          # the same event: one line
            sim.show(rec(t))
        sim.state.last_event = "leave stage1-3 (stage 1)"
        sim.show(rec(2.5))                 # a new event: a line at once
        sim.show(rec(2.5 + PLAIN_PROGRESS_S))   # nothing new for a while: a line anyway
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 3, lines
    assert "join origin-1" in lines[0] and "leave stage1-3" in lines[1] and lines[2].startswith("[   7.5s]")


def test_the_final_loss_is_the_origins_validation_after_the_last_step(tmp_path: Path) -> None:
    """Read from the origins' own event logs: the furthest-along origins' latest validation, mean."""
    from lowband.sim.config import load_sim_config
    from lowband.sim.run import SimNode, Simulation

    sim = Simulation(load_sim_config(None), tmp_path, progress=False)
    try:
        sim.nodes = [SimNode(name=n, stage=st, address="", region=0, slowdown=1.0)
                     for n, st in (("origin-1", 0), ("origin-2", 0), ("origin-3", 0), ("stage1-4", 1))]
        (tmp_path / "nodes").mkdir()
        logs = {"origin-1": [(150, 2.5), (160, 2.2)], "origin-2": [(150, 2.4), (160, 2.4)],
                "origin-3": [(40, 3.0)],             # killed early: its value must not count
                "stage1-4": [(160, 9.9)]}            # not an origin
        for name, evals in logs.items():
            lines = [json.dumps({"kind": "eval", "step": s, "val_loss": v}) for s, v in evals]
            lines.append(json.dumps({"kind": "eval", "step": 170, "val_loss": float("nan")}))   # failed eval
            (tmp_path / "nodes" / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        step, value = sim.final_evaluation()
        assert step == 160 and abs(value - 2.3) < 1e-9
    finally:
        sim.close()
