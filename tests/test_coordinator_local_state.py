"""The coordinator learns from joining nodes which stage states their --state-dirs hold: it prefers giving
a node the stage it holds the newest state of, and when no live replica holds that stage (the whole run
was lost and restarted on the same directories) it plans ``local-state``, so the stage resumes from the
node's own file instead of a rebuild or random weights; status events say so."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from fake_clock import Clock

from lowband.coordinator.assignment import resume_stage
from lowband.coordinator.core import Coordinator
from lowband.coordinator.errors import InvalidRequest
from lowband.coordinator.store import Store
from lowband.protocols import coordinator_pb2 as pb
from lowband.protocols.config import RunConfig, apply_overrides
from lowband.protocols.stored_stage import LOCAL_STATE, stage_fingerprint

Kind = pb.Instruction.Kind



def config(*overrides: str) -> RunConfig:
    base = ["model.stages=3", "membership.heartbeat_interval_s=0.3", "membership.lease_s=1.0",
            "membership.sync_join_window_s=0.5", "membership.sync_timeout_s=2.0"]
    return apply_overrides(RunConfig(), [*base, *overrides])


def fingerprint(cfg: RunConfig) -> str:
    return stage_fingerprint(cfg.run_id, cfg.model.stages, dataclasses.asdict(cfg.model))


def join(core: Coordinator, port: int, *, data: bool = True, held: list[tuple[int, int]] = (),
         fp: str = "", preferred: int = -1) -> pb.JoinReply:
    """``held``: (stage, outer step) of the states the node's --state-dir holds."""
    req = pb.JoinRequest(address=f"127.0.0.1:{port}", device="cpu", throughput=1.0, version="0.1", stage=-1,
                         preferred_stage=preferred, has_data=data)
    for stage, outer in held:
        req.stored_stages.add(stage=stage, outer_step=outer, inner_step=5 * outer, fingerprint=fp)
    return core.join(req)


def trained_run(tmp_path: Path, clock: Clock, cfg: RunConfig) -> None:
    """A run that trained (two replicas of stage 1), then lost every process, coordinator included."""
    core = Coordinator(cfg, Store(tmp_path), clock=clock)
    replies = [join(core, 9000 + i, data=i == 0, preferred=[0, 1, 2, 1][i]) for i in range(4)]
    for r in replies:
        core.heartbeat(pb.HeartbeatRequest(node_id=r.node_id, epoch=core.epoch,
                                           metrics=pb.NodeMetrics(step=40, outer_step=8)))
    core.close()


def test_resume_stage_prefers_a_stage_nobody_live_holds_then_the_newest() -> None:
    assert resume_stage({}, {0, 1}) is None
    assert resume_stage({1: 8}, {0, 2}) == (1, True)        # only its file holds stage 1
    assert resume_stage({1: 8}, {1}) == (1, False)          # a live replica: copy it (at least as new)
    assert resume_stage({1: 8, 2: 3}, {1}) == (2, True)     # an orphaned stage first, even an older state
    assert resume_stage({1: 3, 2: 8}, set()) == (2, True)   # of the orphans, the most advanced
    assert resume_stage({1: 3, 2: 8}, {1, 2}) == (2, False)


def test_a_whole_run_restarted_resumes_each_stage_from_the_node_that_holds_it(tmp_path: Path) -> None:
    clock, cfg = Clock(), config()
    trained_run(tmp_path, clock, cfg)
    core = Coordinator(cfg, Store(tmp_path), clock=clock)   # the restarted coordinator: members not heard from
    fp = fingerprint(cfg)
    # the origin joins first; stages 1 and 2 have nobody, yet it goes back to the stage it holds
    origin = join(core, 9100, held=[(0, 8)], fp=fp)
    assert origin.stage == 0 and origin.instruction.kind == Kind.RECOVER
    assert origin.instruction.recovery.method == LOCAL_STATE and not origin.instruction.recovery.sources
    s2 = join(core, 9101, data=False, held=[(2, 8)], fp=fp)
    assert (s2.stage, s2.instruction.recovery.method) == (2, LOCAL_STATE)
    s1 = join(core, 9102, data=False, held=[(1, 7)], fp=fp)
    assert (s1.stage, s1.instruction.recovery.method) == (1, LOCAL_STATE)
    assert core.members[s1.node_id].state == "recovering"   # until it reports the state loaded
    joins = [e for e in core.events if e.kind == "join" and e.node_id == s1.node_id]
    assert joins and "via local-state" in joins[0].detail and "outer step 7" in joins[0].detail
    core.report_recovery(pb.RecoveryReport(node_id=s1.node_id, plan_id=s1.instruction.recovery.plan_id,
                                           success=True, message="resumed from its --state-dir at step 35"))
    assert core.members[s1.node_id].state == "alive"
    status = core.status(pb.StatusRequest())
    resumed = [e for e in status.events if e.kind == "resume"]
    assert resumed and resumed[-1].node_id == s1.node_id and "local-state" in resumed[-1].detail
    # the second replica of stage 1 comes back too: now a live replica is there to copy
    s1b = join(core, 9103, data=False, held=[(1, 8)], fp=fp)
    assert (s1b.stage, s1b.instruction.recovery.method) == (1, "replica-copy")
    assert [p.node_id for p in s1b.instruction.recovery.sources] == [s1.node_id]


def test_states_of_another_run_or_a_new_run_are_not_resumed(tmp_path: Path) -> None:
    clock, cfg = Clock(), config()
    trained_run(tmp_path / "old", clock, cfg)
    core = Coordinator(cfg, Store(tmp_path / "old"), clock=clock)
    other = fingerprint(config("model.seq_len=64"))
    reply = join(core, 9200, data=False, held=[(1, 8)], fp=other)   # another model's stage 1
    assert reply.instruction.recovery.method != LOCAL_STATE
    no_data = join(core, 9201, data=False, held=[(0, 8)], fp=fingerprint(cfg))   # stage 0 needs data
    assert no_data.stage != 0 and no_data.instruction.recovery.method != LOCAL_STATE
    # a coordinator on a new run directory knows of no training: fresh weights, whatever the node holds
    new = Coordinator(cfg, Store(tmp_path / "new"), clock=clock)
    fresh = join(new, 9300, data=False, held=[(1, 8)], fp=fingerprint(cfg))
    assert fresh.instruction.recovery.method == "fresh"


def test_an_unusable_state_falls_back_to_the_plan_any_joiner_gets(tmp_path: Path) -> None:
    clock, cfg = Clock(), config()
    trained_run(tmp_path, clock, cfg)
    core = Coordinator(cfg, Store(tmp_path), clock=clock)
    fp = fingerprint(cfg)
    back = []
    for port, stage in ((9400, 0), (9401, 2)):
        r = join(core, port, data=stage == 0, held=[(stage, 8)], fp=fp)
        core.report_recovery(pb.RecoveryReport(node_id=r.node_id, plan_id=r.instruction.recovery.plan_id,
                                               success=True))
        back.append(r.node_id)
    s1 = join(core, 9402, data=False, held=[(1, 8)], fp=fp)
    assert s1.instruction.recovery.method == LOCAL_STATE
    clock.t += 1.5   # the members of before the restart never come back: their leases end
    for node_id in (*back, s1.node_id):
        core.heartbeat(pb.HeartbeatRequest(node_id=node_id, epoch=core.epoch))
    assert len(core.expire_leases()) == 4
    core.report_recovery(pb.RecoveryReport(node_id=s1.node_id, plan_id=s1.instruction.recovery.plan_id,
                                           success=False, message="no usable state of stage 1"))
    reply = core.heartbeat(pb.HeartbeatRequest(node_id=s1.node_id, epoch=core.epoch))
    assert reply.instruction.kind == Kind.RECOVER and reply.instruction.stage == 1
    # an edge stage: rebuilt as a copy of the neighbour swapped-edge training taught it, not at random
    assert reply.instruction.recovery.method == "checkfree-plus"
    assert {p.stage for p in reply.instruction.recovery.sources} == {2}
    assert any(e.kind == "recovery-failed" and "now checkfree-plus" in e.detail for e in core.events)


def test_malformed_stored_stages_are_refused() -> None:
    core = Coordinator(config(), clock=Clock())
    epoch = core.epoch
    with pytest.raises(InvalidRequest, match=r"stored_stages\[0\]"):
        join(core, 9500, held=[(7, 1)], fp="x")
    assert not core.members and core.epoch == epoch   # refused before anything changed
