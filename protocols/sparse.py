"""Sparse pseudo-gradients (SparseLoCo, arXiv 2508.15706): chunked top-k, 1-2 bit values, and the
rule a shard owner reduces sparse parts by. Pure: tensors in, tensors out, no I/O.

Why sparse: an outer update that keeps ~1-3% of its entries, each in 2 bits plus a compact index,
costs ~50x fewer bytes than a 4-bit dense one; error feedback (the caller's, carried per fragment)
sends what was left out in a later round, so little is lost, only delayed.

Selection (``select``): the flat vector is cut into chunks of ``chunk`` elements (the last may be
shorter); each chunk keeps its ``topk`` largest magnitudes (exact zeros are never kept). Values:
the sign and a magnitude level of the chunk, so an entry costs ``bits`` bits:
- ``bits = 1``: one level per chunk, the mean kept magnitude (the L2-best single level);
- ``bits = 2``: two levels per chunk: the kept magnitudes are split at the midpoint of their range
  and each level is the mean of its half (one Lloyd step: good for the narrow band top-k leaves).

Reduce rule (``reduce_shard``), used by the owner of a shard of a round where every replica chose
its own entries: decode every contribution to the dense shard, take the mean over contributors in
sender order (fp32), add the owner's own carried-over residual, and re-select with the same rule at the
reply's k (``reply_topk``: the mean of n differently placed parts holds up to n·topk entries).
The owner answers every caller with that one re-sparsified message, and applies it itself, so every
replica decodes bit-identical numbers; what the re-selection left out is the owner's new residual.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import torch

from lowband.protocols.config import DilocoSection

logger = logging.getLogger(__name__)

SPARSE_CODEC = "sparse"       # the DiLoCo codec name ([diloco] codec) and the wire Tensor.codec
MAX_CHUNK = 1 << 15           # per-chunk counts travel as uint16
SPARSE_BITS = (1, 2)


@dataclass(frozen=True, slots=True)
class SparseParams:
    """How a pseudo-gradient is sparsified ([diloco] sparse_chunk / sparse_topk / sparse_bits /
    sparse_error_decay)."""

    chunk: int = 4096
    topk: int = 320
    bits: int = 2
    error_decay: float = 0.9      # β of the error feedback: e ← β·e + Δ before selection
    reply_topk: int = 0           # entries an owner's reply keeps per chunk (0: topk; capped at the chunk)

    def __post_init__(self) -> None:
        if not 1 <= self.chunk <= MAX_CHUNK:
            raise ValueError(f"sparse chunk must be in [1, {MAX_CHUNK}], got {self.chunk}")
        if not 1 <= self.topk <= self.chunk:
            raise ValueError(f"sparse topk must be in [1, chunk={self.chunk}], got {self.topk}")
        if self.bits not in SPARSE_BITS:
            raise ValueError(f"sparse bits must be one of {SPARSE_BITS}, got {self.bits}")
        if not 0.0 < self.error_decay <= 1.0:
            raise ValueError(f"sparse error decay must be in (0, 1], got {self.error_decay}")
        if not 0 <= self.reply_topk <= MAX_CHUNK:
            raise ValueError(f"sparse reply topk must be in [0, {MAX_CHUNK}], got {self.reply_topk}")

    @property
    def reply(self) -> SparseParams:
        """The settings an owner re-selects the mean of a round with (``reply_topk`` entries a chunk, at most
        the chunk: the mean of n parts holds up to n·topk entries, and a reply that keeps more of them applies
        more of the round now instead of leaving it in the owner's residual)."""
        k = min(self.reply_topk, self.chunk) if self.reply_topk else self.topk
        return self if k == self.topk else dataclasses.replace(self, topk=k, reply_topk=0)


def params_of(cfg: DilocoSection) -> SparseParams:
    """The sparse settings of a run's [diloco] section."""
    return SparseParams(chunk=cfg.sparse_chunk, topk=cfg.sparse_topk, bits=cfg.sparse_bits,
                        error_decay=cfg.sparse_error_decay, reply_topk=cfg.sparse_reply_topk)


@dataclass(frozen=True, slots=True)
class SparseSelection:
    """The kept entries of a flat vector of ``numel`` elements, on a chunk grid starting at element 0.

    ``codes``: bit 0 is the sign (1: negative), the bits above it the level index into the entry's
    chunk row of ``levels`` (fp32, [num_chunks, 2**(bits-1)], non-negative).
    """

    numel: int
    chunk: int
    bits: int
    indices: torch.Tensor     # int64, strictly ascending, in [0, numel)
    codes: torch.Tensor       # uint8, one per index
    levels: torch.Tensor      # fp32 [num_chunks, 2**(bits-1)]

    @property
    def nnz(self) -> int:
        return int(self.indices.numel())

    def values(self) -> torch.Tensor:
        """The fp32 value of every kept entry (same order as ``indices``)."""
        return entry_values(self.indices // self.chunk, self.codes, self.levels)

    def dense(self) -> torch.Tensor:
        """The flat fp32 vector this selection stands for (zeros elsewhere)."""
        out = torch.zeros(self.numel, dtype=torch.float32)
        out[self.indices] = self.values()
        return out


def num_chunks(numel: int, chunk: int) -> int:
    return math.ceil(numel / chunk) if numel > 0 else 0


def entry_values(chunk_of: torch.Tensor, codes: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Values of entries given their chunk row, code and the chunks' levels (shared by the decoder, so
    the sender's and every receiver's arithmetic is the same)."""
    codes = codes.to(torch.int64)
    mag = levels[chunk_of, codes >> 1] if chunk_of.numel() else torch.zeros(0, dtype=torch.float32)
    return torch.where((codes & 1).bool(), -mag, mag)


@torch.no_grad()
def select(flat: torch.Tensor, params: SparseParams) -> SparseSelection:
    """Chunked top-k of ``flat`` (fp32, 1-D) with ``params.bits``-bit values (see the module docstring)."""
    x = flat.detach().to(torch.float32).reshape(-1)
    numel, chunk = x.numel(), params.chunk
    nc = num_chunks(numel, chunk)
    n_levels = 1 << (params.bits - 1)
    if nc == 0:
        return SparseSelection(0, chunk, params.bits, torch.zeros(0, dtype=torch.int64),
                               torch.zeros(0, dtype=torch.uint8), torch.zeros(0, n_levels))
    mag = x.abs()
    pad = nc * chunk - numel
    if pad:   # padding is never kept: -1 sorts below every magnitude and fails `kept`
        mag = torch.cat([mag, torch.full((pad,), -1.0)])
    rows = mag.view(nc, chunk)                                  # (chunks, chunk)
    k = min(params.topk, chunk)
    top, pos = rows.topk(k, dim=1, sorted=False)                # (chunks, k)
    kept = top > 0
    top = torch.where(kept, top, torch.zeros_like(top))
    count = kept.sum(dim=1, keepdim=True)                       # (chunks, 1)
    if params.bits == 1:
        levels = top.sum(dim=1, keepdim=True) / count.clamp(min=1)
        level_of = torch.zeros_like(pos)
    else:
        lo = torch.where(kept, top, torch.full_like(top, math.inf)).amin(dim=1, keepdim=True)
        hi = top.amax(dim=1, keepdim=True)
        high = kept & (top > (lo + hi) / 2)
        low = kept & ~high
        n_low, n_high = low.sum(dim=1, keepdim=True), high.sum(dim=1, keepdim=True)
        level_low = (top * low).sum(dim=1, keepdim=True) / n_low.clamp(min=1)
        level_high = (top * high).sum(dim=1, keepdim=True) / n_high.clamp(min=1)
        level_high = torch.where(n_high > 0, level_high, level_low)
        levels = torch.cat([level_low, level_high], dim=1)
        level_of = high.to(torch.int64)
    index = torch.arange(nc).unsqueeze(1) * chunk + pos         # (chunks, k)
    index, level_of = index[kept], level_of[kept]
    order = torch.argsort(index)
    index, level_of = index[order], level_of[order]
    sign = (x[index] < 0).to(torch.int64)
    codes = (sign | (level_of << 1)).to(torch.uint8)
    return SparseSelection(numel, chunk, params.bits, index, codes, levels.to(torch.float32).contiguous())


def compensate(flat: torch.Tensor, residual: torch.Tensor | None, decay: float) -> torch.Tensor:
    """What a stream means to send this time: ``decay·residual + flat`` (SparseLoCo's error feedback)."""
    if residual is None:
        return flat
    return residual * decay + flat if decay != 1.0 else residual + flat


@torch.no_grad()
def resparsify(mean: torch.Tensor, residual: torch.Tensor | None, params: SparseParams
               ) -> tuple[SparseSelection, torch.Tensor, torch.Tensor]:
    """Re-select an averaged shard with the reply settings: (selection to send, its dense values, the new
    residual)."""
    meant = compensate(mean.to(torch.float32), residual, params.error_decay)
    sel = select(meant, params.reply)
    sent = sel.dense()
    return sel, sent, meant - sent


@torch.no_grad()
def reduce_shard(parts: list[torch.Tensor], residual: torch.Tensor | None, params: SparseParams
                 ) -> tuple[SparseSelection, torch.Tensor, torch.Tensor] | None:
    """The owner's reduce rule for one shard: the mean of the decoded dense ``parts`` (summed in the
    order given, sender order at an owner, so the fp32 sum is deterministic), then ``resparsify``.
    None when nobody contributed."""
    if not parts:
        return None
    total = parts[0].to(torch.float32).clone()
    for part in parts[1:]:
        total += part
    return resparsify(total / len(parts), residual, params)
