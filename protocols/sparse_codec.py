"""The wire form of a sparse pseudo-gradient shard (``protocols/sparse.py``), and its validation.

A shard ``[start, end)`` of a fragment travels as one ``lowband.Tensor`` with ``codec = "sparse"``,
``shape = [end - start]``, ``block_size`` = the chunk size C and, in ``scales``, the fp32 levels of
every chunk of the selection's grid that overlaps the shard (rows of ``2**(bits-1)`` values). The
payload, little-endian:

    u8 bits | u32 phase | u32 nnz | u16 count per chunk | offsets | codes

``phase`` is where the shard starts inside its first chunk (the grid is the sender's: a fragment's
for a caller's part, the shard's own for an owner's reply). Each entry's position is its chunk's
start plus its offset within the chunk: offsets take ceil(log2 C) bits each (12 for C = 4096),
codes ``bits`` bits, both bit-packed: ~14 bits an entry at 2 bits, against 32 + 32 for a plain
(index, value) pair. No zstd: packed offsets and codes are near-random bits.

``decode_sparse`` treats the message as hostile (raises only ``ValidationError``): codec, dtype,
shape, chunk size, exact payload and scales sizes, checksum, counts, offsets in range and strictly
increasing within a chunk, positions inside the shard, finite non-negative levels.
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

_HEADER = struct.Struct("<BII")   # bits, phase, nnz


def offset_bits(chunk: int) -> int:
    """Bits per within-chunk offset."""
    return max(1, (chunk - 1).bit_length())


def pack_bits(values: np.ndarray, width: int) -> bytes:
    """Unsigned ints (< 2**width) packed LSB first, ``width`` bits each."""
    if values.size == 0:
        return b""
    shifts = np.arange(width, dtype=np.uint32)
    bits = ((values.astype(np.uint32)[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little").tobytes()


def unpack_bits(buf: bytes | memoryview, count: int, width: int) -> np.ndarray:
    """Inverse of ``pack_bits`` for ``count`` values (the caller checked the buffer's size)."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), bitorder="little")[: count * width]
    weights = (np.uint64(1) << np.arange(width, dtype=np.uint64))
    return (bits.reshape(count, width).astype(np.uint64) * weights).sum(axis=1).astype(np.int64)


def _packed_size(count: int, width: int) -> int:
    return (count * width + 7) // 8


def encode_sparse(sel: SparseSelection, start: int = 0, end: int | None = None) -> tensor_pb2.Tensor:
    """The wire message for the entries of ``sel`` in ``[start, end)`` (default: all of it)."""
    end = sel.numel if end is None else end
    if not 0 <= start <= end <= sel.numel:
        raise ValueError(f"shard [{start}, {end}) out of range for {sel.numel} elements")
    c = sel.chunk
    lo = int(torch.searchsorted(sel.indices, torch.tensor(start)))
    hi = int(torch.searchsorted(sel.indices, torch.tensor(end)))
    idx, codes = sel.indices[lo:hi], sel.codes[lo:hi]
    if end > start:
        first, last = start // c, (end - 1) // c
    else:
        first, last = start // c, start // c - 1
    n_chunks = last - first + 1
    chunk_of = idx // c - first
    counts = torch.bincount(chunk_of, minlength=n_chunks) if n_chunks else torch.zeros(0, dtype=torch.int64)
    offsets = (idx - (idx // c) * c).numpy()
    payload = b"".join([
        _HEADER.pack(sel.bits, start - first * c, idx.numel()),
        counts.to(torch.int64).numpy().astype("<u2").tobytes(),
        pack_bits(offsets, offset_bits(c)),
        pack_bits(codes.numpy(), sel.bits),
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
    bits, phase, nnz = _HEADER.unpack_from(payload)
    if bits not in SPARSE_BITS:
        raise ValidationError(f"{bits} value bits; expected one of {SPARSE_BITS}")
    if phase >= c:
        raise ValidationError(f"phase {phase} not below the chunk size {c}")
    if nnz > numel:
        raise ValidationError(f"{nnz} entries in a shard of {numel} elements")
    n_chunks = (phase + numel + c - 1) // c if numel else 0
    width = offset_bits(c)
    need = _HEADER.size + 2 * n_chunks + _packed_size(nnz, width) + _packed_size(nnz, bits)
    if len(payload) != need:
        raise ValidationError(f"payload holds {len(payload)} bytes; {nnz} entries over {n_chunks} chunks need {need}")
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
    counts = np.frombuffer(payload, dtype="<u2", count=n_chunks, offset=at).astype(np.int64)
    at += 2 * n_chunks
    if int(counts.sum()) != nnz or bool((counts > c).any()):
        raise ValidationError(f"per-chunk counts sum to {int(counts.sum())}, the header says {nnz} entries")
    offsets = unpack_bits(memoryview(payload)[at : at + _packed_size(nnz, width)], nnz, width)
    at += _packed_size(nnz, width)
    codes = unpack_bits(memoryview(payload)[at:], nnz, bits)
    chunk_of = np.repeat(np.arange(n_chunks, dtype=np.int64), counts)
    if nnz and bool((offsets >= c).any()):
        raise ValidationError(f"an offset is not below the chunk size {c}")
    positions = chunk_of * c + offsets - phase
    if nnz and (int(positions.min()) < 0 or int(positions.max()) >= numel):
        raise ValidationError(f"an index falls outside the shard of {numel} elements")
    if nnz > 1:
        same_chunk = chunk_of[1:] == chunk_of[:-1]
        if bool((same_chunk & (offsets[1:] <= offsets[:-1])).any()):
            raise ValidationError("offsets within a chunk must be strictly increasing (no duplicate index)")
    out = torch.zeros(numel, dtype=torch.float32)
    if nnz:
        pos = torch.from_numpy(positions)
        out[pos] = entry_values(torch.from_numpy(chunk_of), torch.from_numpy(codes), levels)
    return out


def decode_any(msg: tensor_pb2.Tensor, *, max_numel: int = DEFAULT_MAX_NUMEL,
               expected_shape: Sequence[int] | None = None, require_finite: bool = False) -> torch.Tensor:
    """``decode_sparse`` for a sparse message, the dense codecs' ``decode`` for any other (values of a
    valid sparse message are always finite: its levels are checked)."""
    if isinstance(msg, tensor_pb2.Tensor) and msg.codec == SPARSE_CODEC:
        return decode_sparse(msg, max_numel=max_numel, expected_shape=expected_shape)
    return decode(msg, max_numel=max_numel, expected_shape=expected_shape, require_finite=require_finite)
