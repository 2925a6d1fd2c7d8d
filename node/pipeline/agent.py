"""The pipeline agent: routes microbatches along their paths and drives origins' iterations.

Push model: an origin embeds a microbatch and pushes it (Forward
RPC) to the node at hop 1; each node computes and pushes to the next hop; the
last hop is the origin again, which applies head and loss and starts the
backward (Backward RPC) along the path in reverse; the origin's embedding
backward completes the microbatch. Labels never leave the origin.

An RPC is acknowledged as soon as its tensor arrived and validated; the compute
and the push onward run as a task. When a push fails (unreachable or slow next
hop, refusal) the node abandons the microbatch, tells its origin and reports
the hop to the coordinator; the origin tells every node of the path, so nobody
waits for it, and its iteration completes with the rest.

Data-parallel mode (``model.stages = 1``): every path is just its origin, which
holds the whole model, so an iteration is one call into the stage runtime
(``StageRuntime.train_local``) and nothing crosses the network but DiLoCo's
outer sync.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

import grpc
import torch

from lowband.node.pipeline.payload import lift_received
from lowband.node.pipeline.runtime import MicrobatchKey, StageError, StageRuntime
from lowband.node.pipeline.transport import Transport
from lowband.protocols import coordinator_pb2, node_pb2, tensor_pb2
from lowband.protocols.codec import RAW_CODECS, decode
from lowband.protocols.errors import ValidationError
from lowband.protocols.subspace import SubspaceBasis

logger = logging.getLogger(__name__)

FailureCallback = Callable[[str, str], Awaitable[None]]
EventCallback = Callable[..., None]
KEPT_PLAN_EPOCHS = 16   # plans whose microbatch counts are kept, for iterations launched under them
# A stage node whose open iteration has made no progress for this long asks its origins whether they have
# finished it (IterationStatus): counting by plan can expect a microbatch that was routed elsewhere or
# given up upstream, and waiting for it would cost the iteration timeout.
ASK_ORIGINS_AFTER_S = 1.0


@dataclass(frozen=True, slots=True)
class PathSpec:
    """One microbatch's route: the stage and the node at each hop (origin first and last)."""

    microbatch: int
    stages: tuple[int, ...]
    node_ids: tuple[str, ...]


def local_path(path: PathSpec) -> bool:
    """A path that is just its origin (``model.stages = 1``, data-parallel mode): the origin holds the
    whole model and trains the microbatch itself."""
    return len(path.stages) == 1


@dataclass(slots=True)
class Schedule:
    """What a node needs from GetSchedule: its paths (origins), peers' addresses, visits per iteration."""

    epoch: int = 0
    paths: list[PathSpec] = field(default_factory=list)
    addresses: dict[str, str] = field(default_factory=dict)
    stages: dict[str, int] = field(default_factory=dict)
    visits: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_reply(cls, reply: coordinator_pb2.ScheduleReply) -> Schedule:
        return cls(
            epoch=reply.epoch,
            paths=[PathSpec(p.microbatch, tuple(p.stages), tuple(p.node_ids)) for p in reply.paths],
            addresses={p.node_id: p.address for p in reply.peers},
            stages={p.node_id: p.stage for p in reply.peers},
            visits=dict(reply.visits),
        )

    def counts(self, node_id: str, is_origin: bool) -> dict[str, int]:
        """Microbatches that pass through ``node_id`` per iteration, by origin (an origin: its own paths)."""
        return {node_id: len(self.paths)} if is_origin else dict(self.visits)

    def expected(self, is_origin: bool) -> int:
        """Microbatches that pass through this node per iteration (an origin: its own)."""
        return sum(self.counts("", is_origin).values())


def whole_model_path(origin: str, num_stages: int, schedule: Schedule) -> PathSpec | None:
    """Every stage once, in order (0, 1, ..., S-1, 0): the model a user gets, whatever the training
    paths skip or swap, so validation measures that model. Each stage is run by the node the origin's
    paths send it to most, else by its first replica in the plan; None when a stage has no node (the
    caller then evaluates along the training paths) or S is unknown."""
    if num_stages < 2:
        return None
    used: dict[int, Counter[str]] = defaultdict(Counter)
    for path in schedule.paths:
        for stage, node_id in zip(path.stages[1:-1], path.node_ids[1:-1], strict=True):
            used[stage][node_id] += 1
    node_ids = []
    for stage in range(1, num_stages):
        if used[stage]:
            node_ids.append(used[stage].most_common(1)[0][0])
            continue
        replicas = sorted(n for n, s in schedule.stages.items() if s == stage)
        if not replicas:
            return None
        node_ids.append(replicas[0])
    return PathSpec(-1, (0, *range(1, num_stages), 0), (origin, *node_ids, origin))


@dataclass(slots=True)
class _Pending:
    """An origin's microbatch in flight."""

    path: PathSpec
    targets: torch.Tensor
    future: asyncio.Future[float | None]
    evaluate: bool
    loss: float | None = None


@dataclass(slots=True)
class IterationResult:
    iteration: int
    losses: list[float]
    abandoned: int
    tokens: int
    seconds: float

    @property
    def loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else math.nan


class PipelineAgent:
    """Routing and compute glue between the servicer, the stage runtime and the transport."""

    def __init__(
        self,
        node_id: str,
        run_id: str,
        runtime: StageRuntime,
        transport: Transport,
        *,
        dim: int,
        max_seq_len: int,
        codec: str = "bf16",
        gradient_codec: str | None = None,
        subspace: SubspaceBasis | None = None,
        hop_timeout_s: float = 10.0,
        num_stages: int = 0,
        on_failure: FailureCallback | None = None,
        on_event: EventCallback | None = None,
        refresh_schedule: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.node_id = node_id
        self.run_id = run_id
        self.runtime = runtime
        self.transport = transport
        self.dim = dim
        self.max_seq_len = max_seq_len
        self.codec = codec                            # activations, forward
        self.gradient_codec = gradient_codec or codec  # their gradients, backward
        self.subspace = subspace   # a subspace model's anchors: what the subspace-* codecs leave out
        self.hop_timeout_s = hop_timeout_s
        self.num_stages = num_stages   # S: evaluation runs the whole model, stage by stage (0 = unknown)
        self.on_failure = on_failure
        self.on_event = on_event
        self.refresh_schedule = refresh_schedule
        self.schedule = Schedule()
        self.microbatches_done = 0
        self.microbatches_abandoned = 0
        self._pending: dict[MicrobatchKey, _Pending] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._eval_counter = 0
        self.catch_up_to = 0
        self._counts: dict[int, dict[str, int]] = {}   # plan epoch -> microbatches through here, by origin
        runtime.expected_fn = self._expected_for

    @property
    def stage(self) -> int:
        return self.runtime.stage

    @property
    def is_origin(self) -> bool:
        return self.runtime.stage == 0

    def set_schedule(self, schedule: Schedule) -> None:
        """Adopt a new schedule; the open iteration's expected count follows it.

        An origin gives up at once every microbatch in flight through a node that is no longer a
        member (it left or its lease expired) or now hosts another stage, instead of waiting for the
        microbatch timeout.
        """
        self.schedule = schedule
        counts = self._counts[schedule.epoch] = schedule.counts(self.node_id, self.is_origin)
        for old in sorted(self._counts)[:-KEPT_PLAN_EPOCHS]:
            del self._counts[old]
        self.runtime.set_expected(sum(counts.values()))
        self._spawn(self.runtime.recheck())
        if self.is_origin:
            for key, pending in list(self._pending.items()):
                # gone: no longer a member, or moved to another stage (what it kept for this one is lost)
                gone = [n for n, s in zip(pending.path.node_ids, pending.path.stages, strict=True)
                        if n != self.node_id and schedule.stages.get(n) != s]
                if gone and not pending.future.done():
                    how = "left the run" if gone[0] not in schedule.stages else "moved to another stage"
                    self._spawn(self._abandon_as_origin(key, f"node {gone[0]} {how}"))
        # Microbatches of an origin that is no longer one (it left, or was moved to rebuild a block stage)
        # never come back for backward: drop them now rather than hold their iteration open until the timeout.
        for key in self.runtime.in_flight():
            if key.origin_id != self.node_id and schedule.stages.get(key.origin_id) != 0:
                self._spawn(self.runtime.abandon(key))

    def _expected_for(self, epochs: Mapping[str, int], closed: Mapping[str, int], seen: Mapping[str, int],
                      moved_on: AbstractSet[str]) -> int:
        """Microbatches through this node in an iteration whose origins launched it under ``epochs`` (origin
        -> plan epoch, for the origins seen here so far); an origin not seen yet counts by the current plan.

        Three cases count only what is already here, because the rest never comes: an origin that is no
        longer one (not a member, or moved to another stage) counts its microbatches ``closed`` here (done
        or abandoned); an origin that has ``moved_on`` (one of its microbatches of a later iteration came:
        it finished this one, or skipped it while catching up) and an origin that launched under a plan
        older than any this node holds (this node joined or moved since, so that plan routed nothing here)
        count those ``seen`` here."""
        current = self._counts.get(self.schedule.epoch, {})
        oldest = min(self._counts, default=0)
        members = self.schedule.stages
        total = 0
        for origin in current.keys() | epochs.keys():
            if members and members.get(origin) != 0 and origin != self.node_id:
                total += closed.get(origin, 0)
            elif origin in moved_on:
                total += seen.get(origin, 0)
            elif origin not in epochs:
                total += current.get(origin, 0)
            elif epochs[origin] in self._counts:
                total += self._counts[epochs[origin]].get(origin, 0)
            elif epochs[origin] < oldest:
                total += seen.get(origin, 0)
            else:   # a plan newer than ours (our schedule lags): the current one is the best guess
                total += current.get(origin, 0)
        return total

    def _event(self, kind: str, **fields: object) -> None:
        if self.on_event is not None:
            self.on_event(kind, **fields)

    async def address_of(self, node_id: str) -> str | None:
        """A peer's address; an unknown peer (our schedule is older than the sender's) refreshes it once."""
        address = self.schedule.addresses.get(node_id)
        if address is None and self.refresh_schedule is not None:
            await self.refresh_schedule()
            address = self.schedule.addresses.get(node_id)
        return address

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("microbatch task failed", exc_info=task.exception())

    async def close(self) -> None:
        """Cancel in-flight work (shutdown)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_result(None)

    # ------------------------------------------------------------------ receiving

    def _validate_header(self, header: node_pb2.MicrobatchHeader, backward: bool) -> None:
        n = len(header.stages)
        if header.run_id != self.run_id:
            raise ValidationError(f"microbatch of run {header.run_id!r}; this node trains {self.run_id!r}")
        if n < 2 or len(header.node_ids) != n:
            raise ValidationError(f"path has {n} stages and {len(header.node_ids)} nodes; need equal and >= 2")
        if header.stages[0] != 0 or header.stages[-1] != 0:
            raise ValidationError("path must start and end at stage 0")
        if header.node_ids[0] != header.origin_id or header.node_ids[-1] != header.origin_id:
            raise ValidationError("path must start and end at its origin")
        lo, hi = (0, n - 2) if backward else (1, n - 1)
        if not lo <= header.hop <= hi:
            raise ValidationError(f"hop {header.hop} out of range [{lo}, {hi}] for a {'backward' if backward else 'forward'}")
        if header.node_ids[header.hop] != self.node_id:
            raise ValidationError(f"hop {header.hop} is node {header.node_ids[header.hop]!r}, not {self.node_id!r}")
        if header.stages[header.hop] != self.stage:
            raise ValidationError(f"hop {header.hop} is stage {header.stages[header.hop]}; this node holds {self.stage}")
        if header.iteration < 0:
            raise ValidationError(f"negative iteration {header.iteration}")
        at_origin = header.hop in (0, n - 1)
        if at_origin and header.origin_id != self.node_id:
            raise ValidationError("only the origin handles hop 0 and the last hop")
        if backward and not self.runtime.holds(self._key(header)):
            raise ValidationError(f"no activations kept here for microbatch {self._key(header)}")
        if at_origin:
            key = self._key(header)
            pending = self._pending.get(key)
            if pending is None:
                raise ValidationError(f"no microbatch {key} in flight at this origin")
            if list(pending.path.node_ids) != list(header.node_ids):
                raise ValidationError("path does not match the microbatch this origin sent")

    def _key(self, header: node_pb2.MicrobatchHeader) -> MicrobatchKey:
        return MicrobatchKey(header.origin_id, header.iteration, header.microbatch)

    def accept(self, header: node_pb2.MicrobatchHeader, tensor: tensor_pb2.Tensor, *, backward: bool,
               payload: memoryview | None = None, decoded: torch.Tensor | None = None) -> None:
        """Validate and decode an arriving activation (or gradient); process it as a task. Synchronous (on
        the event loop), so the activation wire can answer a frame in the callback that completed it.

        From the activation wire, ``payload`` is the tensor's payload that came beside the message (its
        TCP stream stands in for the codec checksum) and ``decoded``, when set, the tensor it was read
        straight into. Raises ValidationError for a bad header or tensor; nothing changes then.
        """
        self._validate_header(header, backward)
        if decoded is not None:
            h = decoded   # read in place by the wire, which checked it finite as it arrived
        else:
            h = decode(tensor, max_numel=64 * 1024 * 1024, payload=payload, require_checksum=payload is None,
                       require_finite=True)
        h = lift_received(tensor, h, self.subspace)
        if h.ndim != 3 or h.shape[-1] != self.dim or not 1 <= h.shape[1] <= self.max_seq_len:
            raise ValidationError(f"activation of shape {list(h.shape)}; expected (B, T<={self.max_seq_len}, {self.dim})")
        # h stays in its wire dtype (bf16 by default): the runtime casts it in its compute thread
        self._spawn(self._process(header, h, backward))

    async def _process(self, header: node_pb2.MicrobatchHeader, h: torch.Tensor, backward: bool) -> None:
        key = self._key(header)
        last = len(header.stages) - 1
        try:
            if not backward and header.hop < last:           # a block stage's forward
                out = await self.runtime.forward(None if header.evaluate else key, h, header.epoch)
                await self._push(header, header.hop + 1, out, backward=False)
            elif not backward:                                # back at the origin: head and loss
                pending = self._pending[key]
                if pending.evaluate:
                    loss, _ = await self.runtime.head(None, h, pending.targets)
                    self._resolve(key, loss)
                    return
                loss, grad = await self.runtime.head(key, h, pending.targets)
                pending.loss = loss
                assert grad is not None
                await self._push(header, last - 1, grad, backward=True)
            elif header.hop > 0:                              # a block stage's backward
                grad_in = await self.runtime.backward(key, h)
                self.microbatches_done += 1
                assert grad_in is not None
                await self._push(header, header.hop - 1, grad_in, backward=True)
            else:                                             # the origin's embedding backward
                await self.runtime.backward(key, h)
                self.microbatches_done += 1
                pending = self._pending.get(key)
                self._resolve(key, pending.loss if pending else None)
        except StageError as exc:
            await self._give_up(header, f"stage {self.stage}: {exc}", suspect=None,
                                open_iteration=exc.open_iteration)
        except KeyError as exc:
            await self._give_up(header, f"stage {self.stage}: unknown microbatch {exc}", suspect=None)

    # ------------------------------------------------------------------ sending and failures

    async def _push(self, header: node_pb2.MicrobatchHeader, hop: int, tensor: torch.Tensor, *, backward: bool) -> None:
        out = node_pb2.MicrobatchHeader()
        out.CopyFrom(header)
        out.hop = hop
        node_id = header.node_ids[hop]
        address = await self.address_of(node_id)
        if address is None:
            await self._give_up(header, f"no address for node {node_id}", suspect=None)
            return
        codec = self.gradient_codec if backward else self.codec
        # a CUDA stage's tensor leaves the device through a pinned buffer, off the event loop (a CPU one
        # is used as it is); the buffer carries the next hop once this one is sent
        host = await self.runtime.hop.to_host(tensor, RAW_CODECS.get(codec))
        try:
            ack = await self.transport.send_microbatch(address, backward, out, host.tensor, codec,
                                                       timeout_s=self.hop_timeout_s, node_id=node_id,
                                                       subspace=self.subspace)
        except ValidationError as exc:   # this node's own tensor does not fit its codec (a config mismatch)
            await self._give_up(header, f"cannot encode for {node_id}: {exc}", suspect=None)
            return
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            unreachable = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                   grpc.StatusCode.CANCELLED)
            await self._give_up(header, f"{'backward' if backward else 'forward'} to {node_id} failed: "
                                        f"{code.name}: {exc.details()}", suspect=node_id if unreachable else None)
            return
        finally:
            self.runtime.hop.release(host)
        if not ack.ok:
            await self._give_up(header, f"{node_id} refused: {ack.message}", suspect=None)

    async def _give_up(self, header: node_pb2.MicrobatchHeader, reason: str, suspect: str | None,
                       open_iteration: int = 0) -> None:
        key = self._key(header)
        logger.warning("node %s abandons microbatch %s: %s", self.node_id, key, reason)
        self._event("abandon", origin=key.origin_id, iteration=key.iteration, microbatch=key.microbatch,
                    reason=reason, suspect=suspect or "")
        if suspect and self.on_failure is not None:
            self._spawn(self.on_failure(suspect, reason))
        if header.origin_id == self.node_id:
            self.note_open_iteration(open_iteration)
            await self._abandon_as_origin(key, reason)
            return
        if not header.evaluate:
            await self.runtime.abandon(key)
        address = await self.address_of(header.origin_id)
        if address is None:
            logger.warning("cannot tell origin %s about abandoned %s: its address is unknown", header.origin_id, key)
            return
        request = node_pb2.AbandonRequest(run_id=self.run_id, iteration=key.iteration, microbatch=key.microbatch,
                                          origin_id=key.origin_id, reason=reason, open_iteration=open_iteration)
        try:
            await self.transport.abandon(address, request, timeout_s=self.hop_timeout_s)
        except grpc.aio.AioRpcError as exc:
            logger.warning("cannot tell origin %s about abandoned %s: %s", header.origin_id, key, exc.code().name)
            if self.on_failure is not None and exc.code() in (grpc.StatusCode.UNAVAILABLE,
                                                               grpc.StatusCode.DEADLINE_EXCEEDED):
                self._spawn(self.on_failure(header.origin_id, f"abandon notice failed: {exc.code().name}"))

    async def _abandon_as_origin(self, key: MicrobatchKey, reason: str) -> None:
        pending = self._pending.get(key)
        if pending is None or pending.future.done():
            return
        self.microbatches_abandoned += 1
        if not pending.evaluate:
            await self.runtime.abandon(key)   # before resolving: the iteration closes with its last microbatch
        self._resolve(key, None)
        if pending.evaluate:
            return
        request = node_pb2.AbandonRequest(run_id=self.run_id, iteration=key.iteration, microbatch=key.microbatch,
                                          origin_id=key.origin_id, reason=reason)
        for node_id in set(pending.path.node_ids) - {self.node_id}:
            address = self.schedule.addresses.get(node_id)
            if address is not None:
                self._spawn(self._notify_abandon(address, request))

    async def _notify_abandon(self, address: str, request: node_pb2.AbandonRequest) -> None:
        try:
            await self.transport.abandon(address, request, timeout_s=min(self.hop_timeout_s, 5.0))
        except grpc.aio.AioRpcError as exc:
            logger.debug("abandon notice to %s failed: %s", address, exc.code().name)

    async def on_abandon(self, request: node_pb2.AbandonRequest) -> bool:
        """A peer (or the origin) gave up a microbatch: drop it here so nobody waits for it."""
        if request.run_id != self.run_id:
            raise ValidationError(f"abandon for run {request.run_id!r}; this node trains {self.run_id!r}")
        key = MicrobatchKey(request.origin_id, request.iteration, request.microbatch)
        if request.origin_id == self.node_id:
            self.note_open_iteration(request.open_iteration)
            if key not in self._pending:
                return False
            await self._abandon_as_origin(key, request.reason)
            return True
        if request.microbatch < 0:   # evaluation microbatches keep nothing
            return False
        return await self.runtime.abandon(key)

    def iteration_status(self, request: node_pb2.IterationStatusRequest) -> node_pb2.IterationStatusReply:
        """Whether this origin has finished ``request.iteration``: its runtime closes an iteration once
        every microbatch of it is done or abandoned, and skips the iterations it catches up over."""
        if request.run_id != self.run_id:
            raise ValidationError(f"iteration status for run {request.run_id!r}; this node trains {self.run_id!r}")
        if not self.is_origin:
            raise ValidationError(f"node {self.node_id} is not an origin (it hosts stage {self.stage})")
        open_iteration = self.runtime.iteration
        return node_pb2.IterationStatusReply(finished=open_iteration > request.iteration,
                                             open_iteration=open_iteration)

    async def ask_origins(self, after_s: float = ASK_ORIGINS_AFTER_S, poll_s: float = 0.25) -> None:
        """Stage nodes: while the open iteration is stalled (``runtime.stalled``), ask each origin of the
        run, once per ``after_s``, whether it has finished that iteration; an origin that has sends nothing
        more of it (``runtime.origin_finished``). Runs until cancelled."""
        asked: tuple[int, float] = (-1, 0.0)   # (iteration, when)
        while True:
            await asyncio.sleep(poll_s)
            iteration = self.runtime.iteration
            if self.is_origin or not self.runtime.stalled(after_s):
                continue
            if asked[0] == iteration and time.monotonic() - asked[1] < after_s:
                continue
            asked = (iteration, time.monotonic())
            origins = [n for n, s in self.schedule.stages.items() if s == 0 and n != self.node_id]
            await asyncio.gather(*(self._ask_origin(origin, iteration) for origin in origins))

    async def _ask_origin(self, origin: str, iteration: int) -> None:
        address = self.schedule.addresses.get(origin)
        if address is None:
            return
        request = node_pb2.IterationStatusRequest(run_id=self.run_id, iteration=iteration, node_id=self.node_id)
        try:
            reply = await self.transport.iteration_status(address, request, timeout_s=min(self.hop_timeout_s, 2.0))
        except grpc.aio.AioRpcError as exc:
            logger.debug("iteration status from %s failed: %s", origin, exc.code().name)
            return
        if reply.finished and self.runtime.iteration == iteration and await self.runtime.origin_finished(origin,
                                                                                                        iteration):
            logger.info("stage %d: origin %s has finished iteration %d (now at %d); not waiting for more of it",
                        self.stage, origin, iteration, reply.open_iteration)

    def note_open_iteration(self, iteration: int) -> None:
        """A stage refused our microbatch as stale: the run is at ``iteration``; catch up before the next one."""
        if iteration > self.runtime.iteration:
            self.catch_up_to = max(self.catch_up_to, iteration)

    def _resolve(self, key: MicrobatchKey, loss: float | None) -> None:
        pending = self._pending.get(key)
        if pending is not None and not pending.future.done():
            pending.future.set_result(loss)

    # ------------------------------------------------------------------ origin

    def microbatch_timeout_s(self, path: PathSpec, evaluate: bool = False) -> float:
        """How long an origin waits for a microbatch: each of its hops (forward, and backward when
        training) may take up to a hop timeout before the hop itself gives up and tells us."""
        hops = len(path.stages) - 1
        return self.hop_timeout_s * (hops if evaluate else 2 * hops)

    async def run_microbatch(self, iteration: int, path: PathSpec, tokens: torch.Tensor, targets: torch.Tensor,
                             *, evaluate: bool = False, epoch: int | None = None) -> float | None:
        """Send one microbatch along ``path`` (of the plan of ``epoch``, default the current one); its loss,
        or None when it was abandoned."""
        if not self.is_origin:
            raise StageError("only an origin (stage 0) runs microbatches")
        if evaluate:
            self._eval_counter += 1
            mb = -self._eval_counter
        else:
            mb = path.microbatch
        key = MicrobatchKey(self.node_id, iteration, mb)
        future: asyncio.Future[float | None] = asyncio.get_running_loop().create_future()
        self._pending[key] = _Pending(path, targets, future, evaluate)
        header = node_pb2.MicrobatchHeader(run_id=self.run_id, iteration=iteration, microbatch=mb,
                                           origin_id=self.node_id, stages=list(path.stages),
                                           node_ids=list(path.node_ids), hop=0,
                                           epoch=self.schedule.epoch if epoch is None else epoch,
                                           evaluate=evaluate)
        try:
            try:
                h = await self.runtime.embed(None if evaluate else key, tokens, header.epoch)
            except StageError as exc:
                await self._give_up(header, str(exc), suspect=None)
                return None
            self._spawn(self._push(header, 1, h, backward=False))
            try:
                return await asyncio.wait_for(asyncio.shield(future), timeout=self.microbatch_timeout_s(path, evaluate))
            except TimeoutError:
                await self._give_up(header, "microbatch timed out", suspect=None)
                return None
        finally:
            self._pending.pop(key, None)

    async def run_iteration(self, iteration: int, batches: list[tuple[torch.Tensor, torch.Tensor]]
                            ) -> IterationResult:
        """Run this origin's microbatches of one iteration concurrently; returns when all finished."""
        start = time.perf_counter()
        paths, epoch = list(self.schedule.paths), self.schedule.epoch
        if len(batches) < len(paths):
            raise ValueError(f"{len(paths)} paths but {len(batches)} batches")
        if paths and all(local_path(p) for p in paths):   # data-parallel mode: no hop at all
            if iteration != self.runtime.iteration:
                raise StageError(f"iteration {iteration} is not the open one ({self.runtime.iteration})")
            losses, _ = await self.runtime.train_local(batches[:len(paths)])
            tokens = sum(int(b[0].numel()) for b in batches[:len(paths)])
            return IterationResult(iteration, losses, 0, tokens, time.perf_counter() - start)
        results = await asyncio.gather(*(self.run_microbatch(iteration, p, *b, epoch=epoch)
                                         for p, b in zip(paths, batches, strict=False)))
        # Every microbatch is done or abandoned, so the runtime has stepped; be sure it did.
        while self.runtime.iteration <= iteration:
            await self.runtime.close_iteration(forced=True)
        losses = [r for r in results if r is not None]
        tokens = sum(int(b[0].numel()) for b, r in zip(batches, results, strict=False) if r is not None)
        return IterationResult(iteration, losses, len(results) - len(losses), tokens, time.perf_counter() - start)

    async def evaluate(self, iteration: int, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Mean validation loss over ``batches`` through the whole model in order (``whole_model_path``;
        along this origin's training paths only when some stage has no node), nothing trained."""
        paths = list(self.schedule.paths)
        if not paths:
            return math.nan
        if all(local_path(p) for p in paths):
            losses = await self.runtime.evaluate_local(batches)
            return sum(losses) / len(losses) if losses else math.nan
        whole = whole_model_path(self.node_id, self.num_stages, self.schedule)
        results = await asyncio.gather(*(
            self.run_microbatch(iteration, whole or paths[i % len(paths)], x, y, evaluate=True)
            for i, (x, y) in enumerate(batches)
        ))
        losses = [r for r in results if r is not None]
        return sum(losses) / len(losses) if losses else math.nan
