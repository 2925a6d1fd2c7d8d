"""SkipPipe planners: every plan obeys every rule (property-based), determinism, quality on geo."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lowband.coordinator.skippipe.makespan import simulate
from lowband.coordinator.skippipe.paths import (
    NodeSpec,
    PlanError,
    PlanRequest,
    Topology,
    check_path,
    edge_swapped,
    node_load,
    stage_coverage,
    validate_plan,
)
from lowband.coordinator.skippipe.planner import PLANNERS, plan_paths
from lowband.protocols.config import PLANNERS as CONFIG_PLANNERS
from lowband.sim.topology import make_topology


def random_topology(seed: int, stages: int, extra: int) -> Topology:
    rng = np.random.default_rng(seed)
    n = stages + extra
    stage_of = list(range(stages)) + rng.integers(0, stages, extra).tolist()
    rng.shuffle(stage_of)
    specs = [NodeSpec(f"n{i}", int(s), float(rng.uniform(0.0, 0.2))) for i, s in enumerate(stage_of)]
    return Topology(specs, rng.uniform(0.0, 0.2, (n, n)), rng.uniform(1e6, 1e9, (n, n)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), stages=st.integers(2, 8), extra=st.integers(0, 8),
       skip=st.sampled_from([0.0, 0.2, 0.33, 0.5, 0.75, 0.9]), mbs=st.integers(1, 3),
       cap=st.integers(0, 4), jump=st.integers(0, 3), swaps=st.integers(0, 2), swap_edges=st.booleans())
def test_every_planner_obeys_every_rule(seed: int, stages: int, extra: int, skip: float, mbs: int, cap: int,
                                        jump: int, swaps: int, swap_edges: bool) -> None:
    topo = random_topology(seed, stages, extra)
    try:
        req = PlanRequest(topology=topo, num_stages=stages, skip_ratio=skip, microbatches_per_origin=mbs,
                          memory_cap=cap, max_jump=jump, max_swaps=swaps, swap_edges=swap_edges, seed=seed,
                          search_evals=15)
    except PlanError:
        assume(False)  # infeasible request (cap or jump), rejected up front by design
        return
    for name in PLANNERS:
        rules = req
        if name == "full":  # the baseline visits every stage, which a tight memory cap may forbid
            try:
                rules = dataclasses.replace(req, skip_ratio=0.0)
            except PlanError:
                with pytest.raises(PlanError, match="memory_cap"):
                    plan_paths(req, name)
                continue
        paths = plan_paths(req, name)
        validate_plan(paths, rules)
        for p in paths:
            check_path(p, rules)
        coverage = stage_coverage(paths, stages)
        assert max(coverage) - min(coverage) <= 1
        if cap:
            assert max(node_load(paths).values()) <= cap
        assert [(p.origin_id, p.microbatch) for p in paths] == sorted(
            ((p.origin_id, p.microbatch) for p in paths), key=lambda k: (topo.index(k[0]), k[1]))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000), planner=st.sampled_from(sorted(PLANNERS)))
def test_deterministic_for_a_seed(seed: int, planner: str) -> None:
    topo = random_topology(seed, 5, 6)
    req = PlanRequest(topology=topo, num_stages=5, skip_ratio=0.25, microbatches_per_origin=2, seed=seed,
                      search_evals=40)
    first = plan_paths(req, planner)
    assert plan_paths(req, planner) == first
    assert plan_paths(dataclasses.replace(req, topology=random_topology(seed, 5, 6)), planner) == first


def test_seed_changes_random_plans() -> None:
    topo = make_topology("geo", 20, 6, 0)
    plans = {str(plan_paths(PlanRequest(topology=topo, num_stages=6, skip_ratio=0.33,
                                        microbatches_per_origin=2, seed=s), "random")) for s in range(3)}
    assert len(plans) == 3


def test_edge_swaps_on_half_the_microbatches() -> None:
    topo = make_topology("geo", 20, 6, 1)
    for skip, planner in [(0.0, "full"), (0.0, "skippipe"), (0.33, "skippipe"), (0.33, "random")]:
        req = PlanRequest(topology=topo, num_stages=6, skip_ratio=skip, microbatches_per_origin=4,
                          swap_edges=True, search_evals=100)
        paths = plan_paths(req, planner)
        # every other path (odd positions) carries the edge swaps; others may still swap on their own
        swapped = paths[1::2]
        assert all(edge_swapped(p, 6) for p in swapped), (skip, planner)
        if skip == 0.0:   # m = 5 holds both pairs: 2,1,3,5,4
            assert all(p.stages == (0, 2, 1, 3, 5, 4, 0) for p in swapped)
        else:             # m = 3: front and back alternate
            fronts = [p for p in swapped if p.stages[1:3] == (2, 1)]
            backs = [p for p in swapped if p.stages[-3:-1] == (5, 4)]
            assert len(fronts) == len(backs) == len(swapped) // 2


def test_memory_cap_spreads_load() -> None:
    topo = make_topology("uniform", 12, 3, 0)   # 4 replicas per stage, 4 origins
    req = PlanRequest(topology=topo, num_stages=3, microbatches_per_origin=3, memory_cap=3, search_evals=200)
    for planner in PLANNERS:
        load = node_load(plan_paths(req, planner))
        assert max(load.values()) <= 3
    with pytest.raises(PlanError, match="memory_cap=2"):
        dataclasses.replace(req, memory_cap=2)


def test_unknown_planner_and_config_names() -> None:
    topo = make_topology("uniform", 4, 2, 0)
    with pytest.raises(PlanError, match="unknown planner"):
        plan_paths(PlanRequest(topology=topo, num_stages=2), "astar")
    assert set(CONFIG_PLANNERS) == set(PLANNERS)


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_skippipe_beats_random_and_full_on_geo(seed: int) -> None:
    topo = make_topology("geo", 20, 6, seed)
    req = PlanRequest(topology=topo, num_stages=6, skip_ratio=0.33, microbatches_per_origin=4,
                      layers_per_stage=24 / 5, seed=seed)
    span = {name: simulate(plan_paths(req, name), req).makespan_s for name in PLANNERS}
    assert span["skippipe"] < span["random"] < span["full"]
    assert span["skippipe"] < span["skippipe-unaware"]


def test_full_takes_each_stages_replicas_round_robin_whatever_their_speed() -> None:
    """The baseline ignores speed and links; the coordinator's fallback (``schedule.full_pipeline_paths``,
    tests/test_coordinator_assignment.py) balances by throughput instead."""
    nodes = [NodeSpec("o", 0, 0.1), NodeSpec("fast", 1, 0.01), NodeSpec("slow", 1, 1.0), NodeSpec("s2", 2, 0.1)]
    topo = Topology(nodes, np.full((4, 4), 0.01), np.full((4, 4), 1e8))
    paths = plan_paths(PlanRequest(topology=topo, num_stages=3, microbatches_per_origin=4), "full")
    assert [p.node_ids for p in paths] == [("o", hop, "s2", "o") for hop in ("fast", "slow") * 2]
