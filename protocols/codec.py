"""The tensor codec: quantize, compress and validate tensors that cross the wire.

Codecs (all vectorised torch, no Python loop over elements):

- ``fp32`` / ``bf16`` / ``fp16``: raw little-endian bytes.
- ``int8``: per-block absmax scale, values ``round(x / s)`` in [-127, 127], ``s = absmax / 127``.
- ``int4``: per-block absmax scale, values in [-7, 7] stored as ``v + 8``, two per byte
  (low nibble first).
- ``fp8``: ``torch.float8_e4m3fn`` after dividing by a per-block scale ``absmax / 448``.
- ``fp4``: a 4-bit float in the spirit of Streaming DiLoCo's E3M0: a sign bit and a 3-bit
  code, no mantissa. Code 0 is zero, code c in 1..7 is ``scale * 2^-(c-1)`` with
  ``scale = absmax`` of the block; rounding is to the nearest representable value.

Scales are little-endian float32, one per block of ``block_size`` elements (256 by
default, so scales cost 4/256 byte per value). ``zstd`` may be applied to the payload;
it is dropped when it saves less than ``ZSTD_MIN_SAVING`` (10%) of the bytes.
``ErrorFeedback`` carries each tensor's quantization residual into its next send, so
repeated lossy sends do not drift.

``decode`` treats every message as hostile: it checks codec, dtype, shape, element
count, scale and payload sizes and the checksum *before* allocating anything sized by
the message, bounds zstd output by the size the codec needs, and raises only
``ValidationError``. Byte order is little-endian (every supported host).
"""

from __future__ import annotations

import itertools
import logging
import math
import struct
import threading
import warnings
import zlib
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import zstandard

from lowband.protocols import tensor_pb2
from lowband.protocols.errors import ValidationError

try:   # optional native kernels for the per-hop cast and check (protocols/_fastcodec.c), built at install
    from lowband.protocols import _fastcodec
except ImportError:   # no C compiler at install: torch does the same, bit for bit, somewhat slower
    _fastcodec = None

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
RAW_CODECS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUANT_CODECS = ("int8", "int4", "fp8", "fp4")
CODECS = (*RAW_CODECS, *QUANT_CODECS)

DEFAULT_BLOCK_SIZE = 256
MAX_BLOCK_SIZE = 1 << 20
DEFAULT_MAX_NUMEL = 1 << 28       # 1 GiB of fp32: far above any single tensor we send
MAX_NDIM = 16
ZSTD_LEVEL = 1                    # level 1 is ~all of the gain on quantized data, at a fraction of the cost
_ZSTD_PROBE_BYTES = 1 << 16       # try a sample first so incompressible payloads cost little
# zstd is kept only when it saves >= 10%: int8 gradient codes save ~7% for ~7 ms per 4 MB
# (compress + decompress), which pays off only on links slower than ~300 Mbit/s.
ZSTD_MIN_SAVING = 0.10
_ZSTD_PROBE_MIN_PAYLOAD = 1 << 18
_ZSTD_MAX_WINDOW = 1 << 23        # our frames use far less; refuse frames that demand more memory

_FP8_MAX = 448.0
_FP4_MIN_ABS_BITS = (127 - 7) << 23   # float32 bits of 2^-7: below this (x/scale) rounds to zero

_tls = threading.local()


# --------------------------------------------------------------------------- helpers


def _zstd_compressor() -> zstandard.ZstdCompressor:
    c = getattr(_tls, "cctx", None)
    if c is None:
        c = _tls.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    return c


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_tls, "dctx", None)
    if d is None:
        d = _tls.dctx = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW)
    return d


# We wrap immutable `bytes` from protobuf without copying and only ever read them; set
# once at import (catch_warnings is not thread-safe) and only for warnings raised here.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning,
                        module=__name__)


def _frombuffer(buf: bytes, dtype: torch.dtype) -> torch.Tensor:
    """Zero-copy read-only view of `buf`; callers never write into it."""
    if len(buf) == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype)


def _to_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a contiguous CPU tensor (bf16 goes through int16: numpy lacks it)."""
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


_SUM_BLOCK = 1 << 16                                      # 64-bit words per block (512 KiB)
_SUM_WEIGHTS = np.arange(1, _SUM_BLOCK + 1, dtype=np.uint64)
_U64 = (1 << 64) - 1


def _word_sums(buf: bytes | memoryview) -> tuple[int, int, int]:
    """(sum of w_i, sum of (i+1) * w_i, length) mod 2^64 over the little-endian 64-bit words of `buf`
    (the last one zero-padded): Fletcher's checksum on 64-bit words, vectorised."""
    view = memoryview(buf).cast("B")
    n = len(view)
    full = n // 8
    words = np.frombuffer(view, dtype="<u8", count=full)
    s1 = s2 = 0
    for start in range(0, full, _SUM_BLOCK):
        block = words[start:start + _SUM_BLOCK]
        b1 = int(block.sum(dtype=np.uint64))
        b2 = int(np.dot(block, _SUM_WEIGHTS[:len(block)]))   # wraps mod 2^64, exact integer arithmetic
        s2 = (s2 + b2 + start * b1) & _U64
        s1 = (s1 + b1) & _U64
    if n % 8:
        tail = int.from_bytes(bytes(view[full * 8:]), "little")
        s1 = (s1 + tail) & _U64
        s2 = (s2 + (full + 1) * tail) & _U64
    return s1, s2, n


def payload_checksum(scales: bytes | memoryview, payload: bytes | memoryview) -> int:
    """The 32-bit ``Tensor.checksum`` of a message's scales and payload.

    Fletcher sums over 64-bit words (any change confined to one word, any swap of two different
    words and any change of length alter them), folded to 32 bits with crc32. About 3x faster than
    zlib.crc32 on the bulk (0.09 against 0.25 ms per MiB here; zlib.adler32 is no faster than crc32
    in the zlib this runs on), which is most of what a tensor costs to check. Random corruption
    passes with probability ~2^-32, as with any 32-bit check.
    """
    return zlib.crc32(struct.pack("<6Q", *_word_sums(scales), *_word_sums(payload)))


def payload_bytes(codec: str, numel: int) -> int:
    """Uncompressed payload size the codec needs for `numel` values."""
    if codec in RAW_CODECS:
        return numel * RAW_CODECS[codec].itemsize
    if codec in ("int8", "fp8"):
        return numel
    if codec in ("int4", "fp4"):
        return (numel + 1) // 2
    raise ValidationError(f"unknown codec {codec!r}; expected one of {CODECS}")


def _num_blocks(numel: int, block_size: int) -> int:
    return (numel + block_size - 1) // block_size


def _blocked(flat: torch.Tensor, block_size: int) -> torch.Tensor:
    """View (or zero-padded copy when ragged) of `flat` as [num_blocks, block_size]."""
    n = flat.numel()
    nb = _num_blocks(n, block_size)
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


# --------------------------------------------------------------------------- quantizers


_QMAX = {"int8": 127.0, "int4": 7.0, "fp8": _FP8_MAX, "fp4": 1.0}


def _quantize(flat: torch.Tensor, codec: str, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
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


def _dequantize(payload: torch.Tensor, scales: torch.Tensor, codec: str, block_size: int, numel: int) -> torch.Tensor:
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


# --------------------------------------------------------------------------- error feedback


class ErrorFeedback:
    """Quantization residual per tensor key, added to that tensor's next send.

    With it, the sum of what a receiver decodes over many sends tracks the sum of
    what was meant to be sent, instead of accumulating every send's rounding error
    (the classic error-feedback trick for compressed gradients). Keep one instance
    per stream of updates (e.g. per fragment of a DiLoCo replica).
    """

    def __init__(self) -> None:
        self._residuals: dict[Hashable, torch.Tensor] = {}

    def compensate(self, key: Hashable, flat: torch.Tensor) -> torch.Tensor:
        """`flat` (fp32) plus the stored residual for `key`, if it has the same shape."""
        r = self._residuals.get(key)
        if r is None:
            return flat
        if r.shape != flat.shape or r.device != flat.device:
            logger.warning("error feedback for %r dropped: shape changed %s -> %s", key, tuple(r.shape),
                           tuple(flat.shape))
            del self._residuals[key]
            return flat
        return flat + r

    def store(self, key: Hashable, residual: torch.Tensor) -> None:
        self._residuals[key] = residual.detach()

    def residual(self, key: Hashable) -> torch.Tensor | None:
        return self._residuals.get(key)

    def reset(self, key: Hashable | None = None) -> None:
        """Forget one key's residual, or all of them (e.g. after a failed round is re-sent in full)."""
        if key is None:
            self._residuals.clear()
        else:
            self._residuals.pop(key, None)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._residuals

    def __len__(self) -> int:
        return len(self._residuals)


# --------------------------------------------------------------------------- encode


def _maybe_compress(payload: memoryview | bytes) -> bytes | None:
    """zstd frame of `payload` when it saves at least ZSTD_MIN_SAVING of the bytes, else None."""
    n = len(payload)
    if n == 0:
        return None
    keep = 1.0 - ZSTD_MIN_SAVING
    cctx = _zstd_compressor()
    if n >= _ZSTD_PROBE_MIN_PAYLOAD:
        probe = memoryview(payload)[:_ZSTD_PROBE_BYTES]
        if len(cctx.compress(probe)) > keep * len(probe):
            return None
    compressed = cctx.compress(payload)
    return compressed if len(compressed) <= keep * n else None


def _encode_payload(
    tensor: torch.Tensor,
    codec: str,
    block_size: int,
    error_feedback: ErrorFeedback | None,
    key: Hashable | None,
) -> tuple[tensor_pb2.Tensor, np.ndarray]:
    """The message's fields except payload, compression and checksum, and the raw payload array."""
    if codec not in CODECS:
        raise ValidationError(f"unknown codec {codec!r}; expected one of {CODECS}")
    dtype_name = _DTYPE_NAMES.get(tensor.dtype)
    if dtype_name is None:
        raise ValidationError(f"cannot encode dtype {tensor.dtype}; expected one of {tuple(DTYPES.values())}")
    if codec in QUANT_CODECS and not 1 <= block_size <= MAX_BLOCK_SIZE:
        raise ValidationError(f"block_size must be in [1, {MAX_BLOCK_SIZE}], got {block_size}")
    if error_feedback is not None and key is None:
        raise ValueError("error_feedback needs a key naming the tensor")

    x = tensor.detach().reshape(-1)
    numel = x.numel()
    ef = error_feedback if codec != "fp32" else None   # fp32 loses nothing to feed back
    if ef is not None:
        x = ef.compensate(key, x.to(torch.float32))

    scales_bytes = b""
    if codec in RAW_CODECS:
        wire = x.to(RAW_CODECS[codec])
        if ef is not None:
            ef.store(key, x - wire.to(torch.float32))
        wire = wire.cpu().contiguous()
        if wire.dtype == torch.bfloat16:
            wire = wire.view(torch.int16)
        payload_arr = wire.numpy()
    else:
        x32 = x.to(torch.float32)
        q, scales = _quantize(x32, codec, block_size)
        if ef is not None:
            ef.store(key, x32 - _dequantize(q, scales, codec, block_size, numel).to(x32.device))
        payload_arr = q.cpu().contiguous().numpy()
        scales_bytes = _to_bytes(scales.cpu())
    meta = tensor_pb2.Tensor(
        dtype=dtype_name,
        shape=list(tensor.shape),
        codec=codec,
        block_size=block_size if codec in QUANT_CODECS else 0,
        scales=scales_bytes,
        raw_size=payload_arr.nbytes,
    )
    return meta, payload_arr


def encode(
    tensor: torch.Tensor,
    codec: str = "fp32",
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    compress: bool = True,
    error_feedback: ErrorFeedback | None = None,
    key: Hashable | None = None,
) -> tensor_pb2.Tensor:
    """Encode a float32/bfloat16/float16 tensor (any device, any shape) into a wire message.

    The message decodes back into the input's dtype and shape. With `error_feedback`,
    `key` names the tensor: its previous residual is added before quantizing and the
    new residual is stored.
    """
    msg, payload_arr = _encode_payload(tensor, codec, block_size, error_feedback, key)
    compressed = _maybe_compress(memoryview(payload_arr).cast("B")) if compress else None
    msg.payload = compressed if compressed is not None else payload_arr.tobytes()
    msg.compression = "zstd" if compressed is not None else ""
    msg.checksum = payload_checksum(msg.scales, msg.payload)
    return msg


def encode_split(
    tensor: torch.Tensor,
    codec: str = "fp32",
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[tensor_pb2.Tensor, memoryview]:
    """Encode without compression into (the message without payload and checksum, the payload).

    For the activation wire, which sends the payload beside the message on a TCP stream: the bulk
    is never copied into a protobuf, and no checksum pass is made (``seal`` adds both when such a
    message has to take another path).
    """
    msg, payload_arr = _encode_payload(tensor, codec, block_size, None, None)
    return msg, memoryview(payload_arr).cast("B")


def seal(msg: tensor_pb2.Tensor, payload: bytes | bytearray | memoryview | SegmentedPayload | None = None
         ) -> tensor_pb2.Tensor:
    """Complete a message from ``encode_split`` in place: put ``payload`` (when given) into it and add the
    checksum it lacks. A message that already has its checksum is left as it is."""
    if payload is not None:
        if msg.payload:
            raise ValueError("message already holds a payload")
        msg.payload = bytes(payload)
    if not msg.HasField("checksum"):
        msg.checksum = payload_checksum(msg.scales, msg.payload)
    return msg


def wire_bytes(msg: tensor_pb2.Tensor) -> int:
    """Serialized size of the message: what it costs on the wire."""
    return msg.ByteSize()


# --------------------------------------------------------------------------- decode


def _check_shape(shape: Sequence[int], max_numel: int) -> int:
    if len(shape) > MAX_NDIM:
        raise ValidationError(f"tensor has {len(shape)} dimensions; at most {MAX_NDIM} allowed")
    numel = 1
    for d in shape:
        if d < 0:
            raise ValidationError(f"negative dimension in shape {list(shape)}")
        numel *= d
    if numel > max_numel:  # Python ints: no overflow, checked before any allocation
        raise ValidationError(f"tensor of shape {list(shape)} has {numel} elements; the bound is {max_numel}")
    return numel


def _decompress(payload: bytes, raw_size: int) -> bytes:
    """zstd-decompress exactly `raw_size` bytes, refusing frames that claim or produce more."""
    if raw_size == 0:
        raise ValidationError("compressed payload for an empty tensor")
    if len(payload) >= raw_size:
        raise ValidationError("compressed payload is not smaller than the raw payload")
    try:
        claimed = zstandard.frame_content_size(payload)
    except zstandard.ZstdError as exc:
        raise ValidationError(f"bad zstd frame header: {exc}") from exc
    if claimed not in (-1, raw_size):  # -1: size not written; then max_output_size bounds it
        raise ValidationError(f"zstd frame claims {claimed} bytes; the codec needs {raw_size}")
    try:
        out = _zstd_decompressor().decompress(payload, max_output_size=raw_size, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise ValidationError(f"zstd decompression failed: {exc}") from exc
    if len(out) != raw_size:
        raise ValidationError(f"zstd payload decompressed to {len(out)} bytes; the codec needs {raw_size}")
    return out


def decode(
    msg: tensor_pb2.Tensor,
    *,
    max_numel: int = DEFAULT_MAX_NUMEL,
    expected_shape: Sequence[int] | None = None,
    require_finite: bool = False,
    payload: bytes | bytearray | memoryview | None = None,
    require_checksum: bool = True,
) -> torch.Tensor:
    """Decode a wire message into a new CPU tensor of the message's dtype and shape.

    Raises ValidationError (and nothing else) for any malformed, oversized or
    mismatched message; with `require_finite`, also for NaN/inf values. `payload`, when
    given, is the message's payload that travelled beside it (the activation wire: not
    copied into the message); the message's own payload must then be empty. A checksum
    present is always verified; ``require_checksum=False`` accepts a message without one
    (only for transports that check integrity themselves).
    """
    try:
        return _decode(msg, max_numel, expected_shape, require_finite, payload, require_checksum)
    except ValidationError:
        raise
    except (ValueError, TypeError, RuntimeError, OverflowError, AttributeError) as exc:
        # Belt and braces: a check we missed must still surface as bad input, not a crash.
        raise ValidationError(f"malformed tensor message: {type(exc).__name__}: {exc}") from exc


def _decode(
    msg: tensor_pb2.Tensor,
    max_numel: int,
    expected_shape: Sequence[int] | None,
    require_finite: bool,
    beside: bytes | bytearray | memoryview | None = None,
    require_checksum: bool = True,
) -> torch.Tensor:
    if not isinstance(msg, tensor_pb2.Tensor):
        raise ValidationError(f"expected a lowband.Tensor message, got {type(msg).__name__}")
    codec = msg.codec
    if codec not in CODECS:
        raise ValidationError(f"unknown codec {codec!r}; expected one of {CODECS}")
    dtype = DTYPES.get(msg.dtype)
    if dtype is None:
        raise ValidationError(f"unknown dtype {msg.dtype!r}; expected one of {tuple(DTYPES)}")
    if msg.compression not in ("", "zstd"):
        raise ValidationError(f"unknown compression {msg.compression!r}")
    shape = tuple(msg.shape)
    if expected_shape is not None and shape != tuple(expected_shape):
        raise ValidationError(f"shape {list(shape)} does not match the expected {list(expected_shape)}")
    numel = _check_shape(shape, max_numel)

    need = payload_bytes(codec, numel)
    if msg.raw_size != need:
        raise ValidationError(f"raw_size {msg.raw_size} does not match the {need} bytes {codec} needs "
                              f"for {numel} elements")
    scales_buf = msg.scales
    if codec in QUANT_CODECS:
        block_size = msg.block_size
        if not 1 <= block_size <= MAX_BLOCK_SIZE:
            raise ValidationError(f"block_size {block_size} out of range [1, {MAX_BLOCK_SIZE}]")
        num_blocks = _num_blocks(numel, block_size)
        if len(scales_buf) != 4 * num_blocks:
            raise ValidationError(f"scales hold {len(scales_buf)} bytes; {num_blocks} blocks need {4 * num_blocks}")
    elif scales_buf:
        raise ValidationError(f"codec {codec} carries no scales, got {len(scales_buf)} bytes")

    payload: bytes | bytearray | memoryview = msg.payload
    if beside is not None:
        if payload:
            raise ValidationError("payload both inside and beside the message")
        payload = beside
    if msg.compression == "":
        if len(payload) != need:
            raise ValidationError(f"payload holds {len(payload)} bytes; {codec} needs {need} for {numel} elements")
    elif len(payload) >= need:
        raise ValidationError("compressed payload is not smaller than the raw payload")
    if msg.HasField("checksum"):
        if payload_checksum(scales_buf, payload) != msg.checksum:
            raise ValidationError("checksum mismatch: payload or scales corrupted")
    elif require_checksum:
        raise ValidationError("message carries no checksum")
    if msg.compression == "zstd":
        payload = _decompress(bytes(payload), need)

    if codec in RAW_CODECS:
        wire_dtype = RAW_CODECS[codec]
        raw = _frombuffer(payload, torch.int16 if wire_dtype == torch.bfloat16 else wire_dtype)
        if wire_dtype == torch.bfloat16:
            raw = raw.view(torch.bfloat16)
        out = raw.to(dtype) if wire_dtype != dtype else raw.clone()
    else:
        scales = _frombuffer(scales_buf, torch.float32)
        if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
            raise ValidationError("scales must be finite and non-negative")
        out = _dequantize(_frombuffer(payload, torch.uint8), scales, codec, msg.block_size, numel)
        if dtype != torch.float32:
            out = out.to(dtype)
    out = out.reshape(shape)
    if require_finite:
        check_finite(out)
    return out


_NUMPY_DTYPES = frozenset({torch.float32, torch.float16, torch.float64, torch.uint8, torch.int8, torch.int32,
                           torch.int64})


def native_codec() -> bool:
    """Whether the native kernels (protocols/_fastcodec.c) were built and are in use."""
    return _fastcodec is not None


_NATIVE_FINITE = {torch.float32: "finite_f32", torch.bfloat16: "finite_bf16", torch.float16: "finite_f16"}


def _native_finite(dtype: torch.dtype) -> Callable[[memoryview], bool] | None:
    name = _NATIVE_FINITE.get(dtype)
    return getattr(_fastcodec, name) if _fastcodec is not None and name is not None else None


def check_finite(t: torch.Tensor) -> None:
    """Refuse NaN/inf (ValidationError). Natively, one pass over the exponent bits. With torch, one
    reduction first (NaN and inf propagate through a sum; ~20x cheaper than an elementwise isfinite on
    CPU); the full check only when the sum is not finite (the sum of finite values may overflow)."""
    native = _native_finite(t.dtype) if t.is_cpu and t.is_contiguous() else None
    if native is not None:
        if not native(tensor_bytes(t.detach())):
            raise ValidationError("tensor contains non-finite values")
    elif t.numel() and not math.isfinite(t.sum().item()) and not bool(torch.isfinite(t).all()):
        raise ValidationError("tensor contains non-finite values")


def check_finite_bytes(data: memoryview, dtype: torch.dtype) -> None:
    """``check_finite`` on the raw bytes of ``dtype`` values (a receiver checks its buffer as it fills)."""
    native = _native_finite(dtype)
    if native is not None:
        if not native(data):
            raise ValidationError("tensor contains non-finite values")
    elif len(data):
        check_finite(torch.frombuffer(data, dtype=dtype))


# A segmented payload is cast in pieces of this many wire bytes. One piece per activation of the usual
# sizes: on loopback, casting 1 MiB whole and writing it once was ~0.05 ms faster than four interleaved
# cast-and-write rounds (benchmarks/pipeline.md); past this size the receiver's reads and checks of
# the first pieces overlap the cast of the later ones.
SEGMENT_BYTES = 4 << 20


@dataclass(slots=True)   # not frozen: a frozen dataclass's __init__ costs ~0.4 us a field, on every hop
class SegmentedPayload:
    """The payload of a raw codec, cast to its wire dtype one segment at a time as a transport asks for it:
    the first bytes can be on the wire (and being checked by the receiver) while the rest is still being
    cast. ``bytes(payload)`` gives it whole (for transports that need one buffer). Made by
    ``encode_segmented``, which works out the sizes once (a hop asks for them several times)."""

    source: torch.Tensor          # flat, contiguous, CPU: what to cast
    wire_dtype: torch.dtype
    segment_elems: int
    numel: int
    nbytes: int                   # on the wire
    casts: bool                   # whether the source needs a cast (a transport needs no scratch otherwise)

    def __len__(self) -> int:
        return self.nbytes

    def segments(self, scratch: bytearray | memoryview | None = None, *, first_bytes: int = 0
                 ) -> Iterator[memoryview]:
        """The payload, segment by segment. With ``scratch`` (a writable byte buffer of at least
        ``len(self)`` bytes that the transport reuses frame after frame, once the previous frame is out)
        a cast goes into it instead of into fresh memory. A source already in the wire dtype is yielded
        as it is (no copy). ``first_bytes`` (> 0) makes the first segment at most that long (a transport
        sends it with the frame head while the rest is cast)."""
        nbytes, numel, step = self.nbytes, self.numel, self.segment_elems
        if scratch is not None and len(scratch) < nbytes:
            raise ValueError(f"scratch holds {len(scratch)} bytes, the payload needs {nbytes}")
        itemsize = self.wire_dtype.itemsize
        first = min(step, max(1, first_bytes // itemsize)) if first_bytes > 0 and numel else 0
        edges = itertools.pairwise([0, *range(first, numel, step), numel] if first else [*range(0, numel, step), numel])
        if not self.casts:
            for start, stop in edges:
                yield tensor_bytes(self.source[start:stop])
            return
        wire = (memoryview(scratch) if scratch is not None else memoryview(bytearray(nbytes)))[:nbytes]
        if _fastcodec is not None and self.source.dtype == torch.float32 and self.wire_dtype == torch.bfloat16:
            # byte views made once, sliced per segment: a torch view per segment costs more than a
            # 64 KiB segment's cast
            source = tensor_bytes(self.source)
            for start, stop in edges:
                piece = wire[2 * start:2 * stop]
                _fastcodec.cast_f32_to_bf16(source[4 * start:4 * stop], piece)
                yield piece
            return
        out = torch.frombuffer(wire, dtype=torch.uint8).view(self.wire_dtype) if numel else None
        for start, stop in edges:
            assert out is not None
            out[start:stop].copy_(self.source[start:stop])
            yield wire[start * itemsize:stop * itemsize]

    def __bytes__(self) -> bytes:
        return b"".join(bytes(seg) for seg in self.segments())


def encode_segmented(tensor: torch.Tensor, codec: str, *, segment_bytes: int = SEGMENT_BYTES
                     ) -> tuple[tensor_pb2.Tensor, SegmentedPayload]:
    """``encode_split`` for a raw codec, with the cast to the wire dtype deferred to ``segments()``.

    The message decodes into the wire dtype (bf16 activations stay bf16 on the receiver, which reads
    them straight into the tensor: ``receive_target``). Raises ValidationError for a quantized codec.
    """
    if codec not in RAW_CODECS:
        raise ValidationError(f"segmented encoding needs a raw codec {tuple(RAW_CODECS)}, got {codec!r}")
    if segment_bytes < 1:
        raise ValueError("segment_bytes must be positive")
    wire_dtype = RAW_CODECS[codec]
    shape = tensor.shape
    source = tensor.detach().view(-1) if tensor.is_contiguous() else tensor.detach().reshape(-1).contiguous()
    if not source.is_cpu:
        source = source.cpu()
    if _DTYPE_NAMES.get(source.dtype) is None:
        raise ValidationError(f"cannot encode dtype {source.dtype}; expected one of {tuple(DTYPES.values())}")
    numel = source.numel()
    nbytes = numel * wire_dtype.itemsize
    msg = tensor_pb2.Tensor(dtype=_DTYPE_NAMES[wire_dtype], shape=shape, codec=codec, raw_size=nbytes)
    return msg, SegmentedPayload(source, wire_dtype, max(1, segment_bytes // wire_dtype.itemsize), numel, nbytes,
                                 source.dtype != wire_dtype)


def receive_spec(msg: tensor_pb2.Tensor, payload_len: int, *, max_numel: int = DEFAULT_MAX_NUMEL
                 ) -> tuple[tuple[int, ...], torch.dtype] | None:
    """The (shape, dtype) of a tensor whose bytes *are* the message's payload, for a transport that reads
    the payload straight into it (the activation wire): decoding is then free.

    Only for an uncompressed raw codec whose wire dtype is the message's dtype, with no scales and no
    checksum, and a payload of exactly the tensor's size; None otherwise (decode the payload instead,
    which also reports what is wrong with it). Raises nothing: the bounds are checked first.
    """
    if msg.codec not in RAW_CODECS or msg.compression or msg.scales or msg.HasField("checksum"):
        return None
    dtype = DTYPES.get(msg.dtype)
    if dtype is None or RAW_CODECS[msg.codec] != dtype:
        return None
    try:
        numel = _check_shape(msg.shape, max_numel)
    except ValidationError:
        return None
    if msg.raw_size != payload_len or payload_len != numel * dtype.itemsize:
        return None
    return tuple(msg.shape), dtype


def receive_target(msg: tensor_pb2.Tensor, payload_len: int, *, max_numel: int = DEFAULT_MAX_NUMEL
                   ) -> torch.Tensor | None:
    """An uninitialised tensor to read the payload into (``receive_spec``), or None."""
    spec = receive_spec(msg, payload_len, max_numel=max_numel)
    return torch.empty(spec[0], dtype=spec[1]) if spec is not None else None


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's storage (to receive into it, or to write it out)."""
    if t.dtype in _NUMPY_DTYPES:   # ~2x cheaper than the uint8 view, which dtypes numpy lacks (bf16) need
        return memoryview(t.detach().numpy().reshape(-1)).cast("B")
    return memoryview(t.detach().view(-1).view(torch.uint8).numpy()).cast("B")


def relative_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Relative L2 error ||approx - reference|| / ||reference|| in fp64 (0 for an all-zero reference)."""
    ref = reference.detach().double().reshape(-1)
    diff = approx.detach().double().reshape(-1) - ref
    denom = float(ref.norm())
    return float(diff.norm()) / denom if denom > 0 else float(diff.norm())


__all__ = [
    "CODECS",
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_MAX_NUMEL",
    "DTYPES",
    "QUANT_CODECS",
    "RAW_CODECS",
    "ErrorFeedback",
    "SegmentedPayload",
    "ValidationError",
    "check_finite",
    "check_finite_bytes",
    "decode",
    "encode",
    "encode_segmented",
    "encode_split",
    "native_codec",
    "payload_bytes",
    "payload_checksum",
    "receive_spec",
    "receive_target",
    "relative_error",
    "seal",
    "tensor_bytes",
    "wire_bytes",
]
