"""Losing every machine costs at most one outer round: a run whose coordinator and every node are
SIGKILLed, restarted on the same run directory and state directories, resumes each stage from the
nodes' ``--state-dir`` at its last outer step (the coordinator, told at join which states the nodes
hold, plans ``local-state``) (validation loss where it was, far below a fresh start);
a node whose state file is corrupt says so and copies its stage from a replica, or obtains it as the
coordinator plans."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from node_procs import LocalRun

from lowband.node.recovery.local_state import STATE_FILE, read_state

OVERRIDES = [
    "model.stages=2", "model.seq_len=32", "train.microbatch_size=4", "train.microbatches=2", "train.steps=100",
    "train.eval_every=15", "train.eval_batches=4", "train.warmup_steps=5", "diloco.inner_steps=5",
    "diloco.fragments=1", "diloco.codec=int8", "membership.heartbeat_interval_s=0.5", "membership.lease_s=3",
    "membership.sync_join_window_s=4", "membership.sync_timeout_s=8",
]
KILL_AFTER_EVAL_STEP = 45


def _wait_eval(run: LocalRun, index: int, step: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(r["step"] >= step for r in run.records(index, "eval")):
        assert time.monotonic() < deadline, run.tail()
        assert all(p.poll() is None for p in run.nodes), run.tail()
        time.sleep(0.3)


def _kill_everything(run: LocalRun) -> None:
    """SIGKILL the coordinator and every node at once (the supervisor still reaps what starts next)."""
    live = run.supervisor.live()
    for child in live:
        child.signal_group(signal.SIGKILL)
    for child in live:
        child.popen.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_run_killed_whole_resumes_from_the_nodes_state_dirs(tmp_path: Path,
                                                               local_run: Callable[..., LocalRun]) -> None:
    origin_dir, stage_dir, spare_dir = tmp_path / "state-origin", tmp_path / "state-stage1", tmp_path / "state-spare"
    run = local_run(OVERRIDES)
    run.start_node("origin", preferred_stage=0, extra=["--state-dir", str(origin_dir)])
    run.start_node("s1", preferred_stage=1, extra=["--state-dir", str(stage_dir), "--no-data"])
    run.start_node("s1b", preferred_stage=1, extra=["--state-dir", str(spare_dir), "--no-data"])
    _wait_eval(run, 0, KILL_AFTER_EVAL_STEP, timeout_s=200)
    _kill_everything(run)
    # the second replica's file is cut short, as by a disk that filled mid-write
    spare_file = spare_dir / STATE_FILE
    spare_file.write_bytes(spare_file.read_bytes()[:1000])
    evals = run.records(0, "eval")
    fresh_loss, before = evals[0]["val_loss"], evals[-1]
    stored = {s: read_state(d) for s, d in ((0, origin_dir), (1, stage_dir))}
    assert {s: st.stage for s, st in stored.items()} == {0: 0, 1: 1}
    assert all(sum(st.outer_steps.values()) >= 1 for st in stored.values()), stored
    # the last outer sync before the kill is at most one round (5 steps) behind the last evaluation
    assert stored[0].inner_step >= before["step"] - 5, (stored[0].inner_step, before)

    run.start_coordinator()   # the same run directory: its SQLite state says the run had trained
    # no --preferred-stage: each node asks for the stage its state directory holds
    # (the origin slowed down: the run must still be going when the spare, a fresh process, joins)
    run.start_node("origin-again", extra=["--state-dir", str(origin_dir), "--slowdown", "4"])
    run.start_node("s1-again", extra=["--state-dir", str(stage_dir), "--no-data"])
    deadline = time.monotonic() + 120
    while not run.records(4, "stage"):   # stage 1 is live again before the spare comes back
        assert time.monotonic() < deadline, run.tail()
        time.sleep(0.3)
    run.start_node("s1b-again", extra=["--state-dir", str(spare_dir), "--no-data"])
    codes = run.wait_nodes(timeout_s=240)
    assert codes[3:] == [0, 0, 0], run.tail()
    # the spare refuses its file by name and copies the stage from the replica that resumed it
    spare_log = (tmp_path / "s1b-again.log").read_text()
    assert "refusing the stored stage state" in spare_log and "truncated or corrupt" in spare_log, spare_log[-3000:]
    spare_stage = run.records(5, "stage")[0]
    assert (spare_stage["stage"], spare_stage["method"]) == (1, "replica-copy"), spare_stage
    for index, stage in ((3, 0), (4, 1)):
        first = run.records(index, "stage")[0]
        assert (first["stage"], first["method"], first["iteration"]) == (stage, "local-state",
                                                                         stored[stage].inner_step), first
    # the coordinator learnt from the joining nodes which stage states exist, and planned their resumption
    coordinator_log = (tmp_path / "coordinator.log").read_text()
    for stage, state in stored.items():
        outer = sum(state.outer_steps.values())
        assert re.search(rf"event join node=\S+ stage={stage} .* via local-state \(its stored state at outer step "
                         rf"{outer}, step {state.inner_step}\)", coordinator_log), coordinator_log[-3000:]
    assert len(re.findall(r"event resume node=\S+ stage=[01] .*local-state", coordinator_log)) == 2
    after = run.records(3, "eval")
    assert after and after[0]["step"] >= stored[0].inner_step, after   # evaluated where it resumed or later
    # where it was (within 2%, or better), and far below where a fresh start begins
    assert after[0]["val_loss"] <= before["val_loss"] * 1.02, (before, after[0])
    assert after[0]["val_loss"] < fresh_loss - 0.5, (fresh_loss, after[0])


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_corrupt_state_file_is_refused_by_name_and_the_stage_obtained_as_planned(
        tmp_path: Path, local_run: Callable[..., LocalRun]) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / STATE_FILE).write_bytes(b"PK\x03\x04 cut short")
    run = local_run([*OVERRIDES[:4], "train.steps=10", *OVERRIDES[5:]])
    run.start_node("origin", preferred_stage=0)
    # no --preferred-stage: the node reads its state directory to choose one, and refuses the file
    run.start_node("s1", extra=["--state-dir", str(state_dir), "--no-data"])
    codes = run.wait_nodes(timeout_s=180)
    assert codes == [0, 0], run.tail()
    log = (tmp_path / "s1.log").read_text()
    assert "refusing the stored stage state" in log and "truncated or corrupt" in log, log[-3000:]
    assert run.records(1, "stage")[0]["method"] == "fresh"   # a new run: the coordinator's plan
    # once it had synced, the node wrote a good state over the bad one
    assert read_state(state_dir).stage == 1
