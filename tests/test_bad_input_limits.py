"""Limits on bad input over real sockets: oversized messages refused before they are read, and a peer
that keeps sending malformed messages (gRPC) or broken frames (activation wire) cooled down.

Generic clients only (raw bytes, a hand-written HTTP/2 exchange, raw TCP), all on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from pathlib import Path

import grpc
import pytest
from node_cluster import TOKEN, start_node, stopping

from lowband.coordinator.server import start_coordinator
from lowband.node.pipeline.wire import ACCEPTED, NONCE_BYTES, REQUEST, handshake_mac
from lowband.node.train.model import ModelConfig, init_stage
from lowband.protocols import coordinator_pb2 as cpb
from lowband.protocols import node_pb2
from lowband.protocols.config import RunConfig, apply_overrides
from lowband.protocols.peer_guard import GuardPolicy
from lowband.protocols.rpc import MAX_MESSAGE_BYTES, grpc_options, token_metadata

pytestmark = [pytest.mark.timeout(60), pytest.mark.filterwarnings("ignore:The given buffer is not writable")]

MD = token_metadata(TOKEN)
MALFORMED = b"\xff\xff\xff"   # a varint that never ends: no request type parses it
COOL = GuardPolicy(strikes=3, window_s=30.0, cooldown_s=1.0)
CFG = ModelConfig.from_preset("tiny")


def config() -> RunConfig:
    return apply_overrides(RunConfig(), ["model.stages=3", "membership.lease_s=600"])


async def code_of(call: grpc.aio.UnaryUnaryMultiCallable, request: bytes, metadata: tuple[tuple[str, str], ...] = MD
                  ) -> grpc.StatusCode:
    try:
        await call(request, metadata=metadata, timeout=10)
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as exc:
        return exc.code()


# ----------------------------------------------------------------------------- oversized


def test_an_oversized_message_is_refused_and_the_server_goes_on(tmp_path: Path) -> None:
    async def main() -> None:
        server = await start_coordinator(config(), tmp_path, TOKEN)
        # the client's own send limit would stop the message before it leaves: lift it
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}",
                                            options=grpc_options(max_message_bytes=4 * MAX_MESSAGE_BYTES))
        try:
            status = channel.unary_unary("/lowband.Coordinator/Status")
            assert await code_of(status, b"\x00" * (MAX_MESSAGE_BYTES + 1)) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert await code_of(status, cpb.StatusRequest().SerializeToString()) == grpc.StatusCode.OK
        finally:
            await channel.close()
            await server.stop(0.2)

    asyncio.run(main())


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _literal(name: bytes, value: bytes) -> bytes:
    """An HPACK header field, literal without indexing and without Huffman coding (RFC 7541 6.2.2)."""
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def test_an_oversized_message_is_refused_from_its_length_prefix_before_its_body_arrives(tmp_path: Path) -> None:
    """A gRPC message announces its length in a 5-byte prefix; the server must refuse it from that
    prefix (grpc's max_receive_message_length, rpc.grpc_options) instead of buffering the body first.
    By hand over HTTP/2: announce 64 MiB, send 16 KB, and the call must end, RESOURCE_EXHAUSTED."""
    async def main() -> None:
        server = await start_coordinator(config(), tmp_path, TOKEN)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            headers = b"".join(_literal(n, v) for n, v in [
                (b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/lowband.Coordinator/Status"),
                (b":authority", b"127.0.0.1"), (b"content-type", b"application/grpc"), (b"te", b"trailers"),
                (b"lowband-token", TOKEN.encode())])
            body = b"\x00" + struct.pack(">I", 64 * 1024 * 1024) + b"x" * 16_000
            writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0, b"") + _frame(1, 0x4, 1, headers)
                         + _frame(0, 0, 1, body))
            await writer.drain()
            deadline = time.monotonic() + 10
            ended = b""
            while not ended and time.monotonic() < deadline:
                head = await asyncio.wait_for(reader.readexactly(9), 10)
                length, kind, flags = int.from_bytes(head[:3], "big"), head[3], head[4]
                stream = struct.unpack(">I", head[5:])[0] & 0x7FFFFFFF
                payload = await reader.readexactly(length)
                if kind == 4 and not flags & 0x1:
                    writer.write(_frame(4, 0x1, 0, b""))   # acknowledge the server's settings
                if stream == 1 and (kind == 3 or (kind == 1 and flags & 0x1)):
                    ended = payload or b"RST_STREAM"
            assert ended, "the server waited for the rest of a 64 MiB message"
            if b"grpc-status" in ended:   # trailers; grpc writes them without Huffman coding
                at = ended.index(b"grpc-status") + len(b"grpc-status")
                assert ended[at + 1:at + 1 + ended[at]] == b"8", ended   # RESOURCE_EXHAUSTED
        finally:
            writer.close()
            await server.stop(0.2)

    asyncio.run(main())


# ----------------------------------------------------------------------------- cool-down


def test_a_peer_that_keeps_sending_malformed_messages_is_cooled_down(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)

    async def main() -> None:
        server = await start_coordinator(config(), tmp_path, TOKEN, bad_input=COOL)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        try:
            status = channel.unary_unary("/lowband.Coordinator/Status")
            leave = channel.unary_unary("/lowband.Coordinator/Leave")
            good = cpb.StatusRequest().SerializeToString()
            # neither a wrong token nor a message that parses but is invalid is a strike
            for _ in range(5):
                assert await code_of(status, MALFORMED, token_metadata("wrong")) == grpc.StatusCode.UNAUTHENTICATED
                assert await code_of(leave, b"") == grpc.StatusCode.INVALID_ARGUMENT   # no node id
            assert await code_of(status, good) == grpc.StatusCode.OK
            for _ in range(COOL.strikes):
                assert await code_of(status, MALFORMED) == grpc.StatusCode.INVALID_ARGUMENT
            # refused at once, a good message on any method too, with a status that says why
            try:
                await status(good, metadata=MD, timeout=10)
                raise AssertionError("a cooling-down peer was served")
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "malformed" in (exc.details() or "")
            assert await code_of(leave, MALFORMED) == grpc.StatusCode.RESOURCE_EXHAUSTED
            await asyncio.sleep(COOL.cooldown_s + 0.2)
            assert await code_of(status, good) == grpc.StatusCode.OK
        finally:
            await channel.close()
            await server.stop(0.2)

    asyncio.run(main())
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("lowband")]
    assert any("cooled down" in line and "127.0.0.1" in line for line in lines), lines
    assert not any(r.exc_info for r in caplog.records)


def test_a_node_cools_down_a_peer_on_grpc_and_on_the_wire(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)

    async def handshake(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            nonce = await asyncio.wait_for(reader.readexactly(NONCE_BYTES), 5)
            writer.write(handshake_mac(TOKEN, nonce))
            if await asyncio.wait_for(reader.readexactly(1), 5) == ACCEPTED:
                return reader, writer
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()
        return None

    async def main() -> None:
        async with stopping([]) as nodes:
            node = await start_node("n1", 1, init_stage(CFG, 1, 4, seed=0), dim=CFG.dim,
                                    max_seq_len=CFG.max_seq_len, bad_input=COOL)
            nodes.append(node)
            assert node.wire is not None
            # the wire: broken frame heads end the connection and count; then connections are refused
            for _ in range(COOL.strikes):
                conn = await handshake(node.wire.port)
                assert conn is not None
                conn[1].write(b"JUNK" + b"\x00" * (REQUEST.size - 4))
                assert await asyncio.wait_for(conn[0].read(), 5) == b""   # closed, no reply
                conn[1].close()
            assert await handshake(node.wire.port) is None
            # gRPC keeps its own count: the node's gRPC service still serves this host
            async with grpc.aio.insecure_channel(node.address, options=grpc_options()) as channel:
                ping = channel.unary_unary("/lowband.Node/Ping")
                good = node_pb2.PingRequest(sent_at=1.0).SerializeToString()
                assert await code_of(ping, good) == grpc.StatusCode.OK
                for _ in range(COOL.strikes):
                    assert await code_of(ping, MALFORMED) == grpc.StatusCode.INVALID_ARGUMENT
                assert await code_of(ping, good) == grpc.StatusCode.RESOURCE_EXHAUSTED
                await asyncio.sleep(COOL.cooldown_s + 0.2)
                assert await code_of(ping, good) == grpc.StatusCode.OK
            conn = await handshake(node.wire.port)
            assert conn is not None, "the wire serves the host again after its cool-down"
            conn[1].close()

    asyncio.run(main())
    assert not any(r.exc_info or r.levelno >= logging.ERROR for r in caplog.records)
