"""A replica the path plan leaves idle (too slow to be worth a microbatch) follows its stage's group.

It takes no inner steps and never asks for a sync round, so: the working replica's rounds do not
wait the join window for it (coordinator), and it copies the group's θ_global and outer state every
few heartbeats (node daemon), so a later plan or a CheckFree copy that relies on it finds current
weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from node_procs import LocalRun

JOIN_WINDOW_S = 4.0
OVERRIDES = [
    "model.stages=2", "model.seq_len=64", "train.microbatch_size=4", "train.microbatches=2", "train.steps=64",
    "train.eval_every=100000", "train.eval_batches=1", "skippipe.planner=skippipe", "diloco.inner_steps=4",
    "membership.heartbeat_interval_s=0.5", "membership.lease_s=5",
    f"membership.sync_join_window_s={JOIN_WINDOW_S}", f"membership.sync_timeout_s={2 * JOIN_WINDOW_S}",
]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_an_idle_replica_follows_its_group_and_is_not_waited_for(local_run: Callable[..., LocalRun]) -> None:
    run = local_run(OVERRIDES)
    run.start_node("origin", preferred_stage=0)
    run.start_node("fast", preferred_stage=1)
    # the slow replica comes once the fast one has joined: alone at its stage it would rightly get
    # the paths until the fast one arrives, which is not what this test is about (and started before
    # the origin, one of two stage-1 replicas would rightly be moved to the empty stage 0). The run is
    # long enough (64 steps, ~8 s) that the slow one, which takes a few seconds to start, follows it.
    deadline = time.monotonic() + 60
    while not run.records(1, "join"):
        assert time.monotonic() < deadline, run.tail()
        time.sleep(0.1)
    run.start_node("slow", preferred_stage=1, extra=["--slowdown", "50"])
    origin, fast, slow = 0, 1, 2
    codes = run.wait_nodes(timeout_s=180)
    assert codes[fast] == codes[origin] == 0, run.tail()
    fast_syncs = run.records(fast, "outer-sync")
    assert len(fast_syncs) >= 3, run.tail()
    # the plan gave the slow replica nothing while the run trained: it never stepped nor asked for a
    # round (once the origin has left, the fast node may be moved to stage 0 and the slow one may be
    # moved too or get the paths: the run is over, not counted)
    end = run.records(origin, "leave")[0]["time"]
    schedules = [r for r in run.records(slow, "schedule") if r.get("stage") == 1 and r["time"] < end]
    assert schedules and all(r["expected"] == 0 for r in schedules), run.tail()
    assert not [r for r in run.records(slow, "step") if r.get("stage") == 1 and r["time"] < end], run.tail()
    assert not run.records(slow, "outer-sync"), run.tail()
    # ...so the fast replica's rounds formed without spending the join window on it
    assert all(r["participants"] == 1 and r["seconds"] < JOIN_WINDOW_S for r in fast_syncs), fast_syncs
    # and the slow one kept adopting the group's state as it moved on
    follows = run.records(slow, "standby-resync")
    assert follows, run.tail()
    steps = [r["outer_steps"] for r in follows]
    assert steps == sorted(steps) and steps[-1] >= 2 and steps[-1] <= len(fast_syncs)
    assert all(r["source"] == fast_syncs[0]["node_id"] for r in follows)
