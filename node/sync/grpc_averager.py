"""Peer-to-peer averaging of a flat pseudo-gradient over the Node service's ReduceShard RPC.

Reduce-scatter and all-gather in one bidirectional call per (caller, shard): the
round's participants come as an ordered list (from the coordinator); the flat
fragment is cut into ``len(peers)`` contiguous shards (``averaging.shard_bounds``)
and participant j owns shard j. Every participant streams its codec-encoded part
of shard j to participant j and reads the averaged shard back on the same stream;
its own shard goes straight into its local ``ShardReducer``.

Failure is data, never a hang:
- an owner averages the parts that arrived within ``timeout_s`` of the first one
  (a dead or slow participant just does not count), then answers everybody,
  late callers included, from the same encoded reply, so all replicas apply
  identical numbers;
- a part that is malformed, has the wrong size or holds NaN/inf is refused with
  INVALID_ARGUMENT (ValidationError) and dropped; norm outliers are dropped when
  ``reject_norm_ratio > 0``, and with ``diloco.robust`` (on by default) every part is
  norm-clipped and, from 3 parts, averaged by a trimmed mean (``robust_mean``): the
  owner keeps the running median of its shard's past norms, so one broken or hostile
  replica cannot move θ_global further than an honest one would;
- a part is accepted only from the round's participants, under their own identity:
  the node learns the round's roster from its own JoinSyncRound reply
  (``expect_round``), never from the caller's header, and refuses anybody else with
  PERMISSION_DENIED (``require_roster``, which the daemon's backend sets);
- a caller whose owner is dead or refuses loses that shard: ``allreduce_mean``
  returns its own values there and marks the shard in ``stats.valid``, and
  ``StreamingDiLoCo.finish_sync(job, avg, stats.valid)`` leaves those elements
  untouched. Every live caller of a dead owner loses the same shard, so θ_global
  stays identical. (Known gap: an owner dying *while* answering may have answered
  only some callers; those replicas then differ on that shard until one fetches
  state from another.)

Bytes are counted as serialized protobuf messages (``ByteSize``) of what each side
sends: requests by callers (``stats.bytes_sent``), replies by owners
(``ShardReducer.bytes_sent``); HTTP/2 framing is not included.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import grpc
import torch

from lowband.node.sync.diloco import SyncJob
from lowband.node.sync.error_feedback import ErrorFeedback
from lowband.node.sync.robust_mean import MeanResult, NormHistory, lower_median, robust_mean, shard_bounds
from lowband.protocols import node_pb2, node_pb2_grpc, tensor_pb2
from lowband.protocols.chunking import DEFAULT_CHUNK_BYTES, ChunkAssembler, iter_chunks
from lowband.protocols.codec import CODECS, DEFAULT_MAX_NUMEL, decode, encode
from lowband.protocols.config import DilocoSection
from lowband.protocols.errors import ValidationError
from lowband.protocols.peer_guard import BAD_INPUT_LOG, peer_host
from lowband.protocols.rpc import grpc_options, token_metadata
from lowband.protocols.sparse import SPARSE_CODEC, SparseParams, SparseSelection, params_of, resparsify
from lowband.protocols.sparse_codec import decode_any, decode_sparse, encode_sparse
from lowband.protocols.tls import check_claimed_id, open_channel

logger = logging.getLogger(__name__)

MAX_SHARDS = 4096                  # participants per round; far above any real stage group
MAX_OPEN_ROUNDS = 256              # shard rounds a reducer holds at once (memory bound)
MAX_RECORDED_PEERS = 256           # peers whose rejections a reducer counts one by one (memory bound)
# a part this far above the reference is recorded as a rejected outlier; clipping a part that is
# merely larger than the others (the larger of two honest parts) is routine and not recorded
OUTLIER_MULTIPLE = 3.0
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
              grpc.StatusCode.CANCELLED)


# ---------------------------------------------------------------------------
# server side


@dataclass(slots=True)
class _Round:
    key: tuple[int, int, int, int]          # (round_id, stage, fragment, shard_index)
    num_shards: int
    total_numel: int
    shard_numel: int
    created: float
    codec: str | None = None
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    arrived: set[str] = field(default_factory=set)        # parts, abstentions and refused parts
    refused: dict[str, str] = field(default_factory=dict)  # sender -> why its part was not averaged
    done: asyncio.Event = field(default_factory=asyncio.Event)
    finalizing: bool = False
    result: torch.Tensor | None = None                    # exactly what the reply decodes to
    result_msg: tensor_pb2.Tensor | None = None
    contributors: int = 0
    finished: float = 0.0


@dataclass(frozen=True, slots=True)
class Rejection:
    """One peer's part this owner refused, clipped as an outlier, or saw oppose the round (for the records)."""

    round_id: int
    stage: int
    fragment: int
    peer: str
    why: str


@dataclass(slots=True)
class ShardResult:
    """The owner's answer for one shard (mean None: nobody valid contributed)."""

    mean: torch.Tensor | None
    contributors: int


class ShardReducer:
    """Owner side of ReduceShard: collects the parts of the shards this node owns.

    ``timeout_s`` is how long an owner waits for stragglers after a shard's first
    part arrived; callers use a longer call deadline (see ``allreduce_mean``).
    Results stay ``ttl_s`` for late callers, then are dropped.
    """

    def __init__(
        self,
        *,
        timeout_s: float = 10.0,
        reject_norm_ratio: float = 0.0,
        max_numel: int = DEFAULT_MAX_NUMEL,
        ttl_s: float | None = None,
        node_id: str = "",
        error_feedback: bool = False,
        sparse: SparseParams | None = None,
        robust: str = "off",
        clip_multiple: float = 1.0,
        require_roster: bool = False,
        identity_check: Callable[[grpc.aio.ServicerContext, str], str] | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if robust not in ("auto", "clip", "off"):
            raise ValueError(f"robust must be 'auto', 'clip' or 'off', got {robust!r}")
        if clip_multiple < 1:
            raise ValueError(f"clip_multiple must be >= 1, got {clip_multiple}")
        self.timeout_s = timeout_s
        self.reject_norm_ratio = reject_norm_ratio
        self.robust = robust
        self.clip_multiple = clip_multiple
        self.history = NormHistory()   # per (stage, fragment, num_shards, shard_index): past rounds' norms
        # who may send parts: round (round_id, stage, fragment) -> its ordered participants, as this node's
        # own JoinSyncRound answered (expect_round); with require_roster, a round nobody told us of takes no parts
        self.require_roster = require_roster
        self._rosters: OrderedDict[tuple[int, int, int], tuple[str, ...]] = OrderedDict()
        self._roster_known: dict[tuple[int, int, int], asyncio.Event] = {}
        # the TLS identity hook: why the caller may not speak as the claimed sender ('' when it may)
        self.identity_check = identity_check
        self.max_numel = max_numel
        self.ttl_s = ttl_s if ttl_s is not None else 4 * timeout_s + 30.0
        self.node_id = node_id
        # Error feedback: what quantization left out of this node's last part (per (stage, fragment))
        # and of its last reply (per owned (stage, fragment, shard)), added to the next one.
        # allreduce_mean uses `part_feedback`; replies use `reply_feedback`.
        self.error_feedback = error_feedback
        self.part_feedback = ErrorFeedback()
        self.reply_feedback = ErrorFeedback()
        # how a round of sparse parts is re-sparsified for the reply (protocols/sparse.py, reduce rule);
        # what that leaves out is carried in reply_feedback, whatever `error_feedback` says
        self.sparse = sparse or SparseParams()
        self._rounds: dict[tuple[int, int, int, int], _Round] = {}
        self.bytes_sent = 0                  # replies (what this owner put on the wire)
        self.bytes_received = 0
        self.rejected: deque[tuple[tuple[int, int, int, int], str, str]] = deque(maxlen=1024)  # (key, sender, why)
        self.rejected_total = 0                       # every refused, clipped or opposing part (for metrics)
        self.rejected_by_peer: dict[str, int] = {}    # peer -> its parts counted in rejected_total
        self.last_rejection: Rejection | None = None

    @classmethod
    def from_config(cls, cfg: DilocoSection, node_id: str = "", *, require_roster: bool = False) -> ShardReducer:
        """A reducer with the run's [diloco] peer timeout, outlier rule and robust aggregation (the daemon's
        backend also requires the round roster; a harness that runs no coordinator cannot)."""
        return cls(timeout_s=cfg.peer_timeout_s, reject_norm_ratio=cfg.reject_norm_ratio, node_id=node_id,
                   error_feedback=cfg.error_feedback, sparse=params_of(cfg), robust=cfg.robust,
                   clip_multiple=cfg.clip_multiple, require_roster=require_roster, identity_check=check_claimed_id)

    # -- who may send -----------------------------------------------------------

    def expect_round(self, round_id: int, stage: int, fragment: int, participants: Sequence[str]) -> None:
        """The coordinator formed this round with these participants (ordered: shard j is participant j's)."""
        key = (round_id, stage, fragment)
        self._rosters[key] = tuple(participants)
        self._rosters.move_to_end(key)
        while len(self._rosters) > MAX_OPEN_ROUNDS:
            old, _ = self._rosters.popitem(last=False)
            self._roster_known.pop(old, None)
        event = self._roster_known.pop(key, None)
        if event is not None:
            event.set()

    async def _roster(self, header: node_pb2.ShardHeader) -> tuple[str, ...] | None:
        """The round's participants; waits up to ``timeout_s`` for this node's own poll to learn them."""
        key = (header.round_id, header.stage, header.fragment)
        roster = self._rosters.get(key)
        if roster is None:
            if len(self._roster_known) >= MAX_OPEN_ROUNDS and key not in self._roster_known:
                return None
            event = self._roster_known.setdefault(key, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), self.timeout_s)
            except TimeoutError:
                self._roster_known.pop(key, None)
                return None
            roster = self._rosters.get(key)
        return roster

    def _not_participant(self, header: node_pb2.ShardHeader, roster: tuple[str, ...] | None) -> str:
        """Why `header`'s sender may not send this part ('' when it may)."""
        if roster is None:
            return (f"round {header.round_id} of stage {header.stage} fragment {header.fragment} is unknown to "
                    f"this node (its coordinator did not name it a participant)")
        if header.sender_id not in roster:
            return f"{header.sender_id!r} is not a participant of round {header.round_id}"
        if (header.num_shards != len(roster) or not 0 <= header.shard_index < len(roster)
                or roster[header.shard_index] != self.node_id):
            return (f"round {header.round_id} has {len(roster)} participants and this node owns shard "
                    f"{roster.index(self.node_id) if self.node_id in roster else 'none'}; the header says "
                    f"shard {header.shard_index} of {header.num_shards}")
        return ""

    def _record(self, rnd: _Round, sender: str, why: str) -> None:
        """Count one rejection of `sender`'s part (refused, clipped as an outlier, or opposing the round)."""
        self.rejected.append((rnd.key, sender, why))
        self.rejected_total += 1
        if sender in self.rejected_by_peer or len(self.rejected_by_peer) < MAX_RECORDED_PEERS:
            self.rejected_by_peer[sender] = self.rejected_by_peer.get(sender, 0) + 1
        self.last_rejection = Rejection(rnd.key[0], rnd.key[1], rnd.key[2], sender, why)

    # -- rounds ---------------------------------------------------------------

    def _gc(self, now: float) -> None:
        stale = [k for k, r in self._rounds.items()
                 if (r.done.is_set() and now - r.finished > self.ttl_s) or now - r.created > 2 * self.ttl_s]
        for key in stale:
            del self._rounds[key]

    def _round_for(self, header: node_pb2.ShardHeader) -> _Round:
        if not 1 <= header.num_shards <= MAX_SHARDS:
            raise ValidationError(f"num_shards {header.num_shards} out of range [1, {MAX_SHARDS}]")
        if not 0 <= header.shard_index < header.num_shards:
            raise ValidationError(f"shard_index {header.shard_index} out of range for {header.num_shards} shards")
        if header.total_numel > self.max_numel:
            raise ValidationError(f"fragment of {header.total_numel} elements exceeds the bound {self.max_numel}")
        if not header.sender_id:
            raise ValidationError("ShardHeader.sender_id is empty")
        key = (header.round_id, header.stage, header.fragment, header.shard_index)
        now = time.monotonic()
        self._gc(now)
        rnd = self._rounds.get(key)
        if rnd is None:
            if len(self._rounds) >= MAX_OPEN_ROUNDS:
                raise ValidationError(f"too many open averaging rounds ({MAX_OPEN_ROUNDS})")
            start, end = shard_bounds(header.total_numel, header.num_shards)[header.shard_index]
            rnd = _Round(key=key, num_shards=header.num_shards, total_numel=header.total_numel,
                         shard_numel=end - start, created=now)
            self._rounds[key] = rnd
        elif (rnd.num_shards, rnd.total_numel) != (header.num_shards, header.total_numel):
            raise ValidationError(
                f"round {key}: header says {header.num_shards} shards of a {header.total_numel}-element fragment, "
                f"the round has {rnd.num_shards} of {rnd.total_numel}")
        return rnd

    def _add(self, rnd: _Round, sender: str, part: torch.Tensor | None, codec: str | None) -> None:
        if sender in rnd.arrived:  # a retry racing its first attempt: the first one stands
            return
        rnd.arrived.add(sender)
        if part is not None and not rnd.done.is_set():
            rnd.parts[sender] = part
            if rnd.codec is None:
                rnd.codec = codec

    def _refuse(self, rnd: _Round, sender: str, why: str) -> None:
        rnd.arrived.add(sender)
        rnd.refused[sender] = why
        self._record(rnd, sender, why)

    async def _finalize(self, rnd: _Round) -> None:
        """Average what arrived (once), encode the reply, wake every waiter."""
        if rnd.finalizing:
            await rnd.done.wait()
            return
        rnd.finalizing = True
        senders = sorted(rnd.parts)              # deterministic order, so the fp32 sum is too
        parts = [rnd.parts[s] for s in senders]
        codec = rnd.codec or "fp32"
        ef_key = rnd.key[1:]                     # (stage, fragment, shard_index)
        history_key = (rnd.key[1], rnd.key[2], rnd.num_shards, rnd.key[3])   # one shard's coordinates
        robust = self.robust != "off"
        reference = self.history.reference(history_key) if robust else None
        found: list[MeanResult] = []

        def reduce() -> tuple[torch.Tensor | None, tensor_pb2.Tensor | None, int, list[int]]:
            # sparse parts are only clipped, and only outliers: a trimmed mean of mostly-zero parts would
            # drop every entry that one replica selected alone, and clipping an honest part would lose
            # what its sender's error feedback believes was sent
            sparse = codec == SPARSE_CODEC
            multiple = max(self.clip_multiple, OUTLIER_MULTIPLE) if sparse else self.clip_multiple
            res = robust_mean(parts, reject_norm_ratio=self.reject_norm_ratio,
                              clip_multiple=multiple if robust else 0.0, reference=reference,
                              trim=self.robust == "auto" and not sparse)
            found.append(res)
            if res.mean is None:
                return None, None, 0, res.rejected_norm
            if codec == SPARSE_CODEC:
                residual = self.reply_feedback.residual(ef_key)
                if residual is not None and residual.shape != res.mean.shape:
                    residual = None   # the round's shard layout changed: that debt belongs to nothing now
                sel, _, new_residual = resparsify(res.mean, residual, self.sparse)
                msg = encode_sparse(sel)
                self.reply_feedback.set(ef_key, new_residual)
                return decode_sparse(msg), msg, res.contributors, res.rejected_norm
            use_ef = self.error_feedback and codec != "fp32"   # fp32 loses nothing to feed back
            mean = self.reply_feedback.compensate(ef_key, res.mean) if use_ef else res.mean
            msg = encode(mean, codec)
            decoded = decode(msg)                # the owner applies exactly what its callers decode
            if use_ef:
                self.reply_feedback.store(ef_key, mean, decoded)
            return decoded, msg, res.contributors, res.rejected_norm

        try:
            mean, msg, contributors, outliers = await asyncio.to_thread(reduce)
        except Exception:  # never leave waiters hanging on a bug
            logger.exception("round %s: reduction failed", rnd.key)
            mean, msg, contributors, outliers = None, None, 0, []
        for i in outliers:
            self._refuse(rnd, senders[i], "update norm above reject_norm_ratio x the round's median")
            logger.warning("round %s: dropped %s's part as a norm outlier", rnd.key, senders[i])
        if found and robust and mean is not None:
            self._note_robust(rnd, senders, parts, found[0], reference)
        rnd.result, rnd.result_msg, rnd.contributors = mean, msg, contributors
        rnd.parts.clear()
        rnd.finished = time.monotonic()
        rnd.done.set()
        logger.debug("round %s reduced: %d contributors of %d", rnd.key, contributors, rnd.num_shards)

    def _note_robust(self, rnd: _Round, senders: list[str], parts: list[torch.Tensor], res: MeanResult,
                     reference: float | None) -> None:
        """Carry the round's norm into the running median; record the parts that looked hostile.

        A part counts as rejected when its norm exceeded ``OUTLIER_MULTIPLE`` x the reference (the
        running median, or the round's lower median while warming up: with 2 parts, the smaller norm),
        or, from 3 parts, when it points against the round's trimmed mean. Clipping a part that is only
        somewhat larger than the others is routine and not recorded.
        """
        self.history.record((rnd.key[1], rnd.key[2], rnd.num_shards, rnd.key[3]), res.reference)
        assert res.mean is not None
        accepted_norms = [res.norms[i] for i in res.accepted]
        ref = reference if reference is not None and reference > 0 else lower_median(accepted_norms)
        flat_mean = res.mean.reshape(-1)
        mean_norm = float(torch.linalg.vector_norm(flat_mean))
        for i in res.accepted:
            norm = res.norms[i]
            if norm > OUTLIER_MULTIPLE * ref:
                why = (f"norm {norm:.3g} above {OUTLIER_MULTIPLE:g} x the reference {ref:.3g}: "
                       f"clipped to {res.clip_bound:.3g}")
            elif res.trimmed and norm > 0 and mean_norm > 0:
                cosine = float(torch.dot(parts[i].reshape(-1), flat_mean)) / (norm * mean_norm)
                if cosine >= 0:
                    continue
                why = f"update points against the round's trimmed mean (cosine {cosine:.2f})"
            else:
                continue
            self._record(rnd, senders[i], why)
            logger.warning("round %s: %s's part: %s", rnd.key, senders[i], why)

    async def _wait(self, rnd: _Round) -> None:
        if not rnd.done.is_set() and len(rnd.arrived) >= rnd.num_shards:
            await self._finalize(rnd)
        remaining = rnd.created + self.timeout_s - time.monotonic()
        if not rnd.done.is_set():
            try:
                await asyncio.wait_for(rnd.done.wait(), max(0.0, remaining))
            except TimeoutError:
                await self._finalize(rnd)

    # -- local part (the owner's own) --------------------------------------------

    async def reduce_local(
        self, header: node_pb2.ShardHeader, part: torch.Tensor | None, codec: str
    ) -> ShardResult:
        """Contribute the owner's own part of its shard (None: abstain) and wait for the mean.

        The part goes through the codec like a remote part would, so the owner
        gets no precision advantage and every part is treated alike.
        """
        rnd = self._round_for(header)
        if part is not None and not rnd.done.is_set():
            flat = part.detach().to(torch.float32).reshape(-1)
            if flat.numel() != rnd.shard_numel:
                raise ValueError(f"local part has {flat.numel()} elements, shard needs {rnd.shard_numel}")
            try:
                if codec == SPARSE_CODEC:   # the caller decoded it from its own wire message already
                    part = await asyncio.to_thread(lambda: decode_any(encode(flat, "fp32"), require_finite=True))
                else:
                    part = await asyncio.to_thread(lambda: decode(encode(flat, codec), require_finite=True))
            except ValidationError as exc:  # still wait for the mean: this replica must apply it too
                logger.warning("round %s: own part not averaged: %s", rnd.key, exc)
                part = None
        self._add(rnd, header.sender_id, part, codec)
        await self._wait(rnd)
        return ShardResult(rnd.result, rnd.contributors)

    # -- remote parts -------------------------------------------------------------

    async def handle(
        self, request_iterator: AsyncIterator[node_pb2.ShardChunk], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[node_pb2.ShardChunk]:
        """ReduceShard: read one part (or an abstention), answer with the averaged shard.

        An async generator: the servicer does ``async for reply in reducer.handle(...)``.
        """
        stream = request_iterator.__aiter__()
        try:
            first = await asyncio.wait_for(stream.__anext__(), self.timeout_s)
        except (StopAsyncIteration, TimeoutError):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "ReduceShard: no header within the timeout")
            return
        self.bytes_received += first.ByteSize()
        if not first.HasField("header"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "ReduceShard: first message carries no header")
            return
        header = first.header
        denied = self.identity_check(context, header.sender_id) if self.identity_check is not None else ""
        if not denied and self.require_roster:
            denied = self._not_participant(header, await self._roster(header))
        if denied:
            host = peer_host(context.peer() or "")
            BAD_INPUT_LOG.warning(host, "ReduceShard from %r (%s) refused: %s", header.sender_id, host, denied)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"permission denied: {denied}")
            return
        try:
            rnd = self._round_for(header)
        except ValidationError as exc:
            host = peer_host(context.peer() or "")   # one line per peer and interval: a flood must not fill the log
            BAD_INPUT_LOG.warning(host, "ReduceShard from %r (%s) refused: %s", header.sender_id, host, exc)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid argument: {exc}")
            return
        sender = header.sender_id
        if sender in rnd.arrived:
            pass  # a retry after a broken call: answer it, the first attempt's part (if any) stands
        elif header.abstain:
            self._add(rnd, sender, None, None)
        else:
            try:
                part, codec = await self._read_part(first, stream, rnd)
                self._add(rnd, sender, part, codec)
            except (ValidationError, TimeoutError) as exc:
                # drop the part but still answer: the sender must apply the same mean as everybody
                why = str(exc) or "part not received within the timeout"
                if sender not in rnd.arrived:
                    self._refuse(rnd, sender, why)
                BAD_INPUT_LOG.warning(peer_host(context.peer() or ""), "round %s: refused part from %r: %s",
                                      rnd.key, sender, why)   # rate-limited per peer host
        await self._wait(rnd)
        reply_header = node_pb2.ShardHeader(
            round_id=header.round_id, stage=header.stage, fragment=header.fragment,
            shard_index=header.shard_index, num_shards=rnd.num_shards, sender_id=self.node_id,
            outer_step=header.outer_step, total_numel=rnd.total_numel)
        refused = rnd.refused.get(sender, "")
        if rnd.result_msg is None:
            reply = node_pb2.ShardChunk(header=reply_header, contributors=0, refused=refused)
            self.bytes_sent += reply.ByteSize()
            yield reply
            return
        for i, chunk in enumerate(iter_chunks(rnd.result_msg, DEFAULT_CHUNK_BYTES)):
            first_reply = i == 0
            reply = node_pb2.ShardChunk(header=reply_header if first_reply else None, chunk=chunk,
                                        contributors=rnd.contributors, refused=refused if first_reply else "")
            self.bytes_sent += reply.ByteSize()
            yield reply

    async def _read_part(
        self, first: node_pb2.ShardChunk, stream: AsyncIterator[node_pb2.ShardChunk], rnd: _Round
    ) -> tuple[torch.Tensor, str]:
        # fp32 plus generous framing bounds any honest codec's message for this shard
        assembler = ChunkAssembler(max_bytes=8 * rnd.shard_numel + 65536)
        deadline = time.monotonic() + self.timeout_s
        message = first
        while not assembler.add(message.chunk):
            try:
                message = await asyncio.wait_for(stream.__anext__(), max(0.0, deadline - time.monotonic()))
            except StopAsyncIteration as exc:
                raise ValidationError("stream ended before the part was complete") from exc
            self.bytes_received += message.ByteSize()
        msg = assembler.finish()
        if msg.codec not in CODECS and msg.codec != SPARSE_CODEC:
            raise ValidationError(f"unknown codec {msg.codec!r}")
        part = await asyncio.to_thread(
            decode_any, msg, max_numel=self.max_numel, expected_shape=(rnd.shard_numel,), require_finite=True)
        return part.to(torch.float32), msg.codec


# ---------------------------------------------------------------------------
# client side


class ChannelPool:
    """One grpc.aio channel per peer address, reused across rounds."""

    def __init__(self, token: str = "") -> None:
        self.token = token
        self._channels: dict[str, grpc.aio.Channel] = {}

    def stub(self, address: str) -> node_pb2_grpc.NodeStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = open_channel(address, grpc_options())   # mutual TLS when the process has it (protocols/tls.py)
            self._channels[address] = channel
        return node_pb2_grpc.NodeStub(channel)

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()


@dataclass(slots=True)
class AllReduceStats:
    """What one participant saw in one round (for logs, metrics and the benchmark)."""

    bytes_sent: int = 0                     # requests this participant sent (replies count at owners)
    bytes_received: int = 0
    lost_shards: list[int] = field(default_factory=list)
    contributors: list[int] = field(default_factory=list)   # per shard; 0 where lost
    errors: dict[int, str] = field(default_factory=dict)
    refused: dict[int, str] = field(default_factory=dict)   # shard -> why the owner dropped our part
    seconds: float = 0.0
    valid: torch.Tensor | None = None       # flat bool: False where the shard was lost


async def allreduce_mean(
    peers: Sequence[str],
    my_index: int,
    flat_tensor: torch.Tensor,
    *,
    round_id: int,
    codec: str,
    timeout_s: float,
    reducer: ShardReducer,
    channels: ChannelPool,
    stage: int = 0,
    fragment: int = 0,
    outer_step: int = 0,
    sender_id: str | None = None,
    contribute: bool = True,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    max_attempts: int = 3,
    encoder: Callable[[torch.Tensor, str], tensor_pb2.Tensor] = encode,
    sparse: SparseSelection | None = None,
    sparse_encoder: Callable[[SparseSelection, int, int], tensor_pb2.Tensor] = encode_sparse,
    participants: Sequence[str] | None = None,
) -> tuple[torch.Tensor, AllReduceStats]:
    """Average `flat_tensor` with the other participants; returns (mean fp32, stats).

    `peers` is the round's ordered participant addresses (same list on every
    participant); `peers[my_index]` is this node, whose shard is reduced by
    `reducer`. `timeout_s` is the per-peer budget: an owner waits that long for
    stragglers, and each call's deadline is twice it (wait, then reduce and reply).
    With ``contribute=False`` this node sends no values but still gets the mean;
    a non-finite `flat_tensor` is never sent (it abstains instead). `encoder`
    turns a shard into its wire message. With ``reducer.error_feedback`` the
    quantization error of this node's part is carried into its next part of the
    same fragment. Lost shards hold this node's own values and are False in
    ``stats.valid``. Never raises for a peer's failure.

    Codec "sparse": `flat_tensor` is ``sparse.dense()`` (``job.sparse``, the replica's selection);
    each shard's entries go out as ``sparse_encoder(sparse, start, end)`` and every owner answers
    with its re-sparsified mean (``ShardReducer``); error feedback is the caller's (per fragment,
    in ``StreamingDiLoCo``), not the reducer's.

    `participants`: the round's node ids in the order of `peers`, as the coordinator named them;
    given, `reducer` accepts parts of this round from them only (``ShardReducer.expect_round``).
    """
    n = len(peers)
    if not 0 <= my_index < n:
        raise ValueError(f"my_index {my_index} out of range for {n} peers")
    if participants is not None:
        if len(participants) != n:
            raise ValueError(f"{len(participants)} participant ids for {n} peers")
        reducer.expect_round(round_id, stage, fragment, participants)
    if codec not in CODECS and codec != SPARSE_CODEC:
        raise ValueError(f"unknown codec {codec!r}")
    sender = sender_id or peers[my_index]
    started = time.monotonic()
    flat = flat_tensor.detach().to(torch.float32).reshape(-1)
    if contribute and not bool(torch.isfinite(flat).all()):
        logger.warning("round %d fragment %d: non-finite pseudo-gradient, abstaining", round_id, fragment)
        contribute = False
    own = flat
    bounds = shard_bounds(flat.numel(), n)
    ef_key = (stage, fragment)
    use_ef = reducer.error_feedback and contribute and codec not in ("fp32", SPARSE_CODEC)
    feedback = reducer.part_feedback
    old_residual = feedback.residual(ef_key) if use_ef else None
    encoded: list[tensor_pb2.Tensor] = []
    if codec == SPARSE_CODEC and contribute:
        if sparse is None or sparse.numel != flat.numel():
            raise ValueError("codec 'sparse' needs the selection the pseudo-gradient came from (job.sparse)")
        selection = sparse

        def encode_sparse_all() -> tuple[list[tensor_pb2.Tensor], torch.Tensor]:
            msgs = [sparse_encoder(selection, s, e) for s, e in bounds]
            # the own shard goes to the local reducer exactly as a remote owner would decode it
            return msgs, torch.cat([decode_sparse(m).reshape(-1) for m in msgs]) if msgs else flat

        encoded, flat_to_send = await asyncio.to_thread(encode_sparse_all)
    elif use_ef:
        # error feedback: send Q(Δ + e), keep e' = (Δ + e) - Q(Δ + e) for this fragment's next round;
        # the own shard goes to the local reducer already quantized, so it is charged the same error
        flat = feedback.compensate(ef_key, flat)

        def encode_all() -> tuple[list[tensor_pb2.Tensor], torch.Tensor]:
            msgs = [encoder(flat[s:e].clone(), codec) for s, e in bounds]
            return msgs, torch.cat([decode(m).reshape(-1).float() for m in msgs]) if msgs else flat

        encoded, sent_values = await asyncio.to_thread(encode_all)
        feedback.store(ef_key, flat, sent_values)
        flat_to_send = sent_values
    else:
        flat_to_send = flat
    stats = AllReduceStats(contributors=[0] * n)
    metadata = token_metadata(channels.token) if channels.token else None

    def header(j: int) -> node_pb2.ShardHeader:
        return node_pb2.ShardHeader(round_id=round_id, stage=stage, fragment=fragment, shard_index=j,
                                    num_shards=n, sender_id=sender, outer_step=outer_step,
                                    abstain=not contribute, total_numel=flat.numel())

    async def remote(j: int) -> torch.Tensor | None:
        start, end = bounds[j]
        if contribute:
            msg = encoded[j] if encoded else await asyncio.to_thread(encoder, flat[start:end].clone(), codec)
            requests = [node_pb2.ShardChunk(header=header(j) if i == 0 else None, chunk=chunk)
                        for i, chunk in enumerate(iter_chunks(msg, chunk_bytes))]
        else:
            requests = [node_pb2.ShardChunk(header=header(j))]
        deadline = time.monotonic() + 2 * timeout_s
        for attempt in range(max_attempts):
            stats.bytes_sent += sum(r.ByteSize() for r in requests)
            try:
                return await exchange(j, requests, deadline)
            except grpc.aio.AioRpcError as exc:
                # a transient break is retried: the owner answers a repeated sender without
                # counting it twice, so a retry cannot skew the mean
                if exc.code() not in _RETRYABLE or attempt + 1 == max_attempts:
                    raise
                backoff = 0.05 * 2**attempt
                if time.monotonic() + backoff >= deadline:
                    raise
                logger.info("round %d shard %d: retrying %s after %s", round_id, j, peers[j], exc.code().name)
                await asyncio.sleep(backoff)
        return None

    async def exchange(j: int, requests: list[node_pb2.ShardChunk], deadline: float) -> torch.Tensor | None:
        start, end = bounds[j]
        remaining = max(0.001, deadline - time.monotonic())
        call = channels.stub(peers[j]).ReduceShard(iter(requests), timeout=remaining, metadata=metadata)
        assembler = ChunkAssembler(max_bytes=8 * (end - start) + 65536)
        async for reply in call:
            stats.bytes_received += reply.ByteSize()
            if reply.refused:
                stats.refused[j] = reply.refused
                logger.warning("round %d shard %d: owner %s dropped our part: %s", round_id, j, peers[j],
                               reply.refused)
            stats.contributors[j] = reply.contributors
            if reply.contributors == 0:
                return None
            if assembler.add(reply.chunk):
                break
        result_msg = assembler.finish()
        out = await asyncio.to_thread(decode_any, result_msg, expected_shape=(end - start,), require_finite=True)
        return out.to(torch.float32)

    async def local(j: int) -> torch.Tensor | None:
        start, end = bounds[j]
        res = await reducer.reduce_local(header(j), flat_to_send[start:end] if contribute else None, codec)
        stats.contributors[j] = res.contributors
        return res.mean

    async def one(j: int) -> torch.Tensor | None:
        try:
            return await (local(j) if j == my_index else remote(j))
        except grpc.aio.AioRpcError as exc:
            stats.errors[j] = f"{exc.code().name}: {exc.details()}"
        except (ValidationError, TimeoutError, ValueError) as exc:
            stats.errors[j] = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # a peer's failure must never take the round down
            logger.exception("round %d shard %d: unexpected error", round_id, j)
            stats.errors[j] = f"{type(exc).__name__}: {exc}"
        return None

    results = await asyncio.gather(*(one(j) for j in range(n)))
    out = own.clone()
    valid = torch.ones(own.numel(), dtype=torch.bool)
    for j, res in enumerate(results):
        start, end = bounds[j]
        if res is None:
            if end > start:
                stats.lost_shards.append(j)
                valid[start:end] = False
                stats.contributors[j] = 0
                if use_ef:  # nothing of this shard was applied: its old debt stays as it was
                    feedback.restore(ef_key, start, end, old_residual)
            continue
        out[start:end] = res
    stats.valid = valid
    stats.seconds = time.monotonic() - started
    if stats.lost_shards:
        logger.warning("round %d stage %d fragment %d: lost shards %s (%s)", round_id, stage, fragment,
                       stats.lost_shards, stats.errors)
    return out, stats


async def average_job(
    job: SyncJob,
    peers: Sequence[str],
    my_index: int,
    *,
    round_id: int,
    cfg: DilocoSection,
    reducer: ShardReducer,
    channels: ChannelPool,
    stage: int,
    node_id: str,
    participants: Sequence[str] | None = None,
) -> tuple[torch.Tensor, AllReduceStats]:
    """``allreduce_mean`` for a ``StreamingDiLoCo`` job, with the run's [diloco] settings.

    The daemon starts this as a task after ``begin_sync`` and, ``cfg.overlap`` steps
    later, hands the result to ``diloco.finish_sync(job, mean, stats.valid)`` from its
    training thread.
    """
    return await allreduce_mean(
        peers, my_index, job.delta, round_id=round_id, codec=cfg.codec, timeout_s=cfg.peer_timeout_s,
        reducer=reducer, channels=channels, stage=stage, fragment=job.fragment, outer_step=job.outer_step,
        sender_id=node_id, contribute=job.finite, sparse=job.sparse, participants=participants)
