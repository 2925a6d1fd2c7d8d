"""The activation wire: microbatches on a framed TCP connection beside gRPC.

A real NodeServicer with its gRPC server and wire on port 0 in this process, with a recording agent in
place of the pipeline agent; peers that misbehave are raw sockets speaking the frame format by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest
import torch

from lowband.node.pipeline.payload import OutgoingMicrobatch, build_microbatch
from lowband.node.pipeline.transport import Transport
from lowband.node.pipeline.wire import (
    ACCEPTED,
    INVALID,
    NONCE_BYTES,
    OK,
    REPLY,
    REQUEST,
    REQUEST_MAGIC,
    SCRATCH_KEEP_BYTES,
    WireConnection,
    WireServer,
    handshake_mac,
    scratch_fits,
)
from lowband.node.service import NodeServicer, start_server, start_wire
from lowband.protocols import node_pb2, tensor_pb2
from lowband.protocols.codec import decode, encode
from lowband.protocols.errors import ValidationError

TOKEN = "wire-token"
pytestmark = [pytest.mark.timeout(60), pytest.mark.filterwarnings("ignore:The given buffer is not writable")]


class RecordingAgent:
    """Takes what arrives as PipelineAgent.accept does; refuses microbatch 13."""

    def __init__(self) -> None:
        self.got: list[tuple[int, bool, torch.Tensor, bool]] = []   # (microbatch, backward, tensor, read in place)

    def accept(self, header: node_pb2.MicrobatchHeader, tensor: tensor_pb2.Tensor, *, backward: bool,
               payload: memoryview | None = None, decoded: torch.Tensor | None = None) -> None:
        h = decoded if decoded is not None else decode(tensor, payload=payload, require_checksum=payload is None)
        if header.microbatch == 13:
            raise ValidationError("microbatch 13 is refused")
        self.got.append((header.microbatch, backward, h.clone(), decoded is not None))


class Node:
    def __init__(self, servicer: NodeServicer, server: grpc.aio.Server, wire: WireServer | None, port: int) -> None:
        self.servicer, self.server, self.wire = servicer, server, wire
        self.address = f"127.0.0.1:{port}"

    @property
    def got(self) -> list[tuple[int, bool, torch.Tensor, bool]]:
        return self.servicer.agent.got  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.wire is not None:
            await self.wire.stop()
        await self.server.stop(None)


async def _node(*, agent: bool = True, wire: bool = True) -> Node:
    servicer = NodeServicer("n")
    if agent:
        servicer.agent = RecordingAgent()  # type: ignore[assignment]
    server, port = await start_server(servicer, "127.0.0.1:0", TOKEN)
    wire_server = await start_wire(servicer, "127.0.0.1", TOKEN) if wire else None
    return Node(servicer, server, wire_server, port)


@contextlib.asynccontextmanager
async def _wired(*, agent: bool = True, wire: bool = True) -> AsyncIterator[tuple[Node, Transport]]:
    """A node and a transport to it, both closed however the test ends."""
    node = await _node(agent=agent, wire=wire)
    transport = Transport(TOKEN)
    try:
        yield node, transport
    finally:
        await transport.close()
        await node.stop()


def _header(mb: int) -> node_pb2.MicrobatchHeader:
    return node_pb2.MicrobatchHeader(run_id="r", iteration=1, microbatch=mb, origin_id="o", stages=[0, 1, 0],
                                     node_ids=["o", "n", "o"], hop=1)


def _built(mb: int, x: torch.Tensor, codec: str = "bf16", *, segment_bytes: int = 64) -> OutgoingMicrobatch:
    """A frame's parts as the transport builds them: a raw codec's payload is cast segment by segment as it
    is written (small segments here, so that the receiver sees them arrive in pieces)."""
    return build_microbatch(_header(mb), x, codec, segment_bytes=segment_bytes)


async def _send(transport: Transport, address: str, mb: int, x: torch.Tensor, *, codec: str = "bf16",
                backward: bool = False, timeout_s: float = 10, segment_bytes: int = 64) -> node_pb2.NodeAck:
    transport.segment_bytes = segment_bytes
    return await transport.send_microbatch(address, backward, _header(mb), x, codec, timeout_s=timeout_s)


async def _no_grpc(*args: object) -> node_pb2.NodeAck:
    raise AssertionError("a microbatch went by gRPC")


async def _authenticated_socket(port: int, token: str = TOKEN) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    nonce = await reader.readexactly(NONCE_BYTES)
    writer.write(handshake_mac(token, nonce))
    assert await reader.readexactly(1) == ACCEPTED
    return reader, writer


async def _accept_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """The server side of the handshake, for hand-made receivers that misbehave afterwards."""
    nonce = b"\0" * NONCE_BYTES
    writer.write(nonce)
    if await reader.readexactly(32) != handshake_mac(TOKEN, nonce):
        return False
    writer.write(ACCEPTED)
    return True


async def _closed_by_peer(reader: asyncio.StreamReader) -> bool:
    """The server hung up (a clean end, or a reset when it closed with our bytes unread)."""
    try:
        return await asyncio.wait_for(reader.read(1), 5) == b""
    except ConnectionResetError:
        return True


def test_microbatches_arrive_intact_on_one_connection_per_direction() -> None:
    async def main() -> None:
        async with _wired() as (node, transport):
            transport._send_on_grpc = _no_grpc  # type: ignore[method-assign]
            xs = [torch.randn(2, 5, 8) for _ in range(6)]
            codecs = ["bf16", "fp32", "fp4", "bf16", "fp16", "int8"]
            for i, (x, codec) in enumerate(zip(xs, codecs, strict=True)):
                ack = await _send(transport, node.address, i, x, codec=codec, backward=i % 2 == 1)
                assert ack.ok, ack.message
            # concurrent sends of different sizes: one frame in flight per connection (each cast into the
            # connection's reused scratch only once the previous frame is answered), every one answered
            ys = [torch.randn(3, i + 1, 8) for i in (5, 1, 7, 0, 3, 6, 2, 4)]
            acks = await asyncio.gather(*(_send(transport, node.address, 100 + i, y) for i, y in enumerate(ys)))
            assert all(a.ok for a in acks)
            assert set(transport._wires) == {(node.address, False), (node.address, True)}
            got = node.got
            assert [(mb, bw) for mb, bw, _, _ in got[:6]] == [(i, i % 2 == 1) for i in range(6)]
            for (_, _, h, in_place), x, codec in zip(got[:6], xs, codecs, strict=True):
                # raw codecs are read straight into the tensor; quantized ones are decoded from the payload
                assert in_place == (codec in ("bf16", "fp32", "fp16"))
                if codec == "fp32":
                    torch.testing.assert_close(h, x, rtol=0, atol=0)
                elif codec in ("bf16", "fp16"):
                    assert h.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[codec]
                    assert torch.equal(h, x.to(h.dtype))
                else:   # exactly what the codec's own round trip gives
                    assert torch.equal(h, decode(encode(x, codec, compress=False)))
            assert sorted(mb for mb, _, _, _ in got[6:]) == list(range(100, 108))
            for mb, _, h, _ in got[6:]:
                assert torch.equal(h, ys[mb - 100].to(torch.bfloat16))
            assert node.servicer.bytes_received == transport.bytes_sent   # activations and the one Ping
    asyncio.run(main())


def test_a_refused_microbatch_gets_a_negative_ack_and_the_connection_goes_on() -> None:
    async def main() -> None:
        async with _wired() as (node, transport):
            x = torch.randn(1, 4, 8)
            assert (await _send(transport, node.address, 1, x)).ok
            conn = transport._wires[(node.address, False)]
            ack = await _send(transport, node.address, 13, x)
            assert not ack.ok and "13 is refused" in ack.message
            assert (await _send(transport, node.address, 2, x)).ok
            assert transport._wires[(node.address, False)] is conn
            assert [mb for mb, _, _, _ in node.got] == [1, 2]
    asyncio.run(main())


def test_a_wrong_token_is_refused_at_the_handshake_and_changes_nothing() -> None:
    async def main() -> None:
        node = await _node()
        assert node.wire is not None
        try:
            with pytest.raises(ConnectionError):
                await WireConnection.open("127.0.0.1", node.wire.port, "not-the-token", 5)
            # a peer with the wrong token is refused on gRPC as well: the send fails, nothing is delivered
            transport = Transport("not-the-token")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _send(transport, node.address, 1, torch.randn(1, 4, 8), timeout_s=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            await transport.close()
            assert node.got == []
            # a silent peer is dropped after the handshake timeout; until then others are served
            reader, writer = await asyncio.open_connection("127.0.0.1", node.wire.port)
            await reader.readexactly(NONCE_BYTES)
            good = await WireConnection.open("127.0.0.1", node.wire.port, TOKEN, 5)
            out = _built(3, torch.randn(1, 4, 8))
            status, _ = await good.send(0, out.header_bytes, out.meta_bytes, out.payload)
            assert status == OK and [mb for mb, _, _, _ in node.got] == [3]
            good.close()
            writer.close()
        finally:
            await node.stop()
    asyncio.run(main())


def test_malformed_frames_close_the_connection_or_are_refused_without_harm() -> None:
    async def main() -> None:
        node = await _node()
        assert node.wire is not None
        port = node.wire.port
        try:
            # bad magic: the framing cannot be trusted any more, the server hangs up
            reader, writer = await _authenticated_socket(port)
            writer.write(REQUEST.pack(b"XXXX", 0, 1, 1, 1) + b"abc")
            assert await _closed_by_peer(reader)
            # a payload over the bound: refused before anything is allocated
            reader, writer = await _authenticated_socket(port)
            writer.write(REQUEST.pack(REQUEST_MAGIC, 0, 10, 10, node.wire.max_payload_bytes + 1))
            assert await _closed_by_peer(reader)
            # well framed but unparsable header: INVALID, and the same connection carries the next frame
            reader, writer = await _authenticated_socket(port)
            junk = b"\xff\xff\xff"
            writer.write(REQUEST.pack(REQUEST_MAGIC, 0, len(junk), 0, 4) + junk + b"\0" * 4)
            magic, status, length = REPLY.unpack(await reader.readexactly(REPLY.size))
            assert magic == b"LBA1"
            message = (await reader.readexactly(length)).decode()
            assert status == INVALID and "unparsable" in message
            # a payload that does not fit its shape: decoded from the scratch buffer, refused
            out = _built(4, torch.randn(1, 4, 8))
            header_bytes, meta_bytes = out.header_bytes, out.meta_bytes
            short = bytes(out.payload)[:-2]
            writer.write(REQUEST.pack(REQUEST_MAGIC, 0, len(header_bytes), len(meta_bytes), len(short))
                         + header_bytes + meta_bytes + short)
            _, status, length = REPLY.unpack(await reader.readexactly(REPLY.size))
            assert status == INVALID and "payload" in (await reader.readexactly(length)).decode()
            # non-finite values are the agent's to refuse; a good frame on the same connection still lands
            out = _built(5, torch.randn(1, 4, 8))
            header_bytes, meta_bytes, payload = out.header_bytes, out.meta_bytes, out.payload
            writer.write(REQUEST.pack(REQUEST_MAGIC, 1, len(header_bytes), len(meta_bytes), len(payload))
                         + header_bytes + meta_bytes + bytes(payload))
            _, status, length = REPLY.unpack(await reader.readexactly(REPLY.size))
            await reader.readexactly(length)
            assert status == OK
            writer.close()
            assert [(mb, bw) for mb, bw, _, _ in node.got] == [(5, True)]
        finally:
            await node.stop()
    asyncio.run(main())


def test_ping_announces_the_wire_port_and_the_outer_steps() -> None:
    async def main() -> None:
        async with _wired() as (node, transport):
            _, reply = await transport.ping(node.address, timeout_s=5)
            assert node.wire is not None and reply.wire_port == node.wire.port and reply.outer_steps == 0
            node.servicer.outer_steps = lambda: 7   # what the daemon wires to its OuterSync
            _, reply = await transport.ping(node.address, timeout_s=5)
            assert reply.outer_steps == 7 and reply.node_id == "n"
    asyncio.run(main())


def test_no_stage_yet_is_unavailable() -> None:
    async def main() -> None:
        async with _wired(agent=False) as (node, transport):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _send(transport, node.address, 1, torch.randn(1, 4, 8), timeout_s=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    asyncio.run(main())


def test_a_peer_without_a_wire_gets_grpc() -> None:
    async def main() -> None:
        async with _wired(wire=False) as (node, transport):
            x = torch.randn(2, 3, 8)
            assert (await _send(transport, node.address, 1, x)).ok
            ack = await _send(transport, node.address, 13, x)
            assert not ack.ok and "13 is refused" in ack.message   # refused as on the wire: a negative ack
            assert transport._wire_ports[node.address] == 0 and not transport._wires
            assert [(mb, in_place) for mb, _, _, in_place in node.got] == [(1, False)]   # decoded: it came by gRPC
            assert torch.equal(node.got[0][2], x.to(torch.bfloat16))
            assert node.servicer.bytes_received == transport.bytes_sent   # the Ping and both microbatches
    asyncio.run(main())


def test_a_stalled_receiver_times_out_and_a_dead_one_is_unavailable() -> None:
    async def main() -> None:
        node = await _node()
        assert node.wire is not None
        transport = Transport(TOKEN)
        # a receiver that completes the handshake, then reads and never answers
        stalled: list[asyncio.StreamWriter] = []

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if await _accept_handshake(reader, writer):
                stalled.append(writer)
                while await reader.read(1 << 16):
                    pass
            writer.close()

        silent_server = await asyncio.start_server(silent, "127.0.0.1", 0)
        try:
            x = torch.randn(1, 4, 8)
            transport._wire_ports[node.address] = silent_server.sockets[0].getsockname()[1]
            loop = asyncio.get_running_loop()
            start = loop.time()
            # two frames at once on the one connection: the second waits for the first within its own
            # deadline, which here is the shorter one
            first, second = await asyncio.gather(_send(transport, node.address, 1, x, timeout_s=1.0),
                                                 _send(transport, node.address, 2, x, timeout_s=0.3),
                                                 return_exceptions=True)
            assert isinstance(second, grpc.aio.AioRpcError) and isinstance(first, grpc.aio.AioRpcError)
            assert second.code() == first.code() == grpc.StatusCode.DEADLINE_EXCEEDED and stalled
            assert 0.9 < loop.time() - start < 2.0
            assert (node.address, False) not in transport._wires   # its place in the stream is unknown: dropped
            transport._wire_ports[node.address] = node.wire.port   # a fresh connection carries the next one
            assert (await _send(transport, node.address, 7, x)).ok
            await node.stop()
            start = loop.time()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _send(transport, node.address, 8, x, timeout_s=5)
            assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            assert loop.time() - start < 6
            assert [mb for mb, _, _, _ in node.got] == [7]
        finally:
            silent_server.close()
            await transport.close()
            await node.stop()
    asyncio.run(main())


def test_a_frame_cut_off_by_a_timeout_is_dropped_not_delivered_later() -> None:
    """A receiver that stops reading mid-frame: after the timeout the connection is reset at once, so the
    rest of the frame (still in this side's write buffer) never reaches it."""
    async def main() -> None:
        got_handshake = asyncio.Event()
        resume = asyncio.Event()
        received: list[int] = []

        async def reads_late(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if await _accept_handshake(reader, writer):
                got_handshake.set()
                await resume.wait()
                total = 0
                with contextlib.suppress(ConnectionError):
                    while chunk := await reader.read(1 << 20):
                        total += len(chunk)
                received.append(total)
            writer.close()

        late_server = await asyncio.start_server(reads_late, "127.0.0.1", 0)
        async with _wired() as (node, transport):
            try:
                x = torch.zeros(12 << 20)    # 24 MiB in bf16: far more than the socket buffers hold
                transport._wire_ports[node.address] = late_server.sockets[0].getsockname()[1]
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await _send(transport, node.address, 1, x, timeout_s=0.5, segment_bytes=8 << 20)
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and got_handshake.is_set()
                resume.set()
                for _ in range(100):
                    if received:
                        break
                    await asyncio.sleep(0.05)
                assert received and received[0] < 2 * x.numel()   # the frame was cut off, not flushed
            finally:
                resume.set()
                late_server.close()
    asyncio.run(main())


def test_a_restarted_peer_on_the_same_address_is_reached_again() -> None:
    async def main() -> None:
        async with _wired() as (node, transport):
            x = torch.randn(1, 4, 8)
            assert (await _send(transport, node.address, 1, x)).ok
            old_port = int(node.address.rsplit(":", 1)[1])
            await node.stop()
            await asyncio.sleep(0.1)   # the old connection sees its end
            servicer = NodeServicer("n")
            servicer.agent = RecordingAgent()  # type: ignore[assignment]
            server, port = await start_server(servicer, f"127.0.0.1:{old_port}", TOKEN)
            restarted = Node(servicer, server, await start_wire(servicer, "127.0.0.1", TOKEN), port)
            try:
                assert (await _send(transport, restarted.address, 2, x)).ok
                assert [mb for mb, _, _, _ in restarted.got] == [2]
            finally:
                await restarted.stop()
    asyncio.run(main())


def test_non_finite_values_read_in_place_are_refused_and_the_connection_goes_on() -> None:
    async def main() -> None:
        async with _wired() as (node, transport):
            # 256 KiB of bf16: checked in several steps as it arrives (wire.CHECK_BYTES)
            for position in (0, 70_000, 131_071):   # in the first, a middle and the last step
                x = torch.randn(4, 64, 512)
                x.view(-1)[position] = float("nan") if position != 70_000 else float("inf")
                ack = await _send(transport, node.address, position, x, segment_bytes=32 * 1024)
                assert not ack.ok and "non-finite" in ack.message
            assert (await _send(transport, node.address, 1, torch.randn(4, 64, 512))).ok
            assert [mb for mb, _, _, _ in node.got] == [1]
            assert len(transport._wires) == 1
    asyncio.run(main())


class _FakeTransport:
    """Collects what the server protocol writes; stands in for the socket in byte-by-byte feeding."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def writelines(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self.write(piece)

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str) -> object:
        return None


def _feed(protocol: object, data: bytes, step: int) -> None:
    """Deliver ``data`` to a BufferedProtocol in reads of at most ``step`` bytes, as a socket would."""
    offset = 0
    while offset < len(data):
        buf = protocol.get_buffer(-1)  # type: ignore[attr-defined]
        n = min(step, len(buf), len(data) - offset)
        buf[:n] = data[offset:offset + n]
        protocol.buffer_updated(n)  # type: ignore[attr-defined]
        offset += n


@pytest.mark.parametrize("step", [1, 7, 4096, 1 << 20])
def test_server_protocol_reassembles_frames_from_reads_of_any_size(step: int) -> None:
    from lowband.node.pipeline.wire import _ServerProtocol

    async def main() -> None:
        frames = []
        server = WireServer(frames.append, TOKEN, max_payload_bytes=1 << 24)
        protocol = _ServerProtocol(server)
        transport = _FakeTransport()
        protocol.connection_made(transport)  # type: ignore[arg-type]
        nonce = bytes(transport.written[:NONCE_BYTES])
        stream = bytearray(handshake_mac(TOKEN, nonce))
        good = torch.randn(3, 40, 64)                       # 15 KiB of bf16: several check steps at step 1..4096
        bad = torch.randn(3, 40, 64)
        bad.view(-1)[5000] = float("nan")
        for mb, x in ((1, good), (2, bad), (3, good)):
            out = _built(mb, x, segment_bytes=1000)
            stream += REQUEST.pack(REQUEST_MAGIC, 0, len(out.header_bytes), len(out.meta_bytes), len(out.payload))
            stream += out.header_bytes + out.meta_bytes + bytes(out.payload)
        import lowband.node.pipeline.wire as wire
        old, wire.CHECK_BYTES = wire.CHECK_BYTES, 2048
        try:
            _feed(protocol, bytes(stream), step)
        finally:
            wire.CHECK_BYTES = old
        replies, offset = [], NONCE_BYTES + 1
        assert transport.written[NONCE_BYTES:offset] == ACCEPTED
        while offset < len(transport.written):
            _, status, length = REPLY.unpack_from(transport.written, offset)
            replies.append((status, bytes(transport.written[offset + REPLY.size:offset + REPLY.size + length])))
            offset += REPLY.size + length
        assert [s for s, _ in replies] == [OK, INVALID, OK] and b"non-finite" in replies[1][1]
        assert [f.header.microbatch for f in frames] == [1, 3]
        for frame in frames:
            assert frame.tensor is not None and torch.equal(frame.tensor, good.to(torch.bfloat16))
        assert not transport.closed

    asyncio.run(main())


def test_one_large_payload_does_not_pin_its_buffers_for_the_rest_of_the_run() -> None:
    """The sender's cast buffer and the receiver's buffer for payloads it decodes are reused frame after
    frame; after one large tensor (12 MiB on the wire) and a small one, neither keeps the large size."""
    async def main() -> None:
        async with _wired() as (node, transport):
            large, small = torch.randn(3, 1024, 2048), torch.randn(2, 5, 8)
            for codec in ("bf16", "int8"):   # cast by the sender; decoded from the receiver's buffer
                for mb, x in ((1, large), (2, small)):
                    ack = await _send(transport, node.address, mb, x, codec=codec, segment_bytes=1 << 30)
                    assert ack.ok, ack.message
            assert torch.equal(node.got[1][2], small.to(torch.bfloat16))
            torch.testing.assert_close(node.got[3][2], small, atol=0.05, rtol=0.05)
            conn = transport._wires[(node.address, False)]
            assert conn.scratch is not None and len(conn.scratch) <= SCRATCH_KEEP_BYTES
            assert node.wire is not None
            assert [len(c.scratch) <= SCRATCH_KEEP_BYTES for c in node.wire.connections] == [True]
    asyncio.run(main())


def test_a_reused_buffer_serves_a_payload_unless_too_small_or_far_too_large() -> None:
    assert scratch_fits(100, 100) and scratch_fits(SCRATCH_KEEP_BYTES, 10)
    assert not scratch_fits(99, 100)
    assert scratch_fits(4 * 3 * SCRATCH_KEEP_BYTES, 3 * SCRATCH_KEEP_BYTES)
    assert not scratch_fits(4 * 3 * SCRATCH_KEEP_BYTES + 1, 3 * SCRATCH_KEEP_BYTES)
