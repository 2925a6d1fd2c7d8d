"""Averaging math for the outer sync, with no I/O: shard layout and a robust mean.

A shard owner averages the parts it received for its shard. A part that is
non-finite is never averaged (one NaN would poison every replica of the stage),
and with ``reject_norm_ratio > 0`` a part whose norm is far above the median of
the round's parts is dropped too. Robust aggregation (``diloco.robust``, on by
default) then bounds what one broken or hostile peer can do to θ_global:

- **clip**: each part's L2 norm is clipped to a bound. With 3+ parts the bound is
  ``clip_multiple`` (default 1) x the reference: the running median of past rounds'
  norms (``NormHistory``, per owner and shard), or, while that is warming up, the
  round's own lower median. With 2 parts nobody can tell the honest one from the
  other, so both are clipped to ``clip_multiple`` x the *smaller* norm (and x the
  reference once known): at the default 1, ‖mean‖ <= the honest part's norm, i.e. a
  poisoned round moves θ_global no further than the honest replica's own update would.
  A multiple above 1 lets a poisoned part that much further: at 3, a x1e4 part
  moves the mean of 2 up to 2x and the trimmed mean of 3 up to ~1.3x a clean round.
- **trim** (3+ parts): a coordinate-wise trimmed mean, one value cut from each
  end, so one replica's sign-flipped or noisy update cannot pull a coordinate
  outside the honest replicas' range.

Each round records one reference value, the lower median of its parts' norms
before clipping (the smaller norm of 2; with one inflated part among 2+ never that
part), so a peer that keeps sending huge parts cannot ratchet the bound up, while
honest norms that grow still move it (clipped norms would pin it at a multiple of 1).
Everything here is deterministic for a given input order, so every replica
decoding the owner's reply applies the same numbers (the owner decides).
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from lowband.protocols.errors import ValidationError


def shard_bounds(numel: int, num_shards: int) -> list[tuple[int, int]]:
    """[start, end) of each shard of a flat tensor, as ``torch.tensor_split`` cuts it.

    The first ``numel % num_shards`` shards hold one element more; every
    participant and every owner computes the same layout from (numel, num_shards).
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    base, extra = divmod(numel, num_shards)
    bounds: list[tuple[int, int]] = []
    start = 0
    for j in range(num_shards):
        end = start + base + (1 if j < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """Raise ValidationError when `tensor` holds NaN or ±inf."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ValidationError(f"{what} holds non-finite values")


@dataclass(slots=True)
class MeanResult:
    """The mean of the accepted parts (None when none was accepted) and who was dropped why."""

    mean: torch.Tensor | None
    accepted: list[int] = field(default_factory=list)
    rejected_nonfinite: list[int] = field(default_factory=list)
    rejected_norm: list[int] = field(default_factory=list)
    norms: list[float] = field(default_factory=list)
    clipped: list[int] = field(default_factory=list)     # accepted parts scaled down to `clip_bound`
    clip_bound: float = float("inf")
    reference: float = 0.0     # what this round adds to the running median (0: nothing)
    trimmed: bool = False      # the mean is a coordinate-wise trimmed mean

    @property
    def contributors(self) -> int:
        return len(self.accepted)


def lower_median(values: Sequence[float]) -> float:
    """The lower of the two middle values (the smaller of 2): never the largest of 2+ values."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def clip_bound(norms: Sequence[float], clip_multiple: float, reference: float | None) -> float:
    """The norm every accepted part is clipped to (see the module docstring); inf: no clipping.

    `reference` is the running median of past rounds (None or 0 while unknown).
    """
    if clip_multiple < 1:
        raise ValueError(f"clip_multiple must be >= 1, got {clip_multiple}")
    known = reference is not None and reference > 0
    history = clip_multiple * reference if known else float("inf")   # type: ignore[operator]
    if len(norms) == 2:
        return min(clip_multiple * min(norms), history)
    if len(norms) >= 3:
        return history if known else clip_multiple * lower_median(norms)
    return history   # a round of one has nothing to compare with but the past


def trimmed_mean(stacked: torch.Tensor, trim: int = 1) -> torch.Tensor:
    """Coordinate-wise mean of `stacked` (k, n) without the `trim` lowest and highest values per coordinate."""
    k = stacked.shape[0]
    if k <= 2 * trim:
        raise ValueError(f"cannot trim {trim} from each end of {k} values")
    ordered, _ = torch.sort(stacked, dim=0)
    return ordered[trim:k - trim].mean(dim=0)


def robust_mean(
    parts: Sequence[torch.Tensor],
    *,
    reject_norm_ratio: float = 0.0,
    clip_multiple: float = 0.0,
    reference: float | None = None,
    trim: bool = False,
) -> MeanResult:
    """Mean (fp32) of `parts`, skipping non-finite parts and, optionally, norm outliers.

    A finite part is an outlier when its L2 norm exceeds ``reject_norm_ratio`` times
    the median norm of the finite parts. With two parts the median is their mean,
    so rejection then needs ``reject_norm_ratio < 2``; it is meant for groups of 3+.
    ``clip_multiple >= 1`` clips the accepted parts (``clip_bound``; `reference` is the
    running median of past rounds, ``NormHistory.reference``); ``trim`` with 3+ accepted
    parts takes the coordinate-wise trimmed mean (one cut from each end) instead of the mean.
    All parts must have the same shape (ValueError otherwise: the caller validated).
    """
    if reject_norm_ratio < 0:
        raise ValueError(f"reject_norm_ratio must be >= 0, got {reject_norm_ratio}")
    if clip_multiple != 0 and clip_multiple < 1:
        raise ValueError(f"clip_multiple must be 0 (off) or >= 1, got {clip_multiple}")
    result = MeanResult(mean=None)
    if not parts:
        return result
    shape = parts[0].shape
    finite: list[int] = []
    norms: dict[int, float] = {}
    for i, part in enumerate(parts):
        if part.shape != shape:
            raise ValueError(f"part {i} has shape {tuple(part.shape)}, expected {tuple(shape)}")
        if not bool(torch.isfinite(part).all()):
            result.rejected_nonfinite.append(i)
            continue
        finite.append(i)
        norms[i] = float(torch.linalg.vector_norm(part.float()))
    result.norms = [norms.get(i, float("nan")) for i in range(len(parts))]
    accepted = finite
    if reject_norm_ratio > 0 and len(finite) >= 2:
        median = statistics.median(norms[i] for i in finite)
        if median > 0:
            limit = reject_norm_ratio * median
            accepted = [i for i in finite if norms[i] <= limit]
            result.rejected_norm = [i for i in finite if norms[i] > limit]
    result.accepted = accepted
    if not accepted:
        return result
    scale = dict.fromkeys(accepted, 1.0)
    if clip_multiple >= 1:
        bound = clip_bound([norms[i] for i in accepted], clip_multiple, reference)
        result.clip_bound = bound
        for i in accepted:
            if norms[i] > bound:
                scale[i] = bound / norms[i]
                result.clipped.append(i)
        result.reference = lower_median([norms[i] for i in accepted])
    if trim and len(accepted) >= 3:
        stacked = torch.stack([parts[i].float().reshape(-1) * scale[i] for i in accepted])
        result.mean = trimmed_mean(stacked).reshape(shape)
        result.trimmed = True
        return result
    # fp32 accumulation regardless of the wire dtype: sums of many fp4 parts stay exact enough.
    total = torch.zeros(shape, dtype=torch.float32)
    for i in accepted:
        total += parts[i].float() * scale[i] if scale[i] != 1.0 else parts[i].float()
    result.mean = total / len(accepted)
    return result


class NormHistory:
    """Per key (an owner's stage, fragment and shard layout), the references of its last rounds.

    ``reference(key)`` is their median once ``warmup`` rounds are in (None before: the round
    then bounds itself, ``clip_bound``). A reference of 0 (a round of zero updates) is not kept,
    so a silent round cannot pin the bound at zero. Owner-local state: callers never need it,
    they decode what the owner decided.
    """

    def __init__(self, keep: int = 16, warmup: int = 3, max_keys: int = 1024) -> None:
        if keep < 1 or warmup < 1 or warmup > keep:
            raise ValueError(f"need 1 <= warmup <= keep, got warmup={warmup}, keep={keep}")
        self.keep = keep
        self.warmup = warmup
        self.max_keys = max_keys
        self._refs: dict[Hashable, deque[float]] = {}

    def reference(self, key: Hashable) -> float | None:
        refs = self._refs.get(key)
        if refs is None or len(refs) < self.warmup:
            return None
        return float(statistics.median(refs))

    def record(self, key: Hashable, value: float) -> None:
        if not value > 0 or value == float("inf"):
            return
        refs = self._refs.get(key)
        if refs is None:
            if len(self._refs) >= self.max_keys:   # bounded: shard layouts of long-gone memberships go first
                del self._refs[next(iter(self._refs))]
            refs = self._refs[key] = deque(maxlen=self.keep)
        refs.append(value)
