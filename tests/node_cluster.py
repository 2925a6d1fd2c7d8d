"""In-process pipeline clusters for node tests: real gRPC servers (and activation wires) on port 0, one event loop."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import grpc
import torch
from torch import nn

from lowband.node.pipeline.agent import PathSpec, PipelineAgent, Schedule
from lowband.node.pipeline.runtime import StageRuntime
from lowband.node.pipeline.transport import LinkTable, Transport
from lowband.node.pipeline.wire import WireServer
from lowband.node.service import NodeServicer, start_server, start_wire
from lowband.protocols.peer_guard import GuardPolicy
from lowband.protocols.subspace import SubspaceBasis

TOKEN = "test-token"
RUN_ID = "test-run"


@dataclass
class LocalNode:
    node_id: str
    stage: int
    runtime: StageRuntime
    agent: PipelineAgent
    servicer: NodeServicer
    server: grpc.aio.Server
    address: str
    transport: Transport
    failures: list[tuple[str, str]] = field(default_factory=list)
    wire: WireServer | None = None

    async def stop(self) -> None:
        await self.agent.close()
        if self.wire is not None:
            await self.wire.stop()
        await self.server.stop(None)
        await self.transport.close()
        self.runtime.shutdown()


async def start_node(node_id: str, stage: int, module: nn.Module, *, dim: int, max_seq_len: int,
                     optimizer: torch.optim.Optimizer | None = None, codec: str = "fp32",
                     gradient_codec: str | None = None, subspace: SubspaceBasis | None = None,
                     hop_timeout_s: float = 3.0, iteration_timeout_s: float = 5.0,
                     links: LinkTable | None = None, wire: bool = True,
                     bad_input: GuardPolicy | None = None) -> LocalNode:
    """A node as the daemon builds one; ``wire=False``: activations by gRPC only (no wire server,
    and its transport never tries one); ``bad_input``: its servers' cool-down policy (protocols/peer_guard.py)."""
    if optimizer is None:
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    runtime = StageRuntime(module, stage, optimizer, iteration_timeout_s=iteration_timeout_s)
    servicer = NodeServicer(node_id)
    servicer.stage = stage
    server, port = await start_server(servicer, "127.0.0.1:0", TOKEN, bad_input=bad_input)
    wire_server = await start_wire(servicer, "127.0.0.1", TOKEN, bad_input=bad_input) if wire else None
    transport = Transport(TOKEN, links=links, wire=wire)
    failures: list[tuple[str, str]] = []

    async def on_failure(suspect: str, reason: str) -> None:
        failures.append((suspect, reason))

    agent = PipelineAgent(node_id, RUN_ID, runtime, transport, dim=dim, max_seq_len=max_seq_len, codec=codec,
                          gradient_codec=gradient_codec, subspace=subspace, hop_timeout_s=hop_timeout_s,
                          on_failure=on_failure)
    servicer.agent = agent
    return LocalNode(node_id, stage, runtime, agent, servicer, server, f"127.0.0.1:{port}", transport, failures,
                     wire_server)


@asynccontextmanager
async def stopping(nodes: list[LocalNode]) -> AsyncIterator[list[LocalNode]]:
    """``async with stopping(nodes) as nodes:`` — every node in the list when the block ends (appended inside it
    too) is stopped, whatever happened: a failing test leaves no server, wire or runtime thread behind."""
    try:
        yield nodes
    finally:
        for node in nodes:
            await node.stop()


def install_schedule(nodes: list[LocalNode], paths: dict[str, list[PathSpec]], epoch: int = 1,
                     only: list[LocalNode] | None = None) -> None:
    """Give every node (or those in ``only``) the same peer table, its origin paths, and the visits through it."""
    addresses = {n.node_id: n.address for n in nodes}
    stages = {n.node_id: n.stage for n in nodes}
    for node in nodes if only is None else only:
        visits: dict[str, int] = {}
        for origin, plist in paths.items():
            count = sum(1 for p in plist if node.node_id in p.node_ids[1:-1])
            if count:
                visits[origin] = count
        node.agent.set_schedule(Schedule(epoch=epoch, paths=list(paths.get(node.node_id, [])),
                                         addresses=addresses, stages=stages, visits=visits))
