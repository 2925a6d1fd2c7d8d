"""The node's copy of the coordinator's schedule: fetched on instruction or when a peer is unknown.

The schedule (paths, peers' stages and addresses, visits) goes to the current stage's agent; the
train loop waits on its changes, and an origin starts training only once it has settled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc

from lowband.node.coordinator_client import CoordinatorClient
from lowband.node.event_log import EventLog
from lowband.node.membership import Membership
from lowband.node.pipeline.agent import PipelineAgent, Schedule
from lowband.node.stage_assembly import CurrentStage

logger = logging.getLogger(__name__)

RECENT_REFRESH_S = 0.2   # a reload this recent already answers a microbatch that named an unknown peer
SETTLE_HEARTBEATS = 2    # membership unchanged for this many heartbeats: the schedule has settled


class ScheduleKeeper:
    """Fetches schedules (one at a time) and hands them to the current agent."""

    def __init__(self, client: CoordinatorClient, membership: Membership, current: CurrentStage, events: EventLog,
                 stop_event: asyncio.Event, heartbeat_s: float, *, changed_at: float) -> None:
        """``changed_at``: when membership last changed as far as this node knows (its start)."""
        self.client = client
        self.membership = membership
        self.current = current
        self.events = events
        self.stop_event = stop_event
        self.heartbeat_s = heartbeat_s
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._last_refresh = 0.0
        # the agent that was current when the last fetch ended: a schedule fetched for a previous
        # agent (before a stage change) never reached the current one
        self._refreshed_for: PipelineAgent | None = None
        self._changed_at = changed_at

    async def reload(self) -> None:
        """Fetch the schedule (retrying while the coordinator is unreachable) and apply it."""
        async with self._lock:
            try:
                reply = await self.client.schedule(self.membership.node_id, stop=self.stop_event)
            except grpc.aio.AioRpcError as exc:
                logger.warning("schedule refused (%s): %s", exc.code().name, exc.details())
                return
            finally:
                self._last_refresh = time.monotonic()
                self._refreshed_for = self.current.agent
            if reply is None:
                return
            schedule = Schedule.from_reply(reply)
            if reply.epoch != self.membership.epoch:
                self._changed_at = time.monotonic()
            self.membership.epoch = reply.epoch
            if reply.num_origins:
                self.membership.set_origin(reply.origin_index, reply.num_origins)
            agent = self.current.agent
            if agent is not None:
                agent.set_schedule(schedule)
            self.events.write("schedule", epoch=reply.epoch, paths=len(schedule.paths),
                              expected=schedule.expected(agent is not None and agent.is_origin),
                              peers=len(schedule.addresses))
            self._changed.set()

    async def refresh_for_unknown_peer(self) -> None:
        """A microbatch names a node we do not know yet: our schedule is older than the sender's. Many
        microbatches at once share one reload: one that arrives while a reload is under way waits for it
        (returning at once would leave it without the address, and a node that just moved stages, with
        no schedule yet, would give up its microbatches without even telling their origins)."""
        asked_at = time.monotonic()
        async with self._lock:
            recent = self._last_refresh >= asked_at - RECENT_REFRESH_S   # one finished just now, or while we waited
            if recent and self._refreshed_for is self.current.agent:
                return
        await self.reload()

    def forget_refresh(self) -> None:
        """A new agent: a schedule fetched for the previous one never reached it."""
        self._last_refresh = 0.0
        # the agent that was current when the last fetch ended: a schedule fetched for a previous
        # agent (before a stage change) never reached the current one
        self._refreshed_for: PipelineAgent | None = None

    async def wait_changed(self, timeout_s: float) -> None:
        """Until the next schedule arrives, at most ``timeout_s``."""
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout=timeout_s)

    def settled(self) -> bool:
        """Membership has not changed for a couple of heartbeats."""
        return time.monotonic() - self._changed_at > SETTLE_HEARTBEATS * self.heartbeat_s
