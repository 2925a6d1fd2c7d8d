"""GetState's provider: the parts of this node's stage a recovering or joining peer asks for."""

from __future__ import annotations

from lowband.node.recovery.bookend import BookendCopy
from lowband.node.service import StateSnapshot
from lowband.node.stage_assembly import CurrentStage
from lowband.protocols.errors import ValidationError


class StateSource:
    """``local`` (the stage's weights and inner optimizer), ``global`` / ``outer`` (DiLoCo's θ_global and
    outer state, consistent with one inner step), ``bookend`` (the copy of stage 0 kept here) and
    ``buffers`` (the stage's persistent non-trained tensors, such as a subspace model's anchors: an
    export needs them beside θ_global for the file to load strictly)."""

    def __init__(self, current: CurrentStage, bookend: BookendCopy) -> None:
        self.current = current
        self.bookend = bookend

    async def __call__(self, stage: int, parts: list[str]) -> StateSnapshot:
        agent = self.current.agent
        if agent is None or agent.stage != stage:
            raise ValidationError(f"this node does not hold stage {stage}")
        snapshot = StateSnapshot(inner_step=agent.runtime.iteration, grad_norm=agent.runtime.last_grad_norm)
        outer = self.current.outer
        for part in parts:
            if part == "local":
                snapshot.parts["local"] = await agent.runtime.state()
            elif part == "buffers":
                params = {name for name, _ in agent.runtime.module.named_parameters()}
                snapshot.parts["buffers"] = {name: t.detach().clone() for name, t
                                             in agent.runtime.module.state_dict().items() if name not in params}
            elif part == "bookend" and self.bookend.copy is not None:
                snapshot.parts["bookend"] = self.bookend.copy
            elif part in ("global", "outer") and outer is not None:
                if part not in snapshot.parts:
                    outer_parts, step = await agent.runtime.run(outer.state_at, slow=False)
                    snapshot.parts.update(outer_parts)
                    snapshot.inner_step = max(snapshot.inner_step, step)
            else:
                raise ValidationError(f"state part {part!r} is not available on this node")
        snapshot.parts = {k: v for k, v in snapshot.parts.items() if k in parts}
        snapshot.outer_step = outer.outer_steps if outer is not None else 0
        return snapshot
