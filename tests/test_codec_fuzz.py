"""Fuzz: malformed tensor messages and chunk streams only ever raise ValidationError.

Thousands of seeded mutations of valid messages (header fields, payload and scale
bytes, serialized bytes, chunk fields), with the checksum recomputed for half of
them so the checks behind it are reached too. Every accepted message must decode
to a tensor of its declared shape within the element bound, and no case may
allocate past the bound (Python-side peak via tracemalloc, where zstd output
lives; tensor sizes are checked against max_numel before torch allocates).
"""

from __future__ import annotations

import random
import resource
import tracemalloc

import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from lowband.protocols import tensor_pb2
from lowband.protocols.chunking import ChunkAssembler, chunk_tensor
from lowband.protocols.codec import CODECS, decode, encode, payload_checksum, relative_error
from lowband.protocols.errors import ValidationError

torch.set_num_threads(1)
# protocols.codec filters this at import (it wraps immutable protobuf bytes read-only); pytest resets filters
pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")

MAX_NUMEL = 1 << 14
MAX_STREAM_BYTES = 1 << 17
CASES = 4000
# Bytes a single decode may hold beyond its output: payload + decompressed copy + scales,
# all bounded by MAX_NUMEL * 4, plus slack for interpreter noise.
PY_ALLOC_BOUND = 3 * MAX_NUMEL * 4 + (256 << 10)


def _valid_messages(rng: random.Random) -> list[tensor_pb2.Tensor]:
    out = []
    for codec_name in CODECS:
        for shape, compress in (((37,), False), ((8, 64), True), ((), False), ((0, 3), True), ((1000,), True)):
            n = 1
            for d in shape:
                n *= d
            x = torch.randn(n, generator=torch.Generator().manual_seed(rng.randrange(1 << 30))).reshape(shape)
            if compress and n:
                x[x.abs() < 0.7] = 0  # compressible, so zstd is really used
            out.append(encode(x, codec_name, block_size=rng.choice([1, 3, 64, 256]), compress=compress))
    return out


def _rand_bytes(rng: random.Random, n: int) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(n))


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    op = rng.randrange(5)
    if op == 0 and b:
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.getrandbits(8)
    elif op == 1:
        del b[rng.randrange(len(b) + 1):]
    elif op == 2:
        b += _rand_bytes(rng, rng.randint(1, 64))
    elif op == 3 and b:
        i = rng.randrange(len(b))
        b[i:i] = b[i:i + rng.randint(1, 16)]
    else:
        b = bytearray(_rand_bytes(rng, rng.randint(0, 256)))
    return bytes(b)


def _bomb(rng: random.Random) -> bytes:
    size = rng.choice([MAX_NUMEL * 8, 64 << 20])
    return zstandard.ZstdCompressor(write_content_size=rng.random() < 0.5).compress(bytes(size))


_BOMBS: dict[int, bytes] = {}


def _mutate_message(rng: random.Random, base: tensor_pb2.Tensor) -> tensor_pb2.Tensor:
    msg = tensor_pb2.Tensor()
    msg.CopyFrom(base)
    for _ in range(rng.randint(1, 3)):
        field = rng.randrange(10)
        if field == 0:
            msg.codec = rng.choice([*CODECS, "", "int3", "fp32 ", "\u00e9"])
        elif field == 1:
            msg.dtype = rng.choice(["float32", "bfloat16", "float16", "int64", "", "float64"])
        elif field == 2:
            del msg.shape[:]
            msg.shape.extend(rng.choice([
                [rng.randint(-5, 300) for _ in range(rng.randint(0, 4))],
                [2**62, 2**62],
                [-(2**63), 1],
                [1] * 40,
                [MAX_NUMEL + 1],
                [0, 2**63 - 1],
            ]))
        elif field == 3:
            msg.block_size = rng.choice([0, 1, 2, 7, 256, 2**20 + 1, 2**32 - 1])
        elif field == 4:
            msg.raw_size = rng.choice([0, 1, rng.getrandbits(16), 2**64 - 1, (msg.raw_size + 1) % 2**64])
        elif field == 5:
            msg.compression = rng.choice(["", "zstd", "gzip"])
        elif field == 6:
            msg.payload = _mutate_bytes(rng, msg.payload)
        elif field == 7:
            msg.scales = _mutate_bytes(rng, msg.scales)
        elif field == 8:
            key = rng.randrange(4)
            if key not in _BOMBS:
                _BOMBS[key] = _bomb(rng)
            msg.payload = _BOMBS[key]
            msg.compression = "zstd"
        else:
            msg.checksum = rng.getrandbits(32)
    if rng.random() < 0.6:
        msg.checksum = payload_checksum(msg.scales, msg.payload)
    return msg


def _check_decode(msg: tensor_pb2.Tensor) -> bool:
    """Decode under the bound; True when accepted. Anything but ValidationError fails the test."""
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    try:
        out = decode(msg, max_numel=MAX_NUMEL, require_finite=bool(msg.checksum & 1))
        accepted = True
    except ValidationError:
        out = None
        accepted = False
    peak = tracemalloc.get_traced_memory()[1] - before
    assert peak <= PY_ALLOC_BOUND, f"decode allocated {peak} bytes for {msg.codec} {list(msg.shape)}"
    if out is not None:
        assert out.numel() <= MAX_NUMEL
        assert tuple(out.shape) == tuple(msg.shape)
    return accepted


def test_fuzz_decode_only_raises_validation_error() -> None:
    rng = random.Random(1234)
    bases = _valid_messages(rng)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    accepted = 0
    try:
        for base in bases:
            assert _check_decode(base)
        for _ in range(CASES):
            accepted += _check_decode(_mutate_message(rng, rng.choice(bases)))
        # Raw serialized-byte mutations: whatever parses must still be decoded safely.
        for _ in range(CASES // 2):
            data = _mutate_bytes(rng, rng.choice(bases).SerializeToString())
            msg = tensor_pb2.Tensor()
            try:
                msg.ParseFromString(data)
            except Exception:  # protobuf's DecodeError: not our code path
                continue
            accepted += _check_decode(msg)
    finally:
        tracemalloc.stop()
    rss_growth_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert rss_growth_kb < 256 * 1024, f"peak RSS grew by {rss_growth_kb} kB"
    assert 0 < accepted < CASES  # the mutations both pass and fail validation: the fuzz reaches deep


def test_fuzz_chunk_streams_only_raise_validation_error() -> None:
    rng = random.Random(99)
    msgs = _valid_messages(rng)
    for _ in range(CASES // 2):
        base = rng.choice(msgs)
        chunks = chunk_tensor(base, rng.choice([16, 100, 1000]))
        op = rng.randrange(6)
        if op == 0 and len(chunks) > 1:
            i, j = rng.sample(range(len(chunks)), 2)
            chunks[i], chunks[j] = chunks[j], chunks[i]
        elif op == 1 and chunks:
            del chunks[rng.randrange(len(chunks))]
        elif op == 2:
            chunks.insert(rng.randrange(len(chunks) + 1), rng.choice(chunks))
        elif op == 3:
            c = rng.choice(chunks)
            field = rng.choice(["seq", "num_chunks", "total_size", "checksum"])
            setattr(c, field, rng.choice([0, 1, 2**32 - 1, (getattr(c, field) + 1) % 2**32]))
        elif op == 4:
            c = rng.choice(chunks)
            c.data = _mutate_bytes(rng, c.data)
        asm = ChunkAssembler(MAX_STREAM_BYTES)
        try:
            for c in chunks:
                asm.add(c)
            msg = asm.finish()
        except ValidationError:
            continue
        if op == 5:
            assert msg == base
        try:
            decode(msg, max_numel=MAX_NUMEL)
        except ValidationError:
            pass


@settings(max_examples=150, deadline=None)
@given(
    codec_name=st.sampled_from(CODECS),
    shape=st.lists(st.integers(0, 9), max_size=3),
    block_size=st.integers(1, 300),
    compress=st.booleans(),
    scale=st.floats(1e-30, 1e30),
    seed=st.integers(0, 2**31),
)
def test_property_round_trip(codec_name: str, shape: list[int], block_size: int, compress: bool,
                             scale: float, seed: int) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale
    if not torch.isfinite(x).all():
        pytest.skip("fp32 overflow in the generated input")
    y = decode(encode(x, codec_name, block_size=block_size, compress=compress), expected_shape=shape,
               require_finite=codec_name not in ("fp16", "bf16"))
    assert y.shape == x.shape and y.dtype == x.dtype
    if codec_name in ("fp32",):
        assert torch.equal(x, y)
    elif codec_name in ("int8", "int4", "fp8", "fp4") and x.numel():
        # per element, the error never exceeds the block's absmax (4-bit codes: half of it)
        assert relative_error(x, y) <= 1.0
