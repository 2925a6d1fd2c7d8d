"""Stream one encoded Tensor over a gRPC streaming call as ordered TensorChunks.

The sender serializes the Tensor once and cuts it into `chunk_bytes` slices; every
chunk repeats the chunk count, total size and stream checksum, so the receiver
can bound its buffer from the first chunk and reject a stream that is reordered,
short, long, mixed with another stream, or corrupted. Reassembly raises only
ValidationError. Messages stay well under ``lowband.protocols.rpc.MAX_MESSAGE_BYTES``.

One checksum pass over the bulk bytes per side, not two: the Tensor already
carries the checksum of its scales and payload (``Tensor.checksum``, see
``codec.payload_checksum``, verified by ``codec.decode``), so the stream checksum
is the crc32 of the Tensor's *other* fields chained onto it
(``crc32(header_bytes, Tensor.checksum)``). Every byte of the reassembled message
is then covered: the small fields by ``finish()``, the bulk by ``decode`` (the only
way a Tensor is used).
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterable, Callable, Iterator
from typing import Any

from google.protobuf.message import DecodeError

from lowband.protocols import tensor_pb2
from lowband.protocols.errors import ValidationError

DEFAULT_CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 4 << 20          # half of rpc.MAX_MESSAGE_BYTES: room for headers
DEFAULT_MAX_BYTES = 1 << 30        # largest serialized Tensor a receiver accepts by default


def stream_checksum(msg: tensor_pb2.Tensor) -> int:
    """crc32 of the Tensor's fields other than scales and payload, chained onto ``msg.checksum``
    (the codec's checksum of those two): covers the whole message at the cost of a few hundred bytes."""
    head = tensor_pb2.Tensor()
    head.CopyFrom(msg)
    head.ClearField("scales")
    head.ClearField("payload")
    return zlib.crc32(head.SerializeToString(deterministic=True), msg.checksum)


def iter_chunks(msg: tensor_pb2.Tensor, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                data: bytes | None = None) -> Iterator[tensor_pb2.TensorChunk]:
    """Yield the chunks of `msg` in order (at least one, even for an empty message).

    `data` is ``msg.SerializeToString()`` when the caller already has it (serialize once).
    """
    if not 1 <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be in [1, {MAX_CHUNK_BYTES}], got {chunk_bytes}")
    if data is None:
        data = msg.SerializeToString()
    total = len(data)
    num_chunks = max(1, -(-total // chunk_bytes))
    checksum = stream_checksum(msg)
    if num_chunks == 1:   # no slicing copy
        yield tensor_pb2.TensorChunk(seq=0, num_chunks=1, total_size=total, checksum=checksum, data=data)
        return
    view = memoryview(data)
    for seq in range(num_chunks):
        yield tensor_pb2.TensorChunk(
            seq=seq,
            num_chunks=num_chunks,
            total_size=total,
            checksum=checksum,
            data=bytes(view[seq * chunk_bytes:(seq + 1) * chunk_bytes]),
        )


def chunk_tensor(msg: tensor_pb2.Tensor, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[tensor_pb2.TensorChunk]:
    """All chunks of `msg`, in order."""
    return list(iter_chunks(msg, chunk_bytes))


class ChunkAssembler:
    """Reassembles one Tensor from its chunks, validating as they arrive.

    `max_bytes` bounds the serialized Tensor: a stream announcing more is refused
    at its first chunk, before anything is buffered.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._buf = bytearray()  # grows with what arrived, never with what was announced
        self._single: bytes | None = None   # a one-chunk stream's data, kept without a copy
        self._count = 0
        self._num_chunks = 0
        self._total = 0
        self._checksum = 0
        self._finished = False

    @property
    def complete(self) -> bool:
        """True once every announced chunk has arrived."""
        return self._num_chunks > 0 and self._count == self._num_chunks

    @property
    def received_bytes(self) -> int:
        return len(self._buf) + (len(self._single) if self._single is not None else 0)

    def add(self, chunk: tensor_pb2.TensorChunk) -> bool:
        """Take the next chunk; returns True when it was the last one."""
        if not isinstance(chunk, tensor_pb2.TensorChunk):
            raise ValidationError(f"expected a lowband.TensorChunk, got {type(chunk).__name__}")
        if self._finished or self.complete:
            raise ValidationError(f"chunk {chunk.seq} arrived after the stream's last chunk")
        seq = self._count
        if seq == 0:
            if chunk.seq != 0:
                raise ValidationError(f"stream starts at chunk {chunk.seq}, expected 0")
            if chunk.total_size > self.max_bytes:
                raise ValidationError(f"tensor of {chunk.total_size} bytes exceeds the {self.max_bytes}-byte bound")
            # every chunk but an empty message's only one carries at least one byte
            max_chunks = max(1, chunk.total_size)
            if not 1 <= chunk.num_chunks <= max_chunks:
                raise ValidationError(f"num_chunks {chunk.num_chunks} is impossible for {chunk.total_size} bytes")
            self._num_chunks = chunk.num_chunks
            self._total = chunk.total_size
            self._checksum = chunk.checksum
        else:
            if chunk.seq != seq:
                raise ValidationError(f"chunk {chunk.seq} arrived where chunk {seq} was expected "
                                      "(reordered, duplicated or missing)")
            if (chunk.num_chunks, chunk.total_size, chunk.checksum) != (self._num_chunks, self._total, self._checksum):
                raise ValidationError(f"chunk {seq} disagrees with the stream header (mixed streams?)")
        data = chunk.data
        if not data and self._total > 0:
            raise ValidationError(f"chunk {seq} is empty")
        if len(self._buf) + len(data) > self._total:
            raise ValidationError(f"chunks exceed the announced {self._total} bytes")
        if self._num_chunks == 1:
            self._single = data
        else:
            self._buf += data
        self._count += 1
        return self.complete

    def finish(self) -> tensor_pb2.Tensor:
        """The reassembled Tensor message (decode it with protocols.codec.decode)."""
        if self._finished:
            raise ValidationError("assembler already finished")
        if not self.complete:
            raise ValidationError(f"stream ended after {self._count} of {self._num_chunks or '?'} chunks")
        data: bytes | bytearray = self._single if self._single is not None else self._buf
        if len(data) != self._total:
            raise ValidationError(f"stream carried {len(data)} bytes; {self._total} were announced")
        self._buf, self._single = bytearray(), None
        self._finished = True
        msg = tensor_pb2.Tensor()
        try:
            msg.ParseFromString(data)
        except DecodeError as exc:
            raise ValidationError(f"reassembled bytes are not a Tensor message: {exc}") from exc
        # the bulk (scales, payload) is verified against msg.checksum by codec.decode
        if stream_checksum(msg) != self._checksum:
            raise ValidationError("stream checksum mismatch: data corrupted")
        return msg


async def reassemble_async(
    chunks: AsyncIterable[Any],
    max_bytes: int = DEFAULT_MAX_BYTES,
    *,
    get_chunk: Callable[[Any], tensor_pb2.TensorChunk] | None = None,
) -> tensor_pb2.Tensor:
    """Read one Tensor from an async iterable of chunks (e.g. a grpc.aio request iterator).

    Returns as soon as the last chunk arrives, without waiting for the stream to
    close (so a bidirectional call can answer on the same stream). `get_chunk`
    extracts the TensorChunk from wrapper messages (e.g. ``lambda m: m.chunk``).
    """
    assembler = ChunkAssembler(max_bytes)
    async for item in chunks:
        chunk = get_chunk(item) if get_chunk is not None else item
        if assembler.add(chunk):
            return assembler.finish()
    return assembler.finish()  # raises: the stream ended early


__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_MAX_BYTES",
    "ChunkAssembler",
    "chunk_tensor",
    "iter_chunks",
    "reassemble_async",
    "stream_checksum",
]
