"""Peer channels: sending a hop's tensor to other nodes, with optional emulated links.

A microbatch goes on the peer's activation wire when it has one (``node/pipeline/wire.py``: a
framed, token-authenticated TCP connection per peer and direction, its port learnt from the peer's
``PingReply``): that costs a small part of a gRPC message. Otherwise, and when the wire cannot be
reached, it goes by gRPC: a ``Forward``/``Backward`` call that streams the tensor's message in
``chunk_bytes`` chunks with the microbatch header on the first, which carries a tensor of any size.
Both send the message ``payload.build_microbatch`` made, once; the wire sends its payload beside
the metadata (TCP stands in for the codec checksum), gRPC the whole, checksummed message.

One ``grpc.aio`` channel per peer address, reused. For the simulator a ``LinkTable`` emulates
each link: before a send the sender sleeps ``latency_s + bytes / bandwidth_Bps`` of that peer's
link.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch

from lowband.node.pipeline.payload import SEGMENT_BYTES, OutgoingMicrobatch, build_microbatch
from lowband.node.pipeline.wire import OK, UNAVAILABLE, WireConnection, WireError
from lowband.protocols import node_pb2, node_pb2_grpc
from lowband.protocols.rpc import MAX_MESSAGE_BYTES, grpc_options, token_metadata
from lowband.protocols.subspace import SubspaceBasis
from lowband.protocols.tls import TlsConfig, open_channel

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


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """A wire failure in the form callers already handle for gRPC calls."""
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

    def __init__(self, token: str, *, links: LinkTable | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 wire: bool = True, segment_bytes: int = SEGMENT_BYTES, tls: TlsConfig | None = None) -> None:
        self.token = token
        self.tls = tls   # mutual TLS on the peer channels and wires (protocols/tls.py); None: plaintext
        self.metadata = token_metadata(token)
        self.links = links
        self.chunk_bytes = chunk_bytes
        self.segment_bytes = segment_bytes   # a raw codec's payload is cast in pieces of this many bytes
        self.bytes_sent = 0
        self.activation_bytes_sent = 0
        self.control_bytes_sent = 0      # the small peer RPCs (abandon, iteration status, pings)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, node_pb2_grpc.NodeStub] = {}
        self.wire = wire
        self._wires: dict[tuple[str, bool], WireConnection] = {}   # (address, backward) -> open wire
        self._wire_ports: dict[str, int] = {}   # address -> its wire port (0: the peer has none)
        self._wire_locks: dict[tuple[str, bool], asyncio.Lock] = {}

    def stub(self, address: str) -> node_pb2_grpc.NodeStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = open_channel(address, channel_options(), self.tls)
            self._channels[address] = channel
            stub = self._stubs[address] = node_pb2_grpc.NodeStub(channel)
        return stub

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
                conn = await WireConnection.open(host, port, self.token, min(timeout_s, WIRE_CONNECT_TIMEOUT_S),
                                                 tls=self.tls)
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

    async def _send_on_wire(self, address: str, backward: bool, out: OutgoingMicrobatch,
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
                status, message = await conn.send(int(backward), out.header_bytes, out.meta_bytes, out.payload,
                                                  deadline=deadline)
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

    async def send_microbatch(self, address: str, backward: bool, header: node_pb2.MicrobatchHeader,
                              tensor: torch.Tensor, codec: str, *, timeout_s: float, node_id: str = "",
                              subspace: SubspaceBasis | None = None) -> node_pb2.NodeAck:
        """Push one activation (or its gradient) to ``address`` in ``codec``; raises grpc.aio.AioRpcError.

        The message is built once (``build_microbatch``) and its bytes counted once, as the path that
        carried it sent them: metadata and payload on the wire, the serialized message on gRPC.
        """
        out = build_microbatch(header, tensor, codec, subspace=subspace, backward=backward,
                               segment_bytes=self.segment_bytes)
        ack: node_pb2.NodeAck | None = None
        if self.wire:
            nbytes = out.nbytes
            await self.emulate(address, nbytes, node_id)
            ack = await self._send_on_wire(address, backward, out, timeout_s)
        if ack is None:   # no wire, or no usable one: gRPC (over the link already emulated, if any)
            requests, nbytes = out.grpc_stream(self.chunk_bytes)
            if not self.wire:
                await self.emulate(address, nbytes, node_id)
            ack = await self._send_on_grpc(address, backward, requests, timeout_s)
        self.bytes_sent += nbytes
        self.activation_bytes_sent += nbytes
        return ack

    async def _send_on_grpc(self, address: str, backward: bool, requests: Iterator[node_pb2.MicrobatchChunk],
                            timeout_s: float) -> node_pb2.NodeAck:
        """One Forward/Backward call. A refusal (INVALID_ARGUMENT: a bad header or tensor) comes back as a
        negative ack, as the wire answers one; any other failure raises grpc.aio.AioRpcError."""
        stub = self.stub(address)
        call = stub.Backward if backward else stub.Forward
        try:
            return await call(requests, timeout=timeout_s, metadata=self.metadata)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            return node_pb2.NodeAck(ok=False, message=exc.details() or "invalid")

    async def _unary(self, address: str, method: str, request: Any, timeout_s: float) -> Any:
        """A small control RPC to a peer, on the emulated link and counted as sent."""
        await self.emulate(address, request.ByteSize())
        reply = await getattr(self.stub(address), method)(request, timeout=timeout_s, metadata=self.metadata)
        self.bytes_sent += request.ByteSize()
        self.control_bytes_sent += request.ByteSize()
        return reply

    async def abandon(self, address: str, request: node_pb2.AbandonRequest, *, timeout_s: float
                      ) -> node_pb2.NodeAck:
        return await self._unary(address, "Abandon", request, timeout_s)

    async def iteration_status(self, address: str, request: node_pb2.IterationStatusRequest, *, timeout_s: float
                               ) -> node_pb2.IterationStatusReply:
        return await self._unary(address, "IterationStatus", request, timeout_s)

    async def ping(self, address: str, *, timeout_s: float, padding: int = 0) -> tuple[float, node_pb2.PingReply]:
        """Round-trip time in seconds to a peer (and its identity)."""
        request = node_pb2.PingRequest(sent_at=time.time(), padding=b"\0" * padding)
        start = time.perf_counter()
        await self.emulate(address, request.ByteSize())
        reply = await self.stub(address).Ping(request, timeout=timeout_s, metadata=self.metadata)
        self.bytes_sent += request.ByteSize()
        self.control_bytes_sent += request.ByteSize()
        return time.perf_counter() - start, reply

    async def close(self) -> None:
        for address, backward in list(self._wires):
            self._drop_wire(address, backward)
        channels, self._channels, self._stubs = self._channels, {}, {}
        for channel in channels.values():
            await channel.close(grace=None)
