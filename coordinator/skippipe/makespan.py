"""Discrete-event simulation of one training iteration, for scoring SkipPipe plans.

Cost model (deterministic):

* every microbatch's embedding job is queued at its origin at t = 0 (the
  lookup itself is free);
* a hop from node a to node b costs ``latency[a, b] + activation_bytes /
  bandwidth[a, b] + message_overhead_s`` (gradients on the way back are the
  same size); links are not shared resources, only nodes are;
* a block stage's forward costs ``compute_s_per_layer * layers_per_stage`` on
  its node; on reaching the origin again the head + loss forward costs
  ``bookend_fraction`` of that (with the origin's own speed), immediately
  followed by the head's backward (``backward_factor`` x), as one job;
* backward then runs the path in reverse, each block stage costing
  ``backward_factor`` x its forward, and ends with the (free) embedding
  backward at the origin;
* a node runs one job at a time, in order of arrival (ties: path order in the
  plan, then step); the iteration ends when every backward is done.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lowband.coordinator.skippipe.paths import PlannedPath, PlanRequest, Topology


@dataclass(slots=True)
class SimResult:
    makespan_s: float
    finish_s: list[float]       # per path, when its embedding backward is done
    busy_s: list[float]         # per node (topology order), total compute time
    wait_s: float               # total time jobs spent queued behind other jobs


class CostModel:
    """Pre-computed per-node and per-link costs of a request (plain lists for fast loops)."""

    def __init__(self, request: PlanRequest) -> None:
        topo = request.topology
        lat = topo.latency_s
        bw = topo.bandwidth_Bps
        with np.errstate(divide="ignore", invalid="ignore"):
            link = lat + request.activation_bytes / bw + request.message_overhead_s
        np.fill_diagonal(link, 0.0)
        self.link_np: np.ndarray = link
        self.link: list[list[float]] = link.tolist()
        stage_fwd = [spec.compute_s_per_layer * request.layers_per_stage for spec in topo.nodes]
        self.fwd: list[float] = [
            f * request.bookend_fraction if spec.stage == 0 else f
            for f, spec in zip(stage_fwd, topo.nodes, strict=True)
        ]
        self.bwd_factor = request.backward_factor
        self.fwd_np = np.asarray(self.fwd)

    def steps(self, origin: int, hops: Sequence[int]) -> tuple[list[int], list[float]]:
        """Node and duration of each job of one path, forward then backward."""
        f, b = self.fwd, self.bwd_factor
        nodes = [origin, *hops, origin, *reversed(hops), origin]
        durs = [0.0, *(f[h] for h in hops), f[origin] * (1.0 + b), *(b * f[h] for h in reversed(hops)), 0.0]
        return nodes, durs


def simulate_steps(step_nodes: Sequence[Sequence[int]], step_durs: Sequence[Sequence[float]],
                   link: Sequence[Sequence[float]], num_nodes: int,
                   jobs: list[tuple[int, int, float, float]] | None = None) -> SimResult:
    """Run the FIFO event simulation on pre-built job lists (one list per path).

    With ``jobs`` given, appends (path, node, start, end) for every job run.
    """
    free = [0.0] * num_nodes
    busy = [0.0] * num_nodes
    finish = [0.0] * len(step_nodes)
    wait = 0.0
    heap = [(0.0, p, 0) for p in range(len(step_nodes))]
    heapq.heapify(heap)
    pop, push = heapq.heappop, heapq.heappush
    while heap:
        t, p, k = pop(heap)
        nodes = step_nodes[p]
        node = nodes[k]
        dur = step_durs[p][k]
        start = free[node]
        if start < t:
            start = t
        else:
            wait += start - t
        end = start + dur
        free[node] = end
        busy[node] += dur
        if jobs is not None:
            jobs.append((p, node, start, end))
        k += 1
        if k < len(nodes):
            push(heap, (end + link[node][nodes[k]], p, k))
        else:
            finish[p] = end
    return SimResult(makespan_s=max(finish, default=0.0), finish_s=finish, busy_s=busy, wait_s=wait)


def simulate(paths: Sequence[PlannedPath], request: PlanRequest, cost: CostModel | None = None) -> SimResult:
    """Simulate one iteration of ``paths`` under ``request``'s cost model."""
    cost = cost or CostModel(request)
    topo = request.topology
    all_nodes, all_durs = [], []
    for p in paths:
        hops = [topo.index(n) for n in p.node_ids[1:-1]]
        nodes, durs = cost.steps(topo.index(p.origin_id), hops)
        all_nodes.append(nodes)
        all_durs.append(durs)
    return simulate_steps(all_nodes, all_durs, cost.link, len(topo.nodes))


def simulate_iteration(paths: Sequence[PlannedPath], topology: Topology, request: PlanRequest) -> float:
    """Makespan (seconds) of one iteration of ``paths`` on ``topology`` under ``request``'s costs."""
    if topology is not request.topology:
        request = dataclasses.replace(request, topology=topology)
    return simulate(paths, request).makespan_s
