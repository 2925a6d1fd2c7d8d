"""SkipPipe path rules: check_stage_sequence / check_path / validate_plan / apply_edge_swaps."""

from __future__ import annotations

import numpy as np
import pytest

from lowband.coordinator.skippipe.paths import (
    NodeSpec,
    PlanError,
    PlannedPath,
    PlanRequest,
    Topology,
    apply_edge_swaps,
    check_path,
    check_stage_sequence,
    edge_swapped,
    stages_visited,
    validate_plan,
)


def line_topology(stages: list[int]) -> Topology:
    n = len(stages)
    return Topology([NodeSpec(f"n{i}", s, 0.1) for i, s in enumerate(stages)],
                    np.full((n, n), 0.01), np.full((n, n), 1e8))


def full_path(origin: str, mb: int, S: int, ids: dict[int, str]) -> PlannedPath:
    stages = list(range(1, S))
    return PlannedPath(origin, mb, (0, *stages, 0), (origin, *(ids[s] for s in stages), origin))


@pytest.mark.parametrize(("S", "k", "m"), [(6, 0.33, 3), (24, 0.25, 17), (6, 0.0, 5), (6, 0.99, 1),
                                           (5, 0.5, 2), (2, 0.5, 1)])
def test_stages_visited(S: int, k: float, m: int) -> None:
    assert stages_visited(S, k) == m


@pytest.mark.parametrize("blocks", [[1, 2, 3, 4, 5], [2, 1, 3, 5, 4], [1, 3, 5], [4, 3, 5], [2, 4, 5],
                                    [3, 2, 4]])
def test_valid_sequences_pass(blocks: list[int]) -> None:
    check_stage_sequence(blocks, 6, len(blocks))


@pytest.mark.parametrize(("blocks", "S", "m", "kw", "reason"), [
    ([1, 2, 2], 6, 3, {}, "twice"),
    ([1, 2], 6, 3, {}, "expected m=3"),
    ([0, 2, 3], 6, 3, {}, "not a block stage"),
    ([1, 6, 5], 6, 3, {}, "not a block stage"),
    ([4, 3, 2], 6, 3, {}, "immediately below"),       # 2 is two below the highest (4)
    ([3, 1, 4], 6, 3, {}, "immediately below"),
    ([2, 1, 4, 3, 5], 6, 5, {"max_swaps": 1}, "2 swaps"),
    ([1, 2, 3], 8, 3, {}, "returns to the head"),     # 3 -> head skips 4..7
    ([1, 3], 4, 2, {"max_jump": 0}, "jumps from stage 1 to 3"),
])
def test_invalid_sequences_fail_with_reason(blocks: list[int], S: int, m: int, kw: dict, reason: str) -> None:
    with pytest.raises(PlanError, match=reason):
        check_stage_sequence(blocks, S, m, **kw)


def test_forward_jump_limit_is_four_above_highest() -> None:
    check_stage_sequence([4, 8], 9, 2)               # 0 -> 4 skips 3, 4 -> 8 skips 3
    with pytest.raises(PlanError, match="skipping 4 stages"):
        check_stage_sequence([5, 8], 9, 2)
    with pytest.raises(PlanError, match="skipping 4 stages"):
        check_stage_sequence([1, 2, 3, 8], 9, 4)


def test_check_path_node_placement_and_origin() -> None:
    topo = line_topology([0, 1, 2, 3])
    req = PlanRequest(topology=topo, num_stages=4)
    check_path(PlannedPath("n0", 0, (0, 1, 2, 3, 0), ("n0", "n1", "n2", "n3", "n0")), req)
    bad = [
        (PlannedPath("n0", 0, (0, 1, 2, 3, 0), ("n0", "n2", "n1", "n3", "n0")), "hosts stage"),
        (PlannedPath("n0", 0, (0, 1, 2, 3, 0), ("n0", "n1", "n2", "nX", "n0")), "unknown node"),
        (PlannedPath("n1", 0, (0, 1, 2, 3, 0), ("n1", "n1", "n2", "n3", "n1")), "origin does not host"),
        (PlannedPath("n0", 0, (1, 2, 3, 0), ("n1", "n2", "n3", "n0")), "start and end at stage 0"),
        (PlannedPath("n0", 0, (0, 1, 2, 3, 0), ("n0", "n1", "n2", "n3")), "node ids"),
        (PlannedPath("n0", 3, (0, 1, 3, 0), ("n0", "n1", "n3", "n0")), "expected m=3"),
    ]
    for path, reason in bad:
        with pytest.raises(PlanError, match=reason) as info:
            check_path(path, req)
        assert f"microbatch={path.microbatch}" in str(info.value)


def test_validate_plan_catches_plan_level_faults() -> None:
    topo = line_topology([0, 0, 1, 2, 3, 3])
    req = PlanRequest(topology=topo, num_stages=4, skip_ratio=0.34, microbatches_per_origin=1)
    assert req.visits == 2
    good = [PlannedPath("n0", 0, (0, 1, 2, 0), ("n0", "n2", "n3", "n0")),
            PlannedPath("n1", 0, (0, 2, 3, 0), ("n1", "n3", "n5", "n1"))]
    # coverage 1,2,1 -> fine (max - min = 1)
    validate_plan(good, req)
    with pytest.raises(PlanError, match="no path for origin='n1'"):
        validate_plan(good[:1], req)
    with pytest.raises(PlanError, match="more than once"):
        validate_plan([*good, good[0]], req)
    uneven = [PlannedPath("n0", 0, (0, 1, 2, 0), ("n0", "n2", "n3", "n0")),
              PlannedPath("n1", 0, (0, 2, 1, 0), ("n1", "n3", "n2", "n1"))]
    with pytest.raises(PlanError, match="uneven stage coverage"):
        validate_plan(uneven, req)
    full = PlanRequest(topology=line_topology([0, 1, 2, 3]), num_stages=4, microbatches_per_origin=2,
                       memory_cap=2)
    paths = [full_path("n0", mb, 4, {1: "n1", 2: "n2", 3: "n3"}) for mb in range(2)]
    validate_plan(paths, full)
    with pytest.raises(PlanError, match="unexpected origin/microbatch"):
        validate_plan([*paths, full_path("n0", 2, 4, {1: "n1", 2: "n2", 3: "n3"})], full)


def test_plan_request_rejects_infeasible_settings() -> None:
    topo = line_topology([0, 1, 2, 3])
    cases = [
        ({"num_stages": 5}, "no live node hosts stage"),
        ({"num_stages": 3}, "outside 0..2"),
        ({"num_stages": 4, "skip_ratio": 1.0}, "skip_ratio"),
        ({"num_stages": 4, "microbatches_per_origin": 0}, "microbatches_per_origin"),
        ({"num_stages": 4, "max_jump": 4}, "max_jump"),
        ({"num_stages": 4, "max_swaps": 3}, "max_swaps"),
        ({"num_stages": 4, "memory_cap": 1, "microbatches_per_origin": 2}, "below microbatches_per_origin"),
        ({"num_stages": 4, "activation_bytes": float("nan")}, "activation_bytes"),
    ]
    for kwargs, reason in cases:
        with pytest.raises(PlanError, match=reason):
            PlanRequest(topology=topo, **kwargs)
    wide = line_topology([0, *range(1, 10)])
    with pytest.raises(PlanError, match="max_jump=0"):
        PlanRequest(topology=wide, num_stages=10, skip_ratio=0.5, max_jump=0)
    # one stage per path out of 4 with max_jump=2: only stages 2 and 3 could ever be visited
    with pytest.raises(PlanError, match=r"too few to reach every stage"):
        PlanRequest(topology=line_topology([0, 1, 2, 3, 4]), num_stages=5, skip_ratio=0.75, max_jump=2)
    PlanRequest(topology=line_topology([0, 1, 2, 3, 4]), num_stages=5, skip_ratio=0.75, max_jump=3)
    two = line_topology([0, 0, 1, 2, 3])
    with pytest.raises(PlanError, match="stage 1 has 1 replica"):
        PlanRequest(topology=two, num_stages=4, microbatches_per_origin=2, memory_cap=3)


def test_topology_validation() -> None:
    spec = [NodeSpec("a", 0, 0.1), NodeSpec("b", 1, 0.1)]
    ok_l, ok_b = np.full((2, 2), 0.01), np.full((2, 2), 1e6)
    Topology(spec, ok_l, ok_b)
    with pytest.raises(PlanError, match="shape"):
        Topology(spec, np.zeros((3, 3)), ok_b)
    with pytest.raises(PlanError, match="latency_s"):
        Topology(spec, np.full((2, 2), -1.0), ok_b)
    with pytest.raises(PlanError, match="bandwidth_Bps"):
        Topology(spec, ok_l, np.zeros((2, 2)))
    with pytest.raises(PlanError, match="duplicate node id"):
        Topology([NodeSpec("a", 0, 0.1), NodeSpec("a", 1, 0.1)], ok_l, ok_b)
    with pytest.raises(PlanError, match="compute_s_per_layer"):
        Topology([NodeSpec("a", 0, float("inf")), NodeSpec("b", 1, 0.1)], ok_l, ok_b)


def test_apply_edge_swaps_full_paths() -> None:
    ids = {s: f"s{s}" for s in range(1, 6)}
    paths = [full_path("o", mb, 6, ids) for mb in range(4)]
    out = apply_edge_swaps(paths, 6)
    assert [p.stages for p in out] == [(0, 1, 2, 3, 4, 5, 0), (0, 2, 1, 3, 5, 4, 0)] * 2
    assert out[1].node_ids == ("o", "s2", "s1", "s3", "s5", "s4", "o")   # nodes move with their stage
    assert paths[1].stages == (0, 1, 2, 3, 4, 5, 0)                      # input untouched
    for p in out:
        check_stage_sequence(p.stages[1:-1], 6, 5)
    assert [edge_swapped(p, 6) for p in out] == [False, True, False, True]


def test_apply_edge_swaps_small_and_skipping() -> None:
    ids = {s: f"s{s}" for s in range(1, 4)}
    out4 = apply_edge_swaps([full_path("o", mb, 4, ids) for mb in range(4)], 4)
    assert [p.stages[1:-1] for p in out4] == [(1, 2, 3), (2, 1, 3), (1, 2, 3), (1, 3, 2)]
    out3 = apply_edge_swaps([full_path("o", mb, 3, ids) for mb in range(2)], 3)
    assert [p.stages[1:-1] for p in out3] == [(1, 2), (2, 1)]
    # m = 3 of 5 (S = 6): selected paths alternate front and back swaps, only where the pair is in place
    skip = [PlannedPath("o", i, (0, *b, 0), ("o", *(f"s{s}" for s in b), "o"))
            for i, b in enumerate([[1, 2, 4], [1, 2, 4], [1, 3, 5], [2, 4, 5], [1, 3, 4]])]
    out = apply_edge_swaps(skip, 6)
    assert [p.stages[1:-1] for p in out] == [(1, 2, 4), (2, 1, 4), (1, 3, 5), (2, 5, 4), (1, 3, 4)]
    # a swap that would break the jump rule is not applied: 0 -> 2 skips one stage, max_jump=0 forbids it
    assert apply_edge_swaps(skip[:2], 6, max_jump=0)[1].stages[1:-1] == (1, 2, 4)


def test_validate_plan_enforces_memory_cap() -> None:
    topo = line_topology([0, 0, 1, 1])
    req = PlanRequest(topology=topo, num_stages=2, microbatches_per_origin=1, memory_cap=1)
    spread = [PlannedPath("n0", 0, (0, 1, 0), ("n0", "n2", "n0")),
              PlannedPath("n1", 0, (0, 1, 0), ("n1", "n3", "n1"))]
    validate_plan(spread, req)
    crowded = [spread[0], PlannedPath("n1", 0, (0, 1, 0), ("n1", "n2", "n1"))]
    with pytest.raises(PlanError, match="node 'n2' is routed 2 microbatches, above memory_cap=1"):
        validate_plan(crowded, req)


def test_request_from_config_section() -> None:
    from lowband.protocols.config import RunConfig

    cfg = RunConfig.from_dict({"skippipe": {"skip_ratio": 0.33, "max_jump": 2, "max_swaps": 1, "memory_cap": 5}})
    topo = line_topology([0, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5])
    req = PlanRequest.from_section(topo, cfg.skippipe, num_stages=6, microbatches_per_origin=2, seed=9)
    assert (req.skip_ratio, req.max_jump, req.max_swaps, req.memory_cap, req.seed) == (0.33, 2, 1, 5, 9)
    assert req.visits == 3 and req.num_paths == 2
