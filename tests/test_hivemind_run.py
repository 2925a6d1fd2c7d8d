"""``diloco.backend = "hivemind"`` in real runs: a coordinator and node daemons as processes.

Data-parallel mode (``model.stages = 1``): two replicas train the whole model on their own shards and
average their pseudo-gradients through hivemind. The coordinator's rounds decide who averages when; the
replicas' DHTs find each other through those rounds (no bootstrap peer is configured). The loss falls,
every outer sync went through hivemind, the replicas end with identical θ_global, and no process of a
node (its DHT, averagers, p2pd) outlives it, on a normal exit and on SIGTERM.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from node_procs import LocalRun, assert_val_loss_fell, data_parallel_overrides

pytest.importorskip("hivemind")

STEPS = 40
NODES = 2
OVERRIDES = data_parallel_overrides(steps=STEPS, fragments=1, eval_every=20, backend="hivemind")


def in_session(leader: int) -> list[str]:
    """Live processes of the session `leader` started (the node and whatever it spawned): 'pid name'."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        state, session = rest[0], int(rest[3])
        if session == leader and state != "Z":
            found.append(f"{entry.name} {name}")
    return found


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_replicas_train_through_hivemind_and_agree_on_theta_global(
        local_run: Callable[..., LocalRun]) -> None:
    run = local_run(OVERRIDES)
    run.run_nodes("hm", NODES, timeout_s=200, preferred_stage=0)
    for i in range(NODES):
        assert_val_loss_fell(run, i, STEPS, by=0.2)
        syncs = run.records(i, "outer-sync")
        assert syncs and all(r["backend"] == "hivemind" for r in syncs), syncs
        assert any(r["participants"] == NODES and r["group_size"] == NODES for r in syncs), syncs
        assert max(m["sync_bytes_sent"] for m in run.records(i, "metrics")) > 0
    finals = [run.records(i, "final")[-1] for i in range(NODES)]
    assert finals[0]["outer_steps"]["0"] == finals[1]["outer_steps"]["0"] > 0, finals
    assert finals[0]["global_digest"]["0"] == finals[1]["global_digest"]["0"], finals
    for proc in run.nodes:   # a normal exit stops the DHT, the averagers and their p2pd
        assert in_session(proc.pid) == [], in_session(proc.pid)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigterm_leaves_no_hivemind_process(local_run: Callable[..., LocalRun]) -> None:
    run = local_run([*(o for o in OVERRIDES if not o.startswith("train.steps=")), "train.steps=100000"])
    node = run.start_node("hm", preferred_stage=0)
    deadline = time.monotonic() + 60
    while not any(p.endswith(" p2pd") for p in in_session(node.pid)):   # its DHT is up
        assert node.poll() is None and time.monotonic() < deadline, run.tail()
        time.sleep(0.2)
    os.kill(node.pid, signal.SIGTERM)
    assert node.wait(timeout=60) == 0, run.tail()
    assert in_session(node.pid) == [], in_session(node.pid)
