"""Data-parallel mode end to end: a coordinator and three node processes with ``model.stages = 1``.

Every node is an origin holding the whole model; they train on their own shards with no pipeline hop
and average pseudo-gradients (Streaming DiLoCo, two fragments, int8) among themselves. The validation
loss falls on every node, no activation crosses the network, nothing tries a CheckFree+ bookend copy
(stages 1 and S-1 do not exist), and the replicas end with identical θ_global in every fragment whose
rounds they shared (the nodes' ``final`` records: equal outer steps, equal digests).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from node_procs import LocalRun, assert_val_loss_fell, data_parallel_overrides

STEPS = 60
NODES = 3
OVERRIDES = data_parallel_overrides(steps=STEPS, fragments=2, eval_every=30)


@pytest.mark.timeout(240)
def test_three_replicas_train_and_agree_on_theta_global(local_run: Callable[..., LocalRun]) -> None:
    started = time.monotonic()
    run = local_run(OVERRIDES)
    run.run_nodes("dp", NODES, timeout_s=200, preferred_stage=0)
    for i in range(NODES):
        assert {r["stage"] for r in run.records(i, "stage")} == {0}, run.tail()
        assert_val_loss_fell(run, i, STEPS, by=0.3)
        iterations = run.records(i, "iteration")
        assert all(r["abandoned"] == 0 and r["loss"] is not None for r in iterations), run.tail()
        assert not run.records(i, "bookend-copy") and not run.records(i, "abandon")
        metrics = run.records(i, "metrics")
        assert max(m["activation_bytes_sent"] for m in metrics) == 0   # no pipeline: nothing but sync
        assert max(m["sync_bytes_sent"] for m in metrics) > 0
    syncs = [r for i in range(NODES) for r in run.records(i, "outer-sync")]
    assert any(r["participants"] == NODES for r in syncs), syncs
    finals = [run.records(i, "final")[-1] for i in range(NODES)]
    shared = 0
    for fragment in ("0", "1"):
        by_step: dict[int, set[str]] = {}
        for f in finals:
            by_step.setdefault(f["outer_steps"].get(fragment, 0), set()).add(f["global_digest"][fragment])
        for outer_step, digests in by_step.items():
            assert len(digests) == 1, (fragment, outer_step, finals)
        shared += sum(1 for f in finals if f["outer_steps"].get(fragment, 0) > 0) >= 2
    assert shared >= 1, finals   # at least one fragment synced among several replicas
    assert time.monotonic() - started < 220


DP_SIM = """
[model]
stages = 1
seq_len = 64

[train]
steps = 60
eval_every = 20
microbatches = 2
microbatch_size = 4

[diloco]
inner_steps = 10
fragments = 2
codec = "fp4"

[membership]
heartbeat_interval_s = 0.3
lease_s = 1.5

[sim]
origins = 3
replacement_delay_s = 0.5
max_wall_s = 200

[[sim.preemptions]]
target = "replica:0"
signal = "KILL"
at_step = 10
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_simulation_with_a_config_of_its_own_replaces_a_killed_replica(
        tmp_path: Path, sim_process: Callable[..., subprocess.Popen]) -> None:
    """``lowband-sim run --config`` with ``model.stages = 1``: three origins, one SIGKILLed; its replacement
    copies a live replica (θ_global, outer state, weights) and trains with the group; nothing is left."""
    out = tmp_path / "run"
    config = tmp_path / "dp.toml"
    config.write_text(DP_SIM)
    proc = sim_process(out, "--config", str(config))
    output, _ = proc.communicate(timeout=260)
    assert proc.returncode == 0, output.decode(errors="replace")[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 60 and summary["final_val_loss"] < summary["initial_val_loss"] - 0.3
    assert summary["activation_bytes_sent"] == 0 and summary["sync_bytes_sent"] > 0
    assert summary["failures"] == 1 and summary["recoveries"] >= 1
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert any(e["kind"] == "recovery" and "replica-copy" in e["detail"] for e in events), events
    assert {e["stage"] for e in events if e["kind"] == "join"} == {0}
