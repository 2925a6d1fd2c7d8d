"""The node's metrics: what each heartbeat (and the leave) carries and each ``metrics`` record logs."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from lowband.node.pipeline.transport import Transport
from lowband.node.service import NodeServicer
from lowband.node.stage_assembly import CurrentStage
from lowband.node.sync.grpc_averager import Rejection
from lowband.protocols import coordinator_pb2 as pb


@dataclass(slots=True)
class TrainingCounters:
    """What an origin's loop counts (a stage node keeps the defaults)."""

    loss: float = math.nan       # last iteration's mean loss
    val_loss: float = math.nan   # last validation
    tokens: int = 0              # tokens trained on since the node joined
    started: float = 0.0         # monotonic time of the first iteration (0: not yet)
    tokens_at_start: int = 0     # ``tokens`` then: tokens_per_s counts this node's training only


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0


def node_metrics(counters: TrainingCounters, current: CurrentStage, transport: Transport,
                 servicer: NodeServicer) -> pb.NodeMetrics:
    """A snapshot of the node's counters; unknown losses are 0 (the message has no NaN convention)."""
    agent, outer = current.agent, current.outer
    elapsed = time.monotonic() - counters.started if counters.started else 0.0
    tokens = counters.tokens - counters.tokens_at_start
    sync_bytes = outer.wire_bytes_sent if outer is not None else 0
    reducer = outer.reducer if outer is not None else None   # None: a backend that takes no ReduceShard calls
    return pb.NodeMetrics(
        step=agent.runtime.iteration if agent else 0,
        loss=_finite(counters.loss),
        tokens_per_s=tokens / elapsed if elapsed > 0 else 0.0,
        bytes_sent=transport.bytes_sent + servicer.state_bytes_sent + sync_bytes,
        bytes_received=servicer.bytes_received,
        grad_norm=agent.runtime.last_grad_norm if agent else 0.0,
        activation_bytes_sent=transport.activation_bytes_sent,
        outer_step=outer.outer_steps if outer is not None else 0,
        sync_bytes_sent=sync_bytes,
        val_loss=_finite(counters.val_loss),
        tokens=counters.tokens,
        state_bytes_sent=servicer.state_bytes_sent,
        rejected_updates=reducer.rejected_total if reducer is not None else 0,
        rejected_peers=dict(reducer.rejected_by_peer) if reducer is not None else {},
        last_rejection=_rejection(reducer.last_rejection) if reducer is not None else "",
    )


def _rejection(r: Rejection | None) -> str:
    """One line for the coordinator's records: which round, which peer, why."""
    return "" if r is None else f"round {r.round_id} stage {r.stage} fragment {r.fragment}: peer {r.peer}: {r.why}"


def metrics_record(metrics: pb.NodeMetrics) -> dict[str, Any]:
    """The fields of a ``metrics`` record: every field of ``NodeMetrics``, zeros included (maps as dicts)."""
    out: dict[str, Any] = {}
    for field in metrics.DESCRIPTOR.fields:
        value = getattr(metrics, field.name)
        out[field.name] = dict(value) if hasattr(value, "items") else value
    return out
