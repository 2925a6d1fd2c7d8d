"""Inference along a path: validation loss and perplexity with all stages or a subset.

SkipPipe trains every microbatch along its own path, some of which skip
stages, so the trained model should still work when run with fewer stages.
``evaluate`` measures one path; ``evaluate_subsets`` compares the full
pipeline with a model run on half of its block stages.

Validation data is the held-out split of ``lowband.node.train.data`` (``Corpus.val``): fixed
windows evenly spaced over it (``lowband.node.train.data.val_batches``), so two evaluations
with the same arguments see the same tokens.

Which half (``half_stages``), with n = S-1 block stages and
m = round(n / 2) (half rounded up, as ``lowband.coordinator.skippipe.paths.stages_visited``
rounds a skip ratio of 0.5) kept, always in ascending order:

* ``"strided"`` (default, no search): m stages evenly spaced over 1..n, first
  and last included when m >= 2 (n = 6 -> 1, 3, 6; n = 3 -> 1, 3). The first
  and last block stages are the ones a pipeline relies on most (the input
  embedding's first transformation and the head's last), so they are kept.
* ``"search"``: the subset with the lowest loss on separate *selection*
  batches (random windows of the validation split, seeded, distinct from the
  reported windows): every subset when there are at most ``max_candidates``,
  otherwise greedy backward elimination (drop the stage whose removal costs
  least, repeat). The reported perplexity is then measured on the usual
  evaluation windows.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lowband.node.train.along_path import path_loss, validate_path
from lowband.node.train.data import BatchIterator, Corpus, DataError, val_batches
from lowband.node.train.model import Bookend

log = logging.getLogger(__name__)

Stages = Mapping[int, nn.Module] | Sequence[nn.Module]
Batches = list[tuple[torch.Tensor, torch.Tensor]]
HALF_METHODS = ("strided", "search")


def _stage_ids(stages: Stages) -> list[int]:
    ids = sorted(stages) if isinstance(stages, Mapping) else list(range(len(stages)))
    if 0 not in ids or not isinstance(stages[0], Bookend):
        raise ValueError("stages must include stage 0 (a Bookend)")
    return ids


def block_stage_ids(stages: Stages) -> list[int]:
    """The block stages 1..S-1 present in ``stages``, ascending."""
    return [s for s in _stage_ids(stages) if s != 0]


def subset_path(stages: Sequence[int]) -> list[int]:
    """The path that runs the given block stages in ascending order: ``[0, *sorted(stages), 0]``."""
    return [0, *sorted(stages), 0]


def _as_batches(
    stages: Stages, data: Corpus | torch.Tensor | Batches, batch_size: int, seq_len: int, batches: int
) -> Batches:
    if isinstance(data, list):
        if not data:
            raise DataError("no evaluation batches given")
        return data
    _check_seq_len(stages, seq_len)
    if isinstance(data, torch.Tensor):
        if data.ndim != 1:
            raise DataError(f"validation tokens must be 1-D, got shape {tuple(data.shape)}")
        data = Corpus(train=data[:0], val=data, source="tokens")
    if batches < 1 or batch_size < 1 or seq_len < 1:
        raise DataError(f"batches, batch_size and seq_len must be >= 1, got {batches}, {batch_size}, {seq_len}")
    return val_batches(data, batch_size, seq_len, batches)


def _check_seq_len(stages: Stages, seq_len: int) -> None:
    limit = getattr(getattr(stages[0], "cfg", None), "max_seq_len", None)
    if limit is not None and seq_len > limit:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_seq_len {limit}")


@torch.no_grad()
def mean_loss(stages: Stages, path: Sequence[int], batches: Batches) -> float:
    """Mean of the per-batch mean losses (equal-sized batches: the per-token mean), in nats."""
    validate_path(stages, path)
    modules = [stages[s] for s in dict.fromkeys(path)]
    was_training = [m.training for m in modules]
    device = next(stages[0].parameters()).device
    for m in modules:
        m.eval()
    try:
        total = 0.0
        for inputs, targets in batches:
            total += float(path_loss(stages, path, inputs.to(device), targets.to(device)))
    finally:
        for m, flag in zip(modules, was_training, strict=True):
            m.train(flag)
    return total / len(batches)


def _result(path: Sequence[int], loss: float) -> dict[str, Any]:
    return {"path": list(path), "loss": loss, "perplexity": math.exp(min(loss, 700.0))}


def evaluate(
    stages: Stages,
    corpus_or_val_tokens: Corpus | torch.Tensor | Batches,
    *,
    path: Sequence[int] | None = None,
    batch_size: int = 8,
    seq_len: int = 128,
    batches: int = 8,
) -> dict[str, Any]:
    """Loss (nats/token) and perplexity of the model run along ``path`` (default: every stage in order).

    ``corpus_or_val_tokens``: a ``Corpus`` (its validation split is used), a 1-D
    tensor of validation tokens, or ready-made (inputs, targets) batches (then
    ``batch_size``/``seq_len``/``batches`` are ignored).
    """
    if path is None:
        path = subset_path(block_stage_ids(stages))
    validate_path(stages, path)
    data = _as_batches(stages, corpus_or_val_tokens, batch_size, seq_len, batches)
    return _result(path, mean_loss(stages, path, data))


def strided_half(block_stages: Sequence[int], keep: int | None = None) -> list[int]:
    """``keep`` (default round(n/2), half up) stages evenly spaced over ``block_stages``, ends included."""
    ids = sorted(block_stages)
    n = len(ids)
    if n == 0:
        raise ValueError("no block stages to choose from")
    m = half_count(n) if keep is None else keep
    if not 1 <= m <= n:
        raise ValueError(f"cannot keep {m} of {n} block stages")
    if m == 1:
        return [ids[0]]
    picks = sorted({round(i * (n - 1) / (m - 1)) for i in range(m)})
    return [ids[i] for i in picks]


def half_count(n: int) -> int:
    """Block stages kept by a half model: round(n / 2), half rounded up, at least 1."""
    return max(1, math.floor(n / 2 + 0.5))


def search_half(
    stages: Stages,
    selection: Batches,
    *,
    keep: int | None = None,
    max_candidates: int = 64,
) -> tuple[list[int], list[dict[str, Any]]]:
    """The ``keep``-stage subset with the lowest loss on ``selection``, and every subset tried.

    Exhaustive when there are at most ``max_candidates`` subsets, else greedy
    backward elimination. ``evaluate_subsets`` passes selection batches distinct
    from the reported ones, except when it is given ready-made batches (then it
    selects on those, which flatters the chosen subset a little).
    """
    ids = block_stage_ids(stages)
    m = half_count(len(ids)) if keep is None else keep
    if not 1 <= m <= len(ids):
        raise ValueError(f"cannot keep {m} of {len(ids)} block stages")
    tried: list[dict[str, Any]] = []

    def score(subset: Sequence[int]) -> float:
        loss = mean_loss(stages, subset_path(subset), selection)
        tried.append({"stages": list(subset), "selection_loss": loss})
        return loss

    if math.comb(len(ids), m) <= max_candidates:
        best = min(itertools.combinations(ids, m), key=score)
        return list(best), tried
    current = list(ids)
    while len(current) > m:   # greedy backward elimination
        drops = [[s for s in current if s != d] for d in current]
        current = min(drops, key=score)
    return current, tried


def evaluate_subsets(
    stages: Stages,
    corpus_or_val_tokens: Corpus | torch.Tensor | Batches,
    *,
    subset: Sequence[int] | None = None,
    half: str = "strided",
    batch_size: int = 8,
    seq_len: int = 128,
    batches: int = 8,
    selection_batches: int = 4,
    seed: int = 0,
) -> dict[str, Any]:
    """Perplexity with all stages and with a subset of the block stages (run in ascending order).

    ``subset``: the block stages to keep; None picks half of them by ``half``
    (``"strided"`` or ``"search"``, see the module docstring). Returns
    ``{"num_stages", "full": {path, loss, perplexity}, "subset": {..., "stages", "method"},
    "perplexity_ratio": subset/full, "loss_gap": subset/full - 1}`` (+ ``"candidates"`` after a search).
    """
    ids = block_stage_ids(stages)
    if half not in HALF_METHODS:
        raise ValueError(f"unknown half method {half!r}; choose one of {', '.join(HALF_METHODS)}")
    data = _as_batches(stages, corpus_or_val_tokens, batch_size, seq_len, batches)
    full = _result(subset_path(ids), mean_loss(stages, subset_path(ids), data))
    out: dict[str, Any] = {"num_stages": len(ids) + 1, "full": full}
    if subset is not None:
        chosen = sorted(subset)
        bad = [s for s in chosen if s not in ids]
        if bad or not chosen or len(set(chosen)) != len(chosen):
            raise ValueError(f"stage subset {list(subset)}: choose distinct block stages among {ids}")
        method = "given"
    elif half == "strided":
        chosen, method = strided_half(ids), "strided"
    else:
        selection = _selection_batches(corpus_or_val_tokens, data, batch_size, seq_len, selection_batches, seed)
        chosen, tried = search_half(stages, selection)
        method = "search"
        out["candidates"] = tried
    part = _result(subset_path(chosen), mean_loss(stages, subset_path(chosen), data))
    out["subset"] = {**part, "stages": chosen, "method": method}
    out["perplexity_ratio"] = part["perplexity"] / full["perplexity"]
    out["loss_gap"] = part["loss"] / full["loss"] - 1.0
    return out


def _selection_batches(
    source: Corpus | torch.Tensor | Batches, data: Batches, batch_size: int, seq_len: int, n: int, seed: int
) -> Batches:
    """Random validation windows for choosing a subset, so the reported windows are not selected on."""
    if isinstance(source, list):
        return data
    tokens = source.val if isinstance(source, Corpus) else source
    it = BatchIterator(tokens, batch_size, seq_len, seed=seed + 7919)
    return [next(it) for _ in range(max(1, n))]
