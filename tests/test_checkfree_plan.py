"""Recovery planning (coordinator/recovery.py): method choice, sources, weights, replacement.

The last tests send a plan through its wire form to the node-side reader (node/recovery/checkfree.py).
"""

from __future__ import annotations

import pytest

from lowband.coordinator.recovery import (
    NodeRef,
    RecoveryError,
    checkfree_weights,
    plan_recovery,
    plan_to_proto,
    plan_with_config,
    recovery_order,
)
from lowband.node.recovery.checkfree import CheckFreeError, read_plan
from lowband.protocols import coordinator_pb2 as pb
from lowband.protocols.config import ConfigError, RecoverySection, RunConfig, apply_overrides


def one_per_stage(num_stages: int, dead: set[int]) -> dict[int, list[str]]:
    return {s: ([] if s in dead else [f"n{s}"]) for s in range(num_stages)}


def test_intermediate_stage_uses_checkfree_with_next_and_prev_weights() -> None:
    live = one_per_stage(7, {3})
    plan = plan_recovery(3, 7, live, candidates=["joiner"], grad_norms={2: 1.0, 4: 3.0}, epsilon=0.0)
    assert plan.method == "checkfree"
    assert plan.sources == {4: ("n4",), 2: ("n2",)}
    # a = |g_{i+1}| = 3 weights the NEXT stage; b = |g_{i-1}| = 1 the previous one.
    assert plan.weights[4] == pytest.approx(0.75)
    assert plan.weights[2] == pytest.approx(0.25)
    assert plan.replacement == "joiner" and plan.moved_from is None
    assert plan.lr_scale == pytest.approx(1.1) and plan.fresh_optimizer
    assert plan.parts == ("local",)


def test_checkfree_weights_epsilon_and_orientation() -> None:
    w_next, w_prev = checkfree_weights(next_norm=2.0, prev_norm=0.0, epsilon=0.5)
    assert w_next == pytest.approx(2.5 / 3.0)
    assert w_prev == pytest.approx(0.5 / 3.0)
    # Both zero: epsilon turns 0/0 into a plain mean.
    assert checkfree_weights(0.0, 0.0, 1e-8) == pytest.approx((0.5, 0.5))
    # Unknown or broken norms: equal weights.
    assert checkfree_weights(None, 1.0, 1e-8) == (0.5, 0.5)
    assert checkfree_weights(float("nan"), 1.0, 1e-8) == (0.5, 0.5)


def test_missing_grad_norm_gives_equal_weights_and_a_note() -> None:
    plan = plan_recovery(2, 4, one_per_stage(4, {2}), candidates=["j"], grad_norms={1: 5.0})
    assert plan.method == "checkfree"
    assert plan.weights == {3: 0.5, 1: 0.5}
    assert any("no gradient norm" in n for n in plan.notes)


@pytest.mark.parametrize(("stage", "partner"), [(1, 2), (6, 5)])
def test_edge_stage_copies_its_trained_partner(stage: int, partner: int) -> None:
    plan = plan_recovery(stage, 7, one_per_stage(7, {stage}), candidates=["j"], grad_norms={})
    assert plan.method == "checkfree-plus"
    assert plan.sources == {partner: (f"n{partner}",)}
    assert plan.weights == {partner: 1.0}
    assert plan.lr_scale == pytest.approx(1.1)


def test_plain_checkfree_mode_reinitialises_edges_and_stage0() -> None:
    for stage in (0, 1, 6):
        plan = plan_recovery(stage, 7, one_per_stage(7, {stage}), candidates=["j"], mode="checkfree")
        assert plan.method == "random-reinit"
        assert plan.notes
    mid = plan_recovery(3, 7, one_per_stage(7, {3}), candidates=["j"], mode="checkfree")
    assert mid.method == "checkfree"


def test_stage0_uses_bookend_copy_from_stage1_then_last_stage() -> None:
    plan = plan_recovery(0, 4, one_per_stage(4, {0}), candidates=["j"])
    assert plan.method == "bookend-copy"
    assert plan.sources == {1: ("n1",)} and plan.parts == ("bookend",)
    plan = plan_recovery(0, 4, one_per_stage(4, {0, 1}), candidates=["j"])
    assert plan.method == "bookend-copy" and plan.sources == {3: ("n3",)}
    assert any("stage 1 is down" in n for n in plan.notes)
    plan = plan_recovery(0, 4, one_per_stage(4, {0, 1, 3}), candidates=["j"])
    assert plan.method == "random-reinit"


def test_replica_copy_preferred_whenever_a_replica_lives() -> None:
    live = {0: ["o"], 1: ["a"], 2: ["b1", ("b2", "10.0.0.2:7000", 5.0)], 3: ["c"]}
    for mode in ("checkfree-plus", "checkfree", "random-reinit", "none"):
        plan = plan_recovery(2, 4, live, candidates=["j"], grad_norms={1: 1.0, 3: 1.0}, mode=mode)
        assert plan.method == "replica-copy"
        assert plan.sources == {2: ("b1", "b2")}
        assert plan.parts == ("local", "global", "outer")
        assert plan.lr_scale == 1.0 and not plan.fresh_optimizer
        assert plan.addresses["b2"] == "10.0.0.2:7000"
    # Stage 0 and the edges too.
    for stage in (0, 1):
        live2 = {**live, stage: ["survivor"]}
        assert plan_recovery(stage, 4, live2, candidates=["j"]).method == "replica-copy"


def test_free_nodes_preferred_fastest_first() -> None:
    live = {0: ["o"], 1: ["a"], 2: [], 3: ["c1", "c2", "c3"]}
    plan = plan_recovery(2, 4, live, candidates=[NodeRef("slow", "h:1", 1.0), NodeRef("fast", "h:2", 9.0)])
    assert plan.replacement == "fast" and plan.moved_from is None
    assert plan.addresses["fast"] == "h:2"


def test_move_from_best_covered_stage_never_empties_another() -> None:
    live = {
        0: [NodeRef("o1", throughput=1.0), NodeRef("o2", throughput=1.0)],
        1: [NodeRef("a1", throughput=1.0)],
        2: [],
        3: [NodeRef("c1", throughput=4.0), NodeRef("c2", throughput=2.0), NodeRef("c3", throughput=1.0)],
    }
    plan = plan_recovery(2, 4, live, candidates=[])
    assert plan.moved_from == 3
    # total 7: the node closest to half (3.5) moves, maximising min(7 - x, x) = 3.
    assert plan.replacement == "c1"
    # The mover's own stage-3 weights are about to go: it is not a source.
    assert plan.sources[3] == ("c2", "c3")
    # Ties on replica count are broken by throughput.
    live_tie = {0: ["o"], 1: [NodeRef("a1", throughput=1), NodeRef("a2", throughput=1)], 2: [],
                3: [NodeRef("c1", throughput=5), NodeRef("c2", throughput=5)]}
    assert plan_recovery(2, 4, live_tie).moved_from == 3


def test_no_spare_node_leaves_replacement_empty_rather_than_emptying_a_stage() -> None:
    live = one_per_stage(4, {2})
    plan = plan_recovery(2, 4, live, candidates=[])
    assert plan.replacement is None and plan.moved_from is None
    assert plan.method == "checkfree"
    assert any("re-plan" in n for n in plan.notes)


def test_moving_the_only_replica_of_a_source_is_refused() -> None:
    # Stage 3 has two nodes, but moving one must not strip stage 3 as a source.
    live = {0: ["o"], 1: ["a"], 2: [], 3: ["c1", "c2"]}
    plan = plan_recovery(2, 4, live)
    assert plan.moved_from == 3
    assert len(plan.sources[3]) == 1 and plan.replacement not in plan.sources[3]


def test_two_adjacent_stages_lost_uses_nearest_live_stage() -> None:
    live = one_per_stage(7, {3, 4})
    plan = plan_recovery(3, 7, live, candidates=["j"], grad_norms={2: 1.0, 5: 1.0})
    assert plan.method == "checkfree"
    assert set(plan.sources) == {2, 5}
    assert any("neighbour stage 4 is down" in n for n in plan.notes)
    # Edge whose partner is down copies the nearest live block stage.
    plan = plan_recovery(1, 7, one_per_stage(7, {1, 2}), candidates=["j"])
    assert plan.method == "checkfree-plus" and plan.sources == {3: ("n3",)}
    assert plan.notes


def test_tiny_pipelines_fall_back_sensibly() -> None:
    # S = 2: stage 1 is both edges and has no block neighbour at all.
    plan = plan_recovery(1, 2, one_per_stage(2, {1}), candidates=["j"])
    assert plan.method == "random-reinit" and plan.notes
    # S = 3: stages 1 and 2 stand in for each other.
    plan = plan_recovery(2, 3, one_per_stage(3, {2}), candidates=["j"])
    assert plan.method == "checkfree-plus" and plan.sources == {1: ("n1",)}
    # Every block stage down: nothing to rebuild from.
    plan = plan_recovery(2, 4, one_per_stage(4, {1, 2, 3}), candidates=["j"])
    assert plan.method == "random-reinit"


def test_random_reinit_and_none_modes() -> None:
    plan = plan_recovery(2, 4, one_per_stage(4, {2}), candidates=["j"], mode="random-reinit")
    assert plan.method == "random-reinit" and plan.sources == {} and plan.fresh_optimizer
    with pytest.raises(RecoveryError, match="none"):
        plan_recovery(2, 4, one_per_stage(4, {2}), candidates=["j"], mode="none")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stage": 4}, "outside"),
        ({"num_stages": 0}, "num_stages"),
        ({"lr_scale": 0.0}, "lr_scale"),
        ({"epsilon": -1.0}, "epsilon"),
        ({"mode": "magic"}, "mode"),
        ({"live": {9: ["x"]}}, "outside"),
        ({"live": {1: ["x"], 3: ["x"]}}, "listed in stages"),
        ({"candidates": ["n1"]}, "already hosts"),
    ],
)
def test_bad_input_is_refused(kwargs: dict, message: str) -> None:
    args = {"stage": 2, "num_stages": 4, "live": one_per_stage(4, {2}), "candidates": ["j"]}
    args.update(kwargs)
    with pytest.raises(RecoveryError, match=message):
        plan_recovery(**args)


def test_peers_and_to_dict_match_the_proto_shape() -> None:
    live = {0: [("o", "h:0")], 1: [("a", "h:1")], 2: [], 3: [("c", "h:3")]}
    plan = plan_recovery(2, 4, live, candidates=["j"], grad_norms={1: 1.0, 3: 3.0}, epsilon=0.0)
    rows = plan.peers()
    assert rows == [("a", "h:1", 1, pytest.approx(0.25)), ("c", "h:3", 3, pytest.approx(0.75))]
    d = plan.to_dict()
    assert d["method"] == "checkfree" and d["sources"] == {"3": ["c"], "1": ["a"]}


def test_recovery_order_rebuilds_stages_with_live_neighbours_first() -> None:
    # Stages 2 and 3 of 7 lost: 2 has live 1, 3 has live 4; either can go first, then the other
    # has both neighbours. Stage 0 and 1 lost: 1 first (its partner 2 lives), then 0 from stage 1.
    assert recovery_order([0, 1], 7, [2, 3, 4, 5, 6]) == [1, 0]
    order = recovery_order([2, 3, 4], 7, [0, 1, 5, 6])
    assert order[-1] == 3   # the middle one waits until both its neighbours are back
    with pytest.raises(RecoveryError):
        recovery_order([7], 7, [])


def test_plan_with_config_follows_the_recovery_section() -> None:
    live = one_per_stage(4, {1})
    plan = plan_with_config(1, 4, live, ["j"], {}, RecoverySection(method="checkfree", lr_scale=1.3))
    assert plan.method == "random-reinit" and plan.lr_scale == pytest.approx(1.3)
    plan = plan_with_config(1, 4, live, ["j"], {}, RecoverySection())
    assert plan.method == "checkfree-plus" and plan.lr_scale == pytest.approx(1.1)
    # allow_move = false: with no free node, nobody is taken from a multi-replica stage.
    live2 = {0: ["o"], 1: [], 2: ["b1", "b2"], 3: ["c"]}
    assert plan_with_config(1, 4, live2, [], {}, RecoverySection()).replacement in ("b1", "b2")
    assert plan_with_config(1, 4, live2, [], {}, RecoverySection(allow_move=False)).replacement is None


@pytest.mark.parametrize("override", ["recovery.lr_scale=0", "recovery.lr_scale=nan", "recovery.epsilon=-1",
                                      "recovery.epsilon=inf", "recovery.method=teleport"])
def test_recovery_section_rejects_bad_values(override: str) -> None:
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        apply_overrides(RunConfig(), [override])


def test_plan_to_proto_and_node_side_read_plan_round_trip() -> None:
    live = {0: [("o", "h:0")], 1: [("a1", "h:1"), ("a2", "h:2")], 2: [], 3: [("c", "h:3")]}
    plan = plan_recovery(2, 4, live, candidates=["j"], grad_norms={1: 1.0, 3: 3.0}, epsilon=0.0)
    msg = plan_to_proto(plan, plan_id=7)
    assert msg.plan_id == 7 and msg.method == "checkfree" and len(msg.sources) == 3
    sources, weights = read_plan(msg, num_stages=4)
    assert sources == {1: [("a1", "h:1"), ("a2", "h:2")], 3: [("c", "h:3")]}
    assert weights == {1: pytest.approx(0.25), 3: pytest.approx(0.75)}


@pytest.mark.parametrize("breakage", ["method", "stage", "weights", "nan", "two_weights", "lr"])
def test_read_plan_rejects_bad_plans(breakage: str) -> None:
    live = {0: ["o"], 1: ["a1", "a2"], 2: [], 3: ["c"]}
    msg = plan_to_proto(plan_recovery(2, 4, live, candidates=["j"]), plan_id=1)
    if breakage == "method":
        msg.method = "teleport"
    elif breakage == "stage":
        msg.sources[0].stage = 9
    elif breakage == "weights":
        del msg.weights[-1]
    elif breakage == "nan":
        msg.weights[0] = float("nan")
    elif breakage == "two_weights":
        msg.weights[0] = 0.9
    else:
        msg.lr_scale = 0.0
    with pytest.raises(CheckFreeError):
        read_plan(msg, num_stages=4)


def test_read_plan_accepts_source_free_fresh_and_random_plans() -> None:
    for method in ("fresh", "random-reinit"):
        sources, weights = read_plan(pb.RecoveryPlan(stage=1, method=method, lr_scale=1.0, plan_id=1), 4)
        assert sources == {} and weights == {}
    with pytest.raises(CheckFreeError, match="needs sources"):
        read_plan(pb.RecoveryPlan(stage=1, method="checkfree", lr_scale=1.0, plan_id=1), 4)
