"""Chunked streaming of encoded tensors: reassembly accepts only the exact stream sent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

import grpc
import pytest
import torch

from lowband.protocols import tensor_pb2
from lowband.protocols.chunking import (
    ChunkAssembler,
    chunk_tensor,
    iter_chunks,
    reassemble_async,
)
from lowband.protocols.codec import decode, encode
from lowband.protocols.errors import ValidationError, invalid_argument_on_validation_error

torch.set_num_threads(1)
# protocols.codec filters this at import (it wraps immutable protobuf bytes read-only); pytest resets filters
pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")


def _tensor(n: int = 50_000) -> tensor_pb2.Tensor:
    g = torch.Generator().manual_seed(n)
    return encode(torch.randn(n, generator=g), "fp32", compress=False)


def _assemble(chunks: Iterable[tensor_pb2.TensorChunk], max_bytes: int = 1 << 30) -> tensor_pb2.Tensor:
    asm = ChunkAssembler(max_bytes)
    for c in chunks:
        asm.add(c)
    return asm.finish()


def _copy(c: tensor_pb2.TensorChunk) -> tensor_pb2.TensorChunk:
    out = tensor_pb2.TensorChunk()
    out.CopyFrom(c)
    return out


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 4096, 1000, 7])
def test_round_trip(chunk_bytes: int) -> None:
    msg = _tensor(20_000)
    chunks = chunk_tensor(msg, chunk_bytes)
    size = msg.ByteSize()
    assert len(chunks) == -(-size // chunk_bytes)
    assert all(len(c.data) <= chunk_bytes for c in chunks)
    assert _assemble(chunks) == msg


def test_default_chunk_is_one_mib_and_generator_matches_list() -> None:
    msg = _tensor(600_000)  # 2.4 MB -> 3 chunks
    chunks = chunk_tensor(msg)
    assert [len(c.data) for c in chunks[:-1]] == [1 << 20] * (len(chunks) - 1)
    assert len(chunks) == 3
    assert list(iter_chunks(msg)) == chunks


def test_empty_message_is_one_empty_chunk() -> None:
    chunks = chunk_tensor(tensor_pb2.Tensor())
    assert len(chunks) == 1 and chunks[0].data == b""
    assert _assemble(chunks) == tensor_pb2.Tensor()
    empty_tensor = encode(torch.zeros(0), "int4")
    assert decode(_assemble(chunk_tensor(empty_tensor))).shape == (0,)


def test_reordered_chunks_rejected() -> None:
    chunks = chunk_tensor(_tensor(), 10_000)
    chunks[1], chunks[2] = chunks[2], chunks[1]
    with pytest.raises(ValidationError, match="expected"):
        _assemble(chunks)


def test_stream_not_starting_at_zero_rejected() -> None:
    chunks = chunk_tensor(_tensor(), 10_000)
    with pytest.raises(ValidationError, match="starts"):
        _assemble(chunks[1:])


def test_missing_chunk_rejected() -> None:
    chunks = chunk_tensor(_tensor(), 10_000)
    with pytest.raises(ValidationError):
        _assemble(chunks[:3] + chunks[4:])
    with pytest.raises(ValidationError, match="ended after"):
        _assemble(chunks[:-1])


def test_duplicate_and_extra_chunks_rejected() -> None:
    chunks = chunk_tensor(_tensor(), 10_000)
    with pytest.raises(ValidationError, match="expected"):
        _assemble([*chunks[:2], chunks[1], *chunks[2:]])
    with pytest.raises(ValidationError, match="after"):
        _assemble([*chunks, chunks[-1]])


def test_truncated_and_padded_chunks_rejected() -> None:
    chunks = chunk_tensor(_tensor(), 10_000)
    short = _copy(chunks[-1])
    short.data = short.data[:-1]
    with pytest.raises(ValidationError, match="announced"):
        _assemble([*chunks[:-1], short])
    long = _copy(chunks[-1])
    long.data = long.data + b"x"
    with pytest.raises(ValidationError, match="exceed"):
        _assemble([*chunks[:-1], long])
    empty = _copy(chunks[2])
    empty.data = b""
    with pytest.raises(ValidationError, match="empty"):
        _assemble([*chunks[:2], empty, *chunks[3:]])


def test_bad_checksum_rejected() -> None:
    """A flipped payload bit passes reassembly (the bulk is checked once, by decode) but never decode."""
    chunks = chunk_tensor(_tensor(), 10_000)
    bad = _copy(chunks[3])
    data = bytearray(bad.data)
    data[5] ^= 1
    bad.data = bytes(data)
    with pytest.raises(ValidationError, match="checksum"):
        decode(_assemble([*chunks[:3], bad, *chunks[4:]]))


@pytest.mark.parametrize("field", ["shape", "dtype", "raw_size", "checksum"])
def test_corrupted_small_fields_rejected_by_stream_checksum(field: str) -> None:
    """The stream checksum covers the fields the codec checksum does not (and chains that checksum)."""
    msg = encode(torch.randn(4, 6), "fp32")
    good = chunk_tensor(msg, 16)
    bad_msg = tensor_pb2.Tensor()
    bad_msg.CopyFrom(msg)
    if field == "shape":
        bad_msg.shape[:] = [6, 4]          # same element count: decode alone would accept it
    elif field == "dtype":
        bad_msg.dtype = "float16"
    elif field == "raw_size":
        bad_msg.raw_size += 1
    else:
        bad_msg.checksum ^= 1
    data = bad_msg.SerializeToString()
    forged = [tensor_pb2.TensorChunk(seq=c.seq, num_chunks=c.num_chunks, total_size=len(data),
                                     checksum=good[0].checksum, data=data[c.seq * 16:(c.seq + 1) * 16])
              for c in chunk_tensor(bad_msg, 16)]
    assert len(forged) == len(good)
    with pytest.raises(ValidationError, match="checksum"):
        _assemble(forged)
    # the same bytes with the checksum the sender would have computed for them pass
    assert _assemble(chunk_tensor(bad_msg, 16)) == bad_msg


def test_single_chunk_stream_round_trip() -> None:
    msg = encode(torch.randn(3, 5), "bf16")
    chunks = chunk_tensor(msg, 1 << 20)
    assert len(chunks) == 1 and chunks[0].data == msg.SerializeToString()
    asm = ChunkAssembler()
    assert asm.add(chunks[0]) and asm.received_bytes == len(chunks[0].data)
    assert asm.finish() == msg


def test_mixed_streams_rejected() -> None:
    a = chunk_tensor(_tensor(50_000), 10_000)
    b = chunk_tensor(_tensor(50_001), 10_000)
    with pytest.raises(ValidationError, match="disagrees"):
        _assemble([a[0], b[1], *a[2:]])


def test_oversized_stream_refused_at_first_chunk() -> None:
    chunks = chunk_tensor(_tensor(), 10_000)
    asm = ChunkAssembler(max_bytes=100_000)
    with pytest.raises(ValidationError, match="exceeds"):
        asm.add(chunks[0])
    assert asm.received_bytes == 0
    lie = _copy(chunks[0])
    lie.num_chunks = lie.total_size + 1
    with pytest.raises(ValidationError, match="num_chunks"):
        ChunkAssembler().add(lie)


def test_non_tensor_payload_rejected() -> None:
    import zlib

    data = b"\xff\xff\xff\xff"
    chunk = tensor_pb2.TensorChunk(seq=0, num_chunks=1, total_size=len(data), checksum=zlib.crc32(data), data=data)
    with pytest.raises(ValidationError, match="not a Tensor"):
        _assemble([chunk])


async def _aiter(items: Iterable[object]) -> AsyncIterator[object]:
    for it in items:
        await asyncio.sleep(0)
        yield it


def test_reassemble_async_returns_at_last_chunk_and_unwraps() -> None:
    msg = _tensor()
    chunks = chunk_tensor(msg, 20_000)

    async def never_closing() -> AsyncIterator[tensor_pb2.TensorChunk]:
        for c in chunks:
            yield c
        await asyncio.Event().wait()  # a bidi stream whose sender keeps its side open

    async def scenario() -> None:
        got = await asyncio.wait_for(reassemble_async(never_closing(), 1 << 30), timeout=10)
        assert got == msg

        class Wrapper:  # e.g. node_pb2.MicrobatchChunk, whose `chunk` field is the TensorChunk
            def __init__(self, chunk: tensor_pb2.TensorChunk) -> None:
                self.chunk = chunk

        got = await reassemble_async(_aiter([Wrapper(c) for c in chunks]), get_chunk=lambda m: m.chunk)
        assert got == msg
        with pytest.raises(ValidationError, match="ended after"):
            await reassemble_async(_aiter(chunks[:-1]))
        with pytest.raises(ValidationError, match="starts"):
            await reassemble_async(_aiter(chunks[1:]))

    asyncio.run(scenario())


def test_streaming_servicer_maps_bad_stream_to_invalid_argument() -> None:
    """A real grpc.aio stream-unary call: good streams decode, bad ones get INVALID_ARGUMENT."""

    refused: list[str] = []

    @invalid_argument_on_validation_error
    async def push(request_iterator: AsyncIterator[tensor_pb2.TensorChunk],
                   context: grpc.aio.ServicerContext) -> tensor_pb2.Tensor:
        try:
            msg = await reassemble_async(request_iterator, max_bytes=1 << 20)
            return encode(decode(msg, max_numel=100_000).sum().reshape(1), "fp32")
        except ValidationError as exc:
            refused.append(str(exc))
            raise

    async def scenario() -> None:
        handler = grpc.stream_unary_rpc_method_handler(
            push, request_deserializer=tensor_pb2.TensorChunk.FromString,
            response_serializer=tensor_pb2.Tensor.SerializeToString)
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Chunks", {"Push": handler})])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.stream_unary("/test.Chunks/Push",
                                            request_serializer=tensor_pb2.TensorChunk.SerializeToString,
                                            response_deserializer=tensor_pb2.Tensor.FromString)
                x = torch.arange(10_000, dtype=torch.float32)
                reply = await call(_aiter(chunk_tensor(encode(x, "fp32"), 4096)), timeout=10)
                assert decode(reply).item() == pytest.approx(float(x.sum()))
                chunks = chunk_tensor(encode(x, "fp32"), 4096)
                for n, bad in enumerate((chunks[:-1], chunks[::-1],
                                         chunk_tensor(encode(torch.zeros(300_000), "fp32", compress=False)))):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await call(_aiter(bad), timeout=10)
                    # The server refuses at the first bad chunk; a client still writing the rest of
                    # its stream may then see its own write fail (INTERNAL) instead of the status.
                    assert info.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL)
                    assert len(refused) == n + 1  # the server mapped it to INVALID_ARGUMENT
                    if n == 0:  # nothing left to write: the client sees the server's status
                        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            await server.stop(0)

    asyncio.run(scenario())
