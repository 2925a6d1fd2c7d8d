"""Peer channels: sending encoded, chunked tensors to other nodes, with optional emulated links.

One ``grpc.aio`` channel per peer address, reused. A tensor is encoded once by
the caller and serialized once. Up to ``chunk_bytes`` (4 MiB) it goes as one
message on a long-lived ``ForwardPipe``/``BackwardPipe`` stream to that peer (one
per direction, one message in flight at a time, each answered by one ack): the
message is built by hand around the serialized bytes (one copy), and no per-call
setup is paid (grpc.aio: ~0.4 ms per call, ~0.5 ms for a client stream). Larger
tensors, and peers without pipes, use a ``Forward``/``Backward`` call that streams
chunks with the microbatch header on the first message. For the simulator a
``LinkTable`` emulates each link: before a send the sender sleeps
``latency_s + bytes / bandwidth_Bps`` of that peer's link.

Before any of that, a microbatch goes on the peer's activation wire when it has one
(``node/pipeline/wire.py``: a framed, token-authenticated TCP connection per peer and
direction, its port learnt from the peer's ``PingReply``): that costs a small part
of a gRPC message. Messages then carry no codec checksum (``encode(checksum=False)``);
``seal`` adds it when a message falls back to gRPC.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from lowband.node.pipeline.wire import OK, UNAVAILABLE, WireConnection, WireError, WirePayload, frame_parts
from lowband.protocols import node_pb2, node_pb2_grpc, tensor_pb2
from lowband.protocols.chunking import iter_chunks, stream_checksum
from lowband.protocols.codec import SegmentedPayload, seal
from lowband.protocols.rpc import MAX_MESSAGE_BYTES, grpc_options, token_metadata

logger = logging.getLogger(__name__)

# Large chunks: a 1 MiB activation goes in one message; the gRPC limit is 8 MiB.
DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
assert DEFAULT_CHUNK_BYTES < MAX_MESSAGE_BYTES
# Opening an activation wire (connect + handshake) takes a round trip or two; past this, use gRPC.
WIRE_CONNECT_TIMEOUT_S = 3.0


def channel_options() -> list[tuple[str, object]]:
    """The shared gRPC options plus a large HTTP/2 stream window: an activation of a few MiB then goes
    out without waiting for window updates (each one a round trip through both event loops)."""
    return [*grpc_options(), ("grpc.http2.lookahead_bytes", 16 * 1024 * 1024)]


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _len_field(number: int, payload_len: int) -> bytes:
    """Tag and length prefix of a length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(payload_len)


def single_message_bytes(header: node_pb2.MicrobatchHeader, data: bytes, checksum: int) -> bytes:
    """Serialized ``MicrobatchChunk(header=header, chunk=TensorChunk(seq=0, num_chunks=1, ..., data=data))``.

    The same bytes protobuf would write, with `data` (a serialized Tensor) copied once instead of
    three times (into the TensorChunk, into the MicrobatchChunk, out again on serialization).
    """
    head = tensor_pb2.TensorChunk(seq=0, num_chunks=1, total_size=len(data), checksum=checksum).SerializeToString()
    data_prefix = _len_field(5, len(data))              # TensorChunk.data
    chunk_len = len(head) + len(data_prefix) + len(data)
    header_bytes = header.SerializeToString()
    return b"".join((_len_field(1, len(header_bytes)), header_bytes,      # MicrobatchChunk.header
                     _len_field(2, chunk_len), head, data_prefix, data))  # MicrobatchChunk.chunk


class _NotSent(Exception):
    """The pipe had ended before this message was written: safe to send it again."""


class _PipeEnded(Exception):
    """The pipe ended after this message was written, without acknowledging it."""


@dataclass(slots=True)
class _Pipe:
    """One open ForwardPipe/BackwardPipe call; ``lock`` keeps one message in flight."""

    call: grpc.aio.StreamStreamCall
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    broken: bool = False


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """A pipe failure in the form callers already handle for single calls."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


@dataclass(frozen=True, slots=True)
class Link:
    """An emulated network link: fixed latency plus serialization time at a bandwidth (0 = unlimited)."""

    latency_s: float = 0.0
    bandwidth_Bps: float = 0.0

    def delay_s(self, nbytes: int) -> float:
        return self.latency_s + (nbytes / self.bandwidth_Bps if self.bandwidth_Bps > 0 else 0.0)


class LinkTable:
    """Per-peer links from a JSON file, re-read when the file changes.

    Format: ``{"default": {"latency_s": 0.02, "bandwidth_Bps": 1e7},
    "peers": {"127.0.0.1:5001": {...}, "<node id>": {...}}}``; a flat mapping of
    address -> link (without "peers") is accepted too.
    """

    def __init__(self, path: str | Path | None = None, links: dict[str, Link] | None = None,
                 default: Link | None = None) -> None:
        self.path = Path(path) if path else None
        self._links = dict(links or {})
        self._default = default or Link()
        self._mtime = 0.0
        self._checked = 0.0
        if self.path is not None:
            self._reload()

    @staticmethod
    def _parse_link(name: str, value: object) -> Link:
        if not isinstance(value, dict):
            raise ValueError(f"links file: entry {name!r} must be an object with latency_s/bandwidth_Bps")
        latency = float(value.get("latency_s", 0.0))
        bandwidth = float(value.get("bandwidth_Bps", 0.0))
        if latency < 0 or bandwidth < 0:
            raise ValueError(f"links file: entry {name!r} has negative latency_s or bandwidth_Bps")
        return Link(latency, bandwidth)

    def _reload(self) -> None:
        assert self.path is not None
        try:
            mtime = os.stat(self.path).st_mtime
        except OSError:
            return
        if mtime == self._mtime:
            return
        data = json.loads(self.path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"links file {self.path}: expected a JSON object")
        peers = data.get("peers", {k: v for k, v in data.items() if k != "default"})
        self._links = {str(k): self._parse_link(str(k), v) for k, v in peers.items()}
        self._default = self._parse_link("default", data["default"]) if "default" in data else Link()
        self._mtime = mtime

    def get(self, address: str, node_id: str = "") -> Link:
        if self.path is not None and time.monotonic() - self._checked > 1.0:
            self._checked = time.monotonic()
            try:
                self._reload()
            except (ValueError, OSError) as exc:
                logger.warning("links file %s unreadable, keeping previous links: %s", self.path, exc)
        return self._links.get(address) or self._links.get(node_id) or self._default


class Transport:
    """Channels to peers and the counters of what went over them."""

    def __init__(self, token: str, *, links: LinkTable | None = None,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, wire: bool = True) -> None:
        self.token = token
        self.metadata = token_metadata(token)
        self.links = links
        self.chunk_bytes = chunk_bytes
        self.bytes_sent = 0
        self.activation_bytes_sent = 0
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, node_pb2_grpc.NodeStub] = {}
        self._pipes: dict[tuple[str, bool], _Pipe] = {}   # (address, backward) -> open pipe
        self._stream_only: set[str] = set()   # peers without pipes (older nodes)
        self.wire = wire
        self._wires: dict[tuple[str, bool], WireConnection] = {}   # (address, backward) -> open wire
        self._wire_ports: dict[str, int] = {}   # address -> its wire port (0: the peer has none)
        self._wire_locks: dict[tuple[str, bool], asyncio.Lock] = {}

    def stub(self, address: str) -> node_pb2_grpc.NodeStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = grpc.aio.insecure_channel(address, options=channel_options())
            self._channels[address] = channel
            stub = self._stubs[address] = node_pb2_grpc.NodeStub(channel)
        return stub

    def _pipe(self, address: str, backward: bool) -> _Pipe:
        """The open pipe to ``address`` in that direction, opened (or reopened when it ended) on demand."""
        pipe = self._pipes.get((address, backward))
        if pipe is None or pipe.broken or pipe.call.done():
            self.stub(address)
            method = f"/lowband.Node/{'BackwardPipe' if backward else 'ForwardPipe'}"
            # no request serializer: messages are already bytes (single_message_bytes)
            multicallable = self._channels[address].stream_stream(
                method, response_deserializer=node_pb2.NodeAck.FromString)
            pipe = self._pipes[(address, backward)] = _Pipe(multicallable(metadata=self.metadata))
        return pipe

    def _drop_pipe(self, address: str, backward: bool, pipe: _Pipe) -> None:
        pipe.broken = True
        pipe.call.cancel()
        if self._pipes.get((address, backward)) is pipe:
            del self._pipes[(address, backward)]

    async def _send_on_pipe(self, address: str, backward: bool, request: bytes, timeout_s: float) -> node_pb2.NodeAck:
        """Write one message on the pipe and read its ack; raises grpc.aio.AioRpcError.

        A pipe that fails is dropped (after a timeout or a failed read its place in the ack sequence is
        unknown). A message that was never written (the pipe had ended meanwhile) is retried once on a
        fresh pipe, so a peer's restart or an idle connection's end costs no microbatch.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        for attempt in range(2):
            pipe = self._pipe(address, backward)
            try:
                return await asyncio.wait_for(self._exchange(pipe, request), max(0.0, deadline - loop.time()))
            except _NotSent as exc:
                self._drop_pipe(address, backward, pipe)
                if attempt == 0:
                    continue
                cause = exc.__cause__
                if isinstance(cause, grpc.aio.AioRpcError):
                    raise cause from None
                raise _rpc_error(grpc.StatusCode.UNAVAILABLE, f"pipe to {address} ended") from None
            except TimeoutError:
                self._drop_pipe(address, backward, pipe)
                raise _rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED,
                                 f"no ack from {address} in {timeout_s:.1f} s") from None
            except grpc.aio.AioRpcError:
                self._drop_pipe(address, backward, pipe)
                raise
            except _PipeEnded:
                self._drop_pipe(address, backward, pipe)
                code = pipe.call.code() if pipe.call.done() else None
                if isinstance(code, grpc.StatusCode) and code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
                    raise _rpc_error(code, await pipe.call.details() or "pipe ended") from None
                raise _rpc_error(grpc.StatusCode.UNAVAILABLE, f"pipe to {address} ended") from None
        raise AssertionError("unreachable")

    @staticmethod
    async def _exchange(pipe: _Pipe, request: bytes) -> node_pb2.NodeAck:
        async with pipe.lock:
            if pipe.broken:
                raise _NotSent
            try:
                await pipe.call.write(request)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
                pipe.broken = True
                raise _NotSent from exc
            except BaseException:
                pipe.broken = True
                raise
            try:
                reply = await pipe.call.read()
            except BaseException:
                pipe.broken = True
                raise
            if reply is grpc.aio.EOF:
                pipe.broken = True
                raise _PipeEnded
            return reply

    async def _wire(self, address: str, backward: bool, timeout_s: float) -> WireConnection | None:
        """A new wire to ``address`` in that direction (the caller found none open); None: use gRPC this time.

        Raises grpc.aio.AioRpcError when the peer does not answer the Ping that announces its port
        (it is unreachable on gRPC too).
        """
        key = (address, backward)
        lock = self._wire_locks.setdefault(key, asyncio.Lock())
        async with lock:
            conn = self._wires.get(key)
            if conn is not None and not conn.closed:
                return conn
            port = self._wire_ports.get(address)
            if port is None:
                _, reply = await self.ping(address, timeout_s=timeout_s)
                port = self._wire_ports[address] = reply.wire_port
            if port == 0:
                return None
            host = address.rpartition(":")[0].strip("[]") or "127.0.0.1"
            try:
                conn = await WireConnection.open(host, port, self.token, min(timeout_s, WIRE_CONNECT_TIMEOUT_S))
            except (OSError, ConnectionError, TimeoutError) as exc:
                # the port may be stale (the peer restarted) or filtered: ask again next time
                logger.info("activation wire to %s (port %d) unusable, using gRPC: %s", address, port, exc)
                self._wire_ports.pop(address, None)
                return None
            self._wires[key] = conn
            return conn

    def _drop_wire(self, address: str, backward: bool) -> None:
        conn = self._wires.pop((address, backward), None)
        if conn is not None:
            conn.close()

    async def _send_on_wire(self, address: str, backward: bool, parts: tuple[bytes, bytes, WirePayload],
                            timeout_s: float) -> node_pb2.NodeAck | None:
        """One frame on the wire and its reply; None when the peer has no usable wire (use gRPC).

        Failures surface as the gRPC path's do (AioRpcError UNAVAILABLE / DEADLINE_EXCEEDED). A frame that
        never went out (the connection had closed, e.g. the peer restarted) is retried once on a new one.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        for attempt in range(2):
            conn = self._wires.get((address, backward))   # the common case, without a coroutine round
            if conn is None or conn.closed:
                conn = await self._wire(address, backward, max(0.0, deadline - loop.time()))
                if conn is None:
                    return None
            try:
                status, message = await conn.send(int(backward), *parts, deadline=deadline)
            except TimeoutError:
                if conn.closed:   # it timed out mid-frame; one still waiting for the frame ahead of it did not
                    self._drop_wire(address, backward)
                raise _rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED,
                                 f"no reply from {address} in {timeout_s:.1f} s") from None
            except WireError as exc:
                self._drop_wire(address, backward)
                if not exc.sent and attempt == 0:
                    continue
                raise _rpc_error(grpc.StatusCode.UNAVAILABLE, f"activation wire to {address}: {exc}") from None
            if status == UNAVAILABLE:
                raise _rpc_error(grpc.StatusCode.UNAVAILABLE, message)
            return node_pb2.NodeAck(ok=status == OK, message=message)
        raise AssertionError("unreachable")

    async def forget(self, address: str) -> None:
        """Drop a peer's channel (it died or moved)."""
        self._stubs.pop(address, None)
        for backward in (False, True):
            self._drop_wire(address, backward)
            self._wire_locks.pop((address, backward), None)
        self._wire_ports.pop(address, None)
        for backward in (False, True):
            pipe = self._pipes.get((address, backward))
            if pipe is not None:
                self._drop_pipe(address, backward, pipe)
        self._stream_only.discard(address)
        channel = self._channels.pop(address, None)
        if channel is not None:
            await channel.close(grace=None)

    async def emulate(self, address: str, nbytes: int, node_id: str = "") -> None:
        """Sleep as long as the emulated link would take to carry ``nbytes``."""
        if self.links is None:
            return
        delay = self.links.get(address, node_id).delay_s(nbytes)
        if delay > 0:
            await asyncio.sleep(delay)

    @staticmethod
    def _requests(header: node_pb2.MicrobatchHeader, chunks: Iterator[tensor_pb2.TensorChunk]
                  ) -> Iterator[node_pb2.MicrobatchChunk]:
        yield node_pb2.MicrobatchChunk(header=header, chunk=next(chunks))
        for chunk in chunks:
            yield node_pb2.MicrobatchChunk(chunk=chunk)

    async def send_microbatch(self, address: str, backward: bool, header: node_pb2.MicrobatchHeader,
                              tensor: tensor_pb2.Tensor, *, timeout_s: float, node_id: str = "",
                              payload: memoryview | SegmentedPayload | None = None) -> node_pb2.NodeAck:
        """Push one encoded activation (or its gradient) to ``address``; raises grpc.aio.AioRpcError.

        ``tensor`` is a whole message (``codec.encode``), or with ``payload`` the payload-less message of
        ``codec.encode_split``/``encode_segmented``, which is completed in place (``seal``) if it has to go
        over gRPC.
        """
        if self.wire:
            parts = frame_parts(header, tensor, payload)
            nbytes = len(parts[1]) + len(parts[2])   # the tensor, as on gRPC (the header is not counted there either)
            if self.links is not None:
                await self.emulate(address, nbytes, node_id)
            ack = await self._send_on_wire(address, backward, parts, timeout_s)
            if ack is None:   # no usable wire: gRPC, over the link already emulated
                ack, nbytes = await self._send_on_grpc(address, backward, header, seal(tensor, payload), timeout_s)
        else:
            seal(tensor, payload)
            await self.emulate(address, tensor.ByteSize(), node_id)
            ack, nbytes = await self._send_on_grpc(address, backward, header, tensor, timeout_s)
        self.bytes_sent += nbytes
        self.activation_bytes_sent += nbytes
        return ack

    async def _send_on_grpc(self, address: str, backward: bool, header: node_pb2.MicrobatchHeader,
                            tensor: tensor_pb2.Tensor, timeout_s: float) -> tuple[node_pb2.NodeAck, int]:
        """A whole message on the activation pipe (or, too large or to a peer without pipes, as a chunked
        stream); returns the ack and the bytes sent."""
        data = tensor.SerializeToString()
        ack: node_pb2.NodeAck | None = None
        if len(data) <= self.chunk_bytes and address not in self._stream_only:
            request = single_message_bytes(header, data, stream_checksum(tensor))
            try:
                ack = await self._send_on_pipe(address, backward, request, timeout_s)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                logger.info("peer %s has no pipes; streaming each microbatch to it", address)
                self._stream_only.add(address)
        if ack is None:
            stub = self.stub(address)
            stream_call = stub.Backward if backward else stub.Forward
            chunks = iter_chunks(tensor, self.chunk_bytes, data=data)
            ack = await stream_call(self._requests(header, chunks), timeout=timeout_s, metadata=self.metadata)
        return ack, len(data)

    async def abandon(self, address: str, request: node_pb2.AbandonRequest, *, timeout_s: float
                      ) -> node_pb2.NodeAck:
        await self.emulate(address, request.ByteSize())
        ack = await self.stub(address).Abandon(request, timeout=timeout_s, metadata=self.metadata)
        self.bytes_sent += request.ByteSize()
        return ack

    async def iteration_status(self, address: str, request: node_pb2.IterationStatusRequest, *, timeout_s: float
                               ) -> node_pb2.IterationStatusReply:
        await self.emulate(address, request.ByteSize())
        reply = await self.stub(address).IterationStatus(request, timeout=timeout_s, metadata=self.metadata)
        self.bytes_sent += request.ByteSize()
        return reply

    async def ping(self, address: str, *, timeout_s: float, padding: int = 0) -> tuple[float, node_pb2.PingReply]:
        """Round-trip time in seconds to a peer (and its identity)."""
        request = node_pb2.PingRequest(sent_at=time.time(), padding=b"\0" * padding)
        start = time.perf_counter()
        await self.emulate(address, request.ByteSize())
        reply = await self.stub(address).Ping(request, timeout=timeout_s, metadata=self.metadata)
        self.bytes_sent += request.ByteSize()
        return time.perf_counter() - start, reply

    async def close(self) -> None:
        for address, backward in list(self._wires):
            self._drop_wire(address, backward)
        channels, self._channels, self._stubs = self._channels, {}, {}
        pipes, self._pipes = self._pipes, {}
        for pipe in pipes.values():
            pipe.broken = True
            pipe.call.cancel()
        for channel in channels.values():
            await channel.close(grace=None)
