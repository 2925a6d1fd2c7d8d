"""What a pipeline hop puts on the wire per sequence position, from the configuration alone.

Torch-free, so the coordinator's planner can charge each link the bytes the configured codec really
sends (``protocols/subspace.py`` and ``protocols/quant.py`` say why the sizes are what they are).
"""

from __future__ import annotations

SUBSPACE_PREFIX = "subspace-"
# bytes per value of each codec; the quantised ones add one float32 scale per block of 256 values
VALUE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "fp8": 1.0, "int4": 0.5, "fp4": 0.5}
SCALE_BYTES_PER_VALUE = {"int8": 4 / 256, "fp8": 4 / 256, "int4": 4 / 256, "fp4": 4 / 256}


def is_subspace(codec: str) -> bool:
    return codec.startswith(SUBSPACE_PREFIX)


def inner_codec(codec: str) -> str:
    """The codec the values travel in (``subspace-int8`` -> ``int8``); a plain codec is its own."""
    return codec[len(SUBSPACE_PREFIX):] if is_subspace(codec) else codec


def token_bytes(vocab_size: int) -> int:
    """Bytes per token id on the wire (little-endian unsigned)."""
    return 1 if vocab_size <= 1 << 8 else 2 if vocab_size <= 1 << 16 else 4


def hop_bytes_per_position(codec: str, dim: int, subspace_rank: int, vocab_size: int, *, forward: bool) -> float:
    """Payload bytes one hop sends per (sequence, position) in ``codec``: ``dim`` values, or for a subspace
    codec ``subspace_rank`` coordinates plus, forward, the token id."""
    inner = inner_codec(codec)
    if inner not in VALUE_BYTES:
        raise ValueError(f"unknown hop codec {codec!r}")
    per_value = VALUE_BYTES[inner] + SCALE_BYTES_PER_VALUE.get(inner, 0.0)
    if not is_subspace(codec):
        return dim * per_value
    return subspace_rank * per_value + (token_bytes(vocab_size) if forward else 0)
