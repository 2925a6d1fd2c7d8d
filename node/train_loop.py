"""The node's training loop: origins iterate, stage nodes serve; and when a node's run is over.

A node's run ends after ``train.steps`` iterations (an origin validates once more; a stage node
serves the origins' final validation first), when an origin has had no complete pipeline for many
leases, or when a stage node has had no origin for a long while.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from lowband.node.event_log import EventLog
from lowband.node.metrics import TrainingCounters
from lowband.node.origin_loop import NO_PIPELINE_FACTOR, OriginLoop
from lowband.node.pipeline.agent import PipelineAgent
from lowband.node.recovery.resync import StandbyResync
from lowband.node.schedule_keeper import ScheduleKeeper
from lowband.node.stage_assembly import CurrentStage
from lowband.protocols.config import RunConfig

DRAIN_TIMEOUT_S = 5.0        # let the last pushes of the final iteration go out before exiting
ORIGIN_PATIENCE_S = 60.0     # how long stage nodes wait for replacement origins
NO_STAGE_POLL_S = 0.1        # before the node holds a stage
STAGE_NODE_POLL_S = 0.2      # a stage node's loop: serving happens in the agent, this only watches


class TrainLoop:
    """Runs until this node's part of the run is over, then calls ``stop`` with the reason."""

    def __init__(self, config: RunConfig, *, current: CurrentStage, origin: OriginLoop, standby: StandbyResync,
                 schedule: ScheduleKeeper, counters: TrainingCounters, events: EventLog,
                 stop: Callable[[str], None], stop_event: asyncio.Event, lease_s: float) -> None:
        self.config = config
        self.current = current
        self.origin = origin
        self.standby = standby
        self.schedule = schedule
        self.counters = counters
        self.events = events
        self.stop = stop
        self.stop_event = stop_event
        self.lease_s = lease_s
        self._no_origin_since: float | None = None

    async def run(self) -> None:
        steps = self.config.train.steps
        while not self.stop_event.is_set():
            agent = self.current.agent
            if agent is None:
                await asyncio.sleep(NO_STAGE_POLL_S)
                continue
            if agent.runtime.iteration >= steps:
                if agent.is_origin:
                    await self.origin.evaluate(agent, agent.runtime.iteration)
                else:   # serve the origins' final evaluation until they leave
                    await self._linger(agent)
                await self._drain(agent)
                await self._final_record(agent)
                self.stop(f"finished {steps} iterations")
                return
            if agent.is_origin:
                reason = await self.origin.turn(agent)
                if reason:
                    self.stop(reason)
                    return
            else:
                if self._origins_gone(agent):
                    await self._drain(agent)
                    self.stop("no origin left in the run")
                    return
                await self.standby.follow(agent)
                await asyncio.sleep(STAGE_NODE_POLL_S)

    async def _final_record(self, agent: PipelineAgent) -> None:
        """``final``: each fragment's outer step and a digest of its θ_global, so a run's log shows whether
        the replicas of a stage ended in agreement (equal outer steps must mean equal digests). Once per
        run, and only when events are logged: it reads every weight of the stage."""
        outer = self.current.outer
        if outer is None or not self.events.enabled:
            return
        digests = await agent.runtime.run(outer.diloco.global_digests, slow=False)
        self.events.write("final", step=agent.runtime.iteration, outer_steps=dict(outer.diloco.outer.steps),
                          global_digest=digests)

    def _origins_gone(self, agent: PipelineAgent) -> bool:
        """A stage node with no origin in its schedule for a long while after training began is done.

        Losing every origin is recoverable (replacements rebuild stage 0 from the bookend copies
        this node keeps), so the patience is long; the normal end of a run is the coordinator's
        SHUTDOWN, not this.
        """
        has_origin = any(s == 0 for s in agent.schedule.stages.values())
        if has_origin or (self.counters.started == 0.0 and agent.runtime.iteration == 0):
            self._no_origin_since = None
            return False
        now = time.monotonic()
        if self._no_origin_since is None:
            self._no_origin_since = now
        return now - self._no_origin_since > max(ORIGIN_PATIENCE_S, 20 * self.lease_s)

    async def _linger(self, agent: PipelineAgent) -> None:
        """Wait (bounded) until no origin is left in the schedule."""
        # A lagging origin finishes quickly: its microbatches are refused as stale and it catches up.
        deadline = time.monotonic() + max(NO_PIPELINE_FACTOR * self.lease_s, 2 * self.config.train.hop_timeout_s)
        while time.monotonic() < deadline and not self.stop_event.is_set():
            if not any(s == 0 for s in agent.schedule.stages.values()):
                return
            await self.schedule.wait_changed(0.5)

    @staticmethod
    async def _drain(agent: PipelineAgent) -> None:
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while agent._tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
