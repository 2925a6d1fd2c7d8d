"""The native codec kernels (protocols/_fastcodec.c) against torch, and the torch fallback without them."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from lowband.node.pipeline.payload import encode_segmented
from lowband.protocols import codec
from lowband.protocols.codec import check_finite, check_finite_bytes, tensor_bytes
from lowband.protocols.errors import ValidationError

torch.set_num_threads(1)

native_only = pytest.mark.skipif(not codec.native_codec(), reason="protocols._fastcodec was not built")
REQUIRE_NATIVE = os.environ.get("LOWBAND_REQUIRE_NATIVE") == "1"


def test_the_native_codec_was_built_where_it_is_required() -> None:
    """CI sets LOWBAND_REQUIRE_NATIVE=1: there, a failed build of the optional extension is a failure,
    not a skip of every native test below."""
    if not REQUIRE_NATIVE:
        pytest.skip("LOWBAND_REQUIRE_NATIVE is not set: the torch fallback is allowed")
    assert codec.native_codec(), "protocols/_fastcodec.c was not built (see the pip install's output)"
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(params=["native", "torch"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Each test runs with the native kernels (where built) and with the torch fallback."""
    if request.param == "native" and not codec.native_codec():
        pytest.skip("protocols._fastcodec was not built")
    if request.param == "torch":
        monkeypatch.setattr(codec, "_fastcodec", None)
    yield request.param


def _awkward_floats() -> torch.Tensor:
    """Values where a cast to bf16 can go wrong: ties either way, denormals, the edges of the range,
    signed zeros, infinities, NaNs, plus random bit patterns."""
    ties = torch.randint(0, 1 << 31, (4096,), generator=torch.Generator().manual_seed(1), dtype=torch.int64)
    ties = ((ties & ~0xFFFF) | 0x8000).to(torch.int32)                      # exactly halfway: round to even
    near = ((ties.to(torch.int64) & ~0xFFFF) | 0x7FFF).to(torch.int32)      # just below halfway
    patterns = torch.randint(-(1 << 31), 1 << 31, (8191,), generator=torch.Generator().manual_seed(2),
                             dtype=torch.int64).to(torch.int32)             # odd length: a vector tail
    special = torch.tensor([0.0, -0.0, 1e-40, -1e-45, 1.1754942e-38, 3.4028235e38, -3.4028235e38, 3.3961776e38,
                            float("inf"), -float("inf"), float("nan"), 1.0, -2.5], dtype=torch.float32)
    return torch.cat([ties.view(torch.float32), near.view(torch.float32), patterns.view(torch.float32), special])


def test_cast_to_bf16_is_bit_exact_with_torch(backend: str) -> None:
    x = _awkward_floats()
    _, payload = encode_segmented(x, "bf16", segment_bytes=4096)   # as the wire casts it: in pieces, into scratch
    scratch = bytearray(len(payload))
    cast = b"".join(bytes(s) for s in payload.segments(scratch, first_bytes=1000))
    out = torch.frombuffer(bytearray(cast), dtype=torch.bfloat16)
    expected = x.to(torch.bfloat16)
    nan = torch.isnan(expected)
    assert torch.isnan(out[nan]).all()
    assert torch.equal(out[~nan].view(torch.int16), expected[~nan].view(torch.int16))


def test_segmented_payload_casts_the_same_bytes_with_and_without_the_kernels(monkeypatch: pytest.MonkeyPatch
                                                                            ) -> None:
    x = torch.randn(3, 1001)
    _, payload = encode_segmented(x, "bf16", segment_bytes=2048)
    scratch = bytearray(len(payload))
    first = b"".join(bytes(s) for s in payload.segments(scratch))
    fresh = bytes(payload)                      # no scratch: each segment cast into new memory
    monkeypatch.setattr(codec, "_fastcodec", None)
    assert first == fresh == b"".join(bytes(s) for s in payload.segments(scratch)) == bytes(payload)
    assert first == x.to(torch.bfloat16).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("where", [0, 517, -1])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_value_anywhere_is_refused(backend: str, dtype: torch.dtype, where: int, bad: float) -> None:
    t = torch.randn(1031).to(dtype)
    check_finite(t)
    check_finite_bytes(tensor_bytes(t), dtype)
    t[where] = bad
    with pytest.raises(ValidationError, match="non-finite"):
        check_finite(t)
    with pytest.raises(ValidationError, match="non-finite"):
        check_finite_bytes(tensor_bytes(t), dtype)
    # a slice before the bad value is still accepted: the receiver checks what has arrived so far
    stop = (where % t.numel()) * t.element_size()
    check_finite_bytes(tensor_bytes(t)[:stop], dtype)


@pytest.mark.parametrize("dtype", FLOATS)
def test_extremes_that_are_finite_pass(backend: str, dtype: torch.dtype) -> None:
    info = torch.finfo(dtype)
    t = torch.tensor([info.max, -info.max, info.tiny, info.tiny / 4, -0.0, 0.0], dtype=dtype)
    check_finite(t)
    check_finite_bytes(tensor_bytes(t), dtype)
    check_finite(torch.empty(0, dtype=dtype))
    check_finite_bytes(memoryview(b""), dtype)
    check_finite(torch.randn(8, 8).t().to(dtype))           # not contiguous: the torch path
    check_finite(torch.randn(16, requires_grad=True))       # a leaf that needs grad


@native_only
def test_kernels_refuse_buffers_that_do_not_hold_whole_aligned_elements() -> None:
    from lowband.protocols import _fastcodec

    x = torch.randn(64)
    raw = tensor_bytes(x)
    out = torch.empty(64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="aligned"):
        _fastcodec.finite_f32(raw[:7])
    with pytest.raises(ValueError, match="aligned"):
        _fastcodec.finite_bf16(raw[1:9])
    with pytest.raises(ValueError, match="needs"):
        _fastcodec.cast_f32_to_bf16(raw, tensor_bytes(out)[:100])
    with pytest.raises(TypeError):
        _fastcodec.cast_f32_to_bf16(raw, bytes(128))           # the destination must be writable
    assert _fastcodec.finite_f32(raw) is True
