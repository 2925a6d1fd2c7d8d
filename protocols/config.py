"""The run configuration: typed sections loaded from TOML, overridden by flags.

One path only: TOML file -> ``RunConfig.from_dict`` -> ``apply_overrides``.
The coordinator sends the resolved config to every node as JSON at join, so
every process of a run trains with the same settings. A bad value raises
``ConfigError`` naming the exact setting (``diloco.inner_steps``).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowband.protocols.hop_bytes import SUBSPACE_PREFIX, is_subspace


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


CODECS = ("fp32", "bf16", "fp16", "int8", "int4", "fp8", "fp4")
# A pipeline hop's codecs: the plain ones, and a subspace model's coordinates in one of them
# (protocols/subspace.py; needs model.subspace_rank > 0)
HOP_CODECS = (*CODECS, *(f"{SUBSPACE_PREFIX}{codec}" for codec in CODECS))
PLANNERS = ("full", "random", "skippipe", "skippipe-unaware")  # coordinator.planner.PLANNERS
RECOVERY_METHODS = ("checkfree", "checkfree-plus", "random-reinit", "none")


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


MODEL_PRESETS = ("tiny", "small", "124m", "500m", "1.5b")   # defined in node/train/model.py
PRECISIONS = ("auto", "fp32", "bf16")   # train.precision (node/train/precision.py)
TOKENIZERS = ("bytes", "bpe")   # train.tokenizer (protocols/tokenizer.py)
BYTE_VOCAB = 256                # text read as bytes
MAX_BPE_VOCAB = 1 << 16         # a BPE's ids fit uint16, as nanoGPT's token files
TOKEN_FILE_SUFFIXES = (".bin", ".npy")   # pre-tokenized data (".u8.bin" ends in ".bin" too): protocols/vocab.py


def is_token_file(data: str | Path) -> bool:
    """Whether ``train.data`` names a token file (else text: the default corpus, a file, a folder)."""
    return bool(str(data)) and Path(data).name.lower().endswith(TOKEN_FILE_SUFFIXES)


@dataclass(kw_only=True, slots=True)
class ModelSection:
    preset: str = "tiny"
    stages: int = 4            # S, including stage 0 (embedding + head); 1: data-parallel (whole model per node)
    seq_len: int = 128
    # > 0: a Protocol Models-style residual stream (protocols/subspace.py); the subspace-* hop codecs need it
    subspace_rank: int = 0
    # token ids the model embeds; 0: the data's own (256 for text read as bytes; a token file's
    # largest id + 1, resolved by protocols/vocab.py where the run starts)
    vocab_size: int = 0

    def __post_init__(self) -> None:
        _check(self.vocab_size >= 0, "model.vocab_size", f"must be >= 0 (0: the data's own), got {self.vocab_size}")
        _check(self.preset in MODEL_PRESETS, "model.preset", f"unknown preset {self.preset!r}; choose one of {MODEL_PRESETS}")
        _check(self.stages >= 1, "model.stages",
               f"must be >= 1 (1: data-parallel, every node holds the whole model), got {self.stages}")
        _check(self.seq_len >= 2, "model.seq_len", f"must be >= 2, got {self.seq_len}")
        _check(self.subspace_rank >= 0, "model.subspace_rank", f"must be >= 0 (0: off), got {self.subspace_rank}")


@dataclass(kw_only=True, slots=True)
class TrainSection:
    microbatch_size: int = 8          # sequences per microbatch
    microbatches: int = 2             # microbatches per origin per iteration
    steps: int = 300                  # inner steps (iterations) of the run
    lr: float = 4e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 25
    eval_batches: int = 4
    activation_codec: str = "bf16"   # the activations a hop sends forward
    gradient_codec: str = ""         # their gradients, sent back on the backward pass ("": as activations)
    hop_timeout_s: float = 10.0
    data: str = ""                    # empty: the embedded standard-library corpus
    data_max_bytes: int = 8 << 20     # cap on tokens loaded from any source; 0 = no cap
    val_fraction: float = 0.05        # held-out share (by file for directories and the default corpus)
    # compute precision of forward/backward: "auto" = bf16 autocast on CUDA, fp32 elsewhere; "bf16" also
    # on CPU; "fp32" never autocasts. Master weights, optimizer state and DiLoCo stay fp32 in every mode.
    precision: str = "auto"
    # how text becomes token ids: "bytes" (256 ids) or "bpe", a byte-level BPE of vocab_size tokens trained
    # on the run's training split where the run starts and shared by the coordinator (protocols/tokenizer.py)
    tokenizer: str = "bytes"
    vocab_size: int = 0               # the BPE's size (tokenizer = "bpe" only)

    def __post_init__(self) -> None:
        _check(self.microbatch_size >= 1, "train.microbatch_size", "must be >= 1")
        _check(self.microbatches >= 1, "train.microbatches", "must be >= 1")
        _check(self.steps >= 1, "train.steps", "must be >= 1")
        _check(self.lr > 0, "train.lr", "must be > 0")
        _check(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]")
        _check(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "train.beta1/beta2", "must be in [0, 1)")
        _check(self.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
        _check(self.eval_every >= 1, "train.eval_every", "must be >= 1")
        _check(self.eval_batches >= 1, "train.eval_batches", "must be >= 1")
        _check(self.activation_codec in HOP_CODECS, "train.activation_codec", f"must be one of {HOP_CODECS}")
        _check(self.gradient_codec in ("", *HOP_CODECS), "train.gradient_codec",
               f"must be one of {HOP_CODECS}, or empty for the activation codec")
        _check(self.hop_timeout_s > 0, "train.hop_timeout_s", "must be > 0")
        _check(self.data_max_bytes >= 0, "train.data_max_bytes", "must be >= 0 (0 = no cap)")
        _check(0 < self.val_fraction < 1, "train.val_fraction", "must be in (0, 1)")
        _check(self.precision in PRECISIONS, "train.precision", f"must be one of {PRECISIONS}")
        _check(self.tokenizer in TOKENIZERS, "train.tokenizer", f"must be one of {TOKENIZERS}")
        if self.tokenizer == "bpe":
            _check(BYTE_VOCAB < self.vocab_size <= MAX_BPE_VOCAB, "train.vocab_size",
                   f"train.tokenizer = 'bpe' needs a vocabulary size in [{BYTE_VOCAB + 1}, {MAX_BPE_VOCAB}] "
                   f"(the {BYTE_VOCAB} byte tokens plus merges; 4096 is a good start), got {self.vocab_size}")
            _check(not is_token_file(self.data), "train.tokenizer",
                   f"'bpe' tokenizes text, but train.data {self.data!r} is a token file (already tokenized): "
                   "set train.tokenizer = 'bytes'")
        else:
            _check(self.vocab_size == 0, "train.vocab_size",
                   f"sets the size of a BPE (train.tokenizer = 'bpe'); bytes have {BYTE_VOCAB}, got {self.vocab_size}")


ROBUST_MODES = ("auto", "clip", "off")   # diloco.robust (node/sync/robust_mean.py)


@dataclass(kw_only=True, slots=True)
class DilocoSection:
    inner_steps: int = 100            # H
    fragments: int = 1                # P (strided over blocks)
    overlap: int = 1                  # tau: merge the averaged fragment tau steps later
    alpha: float = 0.5                # theta <- alpha*theta_local + (1-alpha)*theta_global_new
    outer_lr: float = 0.7
    # > 0: the outer lr moves linearly from outer_lr to outer_lr_final over each fragment's first
    # outer_lr_ramp outer steps (early training moves fast and wants the smaller step), then stays there
    outer_lr_final: float = 0.0
    outer_lr_ramp: int = 0
    outer_momentum: float = 0.9
    codec: str = "fp4"
    backend: str = "grpc"             # "grpc" or "hivemind"
    reject_norm_ratio: float = 0.0    # >0: drop a peer whose update norm exceeds ratio x median
    # robust aggregation at shard owners: "auto" clips each part's norm (2 parts: to the smaller; 3+: to
    # clip_multiple x the running median of past rounds) and takes a trimmed mean from 3 parts; "clip"
    # clips only; "off" is the plain mean. clip_multiple > 1 lets a poisoned part move θ_global further
    # than a clean round would
    robust: str = "auto"
    clip_multiple: float = 1.0
    peer_timeout_s: float = 10.0
    error_feedback: bool = False      # carry each quantized send's error into the next send of that fragment
    # codec = "sparse" (SparseLoCo, protocols/sparse.py): each chunk of sparse_chunk elements sends its
    # sparse_topk largest entries in sparse_bits bits; error feedback (e <- sparse_error_decay*e + delta)
    # replaces the outer momentum (outer_momentum is not used; sparse_outer_momentum > 0 adds Nesterov
    # momentum on the averaged sparse update); shard owners re-select the mean's sparse_reply_topk entries
    # per chunk (0: sparse_topk). Defaults: the best measured in benchmarks/bandwidth.md (with
    # outer_lr = 2, alpha = 0)
    sparse_chunk: int = 4096
    sparse_topk: int = 320
    sparse_bits: int = 2
    sparse_error_decay: float = 0.9
    sparse_outer_momentum: float = 0.0
    sparse_reply_topk: int = 800

    def __post_init__(self) -> None:
        _check(self.inner_steps >= 1, "diloco.inner_steps", "must be >= 1")
        _check(self.fragments >= 1, "diloco.fragments", "must be >= 1")
        _check(self.fragments <= self.inner_steps, "diloco.fragments", "must be <= diloco.inner_steps")
        _check(0 <= self.overlap < self.inner_steps or self.inner_steps == 1, "diloco.overlap",
               "must be >= 0 and below diloco.inner_steps")
        _check(0.0 <= self.alpha <= 1.0, "diloco.alpha", "must be in [0, 1]")
        _check(self.outer_lr > 0, "diloco.outer_lr", "must be > 0")
        _check(self.outer_lr_final >= 0, "diloco.outer_lr_final", "must be >= 0 (0: a constant diloco.outer_lr)")
        _check(self.outer_lr_ramp >= 0, "diloco.outer_lr_ramp", "must be >= 0")
        _check((self.outer_lr_final > 0) == (self.outer_lr_ramp > 0), "diloco.outer_lr_ramp",
               "set together with diloco.outer_lr_final (both > 0, or both 0)")
        _check(0.0 <= self.outer_momentum < 1.0, "diloco.outer_momentum", "must be in [0, 1)")
        _check(self.codec in (*CODECS, "sparse"), "diloco.codec", f"must be one of {(*CODECS, 'sparse')}")
        _check(self.backend in ("grpc", "hivemind"), "diloco.backend", "must be 'grpc' or 'hivemind'")
        _check(self.codec != "sparse" or self.backend == "grpc", "diloco.codec",
               "'sparse' is averaged by the grpc backend only (set diloco.backend = 'grpc')")
        _check(1 <= self.sparse_chunk <= 1 << 15, "diloco.sparse_chunk", "must be in [1, 32768]")
        _check(1 <= self.sparse_topk <= self.sparse_chunk, "diloco.sparse_topk", "must be in [1, diloco.sparse_chunk]")
        _check(self.sparse_bits in (1, 2), "diloco.sparse_bits", "must be 1 or 2")
        _check(0.0 < self.sparse_error_decay <= 1.0, "diloco.sparse_error_decay", "must be in (0, 1]")
        _check(0.0 <= self.sparse_outer_momentum < 1.0, "diloco.sparse_outer_momentum", "must be in [0, 1)")
        _check(0 <= self.sparse_reply_topk <= 1 << 15, "diloco.sparse_reply_topk",
               "must be in [0, 32768] (0: diloco.sparse_topk; capped at diloco.sparse_chunk)")
        _check(self.reject_norm_ratio >= 0, "diloco.reject_norm_ratio", "must be >= 0")
        _check(self.robust in ROBUST_MODES, "diloco.robust", f"must be one of {ROBUST_MODES}")
        _check(1.0 <= self.clip_multiple <= 1e6, "diloco.clip_multiple", "must be in [1, 1e6]")
        _check(self.peer_timeout_s > 0, "diloco.peer_timeout_s", "must be > 0")


@dataclass(kw_only=True, slots=True)
class SkipPipeSection:
    skip_ratio: float = 0.0           # k
    planner: str = "full"
    max_swaps: int = 2
    max_jump: int = 3                 # stages a forward jump may skip
    memory_cap: int = 0               # microbatches a node holds at once; 0 = unbounded

    def __post_init__(self) -> None:
        _check(0.0 <= self.skip_ratio < 1.0, "skippipe.skip_ratio", "must be in [0, 1)")
        _check(self.planner in PLANNERS, "skippipe.planner", f"must be one of {PLANNERS}")
        _check(0 <= self.max_swaps <= 2, "skippipe.max_swaps", "must be in [0, 2]")
        _check(0 <= self.max_jump <= 3, "skippipe.max_jump", "must be in [0, 3]")
        _check(self.memory_cap >= 0, "skippipe.memory_cap", "must be >= 0")


@dataclass(kw_only=True, slots=True)
class MembershipSection:
    heartbeat_interval_s: float = 1.0
    lease_s: float = 5.0
    min_replicas: int = 1
    sync_join_window_s: float = 2.0   # how long a sync round waits for stragglers (stages = 1: sync_timeout_s)
    min_sync_participants: int = 1
    sync_timeout_s: float = 10.0      # a round still short of the minimum after this is abandoned
    rebalance: bool = True            # move a node from the best-covered stage rather than leave one empty

    def __post_init__(self) -> None:
        _check(self.heartbeat_interval_s > 0, "membership.heartbeat_interval_s", "must be > 0")
        _check(self.lease_s > self.heartbeat_interval_s, "membership.lease_s",
               "must be longer than membership.heartbeat_interval_s")
        _check(self.min_replicas >= 1, "membership.min_replicas", "must be >= 1")
        _check(self.sync_join_window_s > 0, "membership.sync_join_window_s", "must be > 0")
        _check(self.min_sync_participants >= 1, "membership.min_sync_participants", "must be >= 1")
        _check(self.sync_timeout_s >= self.sync_join_window_s, "membership.sync_timeout_s",
               "must be >= membership.sync_join_window_s")


@dataclass(kw_only=True, slots=True)
class RecoverySection:
    # How a stage that lost every replica is rebuilt (coordinator/recovery.py):
    # "checkfree-plus" (neighbour average, edge copy, bookend copy), "checkfree"
    # (edges and stage 0 re-initialised), "random-reinit", or "none" (refuse).
    method: str = "checkfree-plus"
    lr_scale: float = 1.1             # inner lr multiplier of a rebuilt stage's fresh optimizer
    epsilon: float = 1e-8             # added to both neighbour gradient norms in the CheckFree weights
    swap_edges: bool = True           # CheckFree+ out-of-order execution on half the microbatches
    allow_move: bool = True           # a wiped stage may take a node from a stage with spare replicas
    # inner steps between refreshes of the stage-0 copy that stages 1 and S-1 keep (bookend-copy);
    # 0: every outer period (diloco.inner_steps). Each refresh streams stage 0's whole state.
    bookend_copy_every: int = 0

    def __post_init__(self) -> None:
        _check(self.method in RECOVERY_METHODS, "recovery.method", f"must be one of {RECOVERY_METHODS}")
        _check(0 < self.lr_scale < float("inf"), "recovery.lr_scale", "must be a finite number > 0")
        _check(0 <= self.epsilon < float("inf"), "recovery.epsilon", "must be a finite number >= 0")
        _check(self.bookend_copy_every >= 0, "recovery.bookend_copy_every", "must be >= 0 (0: every outer period)")


@dataclass(kw_only=True, slots=True)
class RunConfig:
    run_id: str = "lowband"
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    diloco: DilocoSection = field(default_factory=DilocoSection)
    skippipe: SkipPipeSection = field(default_factory=SkipPipeSection)
    membership: MembershipSection = field(default_factory=MembershipSection)
    recovery: RecoverySection = field(default_factory=RecoverySection)

    def __post_init__(self) -> None:
        for name, codec in (("train.activation_codec", self.train.activation_codec),
                            ("train.gradient_codec", self.train.gradient_codec)):
            _check(not is_subspace(codec) or self.model.subspace_rank > 0, name,
                   f"{codec!r} sends a subspace model's coordinates: set model.subspace_rank > 0 "
                   "(or choose a plain codec)")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        return build_dataclass(cls, data, prefix="")

    @classmethod
    def from_toml(cls, path: str | Path) -> RunConfig:
        return cls.from_dict(read_toml(path))

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"run config is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file as a dict; a missing or malformed file is a ConfigError naming it."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def build_dataclass(cls: type, data: Any, prefix: str = "") -> Any:
    """Build a (nested) config dataclass from a TOML table, naming the bad setting on error."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a table, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown setting (known: {', '.join(sorted(fields))})")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        f = fields[name]
        key = f"{prefix}{name}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            kwargs[name] = build_dataclass(type(default), value, prefix=f"{key}.")
        else:
            kwargs[name] = _coerce(key, value, type(default))
    return cls(**kwargs)


# What a numeric setting accepts (a TOML number, or a string from --set) and how an error names it.
_NUMBERS: dict[type, tuple[tuple[type, ...], str]] = {
    int: ((int, str), "an integer"),
    float: ((int, float, str), "a number"),
}


def _coerce(key: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if kind in _NUMBERS:
        accepted, what = _NUMBERS[kind]
        if isinstance(value, bool) or not isinstance(value, accepted):
            raise ConfigError(f"{key}: expected {what}, got {value!r}")
        try:
            return kind(value)
        except ValueError as exc:
            raise ConfigError(f"{key}: expected {what}, got {value!r}") from exc
    if kind is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return value
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def apply_overrides(config: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply ``section.key=value`` flags on top of a config, validating the result."""
    data = config.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        dotted, value = item.split("=", 1)
        parts = dotted.strip().split(".")
        target = data
        for part in parts[:-1]:
            if part not in target or not isinstance(target[part], dict):
                raise ConfigError(f"{dotted}: unknown section {part!r}")
            target = target[part]
        if parts[-1] not in target:
            raise ConfigError(f"{dotted}: unknown setting")
        target[parts[-1]] = value.strip()
    return RunConfig.from_dict(data)


def to_toml(config: RunConfig) -> str:
    """Serialise a RunConfig as TOML (sections of scalars), readable by ``from_toml``."""
    lines: list[str] = []
    sections: list[tuple[str, dict[str, Any]]] = []
    for key, value in config.to_dict().items():
        if isinstance(value, dict):
            sections.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for name, table in sections:
        lines.append(f"\n[{name}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in table.items())
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    raise ConfigError(f"cannot write {value!r} as TOML")
