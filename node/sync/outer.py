"""The daemon's outer sync: Streaming DiLoCo among the replicas of one stage, wired to the network.

After every inner step (on the stage's worker thread, between steps) the
``OuterSync`` merges fragments whose averaged pseudo-gradient has arrived and
whose merge step has come, then snapshots the fragment due now, if any. The
exchange runs on the event loop while training goes on: ask the coordinator
for the round's participants (JoinSyncRound), then average peer to peer with the
backend ``diloco.backend`` names (``lowband.node.sync.averaging_backend``: gRPC
ReduceShard or hivemind). A round that is abandoned or fails changes nothing
(``finish_sync(job, None)``). The math is in ``lowband.node.sync.diloco``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import torch
from torch import nn

from lowband.node.coordinator_client import CoordinatorClient
from lowband.node.sync.averaging_backend import make_backend
from lowband.node.sync.diloco import StreamingDiLoCo, SyncJob, exchange_open, state_from_parts, state_to_parts
from lowband.node.sync.fault import ENV as POISON_ENV
from lowband.node.sync.fault import poison_from_env
from lowband.node.sync.grpc_averager import ShardReducer
from lowband.protocols import coordinator_pb2 as pb
from lowband.protocols.config import RunConfig

logger = logging.getLogger(__name__)

_Key = tuple[int, int]   # (fragment, step the job was snapshotted at)


class OuterSync:
    """Streaming DiLoCo for one replica of ``stage``."""

    def __init__(self, module: nn.Module, stage: int, node_id: str, config: RunConfig, client: CoordinatorClient,
                 token: str, *, on_event: Callable[..., None] | None = None,
                 resync: Callable[[], Awaitable[None]] | None = None, host: str = "127.0.0.1") -> None:
        self.stage = stage
        self.host = host   # the address this node's peers reach it at (a backend binds its own sockets there)
        self.node_id = node_id
        self.cfg = config.diloco
        self.round_wait_s = config.membership.sync_timeout_s + config.membership.sync_join_window_s
        self.client = client
        self.diloco = StreamingDiLoCo(module, config.diloco)
        numels = [sum(self.diloco.params[n].numel() for n in names) for names in self.diloco.fragments]
        self.backend = make_backend(config.diloco, numels, run_id=config.run_id, stage=stage, node_id=node_id,
                                    token=token, host=host)
        self.poison = poison_from_env()   # tests only: this replica sends poisoned pseudo-gradients
        if self.poison is not None:
            logger.warning("stage %d: %s is set: this node sends POISONED pseudo-gradients (a test fault)",
                           stage, POISON_ENV)
        self.on_event = on_event
        self.resync = resync   # adopt a live replica's θ_global and outer state (we fell behind the group)
        self._resyncing: asyncio.Task[None] | None = None
        self.loop = asyncio.get_running_loop()
        self.outer_steps = 0
        self.sync_bytes_sent = 0   # requests this node sent as a caller (see wire_bytes_sent)
        self._results: dict[_Key, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        self._done: dict[_Key, threading.Event] = {}
        # the longest an exchange can take: forming the round, then the peers' two timeouts
        self.merge_wait_s = self.round_wait_s + 2 * config.diloco.peer_timeout_s
        self._tasks: set[asyncio.Task[None]] = set()
        # fragment -> outer step to continue from (the coordinator's adopt_outer_step), applied on the
        # worker thread before the next snapshot
        self._adopt: dict[int, int] = {}
        self._catch_up: set[int] = set()   # fragments to snapshot after the next step, off schedule
        self._missed: set[int] = set()     # fragments whose round formed without us, until the resync lands
        self.step = 0   # the last committed step ``after_step`` saw (worker thread): the step a state copy is from
        # a backend may need a while to come up (hivemind's DHT): start it now, before the first round
        # needs it; rounds wait for it, training does not
        starting = self.loop.create_task(self._start_backend())
        self._tasks.add(starting)
        starting.add_done_callback(self._tasks.discard)

    @property
    def reducer(self) -> ShardReducer | None:
        """What the servicer answers ReduceShard with (None: this backend takes no ReduceShard calls)."""
        return self.backend.reducer

    # ------------------------------------------------------------------ worker thread

    def after_step(self, step: int) -> None:
        """Called on the stage's worker thread after inner step ``step`` (committed steps, 1-based).

        Snapshot first, merge second: with ``overlap`` 0 the fragment snapshotted now is
        merged in this same step (classic DiLoCo), with τ > 0 it is merged τ steps later.
        """
        self.step = step
        while self._adopt:
            fragment, outer_step = self._adopt.popitem()
            if self.diloco.adopt_outer_step(fragment, outer_step):
                self._event("outer-adopt", fragment=fragment, step=step, outer_step=outer_step)
        if self._results:   # results of jobs a state copy dropped (load_parts) are never merged
            pending = {(j.fragment, j.step) for j in self.diloco.pending}
            for key in list(self._results):   # a snapshot: the event loop adds results concurrently
                if key not in pending:
                    self._results.pop(key, None)
        jobs = [self.diloco.begin_sync(step)]
        while self._catch_up:
            jobs.append(self.diloco.begin_sync(step, fragment=self._catch_up.pop()))
        for job in jobs:
            if job is not None:
                self._done[(job.fragment, job.step)] = threading.Event()
                self.loop.call_soon_threadsafe(self._start, job)
        for job in self.diloco.due_merges(step):
            key = (job.fragment, job.step)
            # The merge is due: wait (bounded) for the exchange. This is what keeps the replicas of a
            # stage within about one round of each other; without it a faster replica would run ahead
            # and keep missing its peers' rounds.
            done = self._done.get(key)
            if done is not None:
                if not done.wait(timeout=self.merge_wait_s):
                    logger.warning("fragment %d from step %d: no averaged result after %.0f s; merging later",
                                   job.fragment, job.step, self.merge_wait_s)
                self._done.pop(key, None)   # wait once only
            if key not in self._results:
                continue   # still exchanging: merge after a later step
            mean, valid = self._results.pop(key)
            stats = self.diloco.finish_sync(job, mean, valid)
            self._event("outer-merge", step=step, **{k: v for k, v in stats.items() if k != "step"},
                        merged_after=job.step)

    # ------------------------------------------------------------------ event loop

    def _event(self, kind: str, **fields: Any) -> None:
        if self.on_event is not None:
            self.loop.call_soon_threadsafe(lambda: self.on_event(kind, **fields))   # type: ignore[misc]

    async def _start_backend(self) -> None:
        try:
            await self.backend.start()
        except Exception as exc:   # the first round tries again, and fails alone if it must
            logger.warning("stage %d: the %s averaging backend did not start: %s", self.stage, self.backend.name, exc)

    def _start(self, job: SyncJob) -> None:
        task = asyncio.create_task(self._exchange(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _exchange(self, job: SyncJob) -> None:
        key = (job.fragment, job.step)
        started = time.monotonic()
        mean: torch.Tensor | None = None
        valid: torch.Tensor | None = None
        try:
            reply = await self._round(job)
            if reply is not None:
                ids = [p.node_id for p in reply.participants]
                if self.node_id not in ids:   # the round formed without us: we are behind the group
                    self._event("outer-skip", fragment=job.fragment, step=job.step, reason="round formed without us")
                    self._behind(job, reply)
                else:
                    sent = job
                    if self.poison is not None and job.finite and job.sparse is None:
                        sent = dataclasses.replace(job, delta=self.poison(job.delta))
                    result = await self.backend.average(sent, reply, ids.index(self.node_id))
                    self.sync_bytes_sent += result.bytes_sent
                    if result.mean is None:
                        self._event("outer-skip", fragment=job.fragment, step=job.step, round_id=reply.round_id,
                                    reason=f"{self.backend.name} averaged nothing", **result.fields)
                    else:
                        mean, valid = result.mean, result.valid
                        self.outer_steps += 1
                        self._event("outer-sync", fragment=job.fragment, step=job.step, round_id=reply.round_id,
                                    backend=self.backend.name, participants=len(ids), bytes_sent=result.bytes_sent,
                                    seconds=round(time.monotonic() - started, 3), **result.fields)
        except Exception:   # a failed round must never take the node down: it changes nothing
            logger.exception("outer sync of fragment %d at step %d failed", job.fragment, job.step)
            mean, valid = None, None
        self._results[key] = (mean, valid)
        done = self._done.get(key)
        if done is not None:
            done.set()

    async def _round(self, job: SyncJob) -> pb.SyncRoundReply | None:
        """Poll the coordinator until the round is formed (None when abandoned or timed out)."""
        await self.backend.start()   # once: its maddrs go into the request
        request = pb.SyncRoundRequest(node_id=self.node_id, stage=self.stage, fragment=job.fragment,
                                      outer_step=job.outer_step + 1, sync_maddrs=self.backend.maddrs)
        deadline = time.monotonic() + self.round_wait_s
        while time.monotonic() < deadline:
            try:
                reply = await self.client.join_sync_round(request)
            except grpc.aio.AioRpcError as exc:
                logger.warning("sync round for fragment %d: %s %s", job.fragment, exc.code().name, exc.details())
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    return None
                await asyncio.sleep(0.5)
                continue
            if reply.abandoned:
                self._event("outer-skip", fragment=job.fragment, step=job.step, reason=reply.reason)
                if "stale" in reply.reason:   # the stage's replicas are at a later outer step than we are
                    self._behind(job, reply)
                return None
            if reply.ready:
                return reply
            await asyncio.sleep(max(0.02, reply.retry_after_s or 0.1))
        self._event("outer-skip", fragment=job.fragment, step=job.step, reason="round not formed in time")
        return None

    def _behind(self, job: SyncJob, reply: pb.SyncRoundReply) -> None:
        """The group is past our outer step: copy its outer state from a replica that has it, or, when the
        coordinator says none that took part is alive (the whole stage was rebuilt), continue its round
        numbering from where it stopped so the rebuilt replicas average together again."""
        if reply.adopt_outer_step > job.outer_step:
            self._adopt[job.fragment] = max(self._adopt.get(job.fragment, 0), reply.adopt_outer_step)
        else:
            self._missed.add(job.fragment)
            self._start_resync()

    def _start_resync(self) -> None:
        if self.resync is None or (self._resyncing is not None and not self._resyncing.done()):
            return
        self._resyncing = asyncio.create_task(self.resync())
        self._tasks.add(self._resyncing)
        self._resyncing.add_done_callback(self._tasks.discard)

    @property
    def wire_bytes_sent(self) -> int:
        """Bytes this node put on the wire for DiLoCo exchanges: its requests as a caller plus
        what it sent answering peers (gRPC: its replies as a shard owner; hivemind counts both
        halves of its all-reduce per caller); counting only the requests would miss about half
        of an all-reduce's traffic."""
        return self.sync_bytes_sent + self.backend.served_bytes

    def total_outer_steps(self) -> int:
        return sum(self.diloco.outer.steps.values())

    async def close(self) -> None:
        for done in self._done.values():   # never leave the worker thread waiting
            done.set()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.backend.close()   # hivemind: its averager and DHT processes (and their p2pd) end here

    # ------------------------------------------------------------------ state for newcomers

    def state_parts(self) -> dict[str, dict[str, torch.Tensor]]:
        """θ_global ("global") and the outer optimizer ("outer") for GetState; worker thread."""
        return state_to_parts(self.diloco.state_dict())

    def state_at(self) -> tuple[dict[str, dict[str, torch.Tensor]], int]:
        """``state_parts`` and the committed step they are from; worker thread, so no step runs in between
        (the runtime's iteration, read on the event loop, can lag behind a step that already merged)."""
        return self.state_parts(), self.step

    def load_parts(self, parts: dict[str, dict[str, torch.Tensor]], *, reset_local: bool = False,
                   catch_up: bool = False, open_at: int | None = None) -> list[int]:
        """Adopt a live replica's θ_global and outer state; the local weights stay as they are, or with
        ``reset_local`` become θ_global (a replica that has not trained since has nothing of its own).
        Returns the fragments adopted.

        With ``catch_up`` (a training replica that fell behind the group) only the fragments where the
        source is ahead are adopted (one it is not ahead in may be where this replica is ahead), and each
        adopted fragment whose round formed without us is exchanged after the next step instead of at its
        next sync point: the copy lands while the group's next round of it is about to open, and waiting H
        more steps would ask for that round once it has formed without us, leaving this replica one round
        behind for good. Only those: exchanging a fragment the group is not syncing now would form a round
        of one, which the group's next round of it then finds formed without it, and so on back and forth.

        ``open_at`` (data-parallel mode, where no pipeline keeps the replicas at the same inner step, so a
        replica that missed a round may be many steps behind and jumps to the source's): the source's
        committed step. The fragments exchanged off schedule are then those whose round is open there (the
        group is in it now, and the jump skips its sync point) and in which this replica is level with the
        source; a missed fragment's next round may be H steps away, and exchanging it now would open a
        round of one. Worker thread."""
        state = state_from_parts(parts, self.diloco.fragments)
        fragments = self.diloco.fragments_behind(state) if catch_up else list(range(len(self.diloco.fragments)))
        if fragments:
            self.diloco.load_state_dict(state, reset_local=reset_local, fragments=fragments)
            pending = {(j.fragment, j.step) for j in self.diloco.pending}   # the load dropped those jobs
            for key in list(self._done):
                if key not in pending:
                    self._done.pop(key).set()
        if open_at is not None:
            self._missed.clear()
            theirs = state["outer_steps"]
            self._catch_up.update(
                p for p, names in enumerate(self.diloco.fragments)
                if names and exchange_open(open_at, p, self.cfg)
                and self.diloco.outer.steps.get(p, 0) == theirs.get(p, 0))
        elif fragments:
            missed, self._missed = self._missed, set()
            if catch_up:
                self._catch_up.update(p for p in missed & set(fragments) if self.diloco.fragments[p])
        return fragments
