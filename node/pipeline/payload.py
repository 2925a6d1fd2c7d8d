"""A hop's outgoing message, built once for the activation wire and its gRPC fallback, and the
zero-copy helpers of the wire's payloads.

``build_microbatch`` is the one place a microbatch's message is made: the serialized header, the
tensor's metadata (a ``Tensor`` without payload or checksum) and the payload beside it. The wire
sends those three as they are (``node/pipeline/wire.py``); the gRPC fallback streams
``OutgoingMicrobatch.whole()``, the same message with the payload inside and its checksum (what
``codec.encode(compress=False)`` gives), in chunks (``grpc_stream``). A raw codec's payload is a
``SegmentedPayload``: cast to its wire dtype as the transport writes it, into a buffer the
connection reuses. On the receiving side ``receive_spec`` says whether a payload can be read
straight into the tensor.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lowband.protocols import node_pb2, tensor_pb2
from lowband.protocols.chunking import iter_chunks
from lowband.protocols.codec import (
    DEFAULT_MAX_NUMEL,
    DTYPE_NAMES,
    DTYPES,
    RAW_CODECS,
    check_shape,
    encode_split,
    native_kernels,
    payload_checksum,
    tensor_bytes,
)
from lowband.protocols.errors import ValidationError
from lowband.protocols.subspace import SubspaceBasis, inner_codec, is_subspace

# A segmented payload is cast in pieces of this many wire bytes: one piece for an activation of the usual
# sizes (every cast-and-write round has a fixed cost; benchmarks/pipeline.md, third session); past this
# size the receiver's reads and checks of the first pieces overlap the cast of the later ones.
SEGMENT_BYTES = 4 << 20


@dataclass(slots=True)   # not frozen: one is made per hop, and a frozen dataclass's __init__ pays per field
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
        kernels = native_kernels()
        if kernels is not None and self.source.dtype == torch.float32 and self.wire_dtype == torch.bfloat16:
            # byte views made once, sliced per segment: a torch view per segment costs more than a
            # 64 KiB segment's cast
            source = tensor_bytes(self.source)
            for start, stop in edges:
                piece = wire[2 * start:2 * stop]
                kernels.cast_f32_to_bf16(source[4 * start:4 * stop], piece)
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
    """``codec.encode_split`` for a raw codec, with the cast to the wire dtype deferred to ``segments()``.

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
    if DTYPE_NAMES.get(source.dtype) is None:
        raise ValidationError(f"cannot encode dtype {source.dtype}; expected one of {tuple(DTYPES.values())}")
    numel = source.numel()
    nbytes = numel * wire_dtype.itemsize
    msg = tensor_pb2.Tensor(dtype=DTYPE_NAMES[wire_dtype], shape=shape, codec=codec, raw_size=nbytes)
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
        numel = check_shape(msg.shape, max_numel)
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

WirePayload = bytes | memoryview | SegmentedPayload


@dataclass(slots=True)
class OutgoingMicrobatch:
    """One hop's message as ``build_microbatch`` made it: the three parts the wire sends as they are, and
    the gRPC fallback's stream of the same message (``grpc_stream``)."""

    header: node_pb2.MicrobatchHeader
    header_bytes: bytes           # ``header`` serialized
    meta: tensor_pb2.Tensor       # the tensor's message without payload and checksum
    meta_bytes: bytes             # ``meta`` serialized
    payload: WirePayload

    @property
    def nbytes(self) -> int:
        """The tensor's bytes on the wire (metadata and payload; the header is not counted, as on gRPC)."""
        return len(self.meta_bytes) + len(self.payload)

    def whole(self) -> tensor_pb2.Tensor:
        """The tensor as one message, payload inside and checksummed (for gRPC, where no TCP stream of
        our own stands in for the codec checksum); ``meta`` is left as it is."""
        msg = tensor_pb2.Tensor()
        msg.CopyFrom(self.meta)
        msg.payload = bytes(self.payload)
        msg.checksum = payload_checksum(msg.scales, msg.payload)
        return msg

    def grpc_stream(self, chunk_bytes: int) -> tuple[Iterator[node_pb2.MicrobatchChunk], int]:
        """The requests of a Forward/Backward call (the whole message in ``chunk_bytes`` chunks, the header
        on the first) and the tensor's bytes they carry. The message is serialized once; chunks are
        sliced from it as the call asks for them."""
        whole = self.whole()
        data = whole.SerializeToString()
        chunks = iter_chunks(whole, chunk_bytes, data=data)

        def requests() -> Iterator[node_pb2.MicrobatchChunk]:
            yield node_pb2.MicrobatchChunk(header=self.header, chunk=next(chunks))
            for chunk in chunks:
                yield node_pb2.MicrobatchChunk(chunk=chunk)

        return requests(), len(data)


def build_microbatch(header: node_pb2.MicrobatchHeader, tensor: torch.Tensor, codec: str, *,
                     subspace: SubspaceBasis | None = None, backward: bool = False,
                     segment_bytes: int = SEGMENT_BYTES) -> OutgoingMicrobatch:
    """A hop's message: ``header`` and ``tensor`` in ``codec``, uncompressed (no zstd pass on the hop).
    A raw codec decodes into its wire dtype (the receiver reads it in place) and is cast as the bytes go
    out; a quantised one is encoded here. A ``subspace-*`` codec sends the tensor's coordinates in
    ``subspace`` (the stage's basis) in its inner codec, and for an activation (not ``backward``) the
    token ids its anchors spell. Raises ValidationError for a codec or dtype the codec refuses, and for
    a subspace codec without a basis or an activation not of the basis' layout."""
    coding = None
    if is_subspace(codec):
        if subspace is None:
            raise ValidationError(f"codec {codec!r} needs a subspace model (model.subspace_rank > 0)")
        coding = subspace.describe(tensor, with_tokens=not backward)
        tensor, codec = subspace.coordinates(tensor), inner_codec(codec)
    if codec in RAW_CODECS:
        meta, payload = encode_segmented(tensor, codec, segment_bytes=segment_bytes)
    else:
        meta, payload = encode_split(tensor, codec)
    if coding is not None:
        meta.subspace.CopyFrom(coding)
    return OutgoingMicrobatch(header, header.SerializeToString(), meta, meta.SerializeToString(), payload)


def lift_received(meta: tensor_pb2.Tensor, decoded: torch.Tensor, subspace: SubspaceBasis | None) -> torch.Tensor:
    """The tensor a received message stands for: ``decoded`` itself, or for a subspace payload its
    coordinates lifted by the receiving stage's basis. Raises ValidationError for a subspace payload at a
    stage without one, or one its basis cannot rebuild (``SubspaceBasis.receive``)."""
    if not meta.HasField("subspace"):
        return decoded
    if subspace is None:
        raise ValidationError("subspace payload at a stage whose model has no subspace (model.subspace_rank = 0)")
    return subspace.receive(decoded, meta.subspace)


__all__ = [
    "SEGMENT_BYTES",
    "OutgoingMicrobatch",
    "SegmentedPayload",
    "WirePayload",
    "build_microbatch",
    "encode_segmented",
    "lift_received",
    "receive_spec",
    "receive_target",
]
