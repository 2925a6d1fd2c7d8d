"""How ``OuterSync`` averages one round's pseudo-gradient: ``diloco.backend`` picks one backend, here.

The coordinator's round (JoinSyncRound) is the same for every backend: it decides the
participants, the outer step, who is stale or behind, and when a round is abandoned. A
backend only turns this replica's ``job.delta`` and the formed round into the mean:

- ``grpc``: reduce-scatter + all-gather over the Node service's ReduceShard
  (``lowband.node.sync.grpc_averager``); this node also owns a shard, so it serves
  ReduceShard (``reducer``);
- ``hivemind``: hivemind's DHT and butterfly all-reduce
  (``lowband.node.sync.hivemind_averager``); no ReduceShard to serve.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from lowband.node.sync.diloco import SyncJob
from lowband.node.sync.grpc_averager import ChannelPool, ShardReducer, average_job
from lowband.protocols import coordinator_pb2 as pb
from lowband.protocols.config import ConfigError, DilocoSection


@dataclass(slots=True)
class Averaged:
    """One round's outcome for this replica: what ``finish_sync`` gets, and what the log records."""

    mean: torch.Tensor | None              # None: nothing averaged, the round changes nothing
    valid: torch.Tensor | None = None      # flat bool, False where a part of the mean was lost
    bytes_sent: int = 0                    # what this replica put on the wire as a caller
    fields: dict[str, Any] = field(default_factory=dict)   # backend-specific, for the outer-sync record


class AveragingBackend(Protocol):
    name: str
    reducer: ShardReducer | None   # served as ReduceShard by the node's servicer (None: not served)

    @property
    def maddrs(self) -> list[str]:
        """What this replica tells the coordinator's round about where peers reach its backend."""
        ...

    @property
    def served_bytes(self) -> int:
        """Bytes sent answering peers (counted apart from ``Averaged.bytes_sent``)."""
        ...

    async def start(self) -> None: ...

    async def average(self, job: SyncJob, reply: pb.SyncRoundReply, my_index: int) -> Averaged:
        """The mean of the round's pseudo-gradients; never raises for a peer's failure."""
        ...

    async def close(self) -> None: ...


class GrpcBackend:
    """ReduceShard between the participants' node services (the round's order decides shard owners)."""

    name = "grpc"

    def __init__(self, cfg: DilocoSection, *, stage: int, node_id: str, token: str) -> None:
        self.cfg = cfg
        self.stage = stage
        self.node_id = node_id
        self.reducer: ShardReducer | None = ShardReducer.from_config(cfg, node_id, require_roster=True)
        self.channels = ChannelPool(token)

    @property
    def maddrs(self) -> list[str]:
        return []   # peers reach ReduceShard at the address the node joined with

    @property
    def served_bytes(self) -> int:
        return self.reducer.bytes_sent if self.reducer is not None else 0

    async def start(self) -> None:
        return None

    async def average(self, job: SyncJob, reply: pb.SyncRoundReply, my_index: int) -> Averaged:
        assert self.reducer is not None
        mean, stats = await average_job(
            job, [p.address for p in reply.participants], my_index, round_id=reply.round_id, cfg=self.cfg,
            reducer=self.reducer, channels=self.channels, stage=self.stage, node_id=self.node_id,
            participants=[p.node_id for p in reply.participants])
        return Averaged(mean, stats.valid, stats.bytes_sent, fields={"lost_shards": stats.lost_shards})

    async def close(self) -> None:
        await self.channels.close()


def require_backend(cfg: DilocoSection) -> None:
    """Refuse, before any stage is built, a backend this install cannot run (hivemind is an extra)."""
    if cfg.backend == "hivemind" and importlib.util.find_spec("hivemind") is None:
        raise ConfigError("diloco.backend: 'hivemind' needs hivemind installed on every node "
                          "(pip install 'lowband[hivemind]'), or use 'grpc'")


def make_backend(cfg: DilocoSection, fragment_numels: list[int], *, run_id: str, stage: int, node_id: str,
                 token: str, host: str) -> AveragingBackend:
    """The backend ``cfg.backend`` names (the config accepts only "grpc" and "hivemind")."""
    if cfg.backend == "hivemind":
        # hivemind is an optional extra (pip install lowband[hivemind]): imported only by runs that use it
        from lowband.node.sync.hivemind_averager import HivemindBackend

        return HivemindBackend(fragment_numels, run_id=run_id, stage=stage, node_id=node_id, cfg=cfg, host=host)
    return GrpcBackend(cfg, stage=stage, node_id=node_id, token=token)
