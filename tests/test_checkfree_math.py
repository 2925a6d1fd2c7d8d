"""Node-side rebuild math (node/recovery/checkfree.py) on hand-built states and on real tiny-model stages."""

from __future__ import annotations

import pytest
import torch

from lowband.node.recovery.checkfree import (
    BOOKEND_KEYS,
    CheckFreeError,
    bookend_copy_state,
    checkfree_average,
    edge_copy,
    fresh_inner_optimizer,
    grad_norm,
    load_rebuilt,
    rebuild_stage,
    restore_bookend,
)
from lowband.node.train.model import ModelConfig, build_stage
from lowband.protocols.config import TrainSection

torch.set_num_threads(1)


def test_formula_exact_numbers_and_orientation() -> None:
    prev = {"blocks.0.w": torch.tensor([0.0, 4.0]), "blocks.0.g": torch.tensor([1.0])}
    nxt = {"blocks.0.w": torch.tensor([8.0, 0.0]), "blocks.0.g": torch.tensor([3.0])}
    # a = 3 weights NEXT, b = 1 weights PREVIOUS: (3*next + 1*prev) / 4.
    out = checkfree_average(prev, nxt, a=3.0, b=1.0, eps=0.0)
    torch.testing.assert_close(out["blocks.0.w"], torch.tensor([6.0, 1.0]))
    torch.testing.assert_close(out["blocks.0.g"], torch.tensor([2.5]))
    # Swapping a and b swaps the orientation.
    out = checkfree_average(prev, nxt, a=1.0, b=3.0, eps=0.0)
    torch.testing.assert_close(out["blocks.0.w"], torch.tensor([2.0, 3.0]))


def test_epsilon_goes_on_both_norms() -> None:
    prev = {"w": torch.tensor([0.0])}
    nxt = {"w": torch.tensor([12.0])}
    # ((2 + 1) * 12 + (0 + 1) * 0) / (2 + 0 + 2) = 9
    torch.testing.assert_close(checkfree_average(prev, nxt, a=2.0, b=0.0, eps=1.0)["w"], torch.tensor([9.0]))
    # Both norms zero: the plain mean, not 0/0.
    torch.testing.assert_close(checkfree_average(prev, nxt, a=0.0, b=0.0, eps=1e-8)["w"], torch.tensor([6.0]))


def test_math_is_fp32_and_dtype_is_kept() -> None:
    prev = {"w": torch.full((4,), 1.0, dtype=torch.bfloat16)}
    nxt = {"w": torch.full((4,), 2.0, dtype=torch.bfloat16)}
    out = checkfree_average(prev, nxt, a=1.0, b=1.0, eps=0.0)
    assert out["w"].dtype == torch.bfloat16
    torch.testing.assert_close(out["w"].float(), torch.full((4,), 1.5))
    # Sources are not modified.
    assert float(prev["w"][0]) == 1.0


def test_shape_and_name_mismatch_and_bad_weights_are_clear_errors() -> None:
    a = {"blocks.0.w": torch.zeros(2, 3)}
    with pytest.raises(CheckFreeError, match=r"blocks.0.w: shape \(2, 3\) in prev does not match \(3, 2\)"):
        checkfree_average(a, {"blocks.0.w": torch.zeros(3, 2)}, 1.0, 1.0)
    with pytest.raises(CheckFreeError, match="parameter names differ"):
        checkfree_average(a, {"blocks.1.w": torch.zeros(2, 3)}, 1.0, 1.0)
    with pytest.raises(CheckFreeError, match="non-finite"):
        checkfree_average(a, {"blocks.0.w": torch.full((2, 3), float("nan"))}, 1.0, 1.0)
    with pytest.raises(CheckFreeError, match="a must be"):
        checkfree_average(a, a, float("inf"), 1.0)
    with pytest.raises(CheckFreeError, match="b must be"):
        checkfree_average(a, a, 1.0, -1.0)


def test_rebuild_checkfree_on_real_stages_matches_formula() -> None:
    cfg = ModelConfig.from_preset("tiny")
    s1, s3 = build_stage(cfg, 1, 4, seed=1), build_stage(cfg, 3, 4, seed=1)
    target = build_stage(cfg, 2, 4, seed=7)
    state = rebuild_stage("checkfree", {3: s3.state_dict(), 1: s1.state_dict()}, {3: 0.75, 1: 0.25})
    load_rebuilt(target, state)
    for name, p in target.named_parameters():
        torch.testing.assert_close(p.data, 0.75 * s3.state_dict()[name] + 0.25 * s1.state_dict()[name])
    # A single surviving side is a copy.
    state = rebuild_stage("checkfree", {1: s1.state_dict()}, {1: 1.0})
    torch.testing.assert_close(state, s1.state_dict())
    # Stage modules of different splits do not load.
    wrong = build_stage(cfg, 1, 7, seed=1)
    with pytest.raises(CheckFreeError):
        load_rebuilt(wrong, state)


def test_edge_copy_is_an_independent_copy() -> None:
    src = {"blocks.0.w": torch.ones(3)}
    out = edge_copy(src)
    out["blocks.0.w"].add_(1.0)
    assert float(src["blocks.0.w"][0]) == 1.0
    state = rebuild_stage("checkfree-plus", {2: src}, {2: 1.0})
    torch.testing.assert_close(state, src)
    with pytest.raises(CheckFreeError, match="exactly one"):
        rebuild_stage("checkfree-plus", {2: src, 3: src}, {2: 0.5, 3: 0.5})


def test_bookend_copy_and_restore_round_trip() -> None:
    cfg = ModelConfig.from_preset("tiny")
    stage0 = build_stage(cfg, 0, 4, seed=3)
    copy = bookend_copy_state(stage0.state_dict())
    assert set(copy) == set(BOOKEND_KEYS)
    fresh = build_stage(cfg, 0, 4, seed=99)
    load_rebuilt(fresh, rebuild_stage("bookend-copy", {1: copy}, {1: 1.0}))
    torch.testing.assert_close(fresh.state_dict(), stage0.state_dict())
    with pytest.raises(CheckFreeError, match="missing"):
        bookend_copy_state({"embed.weight": torch.zeros(2, 2)})
    bad = dict(copy, **{"output.weight": torch.zeros(3, 3)})
    with pytest.raises(CheckFreeError, match="shape"):
        restore_bookend(bad, reference=stage0.state_dict())


def test_random_reinit_and_unknown_method() -> None:
    fresh = {"w": torch.randn(3)}
    torch.testing.assert_close(rebuild_stage("random-reinit", {}, {}, fresh_state=fresh), fresh)
    with pytest.raises(CheckFreeError, match="fresh_state"):
        rebuild_stage("random-reinit", {}, {})
    with pytest.raises(CheckFreeError, match="unknown"):
        rebuild_stage("teleport", {}, {})


def test_fresh_inner_optimizer_runs_at_scaled_lr_with_empty_state() -> None:
    cfg = ModelConfig.from_preset("tiny")
    stage = build_stage(cfg, 2, 4, seed=0)
    train = TrainSection(lr=2e-3)
    opt = fresh_inner_optimizer(stage.parameters(), train)
    assert all(g["lr"] == pytest.approx(2.2e-3) for g in opt.param_groups)
    assert len(opt.state) == 0
    opt = fresh_inner_optimizer(stage.parameters(), train, lr_scale=1.5)
    assert all(g["lr"] == pytest.approx(3e-3) for g in opt.param_groups)
    with pytest.raises(CheckFreeError):
        fresh_inner_optimizer(stage.parameters(), train, lr_scale=0.0)


def test_grad_norm_reports_the_stage_gradient() -> None:
    lin = torch.nn.Linear(2, 1, bias=False)
    assert grad_norm(lin) == 0.0
    lin.weight.grad = torch.tensor([[3.0, 4.0]])
    assert grad_norm(lin) == pytest.approx(5.0)
