"""A LLaMA-style decoder in plain torch, and its cut into pipeline stages.

Read top to bottom: config and presets, the building blocks (RMSNorm, rotary
attention, SwiGLU MLP, Block), the whole ``Transformer``, then the stages.

Stage layout:
- stage 0, the ``Bookend``: token embedding + final RMSNorm + LM head (+ loss).
  The head is untied from the embedding so stage 0 is self-contained.
- stages 1..S-1, ``BlockStage``: equal runs of consecutive blocks. Parameter
  names use a *local* block index (``blocks.{j}.…``) so neighbouring stages
  match name by name, which CheckFree averaging relies on.
- S = 1 (data-parallel mode), ``WholeStage``: stage 0 holds the whole model, its
  parameters named exactly as in ``Transformer`` (``blocks.{i}.…`` with the global
  index, which for one stage is the local one too).

Initialisation is keyed by each parameter's *global* name
(``blocks.{i}.attn.wq.weight``) and the run seed, so a stage built alone equals
the same slice of the whole model with no need to materialise the whole model.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from lowband.protocols import subspace
from lowband.protocols.config import ModelSection

# ---------------------------------------------------------------------------
# Configuration


@dataclass(kw_only=True, slots=True, frozen=True)
class ModelConfig:
    vocab_size: int = 256          # byte-level tokenizer
    dim: int = 128
    n_layers: int = 6
    n_heads: int = 4
    ffn_hidden: int = 192          # SwiGLU hidden width
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # > 0: the residual stream's learned part is its first `subspace_rank` coordinates, the rest a fixed
    # token anchor (protocols/subspace.py), so a pipeline hop sends only those and the token ids
    subspace_rank: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_hidden", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"model {name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"model dim {self.dim} must be divisible by n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} must be even for rotary embeddings")
        if self.rope_theta <= 0 or self.norm_eps <= 0 or self.init_std <= 0:
            raise ValueError("rope_theta, norm_eps and init_std must be > 0")
        if self.subspace_rank:
            subspace.check_shape(self.dim, self.subspace_rank, self.vocab_size)

    @property
    def residual_width(self) -> int:
        """Coordinates of the residual stream that the embedding and the blocks write."""
        return self.subspace_rank or self.dim

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_preset(cls, name: str, **overrides: object) -> ModelConfig:
        """A named preset, optionally with some fields replaced (``max_seq_len=1024``)."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown model field {unknown[0]!r}; known: {', '.join(sorted(known))}")
        values = {f.name: getattr(PRESETS[name], f.name) for f in fields(cls)}
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]

    def block_params(self) -> int:
        """Parameters of one block (computed, nothing allocated)."""
        attn = 3 * self.dim * self.dim + self.dim * self.residual_width
        mlp = 2 * self.dim * self.ffn_hidden + self.ffn_hidden * self.residual_width
        return attn + mlp + 2 * self.dim

    def bookend_params(self) -> int:
        return self.vocab_size * (self.dim + self.residual_width) + self.dim

    def num_params(self) -> int:
        return self.n_layers * self.block_params() + self.bookend_params()


def model_config_for(section: ModelSection) -> ModelConfig:
    """The preset named by a run's ``[model]`` section, with room for its ``seq_len``."""
    preset = ModelConfig.from_preset(section.preset)
    return ModelConfig.from_preset(section.preset, max_seq_len=max(preset.max_seq_len, section.seq_len),
                                   subspace_rank=section.subspace_rank,
                                   vocab_size=section.vocab_size or preset.vocab_size)


# Block counts are chosen so that common stage counts split evenly:
# tiny 6 blocks -> S = 2, 3, 4, 7; the larger ones have 12-24 blocks.
PRESETS: dict[str, ModelConfig] = {
    # ~0.9M parameters: tests and CPU runs.
    "tiny": ModelConfig(dim=128, n_layers=6, n_heads=4, ffn_hidden=192, max_seq_len=512),
    # ~9.6M parameters: laptop-scale experiments.
    "small": ModelConfig(dim=256, n_layers=12, n_heads=8, ffn_hidden=688, max_seq_len=1024),
    # The papers' sizes (byte vocabulary, so almost every parameter is in blocks):
    # 127.8M, 476.5M and 1.53B parameters; 18 or 24 blocks.
    "124m": ModelConfig(dim=768, n_layers=18, n_heads=12, ffn_hidden=2048, max_seq_len=1024),
    "500m": ModelConfig(dim=1280, n_layers=24, n_heads=20, ffn_hidden=3456, max_seq_len=2048),
    "1.5b": ModelConfig(dim=2304, n_layers=24, n_heads=18, ffn_hidden=6144, max_seq_len=2048),
}


# ---------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 for stability under bf16 autocast, then cast back.
        x_f = x.float()
        x_f = x_f * torch.rsqrt(x_f.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x_f * self.weight.float()).type_as(x)


class Rotary(nn.Module):
    """Rotary position tables, computed lazily per (length, device), never saved."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.max_seq_len = cfg.max_seq_len
        self.theta = cfg.rope_theta
        self._cache: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if seq_len > self.max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds the model's max_seq_len {self.max_seq_len}")
        key = (seq_len, device)
        if key not in self._cache:
            # Plain tensors even when first called under inference_mode, so later training can use them.
            with torch.inference_mode(False):
                self._cache[key] = self._tables(seq_len, device)
        return self._cache[key]

    def _tables(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim))
        angles_TH = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)  # (T, hd/2)
        angles_TD = torch.cat([angles_TH, angles_TH], dim=-1)                           # (T, hd)
        return angles_TD.cos().float().to(device), angles_TD.sin().float().to(device)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x_BHTd: torch.Tensor, cos_Td: torch.Tensor, sin_Td: torch.Tensor) -> torch.Tensor:
    x_f = x_BHTd.float()
    return (x_f * cos_Td + _rotate_half(x_f) * sin_Td).type_as(x_BHTd)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.residual_width, bias=False)   # writes the residual's learned part

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        # (B, T, D) -> (B, H, T, hd)
        q = self.wq(x_BTD).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x_BTD).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x_BTD).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y_BHTd = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y_BTD = y_BHTd.transpose(1, 2).reshape(B, T, D)
        return self.wo(y_BTD)


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)   # gate
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)   # up
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.residual_width, bias=False)   # down, to the learned part

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x_BTD)) * self.w3(x_BTD))   # (B, T, F) -> (B, T, D or k)


def add_to_residual(x_BTD: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """``x + update``, where an update of the subspace width k < D adds to the first k coordinates only
    (the anchors in the rest are never written, which is what lets a hop leave them out)."""
    k = update.shape[-1]
    if k == x_BTD.shape[-1]:
        return x_BTD + update
    return torch.cat([x_BTD[..., :k] + update, x_BTD[..., k:]], dim=-1)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x_BTD = add_to_residual(x_BTD, self.attn(self.attn_norm(x_BTD), cos, sin))
        return add_to_residual(x_BTD, self.mlp(self.mlp_norm(x_BTD)))


class SubspaceEmbedding(nn.Module):
    """Token embedding of a subspace model: a learned (V, k) table for the first k coordinates, the
    fixed token anchors (protocols/subspace.py) for the rest. The anchors are a buffer (in the state
    dict, so an exported model is self-contained) and never trained."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        basis = subspace.make_basis(cfg.dim, cfg.subspace_rank, cfg.vocab_size)
        self.weight = nn.Parameter(torch.empty(cfg.vocab_size, cfg.subspace_rank))
        self.register_buffer("anchors", basis.anchors.clone())

    def forward(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.embedding(tokens_BT, self.weight), self.anchors[tokens_BT]], dim=-1)


    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object) -> None:   # type: ignore[override]
        # the anchors are the protocol's, not trained: a state with other anchors is another model
        theirs = state_dict.get(prefix + "anchors")
        if isinstance(theirs, torch.Tensor) and (theirs.shape != self.anchors.shape
                                                 or not torch.equal(theirs.to(self.anchors), self.anchors)):
            raise ValueError(f"{prefix}anchors differ from this model's (another subspace rank, width or "
                             "vocabulary, or a corrupted state)")
        super()._load_from_state_dict(state_dict, prefix, *args)   # type: ignore[arg-type]


def subspace_basis(cfg: ModelConfig) -> subspace.SubspaceBasis | None:
    """The anchors a subspace model's hops leave out (None for a model without a subspace)."""
    return subspace.make_basis(cfg.dim, cfg.subspace_rank, cfg.vocab_size) if cfg.subspace_rank else None


def token_embedding(cfg: ModelConfig) -> nn.Module:
    """The embedding a model of this shape uses; its parameter is ``weight`` either way."""
    return SubspaceEmbedding(cfg) if cfg.subspace_rank else nn.Embedding(cfg.vocab_size, cfg.dim)


# ---------------------------------------------------------------------------
# Deterministic initialisation keyed by global parameter name


def _param_seed(seed: int, global_name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{global_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def _init_named(named: Iterable[tuple[str, nn.Parameter]], cfg: ModelConfig, seed: int) -> None:
    """Initialise each parameter from its own generator, so any slice of the model is reproducible.

    nanoGPT scheme: N(0, 0.02) for matrices, residual output projections scaled
    by 1/sqrt(2 * n_layers), norm gains at one.
    """
    residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    for name, param in named:
        if param.ndim == 1:
            param.fill_(1.0)
            continue
        std = residual_std if name.endswith(("attn.wo.weight", "mlp.w2.weight")) else cfg.init_std
        gen = torch.Generator(device="cpu").manual_seed(_param_seed(seed, name))
        values = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
        param.copy_(values)


def _resolve_seed(seed: int | None) -> int:
    # No seed: draw one from torch's global RNG, so torch.manual_seed still makes runs reproducible.
    return int(torch.randint(0, 2**62, (1,)).item()) if seed is None else int(seed)


# ---------------------------------------------------------------------------
# The whole model


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, *, seed: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = token_embedding(cfg)
        self.rotary = Rotary(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.init_weights(_resolve_seed(seed))

    def init_weights(self, seed: int) -> None:
        _init_named(self.named_parameters(), self.cfg, seed)

    def forward(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        h_BTD = self.embed(tokens_BT)
        cos, sin = self.rotary(tokens_BT.shape[1], h_BTD.device)
        for block in self.blocks:
            h_BTD = block(h_BTD, cos, sin)
        return self.output(self.norm(h_BTD))   # (B, T, V)

    def loss(self, tokens_BT: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
        return lm_loss(self(tokens_BT), targets_BT)


def lm_loss(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in nats (computed in fp32)."""
    return F.cross_entropy(logits_BTV.float().reshape(-1, logits_BTV.shape[-1]), targets_BT.reshape(-1))


# ---------------------------------------------------------------------------
# Pipeline stages


def blocks_per_stage(cfg: ModelConfig, num_stages: int) -> int:
    """Blocks held by each stage that holds blocks (stages 1..S-1; stage 0 when S = 1, which holds
    them all); refuses splits that are not even."""
    if num_stages < 1:
        raise ValueError(f"need at least 1 stage, got {num_stages}")
    if num_stages == 1:
        return cfg.n_layers
    block_stages = num_stages - 1
    if cfg.n_layers % block_stages:
        divisors = [d + 1 for d in range(1, cfg.n_layers + 1) if cfg.n_layers % d == 0]
        raise ValueError(
            f"{cfg.n_layers} blocks cannot be split evenly into {block_stages} block stages; "
            f"choose stages-1 dividing {cfg.n_layers} (stages in {divisors})"
        )
    return cfg.n_layers // block_stages


def stage_blocks(cfg: ModelConfig, stage: int, num_stages: int) -> range:
    """Global indices of the blocks held by ``stage`` (empty for stage 0, every block when S = 1)."""
    per = blocks_per_stage(cfg, num_stages)
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} out of range for {num_stages} stages")
    if num_stages == 1:
        return range(cfg.n_layers)
    if stage == 0:
        return range(0)
    return range((stage - 1) * per, stage * per)


class Bookend(nn.Module):
    """Stage 0: where data lives. Embeds tokens on the way in, applies head and loss on the way back."""

    stage = 0

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = token_embedding(cfg)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # Parameter names equal Transformer's: embed.weight, norm.weight, output.weight.

    def embed_tokens(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens_BT)   # (B, T) -> (B, T, D)

    def head(self, h_BTD: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(h_BTD))   # (B, T, D) -> (B, T, V)

    def loss(self, h_BTD: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
        return lm_loss(self.head(h_BTD), targets_BT)

    def forward(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        """Stage 0 alone (no blocks): a bigram model. Mostly for tests."""
        return self.head(self.embed_tokens(tokens_BT))


class WholeStage(Bookend):
    """Stage 0 of a one-stage model (data-parallel mode): embedding, every block, final norm and head.

    A path is just the origin, so the blocks run between the embedding and the head: ``head`` applies
    them, and every caller that goes embedding -> head (the runtime, ``lowband.node.train.along_path.run_path`` with
    the path ``[0, 0]``) computes the whole model. Parameter names equal ``Transformer``'s.
    """

    def __init__(self, cfg: ModelConfig, blocks: Iterable[Block] | None = None) -> None:
        super().__init__(cfg)
        self.rotary = Rotary(cfg)
        self.blocks = nn.ModuleList(blocks if blocks is not None else (Block(cfg) for _ in range(cfg.n_layers)))

    def head(self, h_BTD: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rotary(h_BTD.shape[1], h_BTD.device)
        for block in self.blocks:
            h_BTD = block(h_BTD, cos, sin)
        return self.output(self.norm(h_BTD))   # (B, T, D) -> (B, T, V)

    def forward(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        """The whole model: logits (B, T, V)."""
        return self.head(self.embed_tokens(tokens_BT))


class BlockStage(nn.Module):
    """Stages 1..S-1: a run of consecutive blocks, ``forward(h) -> h``."""

    def __init__(self, cfg: ModelConfig, blocks: Iterable[Block], *, stage: int, first_block: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.stage = stage
        self.first_block = first_block
        self.rotary = Rotary(cfg)
        self.blocks = nn.ModuleList(blocks)

    def forward(self, h_BTD: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rotary(h_BTD.shape[1], h_BTD.device)
        for block in self.blocks:
            h_BTD = block(h_BTD, cos, sin)
        return h_BTD

    def global_names(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Parameters under their names in the whole ``Transformer`` (``blocks.{first+j}.…``)."""
        for name, param in self.named_parameters():
            _, j, rest = name.split(".", 2)
            yield f"blocks.{self.first_block + int(j)}.{rest}", param


def global_named_parameters(stage: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """A stage's parameters under their names in the whole ``Transformer``."""
    if isinstance(stage, Bookend):
        return list(stage.named_parameters())
    if isinstance(stage, BlockStage):
        return list(stage.global_names())
    raise TypeError(f"not a stage module: {type(stage).__name__}")


def build_stage(cfg: ModelConfig, stage: int, num_stages: int, seed: int | None = None) -> nn.Module:
    """A fresh stage module; ``seed=None`` draws the seed from torch's global RNG."""
    blocks = stage_blocks(cfg, stage, num_stages)   # validates stage and split
    module: nn.Module
    if num_stages == 1:
        module = WholeStage(cfg)
    elif stage == 0:
        module = Bookend(cfg)
    else:
        module = BlockStage(cfg, (Block(cfg) for _ in blocks), stage=stage, first_block=blocks.start)
    _init_named(global_named_parameters(module), cfg, _resolve_seed(seed))
    return module


def init_stage(cfg: ModelConfig, stage: int, num_stages: int, seed: int) -> nn.Module:
    """Stage ``stage`` exactly as it is in ``Transformer(cfg, seed=seed)``, without building the rest."""
    return build_stage(cfg, stage, num_stages, seed=seed)


def split_model(model: Transformer, num_stages: int) -> list[nn.Module]:
    """Cut a whole model into stage modules that share (not copy) its parameters."""
    cfg = model.cfg
    stages: list[nn.Module] = []
    for stage in range(num_stages):
        blocks = stage_blocks(cfg, stage, num_stages)
        if num_stages == 1:
            whole = WholeStage(cfg, blocks=list(model.blocks))
            whole.embed, whole.norm, whole.output = model.embed, model.norm, model.output
            stages.append(whole)
        elif stage == 0:
            bookend = Bookend(cfg)
            bookend.embed, bookend.norm, bookend.output = model.embed, model.norm, model.output
            stages.append(bookend)
        else:
            stages.append(
                BlockStage(cfg, (model.blocks[i] for i in blocks), stage=stage, first_block=blocks.start)
            )
    return stages
