"""CoordinatorClient.heartbeat: over HeartbeatStream, unary fallback when the stream breaks, reopening.

A fake coordinator (real grpc.aio server on port 0, in this process) counts which RPC answered and
can break the stream on demand or not serve it at all.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from lowband.node.coordinator_client import CoordinatorClient
from lowband.protocols import coordinator_pb2 as pb
from lowband.protocols import coordinator_pb2_grpc as pb_grpc
from lowband.protocols.rpc import TokenAuthInterceptor

TOKEN = "hb-token"


class FakeCoordinator(pb_grpc.CoordinatorServicer):
    def __init__(self, *, stream: bool = True) -> None:
        self.serve_stream = stream
        self.unary = 0
        self.streamed = 0
        self.streams_opened = 0
        self.break_after: int | None = None   # abort the current stream after this many replies

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext) -> pb.HeartbeatReply:
        self.unary += 1
        return pb.HeartbeatReply(epoch=request.epoch + 1)

    async def HeartbeatStream(self, request_iterator: AsyncIterator[pb.HeartbeatRequest],
                              context: grpc.aio.ServicerContext) -> AsyncIterator[pb.HeartbeatReply]:
        if not self.serve_stream:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "no stream here")
        self.streams_opened += 1
        sent = 0
        async for request in request_iterator:
            if self.break_after is not None and sent >= self.break_after:
                self.break_after = None
                await context.abort(grpc.StatusCode.INTERNAL, "stream broken on purpose")
            self.streamed += 1
            sent += 1
            yield pb.HeartbeatReply(epoch=request.epoch + 1)


async def _serve(fake: FakeCoordinator) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server(interceptors=[TokenAuthInterceptor(TOKEN)])
    pb_grpc.add_CoordinatorServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def _run(coro: object) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout=60))  # type: ignore[arg-type]


@pytest.mark.timeout(90)
def test_heartbeats_go_over_one_stream() -> None:
    async def main() -> None:
        fake = FakeCoordinator()
        server, address = await _serve(fake)
        client = CoordinatorClient(address, TOKEN, rpc_timeout_s=5.0)
        try:
            for epoch in range(5):
                reply = await client.heartbeat(pb.HeartbeatRequest(node_id="n", epoch=epoch))
                assert reply.epoch == epoch + 1        # each reply answers its own request
            assert (fake.streamed, fake.unary, fake.streams_opened) == (5, 0, 1)
            assert (client.stream_heartbeats, client.unary_heartbeats) == (5, 0)
        finally:
            await client.close()
            await server.stop(None)
    _run(main())


@pytest.mark.timeout(90)
def test_broken_stream_falls_back_to_unary_then_reopens() -> None:
    async def main() -> None:
        fake = FakeCoordinator()
        fake.break_after = 2
        server, address = await _serve(fake)
        client = CoordinatorClient(address, TOKEN, rpc_timeout_s=5.0, backoff_initial_s=0.3, backoff_max_s=0.3)
        try:
            for epoch in range(3):
                reply = await client.heartbeat(pb.HeartbeatRequest(node_id="n", epoch=epoch))
                assert reply.epoch == epoch + 1
            # the third heartbeat met the broken stream and was answered unary, without an error
            assert (fake.streamed, fake.unary) == (2, 1)
            reply = await client.heartbeat(pb.HeartbeatRequest(node_id="n", epoch=10))
            assert reply.epoch == 11 and fake.unary == 2     # inside the backoff: still unary
            await asyncio.sleep(0.5)                          # backoff over (0.3 s +- 25%)
            reply = await client.heartbeat(pb.HeartbeatRequest(node_id="n", epoch=20))
            assert reply.epoch == 21
            assert (fake.streams_opened, fake.streamed, fake.unary) == (2, 3, 2)
        finally:
            await client.close()
            await server.stop(None)
    _run(main())


@pytest.mark.timeout(90)
def test_coordinator_without_stream_is_served_unary() -> None:
    async def main() -> None:
        fake = FakeCoordinator(stream=False)
        server, address = await _serve(fake)
        client = CoordinatorClient(address, TOKEN, rpc_timeout_s=5.0, backoff_initial_s=5.0, backoff_max_s=5.0)
        try:
            for epoch in range(4):
                assert (await client.heartbeat(pb.HeartbeatRequest(node_id="n", epoch=epoch))).epoch == epoch + 1
            assert fake.unary == 4 and fake.streamed == 0
            assert client.unary_heartbeats == 4
        finally:
            await client.close()
            await server.stop(None)
    _run(main())


@pytest.mark.timeout(90)
def test_heartbeat_raises_when_coordinator_is_down() -> None:
    async def main() -> None:
        fake = FakeCoordinator()
        server, address = await _serve(fake)
        client = CoordinatorClient(address, TOKEN, rpc_timeout_s=1.0)
        try:
            await client.heartbeat(pb.HeartbeatRequest(node_id="n"))
            await server.stop(None)
            with pytest.raises(grpc.aio.AioRpcError):
                await client.heartbeat(pb.HeartbeatRequest(node_id="n"))
        finally:
            await client.close()
    _run(main())
