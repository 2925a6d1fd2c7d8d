"""Block quantisers: fp32 values to per-block scaled 8- and 4-bit codes, and back.

- ``int8``: per-block absmax scale, values ``round(x / s)`` in [-127, 127], ``s = absmax / 127``.
- ``int4``: per-block absmax scale, values in [-7, 7] stored as ``v + 8``, two per byte
  (low nibble first).
- ``fp8``: ``torch.float8_e4m3fn`` after dividing by a per-block scale ``absmax / 448``.
- ``fp4``: a 4-bit float in the spirit of Streaming DiLoCo's E3M0: a sign bit and a 3-bit
  code, no mantissa. Code 0 is zero, code c in 1..7 is ``scale * 2^-(c-1)`` with
  ``scale = absmax`` of the block; rounding is to the nearest representable value.

All vectorised torch, no Python loop over elements. The message format around them (scales on
the wire, compression, checksums, validation) is ``protocols/codec.py``'s.
"""

from __future__ import annotations

import torch

from lowband.protocols.errors import ValidationError

QUANT_CODECS = ("int8", "int4", "fp8", "fp4")
DEFAULT_BLOCK_SIZE = 256
MAX_BLOCK_SIZE = 1 << 20

_FP8_MAX = 448.0
_FP4_MIN_ABS_BITS = (127 - 7) << 23   # float32 bits of 2^-7: below this (x/scale) rounds to zero


def num_blocks(numel: int, block_size: int) -> int:
    """Blocks (each with one scale) that ``numel`` values take; the last may be short."""
    return (numel + block_size - 1) // block_size


def _blocked(flat: torch.Tensor, block_size: int) -> torch.Tensor:
    """View (or zero-padded copy when ragged) of `flat` as [num_blocks, block_size]."""
    n = flat.numel()
    nb = num_blocks(n, block_size)
    pad = nb * block_size - n
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(nb, block_size)


def _safe_inverse(numer: float, absmax: torch.Tensor) -> torch.Tensor:
    """numer / absmax per block, 0 where the block is all zero (or so tiny the inverse overflows)."""
    inv = numer / absmax
    return torch.where(torch.isfinite(inv), inv, torch.zeros_like(inv))


def _pack_nibbles(codes: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 codes (< 16) -> bytes holding two codes each, low nibble first."""
    codes = codes.reshape(-1)[:numel]
    if numel % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    # Read pairs as little-endian int16 words (low byte = even element): no strided gathers.
    w = codes.contiguous().view(torch.int16)
    hi = w >> 4
    hi.bitwise_and_(0xF0).bitwise_or_(w & 0xF)
    return hi.to(torch.uint8)


def _scale_blocks_(out: torch.Tensor, scales: torch.Tensor, block_size: int) -> torch.Tensor:
    """Multiply each block of the flat fp32 `out` by its scale, in place."""
    numel = out.numel()
    full = numel // block_size
    if full:
        out[: full * block_size].view(full, block_size).mul_(scales[:full, None])
    if numel > full * block_size:
        out[full * block_size:].mul_(scales[full])
    return out


def _pair_table(values16: torch.Tensor) -> torch.Tensor:
    """byte -> its two nibbles' float32 values (low nibble first), packed in one int64 per byte.

    One 1-D gather of 8-byte entries then yields the interleaved float32 output directly.
    """
    b = torch.arange(256)
    pairs = torch.stack([values16[b & 15], values16[b >> 4]], dim=1).to(torch.float32).contiguous()
    return pairs.view(torch.int64).reshape(256)


def _fp4_code_table() -> torch.Tensor:
    """(float32 bits of v >> 22) & 0x3FF -> fp4 nibble, for |v| <= 1.

    Bits 22..30 hold the exponent and the top mantissa bit, which is exactly what
    round-to-nearest power of two needs (1.5 * 2^k is the midpoint); bit 31 is the sign.
    """
    idx = torch.arange(1024, dtype=torch.int32)
    sign, top = idx >> 9, idx & 511
    e = 127 - (top >> 1) - (top & 1)                       # |v| rounds to 2^-e
    code = (e + 1).clamp(1, 7) * (top >= _FP4_MIN_ABS_BITS >> 22)   # below 2^-7: zero
    return (code | (sign << 3)).to(torch.uint8)


def _fp8_table() -> torch.Tensor:
    """uint8 -> float32 value of that e4m3fn code (a gather beats torch's fp8 cast on CPU)."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)


_INT4_PAIRS = _pair_table(torch.arange(16, dtype=torch.float32) - 8)
_FP4_VALUES = torch.tensor([0.0] + [2.0 ** -(c - 1) for c in range(1, 8)], dtype=torch.float32)
_FP4_PAIRS = _pair_table(torch.cat([_FP4_VALUES, -_FP4_VALUES]))
_FP4_CODES = _fp4_code_table()
_FP8_VALUES = _fp8_table()




_QMAX = {"int8": 127.0, "int4": 7.0, "fp8": _FP8_MAX, "fp4": 1.0}


def quantize(flat: torch.Tensor, codec: str, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 flat tensor -> (uint8 payload, fp32 per-block scales).

    Works in one [blocks, block_size] scratch buffer with in-place ops: on CPU, fresh
    multi-MB temporaries (page faults) cost more than the arithmetic.
    """
    if codec not in _QMAX:
        raise ValidationError(f"unknown codec {codec!r}")
    n = flat.numel()
    xb = _blocked(flat, block_size)
    scratch = xb.abs()
    absmax = scratch.amax(dim=1) if xb.shape[0] else scratch.new_empty(0)
    if not bool(torch.isfinite(absmax).all()):
        raise ValidationError("cannot quantize a tensor with non-finite values")
    qmax = _QMAX[codec]
    v = torch.mul(xb, _safe_inverse(qmax, absmax)[:, None], out=scratch)   # |v| <= qmax
    scales = absmax / qmax
    if codec == "int8":
        return v.round_().to(torch.int8).view(-1)[:n].view(torch.uint8), scales
    if codec == "int4":
        return _pack_nibbles(v.round_().add_(8).to(torch.uint8), n), scales
    if codec == "fp8":
        return v.to(torch.float8_e4m3fn).view(-1)[:n].view(torch.uint8), scales
    # fp4: the code is a function of the sign, exponent and top mantissa bit of v.
    idx = v.view(torch.int32)
    idx.bitwise_right_shift_(22).bitwise_and_(0x3FF)
    nib = torch.index_select(_FP4_CODES.to(xb.device), 0, idx.view(-1))
    return _pack_nibbles(nib, n), scales


def dequantize(payload: torch.Tensor, scales: torch.Tensor, codec: str, block_size: int, numel: int) -> torch.Tensor:
    """uint8 payload + fp32 scales -> fp32 flat tensor of `numel` values (on the payload's device)."""
    device = payload.device
    if codec not in _QMAX:
        raise ValidationError(f"unknown codec {codec!r}")
    if numel == 0:
        return torch.empty(0, dtype=torch.float32, device=device)
    if codec == "int8":
        vals = payload.view(torch.int8)
        out = torch.empty(numel, dtype=torch.float32, device=device)
        full = numel // block_size
        if full:  # int8 x fp32 -> fp32 in one pass
            torch.mul(vals[: full * block_size].view(full, block_size), scales[:full, None],
                      out=out[: full * block_size].view(full, block_size))
        if numel > full * block_size:
            torch.mul(vals[full * block_size:], scales[full], out=out[full * block_size:])
        return out
    idx = payload.to(torch.int32)
    if codec == "fp8":  # a 256-entry gather beats torch's fp8 -> fp32 cast on CPU
        out = torch.index_select(_FP8_VALUES.to(device), 0, idx)
    else:  # one gather of 8-byte entries yields both nibbles' values, interleaved
        table = _INT4_PAIRS if codec == "int4" else _FP4_PAIRS
        out = torch.index_select(table.to(device), 0, idx).view(torch.float32)[:numel]
    return _scale_blocks_(out, scales, block_size)


__all__ = ["DEFAULT_BLOCK_SIZE", "MAX_BLOCK_SIZE", "QUANT_CODECS", "dequantize", "num_blocks", "quantize"]
