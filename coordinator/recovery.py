"""CheckFree / CheckFree+ recovery planning (pure: no I/O, no torch).

When a node's lease expires the coordinator asks :func:`plan_recovery` what to
do about its stage. The answer, a :class:`RecoveryPlan`, names *how* the stage
gets its weights back, *from whom*, with *which weights*, and *which node*
hosts it. The node executes the plan with ``node/recovery/checkfree.py``; nothing on
this path ever reads or writes a checkpoint file.

Methods, in the order they are tried:

``replica-copy``
    The stage still has a live replica. The replacement copies θ_global, the
    outer optimizer state and the local weights from it (parts
    ``local``/``global``/``outer``). Always preferred: it loses nothing.
``checkfree``
    Every replica of an intermediate stage ``i`` (``2 <= i <= S-2``) is gone.
    Block by block ``W_i = (a·W_{i+1} + b·W_{i-1}) / (a + b)`` with
    ``a = ‖g_{i+1}‖ + ε`` (the *next* stage's last gradient norm) and
    ``b = ‖g_{i-1}‖ + ε`` (the *previous* stage's). ε is added to both norms so
    two zero (or never reported) norms give a plain mean rather than 0/0.
``checkfree-plus``
    An edge stage (1 or S-1) has a single block neighbour, so averaging is not
    possible. Under CheckFree+ training, half of the microbatches run stages
    1↔2 and S-2↔S-1 swapped, so stage 2 learns to stand in for stage 1 and
    stage S-2 for stage S-1: the lost edge is rebuilt by copying that neighbour.
``bookend-copy``
    Stage 0 (embedding, final norm, head) is small; each replica of stages 1
    and S-1 keeps a full copy of it, refreshed at outer syncs (part
    ``bookend``). Stage 1's copy is preferred (it is the embedding's neighbour),
    stage S-1's is the fallback.
``random-reinit``
    The last resort (and the whole of ``recovery.method = "random-reinit"``):
    the stage restarts from fresh random weights. A plan that falls back to it
    always says why in ``notes``.

Data-parallel mode (``num_stages = 1``): every node is a replica of stage 0, so a
lost replica is a ``replica-copy`` from a live one; there are no neighbours and
no bookend holders, so losing every replica can only be ``random-reinit``.

A rebuilt stage (every method but ``replica-copy``) starts a fresh inner
optimizer at ``lr_scale`` times the learning rate (paper: 1.1) and joins the next
outer sync with its rebuilt weights as θ_global.

Two adjacent stages lost (a needed neighbour is itself dead): the plan reaches
for the *nearest live block stage* on that side (``i+2``, ``i+3``, … or
``i-2``, …) and uses its gradient norm in the formula; if one side has no live
block stage at all, the stage copies the nearest live one on the other side;
if no block stage lives, it is randomly re-initialised. Every such fallback is
listed in ``plan.notes``. When several stages are lost at once,
:func:`recovery_order` gives the order to rebuild them in so that each rebuild
can use the stages rebuilt before it (the coordinator re-plans after each one
reports success, counting the rebuilt node as live).

Replacement choice: a free node (joiner or spare) first, fastest first. With no
free node, a node moves from the best-covered stage (most live replicas, ties
by total throughput), and only from a stage that keeps at least one replica, so
a recovery never empties another stage. Of that stage's nodes, the one whose
throughput is closest to half the stage's total moves, which keeps the slower
of the two stages as fast as possible. With nothing to spare, the plan has
``replacement=None``: re-plan when a node joins.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lowband.protocols import coordinator_pb2
from lowband.protocols.config import RecoverySection

log = logging.getLogger(__name__)

REPLICA_COPY = "replica-copy"
CHECKFREE = "checkfree"
CHECKFREE_PLUS = "checkfree-plus"
BOOKEND_COPY = "bookend-copy"
RANDOM_REINIT = "random-reinit"
METHODS = (REPLICA_COPY, CHECKFREE, CHECKFREE_PLUS, BOOKEND_COPY, RANDOM_REINIT)

# recovery.method values (protocols/config.py RECOVERY_METHODS) -> planning mode.
MODES = ("checkfree-plus", "checkfree", "random-reinit", "none")

# Which parts of a source's state (node.proto StateRequest.parts) each method reads.
PARTS: dict[str, tuple[str, ...]] = {
    REPLICA_COPY: ("local", "global", "outer"),
    CHECKFREE: ("local",),
    CHECKFREE_PLUS: ("local",),
    BOOKEND_COPY: ("bookend",),
    RANDOM_REINIT: (),
}


class RecoveryError(ValueError):
    """Recovery cannot be planned: bad input or ``recovery.method = "none"``."""


@dataclass(frozen=True, slots=True)
class NodeRef:
    """A node as the planner sees it: id, node-service address, measured speed."""

    node_id: str
    address: str = ""
    throughput: float = 0.0     # any consistent unit (tokens/s); only compared


@dataclass(frozen=True, slots=True)
class RecoveryPlan:
    """What to do about one stage; see the module docstring for the methods.

    ``sources`` maps a source stage to the live node ids that can serve it,
    best first (the replacement tries them in order and needs one per stage).
    ``weights`` maps the same stages to their share of the rebuilt weights
    (summing to 1; a copy is ``{stage: 1.0}``). ``addresses`` resolves every
    node id in the plan. ``moved_from`` is the stage the replacement leaves
    (None for a joiner or spare).
    """

    stage: int
    method: str
    replacement: str | None
    sources: dict[int, tuple[str, ...]]
    weights: dict[int, float]
    lr_scale: float
    parts: tuple[str, ...] = ()
    moved_from: int | None = None
    addresses: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def fresh_optimizer(self) -> bool:
        """Every rebuild starts a fresh inner optimizer; a replica copy does not need to."""
        return self.method != REPLICA_COPY

    def peers(self) -> list[tuple[str, str, int, float]]:
        """Flat ``(node_id, address, stage, weight)`` rows, one per source node.

        The shape of ``coordinator.proto`` ``RecoveryPlan.sources``/``weights``
        (one weight per source; every node of a stage carries its stage's weight).
        """
        return [
            (node_id, self.addresses.get(node_id, ""), stage, self.weights.get(stage, 0.0))
            for stage, ids in sorted(self.sources.items())
            for node_id in ids
        ]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form for the coordinator's event log and status."""
        return {
            "stage": self.stage,
            "method": self.method,
            "replacement": self.replacement,
            "moved_from": self.moved_from,
            "sources": {str(s): list(ids) for s, ids in self.sources.items()},
            "weights": {str(s): w for s, w in self.weights.items()},
            "lr_scale": self.lr_scale,
            "parts": list(self.parts),
            "notes": list(self.notes),
        }


def plan_to_proto(plan: RecoveryPlan, plan_id: int) -> coordinator_pb2.RecoveryPlan:
    """The wire form sent to the replacement (one PeerInfo and one weight per source node)."""
    msg = coordinator_pb2.RecoveryPlan(stage=plan.stage, method=plan.method, lr_scale=plan.lr_scale,
                                       plan_id=plan_id)
    for node_id, address, stage, weight in plan.peers():
        msg.sources.add(node_id=node_id, address=address, stage=stage)
        msg.weights.append(weight)
    return msg


def _as_ref(item: NodeRef | str | tuple[Any, ...]) -> NodeRef:
    if isinstance(item, NodeRef):
        return item
    if isinstance(item, str):
        return NodeRef(item)
    if isinstance(item, tuple) and 1 <= len(item) <= 3 and isinstance(item[0], str):
        return NodeRef(*item)
    raise RecoveryError(f"expected a node id, (node_id, address[, throughput]) or NodeRef, got {item!r}")


def _normalise_live(live: Mapping[int, Sequence[NodeRef | str | tuple[Any, ...]]],
                    num_stages: int) -> dict[int, list[NodeRef]]:
    out: dict[int, list[NodeRef]] = {s: [] for s in range(num_stages)}
    seen: dict[str, int] = {}
    for stage, nodes in live.items():
        if not isinstance(stage, int) or not 0 <= stage < num_stages:
            raise RecoveryError(f"live: stage {stage!r} is outside 0..{num_stages - 1}")
        for item in nodes:
            ref = _as_ref(item)
            if ref.node_id in seen:
                raise RecoveryError(f"live: node {ref.node_id!r} listed in stages {seen[ref.node_id]} and {stage}")
            seen[ref.node_id] = stage
            out[stage].append(ref)
    return out


def is_edge(stage: int, num_stages: int) -> bool:
    """Stages 1 and S-1 have a single block neighbour."""
    return stage in (1, num_stages - 1) and stage != 0


def edge_partner(stage: int, num_stages: int) -> int | None:
    """The neighbour CheckFree+ trains to stand in for an edge stage (2 for 1, S-2 for S-1).

    None when the edge has no block neighbour (S = 2: stage 1 is the only block stage).
    """
    if stage == 1:
        partner = 2
    elif stage == num_stages - 1:
        partner = num_stages - 2
    else:
        raise RecoveryError(f"stage {stage} is not an edge stage of a {num_stages}-stage pipeline")
    return partner if 1 <= partner <= num_stages - 1 and partner != stage else None


def checkfree_weights(next_norm: float | None, prev_norm: float | None, epsilon: float) -> tuple[float, float]:
    """Normalised ``(w_next, w_prev)`` of the CheckFree average.

    ``a = ‖g_{i+1}‖ + ε`` weights the NEXT stage, ``b = ‖g_{i-1}‖ + ε`` the
    PREVIOUS one; the result is ``(a/(a+b), b/(a+b))``. A norm that is missing
    or not a finite non-negative number counts as unknown, and an unknown norm
    makes both weights 1/2 (one reported norm says nothing about the other).
    """
    def usable(x: float | None) -> bool:
        return x is not None and math.isfinite(x) and x >= 0

    if not (usable(next_norm) and usable(prev_norm)):
        return 0.5, 0.5
    a = float(next_norm) + epsilon  # type: ignore[arg-type]
    b = float(prev_norm) + epsilon  # type: ignore[arg-type]
    if a + b <= 0:
        return 0.5, 0.5
    return a / (a + b), b / (a + b)


def _nearest_live(stage: int, step: int, live: dict[int, list[NodeRef]], num_stages: int) -> int | None:
    """Nearest block stage (1..S-1) beyond ``stage`` in direction ``step`` that has a live node."""
    s = stage + step
    while 1 <= s <= num_stages - 1:
        if live[s]:
            return s
        s += step
    return None


def _choose_replacement(stage: int, live: dict[int, list[NodeRef]],
                        candidates: Sequence[NodeRef | str | tuple[Any, ...]],
                        allow_move: bool, min_donor_replicas: int) -> tuple[NodeRef | None, int | None]:
    live_ids = {ref.node_id for refs in live.values() for ref in refs}
    free = []
    for item in candidates:
        ref = _as_ref(item)
        if ref.node_id in live_ids:
            raise RecoveryError(f"candidates: node {ref.node_id!r} already hosts a live stage; "
                                "list only joiners and spares (moves are planned from `live`)")
        free.append(ref)
    if free:
        return min(free, key=lambda r: (-r.throughput, r.node_id)), None
    if not allow_move:
        return None, None
    donors = [s for s, refs in live.items() if s != stage and len(refs) >= min_donor_replicas]
    if not donors:
        return None, None
    donor = max(donors, key=lambda s: (len(live[s]), sum(r.throughput for r in live[s]), -s))
    total = sum(r.throughput for r in live[donor])
    # Keep min(total - x, x) as large as possible: the slower of the two stages bounds the pipeline.
    mover = min(live[donor], key=lambda r: (abs(total / 2 - r.throughput), r.node_id))
    return mover, donor


def plan_recovery(
    stage: int,
    num_stages: int,
    live: Mapping[int, Sequence[NodeRef | str | tuple[Any, ...]]],
    candidates: Sequence[NodeRef | str | tuple[Any, ...]] = (),
    grad_norms: Mapping[int, float] | None = None,
    lr_scale: float = 1.1,
    epsilon: float = 1e-8,
    *,
    mode: str = "checkfree-plus",
    allow_move: bool = True,
) -> RecoveryPlan:
    """Plan how ``stage`` gets a node and weights back after losing one or all replicas.

    ``live``: stage -> its live nodes (ids, ``(id, address[, throughput])`` or
    :class:`NodeRef`); the lost stage may be absent or list its survivors.
    ``candidates``: free nodes (joiners, spares) that may host the stage.
    ``grad_norms``: stage -> last gradient norm reported by that stage's nodes.
    ``mode``: ``recovery.method`` (``checkfree-plus``, ``checkfree``: edges and
    stage 0 fall back to random re-init, as plain CheckFree cannot rebuild
    them; ``random-reinit``; ``none``: a wiped stage raises RecoveryError).
    ``allow_move``: whether a node may leave another (multi-replica) stage.
    """
    if num_stages < 1:
        raise RecoveryError(f"num_stages must be >= 1, got {num_stages}")
    if not isinstance(stage, int) or not 0 <= stage < num_stages:
        raise RecoveryError(f"stage {stage!r} is outside 0..{num_stages - 1}")
    if not (lr_scale > 0 and math.isfinite(lr_scale)):
        raise RecoveryError(f"lr_scale must be a finite number > 0, got {lr_scale}")
    if not (epsilon >= 0 and math.isfinite(epsilon)):
        raise RecoveryError(f"epsilon must be a finite number >= 0, got {epsilon}")
    if mode not in MODES:
        raise RecoveryError(f"mode must be one of {MODES}, got {mode!r}")
    norms = dict(grad_norms or {})
    nodes = _normalise_live(live, num_stages)
    addresses = {r.node_id: r.address for refs in nodes.values() for r in refs}
    notes: list[str] = []

    def ids(s: int, exclude: str | None) -> tuple[str, ...]:
        return tuple(r.node_id for r in nodes[s] if r.node_id != exclude)

    survivors = nodes[stage]
    if survivors:
        # A replica lives: copy it. Move a node in only if that evens coverage out.
        mover, donor = _choose_replacement(stage, nodes, candidates, allow_move,
                                           min_donor_replicas=len(survivors) + 2)
        if mover is not None:
            addresses[mover.node_id] = mover.address
        return RecoveryPlan(
            stage=stage, method=REPLICA_COPY, replacement=mover.node_id if mover else None,
            sources={stage: ids(stage, None)}, weights={stage: 1.0}, lr_scale=1.0,
            parts=PARTS[REPLICA_COPY], moved_from=donor, addresses=addresses,
        )

    if mode == "none":
        raise RecoveryError(f"stage {stage} lost every replica and recovery.method is 'none'")
    mover, donor = _choose_replacement(stage, nodes, candidates, allow_move, min_donor_replicas=2)
    if mover is not None:
        addresses[mover.node_id] = mover.address
    exclude = mover.node_id if mover else None
    if mover is None:
        notes.append(f"no free node and no stage with a spare replica: re-plan stage {stage} when a node joins")

    def plan(method: str, weights: dict[int, float]) -> RecoveryPlan:
        sources = {s: ids(s, exclude) for s in weights}
        if method != RANDOM_REINIT:
            log.info("recovery plan: stage %d via %s from %s", stage, method, sources)
        for note in notes:
            log.warning("recovery plan for stage %d: %s", stage, note)
        return RecoveryPlan(
            stage=stage, method=method, replacement=mover.node_id if mover else None,
            sources=sources, weights=weights, lr_scale=lr_scale, parts=PARTS[method],
            moved_from=donor, addresses=addresses, notes=tuple(notes),
        )

    # A source must keep a node after the mover leaves (the mover's own weights are about to go).
    usable = {s: bool(ids(s, exclude)) for s in range(num_stages)}
    block_live = {s: [r for r in nodes[s] if r.node_id != exclude] for s in range(num_stages)}

    if mode == "random-reinit":
        return plan(RANDOM_REINIT, {})

    if stage == 0:
        if num_stages == 1:
            notes.append("data-parallel mode (model.stages = 1): no other stage keeps a copy of stage 0, "
                         "so with every replica lost it restarts from fresh weights")
            return plan(RANDOM_REINIT, {})
        if mode != "checkfree-plus":
            notes.append("plain CheckFree keeps no bookend copy: stage 0 re-initialised randomly")
            return plan(RANDOM_REINIT, {})
        for holder in dict.fromkeys((1, num_stages - 1)):
            if usable[holder]:
                if holder != 1:
                    notes.append(f"stage 1 is down: bookend copy taken from stage {holder}")
                return plan(BOOKEND_COPY, {holder: 1.0})
        notes.append("stage 0 and both bookend holders (stages 1 and S-1) are down: "
                     "stage 0 re-initialised randomly")
        return plan(RANDOM_REINIT, {})

    if is_edge(stage, num_stages):
        if mode != "checkfree-plus":
            notes.append(f"plain CheckFree cannot rebuild edge stage {stage} (one block neighbour): "
                         "re-initialised randomly")
            return plan(RANDOM_REINIT, {})
        partner = edge_partner(stage, num_stages)
        if partner is not None and usable[partner]:
            return plan(CHECKFREE_PLUS, {partner: 1.0})
        step = 1 if stage == 1 else -1
        nearest = _nearest_live(stage, step, block_live, num_stages)
        if nearest is not None:
            notes.append(f"edge partner of stage {stage} ({partner}) is down: copying nearest live "
                         f"block stage {nearest} instead")
            return plan(CHECKFREE_PLUS, {nearest: 1.0})
        notes.append(f"edge stage {stage} has no live block stage to copy: re-initialised randomly")
        return plan(RANDOM_REINIT, {})

    # Intermediate stage 2..S-2: average the neighbours (nearest live ones when a neighbour is down).
    nxt = _nearest_live(stage, 1, block_live, num_stages)
    prv = _nearest_live(stage, -1, block_live, num_stages)
    for want, got in ((stage + 1, nxt), (stage - 1, prv)):
        if got != want:
            notes.append(f"neighbour stage {want} is down: using "
                         + (f"nearest live stage {got}" if got is not None else "no stage on that side"))
    if nxt is not None and prv is not None:
        w_next, w_prev = checkfree_weights(norms.get(nxt), norms.get(prv), epsilon)
        if nxt not in norms or prv not in norms:
            notes.append(f"no gradient norm reported for stage(s) "
                         f"{sorted({nxt, prv} - set(norms))}: equal weights")
        return plan(CHECKFREE, {nxt: w_next, prv: w_prev})
    only = nxt if nxt is not None else prv
    if only is not None:
        notes.append(f"one side has no live block stage: stage {stage} copies stage {only}")
        return plan(CHECKFREE, {only: 1.0})
    notes.append(f"no live block stage to rebuild stage {stage} from: re-initialised randomly")
    return plan(RANDOM_REINIT, {})


def plan_with_config(
    stage: int,
    num_stages: int,
    live: Mapping[int, Sequence[NodeRef | str | tuple[Any, ...]]],
    candidates: Sequence[NodeRef | str | tuple[Any, ...]],
    grad_norms: Mapping[int, float] | None,
    recovery: RecoverySection,
) -> RecoveryPlan:
    """:func:`plan_recovery` with ``lr_scale``, ``epsilon``, mode and moves from the run's ``[recovery]``."""
    return plan_recovery(stage, num_stages, live, candidates, grad_norms, recovery.lr_scale, recovery.epsilon,
                         mode=recovery.method, allow_move=recovery.allow_move)


def recovery_order(dead: Sequence[int], num_stages: int, live_stages: Sequence[int]) -> list[int]:
    """The order to rebuild several wiped stages in, so each can use those rebuilt before it.

    Greedy: next is the dead stage whose plan sources are most complete (stage
    0 needs stage 1 or S-1; an edge needs its partner; an intermediate stage
    needs both neighbours), then the one with more live direct neighbours, then
    the one nearest a stage that survived, then the lowest index. The coordinator plans one, waits for its success report
    (the rebuilt node then counts as live), and plans the next.
    """
    pending = sorted(set(dead))
    for s in pending:
        if not 0 <= s < num_stages:
            raise RecoveryError(f"dead stage {s} is outside 0..{num_stages - 1}")
    up = set(live_stages) - set(pending)
    originally_up = sorted(up)

    def score(s: int) -> tuple[int, int, int, int]:
        if s == 0:
            complete = int(1 in up or (num_stages - 1) in up)
        elif is_edge(s, num_stages):
            partner = edge_partner(s, num_stages)
            complete = int(partner is not None and partner in up)
        else:
            complete = int((s - 1) in up and (s + 1) in up)
        neighbours = sum(1 for n in (s - 1, s + 1) if 1 <= n <= num_stages - 1 and n in up)
        # Grow outwards from what survived: a stage near a surviving one first.
        distance = min((abs(s - u) for u in originally_up), default=num_stages)
        return (complete, neighbours, -distance, -s)

    order: list[int] = []
    while pending:
        best = max(pending, key=score)
        order.append(best)
        pending.remove(best)
        up.add(best)
    return order
