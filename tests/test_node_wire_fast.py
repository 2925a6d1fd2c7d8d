"""The activation wire's fast paths: direct socket writes, the polled reply, the receiver's spare target.

Each has a plain fallback (the transport's buffer, the event loop, a fresh tensor); these tests check that
the fast path gives the same bytes, replies and tensors, and that it steps aside when it should.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from node import wire
from node.wire import OK, WireConnection, WireError, WireFrame, WireServer, write_now
from protocols import node_pb2
from protocols.codec import encode_segmented
from protocols.errors import ValidationError

TOKEN = "fast-token"
pytestmark = pytest.mark.timeout(60)
needs_fastwire = pytest.mark.skipif(wire._fastwire is None, reason="node/_fastwire.c not built")


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


@contextmanager
def _counting_polls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bool]]:
    """Record each reply poll: True when the reply came through it."""
    polls: list[bool] = []
    real = wire._fastwire.recv_within

    def recv_within(fd: int, max_bytes: int, budget_s: float) -> tuple[bytes | None, bool]:
        data, _ = real(fd, max_bytes, budget_s)
        polls.append(bool(data))
        return data, False   # the core to itself: this test is about the replies

    monkeypatch.setattr(wire, "_fastwire", SimpleNamespace(recv_within=recv_within))
    yield polls


async def _send(conn: WireConnection, mb: int, x: torch.Tensor) -> tuple[int, str]:
    meta, payload = encode_segmented(x, "bf16")
    return await conn.send(0, _header(mb), meta.SerializeToString(), payload,
                           deadline=asyncio.get_running_loop().time() + 10)


@needs_fastwire
def test_sender_polls_for_replies_and_backs_off_while_polls_miss(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(4, 64, 32)

    async def main(server: _ThreadedWire) -> None:
        conn = await WireConnection.open("127.0.0.1", server.port, TOKEN, timeout_s=10)

        async def phase(budget_s: float, delay_s: float, microbatches: range) -> list[bool]:
            """Send these microbatches with this poll budget and reply delay; the polls they made."""
            monkeypatch.setattr(wire, "REPLY_POLL_S", budget_s)
            server.delay_s = delay_s
            before = len(polls)
            for mb in microbatches:
                assert await _send(conn, mb, x) == (OK, "")
            return polls[before:]

        try:
            with _counting_polls(monkeypatch) as polls:
                # (budgets far from this machine's reply times, so that the test does not race its load)
                # quick replies: each frame polls first, and its reply comes through the poll
                assert await phase(1.0, 0.0, range(3)) == [True, True, True]
                # a refusal comes back the same way, with its message
                status, message = await _send(conn, 13, x)
                assert status == wire.INVALID and "microbatch 13 is refused" in message
                assert polls[-1]
                # replies slower than the budget: each poll misses and the next ones are spaced out
                # (skip 1, 2, 4, 8 frames): 12 frames poll 4 times
                assert await phase(0.002, 0.02, range(20, 32)) == [False] * 4
                # quick replies again: once the 7 frames still to skip are out, the next poll gets its
                # reply, and from then on every frame polls
                assert await phase(1.0, 0.0, range(40, 52)) == [True] * 5
        finally:
            conn.close()

    with _ThreadedWire() as server:
        asyncio.run(main(server))
        got = [(f.header.microbatch, f.tensor) for f in server.frames]
    assert [mb for mb, _ in got] == [0, 1, 2, *range(20, 32), *range(40, 52)]
    assert all(t is not None and torch.equal(t, x.to(torch.bfloat16)) for _, t in got)


def test_sender_awaits_replies_without_the_native_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "_fastwire", None)
    x = torch.randn(2, 8, 16)

    async def main(server: _ThreadedWire) -> None:
        conn = await WireConnection.open("127.0.0.1", server.port, TOKEN, timeout_s=10)
        try:
            assert await _send(conn, 1, x) == (OK, "")
            assert (await _send(conn, 13, x))[0] == wire.INVALID
            assert await _send(conn, 2, x) == (OK, "")
        finally:
            conn.close()

    with _ThreadedWire() as server:
        asyncio.run(main(server))
        assert [f.header.microbatch for f in server.frames] == [1, 2]


@needs_fastwire
def test_recv_within_returns_bytes_end_of_stream_or_none_in_time() -> None:
    recv_within = wire._fastwire.recv_within
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        start = time.monotonic()
        assert recv_within(a.fileno(), 64, 0.005)[0] is None   # nothing came: None once the budget is spent
        assert 0.005 <= time.monotonic() - start < 2.0
        b.sendall(b"reply")
        assert recv_within(a.fileno(), 64, 0.5)[0] == b"reply"
        b.sendall(b"x" * 100)
        assert recv_within(a.fileno(), 10, 0.5)[0] == b"x" * 10  # at most max_bytes; the rest stays queued
        assert a.recv(1000) == b"x" * 90
        b.close()
        assert recv_within(a.fileno(), 64, 0.5)[0] == b""        # end of stream
        with pytest.raises(ValueError, match="max_bytes"):
            recv_within(a.fileno(), 0, 0.1)
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    with pytest.raises(OSError):
        recv_within(fd, 64, 0.1)                                 # a closed descriptor: EBADF


@needs_fastwire
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_recv_within_reports_a_core_shared_with_a_busy_process() -> None:
    """Polling where another process wants the same core takes time from it: recv_within says so."""
    allowed = os.sched_getaffinity(0)
    cpu = min(allowed)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    a, b = socket.socketpair()
    try:
        os.sched_setaffinity(busy.pid, {cpu})
        os.sched_setaffinity(0, {cpu})   # this thread and the busy process on one core
        a.setblocking(False)
        data, contended = wire._fastwire.recv_within(a.fileno(), 64, 0.05)
        assert data is None and contended
    finally:
        busy.kill()
        busy.wait()
        os.sched_setaffinity(0, allowed)
        a.close()
        b.close()


@needs_fastwire
def test_a_poll_on_a_contended_core_backs_off_like_a_miss(monkeypatch: pytest.MonkeyPatch) -> None:
    real = wire._fastwire.recv_within
    calls: list[int] = []

    def contended_recv_within(fd: int, max_bytes: int, budget_s: float) -> tuple[bytes | None, bool]:
        calls.append(fd)
        return real(fd, max_bytes, budget_s)[0], True   # the reply came, but the core was shared

    monkeypatch.setattr(wire, "_fastwire", SimpleNamespace(recv_within=contended_recv_within))
    monkeypatch.setattr(wire, "REPLY_POLL_S", 1.0)
    x = torch.randn(2, 8, 16)

    async def main(server: _ThreadedWire) -> None:
        conn = await WireConnection.open("127.0.0.1", server.port, TOKEN, timeout_s=10)
        try:
            for mb in range(4):
                assert await _send(conn, mb, x) == (OK, "")
        finally:
            conn.close()

    with _ThreadedWire() as server:
        asyncio.run(main(server))
        assert [f.header.microbatch for f in server.frames] == [0, 1, 2, 3]
    assert len(calls) == 2   # frame 0 polls, 1 is skipped, 2 polls, 3 is skipped (then 2 more would be)


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
