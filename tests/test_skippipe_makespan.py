"""The iteration simulator against hand-computed timelines."""

from __future__ import annotations

import numpy as np
import pytest

from lowband.coordinator.skippipe.makespan import simulate, simulate_iteration
from lowband.coordinator.skippipe.paths import NodeSpec, PlannedPath, PlanRequest, Topology


def topo(specs: list[tuple[str, int, float]], latency: float | np.ndarray = 0.1,
         bandwidth: float = 1000.0) -> Topology:
    n = len(specs)
    lat = np.full((n, n), latency) if np.isscalar(latency) else np.asarray(latency)
    return Topology([NodeSpec(i, s, c) for i, s, c in specs], lat, np.full((n, n), bandwidth))


def request(t: Topology, S: int, M: int = 1, **kw: object) -> PlanRequest:
    # link = 0.1 latency + 100 B / 1000 B/s + 0.05 overhead = 0.25 s
    base: dict[str, object] = {"activation_bytes": 100.0, "message_overhead_s": 0.05,
                               "layers_per_stage": 2.0, "bookend_fraction": 0.25, "backward_factor": 2.0}
    base.update(kw)
    return PlanRequest(topology=t, num_stages=S, microbatches_per_origin=M, **base)  # type: ignore[arg-type]


def path(origin: str, mb: int, hops: list[tuple[int, str]]) -> PlannedPath:
    return PlannedPath(origin, mb, (0, *(s for s, _ in hops), 0), (origin, *(n for _, n in hops), origin))


def test_single_microbatch_timeline() -> None:
    # origin: 0.5 s/layer -> head fwd = 0.25 * 2 * 0.5 = 0.25, head fwd+bwd = 0.75
    # stage node: 1 s/layer -> fwd 2, bwd 4
    t = topo([("o", 0, 0.5), ("a", 1, 1.0)])
    req = request(t, 2)
    p = [path("o", 0, [(1, "a")])]
    # 0.25 link | 2 fwd | 0.25 link | 0.75 head | 0.25 link | 4 bwd | 0.25 link = 7.75
    assert simulate_iteration(p, t, req) == pytest.approx(7.75, abs=1e-12)
    res = simulate(p, req)
    assert res.busy_s == pytest.approx([0.75, 6.0]) and res.wait_s == 0.0


def test_queueing_is_fifo_by_arrival_on_one_node() -> None:
    t = topo([("o", 0, 0.5), ("a", 1, 1.0)])
    req = request(t, 2, M=2)
    p = [path("o", 0, [(1, "a")]), path("o", 1, [(1, "a")])]
    # mb0 fwd on a: 0.25-2.25; mb1 arrives 0.25, waits, fwd 2.25-4.25.
    # mb0 head 2.5-3.25, back at a at 3.5 but a runs mb1's fwd (arrived first) -> bwd 4.25-8.25, done 8.5.
    # mb1 head 4.5-5.25, at a 5.5, waits for mb0's bwd -> 8.25-12.25, done 12.5.
    res = simulate(p, req)
    assert res.finish_s == pytest.approx([8.5, 12.5], abs=1e-12)
    assert res.makespan_s == pytest.approx(12.5, abs=1e-12)
    assert res.wait_s == pytest.approx((2.25 - 0.25) + (4.25 - 3.5) + (8.25 - 5.5), abs=1e-12)


def test_arrival_order_not_path_order_decides() -> None:
    # Origin "far" is 1.0 s + 0.15 away from node a, origin "near" 0.1 s + 0.15: near's microbatch
    # reaches a first and is served first although it is listed second.
    lat = np.array([[0.0, 1.0, 0.5], [1.0, 0.0, 0.1], [0.5, 0.1, 0.0]])
    t = topo([("far", 0, 0.0), ("a", 1, 1.0), ("near", 0, 0.0)], latency=lat)
    req = request(t, 2)
    p = [path("far", 0, [(1, "a")]), path("near", 0, [(1, "a")])]
    res = simulate(p, req)
    # near: arrives 0.25, fwd 0.25-2.25, head (free) at 2.5, back at a at 2.75.
    # far: arrives 1.15, waits, fwd 2.25-4.25. near's bwd arrives 2.75 -> after far's fwd: 4.25-8.25, done 8.5.
    # far: head at 5.4, back at a 6.55, waits until 8.25, bwd 8.25-12.25, done 13.4.
    assert res.finish_s == pytest.approx([13.4, 8.5], abs=1e-12)


def test_skipping_and_parallel_replicas() -> None:
    # S = 3; two origins, each with its own stage-1 and stage-2 replica; paths skip different stages.
    t = topo([("o1", 0, 0.0), ("o2", 0, 0.0), ("a1", 1, 1.0), ("a2", 1, 1.0), ("b1", 2, 0.5),
              ("b2", 2, 0.5)])
    req = request(t, 3, skip_ratio=0.5)
    assert req.visits == 1
    p = [path("o1", 0, [(1, "a1")]), path("o2", 0, [(2, "b2")])]
    res = simulate(p, req)
    # o1 via a1: 4 links (1.0) + fwd 2 + bwd 4 = 7.0; o2 via b2: 1.0 + fwd 1 + bwd 2 = 4.0
    assert res.finish_s == pytest.approx([7.0, 4.0], abs=1e-12)
    # a swapped path costs the same as its unswapped twin when nothing queues
    t2 = topo([("o", 0, 0.0), ("a", 1, 1.0), ("b", 2, 1.0)])
    req2 = request(t2, 3)
    fwd = simulate_iteration([path("o", 0, [(1, "a"), (2, "b")])], t2, req2)
    swp = simulate_iteration([path("o", 0, [(2, "b"), (1, "a")])], t2, req2)
    assert fwd == swp == pytest.approx(6 * 0.25 + 2 * (2 + 4), abs=1e-12)


def test_deterministic_and_topology_argument() -> None:
    t = topo([("o", 0, 0.5), ("a", 1, 1.0), ("b", 1, 2.0)])
    req = request(t, 2, M=3)
    p = [path("o", 0, [(1, "a")]), path("o", 1, [(1, "b")]), path("o", 2, [(1, "a")])]
    assert simulate(p, req) == simulate(p, req)
    slower = topo([("o", 0, 0.5), ("a", 1, 1.0), ("b", 1, 2.0)], latency=1.0)
    assert simulate_iteration(p, slower, req) > simulate_iteration(p, t, req)
