"""End to end: 2 origins and 2 replicas of each of 3 block stages (8 node processes and a coordinator).

A first wave of four nodes (one per stage) starts the run; the second wave joins
the running pipeline and copies its weights from live replicas (GetState). The
tiny model trains (validation loss falls on both origins); one stage node is
SIGKILLed mid-run: the run goes on, nothing hangs, the test ends in bounded time
and leaves no process behind. Without DiLoCo the replicas train independently.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from node_procs import LocalRun

STEPS = 200
OVERRIDES = [
    "model.stages=4", "model.seq_len=32",
    "train.microbatch_size=4", "train.microbatches=2", f"train.steps={STEPS}", "train.lr=0.004",
    "train.warmup_steps=5", "train.eval_every=50", "train.eval_batches=2",
    "train.hop_timeout_s=3", "membership.heartbeat_interval_s=0.5", "membership.lease_s=3",
    "diloco.inner_steps=10", "diloco.codec=int8",
    # replicas drift apart by seconds on a busy 2-core machine: let a round wait for the later one
    "membership.sync_join_window_s=8", "membership.sync_timeout_s=12",
]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_eight_nodes_train_and_survive_a_kill(tmp_path: Path, local_run: Callable[..., LocalRun]) -> None:
    started = time.monotonic()
    run = local_run(OVERRIDES)
    # One node per stage first (each preference is then an empty stage, so it is honoured), then
    # the second replica of each: 2 origins and 2 replicas of stages 1-3.
    layout = [0, 1, 2, 3, 0, 1, 2, 3]
    for i, stage in enumerate(layout[:4]):
        run.start_node(f"node{i}-s{stage}", preferred_stage=stage)
    deadline = time.monotonic() + 120
    while not all(run.records(i, "join") for i in range(4)):
        assert time.monotonic() < deadline, run.tail()
        time.sleep(0.2)
    for i, stage in enumerate(layout[4:], start=4):
        run.start_node(f"node{i}-s{stage}", preferred_stage=stage)
    while not all(run.records(i, "stage") for i in range(8)):
        assert time.monotonic() < deadline, run.tail()
        time.sleep(0.2)
    stages = [run.records(i, "stage")[0]["stage"] for i in range(8)]
    assert stages == layout, stages
    victim = 6   # a stage-2 replica
    # The second wave joined a running pipeline: it copied weights (and DiLoCo's θ_global) from live
    # replicas. Kill a stage-2 replica once the late origin has trained a while and replicas have
    # averaged their pseudo-gradients with each other (Streaming DiLoCo, every 10 steps).
    def synced() -> bool:
        return any(r["participants"] == 2 for i in range(8) for r in run.records(i, "outer-sync"))

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if len(run.records(4, "iteration")) >= 10 and synced():
            break
        assert all(p.poll() is None for p in run.nodes), run.tail()
        time.sleep(0.2)
    else:
        pytest.fail("the late origin did not train, or replicas never averaged:\n" + run.tail())
    os.killpg(run.nodes[victim].pid, signal.SIGKILL)
    killed_at = min(len(run.records(i, "iteration")) for i in (0, 4))

    codes = run.wait_nodes(timeout_s=240)
    survivors = [c for i, c in enumerate(codes) if i != victim]
    assert survivors == [0] * 7, f"exit codes {codes}\n{run.tail()}"
    assert codes[victim] == -signal.SIGKILL

    assert killed_at < STEPS - 20, "the kill came too late to show anything"
    first_eval = run.records(0, "eval")[0]["val_loss"]
    for origin in (0, 4):
        iterations = run.records(origin, "iteration")
        steps = [r["step"] for r in iterations]
        assert steps == sorted(set(steps)), run.tail()
        # the first origin started the run; the late one where the run was when it joined. An origin
        # that falls behind the others catches up (skips iterations) rather than hold them back.
        assert steps[0] == 1 if origin == 0 else steps[0] > 1
        evals = run.records(origin, "eval")
        assert evals[-1]["step"] == STEPS and math.isfinite(evals[-1]["val_loss"]), evals
        assert evals[-1]["val_loss"] < first_eval - 0.5, (first_eval, evals)
    # after the kill, training went on with completed microbatches
    after = [r for r in run.records(0, "iteration") if r["step"] > killed_at + 15]
    assert len([r for r in after if r["loss"] is not None and r["abandoned"] == 0]) >= 10, run.tail()
    # averaged fragments were merged into the local weights
    assert any(r["applied"] > 0 for r in run.records(0, "outer-merge")), run.tail()
    # the coordinator saw the death
    assert "death" in (tmp_path / "coordinator.log").read_text()
    assert time.monotonic() - started < 360
