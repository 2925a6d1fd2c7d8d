"""The coordinator core without gRPC: leases on a fake clock, instructions, moves, persistence, validation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from fake_clock import Clock

from lowband.coordinator.core import Coordinator
from lowband.coordinator.errors import Conflict, InvalidRequest, UnknownNode
from lowband.coordinator.store import Store
from lowband.protocols import coordinator_pb2 as pb
from lowband.protocols.config import RunConfig, apply_overrides

Kind = pb.Instruction.Kind



def config(*overrides: str) -> RunConfig:
    base = ["model.stages=3", "membership.heartbeat_interval_s=0.3", "membership.lease_s=1.0",
            "membership.sync_join_window_s=0.5", "membership.sync_timeout_s=2.0"]
    return apply_overrides(RunConfig(), [*base, *overrides])


def join(core: Coordinator, port: int, tp: float = 1.0, data: bool = True, **kw: object) -> pb.JoinReply:
    req = pb.JoinRequest(address=f"127.0.0.1:{port}", device="cpu", throughput=tp, version="0.1",
                         stage=-1, preferred_stage=-1, has_data=data)
    for k, v in kw.items():
        setattr(req, k, v)
    return core.join(req)


def beat(core: Coordinator, node_id: str, epoch: int, step: int = 0) -> pb.HeartbeatReply:
    return core.heartbeat(pb.HeartbeatRequest(node_id=node_id, epoch=epoch,
                                              metrics=pb.NodeMetrics(step=step, loss=2.0, tokens_per_s=10.0)))


def test_join_assigns_stages_and_origins() -> None:
    core = Coordinator(config(), clock=Clock())
    replies = [join(core, 9000 + i) for i in range(4)]
    assert [r.stage for r in replies] == [0, 1, 2, 0]
    assert replies[0].instruction.kind == Kind.RECOVER and replies[0].instruction.recovery.method == "fresh"
    assert RunConfig.from_json(replies[0].run_config_json).model.stages == 3
    assert replies[0].heartbeat_interval_s == pytest.approx(0.3) and replies[0].lease_s == pytest.approx(1.0)
    assert replies[0].origin_index == 0 and replies[0].num_origins == 1
    assert replies[3].origin_index == 1 and replies[3].num_origins == 2  # stable: in order of joining
    assert replies[1].origin_index == -1
    assert len({r.node_id for r in replies}) == 4
    assert [r.epoch for r in replies] == sorted(r.epoch for r in replies)


def test_heartbeat_instructions_and_lease_expiry() -> None:
    clock = Clock()
    core = Coordinator(config(), clock=clock)
    a, b, c = (join(core, 9000 + i) for i in range(3))
    epoch = core.epoch
    assert beat(core, a.node_id, a.epoch).instruction.kind == Kind.RELOAD_SCHEDULE
    assert beat(core, a.node_id, epoch).instruction.kind == Kind.NONE
    assert beat(core, "n-unknown", epoch).instruction.kind == Kind.REJOIN
    clock.t += 0.8
    beat(core, a.node_id, epoch)
    beat(core, b.node_id, epoch)
    clock.t += 0.5  # c's lease (1.0 s) ran out; a and b renewed
    assert core.expire_leases() == [c.node_id]
    assert core.epoch == epoch + 1
    assert core.members[c.node_id].state == "dead"
    assert any(e.kind == "death" and e.node_id == c.node_id for e in core.events)
    assert beat(core, a.node_id, epoch).instruction.kind == Kind.RELOAD_SCHEDULE
    assert beat(core, c.node_id, epoch).instruction.kind == Kind.REJOIN


def test_death_moves_a_node_from_best_covered_stage_with_recovery_plan() -> None:
    clock = Clock()
    core = Coordinator(config("model.stages=4"), clock=clock)
    nodes = [join(core, 9000 + i, tp=1.0 + i) for i in range(6)]  # stages 0,1,2,3 then two more
    # start training so recoveries are real (not "fresh")
    for r in nodes:
        beat(core, r.node_id, core.epoch, step=5)
    by_stage: dict[int, list[str]] = {}
    for r in nodes:
        by_stage.setdefault(core.members[r.node_id].stage, []).append(r.node_id)
    lonely = next(s for s in (1, 2, 3) if len(by_stage[s]) == 1)
    victim = by_stage[lonely][0]
    clock.t += 0.6
    for r in nodes:
        if r.node_id != victim:
            beat(core, r.node_id, core.epoch, step=6)
    clock.t += 0.6
    assert core.expire_leases() == [victim]
    assert core.coverage()[lonely] == 1  # someone moved in
    mover = next(m for m in core.members.values() if m.live and m.stage == lonely)
    reply = beat(core, mover.node_id, core.epoch, step=7)
    assert reply.instruction.kind == Kind.CHANGE_STAGE and reply.instruction.stage == lonely
    plan = reply.instruction.recovery
    assert plan.method in ("checkfree", "checkfree-plus") and plan.plan_id > 0
    assert len(plan.sources) == len(plan.weights) >= 1
    assert all(src.node_id != mover.node_id for src in plan.sources)
    assert mover.state == "recovering"
    # repeated until acknowledged, then gone
    assert beat(core, mover.node_id, core.epoch).instruction.kind == Kind.CHANGE_STAGE
    with pytest.raises(UnknownNode):
        core.report_recovery(pb.RecoveryReport(node_id=mover.node_id, plan_id=plan.plan_id + 99, success=True))
    core.report_recovery(pb.RecoveryReport(node_id=mover.node_id, plan_id=plan.plan_id, success=True))
    assert mover.state == "alive"
    assert beat(core, mover.node_id, core.epoch).instruction.kind == Kind.NONE


def test_joiner_to_covered_stage_copies_a_replica_and_is_kept_out_of_paths_until_done() -> None:
    core = Coordinator(config("train.microbatches=2"), clock=Clock())
    first = [join(core, 9000 + i) for i in range(3)]
    for r in first:
        beat(core, r.node_id, core.epoch, step=3)
    late = join(core, 9100, preferred_stage=2)
    assert late.stage == 2
    assert late.instruction.kind == Kind.RECOVER
    assert late.instruction.recovery.method == "replica-copy"
    assert [s.node_id for s in late.instruction.recovery.sources] == [first[2].node_id]
    sched = core.schedule(pb.ScheduleRequest(node_id=first[0].node_id))
    assert all(late.node_id not in p.node_ids for p in sched.paths)
    core.report_recovery(pb.RecoveryReport(node_id=late.node_id, plan_id=late.instruction.recovery.plan_id,
                                           success=True))
    sched = core.schedule(pb.ScheduleRequest(node_id=late.node_id))
    assert sched.stage == 2 and sched.origin_index == -1
    assert sum(sched.visits.values()) >= 1


def test_schedule_paths_for_origins() -> None:
    core = Coordinator(config("train.microbatches=3"), clock=Clock())
    nodes = [join(core, 9000 + i) for i in range(5)]  # stages 0,1,2,0,1
    origin = nodes[0]
    sched = core.schedule(pb.ScheduleRequest(node_id=origin.node_id))
    assert sched.epoch == core.epoch and sched.stage == 0
    assert len(sched.paths) == 3
    for i, p in enumerate(sched.paths):
        assert p.microbatch == i and list(p.stages) == [0, 1, 2, 0]
        assert p.node_ids[0] == p.node_ids[-1] == origin.node_id
    assert {p.node_id for p in sched.peers} == {r.node_id for r in nodes}
    assert sched.visits[origin.node_id] == 3
    mid = core.schedule(pb.ScheduleRequest(node_id=nodes[2].node_id))  # the only stage-2 node
    assert not mid.paths and sum(mid.visits.values()) == 6 and len(mid.visits) == 2
    with pytest.raises(UnknownNode):
        core.schedule(pb.ScheduleRequest(node_id="n-nobody"))


def test_sync_round_via_core_and_wrong_stage() -> None:
    clock = Clock()
    core = Coordinator(config(), clock=clock)
    nodes = [join(core, 9000 + i) for i in range(6)]  # two replicas per stage
    s1 = [r for r in nodes if r.stage == 1]
    reply = core.sync_round(pb.SyncRoundRequest(node_id=s1[0].node_id, stage=1, fragment=0, outer_step=1))
    assert not reply.ready and reply.retry_after_s > 0
    reply = core.sync_round(pb.SyncRoundRequest(node_id=s1[1].node_id, stage=1, fragment=0, outer_step=1))
    assert reply.ready and [p.node_id for p in reply.participants] == sorted(r.node_id for r in s1)
    assert all(p.address.startswith("127.0.0.1:") for p in reply.participants)
    with pytest.raises(Conflict):
        core.sync_round(pb.SyncRoundRequest(node_id=s1[0].node_id, stage=2, fragment=0, outer_step=1))
    with pytest.raises(InvalidRequest):
        core.sync_round(pb.SyncRoundRequest(node_id=s1[0].node_id, stage=1, fragment=3, outer_step=1))
    assert core.outer_step() == 1


@pytest.mark.parametrize("field,value,message", [
    ("address", "", "address is empty"),
    ("address", "nohost", "host:port"),
    ("address", "host:0", "host:port"),
    ("address", "host:70000", "host:port"),
    ("address", "bad host:80", "host:port"),
    ("throughput", 0.0, "throughput must be > 0"),
    ("throughput", -1.0, "throughput"),
    ("throughput", math.nan, "finite"),
    ("throughput", math.inf, "finite"),
    ("device", "", "device is empty"),
    ("device", "x" * 1000, "longer than"),
    ("version", "", "version is empty"),
    ("stage", 3, "stage 3 out of range"),
    ("stage", -2, "out of range"),
    ("preferred_stage", 7, "preferred_stage"),
    ("node_id", "x" * 100, "not a valid node id"),
    ("node_id", "bad id!", "not a valid node id"),
])
def test_malformed_join_rejected_and_nothing_changes(field: str, value: object, message: str) -> None:
    core = Coordinator(config(), clock=Clock())
    join(core, 9000)
    before = (core.epoch, len(core.members), len(core.events))
    with pytest.raises(InvalidRequest, match=message):
        join(core, 9001, **{field: value})
    assert (core.epoch, len(core.members), len(core.events)) == before


def test_malformed_heartbeats_and_reports_rejected() -> None:
    core = Coordinator(config(), clock=Clock())
    a = join(core, 9000)
    before = core.members[a.node_id].last_seen
    for metrics in (pb.NodeMetrics(loss=math.nan), pb.NodeMetrics(tokens_per_s=-1.0),
                    pb.NodeMetrics(step=-5), pb.NodeMetrics(grad_norm=math.inf)):
        with pytest.raises(InvalidRequest):
            core.heartbeat(pb.HeartbeatRequest(node_id=a.node_id, metrics=metrics))
    with pytest.raises(InvalidRequest):
        core.heartbeat(pb.HeartbeatRequest(node_id=""))
    assert core.members[a.node_id].metrics.loss == 0.0 and core.members[a.node_id].last_seen == before
    with pytest.raises(UnknownNode):
        core.report_links(pb.LinkReport(node_id=a.node_id, links=[pb.LinkMeasurement(peer_id="n-ghost", rtt_s=0.1)]))
    b = join(core, 9001)
    with pytest.raises(InvalidRequest):
        core.report_links(pb.LinkReport(node_id=a.node_id, links=[pb.LinkMeasurement(peer_id=b.node_id,
                                                                                       rtt_s=-0.1)]))
    with pytest.raises(InvalidRequest, match="itself"):
        core.report_links(pb.LinkReport(node_id=a.node_id, links=[pb.LinkMeasurement(peer_id=a.node_id,
                                                                                       rtt_s=0.1)]))
    with pytest.raises(UnknownNode):
        core.leave(pb.LeaveRequest(node_id="n-ghost"))
    with pytest.raises(InvalidRequest):
        core.report_recovery(pb.RecoveryReport(node_id=a.node_id, plan_id=0))
    with pytest.raises(InvalidRequest):
        core.status(pb.StatusRequest(max_events=-1))
    assert core.link_matrix() == {}


def test_links_feed_the_planner() -> None:
    core = Coordinator(config("model.stages=2", "train.microbatches=4", "skippipe.planner=skippipe"), clock=Clock())
    o = join(core, 9000)
    near, far = join(core, 9001), join(core, 9002, preferred_stage=1)
    assert near.stage == far.stage == 1
    core.report_links(pb.LinkReport(node_id=o.node_id, links=[
        pb.LinkMeasurement(peer_id=near.node_id, rtt_s=0.001, bandwidth_bytes_per_s=1e9),
        pb.LinkMeasurement(peer_id=far.node_id, rtt_s=30.0, bandwidth_bytes_per_s=1e3)]))
    assert core.link_matrix()[(o.node_id, far.node_id)] == (30.0, 1e3)
    third = join(core, 9003, data=False, preferred_stage=1)  # membership change -> re-plan with the links
    sched = core.schedule(pb.ScheduleRequest(node_id=o.node_id))
    assert all(p.node_ids[1] != far.node_id for p in sched.paths)
    # far takes no inner steps, so sync rounds of stage 1 do not wait for it: the replicas the plan
    # visits form the round as soon as both have asked (no join window)
    busy = sorted({p.node_ids[1] for p in sched.paths})
    assert busy == sorted([near.node_id, third.node_id])
    replies = [core.sync_round(pb.SyncRoundRequest(node_id=n, stage=1, fragment=0, outer_step=1)) for n in busy]
    assert not replies[0].ready
    assert replies[1].ready and [p.node_id for p in replies[1].participants] == busy


def test_leave_and_failure_report() -> None:
    clock = Clock()
    core = Coordinator(config(), clock=clock)
    a, b, c = (join(core, 9000 + i) for i in range(3))
    core.leave(pb.LeaveRequest(node_id=c.node_id, reason="spot preemption"))
    assert core.members[c.node_id].state == "left"
    ack = core.report_failure(pb.FailureReport(reporter_id=a.node_id, suspect_id=b.node_id, reason="timeout"))
    assert core.members[b.node_id].state == "alive" and "still heartbeating" in ack.message
    clock.t += 0.9  # b's heartbeat is now late (> 2 intervals) though its lease has not run out
    beat(core, a.node_id, core.epoch)
    core.report_failure(pb.FailureReport(reporter_id=a.node_id, suspect_id=b.node_id, reason="timeout"))
    assert core.members[b.node_id].state == "dead"


def test_leave_carries_the_final_step_past_the_last_heartbeat() -> None:
    core = Coordinator(config(), clock=Clock())
    a = join(core, 9000)
    join(core, 9001), join(core, 9002)
    beat(core, a.node_id, core.epoch, step=59)
    core.leave(pb.LeaveRequest(node_id=a.node_id, reason="run finished",
                               metrics=pb.NodeMetrics(step=60, loss=1.5, tokens_per_s=10.0)))
    status = {n.node_id: n for n in core.status(pb.StatusRequest()).nodes}
    assert status[a.node_id].state == "left" and status[a.node_id].metrics.step == 60


def test_leave_with_bad_metrics_is_refused_and_changes_nothing() -> None:
    core = Coordinator(config(), clock=Clock())
    a = join(core, 9000)
    join(core, 9001), join(core, 9002)
    beat(core, a.node_id, core.epoch, step=5)
    with pytest.raises(InvalidRequest, match="loss"):
        core.leave(pb.LeaveRequest(node_id=a.node_id, metrics=pb.NodeMetrics(step=6, loss=math.nan)))
    assert core.members[a.node_id].state == "alive" and core.members[a.node_id].metrics.step == 5


def test_restart_from_sqlite_keeps_identity_and_stage(tmp_path: Path) -> None:
    clock = Clock()
    core = Coordinator(config(), Store(tmp_path), clock=clock)
    nodes = [join(core, 9000 + i) for i in range(4)]
    for r in nodes:
        beat(core, r.node_id, core.epoch, step=4)
    core.sync_round(pb.SyncRoundRequest(node_id=nodes[1].node_id, stage=1, fragment=0, outer_step=3))
    epoch = core.epoch
    core.flush_metrics()
    core.close()

    core2 = Coordinator(config(), Store(tmp_path), clock=clock)
    assert core2.epoch > epoch
    assert set(core2.members) == {r.node_id for r in nodes}
    assert core2.members[nodes[1].node_id].metrics.step == 4
    assert core2.outer_step() == 3
    assert beat(core2, nodes[0].node_id, epoch).instruction.kind == Kind.REJOIN
    again = join(core2, 9000, node_id=nodes[0].node_id, stage=nodes[0].stage)
    assert again.node_id == nodes[0].node_id and again.stage == nodes[0].stage
    assert again.instruction.kind == Kind.NONE
    assert beat(core2, nodes[0].node_id, again.epoch).instruction.kind == Kind.NONE
    # the others never re-register: after a lease they are dead
    clock.t += 1.5
    beat(core2, nodes[0].node_id, core2.epoch)
    assert sorted(core2.expire_leases()) == sorted(r.node_id for r in nodes[1:])
    round_reply = core2.sync_round(pb.SyncRoundRequest(node_id=nodes[0].node_id, stage=0, fragment=0,
                                                       outer_step=1))
    assert round_reply.ready
    core2.close()


def test_skippipe_planner_paths_skip_stages() -> None:
    core = Coordinator(config("model.stages=5", "train.microbatches=2", "skippipe.planner=skippipe",
                              "skippipe.skip_ratio=0.5"), clock=Clock())
    nodes = [join(core, 9000 + i) for i in range(10)]
    origins = [r for r in nodes if r.stage == 0]
    assert len(origins) == 2
    for o in origins:
        sched = core.schedule(pb.ScheduleRequest(node_id=o.node_id))
        assert len(sched.paths) == 2
        for p in sched.paths:
            assert p.stages[0] == p.stages[-1] == 0 and len(p.stages) == 2 + 2  # m = round(0.5 * 4) = 2
            assert len(p.node_ids) == len(p.stages) and p.node_ids[0] == o.node_id
            for stage, node_id in zip(p.stages, p.node_ids, strict=True):
                assert core.members[node_id].stage == stage


def test_planner_failure_falls_back_to_full_pipeline() -> None:
    # memory_cap below microbatches per origin: the SkipPipe planner refuses; paths still come back
    core = Coordinator(config("train.microbatches=3", "skippipe.planner=skippipe", "skippipe.memory_cap=1"),
                       clock=Clock())
    nodes = [join(core, 9000 + i) for i in range(3)]
    sched = core.schedule(pb.ScheduleRequest(node_id=nodes[0].node_id))
    assert [list(p.stages) for p in sched.paths] == [[0, 1, 2, 0]] * 3


def test_never_hosted_stage_starts_fresh_even_after_training_began() -> None:
    core = Coordinator(config(), clock=Clock())
    a, b = join(core, 9000), join(core, 9001)
    beat(core, a.node_id, core.epoch, step=10)
    c = join(core, 9002)
    assert c.stage == 2 and c.instruction.recovery.method == "fresh"
    assert core.members[c.node_id].state == "alive"
    d = join(core, 9003, preferred_stage=1)
    assert d.instruction.recovery.method == "replica-copy"
    assert [s.node_id for s in d.instruction.recovery.sources] == [b.node_id]


def test_origin_indices_stable_as_origins_join() -> None:
    core = Coordinator(config(), clock=Clock())
    first = [join(core, 9000 + i) for i in range(6)]  # origins: first[0], first[3]
    later = join(core, 9100, preferred_stage=0)
    indices = {r.node_id: core.schedule(pb.ScheduleRequest(node_id=r.node_id)).origin_index
               for r in (first[0], first[3], later)}
    assert indices == {first[0].node_id: 0, first[3].node_id: 1, later.node_id: 2}
    assert core.schedule(pb.ScheduleRequest(node_id=later.node_id)).num_origins == 3


def test_stale_plan_served_with_its_own_epoch_while_membership_churns() -> None:
    core = Coordinator(config(), clock=Clock())
    nodes = [join(core, 9000 + i) for i in range(3)]
    fresh = core.schedule(pb.ScheduleRequest(node_id=nodes[0].node_id))
    assert fresh.epoch == core.epoch and len(fresh.paths) == 2
    join(core, 9100)  # epoch moves on; no plan for it yet
    stale = core.schedule(pb.ScheduleRequest(node_id=nodes[0].node_id), allow_stale=True)
    assert stale.epoch == fresh.epoch < core.epoch  # the node will see RELOAD_SCHEDULE and ask again
    assert beat(core, nodes[0].node_id, stale.epoch).instruction.kind == Kind.RELOAD_SCHEDULE
    current = core.schedule(pb.ScheduleRequest(node_id=nodes[0].node_id))
    assert current.epoch == core.epoch


def test_preferences_hold_while_nodes_arrive_then_gaps_are_filled() -> None:
    clock = Clock()
    core = Coordinator(config(), clock=clock)
    # Three nodes all prefer stage 1 at start-up: stage 2 is empty only because its nodes are late.
    replies = [join(core, 9100 + i, preferred_stage=1, has_data=i == 0) for i in range(3)]
    assert [r.stage for r in replies[1:]] == [1, 1]
    assert all(r.instruction.kind != Kind.CHANGE_STAGE for r in replies)
    assert core.coverage()[2] == 0
    for r in replies:
        beat(core, r.node_id, r.epoch)
    # Past the settle window (one lease) with stage 2 still empty, the sweep moves a node there.
    clock.t += 1.5
    for r in replies:
        beat(core, r.node_id, r.epoch)
    core.expire_leases()
    assert core.coverage()[2] == 1 and core.coverage()[1] == 1


def test_origin_reaching_the_last_step_finishes_the_run() -> None:
    clock = Clock()
    core = Coordinator(config("train.steps=5"), clock=clock)
    origin = join(core, 9200, preferred_stage=0)
    # Stage nodes that could host stage 0 (they have data), and stage 1 has a spare replica.
    s1, s1b, s2 = (join(core, 9201 + i, preferred_stage=p) for i, p in enumerate((1, 1, 2)))
    assert [r.stage for r in (origin, s1, s1b, s2)] == [0, 1, 1, 2]
    assert beat(core, s1.node_id, s1.epoch, step=3).instruction.kind != Kind.SHUTDOWN
    # The origin finished its steps but still evaluates through the pipeline: nobody is shut down yet.
    assert beat(core, origin.node_id, origin.epoch, step=5).instruction.kind != Kind.SHUTDOWN
    assert core.finishing
    assert beat(core, s2.node_id, s2.epoch, step=5).instruction.kind != Kind.SHUTDOWN
    # The origin leaves at the end: that no longer pulls a stage node into stage 0; the run is over.
    core.leave(pb.LeaveRequest(node_id=origin.node_id, reason="finished"))
    assert beat(core, s1.node_id, core.epoch, step=4).instruction.kind == Kind.SHUTDOWN
    assert beat(core, s2.node_id, core.epoch, step=5).instruction.kind == Kind.SHUTDOWN
    assert core.coverage()[0] == 0
