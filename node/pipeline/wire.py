"""The activation wire: microbatch tensors on a framed TCP connection beside gRPC.

Why: a 1 MiB activation through grpc.aio costs ~1 ms of fixed Python and thread
hand-offs per message on each side (the poller thread, the event loop, protobuf
copies), several times what the same bytes cost on a socket. On the wire a hop is
a small frame head and the payload written straight from the encoded tensor (a raw
codec's payload is cast as it is written, into a buffer the connection reuses:
``payload.encode_segmented``), read on the other side by a ``BufferedProtocol`` on the
node's own event loop straight into the tensor handed to the agent
(``payload.receive_spec``; the tensor is made ahead of time when the shape repeats) and
checked finite as it arrives: no extra threads, no copies of the bulk, no per-message
gRPC state (benchmarks/pipeline.md has the figures). Both sides write on the socket
directly while the transport's buffer is empty (``write_now``).
gRPC stays the control plane (membership, abandons, averaging, state, pings) and the
fallback: a peer whose ``PingReply.wire_port`` is 0, or whose wire port cannot be
reached, gets its microbatches by gRPC (``node/pipeline/transport.py``).

Connection: the server sends a random nonce; the client answers
HMAC-SHA256(run token, ``HANDSHAKE_CONTEXT`` + nonce); the server answers one byte,
``ACCEPTED``, or closes. Then the client sends frames, one at a time, each answered
in order by one reply:

    request: b"LBW1" | kind u8 (0 forward, 1 backward) | header_len u32 | meta_len u32
             | payload_len u64 | MicrobatchHeader | Tensor (payload empty) | payload
    reply:   b"LBA1" | status u8 (OK, INVALID, UNAVAILABLE) | message_len u32 | message

A frame whose header or tensor does not parse or validate (or holds NaN/inf) is
answered INVALID and changes nothing; the connection goes on. A frame that breaks the
framing itself (magic, sizes over the bounds) ends the connection: nothing after it
can be trusted. Bad input is logged as one line, rate-limited per peer, never with a
traceback; unparsable metadata and broken framing are strikes against the peer's host,
and a host with too many is refused at connect for a cool-down
(``protocols/peer_guard.py``). The payload needs no codec checksum here: it travels in
order on one TCP stream whose segments TCP checksums, and its size is checked against the shape
and codec before anything is read into a tensor.

With TLS (``tls`` on both ends: protocols/tls.py) the connection is TLS 1.3 with a client certificate
from the run CA required both ways, the token handshake runs inside it, and each frame's sender (the
path's node before the receiver) must be the node the client certificate names
(``WireFrame.peer``, checked by the node service). Everything then goes through the TLS transport:
``write_now``'s direct socket writes are off (the bytes must be encrypted).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from google.protobuf.message import DecodeError

from lowband.node.pipeline.payload import SegmentedPayload, WirePayload, receive_spec
from lowband.protocols import node_pb2, tensor_pb2
from lowband.protocols.codec import check_finite_bytes, native_codec, tensor_bytes
from lowband.protocols.errors import ValidationError
from lowband.protocols.peer_guard import BAD_INPUT_LOG, PeerGuard
from lowband.protocols.tls import PEER_NAME, TlsConfig, wire_peer_name

logger = logging.getLogger(__name__)

HANDSHAKE_CONTEXT = b"lowband-wire/1"
NONCE_BYTES = 32
MAC_BYTES = 32
ACCEPTED = b"\x01"
REQUEST = struct.Struct("<4sBIIQ")
REPLY = struct.Struct("<4sBI")
REQUEST_MAGIC = b"LBW1"
REPLY_MAGIC = b"LBA1"
OK, INVALID, UNAVAILABLE = 0, 1, 2
MAX_META_BYTES = 1 << 20          # header and tensor metadata each (they are a few hundred bytes)
MAX_REPLY_MESSAGE = 4096
HANDSHAKE_TIMEOUT_S = 10.0
# A payload read in place is checked finite in steps of at least this: each step is a call with fixed
# costs, and what arrived after the last step is checked once the last byte is in (on the hop's critical
# path). The native check is cheaper per call than torch's reduction, so its steps can be smaller.
CHECK_BYTES = 64 * 1024 if native_codec() else 256 * 1024
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024
# A payload that is cast on the way out (fp32 activations, bf16 on the wire) goes out with the frame head
# in a first piece of this many bytes: the receiver wakes up and parses the metadata while the rest is
# cast. One small first piece beats both a separate head-only write (one more system call) and larger
# first pieces (the receiver waits longer before it can start; sizes compared in benchmarks/pipeline.md).
FIRST_SEGMENT_BYTES = 4 * 1024
# A payload buffer reused frame after frame (the sender's cast buffer, the receiver's buffer for payloads
# it decodes) is replaced by a smaller one once it is this much (and 4x) larger than the payload: one
# large tensor must not pin its size in memory for the rest of the run.
SCRATCH_KEEP_BYTES = 8 * 1024 * 1024

TargetSpec = tuple[tuple[int, ...], torch.dtype]   # the shape and dtype a payload is read into


def scratch_fits(have: int, need: int) -> bool:
    """Whether a reused buffer of ``have`` bytes should serve a payload of ``need``: large enough, and not
    far larger (``SCRATCH_KEEP_BYTES``)."""
    return need <= have <= max(4 * need, SCRATCH_KEEP_BYTES)


class WireError(Exception):
    """The wire connection failed (closed, refused, bad handshake or reply); the frame's fate is unknown
    unless ``sent`` is False."""

    def __init__(self, message: str, *, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


class WireUnavailable(Exception):
    """The receiver has no stage yet (the gRPC path's UNAVAILABLE)."""


def handshake_mac(token: str, nonce: bytes) -> bytes:
    return hmac.new(token.encode(), HANDSHAKE_CONTEXT + nonce, hashlib.sha256).digest()


def _tune(sock: socket.socket | None) -> int:
    """No Nagle delay, and a send buffer that holds a whole activation: a 1 MiB write then completes in one
    syscall instead of a dozen event-loop rounds while the kernel's autotuning grows the buffer. The
    receive buffer is left to autotuning: a fixed one turns autotuning off, and the autotuned one grows
    past 4 MiB on long fat links. 4 MiB of send buffer covers ~300 Mbit/s at 100 ms RTT per connection. Returns the socket's descriptor
    (-1: none), which the connection writes on directly (``write_now``)."""
    if sock is None:
        return -1
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
    return sock.fileno()


def _new_target(spec: TargetSpec) -> tuple[torch.Tensor, memoryview]:
    """An uninitialised tensor of that shape and dtype, and the byte view a payload is read into."""
    tensor = torch.empty(spec[0], dtype=spec[1])
    return tensor, tensor_bytes(tensor)


def write_now(transport: asyncio.Transport, fd: int, pieces: list[bytes | memoryview]) -> None:
    """Write ``pieces`` now, in one system call on the transport's socket ``fd``: the transport, with its
    buffer empty, would do the same but with its own per-call bookkeeping. What
    the socket does not take (its buffer full, on a slow link) goes to the transport, which sends it as
    the socket drains; with bytes already queued (or no socket) all of it does. Raises OSError when the
    socket has failed."""
    if fd < 0 or transport.get_write_buffer_size():
        transport.writelines(pieces)
        return
    try:
        written = os.writev(fd, pieces)
    except BlockingIOError:
        written = 0
    for piece in pieces:
        if written >= len(piece):
            written -= len(piece)
            continue
        transport.write(memoryview(piece)[written:])
        written = 0


# ----------------------------------------------------------------------------- server

@dataclass(slots=True)
class WireFrame:
    """One received frame. With ``tensor`` set the payload was read straight into it (already decoded:
    ``payload.receive_spec``) and checked finite; otherwise ``payload`` still needs ``codec.decode``."""

    header: node_pb2.MicrobatchHeader
    meta: tensor_pb2.Tensor
    payload: memoryview
    tensor: torch.Tensor | None
    backward: bool
    peer: str | None = None   # the node the sender's TLS certificate names; None without TLS


# Takes a frame, synchronously on the event loop (the reply goes out in the same callback); raises
# ValidationError to refuse it and WireUnavailable when this node holds no stage.
FrameHandler = Callable[[WireFrame], None]


class _ServerProtocol(asyncio.BufferedProtocol):
    """One inbound connection: the handshake, then frames, each read in three parts (head; header and
    tensor metadata; payload, straight into the decoded tensor where the codec allows)."""

    def __init__(self, server: WireServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.nonce = os.urandom(NONCE_BYTES)
        self.state = "mac"
        self.scratch = bytearray(max(MAC_BYTES, REQUEST.size))
        self.target = memoryview(self.scratch)[:MAC_BYTES]   # where the current part goes
        self.have = 0
        self.head: tuple[int, int, int, int] = (0, 0, 0, 0)   # (kind, header_len, meta_len, payload_len)
        self.parsed: tuple[node_pb2.MicrobatchHeader, tensor_pb2.Tensor] | None = None
        self.error = ""
        self.tensor: torch.Tensor | None = None
        self.checked = 0   # elements of an in-place payload already checked finite
        self.timer: asyncio.TimerHandle | None = None
        self.peer = ""
        self.host = ""
        self.peer_name: str | None = None   # the client certificate's name (TLS)
        self.fd = -1
        # the next frame's tensor, made once a frame is answered, so allocating it is off the hop's
        # critical path (not when its metadata arrives), taken if the shapes match
        self.spare: tuple[TargetSpec, torch.Tensor, memoryview] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)   # uvloop's are not asyncio.Transport subclasses
        peername = transport.get_extra_info("peername")
        self.peer = str(peername)
        self.host = str(peername[0]) if isinstance(peername, tuple) and peername else self.peer
        left = self.server.guard.cooling_down(self.host)
        if left:
            BAD_INPUT_LOG.warning(self.host, "activation wire from %s refused: cooling down for %.0f s more",
                                  self.host, left)
            self.transport.abort()
            return
        fd = _tune(transport.get_extra_info("socket"))
        if self.server.ssl is None:
            self.fd = fd
        else:   # the handshake is done: the certificate was verified against the run CA
            self.peer_name = wire_peer_name(transport.get_extra_info("peercert"))
        self.server.connections.add(self)
        self.transport.write(self.nonce)
        self.timer = asyncio.get_running_loop().call_later(HANDSHAKE_TIMEOUT_S, self._handshake_timeout)

    def _handshake_timeout(self) -> None:
        if self.state == "mac":
            self._close("no handshake in time")

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.spare = None
        if self.timer is not None:
            self.timer.cancel()

    def _strike(self) -> None:
        """Input an honest peer cannot send (broken framing, unparsable metadata): count it against the host."""
        if self.server.guard.strike(self.host):
            policy = self.server.guard.policy
            BAD_INPUT_LOG.warning(self.host, "activation wire: %s cooled down for %.0f s after %d malformed frames",
                                  self.host, policy.cooldown_s, policy.strikes, always=True)

    def _close(self, reason: str, *, strike: bool = False) -> None:
        BAD_INPUT_LOG.warning(self.host, "activation wire from %s closed: %s", self.peer, reason)
        if strike:
            self._strike()
        if self.transport is not None:
            self.transport.close()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.target[self.have:]

    def buffer_updated(self, nbytes: int) -> None:
        self.have += nbytes
        if self.tensor is not None and self.state == "payload":
            self._check_arrived()
        while self.have == len(self.target) and self.transport is not None and not self.transport.is_closing():
            if self.state == "mac":
                self._on_mac()
            elif self.state == "head":
                self._on_head()
            elif self.state == "meta":
                self._on_meta()
            else:
                self._on_payload()

    def _expect(self, state: str, target: memoryview) -> None:
        self.state, self.target, self.have = state, target, 0

    def _scratch(self, nbytes: int, *, shrink: bool = False) -> memoryview:
        """The first ``nbytes`` of the connection's buffer; ``shrink`` (a payload) also replaces one far
        larger than needed (``scratch_fits``)."""
        if len(self.scratch) < nbytes or (shrink and not scratch_fits(len(self.scratch), nbytes)):
            self.scratch = bytearray(max(nbytes, REQUEST.size))
        return memoryview(self.scratch)[:nbytes]

    def _on_mac(self) -> None:
        if not hmac.compare_digest(bytes(self.target), handshake_mac(self.server.token, self.nonce)):
            self._close("bad handshake (wrong token?)")
            return
        if self.timer is not None:
            self.timer.cancel()
        assert self.transport is not None
        self.transport.write(ACCEPTED)
        self._expect("head", self._scratch(REQUEST.size))

    def _on_head(self) -> None:
        magic, kind, header_len, meta_len, payload_len = REQUEST.unpack_from(self.target)
        if magic != REQUEST_MAGIC or kind not in (0, 1):
            self._close("bad frame head", strike=True)
            return
        if header_len > MAX_META_BYTES or meta_len > MAX_META_BYTES or payload_len > self.server.max_payload_bytes:
            self._close(f"frame over the bounds (header {header_len}, tensor {meta_len}, payload {payload_len} bytes)",
                        strike=True)
            return
        self.head = (kind, header_len, meta_len, payload_len)
        self._expect("meta", self._scratch(header_len + meta_len))

    def _on_meta(self) -> None:
        _, header_len, _, payload_len = self.head
        header, meta = node_pb2.MicrobatchHeader(), tensor_pb2.Tensor()
        self.parsed, self.error, self.tensor = None, "", None
        try:
            header.ParseFromString(self.target[:header_len])
            meta.ParseFromString(self.target[header_len:])
            self.parsed = (header, meta)
        except DecodeError as exc:
            self.error = f"unparsable frame: {exc}"
            self._strike()
        if self.parsed is not None and meta.payload:
            self.parsed, self.error = None, "the payload must follow the tensor, not be inside it"
        spec = receive_spec(meta, payload_len, max_numel=self.server.max_payload_bytes) if self.parsed else None
        self.checked = 0
        if spec is not None:
            if self.spare is not None and self.spare[0] == spec:
                _, self.tensor, view = self.spare
                self.spare = None
            else:
                self.tensor, view = _new_target(spec)
            self._expect("payload", view)
            if not len(self.target):
                self._check_arrived()
        else:
            self._expect("payload", self._scratch(payload_len, shrink=True))

    def _check_arrived(self) -> None:
        """Check the values of a payload read in place as they arrive (NaN/inf), so that little is left to
        check once the last byte is in."""
        assert self.tensor is not None
        itemsize = self.tensor.element_size()
        end = self.have // itemsize
        if self.error or (self.have < len(self.target) and (end - self.checked) * itemsize < CHECK_BYTES):
            return
        try:
            check_finite_bytes(self.target[self.checked * itemsize:end * itemsize], self.tensor.dtype)
        except ValidationError as exc:
            self.error = str(exc)
        self.checked = end

    def _on_payload(self) -> None:
        assert self.transport is not None
        kind, header_len, meta_len, payload_len = self.head
        backward = kind == 1
        self.server.bytes_received += REQUEST.size + header_len + meta_len + payload_len
        status, message = OK, ""
        try:
            if self.parsed is None or self.error:
                raise ValidationError(self.error)
            self.server.handler(WireFrame(*self.parsed, payload=self.target, tensor=self.tensor, backward=backward,
                                          peer=self.peer_name))
        except ValidationError as exc:
            BAD_INPUT_LOG.warning(self.host, "invalid %s on the wire from %s: %s", "backward" if backward else "forward",
                                  self.peer, exc)
            status, message = INVALID, f"invalid: {exc}"
        except WireUnavailable as exc:
            status, message = UNAVAILABLE, str(exc)
        except Exception as exc:   # a bug must not end the connection silently
            logger.exception("activation wire handler failed")
            status, message = INVALID, f"receiver error: {type(exc).__name__}: {exc}"
        spare = (tuple(self.tensor.shape), self.tensor.dtype) if self.tensor is not None else None
        self.parsed, self.tensor = None, None
        text = message.encode()[:MAX_REPLY_MESSAGE]
        try:
            write_now(self.transport, self.fd, [REPLY.pack(REPLY_MAGIC, status, len(text)) + text])
        except OSError as exc:
            self._close(f"reply failed: {exc}")
            return
        self._expect("head", self._scratch(REQUEST.size))
        if spare is not None and payload_len <= SCRATCH_KEEP_BYTES:   # a huge one is not kept in memory
            asyncio.get_running_loop().call_soon(self._make_spare, spare)

    def _make_spare(self, spec: TargetSpec) -> None:
        if self.transport is not None and not self.transport.is_closing() and self.spare is None:
            self.spare = (spec, *_new_target(spec))


class WireServer:
    """Listens for activation-wire connections and hands each frame to ``handler``."""

    def __init__(self, handler: FrameHandler, token: str, *, max_payload_bytes: int,
                 guard: PeerGuard | None = None, tls: TlsConfig | None = None) -> None:
        self.handler = handler
        self.ssl = tls.server_context() if tls is not None else None   # mutual TLS (None: plaintext)
        self.token = token
        self.guard = guard or PeerGuard()   # who sent malformed frames, and who is cooling down
        self.max_payload_bytes = max_payload_bytes
        self.bytes_received = 0
        self.port = 0
        self.connections: set[_ServerProtocol] = set()
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int = 0) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _ServerProtocol(self), host, port, ssl=self.ssl,
                                                ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S if self.ssl else None)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        await self._server.wait_closed()
        self._server = None


# ----------------------------------------------------------------------------- client


class _ClientProtocol(asyncio.Protocol):
    """The sending side of one connection: the handshake, then one reply per frame, in order."""

    def __init__(self, token: str, direct: bool = True) -> None:
        self.token = token
        self.direct = direct   # False with TLS: every byte goes through the transport (it encrypts)
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.state = "nonce"
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # a handshake that fails after its waiter gave up must not log "exception never retrieved"
        self.ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.reply: asyncio.Future[tuple[int, str]] | None = None
        self.closed = False
        self.fd = -1   # the socket, written directly (``write_now``)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        fd = _tune(transport.get_extra_info("socket"))
        self.fd = fd if self.direct else -1

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.transport is not None and not self.transport.is_closing():
            if self.state == "nonce":
                if len(self.buf) < NONCE_BYTES:
                    return
                nonce = bytes(self.buf[:NONCE_BYTES])
                del self.buf[:NONCE_BYTES]
                self.transport.write(handshake_mac(self.token, nonce))
                self.state = "accept"
            elif self.state == "accept":
                if not self.buf:
                    return
                if self.buf[:1] != ACCEPTED:
                    self._fail("bad handshake reply")
                    return
                del self.buf[:1]
                self.state = "replies"
                if not self.ready.done():
                    self.ready.set_result(None)
            else:
                if len(self.buf) < REPLY.size:
                    return
                magic, status, length = REPLY.unpack_from(self.buf)
                if magic != REPLY_MAGIC or length > MAX_REPLY_MESSAGE or self.reply is None:
                    self._fail("bad or unexpected reply")
                    return
                if len(self.buf) < REPLY.size + length:
                    return
                message = bytes(self.buf[REPLY.size:REPLY.size + length]).decode(errors="replace")
                del self.buf[:REPLY.size + length]
                if not self.reply.done():
                    self.reply.set_result((status, message))

    def _fail(self, reason: str) -> None:
        self.closed = True
        for future in (self.ready, self.reply):
            if future is not None and not future.done():
                future.set_exception(ConnectionError(reason))
        if self.transport is not None:
            # abort, not close: a frame cut off mid-way must not sit in the write buffer (and keep the
            # connection's scratch) until a stalled peer reads it
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"connection closed{f': {exc}' if exc else ''}")


@dataclass(slots=True)
class WireConnection:
    """One authenticated connection to a peer's wire; ``lock`` keeps one frame in flight."""

    protocol: _ClientProtocol
    lock: asyncio.Lock
    scratch: bytearray | None = None   # where segmented payloads are cast (frames go out one at a time)

    @classmethod
    async def open(cls, host: str, port: int, token: str, timeout_s: float, *,
                   tls: TlsConfig | None = None) -> WireConnection:
        """Connect and authenticate (with ``tls``: mutual TLS, the server's certificate checked for the run CA's
        ``PEER_NAME``); raises OSError, ConnectionError (``ssl.SSLError`` is one) or TimeoutError."""
        loop = asyncio.get_running_loop()
        ssl_ctx = tls.client_context() if tls is not None else None
        _, protocol = await asyncio.wait_for(
            loop.create_connection(lambda: _ClientProtocol(token, direct=ssl_ctx is None), host, port, ssl=ssl_ctx,
                                   server_hostname=PEER_NAME if ssl_ctx is not None else None),
            timeout_s)
        try:
            await asyncio.wait_for(asyncio.shield(protocol.ready), timeout_s)
        except BaseException:
            protocol._fail("handshake did not finish")
            raise
        return cls(protocol, asyncio.Lock())

    @property
    def closed(self) -> bool:
        return self.protocol.closed

    @property
    def fd(self) -> int:
        return self.protocol.fd

    def close(self) -> None:
        self.protocol._fail("closed by this node")

    async def send(self, kind: int, header: bytes, meta: bytes, payload: WirePayload, *,
                   deadline: float | None = None) -> tuple[int, str]:
        """Send one frame and wait for its reply, until the event loop's clock reaches ``deadline``;
        raises WireError (``sent`` False: nothing went out) or TimeoutError (the connection is then
        closed: the stream's position is unknown).

        A ``SegmentedPayload`` that casts is cast into the connection's scratch buffer and written a
        segment at a time: a ``FIRST_SEGMENT_BYTES`` piece with the frame head, then the rest (one segment
        up to ``payload.SEGMENT_BYTES``); the scratch is free again once the reply is in, because the
        receiver has then read every byte.
        """
        loop = asyncio.get_running_loop()
        if self.lock.locked() and deadline is not None:   # a frame in flight: wait for it within ours
            async with asyncio.timeout_at(deadline):
                await self.lock.acquire()
        else:
            await self.lock.acquire()
        try:
            protocol = self.protocol
            transport = protocol.transport
            if protocol.closed or transport is None or transport.is_closing():
                raise WireError("connection closed", sent=False)
            reply = protocol.reply = loop.create_future()
            head = REQUEST.pack(REQUEST_MAGIC, kind, len(header), len(meta), len(payload)) + header + meta
            try:
                if isinstance(payload, SegmentedPayload) and payload.casts:
                    if self.scratch is None or not scratch_fits(len(self.scratch), len(payload)):
                        self.scratch = bytearray(len(payload))
                    # the head goes out with a small first piece, so the receiver parses the metadata (and
                    # reads and checks that piece) while the rest is cast
                    segments = payload.segments(self.scratch, first_bytes=FIRST_SEGMENT_BYTES)
                    write_now(transport, protocol.fd, [head, next(segments, b"")])
                    head = b""   # out: what fails from here on fails mid-frame
                    for segment in segments:
                        write_now(transport, protocol.fd, [segment])
                else:
                    pieces = list(payload.segments()) if isinstance(payload, SegmentedPayload) else [payload]
                    write_now(transport, protocol.fd, [head, *pieces])
            except OSError as exc:
                protocol._fail(f"write failed: {exc}")
                raise WireError(f"write failed: {exc}", sent=not head) from None
            if not reply.done():
                # a loop timer on the reply rather than an asyncio.timeout_at context: no timeout task
                # bookkeeping on every hop
                timer = loop.call_at(deadline, _expire, reply) if deadline is not None else None
                try:
                    await reply
                except ConnectionError:
                    pass   # the connection failed: reply.result() below raises it
                except BaseException:
                    # a timeout or cancellation mid-frame: the stream's position is unknown from here on
                    protocol._fail("abandoned mid-frame")
                    raise
                finally:
                    if timer is not None:
                        timer.cancel()
            try:
                result = reply.result()
            except ConnectionError as exc:
                raise WireError(str(exc), sent=True) from None
            return result
        finally:
            protocol.reply = None
            self.lock.release()


def _expire(reply: asyncio.Future[tuple[int, str]]) -> None:
    if not reply.done():
        reply.set_exception(TimeoutError("no reply in time"))


__all__ = ["WireConnection", "WireError", "WireFrame", "WireServer", "WireUnavailable", "handshake_mac"]
