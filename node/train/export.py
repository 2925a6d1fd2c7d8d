"""Final-weights export: one file holding every stage of a trained model, for evaluation.

This is not a training checkpoint (no optimizer, no data position, no DiLoCo
state): it is what ``lowband-sim eval`` and ``lowband.node.train.evaluate`` read. Format
(``torch.save`` of plain dicts and tensors, so ``torch.load(weights_only=True)``
reads it without running pickled code)::

    {
        "format": "lowband-model",
        "version": 1,
        "model_config": {...},            # node.model.ModelConfig fields (or "model": the run's [model] table)
        "num_stages": S,                  # stage 0 (bookend) + S-1 block stages; 1: stage 0 is the whole model
        "stages": {0: state_dict, 1: state_dict, ...},
        "meta": {...},                    # free-form: how it was trained (JSON-safe values)
    }

Stage state dicts use the stage modules' own names (``embed.weight``,
``blocks.{j}.…`` with a local block index), so a stage loads straight into
``build_stage(cfg, s, S)``.

``load_model`` also reads what ``lowband-sim baseline`` writes: a whole
``Transformer`` state dict in ``DIR/model.pt`` next to ``DIR/summary.json``
(which names the preset and the stage count); pass the folder or the file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowband.node.train.model import ModelConfig, Transformer, build_stage, model_config_for, split_model
from lowband.protocols.config import ConfigError, ModelSection, RunConfig, build_dataclass
from lowband.protocols.model_file import (
    FORMAT,
    MODEL_FILE,
    VERSION,
    ModelFileError,
    file_tokenizer,
    write_model_file,
)
from lowband.protocols.tokenizer import BpeTokenizer, train_run_tokenizer

log = logging.getLogger(__name__)



class ExportError(ValueError):
    """An exported model cannot be written or read (missing, corrupt, wrong format, mismatched shapes)."""


@dataclass(slots=True)
class ExportedModel:
    """A loaded model: its config and one module per stage (``stages[0]`` is the bookend)."""

    config: ModelConfig
    num_stages: int
    stages: dict[int, nn.Module]
    meta: dict[str, Any] = field(default_factory=dict)
    path: str = ""
    tokenizer: BpeTokenizer | None = None   # a BPE run's (None: UTF-8 bytes are the tokens)


def _stage_items(stages: Mapping[int, nn.Module] | Sequence[nn.Module]) -> list[tuple[int, nn.Module]]:
    items = sorted(stages.items()) if isinstance(stages, Mapping) else list(enumerate(stages))
    return [(int(s), m) for s, m in items]


def export_model(
    path: str | Path,
    stages: Mapping[int, nn.Module] | Sequence[nn.Module],
    config: ModelConfig,
    *,
    meta: Mapping[str, Any] | None = None,
    tokenizer: BpeTokenizer | None = None,
) -> Path:
    """Write every stage's weights to ``path`` (a file, or a folder that gets ``model.pt``).

    The write goes to a temporary file first and is renamed into place, so an
    interrupted export never leaves a half-written model behind.
    """
    items = _stage_items(stages)
    try:
        return write_model_file(path, {s: m.state_dict() for s, m in items},
                                model_config=dataclasses.asdict(config), meta=meta, tokenizer=tokenizer)
    except ModelFileError as exc:
        raise ExportError(str(exc)) from None


def export_transformer(
    path: str | Path, model: Transformer, num_stages: int, *, meta: Mapping[str, Any] | None = None,
    tokenizer: BpeTokenizer | None = None,
) -> Path:
    """Export a whole ``Transformer`` cut into ``num_stages`` stages."""
    return export_model(path, split_model(model, num_stages), model.cfg, meta=meta, tokenizer=tokenizer)


def _read(path: Path) -> Any:
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except IsADirectoryError:
        raise ExportError(f"{path} is a directory without {MODEL_FILE}") from None
    except OSError as exc:
        raise ExportError(f"cannot read model file {path}: {exc.strerror or exc}") from None
    if magic != b"PK\x03\x04":   # torch.save writes a zip archive
        raise ExportError(f"{path} is not a model file (empty, or not written by torch.save)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ExportError(
            f"{path} holds objects other than tensors and plain data; refused (exports never do)"
        ) from None
    except (zipfile.BadZipFile, EOFError, RuntimeError, ValueError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ExportError(f"cannot read model file {path} (corrupt or truncated?): {reason}") from None


def _config_from_dict(data: Any, path: Path) -> ModelConfig:
    if not isinstance(data, Mapping):
        raise ExportError(f"{path}: model_config must be a dict, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ExportError(f"{path}: unknown model_config field {unknown[0]!r}")
    try:
        return ModelConfig(**data)
    except (TypeError, ValueError) as exc:
        raise ExportError(f"{path}: bad model_config: {exc}") from None


def _config_from_section(data: Any, path: Path) -> ModelConfig:
    """The model of a run's [model] section (what ``lowband-coordinator export`` records)."""
    if not isinstance(data, Mapping):
        raise ExportError(f"{path}: neither model_config nor a [model] section ('model') is recorded")
    try:
        section = build_dataclass(ModelSection, dict(data), "model.")
        return model_config_for(section)
    except (ConfigError, TypeError, ValueError) as exc:
        raise ExportError(f"{path}: bad [model] section: {exc}") from None


def _build_stages(
    config: ModelConfig, num_stages: int, states: Mapping[int, Mapping[str, torch.Tensor]], path: Path
) -> dict[int, nn.Module]:
    """Fresh stage modules loaded strictly (every name present, every shape equal)."""
    stages: dict[int, nn.Module] = {}
    for s in range(num_stages):
        if s not in states:
            raise ExportError(f"{path}: stage {s} of {num_stages} is missing")
        try:
            module = build_stage(config, s, num_stages, seed=0)
            module.load_state_dict(dict(states[s]), strict=True)
        except (RuntimeError, ValueError, TypeError) as exc:
            reason = " ".join(str(exc).split())[:400]
            raise ExportError(f"{path}: stage {s} does not match the model config: {reason}") from None
        for name, tensor in module.state_dict().items():
            if not torch.isfinite(tensor).all():
                raise ExportError(f"{path}: stage {s} parameter {name} holds non-finite values")
        module.eval()
        stages[s] = module
    return stages


def _load_export(payload: Mapping[str, Any], path: Path) -> ExportedModel:
    version = payload.get("version")
    if version != VERSION:
        raise ExportError(f"{path}: unsupported export version {version!r} (this build reads {VERSION})")
    if "model_config" in payload:
        config = _config_from_dict(payload.get("model_config"), path)
    else:
        config = _config_from_section(payload.get("model"), path)
    num_stages = payload.get("num_stages")
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
        raise ExportError(f"{path}: num_stages must be an integer >= 1, got {num_stages!r}")
    states = payload.get("stages")
    if not isinstance(states, Mapping):
        raise ExportError(f"{path}: 'stages' must map stage index to a state dict")
    extra = sorted(set(states) - set(range(num_stages)), key=str)
    if extra:
        raise ExportError(f"{path}: unexpected stage {extra[0]!r} for num_stages={num_stages}")
    try:
        tokenizer = file_tokenizer(payload)
    except ModelFileError as exc:
        raise ExportError(f"{path}: {exc}") from None
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise ExportError(f"{path}: its tokenizer has {tokenizer.vocab_size} tokens, the model embeds {config.vocab_size}")
    stages = _build_stages(config, num_stages, states, path)
    meta = payload.get("meta") or {}
    return ExportedModel(config, num_stages, stages, dict(meta) if isinstance(meta, Mapping) else {}, str(path),
                         tokenizer)


def _load_baseline(state: Mapping[str, Any], path: Path, num_stages: int | None) -> ExportedModel:
    """A whole-model state dict written by ``lowband-sim baseline``; its config comes from summary.json."""
    summary_path = path.parent / "summary.json"
    try:
        summary = json.loads(summary_path.read_text())
        run = RunConfig.from_dict(summary["config"])
    except FileNotFoundError:
        raise ExportError(
            f"{path} holds a whole-model state dict but {summary_path} (which names its preset) is missing"
        ) from None
    except (OSError, ValueError, KeyError, TypeError, ConfigError) as exc:
        raise ExportError(f"cannot read the run config from {summary_path}: {exc}") from None
    config = model_config_for(run.model)
    stages_n = num_stages if num_stages is not None else run.model.stages
    model = Transformer(config, seed=0)
    try:
        model.load_state_dict(dict(state), strict=True)
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())[:400]
        raise ExportError(f"{path} does not match preset {run.model.preset!r}: {reason}") from None
    try:
        parts = split_model(model, stages_n)
    except ValueError as exc:
        raise ExportError(f"{path}: {exc}") from None
    meta = {"source": "baseline", "preset": run.model.preset, "seed": run.seed,
            "final_val_loss": summary.get("final_val_loss")}
    # a BPE baseline's tokenizer is trained again from the same data: deterministic, the same merges
    return ExportedModel(config, stages_n, {s: m.eval() for s, m in enumerate(parts)}, meta, str(path),
                         train_run_tokenizer(run))


def load_model(path: str | Path, *, num_stages: int | None = None) -> ExportedModel:
    """Load an export (or a baseline run's ``model.pt``); raise ``ExportError`` saying what is wrong.

    ``num_stages`` only applies to a baseline's whole-model file (default: the
    run's ``model.stages``); an export keeps the stage count it was trained with.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / MODEL_FILE
    if not p.exists():
        raise ExportError(f"model file not found: {p}")
    payload = _read(p)
    if not isinstance(payload, Mapping):
        raise ExportError(f"{p}: not a lowband model export (top level is {type(payload).__name__})")
    if payload.get("format") == FORMAT:
        exported = _load_export(payload, p)
        if num_stages is not None and num_stages != exported.num_stages:
            raise ExportError(f"{p} was exported with {exported.num_stages} stages, not {num_stages}")
        return exported
    if payload and all(isinstance(v, torch.Tensor) for v in payload.values()) and "embed.weight" in payload:
        return _load_baseline(payload, p, num_stages)
    raise ExportError(f"{p}: not a lowband model export (no 'format': {FORMAT!r} and not a model state dict)")
