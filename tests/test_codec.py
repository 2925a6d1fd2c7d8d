"""Round trips, error bounds, ratios and validation of protocols.codec."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
import zstandard

from lowband.protocols import codec, tensor_pb2
from lowband.protocols.codec import (
    CODECS,
    check_finite,
    decode,
    encode,
    encode_split,
    payload_checksum,
    relative_error,
    wire_bytes,
)
from lowband.protocols.errors import ValidationError, abort_invalid, invalid_argument_on_validation_error

torch.set_num_threads(1)
# protocols.codec filters this at import (it wraps immutable protobuf bytes read-only); pytest resets filters
pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")

# Relative L2 error bounds on standard-normal data, block 256. Derivations:
# int8 step absmax/127 with absmax ~3 sigma -> ~0.7%; fp8 e4m3 has 3 mantissa bits -> ~2.5%;
# int4 step absmax/7 -> ~12%; fp4 (powers of two only) -> ~20%. Bounds leave headroom.
ERROR_BOUNDS = {"fp32": 0.0, "bf16": 4e-3, "fp16": 5e-4, "int8": 0.01, "fp8": 0.04, "int4": 0.15, "fp4": 0.25}
# Encoded bytes / fp32 bytes without zstd, scales included (block 256 -> +4/256/4 per value).
RATIO_BOUNDS = {"fp32": 1.0, "bf16": 0.5, "fp16": 0.5, "int8": 0.26, "fp8": 0.26, "int4": 0.135, "fp4": 0.135}


def _normal(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g)


def _reencode_checksum(msg: tensor_pb2.Tensor) -> None:
    msg.checksum = payload_checksum(msg.scales, msg.payload)


@pytest.mark.parametrize("name", CODECS)
def test_round_trip_error_and_ratio(name: str) -> None:
    x = _normal(64 * 1024).reshape(256, 256)
    msg = encode(x, name, compress=False)
    y = decode(msg)
    assert y.shape == x.shape and y.dtype == x.dtype
    err = relative_error(x, y)
    assert err <= ERROR_BOUNDS[name], f"{name}: rel error {err:.4f}"
    ratio = wire_bytes(msg) / (x.numel() * 4)
    assert ratio <= RATIO_BOUNDS[name] + 0.002, f"{name}: ratio {ratio:.4f}"  # + protobuf framing


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (1,), (7,), (257,), (3, 5, 7), (2, 1000)])
def test_shapes_including_scalar_empty_and_odd(name: str, shape: tuple[int, ...]) -> None:
    n = 1
    for d in shape:
        n *= d
    x = _normal(n, seed=n).reshape(shape) if n else torch.zeros(shape)
    msg = encode(x, name, block_size=64)
    y = decode(msg)
    assert y.shape == x.shape
    if n:
        assert relative_error(x, y) <= ERROR_BOUNDS[name] * 1.6 + 1e-6  # tiny tensors: fewer samples


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_keep_their_dtype(name: str, dtype: torch.dtype) -> None:
    x = _normal(3001).to(dtype)
    y = decode(encode(x, name))
    assert y.dtype == dtype
    assert relative_error(x.float(), y.float()) <= max(ERROR_BOUNDS[name], 4e-3) * 1.2


@pytest.mark.parametrize("name", CODECS)
def test_zstd_on_and_off_decode_the_same(name: str) -> None:
    x = _normal(20000).reshape(100, 200)
    x[x.abs() < 0.5] = 0.0  # compressible: many zeros
    on, off = encode(x, name, compress=True), encode(x, name, compress=False)
    assert off.compression == ""
    assert on.compression == "zstd"
    assert wire_bytes(on) < wire_bytes(off)
    torch.testing.assert_close(decode(on), decode(off), rtol=0, atol=0)


def test_zstd_skipped_when_it_does_not_shrink() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-(2**31), 2**31 - 1, (4096,), generator=g, dtype=torch.int32).view(torch.float32)
    x = torch.nan_to_num(x)  # random bits: incompressible
    msg = encode(x, "fp32", compress=True)
    assert msg.compression == ""
    torch.testing.assert_close(decode(msg), x, rtol=0, atol=0, equal_nan=True)


def test_zstd_skipped_when_saving_is_below_threshold() -> None:
    # int8 codes of Gaussian data save only ~7% under zstd: not worth the CPU time.
    msg = encode(_normal(1 << 17), "int8", compress=True)
    assert msg.compression == ""
    raw = encode(_normal(1 << 17), "int4", compress=True)  # 4-bit codes of Gaussian data save ~18%
    assert raw.compression == "zstd"
    assert len(raw.payload) <= (1 - codec.ZSTD_MIN_SAVING) * raw.raw_size


def test_block_scales_isolate_outliers() -> None:
    x = _normal(256 * 64)
    x[5] = 1e4  # one outlier ruins only its own block
    y = decode(encode(x, "int8", compress=False))
    assert relative_error(x[256:], y[256:]) < 0.01


def test_zero_and_tiny_blocks_decode_to_finite() -> None:
    x = torch.zeros(1024)
    x[600] = 1e-44  # subnormal: the inverse scale overflows
    for name in codec.QUANT_CODECS:
        y = decode(encode(x, name), require_finite=True)
        assert torch.all(y[:512] == 0)
        assert torch.all((y - x).abs() <= 1e-43)


@pytest.mark.parametrize("name", codec.QUANT_CODECS)
def test_encode_refuses_non_finite_for_quantized_codecs(name: str) -> None:
    x = _normal(100)
    x[3] = float("nan")
    with pytest.raises(ValidationError, match="non-finite"):
        encode(x, name)


def test_fp4_codes_are_signed_powers_of_two_of_the_block_scale() -> None:
    x = torch.tensor([1.0, -0.5, 0.3, 0.24, 2.0**-6, 2.0**-8, 0.0, -1.0])
    y = decode(encode(x, "fp4", block_size=8, compress=False))
    expected = torch.tensor([1.0, -0.5, 0.25, 0.25, 2.0**-6, 0.0, 0.0, -1.0])
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_int4_packs_two_values_per_byte() -> None:
    for n in (1, 2, 255, 256, 257):
        msg = encode(_normal(n), "int4", block_size=128, compress=False)
        assert len(msg.payload) == (n + 1) // 2
        assert len(msg.scales) == 4 * ((n + 127) // 128)


@pytest.mark.parametrize("name", ["fp32", "int8", "fp4"])
def test_encode_accepts_non_contiguous_and_grad_tensors(name: str) -> None:
    base = _normal(64 * 48).reshape(64, 48).requires_grad_(True)
    x = base.t()[::2]  # non-contiguous view of a leaf that requires grad
    y = decode(encode(x, name, block_size=32))
    assert y.shape == x.shape and not y.requires_grad
    assert relative_error(x, y) <= ERROR_BOUNDS[name] * 1.6


def test_encode_rejects_bad_arguments() -> None:
    with pytest.raises(ValidationError, match="codec"):
        encode(torch.zeros(3), "int3")
    with pytest.raises(ValidationError, match="dtype"):
        encode(torch.zeros(3, dtype=torch.int64), "fp32")
    with pytest.raises(ValidationError, match="block_size"):
        encode(torch.zeros(3), "int8", block_size=0)


# ----------------------------------------------------------------- validation of hostile messages


def _msg(name: str = "int8", n: int = 1000, compress: bool = False) -> tensor_pb2.Tensor:
    return encode(_normal(n).reshape(10, n // 10), name, block_size=64, compress=compress)


def test_decode_rejects_wrong_shape_and_numel_bound() -> None:
    msg = _msg()
    with pytest.raises(ValidationError, match="expected"):
        decode(msg, expected_shape=(100, 10))
    assert decode(msg, expected_shape=(10, 100)).shape == (10, 100)
    with pytest.raises(ValidationError, match="bound"):
        decode(msg, max_numel=999)
    huge = tensor_pb2.Tensor()
    huge.CopyFrom(msg)
    del huge.shape[:]
    huge.shape.extend([2**31, 2**31, 2**31])
    with pytest.raises(ValidationError, match="bound"):
        decode(huge)
    neg = tensor_pb2.Tensor()
    neg.CopyFrom(msg)
    neg.shape[0] = -10
    with pytest.raises(ValidationError, match="negative"):
        decode(neg)


@pytest.mark.parametrize("field,value,match", [
    ("codec", "int3", "codec"),
    ("dtype", "int64", "dtype"),
    ("compression", "lz4", "compression"),
    ("block_size", 0, "block_size"),
    ("block_size", 32, "scales"),
    ("raw_size", 999, "raw_size"),
])
def test_decode_rejects_bad_header_fields(field: str, value: object, match: str) -> None:
    msg = _msg()
    setattr(msg, field, value)
    with pytest.raises(ValidationError, match=match):
        decode(msg)


def test_decode_rejects_truncated_payload_and_scales() -> None:
    msg = _msg()
    msg.payload = msg.payload[:-1]
    _reencode_checksum(msg)
    with pytest.raises(ValidationError, match="payload"):
        decode(msg)
    msg = _msg()
    msg.scales = msg.scales[:-4]
    _reencode_checksum(msg)
    with pytest.raises(ValidationError, match="scales"):
        decode(msg)
    raw = _msg("fp32")
    raw.scales = b"\0\0\0\0"
    _reencode_checksum(raw)
    with pytest.raises(ValidationError, match="scales"):
        decode(raw)


def test_decode_rejects_bad_checksum() -> None:
    msg = _msg()
    payload = bytearray(msg.payload)
    payload[10] ^= 0x40
    msg.payload = bytes(payload)
    with pytest.raises(ValidationError, match="checksum"):
        decode(msg)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -1.0])
def test_decode_rejects_bad_scales(scale: float) -> None:
    msg = _msg()
    msg.scales = torch.full((len(msg.scales) // 4,), scale).numpy().tobytes()
    _reencode_checksum(msg)
    with pytest.raises(ValidationError, match="scales"):
        decode(msg)


def test_require_finite() -> None:
    x = _normal(100)
    x[7] = float("inf")
    for name in ("fp32", "bf16", "fp16"):
        msg = encode(x, name)
        assert not torch.isfinite(decode(msg)).all()
        with pytest.raises(ValidationError, match="non-finite"):
            decode(msg, require_finite=True)
    fp8 = encode(_normal(100), "fp8", compress=False)
    payload = bytearray(fp8.payload)
    payload[0] = 0x7F  # e4m3fn NaN code
    fp8.payload = bytes(payload)
    _reencode_checksum(fp8)
    with pytest.raises(ValidationError, match="non-finite"):
        decode(fp8, require_finite=True)


def _zstd_msg(frame: bytes, numel: int) -> tensor_pb2.Tensor:
    msg = tensor_pb2.Tensor(dtype="float32", shape=[numel], codec="fp32", payload=frame,
                            compression="zstd", raw_size=4 * numel)
    _reencode_checksum(msg)
    return msg


def test_decompression_bombs_are_refused() -> None:
    # A frame that truthfully holds 64 MiB of zeros, sent as a 1000-element tensor.
    bomb = zstandard.ZstdCompressor(level=3).compress(bytes(64 << 20))
    with pytest.raises(ValidationError, match="claims"):
        decode(_zstd_msg(bomb, 1000))
    # The same without a content size in the header: decompression stops at raw_size.
    quiet = zstandard.ZstdCompressor(level=3, write_content_size=False).compress(bytes(64 << 20))
    with pytest.raises(ValidationError, match="zstd"):
        decode(_zstd_msg(quiet, 1000))
    # A frame with the right size plus trailing data, and plain garbage.
    ok = zstandard.ZstdCompressor().compress(bytes(4000))
    with pytest.raises(ValidationError, match="zstd"):
        decode(_zstd_msg(ok + b"junk", 1000))
    with pytest.raises(ValidationError, match="zstd"):
        decode(_zstd_msg(b"\x28\xb5\x2f\xfdgarbage", 1000))
    assert torch.all(decode(_zstd_msg(ok, 1000)) == 0)


def test_decode_rejects_non_tensor_messages() -> None:
    with pytest.raises(ValidationError):
        decode(tensor_pb2.TensorChunk())  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        decode(tensor_pb2.Tensor())  # empty codec


# ----------------------------------------------------------------- grpc mapping


def test_validation_error_maps_to_invalid_argument() -> None:
    class Servicer:
        @invalid_argument_on_validation_error
        async def Decode(self, request: tensor_pb2.Tensor, context: grpc.aio.ServicerContext) -> tensor_pb2.Tensor:
            y = decode(request, max_numel=100)
            return encode(y * 2, "fp32")

        async def Manual(self, request: tensor_pb2.Tensor, context: grpc.aio.ServicerContext) -> tensor_pb2.Tensor:
            try:
                decode(request)
            except ValidationError as exc:
                await abort_invalid(context, exc)
            return request

    async def scenario() -> None:
        svc = Servicer()
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                getattr(svc, name),
                request_deserializer=tensor_pb2.Tensor.FromString,
                response_serializer=tensor_pb2.Tensor.SerializeToString,
            )
            for name in ("Decode", "Manual")
        }
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Codec", handlers)])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                calls = {
                    name: channel.unary_unary(f"/test.Codec/{name}",
                                              request_serializer=tensor_pb2.Tensor.SerializeToString,
                                              response_deserializer=tensor_pb2.Tensor.FromString)
                    for name in ("Decode", "Manual")
                }
                good = await calls["Decode"](encode(torch.ones(10), "int8"), timeout=10)
                assert torch.allclose(decode(good), torch.full((10,), 2.0))
                for name, req in (("Decode", encode(torch.ones(101), "int8")), ("Manual", tensor_pb2.Tensor())):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await calls[name](req, timeout=10)
                    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            await server.stop(0)

    asyncio.run(scenario())


def _reference_sums(buf: bytes) -> tuple[int, int, int]:
    """Fletcher sums over little-endian 64-bit words, written plainly (no numpy, no blocks)."""
    padded = buf + b"\0" * (-len(buf) % 8)
    words = [int.from_bytes(padded[i:i + 8], "little") for i in range(0, len(padded), 8)]
    mask = (1 << 64) - 1
    return sum(words) & mask, sum((i + 1) * w for i, w in enumerate(words)) & mask, len(buf)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000, (1 << 19) + 3, (1 << 20) + 13])
def test_payload_checksum_matches_plain_fletcher_sums(n: int) -> None:
    import struct
    import zlib

    from lowband.protocols.codec import _word_sums

    rng = torch.Generator().manual_seed(n)
    buf = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=rng).numpy().tobytes()
    assert _word_sums(buf) == _reference_sums(buf)   # crosses the 512 KiB block boundary for the large n
    scales = buf[: n // 3]
    expected = zlib.crc32(struct.pack("<6Q", *_reference_sums(scales), *_reference_sums(buf)))
    assert payload_checksum(scales, buf) == expected


def test_payload_checksum_detects_flips_swaps_length_and_boundary_changes() -> None:
    rng = torch.Generator().manual_seed(5)
    buf = torch.randint(0, 256, (4099,), dtype=torch.uint8, generator=rng).numpy().tobytes()
    base = payload_checksum(b"", buf)
    for pos in [0, 1, 7, 8, 63, 2048, 4095, 4096, 4098]:          # includes the ragged tail
        for bit in range(8):
            flipped = bytearray(buf)
            flipped[pos] ^= 1 << bit
            assert payload_checksum(b"", bytes(flipped)) != base
    swapped = bytearray(buf)
    swapped[0:8], swapped[800:808] = buf[800:808], buf[0:8]        # two whole words exchanged
    assert buf[0:8] != buf[800:808] and payload_checksum(b"", bytes(swapped)) != base
    assert payload_checksum(b"", buf + b"\0") != base              # zero padding is not invisible
    assert payload_checksum(b"", buf[:-1]) != base
    assert payload_checksum(buf[:8], buf[8:]) != base              # bytes moved from payload to scales


# --------------------------------------------------------------------------- split messages (activation wire)


def test_a_payload_beside_the_message_decodes_and_the_checksum_rules_hold() -> None:
    x = torch.randn(4, 16)
    meta, payload = encode_split(x, "fp32")
    torch.testing.assert_close(decode(meta, payload=payload, require_checksum=False), x, rtol=0, atol=0)
    with pytest.raises(ValidationError, match="no checksum"):
        decode(meta, payload=payload)                       # gRPC paths require one
    whole = encode(x, "fp32", compress=False)
    with pytest.raises(ValidationError, match="both inside and beside"):
        decode(whole, payload=payload, require_checksum=False)
    corrupted = bytearray(payload)
    corrupted[5] ^= 1
    meta.checksum = whole.checksum                          # a checksum present is always verified
    with pytest.raises(ValidationError, match="checksum"):
        decode(meta, payload=corrupted, require_checksum=False)


def test_check_finite_catches_what_an_overflowing_sum_would_hide() -> None:
    big = torch.full((4,), 3e38)              # finite values whose sum overflows
    check_finite(big)
    with pytest.raises(ValidationError, match="non-finite"):
        check_finite(torch.tensor([1.0, float("nan")]))
    check_finite(torch.empty(0))
