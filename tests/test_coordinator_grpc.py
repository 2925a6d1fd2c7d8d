"""The coordinator over real gRPC on loopback with many concurrent clients (no mocks).

Short leases (0.3 s heartbeat, 1.5 s lease) keep these fast while leaving margin on a busy machine.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lowband.coordinator.server import CoordinatorServer, start_coordinator
from lowband.protocols import coordinator_pb2 as pb
from lowband.protocols import coordinator_pb2_grpc as pb_grpc
from lowband.protocols.config import RunConfig, apply_overrides
from lowband.protocols.rpc import token_metadata

TOKEN = "test-token"
MD = token_metadata(TOKEN)
Kind = pb.Instruction.Kind
INTERVAL = 0.3


def config(*overrides: str) -> RunConfig:
    base = ["model.stages=3", f"membership.heartbeat_interval_s={INTERVAL}", "membership.lease_s=1.5",
            "membership.sync_join_window_s=0.5", "membership.sync_timeout_s=1.5"]
    return apply_overrides(RunConfig(), [*base, *overrides])


def run(test: Callable[[CoordinatorServer, list[pb_grpc.CoordinatorStub]], Awaitable[None]],
        tmp_path: Path, cfg: RunConfig | None = None, channels: int = 3) -> None:
    async def main() -> None:
        server = await start_coordinator(cfg or config(), tmp_path, TOKEN)
        chans = [grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") for _ in range(channels)]
        try:
            await test(server, [pb_grpc.CoordinatorStub(c) for c in chans])
        finally:
            for c in chans:
                await c.close()
            await server.stop(0.2)

    asyncio.run(main())


def join_req(port: int, tp: float = 1.0, **kw: Any) -> pb.JoinRequest:
    req = pb.JoinRequest(address=f"127.0.0.1:{port}", device="cpu", throughput=tp, version="0.1", stage=-1,
                         preferred_stage=-1, has_data=True)
    for k, v in kw.items():
        setattr(req, k, v)
    return req


class Node:
    """A simulated node: joins, then heartbeats every INTERVAL until stopped, recording instructions."""

    def __init__(self, stub: pb_grpc.CoordinatorStub, port: int, tp: float = 1.0) -> None:
        self.stub, self.port, self.tp = stub, port, tp
        self.node_id = ""
        self.stage = -1
        self.epoch = 0
        self.step = 0
        self.instructions: list[pb.Instruction] = []
        self.task: asyncio.Task[None] | None = None

    async def join(self, **kw: Any) -> pb.JoinReply:
        reply = await self.stub.Join(join_req(self.port, self.tp, **kw), metadata=MD, timeout=5)
        self.node_id, self.stage, self.epoch = reply.node_id, reply.stage, reply.epoch
        return reply

    async def beat(self) -> pb.HeartbeatReply:
        reply = await self.stub.Heartbeat(
            pb.HeartbeatRequest(node_id=self.node_id, epoch=self.epoch,
                                metrics=pb.NodeMetrics(step=self.step, loss=3.0, tokens_per_s=100.0 * self.tp,
                                                       bytes_sent=1000, grad_norm=0.5)),
            metadata=MD, timeout=5)
        kind = reply.instruction.kind
        if kind != Kind.NONE:
            self.instructions.append(reply.instruction)
        if kind == Kind.RELOAD_SCHEDULE:
            self.epoch = reply.epoch
        elif kind == Kind.CHANGE_STAGE and self.stage != reply.instruction.stage:
            self.stage = reply.instruction.stage
            await self.stub.ReportRecovery(pb.RecoveryReport(node_id=self.node_id,
                                                             plan_id=reply.instruction.recovery.plan_id,
                                                             success=True), metadata=MD, timeout=5)
        return reply

    def start(self) -> None:
        async def loop() -> None:
            while True:
                await self.beat()
                self.step += 1
                await asyncio.sleep(INTERVAL)
        self.task = asyncio.create_task(loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass


async def status(stub: pb_grpc.CoordinatorStub) -> pb.StatusReply:
    return await stub.Status(pb.StatusRequest(max_events=100), metadata=MD, timeout=5)


async def wait_for(pred: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await pred():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def test_many_clients_lease_expiry_and_reload(tmp_path: Path) -> None:
    async def body(server: CoordinatorServer, stubs: list[pb_grpc.CoordinatorStub]) -> None:
        nodes = [Node(stubs[i % len(stubs)], 9000 + i, tp=1.0 + (i % 3)) for i in range(24)]
        replies = await asyncio.gather(*(n.join() for n in nodes))
        assert len({r.node_id for r in replies}) == 24
        st = await status(stubs[0])
        totals = [sum(x.throughput for x in st.nodes if x.stage == s) for s in range(3)]
        assert max(totals) - min(totals) <= 3.0  # balanced by throughput, within one (fastest) node
        assert min(st.stage_coverage.values()) >= 6
        for n in nodes:
            n.start()
        await asyncio.sleep(0.7)
        victims = nodes[:3]
        for v in victims:
            await v.stop()
        epoch_before = (await status(stubs[0])).epoch

        async def dead() -> bool:
            s = await status(stubs[0])
            states = {x.node_id: x.state for x in s.nodes}
            return all(states[v.node_id] == "dead" for v in victims)

        await wait_for(dead, timeout=5.0)
        st = await status(stubs[0])
        assert st.epoch > epoch_before
        assert sum(st.stage_coverage.values()) == 21
        alive = [x for x in st.nodes if x.state == "alive"]
        assert len(alive) == 21 and all(x.heartbeat_age_s < 1.5 for x in alive)
        assert all(x.metrics.tokens_per_s > 0 for x in alive)
        assert sum(e.kind == "death" for e in st.events) == 3
        await asyncio.sleep(2 * INTERVAL + 0.1)  # every survivor heartbeats again and sees the new epoch
        for n in nodes[3:]:
            assert any(i.kind == Kind.RELOAD_SCHEDULE for i in n.instructions)
            assert n.epoch > epoch_before
        # a dead node that keeps heartbeating is told to rejoin
        reply = await victims[0].beat()
        assert reply.instruction.kind == Kind.REJOIN
        for n in nodes:
            await n.stop()

    run(body, tmp_path)


def test_rebalance_when_a_node_dies_and_when_one_joins(tmp_path: Path) -> None:
    async def body(server: CoordinatorServer, stubs: list[pb_grpc.CoordinatorStub]) -> None:
        nodes = [Node(stubs[i % 3], 9000 + i) for i in range(4)]
        for n in nodes:
            await n.join()
        assert [n.stage for n in nodes] == [0, 1, 2, 0]
        for n in nodes:
            n.step = 10  # training has started: recoveries are real, not "fresh"
            n.start()
        await asyncio.sleep(0.4)
        await nodes[2].stop()  # the only stage-2 node

        async def moved() -> bool:
            return any(i.kind == Kind.CHANGE_STAGE for n in (nodes[0], nodes[3]) for i in n.instructions)

        await wait_for(moved, timeout=5.0)
        mover = next(n for n in (nodes[0], nodes[3]) if any(i.kind == Kind.CHANGE_STAGE for i in n.instructions))
        change = next(i for i in mover.instructions if i.kind == Kind.CHANGE_STAGE)
        assert change.stage == 2
        assert change.recovery.method == "checkfree-plus"  # stage 2 is the last (edge) stage of 3
        assert [s.stage for s in change.recovery.sources] == [1]
        assert mover.stage == 2
        st = await status(stubs[0])
        assert dict(st.stage_coverage) == {0: 1, 1: 1, 2: 1}
        kinds = [e.kind for e in st.events]
        assert "death" in kinds and "move" in kinds
        await wait_for(lambda: _state_is(stubs[0], mover.node_id, "alive"), timeout=3.0)
        # a newcomer goes to the weakest stage and copies a live replica there
        newcomer = Node(stubs[1], 9100, tp=5.0)
        reply = await newcomer.join()
        assert reply.instruction.kind == Kind.RECOVER
        assert reply.instruction.recovery.method == "replica-copy"
        st = await status(stubs[0])
        assert st.stage_coverage[reply.stage] == 2
        for n in nodes:
            await n.stop()

    run(body, tmp_path)


async def _state_is(stub: pb_grpc.CoordinatorStub, node_id: str, state: str) -> bool:
    st = await status(stub)
    return any(x.node_id == node_id and x.state == state for x in st.nodes)


def test_sync_round_quorum_and_timeout(tmp_path: Path) -> None:
    cfg = config("membership.min_sync_participants=2")

    async def body(server: CoordinatorServer, stubs: list[pb_grpc.CoordinatorStub]) -> None:
        nodes = [Node(stubs[i % 3], 9000 + i) for i in range(9)]  # three replicas per stage
        for n in nodes:
            await n.join()
        for n in nodes:
            n.start()
        replicas = [n for n in nodes if n.stage == 1]
        assert len(replicas) == 3

        async def poll(n: Node, outer_step: int) -> pb.SyncRoundReply:
            while True:
                r = await n.stub.JoinSyncRound(pb.SyncRoundRequest(node_id=n.node_id, stage=1, fragment=0,
                                                                   outer_step=outer_step), metadata=MD, timeout=5)
                if r.ready or r.abandoned:
                    return r
                assert 0 < r.retry_after_s <= 0.5
                await asyncio.sleep(r.retry_after_s)

        # all three ask: forms at once with all of them, same id and order for everyone
        got = await asyncio.gather(*(poll(n, 1) for n in replicas))
        assert len({r.round_id for r in got}) == 1
        ids = [[p.node_id for p in r.participants] for r in got]
        assert ids[0] == sorted(n.node_id for n in replicas) and ids.count(ids[0]) == 3
        # two ask (third is late): formed after the join window without the third
        t0 = asyncio.get_running_loop().time()
        got2 = await asyncio.gather(poll(replicas[0], 2), poll(replicas[1], 2))
        waited = asyncio.get_running_loop().time() - t0
        assert got2[0].round_id > got[0].round_id and 0.4 <= waited < 2.5
        assert len(got2[0].participants) == 2
        late = await poll(replicas[2], 2)
        assert late.ready and replicas[2].node_id not in [p.node_id for p in late.participants]
        # only one asks: below the minimum of 2 -> abandoned at the timeout
        t0 = asyncio.get_running_loop().time()
        alone = await poll(replicas[0], 3)
        assert alone.abandoned and "quorum" in alone.reason
        assert asyncio.get_running_loop().time() - t0 >= 1.4
        for n in nodes:
            await n.stop()

    run(body, tmp_path, cfg)


def test_wrong_or_missing_token_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    async def body(server: CoordinatorServer, stubs: list[pb_grpc.CoordinatorStub]) -> None:
        stub = stubs[0]
        for md in (token_metadata("wrong"), None, token_metadata("")):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Join(join_req(9000), metadata=md, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Status(pb.StatusRequest(), metadata=md, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        st = await status(stub)
        assert len(st.nodes) == 0 and not st.events
        # the standard health service answers without a token
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            for service in ("", "lowband.Coordinator"):
                resp = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert resp.status == health_pb2.HealthCheckResponse.SERVING

    run(body, tmp_path)


def test_malformed_requests_get_clear_errors_and_change_nothing(tmp_path: Path) -> None:
    async def body(server: CoordinatorServer, stubs: list[pb_grpc.CoordinatorStub]) -> None:
        stub = stubs[0]
        good = Node(stub, 9000)
        await good.join()
        before = await status(stub)

        async def code_of(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            return err.value.code(), err.value.details() or ""

        bad_joins = [join_req(9001, address="not-an-address"), join_req(9001, throughput=-3.0),
                     join_req(9001, throughput=math.nan), join_req(9001, stage=17), join_req(9001, device=""),
                     join_req(9001, version="v" * 5000), join_req(9001, stage=0, has_data=False),
                     join_req(9001, node_id="x" * 500)]
        for req in bad_joins:
            code, details = await code_of(stub.Join(req, metadata=MD, timeout=5))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and details
        inv = grpc.StatusCode.INVALID_ARGUMENT
        nf = grpc.StatusCode.NOT_FOUND
        cases = [
            (stub.Heartbeat(pb.HeartbeatRequest(node_id=""), metadata=MD, timeout=5), inv),
            (stub.Heartbeat(pb.HeartbeatRequest(node_id=good.node_id, metrics=pb.NodeMetrics(loss=math.inf)),
                            metadata=MD, timeout=5), inv),
            (stub.GetSchedule(pb.ScheduleRequest(node_id="n-ghost"), metadata=MD, timeout=5), nf),
            (stub.Leave(pb.LeaveRequest(node_id="n-ghost"), metadata=MD, timeout=5), nf),
            (stub.JoinSyncRound(pb.SyncRoundRequest(node_id=good.node_id, stage=9), metadata=MD, timeout=5), inv),
            (stub.JoinSyncRound(pb.SyncRoundRequest(node_id=good.node_id, stage=0, outer_step=-1),
                                metadata=MD, timeout=5), inv),
            (stub.JoinSyncRound(pb.SyncRoundRequest(node_id=good.node_id, stage=2), metadata=MD, timeout=5),
             grpc.StatusCode.FAILED_PRECONDITION),
            (stub.ReportLinks(pb.LinkReport(node_id=good.node_id, links=[
                pb.LinkMeasurement(peer_id="n-other", rtt_s=math.nan)]), metadata=MD, timeout=5), inv),
            (stub.ReportLinks(pb.LinkReport(node_id=good.node_id, links=[
                pb.LinkMeasurement(peer_id="n-ghost", rtt_s=0.1)]), metadata=MD, timeout=5), nf),
            (stub.ReportFailure(pb.FailureReport(reporter_id=good.node_id, suspect_id="n-ghost"),
                                metadata=MD, timeout=5), nf),
            (stub.ReportRecovery(pb.RecoveryReport(node_id=good.node_id, plan_id=12345),
                                 metadata=MD, timeout=5), nf),
            (stub.Status(pb.StatusRequest(max_events=-4), metadata=MD, timeout=5), inv),
        ]
        for call, expected in cases:
            code, details = await code_of(call)
            assert code == expected, details
            assert details
        after = await status(stub)
        assert after.epoch == before.epoch
        assert [(n.node_id, n.stage, n.state) for n in after.nodes] == [(n.node_id, n.stage, n.state)
                                                                        for n in before.nodes]
        assert after.nodes[0].metrics.loss == 0.0
        # the server is still fine
        assert (await good.beat()).instruction.kind == Kind.NONE

    run(body, tmp_path)


def test_schedule_over_grpc_is_consistent_across_nodes(tmp_path: Path) -> None:
    cfg = config("model.stages=4", "train.microbatches=3", "skippipe.planner=skippipe", "skippipe.skip_ratio=0.34")

    async def body(server: CoordinatorServer, stubs: list[pb_grpc.CoordinatorStub]) -> None:
        nodes = [Node(stubs[i % 3], 9000 + i, tp=1.0 + i % 3) for i in range(12)]
        await asyncio.gather(*(n.join() for n in nodes))
        replies = await asyncio.gather(*(n.stub.GetSchedule(pb.ScheduleRequest(node_id=n.node_id), metadata=MD,
                                                            timeout=10) for n in nodes))
        epoch = replies[0].epoch
        assert all(r.epoch == epoch for r in replies)
        stage_of = {n.node_id: n.stage for n in nodes}
        paths = [(n.node_id, p) for n, r in zip(nodes, replies, strict=True) for p in r.paths]
        origins = [n for n in nodes if n.stage == 0]
        assert len(paths) == 3 * len(origins)
        assert sorted(r.origin_index for n, r in zip(nodes, replies, strict=True) if n.stage == 0) == \
            list(range(len(origins)))
        expected_visits: dict[str, dict[str, int]] = {}
        for origin, p in paths:
            assert p.node_ids[0] == p.node_ids[-1] == origin
            assert len(p.stages) == 2 + 2  # m = round(0.66 * 3) = 2 block stages
            assert [stage_of[i] for i in p.node_ids] == list(p.stages)
            for node_id in set(p.node_ids):
                expected_visits.setdefault(node_id, {}).setdefault(origin, 0)
                expected_visits[node_id][origin] += 1
        for n, r in zip(nodes, replies, strict=True):
            assert dict(r.visits) == expected_visits.get(n.node_id, {})
            assert {p.node_id for p in r.peers} == {x.node_id for x in nodes}
            assert r.stage == n.stage

    run(body, tmp_path, cfg)


def test_heartbeat_stream_renews_leases_and_carries_instructions(tmp_path: Path) -> None:
    async def body(server: CoordinatorServer, stubs: list[pb_grpc.CoordinatorStub]) -> None:
        nodes = [Node(stubs[i % 3], 9000 + i) for i in range(6)]
        for n in nodes:
            await n.join()
        streams = {n.node_id: n.stub.HeartbeatStream(metadata=MD) for n in nodes}

        async def beat(n: Node) -> pb.HeartbeatReply:
            call = streams[n.node_id]
            await call.write(pb.HeartbeatRequest(node_id=n.node_id, epoch=n.epoch,
                                                 metrics=pb.NodeMetrics(step=1, tokens_per_s=5.0)))
            reply = await call.read()
            n.epoch = reply.epoch
            return reply

        first = await asyncio.gather(*(beat(n) for n in nodes))
        assert [r.instruction.kind for r in first[:5]] == [Kind.RELOAD_SCHEDULE] * 5  # joined in earlier epochs
        assert first[5].instruction.kind == Kind.NONE
        # keep five alive over their streams for longer than a lease; the sixth goes quiet
        for _ in range(7):
            await asyncio.gather(*(beat(n) for n in nodes[:5]))
            await asyncio.sleep(INTERVAL)
        st = await status(stubs[0])
        states = {x.node_id: x.state for x in st.nodes}
        assert [states[n.node_id] for n in nodes] == ["alive"] * 5 + ["dead"]
        assert all(x.metrics.tokens_per_s == 5.0 for x in st.nodes if x.state == "alive")
        replies = await asyncio.gather(*(beat(n) for n in nodes))
        assert replies[5].instruction.kind == Kind.REJOIN
        # a malformed message ends that stream with INVALID_ARGUMENT; the others carry on
        bad = streams[nodes[0].node_id]
        await bad.write(pb.HeartbeatRequest(node_id=nodes[0].node_id, metrics=pb.NodeMetrics(loss=math.nan)))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await bad.read()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (await beat(nodes[1])).instruction.kind == Kind.NONE
        # a stream without the token is refused at once, before any message (writing one first races the
        # refusal: a client still writing may see INTERNAL on its own write)
        unauth = stubs[0].HeartbeatStream(metadata=token_metadata("wrong"))
        assert await unauth.code() == grpc.StatusCode.UNAUTHENTICATED
        for n in nodes[1:]:
            await streams[n.node_id].done_writing()

    run(body, tmp_path)
