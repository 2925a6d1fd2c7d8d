"""The model, its stage split and in-process path execution."""

from __future__ import annotations

import pytest
import torch

from lowband.node.train.along_path import full_path, path_loss, run_path
from lowband.node.train.model import (
    PRESETS,
    Block,
    BlockStage,
    Bookend,
    ModelConfig,
    Transformer,
    blocks_per_stage,
    build_stage,
    global_named_parameters,
    init_stage,
    split_model,
)
from lowband.protocols.config import MODEL_PRESETS

torch.set_num_threads(1)

TINY = ModelConfig.from_preset("tiny")


@pytest.fixture(scope="module")
def model() -> Transformer:
    return Transformer(TINY, seed=7).eval()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))


def test_tiny_preset_size_and_unknown_preset() -> None:
    params = sum(p.numel() for p in Transformer(TINY, seed=0).parameters())
    assert params == TINY.num_params()
    assert params < 1_000_000
    for name, cfg in PRESETS.items():
        assert cfg.vocab_size == 256, name
    with pytest.raises(ValueError, match=r"unknown model preset 'huge'.*tiny"):
        ModelConfig.from_preset("huge")
    assert ModelConfig.from_preset("tiny", max_seq_len=64).max_seq_len == 64


def test_preset_names_and_sizes() -> None:
    assert tuple(PRESETS) == MODEL_PRESETS   # the config validates names without importing node
    for name, expected in (("124m", 124e6), ("500m", 500e6), ("1.5b", 1.5e9)):
        assert abs(PRESETS[name].num_params() / expected - 1) < 0.1, name


@pytest.mark.parametrize("num_stages", [2, 3, 4, 7])
def test_full_path_equals_unsplit_model(model: Transformer, tokens: torch.Tensor, num_stages: int) -> None:
    stages = split_model(model, num_stages)
    with torch.no_grad():
        expected = model(tokens)
        got = run_path(stages, full_path(num_stages), tokens)
        got_map = run_path(dict(enumerate(stages)), full_path(num_stages), tokens)
    # Same ops in the same order: fp32 agreement is at rounding level.
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_map, expected, atol=1e-5, rtol=1e-5)


def test_init_stage_equals_slice_of_seeded_transformer(model: Transformer, tokens: torch.Tensor) -> None:
    full = dict(model.named_parameters())
    stages = [init_stage(TINY, s, 4, seed=7) for s in range(4)]
    for stage in stages:
        for global_name, param in global_named_parameters(stage):
            torch.testing.assert_close(param, full[global_name], atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(run_path(stages, [0, 1, 2, 3, 0], tokens), model(tokens), atol=1e-5, rtol=1e-5)
    other = init_stage(TINY, 2, 4, seed=8)
    assert not torch.equal(other.blocks[0].attn.wq.weight, stages[2].blocks[0].attn.wq.weight)


def test_stage_structure_and_local_names() -> None:
    stage0, stage2 = build_stage(TINY, 0, 4, seed=0), build_stage(TINY, 2, 4, seed=0)
    assert isinstance(stage0, Bookend) and isinstance(stage2, BlockStage)
    assert {n for n, _ in stage0.named_parameters()} == {"embed.weight", "norm.weight", "output.weight"}
    names1 = [n for n, _ in build_stage(TINY, 1, 4, seed=0).named_parameters()]
    names2 = [n for n, _ in stage2.named_parameters()]
    assert names1 == names2 and names1[0].startswith("blocks.0.")
    assert len(stage2.blocks) == 2 and all(isinstance(b, Block) for b in stage2.blocks)
    h = torch.randn(2, 8, TINY.dim)
    assert stage2(h).shape == h.shape


def test_skip_and_swap_paths_run_and_differ(model: Transformer, tokens: torch.Tensor) -> None:
    stages = split_model(model, 4)
    targets = torch.roll(tokens, -1, dims=1)
    with torch.no_grad():
        full = run_path(stages, [0, 1, 2, 3, 0], tokens)
        for path in ([0, 2, 1, 3, 0], [0, 1, 3, 0], [0, 3, 0], [0, 0]):
            logits = run_path(stages, path, tokens)
            assert logits.shape == full.shape and torch.isfinite(logits).all()
            assert not torch.allclose(logits, full)
    loss = path_loss(stages, [0, 2, 1, 3, 0], tokens, targets)
    loss.backward()
    assert stages[1].blocks[0].attn.wq.weight.grad is not None
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize(
    ("path", "message"),
    [([1, 2, 3, 0], "start and end at stage 0"), ([0, 1, 2, 3], "start and end"), ([], "start and end"),
     ([0, 5, 0], "unknown stage 5"), ([0, 1, 0, 2, 0], "only at the start"), ([0, -1, 0], "unknown stage")],
)
def test_invalid_paths_refused(model: Transformer, tokens: torch.Tensor, path: list[int], message: str) -> None:
    stages = split_model(model, 4)
    with pytest.raises(ValueError, match=message):
        run_path(stages, path, tokens)


@pytest.mark.parametrize("num_stages", [5, 6, 0])
def test_uneven_split_refused(num_stages: int) -> None:
    with pytest.raises(ValueError, match="stage"):
        blocks_per_stage(TINY, num_stages)
    with pytest.raises(ValueError):
        build_stage(TINY, 1, num_stages)
    if num_stages == 5:
        with pytest.raises(ValueError, match="6 blocks cannot be split evenly into 4 block stages"):
            build_stage(TINY, 1, num_stages)


def test_sequence_longer_than_max_refused() -> None:
    cfg = ModelConfig.from_preset("tiny", max_seq_len=16)
    with pytest.raises(ValueError, match="max_seq_len"):
        Transformer(cfg, seed=0)(torch.zeros(1, 17, dtype=torch.long))


def test_global_rng_seeding_is_reproducible() -> None:
    torch.manual_seed(3)
    a = build_stage(TINY, 1, 4)
    torch.manual_seed(3)
    b = build_stage(TINY, 1, 4)
    torch.testing.assert_close(a.state_dict(), b.state_dict(), atol=0, rtol=0)


def test_inference_mode_then_training_works(tokens: torch.Tensor) -> None:
    model = Transformer(TINY, seed=1)
    with torch.inference_mode():
        model(tokens)   # fills the rotary cache inside inference mode
    model(tokens).sum().backward()
    assert model.blocks[0].attn.wq.weight.grad is not None
