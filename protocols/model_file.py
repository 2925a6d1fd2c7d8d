"""The model file a run yields: every stage's weights in one ``torch.save`` of plain dicts and tensors.

One format, two writers: ``lowband.node.train.export`` (whole models in one process) and
``lowband-coordinator export`` / ``lowband-sim run`` (θ_global fetched stage by stage from the nodes,
which is why this lives in ``protocols``: the coordinator side never imports node code). The reader
is ``lowband.node.train.export.load_model``. Layout::

    {
        "format": "lowband-model",
        "version": 1,
        "model_config": {...},   # node.train.model.ModelConfig fields, or absent when "model" is given
        "model": {...},          # the run's [model] section (preset, stages, seq_len, subspace_rank)
        "num_stages": S,
        "stages": {0: state_dict, 1: state_dict, ...},   # stage-local names (blocks.{j}.…)
        "meta": {...},           # JSON-safe: how it was trained, each stage's outer steps per fragment
        "tokenizer": {"kind": "bpe", "json": "...", "sha256": "..."},   # a BPE run's only (else bytes)
    }

The tokenizer travels inside the file so that ``generate`` encodes and decodes text with the merges
the model was trained on; a tokenizer whose JSON does not match its recorded hash is refused.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lowband.protocols.tokenizer import BpeTokenizer, TokenizerError

log = logging.getLogger(__name__)

FORMAT = "lowband-model"
VERSION = 1
MODEL_FILE = "model.pt"


class ModelFileError(ValueError):
    """A model file cannot be assembled or written (a stage missing, mixed outer steps refused)."""


def stage_state(theta_global: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
    """A stage's state dict for the file: θ_global (the averaged weights) plus its persistent buffers."""
    clash = sorted(set(theta_global) & set(buffers))
    if clash:
        raise ModelFileError(f"{clash[0]!r} is both a parameter and a buffer")
    return {**{n: t.detach().float().cpu().clone() for n, t in theta_global.items()},
            **{n: t.detach().cpu().clone() for n, t in buffers.items()}}


def behind_stages(outer_steps: Mapping[int, Mapping[int, int]]) -> list[tuple[int, int, int, int]]:
    """Which stages hold an older θ_global than another stage with the same fragment layout.

    ``outer_steps[stage][fragment]`` is the fragment's outer step. Stages cut into the same number of
    fragments sync fragment p at the same inner steps, so equal progress means equal outer steps; a
    stage below the others in some fragment lags by that many rounds. A fragment at outer step 0 has
    never synced, which is what a fragment without parameters does (more fragments than a stage has
    blocks), so it is not compared. Returns (stage, fragment, its outer step, the best outer step)
    per lag.
    """
    by_layout: dict[int, list[int]] = {}
    for stage, steps in outer_steps.items():
        by_layout.setdefault(len(steps), []).append(stage)
    lags: list[tuple[int, int, int, int]] = []
    for stages in by_layout.values():
        fragments = {p for s in stages for p in outer_steps[s]}
        for p in sorted(fragments):
            best = max(outer_steps[s].get(p, 0) for s in stages)
            for s in sorted(stages):
                mine = outer_steps[s].get(p, 0)
                if 0 < mine < best:
                    lags.append((s, p, mine, best))
    return lags


def describe_lags(lags: list[tuple[int, int, int, int]]) -> list[str]:
    """``behind_stages`` in words, one line per lag."""
    return [f"stage {s} fragment {p} is at outer step {mine}, behind {best}" for s, p, mine, best in lags]


def file_tokenizer(payload: Mapping[str, Any]) -> BpeTokenizer | None:
    """The BPE a model file carries (None: a byte-level model); refused when its hash does not match."""
    entry = payload.get("tokenizer")
    if entry is None:
        return None
    if not isinstance(entry, Mapping) or entry.get("kind") != "bpe" or not isinstance(entry.get("json"), str) \
            or not isinstance(entry.get("sha256"), str):
        raise ModelFileError("its 'tokenizer' entry is malformed (kind 'bpe', json, sha256 expected)")
    try:
        return BpeTokenizer.from_json(entry["json"], sha256=entry["sha256"])
    except TokenizerError as exc:
        raise ModelFileError(str(exc)) from None


def write_model_file(path: str | Path, stages: Mapping[int, Mapping[str, torch.Tensor]], *,
                     model_config: Mapping[str, Any] | None = None, model_section: Mapping[str, Any] | None = None,
                     meta: Mapping[str, Any] | None = None, tokenizer: BpeTokenizer | None = None) -> Path:
    """Write ``stages`` (0..S-1, none missing) to ``path`` (a folder gets ``model.pt``).

    Give the model's shape as ``model_config`` (ModelConfig fields) or ``model_section`` (the run's
    [model] table, which the reader resolves). The file is written next to its place and renamed
    into it, so an interrupted export never leaves half a model behind. ``tokenizer``: a BPE run's.
    """
    if model_config is None and model_section is None:
        raise ModelFileError("a model file needs model_config or model_section")
    ids = sorted(stages)
    if not ids or ids != list(range(len(ids))):
        raise ModelFileError(f"stages must be 0..S-1 with none missing, got {ids}")
    payload: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "num_stages": len(ids),
        "stages": {s: {n: t.detach().cpu().clone() for n, t in stages[s].items()} for s in ids},
        "meta": dict(meta or {}),
    }
    if model_config is not None:
        payload["model_config"] = dict(model_config)
    if model_section is not None:
        payload["model"] = dict(model_section)
    if tokenizer is not None:
        payload["tokenizer"] = {"kind": "bpe", "json": tokenizer.json, "sha256": tokenizer.sha256}
    out = Path(path)
    if out.is_dir():
        out = out / MODEL_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("wrote %d stages to %s", len(ids), out)
    return out
