"""Hostile bytes on every port: a generic gRPC client and raw sockets send random and mutated messages.

Every method of the Coordinator and Node services is enumerated from the service descriptors (a new RPC
is fuzzed without touching this file) and driven with raw bytes through ``channel.unary_unary`` and
friends, not the project's stubs; the activation wire gets garbage handshakes and frames on raw sockets.
Asserted: no UNKNOWN or INTERNAL status, no traceback in the log (grpc's own logger included), a
bounded number of bad-input lines (rate-limited per peer), the servers healthy afterwards, the
coordinator's membership and the node's weights unchanged.

The default-suite variant sends a few thousand messages; ``@pytest.mark.slow`` sends ten times more.
``LOWBAND_FUZZ_SEED`` changes the inputs (the default is fixed, so a failure reproduces).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from fuzz_bytes import hostile_messages, mutate
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from node_cluster import TOKEN, LocalNode, start_node, stopping

from lowband.coordinator.server import CoordinatorServer, start_coordinator
from lowband.node.pipeline.wire import (
    ACCEPTED,
    INVALID,
    MAC_BYTES,
    MAX_META_BYTES,
    NONCE_BYTES,
    OK,
    REPLY,
    REQUEST,
    REQUEST_MAGIC,
    UNAVAILABLE,
    handshake_mac,
)
from lowband.node.sync.grpc_averager import ShardReducer
from lowband.node.train.model import ModelConfig, init_stage
from lowband.protocols import coordinator_pb2 as cpb
from lowband.protocols import node_pb2, tensor_pb2
from lowband.protocols.chunking import chunk_tensor
from lowband.protocols.codec import encode
from lowband.protocols.config import RunConfig, apply_overrides
from lowband.protocols.errors import ValidationError
from lowband.protocols.peer_guard import GuardPolicy
from lowband.protocols.rpc import grpc_options, token_metadata
from lowband.protocols.state_client import StateSnapshot

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore:The given buffer is not writable")]

SEED = int(os.environ.get("LOWBAND_FUZZ_SEED", "2126"))
MD = token_metadata(TOKEN)
NO_STRIKES = GuardPolicy(strikes=0)   # the fuzz must reach every parser, not be cooled down after ten calls
CFG = ModelConfig.from_preset("tiny")
STAGES = 4
# Every status a hostile message may get. UNKNOWN and INTERNAL are bugs: an exception escaped a handler.
ALLOWED = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "UNAVAILABLE", "UNIMPLEMENTED",
           "RESOURCE_EXHAUSTED", "OUT_OF_RANGE", "ENDED_EARLY"}


def methods(service: ServiceDescriptor) -> list[MethodDescriptor]:
    return list(service.methods)


async def call_raw(channel: grpc.aio.Channel, service: ServiceDescriptor, method: MethodDescriptor,
                   messages: list[bytes], metadata: tuple[tuple[str, str], ...] = MD) -> str:
    """One call of ``method`` with raw bytes (a streamed request sends them all; a unary one, the first);
    the status's name, or ENDED_EARLY (below)."""
    path = f"/{service.full_name}/{method.name}"
    if method.client_streaming:
        # Written one by one. Once the server has ended the stream (refused a message), a later write fails
        # on this side and grpc's client replaces the server's status by a local INTERNAL "Internal error
        # from Core": that case is ENDED_EARLY, not the server's answer. A server-side UNKNOWN or INTERNAL
        # there would still show: grpc logs the handler's exception, and the log must hold no traceback.
        factory = channel.stream_stream if method.server_streaming else channel.stream_unary
        stream = factory(path)(metadata=metadata, timeout=10)
        for message in messages:
            try:
                await stream.write(message)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                return "ENDED_EARLY"
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await stream.done_writing()
        with contextlib.suppress(grpc.aio.AioRpcError):
            if method.server_streaming:
                async for _ in stream:
                    pass
            else:
                await stream
        return (await stream.code()).name
    try:
        factory = channel.unary_stream if method.server_streaming else channel.unary_unary
        call = factory(path)(messages[0], metadata=metadata, timeout=10)
        if method.server_streaming:
            async for _ in call:
                pass
        else:
            await call
        return "OK"
    except grpc.aio.AioRpcError as exc:
        return exc.code().name


async def fuzz_service(channel: grpc.aio.Channel, service: ServiceDescriptor, per_method: int, rng: random.Random,
                       seeds: dict[str, list[bytes]] | None = None, concurrency: int = 16) -> Counter[tuple[str, str]]:
    """``per_method`` hostile calls of every method of ``service``; the count of each (method, status)."""
    seen: Counter[tuple[str, str]] = Counter()
    calls: list[tuple[MethodDescriptor, list[bytes]]] = []
    for method in methods(service):
        messages = hostile_messages(rng, method.input_type, per_method * (3 if method.client_streaming else 1),
                                    (seeds or {}).get(method.name))
        for i in range(per_method):
            if method.client_streaming:
                calls.append((method, messages[3 * i:3 * i + rng.randint(0, 3)]))
            else:
                calls.append((method, [messages[i]]))
    rng.shuffle(calls)
    for start in range(0, len(calls), concurrency):
        batch = calls[start:start + concurrency]
        codes = await asyncio.gather(*(call_raw(channel, service, m, msgs) for m, msgs in batch))
        for (method, _), code in zip(batch, codes, strict=True):
            seen[(method.name, code)] += 1
    return seen


def assert_clean(seen: Counter[tuple[str, str]], caplog: pytest.LogCaptureFixture, what: str,
                 max_lines: int = 40) -> None:
    """No forbidden status, no traceback, and bad input logged a bounded number of times."""
    bad = {k: v for k, v in seen.items() if k[1] not in ALLOWED}
    assert not bad, f"{what}: forbidden statuses {bad}"
    tracebacks = [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert not tracebacks, f"{what}: tracebacks logged: {[r.getMessage()[:300] for r in tracebacks[:3]]}"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, f"{what}: errors logged: {[r.getMessage()[:300] for r in errors[:3]]}"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) <= max_lines, f"{what}: {len(warnings)} warning lines; bad input must be rate-limited"


# ----------------------------------------------------------------------------- coordinator


def coordinator_config() -> RunConfig:
    # long leases: the members must not expire while the fuzz runs on a busy machine
    return apply_overrides(RunConfig(), ["model.stages=3", "membership.heartbeat_interval_s=5",
                                         "membership.lease_s=600"])


def join_request(port: int) -> cpb.JoinRequest:
    return cpb.JoinRequest(address=f"127.0.0.1:{port}", device="cpu", throughput=1.0, version="0.1", stage=-1,
                           preferred_stage=-1, has_data=True)


def membership(server: CoordinatorServer) -> dict[str, tuple[str, int, str]]:
    return {node_id: (m.address, m.stage, m.state) for node_id, m in server.core.members.items()}


async def fuzz_coordinator(tmp_path: Path, caplog: pytest.LogCaptureFixture, per_method: int) -> None:
    rng = random.Random(SEED)
    server = await start_coordinator(coordinator_config(), tmp_path / "run", TOKEN, bad_input=NO_STRIKES)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=grpc_options())
    try:
        join = channel.unary_unary("/lowband.Coordinator/Join", request_serializer=None, response_deserializer=None)
        for port in (7001, 7002, 7003):
            cpb.JoinReply.FromString(await join(join_request(port).SerializeToString(), metadata=MD, timeout=10))
        before = membership(server)
        epoch = server.core.epoch
        assert len(before) == 3
        # valid messages of the ghost ids, mutated: deeper than random bytes, and they name no member
        seeds = {"Join": [join_request(9).SerializeToString()],
                 "Heartbeat": [cpb.HeartbeatRequest(node_id="ghost-0", epoch=epoch).SerializeToString()],
                 "HeartbeatStream": [cpb.HeartbeatRequest(node_id="ghost-1", epoch=epoch).SerializeToString()],
                 "Status": [cpb.StatusRequest(document=True, max_events=3).SerializeToString()]}
        service = cpb.DESCRIPTOR.services_by_name["Coordinator"]
        started = time.monotonic()
        seen = await fuzz_service(channel, service, per_method, rng, seeds)
        elapsed = time.monotonic() - started
        assert sum(seen.values()) == per_method * len(service.methods)
        assert_clean(seen, caplog, "coordinator", max_lines=4 + int(elapsed / 10) * 4)
        assert {name for name, code in seen if code == "INVALID_ARGUMENT"} == {m.name for m in service.methods}, \
            "every method must have refused some malformed message"
        # healthy: the standard health check and a normal Status call answer; nothing joined or left
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        status_call = channel.unary_unary("/lowband.Coordinator/Status")
        reply = cpb.StatusReply.FromString(await status_call(cpb.StatusRequest().SerializeToString(),
                                                             metadata=MD, timeout=10))
        assert {n.node_id for n in reply.nodes} >= set(before)
        # the members are as they were; a mutated Join that happens to be valid is a real join (the fuzz
        # holds the run token) and adds a member, but only one per Join answered OK
        after = membership(server)
        assert {k: after.get(k) for k in before} == before
        assert len(after) - len(before) <= seen[("Join", "OK")]
    finally:
        await channel.close()
        await server.stop(0.2)


def test_coordinator_answers_hostile_bytes_on_every_method(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    asyncio.run(fuzz_coordinator(tmp_path, caplog, per_method=150))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_coordinator_answers_hostile_bytes_on_every_method_long(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    asyncio.run(fuzz_coordinator(tmp_path, caplog, per_method=2000))


# ----------------------------------------------------------------------------- node and wire


@dataclass
class Target:
    node: LocalNode
    weights: dict[str, torch.Tensor]

    def unchanged(self) -> bool:
        now = self.node.runtime.module.state_dict()
        return all(torch.equal(v, now[k]) for k, v in self.weights.items())


async def start_target(nodes: list[LocalNode], policy: GuardPolicy = NO_STRIKES) -> Target:
    """Node n1 of stage 1, also averaging (a ShardReducer) and serving GetState, so every RPC's handler runs."""
    module = init_stage(CFG, 1, STAGES, seed=0)
    node = await start_node("n1", 1, module, dim=CFG.dim, max_seq_len=CFG.max_seq_len, bad_input=policy)
    nodes.append(node)

    async def state(stage: int, parts: list[str]) -> StateSnapshot:
        if set(parts) - {"local"}:
            raise ValidationError(f"unknown parts {sorted(set(parts) - {'local'})}")
        return StateSnapshot(parts={"local": {"probe": torch.ones(4)}})   # small: the point is the request

    node.servicer.shard_reducer = ShardReducer(timeout_s=0.2, node_id="n1")
    node.servicer.state_provider = state
    return Target(node, {k: v.clone() for k, v in module.state_dict().items()})


def microbatch_seeds() -> list[bytes]:
    """Well-formed chunks of a microbatch for a run this node does not train (mutations reach reassembly)."""
    header = node_pb2.MicrobatchHeader(run_id="ghost-run", iteration=0, microbatch=0, origin_id="ghost-0",
                                       stages=[0, 1, 2, 3, 0], node_ids=["ghost-0", "n1", "x", "y", "ghost-0"],
                                       hop=1)
    chunks = chunk_tensor(encode(torch.randn(1, 4, CFG.dim), "fp32"), chunk_bytes=256)
    return [node_pb2.MicrobatchChunk(header=header, chunk=chunks[0]).SerializeToString(),
            *(node_pb2.MicrobatchChunk(chunk=c).SerializeToString() for c in chunks[1:3])]


async def ping(address: str) -> node_pb2.PingReply:
    async with grpc.aio.insecure_channel(address, options=grpc_options()) as channel:
        call = channel.unary_unary("/lowband.Node/Ping")
        return node_pb2.PingReply.FromString(await call(node_pb2.PingRequest(sent_at=1.0).SerializeToString(),
                                                        metadata=MD, timeout=10))


async def fuzz_node(caplog: pytest.LogCaptureFixture, per_method: int) -> None:
    rng = random.Random(SEED + 1)
    async with stopping([]) as nodes:
        target = await start_target(nodes)
        channel = grpc.aio.insecure_channel(target.node.address, options=grpc_options())
        try:
            service = node_pb2.DESCRIPTOR.services_by_name["Node"]
            seeds = {"Forward": microbatch_seeds(), "Backward": microbatch_seeds()}
            started = time.monotonic()
            seen = await fuzz_service(channel, service, per_method, rng, seeds)
            elapsed = time.monotonic() - started
        finally:
            await channel.close()
        assert_clean(seen, caplog, "node", max_lines=4 + int(elapsed / 10) * 4)
        assert {name for name, code in seen if code == "INVALID_ARGUMENT"} == {m.name for m in service.methods}, \
            f"every method must have refused some malformed message: {seen}"
        reply = await ping(target.node.address)
        assert reply.node_id == "n1" and reply.stage == 1
        assert target.unchanged()
        assert target.node.runtime.iteration == 0 and target.node.runtime.steps_applied == 0


def test_node_answers_hostile_bytes_on_every_method(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    asyncio.run(fuzz_node(caplog, per_method=150))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_node_answers_hostile_bytes_on_every_method_long(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    asyncio.run(fuzz_node(caplog, per_method=2000))


async def wire_connect(port: int, token: str | None = TOKEN, garbage_mac: bytes | None = None
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    """A raw connection to the wire after the handshake; None when the server refused or closed it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        nonce = await asyncio.wait_for(reader.readexactly(NONCE_BYTES), 15)
        writer.write(garbage_mac if garbage_mac is not None else handshake_mac(token or "", nonce))
        if garbage_mac is not None and len(garbage_mac) < MAC_BYTES:
            writer.write_eof()   # a short MAC and the end: the server must not wait for the rest
        await writer.drain()
        if await asyncio.wait_for(reader.read(1), 15) != ACCEPTED:   # generous: a loaded machine
            writer.close()
            return None
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()
        return None
    return reader, writer


def wire_frame(rng: random.Random) -> tuple[bytes, bool]:
    """A frame, well framed with hostile metadata and payload, or with its framing broken; and whether the
    sender then ends the connection (the frame may be shorter than its head says: the server would wait)."""
    header = hostile_messages(rng, node_pb2.MicrobatchHeader.DESCRIPTOR, 1)[0]
    meta = hostile_messages(rng, tensor_pb2.Tensor.DESCRIPTOR, 1)[0]
    payload = rng.randbytes(rng.choice((0, 4, 64, 1024)))
    kind = 0 if rng.random() < 0.5 else 1
    head = REQUEST.pack(REQUEST_MAGIC, kind, len(header), len(meta), len(payload))
    frame = head + header + meta + payload
    op = rng.randrange(10)
    if op == 0:
        return rng.randbytes(rng.randint(1, 200)), True                               # noise
    if op == 1:
        return mutate(rng, head) + header + meta + payload, True                      # broken head
    if op == 2:
        return REQUEST.pack(REQUEST_MAGIC, kind, MAX_META_BYTES + 1, 0, 0), False     # over the bounds
    if op == 3:
        return REQUEST.pack(REQUEST_MAGIC, kind, 0, 0, 2**63), False                  # absurd payload
    return frame, False                                                               # parses, or not


async def wire_call(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, frame: bytes, end: bool = False
                    ) -> tuple[int, str] | None:
    """Send a frame (``end``: and end the connection); its reply, or None when the server closed the connection."""
    writer.write(frame)
    if end:
        writer.write_eof()
    try:
        await writer.drain()
        head = await asyncio.wait_for(reader.readexactly(REPLY.size), 2)
        magic, status, length = REPLY.unpack(head)
        assert magic == b"LBA1"
        return status, (await reader.readexactly(length)).decode(errors="replace")
    except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
        return None


async def fuzz_wire(caplog: pytest.LogCaptureFixture, frames: int) -> None:
    rng = random.Random(SEED + 2)
    async with stopping([]) as nodes:
        target = await start_target(nodes)
        wire = target.node.wire
        assert wire is not None
        statuses: Counter[str] = Counter()
        started = time.monotonic()
        # handshakes: garbage MACs, wrong tokens, nothing at all
        for i in range(40):
            garbage = rng.randbytes(rng.choice((0, 1, 31, 32, 33, 64))) if i % 4 else None
            conn = await wire_connect(wire.port, token="wrong", garbage_mac=garbage)
            if conn is not None:
                conn[1].close()
            statuses["refused" if conn is None else "accepted"] += 1
        assert statuses["accepted"] == 0
        conn = None
        for _ in range(frames):
            if conn is None:
                conn = await wire_connect(wire.port)
                assert conn is not None, "an honest handshake must be accepted"
            frame, end = wire_frame(rng)
            reply = await wire_call(*conn, frame, end)
            if reply is None or end:
                conn[1].close()
                conn = None
                statuses["closed"] += 1
            else:
                assert reply[0] in (OK, INVALID, UNAVAILABLE), reply
                statuses[{OK: "ok", INVALID: "invalid", UNAVAILABLE: "unavailable"}[reply[0]]] += 1
        if conn is not None:
            conn[1].close()
        elapsed = time.monotonic() - started
        assert statuses["invalid"] and statuses["closed"], statuses
        assert_clean(Counter(), caplog, "wire", max_lines=4 + int(elapsed / 10) * 4)
        # still serving: an honest connection gets a frame of another run refused by name
        conn = await wire_connect(wire.port)
        assert conn is not None
        header = node_pb2.MicrobatchHeader(run_id="other-run", stages=[0, 1, 0], node_ids=["a", "n1", "a"], hop=1)
        tensor = encode(torch.randn(1, 4, CFG.dim), "fp32")
        payload, tensor.payload = tensor.payload, b""
        head = REQUEST.pack(REQUEST_MAGIC, 0, header.ByteSize(), tensor.ByteSize(), len(payload))
        reply = await wire_call(*conn, head + header.SerializeToString() + tensor.SerializeToString() + payload)
        conn[1].close()
        assert reply is not None and reply[0] == INVALID and "other-run" in reply[1], reply
        assert target.unchanged()
        assert (await ping(target.node.address)).node_id == "n1"


def test_wire_answers_hostile_handshakes_and_frames(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    asyncio.run(fuzz_wire(caplog, frames=600))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_wire_answers_hostile_handshakes_and_frames_long(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    asyncio.run(fuzz_wire(caplog, frames=10000))
