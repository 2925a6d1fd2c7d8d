"""The tensor codec: encode, compress and validate the tensors that cross the network.

Codecs: ``fp32`` / ``bf16`` / ``fp16`` are raw little-endian bytes; ``int8`` / ``int4`` / ``fp8``
/ ``fp4`` are block-quantised (``protocols/quant.py`` says how), with one little-endian float32
scale per block of ``block_size`` elements (256 by default, so scales cost 4/256 byte per value).
``zstd`` may be applied to the payload; it is dropped when it saves less than ``ZSTD_MIN_SAVING``
(10%) of the bytes.

``decode`` treats every message as hostile: it checks codec, dtype, shape, element
count, scale and payload sizes and the checksum *before* allocating anything sized by
the message, bounds zstd output by the size the codec needs, and raises only
``ValidationError``. Byte order is little-endian (every supported host).
"""

from __future__ import annotations

import logging
import math
import struct
import threading
import warnings
import zlib
from collections.abc import Callable, Sequence
from types import ModuleType

import numpy as np
import torch
import zstandard

from lowband.protocols import tensor_pb2
from lowband.protocols.errors import ValidationError
from lowband.protocols.quant import (
    DEFAULT_BLOCK_SIZE,
    MAX_BLOCK_SIZE,
    QUANT_CODECS,
    dequantize,
    num_blocks,
    quantize,
)

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
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
RAW_CODECS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CODECS = (*RAW_CODECS, *QUANT_CODECS)

DEFAULT_MAX_NUMEL = 1 << 28       # 1 GiB of fp32: far above any single tensor we send
MAX_NDIM = 16
ZSTD_LEVEL = 1                    # level 1 is ~all of the gain on quantized data, at a fraction of the cost
_ZSTD_PROBE_BYTES = 1 << 16       # try a sample first so incompressible payloads cost little
# zstd is kept only when it saves >= 10%: quantized gradient codes shrink by less than that, and
# compressing plus decompressing them costs more time than it saves except on very slow links.
ZSTD_MIN_SAVING = 0.10
_ZSTD_PROBE_MIN_PAYLOAD = 1 << 18
_ZSTD_MAX_WINDOW = 1 << 23        # our frames use far less; refuse frames that demand more memory

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
    words and any change of length alter them), folded to 32 bits with crc32: word sums are much
    cheaper than crc32 (or adler32) over the bulk, which is most of what a tensor costs to check. Random corruption
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


def encode_split(
    tensor: torch.Tensor,
    codec: str = "fp32",
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[tensor_pb2.Tensor, memoryview]:
    """Encode without compression into (the message without payload and checksum, the raw payload).

    ``encode`` completes it; the activation wire sends the payload beside the message on a TCP
    stream instead, so the bulk is never copied into a protobuf and no checksum pass is made.
    """
    if codec not in CODECS:
        raise ValidationError(f"unknown codec {codec!r}; expected one of {CODECS}")
    dtype_name = DTYPE_NAMES.get(tensor.dtype)
    if dtype_name is None:
        raise ValidationError(f"cannot encode dtype {tensor.dtype}; expected one of {tuple(DTYPES.values())}")
    if codec in QUANT_CODECS and not 1 <= block_size <= MAX_BLOCK_SIZE:
        raise ValidationError(f"block_size must be in [1, {MAX_BLOCK_SIZE}], got {block_size}")

    x = tensor.detach().reshape(-1)
    scales_bytes = b""
    if codec in RAW_CODECS:
        wire = x.to(RAW_CODECS[codec]).cpu().contiguous()
        if wire.dtype == torch.bfloat16:
            wire = wire.view(torch.int16)
        payload_arr = wire.numpy()
    else:
        q, scales = quantize(x.to(torch.float32), codec, block_size)
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
    return meta, memoryview(payload_arr).cast("B")


def encode(
    tensor: torch.Tensor,
    codec: str = "fp32",
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    compress: bool = True,
) -> tensor_pb2.Tensor:
    """Encode a float32/bfloat16/float16 tensor (any device, any shape) into a whole wire message:
    payload inside (zstd when it pays), checksum set. It decodes back into the input's dtype and shape."""
    msg, payload = encode_split(tensor, codec, block_size=block_size)
    compressed = _maybe_compress(payload) if compress else None
    msg.payload = compressed if compressed is not None else payload.tobytes()
    msg.compression = "zstd" if compressed is not None else ""
    msg.checksum = payload_checksum(msg.scales, msg.payload)
    return msg


def wire_bytes(msg: tensor_pb2.Tensor) -> int:
    """Serialized size of the message: what it costs on the wire."""
    return msg.ByteSize()


# --------------------------------------------------------------------------- decode


def check_shape(shape: Sequence[int], max_numel: int) -> int:
    """The element count of ``shape``, refused (ValidationError) past ``MAX_NDIM`` dimensions, for a negative
    dimension or over ``max_numel``: checked before anything sized by a message is allocated."""
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
    numel = check_shape(shape, max_numel)

    need = payload_bytes(codec, numel)
    if msg.raw_size != need:
        raise ValidationError(f"raw_size {msg.raw_size} does not match the {need} bytes {codec} needs "
                              f"for {numel} elements")
    scales_buf = msg.scales
    if codec in QUANT_CODECS:
        block_size = msg.block_size
        if not 1 <= block_size <= MAX_BLOCK_SIZE:
            raise ValidationError(f"block_size {block_size} out of range [1, {MAX_BLOCK_SIZE}]")
        blocks = num_blocks(numel, block_size)
        if len(scales_buf) != 4 * blocks:
            raise ValidationError(f"scales hold {len(scales_buf)} bytes; {blocks} blocks need {4 * blocks}")
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
        out = dequantize(_frombuffer(payload, torch.uint8), scales, codec, msg.block_size, numel)
        if dtype != torch.float32:
            out = out.to(dtype)
    out = out.reshape(shape)
    if require_finite:
        check_finite(out)
    return out


_NUMPY_DTYPES = frozenset({torch.float32, torch.float16, torch.float64, torch.uint8, torch.int8, torch.int32,
                           torch.int64})


def native_kernels() -> ModuleType | None:
    """The native kernels (protocols/_fastcodec.c), or None where they were not built (torch does the
    same then). Looked up on every call, so that tests can take them away."""
    return _fastcodec


def native_codec() -> bool:
    """Whether the native kernels (protocols/_fastcodec.c) were built and are in use."""
    return _fastcodec is not None


_NATIVE_FINITE = {torch.float32: "finite_f32", torch.bfloat16: "finite_bf16", torch.float16: "finite_f16"}


def _native_finite(dtype: torch.dtype) -> Callable[[memoryview], bool] | None:
    name = _NATIVE_FINITE.get(dtype)
    return getattr(_fastcodec, name) if _fastcodec is not None and name is not None else None


def check_finite(t: torch.Tensor) -> None:
    """Refuse NaN/inf (ValidationError). Natively, one pass over the exponent bits. With torch, one
    reduction first (NaN and inf propagate through a sum, far cheaper than an elementwise isfinite on
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


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's storage (to receive into it, or to write it out)."""
    if t.dtype in _NUMPY_DTYPES:   # numpy's own view where it knows the dtype; the uint8 view for the rest (bf16)
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
    "ValidationError",
    "check_finite",
    "check_finite_bytes",
    "check_shape",
    "decode",
    "encode",
    "encode_split",
    "native_codec",
    "native_kernels",
    "payload_bytes",
    "payload_checksum",
    "relative_error",
    "tensor_bytes",
    "wire_bytes",
]
