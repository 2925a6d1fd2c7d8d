"""Averaging math for the outer sync, with no I/O: shard layout and a robust mean.

A shard owner averages the parts it received for its shard. A part that is
non-finite is never averaged (one NaN would poison every replica of the stage),
and with ``reject_norm_ratio > 0`` a part whose norm is far above the median of
the round's parts is dropped too, so one broken or hostile peer cannot drag the
stage's θ_global away. Everything here is deterministic for a given input order,
so every replica decoding the owner's reply applies the same numbers.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
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

    @property
    def contributors(self) -> int:
        return len(self.accepted)


def robust_mean(parts: Sequence[torch.Tensor], *, reject_norm_ratio: float = 0.0) -> MeanResult:
    """Mean (fp32) of `parts`, skipping non-finite parts and, optionally, norm outliers.

    A finite part is an outlier when its L2 norm exceeds ``reject_norm_ratio`` times
    the median norm of the finite parts. With two parts the median is their mean,
    so rejection then needs ``reject_norm_ratio < 2``; it is meant for groups of 3+.
    All parts must have the same shape (ValueError otherwise: the caller validated).
    """
    if reject_norm_ratio < 0:
        raise ValueError(f"reject_norm_ratio must be >= 0, got {reject_norm_ratio}")
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
    if accepted:
        # fp32 accumulation regardless of the wire dtype: sums of many fp4 parts stay exact enough.
        total = torch.zeros(shape, dtype=torch.float32)
        for i in accepted:
            total += parts[i].float()
        result.mean = total / len(accepted)
    return result
