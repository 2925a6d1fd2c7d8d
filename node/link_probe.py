"""Peer pings for the planner's link matrix: RTT from a small probe, bandwidth from a padded one.

A link's bandwidth changes far more slowly than its queueing delay, and the padded probe is most of
the prober's bytes (64 KiB per peer, against ~100 bytes for the RTT ping), so bandwidth is measured
once per ``LINK_BANDWIDTH_EVERY_S`` per peer and the last value is reported in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc

from lowband.node.coordinator_client import CoordinatorClient
from lowband.node.membership import Membership
from lowband.node.pipeline.transport import Transport
from lowband.node.stage_assembly import CurrentStage
from lowband.protocols import coordinator_pb2 as pb

LINK_PROBE_EVERY_S = 10.0    # how often peers are pinged for the planner's link matrix
LINK_PROBE_BYTES = 64 * 1024 # padding of the bandwidth probe
LINK_PROBE_PEERS = 32        # at most this many peers per report (the closest stages first)
LINK_PROBE_TIMEOUT_S = 5.0   # one ping; a peer slower than this is left out of the report
LINK_BANDWIDTH_EVERY_S = 300.0  # how often a peer's bandwidth is measured again (plans change on membership, not on drift)


class LinkProber:
    """Every ``LINK_PROBE_EVERY_S``, ping the closest peers and send the coordinator a ``LinkReport``."""

    def __init__(self, current: CurrentStage, membership: Membership, transport: Transport,
                 client: CoordinatorClient, stop_event: asyncio.Event) -> None:
        self.current = current
        self.membership = membership
        self.transport = transport
        self.client = client
        self.stop_event = stop_event
        self.bandwidth_every_s = LINK_BANDWIDTH_EVERY_S
        self._bandwidth: dict[str, tuple[float, float]] = {}   # peer id -> (bytes/s, monotonic time measured)

    async def run(self) -> None:
        while not self.stop_event.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), timeout=LINK_PROBE_EVERY_S)
            if self.current.agent is None or self.stop_event.is_set():
                continue
            report = await self.probe()
            if report.links:
                await self.client.report_links(report)

    async def probe(self) -> pb.LinkReport:
        """One round of pings from the current stage: peers in order of stage distance."""
        agent = self.current.agent
        node_id = self.membership.node_id
        report = pb.LinkReport(node_id=node_id)
        if agent is None:
            return report
        mine = agent.stage
        peers = sorted((abs(s - mine), n) for n, s in agent.schedule.stages.items() if n != node_id)
        for _, peer_id in peers[:LINK_PROBE_PEERS]:
            address = agent.schedule.addresses[peer_id]
            known = self._bandwidth.get(peer_id)
            try:
                rtt, _ = await self.transport.ping(address, timeout_s=LINK_PROBE_TIMEOUT_S)
                if known is None or time.monotonic() - known[1] >= self.bandwidth_every_s:
                    big, _ = await self.transport.ping(address, timeout_s=LINK_PROBE_TIMEOUT_S,
                                                       padding=LINK_PROBE_BYTES)
                    known = (LINK_PROBE_BYTES / max(big - rtt, 1e-6), time.monotonic())
                    self._bandwidth[peer_id] = known
            except grpc.aio.AioRpcError:
                continue
            report.links.add(peer_id=peer_id, rtt_s=rtt, bandwidth_bytes_per_s=known[0])
        # peers that left the schedule are measured afresh if they come back
        for gone in set(self._bandwidth) - set(agent.schedule.stages):
            del self._bandwidth[gone]
        return report
