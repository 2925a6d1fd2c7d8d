"""The node daemon: waits out a coordinator that is not up yet, leaves cleanly on SIGTERM, reports its memory
when it joins; its schedule keeper shares one reload among the microbatches that name an unknown peer."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from node_procs import LocalRun

from lowband.coordinator.server import start_coordinator
from lowband.node.coordinator_client import Backoff, CoordinatorClient
from lowband.node.daemon import NodeDaemon, NodeOptions
from lowband.node.event_log import EventLog
from lowband.node.membership import Membership
from lowband.node.pipeline.agent import Schedule
from lowband.node.schedule_keeper import ScheduleKeeper
from lowband.node.stage_assembly import CurrentStage
from lowband.protocols import coordinator_pb2 as pb
from lowband.protocols import coordinator_pb2_grpc as pb_grpc
from lowband.protocols.config import RunConfig, apply_overrides
from lowband.protocols.rpc import TokenAuthInterceptor
from lowband.sim.procs import free_port

TOKEN = "daemon-token"


def test_backoff_grows_and_is_capped() -> None:
    backoff = Backoff(0.1, 1.0)
    delays = [backoff.next_delay() for _ in range(8)]
    assert delays[0] <= 0.125 and delays[1] > delays[0] * 1.1   # doubles (with +-25% jitter)
    assert max(delays) <= 1.25 and delays[-1] >= 0.75           # capped at max_s (+-25%)
    backoff.reset()
    assert backoff.next_delay() <= 0.125


def test_node_waits_for_coordinator_then_leaves_on_sigterm(tmp_path: Path) -> None:
    run = LocalRun(tmp_path, ["model.stages=2", "membership.heartbeat_interval_s=0.5", "membership.lease_s=5"])
    try:
        port = free_port()
        run.address = f"127.0.0.1:{port}"
        node = run.start_node("node", preferred_stage=0)
        log = tmp_path / "node.log"
        deadline = time.monotonic() + 60
        while "retrying" not in log.read_text():   # no coordinator yet: the node retries, does not exit
            assert time.monotonic() < deadline and node.poll() is None, run.tail()
            time.sleep(0.1)
        time.sleep(1.0)
        assert node.poll() is None, run.tail()
        run.start_coordinator(bind=f"127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        while not run.records(0, "schedule"):
            assert time.monotonic() < deadline and node.poll() is None, run.tail()
            time.sleep(0.1)
        node.send_signal(signal.SIGTERM)
        assert run.wait_nodes(timeout_s=15) == [0], run.tail()
        leave = run.records(0, "leave")
        assert leave and leave[0]["acknowledged"] is True and "SIGTERM" in leave[0]["reason"]
        assert "event leave" in (tmp_path / "coordinator.log").read_text()
    finally:
        run.close()


class SlowScheduler(pb_grpc.CoordinatorServicer):
    """Answers GetSchedule after a delay, with the number of the answer as its epoch."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.calls = 0

    async def GetSchedule(self, request: pb.ScheduleRequest, context: grpc.aio.ServicerContext) -> pb.ScheduleReply:
        self.calls += 1
        epoch = self.calls
        await asyncio.sleep(self.delay_s)
        return pb.ScheduleReply(epoch=epoch, stage=1)


@pytest.mark.timeout(60)
def test_microbatches_naming_unknown_peers_share_one_schedule_reload_and_wait_for_it() -> None:
    """Many microbatches naming a peer we do not know (a node that just moved stages has no schedule yet)
    trigger one reload, and those that arrive while it is under way wait for it instead of going on
    without the address (they would give up their microbatch without telling its origin). A schedule
    fetched before the node changed stage does not count for the new stage's agent."""

    async def main() -> None:
        fake = SlowScheduler(delay_s=0.1)
        server = grpc.aio.server(interceptors=[TokenAuthInterceptor(TOKEN)])
        pb_grpc.add_CoordinatorServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        client = CoordinatorClient(f"127.0.0.1:{port}", TOKEN)
        membership, current = Membership(node_id="me"), CurrentStage()
        keeper = ScheduleKeeper(client, membership, current, EventLog(""), asyncio.Event(), heartbeat_s=0.5,
                                changed_at=time.monotonic())
        try:
            async def microbatch() -> int:
                await keeper.refresh_for_unknown_peer()
                return membership.epoch   # the schedule this microbatch goes on with

            first = await asyncio.gather(*(microbatch() for _ in range(5)))
            assert first == [1] * 5 and fake.calls == 1   # one reload, and nobody went on before it was in
            await asyncio.sleep(0.3)
            assert await microbatch() == 2                # later: the schedule may have changed again
            received: list[Schedule] = []
            current.agent = SimpleNamespace(set_schedule=received.append, is_origin=False)  # type: ignore[assignment]
            assert await microbatch() == 3 and len(received) == 1   # a new stage's agent: at once, not cached
        finally:
            await client.close()
            await server.stop(None)

    asyncio.run(main())


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _mem_total_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal in /proc/meminfo")


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="reads the process's memory from /proc")
@pytest.mark.timeout(60)
def test_join_reports_the_memory_the_node_has(tmp_path: Path) -> None:
    """The coordinator learns a CPU node's memory in bytes: at least what this process already uses,
    at most the host's RAM (0, a page count or KiB would fall outside)."""

    async def main() -> None:
        server = await start_coordinator(apply_overrides(RunConfig(), ["model.stages=2"]), tmp_path, TOKEN)
        daemon = NodeDaemon(NodeOptions(coordinator=f"127.0.0.1:{server.port}", token=TOKEN, device="cpu"))
        daemon.address = "127.0.0.1:1"
        try:
            reply = await daemon.join(throughput=1.0, stage=-1)
            assert reply is not None
            memory = server.core.members[reply.node_id].memory_bytes
            assert _rss_bytes() <= memory <= _mem_total_bytes()
        finally:
            await daemon.transport.close()
            await daemon.client.close()
            await server.stop(0.2)

    asyncio.run(main())
