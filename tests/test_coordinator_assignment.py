"""Stage assignment (pure): weakest stage first, origins at stage 0, moves instead of empty stages."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lowband.coordinator.assignment import NodeView, choose_stage, rebalance, stage_counts
from lowband.coordinator.skippipe.schedule import count_visits, full_pipeline_paths


def n(node_id: str, stage: int, tp: float = 1.0, data: bool = True) -> NodeView:
    return NodeView(node_id, stage, tp, data)


def fill(throughputs: list[float], num_stages: int, min_replicas: int = 1, data: bool = True) -> list[NodeView]:
    nodes: list[NodeView] = []
    for i, tp in enumerate(throughputs):
        joiner = n(f"n{i:03d}", -1, tp, data)
        stage = choose_stage(nodes, joiner, num_stages, min_replicas)
        nodes.append(n(joiner.node_id, stage, tp, data))
    return nodes


def test_first_nodes_cover_every_stage_in_order() -> None:
    nodes = fill([1.0] * 4, 4)
    assert [x.stage for x in nodes] == [0, 1, 2, 3]


def test_joiner_goes_to_the_weakest_stage_by_total_throughput() -> None:
    nodes = [n("a", 0, 5.0), n("b", 1, 5.0), n("c", 2, 1.0), n("d", 3, 3.0)]
    assert choose_stage(nodes, n("e", -1, 1.0), 4) == 2


def test_min_replicas_filled_before_throughput_balancing() -> None:
    nodes = [n("a", 0, 1.0), n("b", 1, 9.0), n("c", 2, 1.0), n("c2", 2, 1.0)]
    # stage 2 has the lowest total among min-satisfied... but stages 0 and 1 are below min 2: fill those first,
    # and of those the one with fewer replicas, then lower total.
    assert choose_stage(nodes, n("e", -1, 1.0), 3, min_replicas=2) == 0


def test_only_data_nodes_host_stage_zero() -> None:
    nodes: list[NodeView] = []
    joiner = n("x", -1, 1.0, data=False)
    assert choose_stage(nodes, joiner, 3) != 0
    assert choose_stage(nodes, joiner, 3, preferred=0) != 0


def test_preference_honoured_unless_it_leaves_a_stage_empty() -> None:
    nodes = [n("a", 0), n("b", 1), n("c", 2)]
    assert choose_stage(nodes, n("d", -1), 3, preferred=1) == 1
    assert choose_stage(nodes[:2], n("d", -1), 3, preferred=1) == 2


def test_rebalance_moves_from_best_covered_stage_into_empty_one() -> None:
    nodes = [n("a", 0), n("b", 1, 1.0), n("c", 1, 4.0), n("d", 1, 4.0), n("e", 2, 2.0), n("f", 2, 2.0)]
    moves = rebalance(nodes, 4)  # stage 3 is empty; stage 1 (total 9) is best covered
    assert len(moves) == 1
    assert moves[0].from_stage == 1 and moves[0].to_stage == 3
    assert moves[0].node_id == "c"  # closest to half of (9 - 0): 4.0, ties by id


def test_rebalance_never_empties_a_stage_and_does_nothing_when_impossible() -> None:
    nodes = [n("a", 0), n("b", 1), n("c", 2)]
    assert rebalance(nodes, 4) == []      # nobody can spare a node
    nodes = [n("a", 0), n("b", 0), n("c", 2)]
    moves = rebalance(nodes, 3)           # stage 1 empty, stage 0 has two origins
    assert [(m.node_id, m.to_stage) for m in moves] in ([("a", 1)], [("b", 1)])


def test_rebalance_takes_a_block_replica_before_an_origin() -> None:
    # stage 0 is the best covered, but moving an origin would stop one of the run's data streams
    nodes = [n("o1", 0, 9.0), n("o2", 0, 9.0), n("b", 1, 1.0), n("c", 1, 1.0), n("d", 2, 1.0)]
    moves = rebalance(nodes, 4)
    assert [(m.node_id, m.from_stage, m.to_stage) for m in moves] in ([("b", 1, 3)], [("c", 1, 3)])


def test_rebalance_respects_stage_zero_data_rule() -> None:
    nodes = [n("a", 1, data=False), n("b", 1, data=False), n("c", 2)]
    assert rebalance(nodes, 3) == []      # stage 0 empty but nobody who could host it can move


@settings(max_examples=150, deadline=None)
@given(
    throughputs=st.lists(st.floats(min_value=0.1, max_value=100.0), min_size=1, max_size=40),
    num_stages=st.integers(min_value=2, max_value=7),
    deaths=st.lists(st.integers(min_value=0, max_value=39), max_size=20),
)
def test_after_deaths_rebalance_leaves_no_stage_empty_when_enough_nodes(
    throughputs: list[float], num_stages: int, deaths: list[int]
) -> None:
    nodes = fill(throughputs, num_stages)
    survivors = [x for i, x in enumerate(nodes) if i not in set(deaths)]
    moves = rebalance(survivors, num_stages)
    stage_of = {x.node_id: x.stage for x in survivors}
    for move in moves:
        assert stage_of[move.node_id] == move.from_stage
        stage_of[move.node_id] = move.to_stage
    assert len({m.node_id for m in moves}) == len(moves)
    after = [NodeView(x.node_id, stage_of[x.node_id], x.throughput, x.has_data) for x in survivors]
    counts, _ = stage_counts(after, num_stages)
    if len(survivors) >= num_stages:
        assert min(counts) >= 1, counts
    else:
        # every stage that had a node still has one: a move never empties a stage
        before, _ = stage_counts(survivors, num_stages)
        assert all(c >= 1 for c, b in zip(counts, before, strict=True) if b >= 1)


@settings(max_examples=100, deadline=None)
@given(throughputs=st.lists(st.floats(min_value=1.0, max_value=10.0), min_size=8, max_size=60),
       num_stages=st.integers(min_value=2, max_value=6))
def test_greedy_join_balances_stage_totals(throughputs: list[float], num_stages: int) -> None:
    nodes = fill(throughputs, num_stages)
    _, totals = stage_counts(nodes, num_stages)
    # Weakest-first greedy: no stage total exceeds the weakest by more than the largest single node.
    assert max(totals) - min(totals) <= max(throughputs) + 1e-9


def test_full_pipeline_paths_balance_replicas_by_throughput() -> None:
    replicas = {1: ["fast", "slow"], 2: ["s2"]}
    throughput = {"fast": 3.0, "slow": 1.0, "s2": 1.0, "o1": 1.0, "o2": 1.0}
    paths = full_pipeline_paths(["o1", "o2"], replicas, throughput, 3, microbatches=4)
    assert set(paths) == {"o1", "o2"}
    for origin, plans in paths.items():
        assert len(plans) == 4
        for i, p in enumerate(plans):
            assert p.microbatch == i
            assert p.stages == (0, 1, 2, 0)
            assert p.node_ids[0] == p.node_ids[-1] == origin
    visits = count_visits(paths)
    fast = sum(visits["fast"].values())
    slow = sum(visits["slow"].values())
    assert fast + slow == 8 and fast == 6 and slow == 2  # 3:1 throughput -> 3:1 load
    assert visits["o1"] == {"o1": 4}
    assert full_pipeline_paths(["o1"], {1: ["a"]}, throughput, 3, 2) == {}  # stage 2 has nobody


def test_full_pipeline_paths_prefer_low_latency_links() -> None:
    replicas = {1: ["near", "far"]}
    rtt = {("o", "far"): 5.0, ("o", "near"): 0.001}
    paths = full_pipeline_paths(["o"], replicas, {"near": 1.0, "far": 1.0}, 2, 2, rtt)
    assert all(p.node_ids[1] == "near" for p in paths["o"])
