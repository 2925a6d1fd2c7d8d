"""The coordinator's plan, the full-pipeline fallback, and the greedy replica choice both full-pipeline planners use (pure).

The SkipPipe planner (coordinator/skippipe/planner.py) plugs in at one call site,
``Coordinator._plan``; this module holds what the coordinator needs whatever
planner is used: the plan's shape, visit counting, and the fallback planner.

Two planners route every microbatch through every stage, on purpose differently:

* :func:`full_pipeline_paths`, the coordinator's fallback when the configured planner
  cannot plan (and the data-parallel case): it must always produce a plan, so it obeys
  no path rule (no memory cap, no edge swaps) and balances each stage's replicas by
  throughput plus the measured link latency from the previous hop;
* the planner's ``full`` mode, the baseline SkipPipe is measured against: replicas
  taken round robin, the plan validated against the request's rules.

Both walk the paths in the same order and pick each hop with :func:`greedy_routes`;
only the cost of a candidate replica differs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from lowband.coordinator.skippipe.paths import PlannedPath

N = TypeVar("N")   # a node as the caller names it: an id (the fallback) or a topology index (the planner)


@dataclass(slots=True)
class Plan:
    """Every origin's paths for one membership epoch."""

    paths: dict[str, list[PlannedPath]] = field(default_factory=dict)    # by origin node id
    visits: dict[str, dict[str, int]] = field(default_factory=dict)      # node -> origin -> microbatches


def count_visits(paths: Mapping[str, Sequence[PlannedPath]]) -> dict[str, dict[str, int]]:
    """Microbatches passing through each node per iteration, keyed by origin (a node counts once per path)."""
    visits: dict[str, dict[str, int]] = {}
    for origin, plans in paths.items():
        for path in plans:
            for node_id in set(path.node_ids):
                per_origin = visits.setdefault(node_id, {})
                per_origin[origin] = per_origin.get(origin, 0) + 1
    return visits


def greedy_routes(paths: Sequence[tuple[N, Sequence[int]]], replicas: Mapping[int, Sequence[N]],
                  cost: Callable[[N, N, int], float]) -> list[list[N]]:
    """The hops of each ``(origin, block stages)`` path, planned one path after another in the given order.

    Each hop goes to the replica of its stage with the lowest ``cost(previous node, candidate,
    microbatches routed to the candidate so far)``; on a tie, the one listed first. With a cost of
    the load alone that is round robin over each stage's replicas.
    """
    load: dict[N, int] = {}
    routes: list[list[N]] = []
    for origin, blocks in paths:
        hops: list[N] = []
        prev = origin
        for stage in blocks:
            chosen = min(replicas[stage], key=lambda node, prev=prev: cost(prev, node, load.get(node, 0)))
            load[chosen] = load.get(chosen, 0) + 1
            hops.append(chosen)
            prev = chosen
        routes.append(hops)
    return routes


def full_pipeline_paths(
    origins: Sequence[str],
    replicas: Mapping[int, Sequence[str]],
    throughput: Mapping[str, float],
    num_stages: int,
    microbatches: int,
    rtt_s: Mapping[tuple[str, str], float] | None = None,
    microbatch_size: int = 1,
) -> dict[str, list[PlannedPath]]:
    """The fallback plan: paths 0,1,...,S-1,0 for every origin, replicas balanced by throughput.

    Microbatches are interleaved across origins so each stage's load spreads
    evenly; each hop goes to the replica with the lowest estimated finish time
    ((load + 1) * microbatch_size / throughput) plus the measured round-trip
    time from the previous hop (ties: the lowest node id). Returns {} when some
    stage has no replica. With one stage (data-parallel mode) every path is just its origin.
    """
    if num_stages == 1:
        return origin_only_paths(origins, microbatches)
    if not origins or any(not replicas.get(s) for s in range(1, num_stages)):
        return {}
    rtt_s = rtt_s or {}
    by_id = {s: sorted(replicas[s]) for s in range(1, num_stages)}

    def cost(prev: str, node_id: str, load: int) -> float:
        compute = (load + 1) * microbatch_size / max(throughput.get(node_id, 1.0), 1e-9)
        return compute + rtt_s.get((prev, node_id), 0.0)

    blocks = range(1, num_stages)
    order = [(m, origin) for m in range(microbatches) for origin in origins]
    routes = greedy_routes([(origin, blocks) for _, origin in order], by_id, cost)
    stages = (*range(num_stages), 0)
    paths: dict[str, list[PlannedPath]] = {o: [] for o in origins}
    for (m, origin), hops in zip(order, routes, strict=True):
        paths[origin].append(PlannedPath(origin, m, stages, (origin, *hops, origin)))
    return paths


def origin_only_paths(origins: Sequence[str], microbatches: int) -> dict[str, list[PlannedPath]]:
    """``model.stages = 1`` (data-parallel mode): each origin holds the whole model, so each of its
    microbatches' path is the origin alone, stages ``(0,)``; nothing to plan, nothing to route."""
    return {o: [PlannedPath(o, m, (0,), (o,)) for m in range(microbatches)] for o in origins}
