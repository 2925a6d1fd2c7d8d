"""Peer channels: sending encoded, chunked tensors to other nodes, with optional emulated links.

One ``grpc.aio`` channel per peer address, reused. A tensor is encoded once by
the caller, serialized and cut into large chunks (few messages, few copies) and
streamed with the microbatch header on the first message. For the simulator a
``LinkTable`` emulates each link: before a send the sender sleeps
``latency_s + bytes / bandwidth_Bps`` of that peer's link.
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

import grpc

from protocols import node_pb2, node_pb2_grpc, tensor_pb2
from protocols.chunking import chunk_tensor
from protocols.rpc import MAX_MESSAGE_BYTES, grpc_options, token_metadata

logger = logging.getLogger(__name__)

# Large chunks: a 1 MiB activation goes in one message; the gRPC limit is 8 MiB.
DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
assert DEFAULT_CHUNK_BYTES < MAX_MESSAGE_BYTES


def channel_options() -> list[tuple[str, object]]:
    """The shared gRPC options plus a large HTTP/2 stream window: an activation of a few MiB then goes
    out without waiting for window updates (each one a round trip through both event loops)."""
    return [*grpc_options(), ("grpc.http2.lookahead_bytes", 16 * 1024 * 1024)]


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
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.token = token
        self.metadata = token_metadata(token)
        self.links = links
        self.chunk_bytes = chunk_bytes
        self.bytes_sent = 0
        self.activation_bytes_sent = 0
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, node_pb2_grpc.NodeStub] = {}

    def stub(self, address: str) -> node_pb2_grpc.NodeStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = grpc.aio.insecure_channel(address, options=channel_options())
            self._channels[address] = channel
            stub = self._stubs[address] = node_pb2_grpc.NodeStub(channel)
        return stub

    async def forget(self, address: str) -> None:
        """Drop a peer's channel (it died or moved)."""
        self._stubs.pop(address, None)
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
    def _requests(header: node_pb2.MicrobatchHeader, chunks: list[tensor_pb2.TensorChunk]
                  ) -> Iterator[node_pb2.MicrobatchChunk]:
        yield node_pb2.MicrobatchChunk(header=header, chunk=chunks[0])
        for chunk in chunks[1:]:
            yield node_pb2.MicrobatchChunk(chunk=chunk)

    async def send_microbatch(self, address: str, backward: bool, header: node_pb2.MicrobatchHeader,
                              tensor: tensor_pb2.Tensor, *, timeout_s: float, node_id: str = ""
                              ) -> node_pb2.NodeAck:
        """Push one encoded activation (or its gradient) to ``address``; raises grpc.aio.AioRpcError."""
        chunks = chunk_tensor(tensor, chunk_bytes=self.chunk_bytes)
        nbytes = sum(len(c.data) for c in chunks)
        await self.emulate(address, nbytes, node_id)
        stub = self.stub(address)
        call = stub.Backward if backward else stub.Forward
        ack = await call(self._requests(header, chunks), timeout=timeout_s, metadata=self.metadata)
        self.bytes_sent += nbytes
        self.activation_bytes_sent += nbytes
        return ack

    async def abandon(self, address: str, request: node_pb2.AbandonRequest, *, timeout_s: float
                      ) -> node_pb2.NodeAck:
        await self.emulate(address, request.ByteSize())
        ack = await self.stub(address).Abandon(request, timeout=timeout_s, metadata=self.metadata)
        self.bytes_sent += request.ByteSize()
        return ack

    async def ping(self, address: str, *, timeout_s: float, padding: int = 0) -> tuple[float, node_pb2.PingReply]:
        """Round-trip time in seconds to a peer (and its identity)."""
        request = node_pb2.PingRequest(sent_at=time.time(), padding=b"\0" * padding)
        start = time.perf_counter()
        await self.emulate(address, request.ByteSize())
        reply = await self.stub(address).Ping(request, timeout=timeout_s, metadata=self.metadata)
        self.bytes_sent += request.ByteSize()
        return time.perf_counter() - start, reply

    async def close(self) -> None:
        channels, self._channels, self._stubs = self._channels, {}, {}
        for channel in channels.values():
            await channel.close(grace=None)
