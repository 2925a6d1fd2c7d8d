"""CheckFree+: stages 1 and S-1 keep a copy of stage 0 (small), refreshed every
``recovery.bookend_copy_every`` inner steps (default: every outer period), so even losing every
origin is recoverable (``bookend-copy``; a replacement origin rebuilds from it)."""

from __future__ import annotations

import asyncio
import logging

import grpc
import torch

from lowband.node.event_log import EventLog
from lowband.node.membership import Membership
from lowband.node.pipeline.transport import Transport
from lowband.node.recovery.obtain import fetch_peer_state
from lowband.node.stage_assembly import CurrentStage
from lowband.protocols.errors import ValidationError

logger = logging.getLogger(__name__)


class BookendCopy:
    """The copy of stage 0 this node keeps when it holds stage 1 or S-1 (``copy``; None until fetched)."""

    def __init__(self, current: CurrentStage, membership: Membership, transport: Transport, events: EventLog, *,
                 num_stages: int, refresh_steps: int) -> None:
        self.current = current
        self.membership = membership
        self.transport = transport
        self.events = events
        self.num_stages = num_stages
        self.refresh_steps = refresh_steps   # the copy is refreshed once per this many inner steps
        self.copy: dict[str, torch.Tensor] | None = None
        self._task: asyncio.Task[None] | None = None

    def after_step(self, step: int) -> None:
        """Refresh the copy after inner step ``step`` when it is due (one fetch at a time)."""
        agent = self.current.agent
        # stages 1 and S-1 keep the copy; stage 0 never copies itself (with S = 1, S-1 is stage 0)
        holder = agent is not None and agent.stage != 0 and agent.stage in (1, self.num_stages - 1)
        due = self.copy is None or step % self.refresh_steps == 0
        if holder and due and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._refresh())

    async def _refresh(self) -> None:
        agent = self.current.agent
        if agent is None:
            return
        origins = sorted(n for n, s in agent.schedule.stages.items() if s == 0)
        for node_id in origins:
            address = agent.schedule.addresses.get(node_id)
            if address is None:
                continue
            try:
                snapshot = await fetch_peer_state(self.transport, address, 0, ["local"], self.membership.node_id)
            except (grpc.aio.AioRpcError, ValidationError) as exc:
                logger.info("bookend copy from %s failed: %s", node_id, exc)
                continue
            if "local" in snapshot.parts:
                self.copy = snapshot.parts["local"]
                self.events.write("bookend-copy", source=node_id, step=snapshot.inner_step)
                return

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
