"""HostileInputInterceptor on all four kinds of RPC: malformed bytes and a handler's ValidationError
become INVALID_ARGUMENT, a good request is served, and nothing logs a traceback."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from lowband.protocols import node_pb2
from lowband.protocols.errors import ValidationError
from lowband.protocols.hostile import HostileInputInterceptor
from lowband.protocols.peer_guard import GuardPolicy, PeerLog

pytestmark = pytest.mark.timeout(60)

Ping = node_pb2.PingRequest
GOOD = Ping(sent_at=1.0).SerializeToString()
REFUSED = Ping(sent_at=-1.0).SerializeToString()   # parses; the handler refuses it (ValidationError)
MALFORMED = b"\xff\xff\xff"


def check(request: Any) -> Any:
    assert isinstance(request, Ping), f"the handler got {type(request).__name__}, not a parsed message"
    if request.sent_at < 0:
        raise ValidationError("sent_at must not be negative")
    return node_pb2.PingReply(sent_at=request.sent_at)


async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
    return check(request)


async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    yield check(request)


async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
    reply = node_pb2.PingReply()
    async for request in requests:
        reply = check(request)
    return reply


async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    async for request in requests:
        yield check(request)


def handlers() -> grpc.GenericRpcHandler:
    kw = {"request_deserializer": Ping.FromString, "response_serializer": node_pb2.PingReply.SerializeToString}
    return grpc.method_handlers_generic_handler("test.Hostile", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, **kw),
        "UnaryStream": grpc.unary_stream_rpc_method_handler(unary_stream, **kw),
        "StreamUnary": grpc.stream_unary_rpc_method_handler(stream_unary, **kw),
        "StreamStream": grpc.stream_stream_rpc_method_handler(stream_stream, **kw),
    })


async def code_of(channel: grpc.aio.Channel, method: str, request: bytes) -> grpc.StatusCode:
    path = f"/test.Hostile/{method}"
    try:
        if method == "Unary":
            await channel.unary_unary(path)(request, timeout=10)
        elif method == "UnaryStream":
            async for _ in channel.unary_stream(path)(request, timeout=10):
                pass
        elif method == "StreamUnary":
            await channel.stream_unary(path)(iter([GOOD, request]), timeout=10)
        else:
            async for _ in channel.stream_stream(path)(iter([GOOD, request]), timeout=10):
                pass
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as exc:
        return exc.code()


@pytest.mark.parametrize("method", ["Unary", "UnaryStream", "StreamUnary", "StreamStream"])
def test_malformed_bytes_and_validation_errors_are_invalid_argument(method: str,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)

    async def main() -> None:
        server = grpc.aio.server(interceptors=[HostileInputInterceptor(GuardPolicy(strikes=0), log=PeerLog())])
        server.add_generic_rpc_handlers((handlers(),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                assert await code_of(channel, method, GOOD) == grpc.StatusCode.OK
                assert await code_of(channel, method, MALFORMED) == grpc.StatusCode.INVALID_ARGUMENT
                assert await code_of(channel, method, REFUSED) == grpc.StatusCode.INVALID_ARGUMENT
                assert await code_of(channel, method, GOOD) == grpc.StatusCode.OK
        finally:
            await server.stop(None)

    asyncio.run(main())
    assert not any(r.exc_info or r.levelno >= logging.ERROR for r in caplog.records), caplog.text
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("lowband")]
    assert len(lines) == 1 and "malformed" in lines[0]   # the second bad call falls in the same interval
