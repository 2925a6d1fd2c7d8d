"""The node's gRPC service: receives microbatches, abandons, state requests and pings.

The servicer validates and reassembles what arrives, then hands it to the
``PipelineAgent`` (routing and compute) or to the DiLoCo ``ShardReducer``
(ReduceShard). A peer's malformed message is refused with INVALID_ARGUMENT and
changes nothing; a call that arrives before the node holds a stage gets
UNAVAILABLE so the sender treats it like an unreachable hop.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

import grpc

from lowband.node.pipeline.transport import channel_options
from lowband.node.pipeline.wire import WireFrame, WireServer, WireUnavailable
from lowband.protocols import node_pb2, node_pb2_grpc, tensor_pb2
from lowband.protocols.chunking import chunk_tensor, reassemble_async
from lowband.protocols.codec import encode
from lowband.protocols.errors import ValidationError, abort_invalid
from lowband.protocols.hostile import HostileInputInterceptor
from lowband.protocols.peer_guard import BAD_INPUT_LOG, GuardPolicy, PeerGuard, peer_host
from lowband.protocols.rpc import TokenAuthInterceptor
from lowband.protocols.state_client import StateSnapshot
from lowband.protocols.state_client import fetch_state as fetch_state  # re-exported: its home was here
from lowband.protocols.tls import TlsConfig, add_port, peer_name

if TYPE_CHECKING:
    from lowband.node.pipeline.agent import PipelineAgent

logger = logging.getLogger(__name__)

MAX_ACTIVATION_BYTES = 512 * 1024 * 1024   # hard cap on one reassembled tensor


class ShardReducerLike(Protocol):
    def handle(self, request_iterator: AsyncIterator[node_pb2.ShardChunk],
               context: grpc.aio.ServicerContext) -> AsyncIterator[node_pb2.ShardChunk]: ...


StateProvider = Callable[[int, list[str]], Awaitable[StateSnapshot]]


def hop_sender(header: node_pb2.MicrobatchHeader, backward: bool) -> str:
    """The node a hop comes from: the previous one on the path (forward) or the next one (backward); ''
    when the header names none (the agent refuses such a header anyway)."""
    hop = header.hop + 1 if backward else header.hop - 1
    return header.node_ids[hop] if 0 <= hop < len(header.node_ids) else ""


def sender_refusal(header: node_pb2.MicrobatchHeader, backward: bool, peer: str | None) -> str:
    """Why a TLS peer named ``peer`` may not send this hop (it is not the path's node before us); '' when
    it may, or without TLS (``peer`` None: nothing to check against)."""
    if peer is None:
        return ""
    sender = hop_sender(header, backward)
    if peer == sender:
        return ""
    return f"the sender's certificate names {peer!r}, but the path's {'next' if backward else 'previous'} " \
           f"node is {sender!r}"


async def receive_microbatch(request_iterator: AsyncIterator[node_pb2.MicrobatchChunk], max_bytes: int
                             ) -> tuple[node_pb2.MicrobatchHeader, tensor_pb2.Tensor, int]:
    """Header, reassembled Tensor message and bytes received of one microbatch stream."""
    header: node_pb2.MicrobatchHeader | None = None
    received = 0

    async def chunks() -> AsyncIterator[tensor_pb2.TensorChunk]:
        nonlocal header, received
        async for message in request_iterator:
            if header is None:
                if not message.HasField("header"):
                    raise ValidationError("the first message of a microbatch stream must carry its header")
                header = message.header
            received += len(message.chunk.data)
            yield message.chunk

    tensor = await reassemble_async(chunks(), max_bytes)
    if header is None:
        raise ValidationError("empty microbatch stream")
    return header, tensor, received


class NodeServicer(node_pb2_grpc.NodeServicer):
    """Node RPCs; ``agent`` is attached once the node holds a stage."""

    def __init__(self, node_id: str = "", *, max_tensor_bytes: int = MAX_ACTIVATION_BYTES) -> None:
        self.node_id = node_id
        self.stage = -1
        self.agent: PipelineAgent | None = None
        self.shard_reducer: ShardReducerLike | None = None
        self.state_provider: StateProvider | None = None
        self.max_tensor_bytes = max_tensor_bytes
        self.bytes_received = 0
        self.state_bytes_sent = 0   # GetState replies: recovery traffic the links carry too
        self.state_chunk_bytes = 4 * 1024 * 1024
        self.wire_port = 0   # the activation wire's port, announced in Ping (0: none)
        self.outer_steps: Callable[[], int] = lambda: 0   # the DiLoCo state's outer steps, announced in Ping

    def attach(self, *, stage: int, agent: PipelineAgent, state_provider: StateProvider,
               shard_reducer: ShardReducerLike | None, outer_steps: Callable[[], int]) -> None:
        """Serve a stage: every collaborator at once, so no RPC sees a half-wired node."""
        self.stage = stage
        self.state_provider = state_provider
        self.shard_reducer = shard_reducer
        self.outer_steps = outer_steps
        self.agent = agent

    def detach(self) -> None:
        """Stop serving the stage (the node is about to build another): RPCs answer 'no stage' meanwhile."""
        self.agent = None
        self.shard_reducer = None
        self.outer_steps = lambda: 0

    def wire_frame(self, frame: WireFrame) -> None:
        """A microbatch that came on the activation wire (node/pipeline/wire.py): the same checks as by gRPC."""
        if self.agent is None:
            raise WireUnavailable("node holds no stage yet")
        self.bytes_received += frame.meta.ByteSize() + len(frame.payload)   # as the sender counts it
        refused = sender_refusal(frame.header, frame.backward, frame.peer)
        if refused:
            raise ValidationError(refused)
        self.agent.accept(frame.header, frame.meta, backward=frame.backward, payload=frame.payload,
                          decoded=frame.tensor)

    async def _require_agent(self, context: grpc.aio.ServicerContext) -> PipelineAgent:
        if self.agent is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "node holds no stage yet")
        assert self.agent is not None
        return self.agent

    async def _microbatch(self, request_iterator: AsyncIterator[node_pb2.MicrobatchChunk],
                          context: grpc.aio.ServicerContext, backward: bool) -> node_pb2.NodeAck:
        agent = await self._require_agent(context)
        try:
            header, tensor, received = await receive_microbatch(request_iterator, self.max_tensor_bytes)
            self.bytes_received += received
            refused = sender_refusal(header, backward, peer_name(context))
            if refused:
                BAD_INPUT_LOG.warning(peer_host(context.peer() or ""), "%s of microbatch %d refused: %s",
                                      "backward" if backward else "forward", header.microbatch, refused)
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, refused)
            agent.accept(header, tensor, backward=backward)
        except ValidationError as exc:
            await abort_invalid(context, exc)
        return node_pb2.NodeAck(ok=True)

    async def Forward(self, request_iterator: AsyncIterator[node_pb2.MicrobatchChunk],
                      context: grpc.aio.ServicerContext) -> node_pb2.NodeAck:
        return await self._microbatch(request_iterator, context, backward=False)

    async def Backward(self, request_iterator: AsyncIterator[node_pb2.MicrobatchChunk],
                       context: grpc.aio.ServicerContext) -> node_pb2.NodeAck:
        return await self._microbatch(request_iterator, context, backward=True)

    async def Abandon(self, request: node_pb2.AbandonRequest,
                      context: grpc.aio.ServicerContext) -> node_pb2.NodeAck:
        agent = await self._require_agent(context)
        self.bytes_received += request.ByteSize()
        try:
            changed = await agent.on_abandon(request)
        except ValidationError as exc:
            await abort_invalid(context, exc)
        return node_pb2.NodeAck(ok=True, message="abandoned" if changed else "nothing to abandon")

    async def IterationStatus(self, request: node_pb2.IterationStatusRequest,
                              context: grpc.aio.ServicerContext) -> node_pb2.IterationStatusReply:
        agent = await self._require_agent(context)
        self.bytes_received += request.ByteSize()
        try:
            return agent.iteration_status(request)
        except ValidationError as exc:
            await abort_invalid(context, exc)

    async def ReduceShard(self, request_iterator: AsyncIterator[node_pb2.ShardChunk],
                          context: grpc.aio.ServicerContext) -> AsyncIterator[node_pb2.ShardChunk]:
        if self.shard_reducer is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this node does not average")
        assert self.shard_reducer is not None
        async for reply in self.shard_reducer.handle(request_iterator, context):
            yield reply

    async def GetState(self, request: node_pb2.StateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[node_pb2.StateChunk]:
        if self.state_provider is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "node holds no stage yet")
        assert self.state_provider is not None
        parts = list(request.parts) or ["local"]
        if request.stage != self.stage:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"node holds stage {self.stage}, not {request.stage}")
        try:
            snapshot = await self.state_provider(request.stage, parts)
        except ValidationError as exc:
            await abort_invalid(context, exc)
        for part, tensors in snapshot.parts.items():
            for name, tensor in tensors.items():
                msg = encode(tensor.detach().float().contiguous(), "fp32", compress=False)
                for chunk in chunk_tensor(msg, chunk_bytes=self.state_chunk_bytes):
                    reply = node_pb2.StateChunk(part=part, name=name, chunk=chunk,
                                                inner_step=snapshot.inner_step, outer_step=snapshot.outer_step,
                                                grad_norm=snapshot.grad_norm)
                    self.state_bytes_sent += reply.ByteSize()
                    yield reply

    async def Ping(self, request: node_pb2.PingRequest, context: grpc.aio.ServicerContext) -> node_pb2.PingReply:
        self.bytes_received += request.ByteSize()
        return node_pb2.PingReply(sent_at=request.sent_at, node_id=self.node_id, stage=self.stage,
                                  wire_port=self.wire_port, outer_steps=self.outer_steps())


async def start_server(servicer: NodeServicer, listen: str, token: str, *,
                       bad_input: GuardPolicy | None = None, tls: TlsConfig | None = None) -> tuple[grpc.aio.Server, int]:
    """Start the node's gRPC server (token-checked; malformed messages refused and their senders cooled
    down as ``bad_input`` says: protocols/hostile.py; mutual TLS with ``tls``) on ``listen``; returns it
    and the bound port."""
    interceptors = [HostileInputInterceptor(bad_input), TokenAuthInterceptor(token)]
    server = grpc.aio.server(interceptors=interceptors, options=channel_options())
    node_pb2_grpc.add_NodeServicer_to_server(servicer, server)
    port = add_port(server, listen, tls)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    return server, port


async def start_wire(servicer: NodeServicer, host: str, token: str, port: int = 0, *,
                     bad_input: GuardPolicy | None = None, tls: TlsConfig | None = None) -> WireServer:
    """Start the node's activation wire on ``host`` and announce its port in the servicer's Pings;
    ``bad_input``: when a peer sending malformed frames is cooled down (None: the defaults); ``tls``:
    mutual TLS, each frame's sender checked against the certificate."""
    wire = WireServer(servicer.wire_frame, token, max_payload_bytes=servicer.max_tensor_bytes,
                      guard=PeerGuard(bad_input), tls=tls)
    servicer.wire_port = await wire.start(host.strip("[]") or "127.0.0.1", port)
    return wire
