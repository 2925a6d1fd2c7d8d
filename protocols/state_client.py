"""Client side of a node's GetState: a stage's tensors by part, reassembled and decoded.

It lives in ``protocols`` because two sides use it: a node copying a stage from a replica
(``node.recovery.obtain``) and ``lowband-coordinator export`` fetching every stage's θ_global,
which must not import node code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lowband.protocols import node_pb2, node_pb2_grpc
from lowband.protocols.chunking import ChunkAssembler
from lowband.protocols.codec import decode
from lowband.protocols.errors import ValidationError

MAX_STATE_TENSOR_BYTES = 512 * 1024 * 1024   # hard cap on one reassembled tensor


@dataclass(slots=True)
class StateSnapshot:
    """What GetState streams: tensors per part, and the counters that travel with them."""

    parts: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    inner_step: int = 0
    outer_step: int = 0
    grad_norm: float = 0.0


async def fetch_state(stub: node_pb2_grpc.NodeStub, stage: int, parts: list[str], requester_id: str, *,
                      metadata: Any, timeout_s: float, max_bytes: int = MAX_STATE_TENSOR_BYTES
                      ) -> StateSnapshot:
    """Every tensor of the requested parts, reassembled and decoded (non-finite values refused).

    ``timeout_s`` bounds the whole stream: a stage copy of a large model takes a while, so callers
    give tens of seconds, not the milliseconds of a control call.
    """
    snapshot = StateSnapshot()
    assembler: ChunkAssembler | None = None
    current: tuple[str, str] | None = None
    call = stub.GetState(node_pb2.StateRequest(stage=stage, parts=parts, requester_id=requester_id),
                         timeout=timeout_s, metadata=metadata)
    async for message in call:
        if message.chunk.seq == 0:
            assembler = ChunkAssembler(max_bytes)
            current = (message.part, message.name)
        if assembler is None or current != (message.part, message.name):
            raise ValidationError("state stream out of order")
        assembler.add(message.chunk)
        snapshot.inner_step, snapshot.outer_step = message.inner_step, message.outer_step
        snapshot.grad_norm = message.grad_norm
        if message.chunk.seq + 1 == message.chunk.num_chunks:
            tensor = decode(assembler.finish(), require_finite=True)
            snapshot.parts.setdefault(current[0], {})[current[1]] = tensor
            assembler, current = None, None
    return snapshot
