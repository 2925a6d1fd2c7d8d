"""DiLoCo resync: a replica that fell behind its stage's group adopts a peer's θ_global and outer state.

Two callers: ``OuterSync`` when a round formed without this replica (``outer-resync``), and the
train loop for a standby replica, one the plan leaves idle, every few heartbeats (``standby-resync``),
so a later plan or a CheckFree copy that relies on it finds current weights.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable

import grpc

from lowband.node.event_log import EventLog
from lowband.node.membership import Membership
from lowband.node.pipeline.agent import PipelineAgent
from lowband.node.pipeline.transport import Transport
from lowband.node.recovery.obtain import fetch_peer_state
from lowband.node.stage_assembly import CurrentStage
from lowband.protocols.errors import ValidationError

logger = logging.getLogger(__name__)

PING_TIMEOUT_S = 5.0           # asking a peer how far its outer state is
RESYNC_PEERS = 3               # replicas asked per resync (a Ping each)
STANDBY_RESYNC_HEARTBEATS = 4  # an idle replica (no visits in the plan) copies the group's θ_global this often


class OuterResync:
    """Adopt the outer state of the replica of our stage that is furthest ahead."""

    def __init__(self, current: CurrentStage, membership: Membership, transport: Transport, events: EventLog, *,
                 data_parallel: bool) -> None:
        self.current = current
        self.membership = membership
        self.transport = transport
        self.events = events
        self.data_parallel = data_parallel   # model.stages = 1: replicas are not held at one inner step

    async def __call__(self, *, standby: bool = False) -> None:
        """This replica missed outer rounds: adopt θ_global and the outer state of the replica of our
        stage that is furthest ahead (it contributes again from its next round). A ``standby`` replica
        (one the plan leaves idle) also takes θ_global as its local weights: it has trained nothing since.
        A training replica adopts only the fragments where the source is ahead (``OuterSync.load_parts``):
        it can be behind in the fragment whose round it missed while level or ahead in total, so it asks
        its peers in turn, not only those ahead in total."""
        agent, outer = self.current.agent, self.current.outer
        if agent is None or outer is None:
            return
        node_id = self.membership.node_id
        # Ask first (a Ping: a few bytes), copy second (θ_global and the outer state: twice the stage's
        # size), from the replica furthest ahead first: a standby asks every few heartbeats.
        ahead: list[tuple[int, str, str]] = []
        peers = sorted(n for n, s in agent.schedule.stages.items() if s == agent.stage and n != node_id)
        for peer_id in peers[:RESYNC_PEERS]:
            address = agent.schedule.addresses.get(peer_id)
            if address is None:
                continue
            try:
                _, pong = await self.transport.ping(address, timeout_s=PING_TIMEOUT_S)
            except grpc.aio.AioRpcError:
                continue
            if pong.stage == agent.stage and (pong.outer_steps > outer.total_outer_steps() or not standby):
                ahead.append((pong.outer_steps, peer_id, address))
        for _, peer_id, address in sorted(ahead, reverse=True):
            try:
                snapshot = await fetch_peer_state(self.transport, address, agent.stage, ["global", "outer"], node_id)
            except (grpc.aio.AioRpcError, ValidationError) as exc:
                logger.info("outer state from %s unavailable: %s", peer_id, exc)
                continue
            steps_t = snapshot.parts.get("outer", {}).get("steps")
            steps = int(steps_t.sum()) if steps_t is not None else 0
            if standby and steps <= outer.total_outer_steps():
                return
            # Data-parallel mode: no pipeline keeps the replicas at one inner step, so one that missed a
            # round may be many steps behind: it also jumps to the source's step (skipping that data).
            open_at = snapshot.inner_step if self.data_parallel and not standby else None
            try:
                adopted = await agent.runtime.run(functools.partial(outer.load_parts, reset_local=standby,
                                                                    catch_up=not standby, open_at=open_at),
                                                  snapshot.parts, slow=False)
            except ValueError as exc:
                logger.warning("outer state from %s unusable: %s", peer_id, exc)
                continue
            if open_at is not None:
                # never further than the source: a replica ahead of its group would open rounds alone
                agent.note_open_iteration(open_at)
            elif not adopted:
                continue   # not ahead in any fragment: ask the next replica
            self.events.write("standby-resync" if standby else "outer-resync", source=peer_id, outer_steps=steps,
                              fragments=adopted, inner_step=snapshot.inner_step)
            return


class StandbyResync:
    """A replica the settled plan routes no microbatch through (the planner left it out: too slow or too
    far) while another replica of its stage works takes no inner steps and joins no sync round, so it
    follows the group instead: it copies the group's state every few heartbeats."""

    def __init__(self, resync: OuterResync, membership: Membership, settled: Callable[[], bool],
                 heartbeat_s: float) -> None:
        self.resync = resync
        self.membership = membership
        self.settled = settled
        # a state fetch is one GetState call; outer rounds come every H inner steps, far less often
        self.every_s = STANDBY_RESYNC_HEARTBEATS * heartbeat_s
        self._last = 0.0

    def idle(self, agent: PipelineAgent) -> bool:
        node_id = self.membership.node_id
        return (not agent.is_origin and not agent.schedule.visits and self.settled()
                and any(s == agent.stage and n != node_id for n, s in agent.schedule.stages.items()))

    async def follow(self, agent: PipelineAgent) -> None:
        """Resync if ``agent`` stands by and the last copy is a few heartbeats old."""
        if self.idle(agent) and time.monotonic() - self._last > self.every_s:
            # keep θ_global current, so that a new plan or a CheckFree recovery that puts this
            # replica back to work (or copies from it) starts from the group's weights
            self._last = time.monotonic()
            await self.resync(standby=True)
