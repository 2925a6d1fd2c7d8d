"""Stage assignment: which stage a node hosts (pure, no I/O).

Goal: every stage's *total* throughput is balanced across heterogeneous nodes,
because a pipeline runs at the pace of its weakest stage. Rules:

- a joining node goes to the weakest stage (first the stages below the minimum
  replica count, then the one with the lowest total throughput);
- stage 0 (embedding + head + loss) is where data lives, so only nodes with
  data (``has_data``) may host it; they are the *origins*;
- when a stage becomes empty (or falls below the minimum), a node moves there
  from the best-covered stage rather than leave it empty;
- with ``need`` (bytes each stage needs: protocols/stage_memory.py), a node whose
  reported free memory is below a stage's need is not given that stage; one that
  can hold none is given the lightest it may host (it may still fit: the estimate
  is on the high side) and the caller logs it. A node that reported no memory (0)
  is assumed to fit.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol


class NodeLike(Protocol):
    """Anything with these attributes (NodeView, the coordinator's Member) can be assigned."""

    @property
    def node_id(self) -> str: ...
    @property
    def stage(self) -> int: ...
    @property
    def throughput(self) -> float: ...
    @property
    def has_data(self) -> bool: ...
    @property
    def memory_bytes(self) -> int: ...


@dataclass(frozen=True, slots=True)
class NodeView:
    """What assignment needs to know about one live node."""

    node_id: str
    stage: int          # -1 while unassigned
    throughput: float   # measured samples/s of one block-equivalent
    has_data: bool
    memory_bytes: int = 0   # free memory it reported at join (0: unknown)


@dataclass(frozen=True, slots=True)
class Move:
    """Move `node_id` from `from_stage` to `to_stage` (an Instruction CHANGE_STAGE)."""

    node_id: str
    from_stage: int
    to_stage: int


def _allowed(node: NodeLike, stage: int) -> bool:
    return stage != 0 or node.has_data


def fits(node: NodeLike, stage: int, need: Sequence[int] = ()) -> bool:
    """Whether ``node``'s reported memory holds ``stage`` (always, without a need or a report)."""
    return not need or not node.memory_bytes or node.memory_bytes >= need[stage]


def stage_counts(nodes: Iterable[NodeLike], num_stages: int) -> tuple[list[int], list[float]]:
    """Replica count and total throughput of each stage."""
    counts = [0] * num_stages
    totals = [0.0] * num_stages
    for node in nodes:
        if 0 <= node.stage < num_stages:
            counts[node.stage] += 1
            totals[node.stage] += node.throughput
    return counts, totals


def choose_stage(
    nodes: Sequence[NodeLike],
    joiner: NodeLike,
    num_stages: int,
    min_replicas: int = 1,
    preferred: int = -1,
    need: Sequence[int] = (),
) -> int:
    """The stage a joining node should host, given the other live nodes.

    A valid preference is honoured unless it would leave another stage that
    the joiner could fill empty. ``need``: bytes per stage (see the module docstring).
    """
    if need and len(need) != num_stages:
        raise ValueError(f"need has {len(need)} entries for {num_stages} stages")
    others = [n for n in nodes if n.node_id != joiner.node_id]
    counts, totals = stage_counts(others, num_stages)
    allowed = [s for s in range(num_stages) if _allowed(joiner, s)]
    fitting = [s for s in allowed if fits(joiner, s, need)]
    if need and allowed and not fitting:
        return min(allowed, key=lambda s: (need[s], s))   # too little memory for any: the lightest
    allowed = fitting
    empty = [s for s in allowed if counts[s] == 0]
    if preferred in allowed and (not empty or preferred in empty):
        return preferred
    below = [s for s in allowed if counts[s] < min_replicas]
    candidates = below or allowed
    return min(candidates, key=lambda s: (counts[s], totals[s], s) if below else (totals[s], counts[s], s))


def rebalance(nodes: Sequence[NodeLike], num_stages: int, min_replicas: int = 1,
              need: Sequence[int] = ()) -> list[Move]:
    """Moves that leave no stage empty (and none below `min_replicas`) when possible.

    Weakest stage first. The donor is the best-covered stage (highest total
    throughput) that can spare a node: for an empty target any stage with two
    or more replicas; for a target that is merely below the minimum only a
    stage above the minimum. Among those, block stages give before stage 0:
    an origin that moves stops feeding its data into the run, a block replica
    only stops duplicating its stage. From the donor, the node whose throughput
    best evens out the two stages moves. Returns the moves in order; a node moves
    at most once. ``need``: a node never moves to a stage its memory cannot hold.
    """
    stage_of = {n.node_id: n.stage for n in nodes}
    by_id = {n.node_id: n for n in nodes}
    moved: set[str] = set()
    moves: list[Move] = []
    for _ in range(len(nodes)):
        current = [NodeView(n.node_id, stage_of[n.node_id], n.throughput, n.has_data, n.memory_bytes)
                   for n in nodes]
        counts, totals = stage_counts(current, num_stages)
        needy = sorted((s for s in range(num_stages) if counts[s] < min_replicas),
                       key=lambda s: (counts[s], totals[s], s))
        move = None
        for target in needy:
            floor = 2 if counts[target] == 0 else min_replicas + 1
            donors = [s for s in range(num_stages)
                      if s != target and counts[s] >= max(floor, 2)
                      and any(_movable(by_id[i], target, moved, need) for i in stage_of if stage_of[i] == s)]
            if not donors:
                continue
            donor = max(donors, key=lambda s: (counts[s] > min_replicas, s != 0, totals[s], counts[s], -s))
            want = (totals[donor] - totals[target]) / 2.0
            pool = [by_id[i] for i in stage_of if stage_of[i] == donor and _movable(by_id[i], target, moved, need)]
            node = min(pool, key=lambda n: (abs(n.throughput - want), n.node_id))
            move = Move(node.node_id, donor, target)
            break
        if move is None:
            break
        stage_of[move.node_id] = move.to_stage
        moved.add(move.node_id)
        moves.append(move)
    return moves


def _movable(node: NodeLike, target: int, moved: set[str], need: Sequence[int] = ()) -> bool:
    return node.node_id not in moved and _allowed(node, target) and fits(node, target, need)


def resume_stage(held: Mapping[int, int], sourced: Collection[int]) -> tuple[int, bool] | None:
    """The stage a joiner whose --state-dir holds stage states should take, and whether it resumes it
    from that state (True) rather than copying a live replica (False).

    ``held``: stage -> outer step of each usable state it holds; ``sourced``: the stages a live replica
    could be copied from. A stage nobody live holds comes first (after a whole run was lost, only the
    nodes' own files hold it), the most advanced of those; else the stage of its newest state, which a
    replica copy brings up to date. None when it holds nothing usable.
    """
    if not held:
        return None
    orphaned = [s for s in held if s not in sourced]
    pool = orphaned or list(held)
    return max(pool, key=lambda s: (held[s], -s)), bool(orphaned)
