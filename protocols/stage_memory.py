"""How much memory a stage needs, from the run config alone (pure; no torch).

The coordinator (which cannot import ``node``) uses it to keep a stage off a node that cannot hold it
and to derive the planner's per-node memory cap; the simulator uses it to cap node processes per GPU.
The preset shapes repeat ``node/train/model.py``'s PRESETS (a test holds them equal).

Estimates, deliberately on the high side (a node that runs out of memory loses its microbatches):

- a stage's *state*: 24 bytes per parameter: fp32 weights (4), their gradient sum (4), AdamW's two
  moments (8), DiLoCo's fp32 θ_global and outer momentum (8);
- a microbatch's *activations* kept for backward: per token and block about 20·D + 8·F values (norm
  inputs, q/k/v, attention output, the SwiGLU branches), in bf16 under autocast and fp32 otherwise,
  plus the fp32 residual stream; the bookend adds its logits (bf16/fp32) and the loss's fp32 softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowband.protocols.config import RunConfig

BYTE_VOCAB = 256
STATE_BYTES_PER_PARAM = 24


@dataclass(frozen=True, slots=True)
class Shape:
    dim: int
    n_layers: int
    n_heads: int
    ffn_hidden: int


# node/train/model.py PRESETS (tests/test_gpu_path.py checks they agree)
PRESET_SHAPES: dict[str, Shape] = {
    "tiny": Shape(128, 6, 4, 192),
    "small": Shape(256, 12, 8, 688),
    "124m": Shape(768, 18, 12, 2048),
    "500m": Shape(1280, 24, 20, 3456),
    "1.5b": Shape(2304, 24, 18, 6144),
}


def _vocab(config: RunConfig) -> int:
    """Token ids the embedding and head hold: the model's when resolved, else a BPE's size, else bytes."""
    if config.model.vocab_size:
        return config.model.vocab_size
    return config.train.vocab_size if config.train.tokenizer == "bpe" else BYTE_VOCAB


def _shape(config: RunConfig) -> Shape:
    try:
        return PRESET_SHAPES[config.model.preset]
    except KeyError:
        raise ValueError(f"no shape known for model preset {config.model.preset!r}") from None


def blocks_per_stage(config: RunConfig, stage: int) -> int:
    """Blocks stage ``stage`` holds: all of them with one stage, none at the bookend, else an equal share."""
    shape, stages = _shape(config), config.model.stages
    if not 0 <= stage < stages:
        raise ValueError(f"stage {stage} is outside 0..{stages - 1}")
    if stages == 1:
        return shape.n_layers
    return 0 if stage == 0 else shape.n_layers // (stages - 1)


def stage_params(config: RunConfig, stage: int) -> int:
    """Parameters of stage ``stage``: blocks (attention, SwiGLU, two norms), plus at the bookend the
    embedding, final norm and head."""
    shape = _shape(config)
    d, f = shape.dim, shape.ffn_hidden
    vocab = _vocab(config)
    block = 4 * d * d + 3 * d * f + 2 * d
    params = blocks_per_stage(config, stage) * block
    if stage == 0:
        params += 2 * vocab * d + d
    return params


def stage_state_bytes(config: RunConfig, stage: int) -> int:
    """Weights, gradients, optimizer and DiLoCo state of stage ``stage`` (fp32 throughout)."""
    return STATE_BYTES_PER_PARAM * stage_params(config, stage)


def microbatch_activation_bytes(config: RunConfig, stage: int, *, bf16: bool) -> int:
    """Bytes one in-flight microbatch keeps at stage ``stage`` until its backward (``bf16``: under autocast)."""
    shape = _shape(config)
    d, f = shape.dim, shape.ffn_hidden
    tokens = config.train.microbatch_size * config.model.seq_len
    elem = 2 if bf16 else 4
    per_block = (20 * d + 8 * f) * elem + 2 * d * 4   # + the fp32 residual stream in and out
    total = blocks_per_stage(config, stage) * per_block + 2 * d * 4
    if stage == 0:
        vocab = _vocab(config)
        total += vocab * (elem + 4 + 4)                  # logits, fp32 softmax and its gradient
    return tokens * total


def uses_bf16(precision: str, device: str) -> bool:
    """Whether ``train.precision`` autocasts to bf16 on a node whose device is ``device`` ("cuda:0", "cpu")."""
    return precision == "bf16" or (precision == "auto" and device.startswith("cuda"))


def stage_needs(config: RunConfig) -> list[int]:
    """``stage_need_bytes`` of every stage, fp32 activations (the larger: the joiner's device may be a CPU)."""
    return [stage_need_bytes(config, s) for s in range(config.model.stages)]


def stage_need_bytes(config: RunConfig, stage: int, *, bf16: bool = False) -> int:
    """What a node needs to host stage ``stage`` at all: its state and one microbatch's activations."""
    return stage_state_bytes(config, stage) + microbatch_activation_bytes(config, stage, bf16=bf16)


def microbatches_that_fit(config: RunConfig, stage: int, free_bytes: int, *, bf16: bool) -> int:
    """Microbatches a node with ``free_bytes`` free (before building its stage) can hold at once."""
    room = free_bytes - stage_state_bytes(config, stage)
    return max(0, room // max(1, microbatch_activation_bytes(config, stage, bf16=bf16)))


__all__ = [
    "PRESET_SHAPES",
    "STATE_BYTES_PER_PARAM",
    "Shape",
    "blocks_per_stage",
    "microbatch_activation_bytes",
    "microbatches_that_fit",
    "stage_need_bytes",
    "stage_needs",
    "stage_params",
    "stage_state_bytes",
    "uses_bf16",
]
