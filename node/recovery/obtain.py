"""Obtaining a stage's weights as a recovery plan says: copy a live replica, or rebuild from neighbours."""

from __future__ import annotations

import torch

from lowband.node.pipeline.transport import Transport
from lowband.node.recovery.checkfree import load_rebuilt, rebuild_stage
from lowband.protocols import coordinator_pb2 as pb
from lowband.protocols.errors import ValidationError
from lowband.protocols.state_client import StateSnapshot, fetch_state

STATE_TIMEOUT_S = 60.0       # copying a stage from a replica (large models take a while)


async def fetch_peer_state(transport: Transport, address: str, stage: int, parts: list[str],
                           requester_id: str) -> StateSnapshot:
    """GetState from the peer at ``address`` with this node's token, given a stage copy's time."""
    return await fetch_state(transport.stub(address), stage, parts, requester_id, metadata=transport.metadata,
                             timeout_s=STATE_TIMEOUT_S)


async def obtain_weights(transport: Transport, requester_id: str, module: torch.nn.Module, method: str,
                         plan: pb.RecoveryPlan, default_lr_scale: float
                         ) -> tuple[int, float, dict[str, dict[str, torch.Tensor]]]:
    """Fetch the plan's sources over GetState and load the result into ``module``.

    Returns (iteration, lr scale, the source's DiLoCo parts for a replica copy). ``default_lr_scale``
    (``recovery.lr_scale``) applies to a rebuild whose plan names none.
    """
    part = "bookend" if method == "bookend-copy" else "local"
    parts = [part, "global", "outer"] if method == "replica-copy" else [part]
    states: dict[int, dict[str, torch.Tensor]] = {}
    weights: dict[int, float] = {}
    iteration = 0
    outer_parts: dict[str, dict[str, torch.Tensor]] = {}
    for i, source in enumerate(plan.sources):
        snapshot = await fetch_peer_state(transport, source.address, source.stage, parts, requester_id)
        outer_parts = {k: v for k, v in snapshot.parts.items() if k in ("global", "outer")}
        if part not in snapshot.parts:
            raise ValidationError(f"source {source.node_id} sent no {part!r} state")
        states[source.stage] = snapshot.parts[part]
        weights[source.stage] = plan.weights[i] if i < len(plan.weights) else 1.0
        iteration = max(iteration, snapshot.inner_step)
    if method == "replica-copy":
        if not states:
            raise ValidationError("replica-copy plan names no source")
        state = next(iter(states.values()))
        lr_scale = 1.0
    else:
        # random-reinit keeps the module's own fresh initialisation.
        state = rebuild_stage(method, states, weights, fresh_state=module.state_dict())
        lr_scale = plan.lr_scale or default_lr_scale
    load_rebuilt(module, state)
    return iteration, lr_scale, outer_parts if method == "replica-copy" else {}
