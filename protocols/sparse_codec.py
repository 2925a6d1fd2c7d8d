"""The wire form of a sparse pseudo-gradient shard (``protocols/sparse.py``), and its validation.

A shard ``[start, end)`` of a fragment travels as one ``lowband.Tensor`` with ``codec = "sparse"``,
``shape = [end - start]``, ``block_size`` = the chunk size C and, in ``scales``, the fp32 levels of
every chunk of the selection's grid that overlaps the shard (rows of ``2**(bits-1)`` values). The
payload, little-endian:

    u8 bits | u32 phase | u32 nnz | u8 rice | u32 unary_bits | unary quotients | remainders | codes

``phase`` is where the shard starts inside its first chunk (the grid is the sender's: a fragment's
for a caller's part, the shard's own for an owner's reply). Positions are coded as the gaps between
consecutive kept entries (the first: its position), each gap g Rice-coded with parameter ``rice``:
g >> rice in unary (that many 1 bits, then a 0) and its low ``rice`` bits; codes take ``bits`` bits;
all bit-packed LSB first. At 1-6% density that is ~6-8 bits a position against 12 for a
within-chunk offset (C = 4096) and 32 for a plain index, so an entry costs ~8-10 bits at 2-bit
values. No zstd: the packed sections are near-random bits.

``decode_sparse`` treats the message as hostile (raises only ``ValidationError``): codec, dtype,
shape, chunk size, exact payload and scales sizes, checksum, exactly ``nnz`` gaps, every position
inside the shard (gaps make them strictly increasing: no index twice), finite non-negative levels.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence

import numpy as np
import torch

from lowband.protocols import tensor_pb2
from lowband.protocols.codec import DEFAULT_MAX_NUMEL, decode, payload_checksum
from lowband.protocols.errors import ValidationError
from lowband.protocols.sparse import MAX_CHUNK, SPARSE_BITS, SPARSE_CODEC, SparseSelection, entry_values

logger = logging.getLogger(__name__)

_HEADER = struct.Struct("<BIIBI")   # bits, phase, nnz, rice, unary_bits
MAX_RICE = 31


def pack_bits(values: np.ndarray, width: int) -> bytes:
    """Unsigned ints (< 2**width) packed LSB first, ``width`` bits each."""
    if values.size == 0 or width == 0:
        return b""
    shifts = np.arange(width, dtype=np.uint64)
    bits = ((values.astype(np.uint64)[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little").tobytes()


def unpack_bits(buf: bytes | memoryview, count: int, width: int) -> np.ndarray:
    """Inverse of ``pack_bits`` for ``count`` values (the caller checked the buffer's size)."""
    if count == 0 or width == 0:
        return np.zeros(count, dtype=np.int64)
    bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), bitorder="little")[: count * width]
    weights = np.uint64(1) << np.arange(width, dtype=np.uint64)
    return (bits.reshape(count, width).astype(np.uint64) * weights).sum(axis=1).astype(np.int64)


def _packed_size(count: int, width: int) -> int:
    return (count * width + 7) // 8


def rice_parameter(gaps: np.ndarray) -> int:
    """The Rice parameter near-optimal for geometric gaps: floor(log2(mean gap)), at least 0."""
    if gaps.size == 0:
        return 0
    mean = float(gaps.mean())
    return min(MAX_RICE, max(0, int(np.floor(np.log2(mean))) if mean >= 1 else 0))


def _unary(quotients: np.ndarray) -> tuple[bytes, int]:
    """q ones then a zero for each quotient, packed; returns (bytes, number of bits)."""
    total = int(quotients.sum()) + quotients.size
    bits = np.ones(total, dtype=np.uint8)
    bits[np.cumsum(quotients + 1) - 1] = 0
    return np.packbits(bits, bitorder="little").tobytes(), total


def encode_sparse(sel: SparseSelection, start: int = 0, end: int | None = None) -> tensor_pb2.Tensor:
    """The wire message for the entries of ``sel`` in ``[start, end)`` (default: all of it)."""
    end = sel.numel if end is None else end
    if not 0 <= start <= end <= sel.numel:
        raise ValueError(f"shard [{start}, {end}) out of range for {sel.numel} elements")
    c = sel.chunk
    lo = int(torch.searchsorted(sel.indices, torch.tensor(start)))
    hi = int(torch.searchsorted(sel.indices, torch.tensor(end)))
    positions = (sel.indices[lo:hi] - start).numpy()
    codes = sel.codes[lo:hi].numpy()
    first = start // c
    last = (end - 1) // c if end > start else first - 1
    gaps = np.diff(positions, prepend=-1) - 1 if positions.size else np.zeros(0, dtype=np.int64)
    rice = rice_parameter(gaps)
    unary, unary_bits = _unary(gaps >> rice) if gaps.size else (b"", 0)
    payload = b"".join([
        _HEADER.pack(sel.bits, start - first * c, positions.size, rice, unary_bits),
        unary,
        pack_bits(gaps & ((1 << rice) - 1), rice),
        pack_bits(codes, sel.bits),
    ])
    scales = sel.levels[first : last + 1].contiguous().numpy().astype("<f4").tobytes()
    return tensor_pb2.Tensor(dtype="float32", shape=[end - start], codec=SPARSE_CODEC, block_size=c, scales=scales,
                             payload=payload, raw_size=len(payload), checksum=payload_checksum(scales, payload))


def decode_sparse(msg: tensor_pb2.Tensor, *, max_numel: int = DEFAULT_MAX_NUMEL,
                  expected_shape: Sequence[int] | None = None) -> torch.Tensor:
    """The dense fp32 shard a sparse message stands for; ValidationError for anything malformed."""
    try:
        return _decode_sparse(msg, max_numel, expected_shape)
    except ValidationError:
        raise
    except (ValueError, TypeError, RuntimeError, OverflowError, IndexError, struct.error) as exc:
        raise ValidationError(f"malformed sparse message: {type(exc).__name__}: {exc}") from exc


def _decode_sparse(msg: tensor_pb2.Tensor, max_numel: int, expected_shape: Sequence[int] | None) -> torch.Tensor:
    if not isinstance(msg, tensor_pb2.Tensor):
        raise ValidationError(f"expected a lowband.Tensor message, got {type(msg).__name__}")
    if msg.codec != SPARSE_CODEC:
        raise ValidationError(f"codec {msg.codec!r} is not {SPARSE_CODEC!r}")
    if msg.dtype != "float32":
        raise ValidationError(f"sparse messages decode to float32, not {msg.dtype!r}")
    if msg.compression:
        raise ValidationError(f"sparse messages are not compressed, got {msg.compression!r}")
    shape = tuple(msg.shape)
    if len(shape) != 1:
        raise ValidationError(f"a sparse shard is 1-D, got shape {list(shape)}")
    if expected_shape is not None and shape != tuple(expected_shape):
        raise ValidationError(f"shape {list(shape)} does not match the expected {list(expected_shape)}")
    numel = shape[0]
    if not 0 <= numel <= max_numel:
        raise ValidationError(f"{numel} elements out of range [0, {max_numel}]")
    c = msg.block_size
    if not 1 <= c <= MAX_CHUNK:
        raise ValidationError(f"chunk size (block_size) {c} out of range [1, {MAX_CHUNK}]")
    payload = msg.payload
    if len(payload) < _HEADER.size or msg.raw_size != len(payload):
        raise ValidationError(f"payload of {len(payload)} bytes (raw_size {msg.raw_size}) is not a sparse payload")
    bits, phase, nnz, rice, unary_bits = _HEADER.unpack_from(payload)
    if bits not in SPARSE_BITS:
        raise ValidationError(f"{bits} value bits; expected one of {SPARSE_BITS}")
    if phase >= c:
        raise ValidationError(f"phase {phase} not below the chunk size {c}")
    if nnz > numel or rice > MAX_RICE:
        raise ValidationError(f"{nnz} entries (Rice parameter {rice}) in a shard of {numel} elements")
    if not nnz <= unary_bits <= nnz + (numel >> rice):   # every gap's quotient is at most numel >> rice
        raise ValidationError(f"{unary_bits} unary bits cannot hold {nnz} gaps in {numel} elements")
    need = _HEADER.size + _packed_size(unary_bits, 1) + _packed_size(nnz, rice) + _packed_size(nnz, bits)
    if len(payload) != need:
        raise ValidationError(f"payload holds {len(payload)} bytes; {nnz} entries need {need}")
    n_chunks = (phase + numel + c - 1) // c if numel else 0
    n_levels = 1 << (bits - 1)
    if len(msg.scales) != 4 * n_levels * n_chunks:
        raise ValidationError(f"scales hold {len(msg.scales)} bytes; {n_chunks} chunks of {n_levels} levels need "
                              f"{4 * n_levels * n_chunks}")
    if not msg.HasField("checksum"):
        raise ValidationError("message carries no checksum")
    if payload_checksum(msg.scales, payload) != msg.checksum:
        raise ValidationError("checksum mismatch: payload or scales corrupted")
    levels = torch.from_numpy(np.frombuffer(msg.scales, dtype="<f4").astype(np.float32)).view(n_chunks, n_levels)
    if not bool(torch.isfinite(levels).all()) or bool((levels < 0).any()):
        raise ValidationError("sparse levels must be finite and non-negative")

    at = _HEADER.size
    unary = np.unpackbits(np.frombuffer(payload, dtype=np.uint8, count=_packed_size(unary_bits, 1), offset=at),
                          bitorder="little")[:unary_bits]
    at += _packed_size(unary_bits, 1)
    ends = np.flatnonzero(unary == 0)
    if ends.size != nnz or (nnz and int(ends[-1]) != unary_bits - 1):
        raise ValidationError(f"the unary section holds {ends.size} gaps, the header says {nnz} entries")
    quotients = np.diff(ends, prepend=-1) - 1
    remainders = unpack_bits(memoryview(payload)[at : at + _packed_size(nnz, rice)], nnz, rice)
    at += _packed_size(nnz, rice)
    codes = unpack_bits(memoryview(payload)[at:], nnz, bits)
    positions = np.cumsum((quotients << rice) + remainders + 1) - 1
    if nnz and int(positions[-1]) >= numel:
        raise ValidationError(f"an index falls outside the shard of {numel} elements")
    out = torch.zeros(numel, dtype=torch.float32)
    if nnz:
        pos = torch.from_numpy(positions)
        chunk_of = torch.from_numpy((positions + phase) // c)
        out[pos] = entry_values(chunk_of, torch.from_numpy(codes), levels)
    return out


def decode_any(msg: tensor_pb2.Tensor, *, max_numel: int = DEFAULT_MAX_NUMEL,
               expected_shape: Sequence[int] | None = None, require_finite: bool = False) -> torch.Tensor:
    """``decode_sparse`` for a sparse message, the dense codecs' ``decode`` for any other (values of a
    valid sparse message are always finite: its levels are checked)."""
    if isinstance(msg, tensor_pb2.Tensor) and msg.codec == SPARSE_CODEC:
        return decode_sparse(msg, max_numel=max_numel, expected_shape=expected_shape)
    return decode(msg, max_numel=max_numel, expected_shape=expected_shape, require_finite=require_finite)
