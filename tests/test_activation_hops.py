"""Hops in one process: where activations cross the network, and a hop's codec round trip."""

from __future__ import annotations

import pytest
import torch

from lowband.node.pipeline.local_hop import CodecHop
from lowband.node.train.along_path import full_path, path_loss, run_blocks
from lowband.node.train.model import ModelConfig, init_stage
from lowband.protocols.errors import ValidationError

CFG = ModelConfig.from_preset("tiny")
STAGES = 4

def _stages() -> list[torch.nn.Module]:
    return [init_stage(CFG, s, STAGES, seed=0) for s in range(STAGES)]


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, CFG.vocab_size, (2, 16), generator=g)
    return tokens, torch.roll(tokens, -1, dims=1)


def _grads(stages: list[torch.nn.Module], hop: object | None) -> list[torch.Tensor]:
    for m in stages:
        m.zero_grad(set_to_none=True)
    tokens, targets = _batch()
    path_loss(stages, full_path(STAGES), tokens, targets, hop).backward()   # type: ignore[arg-type]
    return [p.grad.clone() for m in stages for p in m.parameters() if p.grad is not None]


def test_a_hop_is_applied_wherever_the_states_leave_a_node() -> None:
    seen: list[tuple[int, ...]] = []

    def hop(h: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(h.shape))
        return h

    stages = _stages()
    h = torch.randn(2, 16, CFG.dim)
    run_blocks(stages, [0, 2, 1, 3, 0], h, hop)
    assert len(seen) == 4   # origin -> 2 -> 1 -> 3 -> origin
    run_blocks(stages, [0, 3, 0], h, hop)
    assert len(seen) == 6


def test_an_exact_codec_hop_changes_nothing_and_counts_both_directions() -> None:
    stages = _stages()
    plain = _grads(stages, None)
    hop = CodecHop("fp32", "fp32")
    exact = _grads(stages, hop)
    assert all(torch.equal(a, b) for a, b in zip(plain, exact, strict=True))
    hidden_bytes = 2 * 16 * CFG.dim * 4 * STAGES   # fp32 states, one message per hop
    assert hop.hops == STAGES
    assert hidden_bytes < hop.bytes["forward"] < hidden_bytes * 1.2
    assert hidden_bytes < hop.bytes["backward"] < hidden_bytes * 1.2


@pytest.mark.parametrize(("pair", "max_rel_error", "max_bytes_vs_bf16"), [
    (("int8", "int8"), 0.05, 0.6),
    (("fp4", "int8"), 0.5, 0.6),
])
def test_a_quantised_hop_sends_fewer_bytes_and_stays_near_the_exact_gradient(
        pair: tuple[str, str], max_rel_error: float, max_bytes_vs_bf16: float) -> None:
    stages = _stages()
    exact = torch.cat([g.flatten() for g in _grads(stages, None)])
    bf16 = CodecHop("bf16", "bf16")
    _grads(stages, bf16)
    hop = CodecHop(*pair)
    approx = torch.cat([g.flatten() for g in _grads(stages, hop)])
    assert float((approx - exact).norm() / exact.norm()) < max_rel_error
    assert hop.bytes["forward"] < bf16.bytes["forward"] * max_bytes_vs_bf16


def test_a_non_finite_activation_is_refused_as_a_receiving_node_would() -> None:
    hop = CodecHop("int8", "int8")
    bad = torch.randn(2, 4, CFG.dim)
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValidationError):
        hop.cross(bad, "bf16", "forward")
