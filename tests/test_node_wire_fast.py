"""The activation wire's fast paths: direct socket writes and the receiver's spare target.

Each has a plain fallback (the transport's buffer, a fresh tensor); these tests check that
the fast path gives the same bytes, replies and tensors, and that it steps aside when it should.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time

import pytest
import torch

from lowband.node.pipeline import wire
from lowband.node.pipeline.payload import encode_segmented
from lowband.node.pipeline.wire import OK, WireConnection, WireError, WireFrame, WireServer, write_now
from lowband.protocols import node_pb2
from lowband.protocols.errors import ValidationError

TOKEN = "fast-token"
pytestmark = pytest.mark.timeout(60)


def _header(mb: int) -> bytes:
    return node_pb2.MicrobatchHeader(run_id="r", iteration=1, microbatch=mb, origin_id="o", stages=[0, 1, 0],
                                     node_ids=["o", "n", "o"], hop=1).SerializeToString()


class _ThreadedWire:
    """A WireServer on its own event loop in a thread, so that a sender polling its socket (without the
    GIL) gets answers while it polls; the handler waits ``delay_s`` before answering."""

    def __init__(self) -> None:
        self.delay_s = 0.0
        self.frames: list[WireFrame] = []
        self.loop = asyncio.new_event_loop()
        self.server = WireServer(self._handle, TOKEN, max_payload_bytes=1 << 24)
        self.port = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _handle(self, frame: WireFrame) -> None:
        time.sleep(self.delay_s)
        if frame.header.microbatch == 13:
            raise ValidationError("microbatch 13 is refused")
        self.frames.append(frame)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.port = self.loop.run_until_complete(self.server.start("127.0.0.1"))
        self.started.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.server.stop())
        self.loop.close()

    def __enter__(self) -> _ThreadedWire:
        self.started = threading.Event()
        self.thread.start()
        assert self.started.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


async def _send(conn: WireConnection, mb: int, x: torch.Tensor) -> tuple[int, str]:
    meta, payload = encode_segmented(x, "bf16")
    return await conn.send(0, _header(mb), meta.SerializeToString(), payload,
                           deadline=asyncio.get_running_loop().time() + 10)


def test_a_write_that_fails_fails_the_connection_and_says_nothing_went_out() -> None:
    """A socket that refuses writes before the event loop has seen anything wrong (here: shut for writing
    on this side): the frame fails with ``sent`` False (the transport may retry it on a new connection)
    and the connection is closed, not left half-written."""
    x = torch.randn(2, 8, 16)

    async def main(server: _ThreadedWire) -> None:
        conn = await WireConnection.open("127.0.0.1", server.port, TOKEN, timeout_s=10)
        try:
            assert await _send(conn, 1, x) == (OK, "")
            with socket.socket(fileno=os.dup(conn.fd)) as same_socket:
                same_socket.shutdown(socket.SHUT_WR)
            with pytest.raises(WireError) as err:
                await _send(conn, 2, x)
            assert not err.value.sent and conn.closed
        finally:
            conn.close()

    with _ThreadedWire() as server:
        asyncio.run(main(server))
        assert [f.header.microbatch for f in server.frames] == [1]


def test_write_now_leaves_what_the_socket_refuses_to_the_transport_in_order() -> None:
    """A receiver that does not read: the socket takes what fits, the transport queues the rest behind it,
    and a later write goes behind the queue; the receiver then gets every byte in order."""
    big = os.urandom(8 << 20)

    async def main() -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", listener.getsockname()[1])
        peer, _ = await loop.sock_accept(listener)
        try:
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
            write_now(transport, sock.fileno(), [b"head", memoryview(big)])
            assert transport.get_write_buffer_size() > 0        # the socket could not take 8 MiB
            write_now(transport, sock.fileno(), [b"tail"])       # queued behind, not written ahead
            received = bytearray()
            while len(received) < len(big) + 8:
                chunk = await loop.sock_recv(peer, 1 << 20)
                assert chunk
                received += chunk
            assert received == b"head" + big + b"tail"
        finally:
            transport.close()
            peer.close()
            listener.close()

    asyncio.run(main())


def test_receiver_hands_each_frame_its_own_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    """The receiver reads a frame into a tensor made ahead of time when the shape matches the last one:
    each frame must still get a tensor of its own (the agent keeps activations for backward), and a
    payload over SCRATCH_KEEP_BYTES leaves no spare behind (it would pin its size in memory)."""
    monkeypatch.setattr(wire, "SCRATCH_KEEP_BYTES", 4096)
    shapes = [(4, 16, 8), (4, 16, 8), (4, 16, 8), (2, 3), (4, 16, 8), (4, 16, 8)]
    sent = [torch.randn(*shape) for shape in shapes]
    large = torch.randn(64, 64)   # 8 KiB in bf16

    async def main(server: _ThreadedWire) -> None:
        conn = await WireConnection.open("127.0.0.1", server.port, TOKEN, timeout_s=10)
        try:
            assert await _send(conn, 100, large) == (OK, "")
            await asyncio.sleep(0.01)   # the receiver would make its spare once the reply is out
            (receiver,) = server.server.connections
            assert receiver.spare is None
            for mb, x in enumerate(sent):
                assert await _send(conn, mb, x) == (OK, "")
                await asyncio.sleep(0.01)
            assert receiver.spare is not None and receiver.spare[0] == ((4, 16, 8), torch.bfloat16)
        finally:
            conn.close()

    with _ThreadedWire() as server:
        asyncio.run(main(server))
        tensors = [f.tensor for f in server.frames]
    assert len(tensors) == len(sent) + 1
    assert all(t is not None and torch.equal(t, x.to(torch.bfloat16))
               for t, x in zip(tensors, [large, *sent], strict=True))
    assert len({t.data_ptr() for t in tensors if t is not None}) == len(tensors)
