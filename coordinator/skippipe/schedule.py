"""Paths for microbatches: the full-pipeline fallback planner and the per-node view of a plan (pure).

The SkipPipe planner (coordinator/skippipe/planner.py) plugs in at one call site,
``Coordinator._plan``; this module holds what the coordinator needs whatever
planner is used: the plan's shape, visit counting, and a full-pipeline planner
(each microbatch visits 0, 1, ..., S-1, 0) that picks each stage's replica by
load over throughput plus the measured link latency from the previous hop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class PlannedPath:
    microbatch: int
    stages: tuple[int, ...]      # e.g. (0, 1, 2, 3, 0)
    node_ids: tuple[str, ...]    # node hosting each hop


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


def full_pipeline_paths(
    origins: Sequence[str],
    replicas: Mapping[int, Sequence[str]],
    throughput: Mapping[str, float],
    num_stages: int,
    microbatches: int,
    rtt_s: Mapping[tuple[str, str], float] | None = None,
    microbatch_size: int = 1,
) -> dict[str, list[PlannedPath]]:
    """Full-pipeline paths 0,1,...,S-1,0 for every origin, replicas balanced by throughput.

    Microbatches are interleaved across origins so each stage's load spreads
    evenly; each hop goes to the replica with the lowest estimated finish time
    ((load + 1) * microbatch_size / throughput) plus the measured round-trip
    time from the previous hop. Returns {} when some stage has no replica.
    With one stage (data-parallel mode) every path is just its origin.
    """
    if num_stages == 1:
        return origin_only_paths(origins, microbatches)
    if not origins or any(not replicas.get(s) for s in range(1, num_stages)):
        return {}
    rtt_s = rtt_s or {}
    load: dict[str, int] = {}
    paths: dict[str, list[PlannedPath]] = {o: [] for o in origins}
    for m in range(microbatches):
        for origin in origins:
            hops = [origin]
            for stage in range(1, num_stages):
                prev = hops[-1]

                def cost(node_id: str, prev: str = prev) -> tuple[float, str]:
                    compute = (load.get(node_id, 0) + 1) * microbatch_size / max(throughput.get(node_id, 1.0), 1e-9)
                    return compute + rtt_s.get((prev, node_id), 0.0), node_id

                chosen = min(replicas[stage], key=cost)
                load[chosen] = load.get(chosen, 0) + 1
                hops.append(chosen)
            hops.append(origin)
            stages = (*range(num_stages), 0)
            paths[origin].append(PlannedPath(m, stages, tuple(hops)))
    return paths


def origin_only_paths(origins: Sequence[str], microbatches: int) -> dict[str, list[PlannedPath]]:
    """``model.stages = 1`` (data-parallel mode): each origin holds the whole model, so each of its
    microbatches' path is the origin alone, stages ``(0,)``; nothing to plan, nothing to route."""
    return {o: [PlannedPath(m, (0,), (o,)) for m in range(microbatches)] for o in origins}
