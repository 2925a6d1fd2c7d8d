"""SkipPipe path types and the rules every planned path obeys.

The planner (``lowband.coordinator.skippipe.planner``) produces one :class:`PlannedPath` per
microbatch; this module defines the inputs it plans from (:class:`NodeSpec`,
:class:`Topology`, :class:`PlanRequest`) and the rules a plan must satisfy, as
checks that raise :class:`PlanError` with a reason a human can act on.

Layout (the "bookend"): stage 0 holds embedding + head, so a stage-0 node is
the *origin* of its microbatches. A path is written as the full stage list
``[0, s_1, ..., s_m, 0]`` (the form ``lowband.node.train.along_path.run_path`` takes) with the
node hosting each hop in ``node_ids`` (first and last are the origin).

Rules (SkipPipe, adapted to the bookend layout), for the block stages
``s_1..s_m`` of one path, with ``hi`` the highest stage reached so far
(``hi = 0`` at the origin):

* ``m = round((1 - k) * (S - 1))`` distinct stages among ``1..S-1`` (at least 1);
* a *swap* visits a stage below ``hi``; it must be ``hi - 1`` (adjacent swaps
  only) and a path makes at most ``max_swaps`` of them;
* a forward jump skips at most ``max_jump`` stages: ``s_i - hi <= max_jump + 1``;
  the return to the origin counts as a jump to the head, which in the paper's
  layout sits above stage ``S-1``: ``S - 1 - hi <= max_jump`` at the end
  (so a request needs ``(S-1) - m <= m * max_jump``: a path through stage 1
  must still reach the head);
* over one iteration every block stage is visited by the same number of
  microbatches, up to a difference of 1 (counted over all origins);
* with ``memory_cap > 0`` no node is routed more than ``memory_cap``
  microbatches per iteration. With a forward-then-backward schedule a node holds
  each microbatch's activations from its forward until its backward, and all of
  them may be held at once, so this per-iteration count is the (conservative)
  bound on what it holds at any moment.

Collision avoidance is the planner's objective, not a rule: it is measured by
``lowband.coordinator.skippipe.makespan``.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lowband.protocols.config import SkipPipeSection

log = logging.getLogger(__name__)

# Cost-model defaults: a ~1.3B-parameter LLaMA-style model (hidden 2048, bf16),
# microbatch of 4 sequences x 2048 tokens -> 4*2048*2048*2 bytes = 32 MiB of
# activations (and as many gradient bytes) per hop.
DEFAULT_ACTIVATION_BYTES = 32 * 2**20


class PlanError(ValueError):
    """A plan request cannot be satisfied, or a plan breaks a path rule."""


@dataclass(slots=True)
class NodeSpec:
    """A live node as the planner sees it."""

    node_id: str
    stage: int
    compute_s_per_layer: float  # forward seconds per layer per microbatch (measured)


@dataclass(slots=True)
class Topology:
    """Live nodes plus measured pairwise links, indexed like ``nodes``.

    ``latency_s[i, j]`` is the one-way latency and ``bandwidth_Bps[i, j]`` the
    bandwidth (bytes/second) from node i to node j. ``regions`` is informative
    only (generators fill it; the planner uses the matrices).
    """

    nodes: list[NodeSpec]
    latency_s: np.ndarray
    bandwidth_Bps: np.ndarray
    regions: list[int] | None = None
    _index: dict[str, int] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        n = len(self.nodes)
        if n == 0:
            raise PlanError("topology has no nodes")
        self.latency_s = np.asarray(self.latency_s, dtype=np.float64)
        self.bandwidth_Bps = np.asarray(self.bandwidth_Bps, dtype=np.float64)
        for name, mat in (("latency_s", self.latency_s), ("bandwidth_Bps", self.bandwidth_Bps)):
            if mat.shape != (n, n):
                raise PlanError(f"topology.{name}: expected shape ({n}, {n}), got {mat.shape}")
        off = ~np.eye(n, dtype=bool)
        if np.isnan(self.latency_s).any() or (self.latency_s < 0).any() or np.isinf(self.latency_s[off]).any():
            raise PlanError("topology.latency_s: entries must be finite and >= 0")
        if np.isnan(self.bandwidth_Bps).any() or (self.bandwidth_Bps[off] <= 0).any():
            raise PlanError("topology.bandwidth_Bps: off-diagonal entries must be > 0")
        if self.regions is not None and len(self.regions) != n:
            raise PlanError(f"topology.regions: expected {n} entries, got {len(self.regions)}")
        self._index = {}
        for i, spec in enumerate(self.nodes):
            if spec.node_id in self._index:
                raise PlanError(f"topology: duplicate node id {spec.node_id!r}")
            if not (math.isfinite(spec.compute_s_per_layer) and spec.compute_s_per_layer >= 0):
                raise PlanError(f"node {spec.node_id!r}: compute_s_per_layer must be finite and >= 0")
            if spec.stage < 0:
                raise PlanError(f"node {spec.node_id!r}: stage must be >= 0, got {spec.stage}")
            self._index[spec.node_id] = i

    def index(self, node_id: str) -> int:
        try:
            return self._index[node_id]
        except KeyError:
            raise PlanError(f"unknown node id {node_id!r}") from None

    def replicas(self, stage: int) -> list[int]:
        """Indices of the nodes hosting ``stage``, in topology order."""
        return [i for i, spec in enumerate(self.nodes) if spec.stage == stage]

    def origins(self) -> list[int]:
        return self.replicas(0)


@dataclass(slots=True)
class PlanRequest:
    """Everything a planner needs; validated on construction.

    Cost model (see ``lowband.coordinator.skippipe.makespan``): a hop costs
    ``latency + activation_bytes / bandwidth + message_overhead_s``; a block
    stage's forward costs ``compute_s_per_layer * layers_per_stage`` on its
    node, its backward ``backward_factor`` times that; the origin's head + loss
    forward costs ``bookend_fraction`` of one block stage's forward on the
    origin (the embedding lookup and its backward are taken as free).
    """

    topology: Topology
    num_stages: int
    skip_ratio: float = 0.0
    microbatches_per_origin: int = 1
    memory_cap: int = 0
    layers_per_stage: float = 1.0
    activation_bytes: float = DEFAULT_ACTIVATION_BYTES
    message_overhead_s: float = 0.0
    bookend_fraction: float = 0.25
    backward_factor: float = 2.0
    seed: int = 0
    max_swaps: int = 2
    max_jump: int = 3
    swap_edges: bool = False
    search_evals: int | None = None  # local-search simulator runs; None = sized to the problem

    def __post_init__(self) -> None:
        S = self.num_stages
        if S < 2:
            raise PlanError(f"num_stages must be >= 2, got {S}")
        if not 0.0 <= self.skip_ratio < 1.0:
            raise PlanError(f"skip_ratio must be in [0, 1), got {self.skip_ratio}")
        if self.microbatches_per_origin < 1:
            raise PlanError(f"microbatches_per_origin must be >= 1, got {self.microbatches_per_origin}")
        if self.memory_cap < 0:
            raise PlanError(f"memory_cap must be >= 0, got {self.memory_cap}")
        if not 0 <= self.max_swaps <= 2:
            raise PlanError(f"max_swaps must be in [0, 2], got {self.max_swaps}")
        if not 0 <= self.max_jump <= 3:
            raise PlanError(f"max_jump must be in [0, 3], got {self.max_jump}")
        for name in ("layers_per_stage", "activation_bytes", "message_overhead_s",
                     "bookend_fraction", "backward_factor"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise PlanError(f"{name} must be finite and >= 0, got {value}")
        if self.search_evals is not None and self.search_evals < 0:
            raise PlanError(f"search_evals must be >= 0, got {self.search_evals}")
        for spec in self.topology.nodes:
            if spec.stage >= S:
                raise PlanError(f"node {spec.node_id!r}: stage {spec.stage} is outside 0..{S - 1}")
        missing = [s for s in range(S) if not self.topology.replicas(s)]
        if missing:
            raise PlanError(f"no live node hosts stage(s) {missing}; every stage needs at least one replica")
        n, m, J = S - 1, self.visits, self.max_jump
        if n - m > m * J:
            # A path through stage 1 must still get within max_jump of the head, so it spans at
            # most m * (J + 1) stages; even coverage needs every stage, stage 1 included.
            raise PlanError(
                f"skip_ratio={self.skip_ratio} with {S} stages leaves {m} of {n} block stages per path: "
                f"too few to reach every stage with jumps over at most max_jump={J} stages "
                f"(need (S-1) - m <= m * max_jump)")
        if self.memory_cap > 0:
            if self.microbatches_per_origin > self.memory_cap:
                raise PlanError(f"memory_cap={self.memory_cap} is below microbatches_per_origin="
                                f"{self.microbatches_per_origin}: an origin holds all its microbatches")
            per_stage = math.ceil(self.num_paths * m / n)
            for s in range(1, S):
                cap = len(self.topology.replicas(s)) * self.memory_cap
                if cap < per_stage:
                    raise PlanError(f"memory_cap={self.memory_cap}: stage {s} has "
                                    f"{len(self.topology.replicas(s))} replica(s), room for {cap} "
                                    f"microbatches, but even coverage sends up to {per_stage}")

    @property
    def visits(self) -> int:
        """m: block stages each path visits."""
        return stages_visited(self.num_stages, self.skip_ratio)

    @property
    def num_paths(self) -> int:
        return len(self.topology.origins()) * self.microbatches_per_origin

    @classmethod
    def from_section(cls, topology: Topology, section: SkipPipeSection, *, num_stages: int,
                     microbatches_per_origin: int, **overrides: Any) -> PlanRequest:
        """Build from the run config's ``[skippipe]`` section; ``overrides`` set the other fields."""
        kwargs: dict[str, Any] = {
            "skip_ratio": section.skip_ratio,
            "max_swaps": section.max_swaps,
            "max_jump": section.max_jump,
            "memory_cap": section.memory_cap,
        }
        kwargs.update(overrides)
        return cls(topology=topology, num_stages=num_stages,
                   microbatches_per_origin=microbatches_per_origin, **kwargs)


@dataclass(frozen=True, slots=True)
class PlannedPath:
    """One microbatch's route: ``stages`` and ``node_ids`` both start and end at the origin.

    The one path type of the coordinator: planners produce it, the coordinator caches plans of it
    and serves them to every node (from the event loop, planned in a worker thread), so it is
    immutable; with one stage (data-parallel mode) a path is ``stages=(0,)``, its origin alone.
    """

    origin_id: str
    microbatch: int
    stages: tuple[int, ...]      # e.g. (0, 1, 2, 3, 0)
    node_ids: tuple[str, ...]    # node hosting each hop

    def to_dict(self) -> dict[str, object]:
        return {"origin_id": self.origin_id, "microbatch": self.microbatch,
                "stages": list(self.stages), "node_ids": list(self.node_ids)}


def stages_visited(num_stages: int, skip_ratio: float) -> int:
    """m = round((1 - k)(S - 1)), half rounded up, clamped to 1..S-1."""
    n = num_stages - 1
    return max(1, min(n, math.floor((1.0 - skip_ratio) * n + 0.5)))


def check_stage_sequence(blocks: Sequence[int], num_stages: int, visits: int, *,
                         max_swaps: int = 2, max_jump: int = 3) -> None:
    """Check the block stages ``s_1..s_m`` of one path (origin excluded) against the rules."""
    if len(blocks) != visits:
        raise PlanError(f"visits {len(blocks)} block stages, expected m={visits}")
    seen: set[int] = set()
    hi = 0
    swaps = 0
    for s in blocks:
        if not 1 <= s <= num_stages - 1:
            raise PlanError(f"stage {s} is not a block stage (1..{num_stages - 1})")
        if s in seen:
            raise PlanError(f"visits stage {s} twice")
        seen.add(s)
        if s > hi:
            if s - hi > max_jump + 1:
                raise PlanError(f"jumps from stage {hi} to {s}, skipping {s - hi - 1} stages "
                                f"(max_jump={max_jump})")
            hi = s
        else:
            if s != hi - 1:
                raise PlanError(f"swap to stage {s} is not the stage immediately below the highest "
                                f"reached ({hi})")
            swaps += 1
            if swaps > max_swaps:
                raise PlanError(f"makes {swaps} swaps (max_swaps={max_swaps})")
    if num_stages - 1 - hi > max_jump:
        raise PlanError(f"returns to the head from stage {hi}, skipping {num_stages - 1 - hi} stages "
                        f"(max_jump={max_jump})")


def check_path(path: PlannedPath, request: PlanRequest) -> None:
    """Check one path's shape, node placement and stage rules; raise PlanError with the reason."""
    where = f"path origin={path.origin_id!r} microbatch={path.microbatch}"
    topo = request.topology
    try:
        if len(path.stages) != len(path.node_ids):
            raise PlanError(f"{len(path.stages)} stages but {len(path.node_ids)} node ids")
        if len(path.stages) < 3 or path.stages[0] != 0 or path.stages[-1] != 0:
            raise PlanError(f"must start and end at stage 0, got {path.stages}")
        if path.node_ids[0] != path.origin_id or path.node_ids[-1] != path.origin_id:
            raise PlanError("must start and end at its origin node")
        if topo.nodes[topo.index(path.origin_id)].stage != 0:
            raise PlanError("origin does not host stage 0")
        for stage, node_id in zip(path.stages[1:-1], path.node_ids[1:-1], strict=True):
            host = topo.nodes[topo.index(node_id)].stage
            if host != stage:
                raise PlanError(f"hop to stage {stage} is routed to node {node_id!r}, which hosts stage {host}")
        check_stage_sequence(path.stages[1:-1], request.num_stages, request.visits,
                             max_swaps=request.max_swaps, max_jump=request.max_jump)
    except PlanError as exc:
        raise PlanError(f"{where}: {exc}") from None


def stage_coverage(paths: Sequence[PlannedPath], num_stages: int) -> list[int]:
    """Microbatches visiting each block stage 1..S-1 (index 0 is stage 1)."""
    counts = Counter(s for p in paths for s in p.stages[1:-1])
    return [counts.get(s, 0) for s in range(1, num_stages)]


def node_load(paths: Sequence[PlannedPath]) -> Counter[str]:
    """Microbatches routed through each node per iteration (origins count their own)."""
    load: Counter[str] = Counter()
    for p in paths:
        for node_id in set(p.node_ids):
            load[node_id] += 1
    return load


def validate_plan(paths: Sequence[PlannedPath], request: PlanRequest) -> None:
    """Check a whole plan: every path, one path per (origin, microbatch), even coverage, memory cap."""
    topo = request.topology
    for p in paths:
        check_path(p, request)
    origins = [topo.nodes[i].node_id for i in topo.origins()]
    want = {(o, mb) for o in origins for mb in range(request.microbatches_per_origin)}
    have = Counter((p.origin_id, p.microbatch) for p in paths)
    dup = sorted(k for k, c in have.items() if c > 1)
    if dup:
        raise PlanError(f"microbatch planned more than once: origin={dup[0][0]!r} microbatch={dup[0][1]}")
    missing = sorted(want - set(have))
    if missing:
        raise PlanError(f"no path for origin={missing[0][0]!r} microbatch={missing[0][1]}")
    extra = sorted(set(have) - want)
    if extra:
        raise PlanError(f"path for unexpected origin/microbatch: origin={extra[0][0]!r} microbatch={extra[0][1]}")
    coverage = stage_coverage(paths, request.num_stages)
    if max(coverage) - min(coverage) > 1:
        raise PlanError(f"uneven stage coverage {coverage} (stages 1..{request.num_stages - 1}): "
                        "counts may differ by at most 1")
    if request.memory_cap > 0:
        for node_id, count in sorted(node_load(paths).items()):
            if count > request.memory_cap:
                raise PlanError(f"node {node_id!r} is routed {count} microbatches, above "
                                f"memory_cap={request.memory_cap}")


# --- CheckFree+ out-of-order execution -------------------------------------------------------------

def edge_swap_kinds(num_stages: int, visits: int) -> list[tuple[str, ...]]:
    """Which edge swaps a selected microbatch gets, cycling over selected microbatches.

    With S >= 5 and paths of at least 4 block stages, the pairs 1<->2 and
    S-2<->S-1 are disjoint and both are applied to each selected microbatch;
    when they overlap (S == 4) or a path is too short to hold both (m < 4),
    selected microbatches alternate front and back; with S == 3 there is one
    pair; with S == 2 or m == 1 there is nothing to swap.
    """
    if num_stages < 3 or visits < 2:
        return [()]
    if num_stages == 3:
        return [("front",)]
    if num_stages >= 5 and visits >= 4:
        return [("front", "back")]
    return [("front",), ("back",)]


def edge_swap_sequence(blocks: Sequence[int], num_stages: int, kinds: Sequence[str]) -> list[int] | None:
    """Return ``blocks`` with the requested edge swaps applied, or None if a pair is not in place.

    Front: the path must start ``1, 2`` (becomes ``2, 1``); back: it must end
    ``S-2, S-1`` (becomes ``S-1, S-2``). Rule checks are the caller's job.
    """
    out = list(blocks)
    S = num_stages
    for kind in kinds:
        if kind == "front":
            if len(out) < 2 or out[0] != 1 or out[1] != 2:
                return None
            out[0], out[1] = 2, 1
        elif kind == "back":
            if len(out) < 2 or out[-2] != S - 2 or out[-1] != S - 1:
                return None
            out[-2], out[-1] = S - 1, S - 2
        else:
            raise ValueError(f"unknown edge swap {kind!r}")
    return out


def apply_edge_swaps(paths: Sequence[PlannedPath], num_stages: int, *, max_swaps: int = 2,
                     max_jump: int = 3) -> list[PlannedPath]:
    """CheckFree+ out-of-order execution: swap 1<->2 and S-2<->S-1 on every other microbatch.

    Paths are taken in the given order; every second one (index 1, 3, ...) is
    selected. A selected path gets its swaps only where the pair is visited
    back to back at that end of the path and the swapped path still obeys the
    rules (jump and swap limits); otherwise it is left as it is. Node ids move
    with their stages. Returns a new list (paths are immutable: swapped ones are new objects).
    """
    visits = len(paths[0].stages) - 2 if paths else 0
    cycle = edge_swap_kinds(num_stages, visits)
    out: list[PlannedPath] = []
    selected = 0
    for i, p in enumerate(paths):
        blocks = p.stages[1:-1]
        if i % 2 == 1 and cycle[0]:
            kinds = cycle[selected % len(cycle)]
            selected += 1
            swapped = edge_swap_sequence(blocks, num_stages, kinds)
            if swapped is not None:
                try:
                    check_stage_sequence(swapped, num_stages, len(blocks), max_swaps=max_swaps,
                                         max_jump=max_jump)
                except PlanError:
                    swapped = None
            if swapped is not None:
                node_of = dict(zip(blocks, p.node_ids[1:-1], strict=True))
                out.append(PlannedPath(p.origin_id, p.microbatch, (0, *swapped, 0),
                                       (p.origin_id, *(node_of[s] for s in swapped), p.origin_id)))
                continue
        out.append(p)
    return out


def edge_swapped(path: PlannedPath, num_stages: int) -> bool:
    """Whether a path runs an edge pair out of order (front 2,1 or back S-1,S-2)."""
    b = path.stages[1:-1]
    front = len(b) >= 2 and b[0] == 2 and b[1] == 1
    back = len(b) >= 2 and b[-2] == num_stages - 1 and b[-1] == num_stages - 2
    return front or back
