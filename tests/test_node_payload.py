"""A hop's outgoing message (node/pipeline/payload.py): built once, the same tensor on the wire and on gRPC;
the wire's segmented payloads and in-place receive targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowband.node.pipeline.payload import (
    OutgoingMicrobatch,
    build_microbatch,
    encode_segmented,
    receive_target,
)
from lowband.protocols import node_pb2
from lowband.protocols.chunking import ChunkAssembler
from lowband.protocols.codec import CODECS, RAW_CODECS, decode, encode, encode_split, tensor_bytes
from lowband.protocols.errors import ValidationError

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")

HEADER = node_pb2.MicrobatchHeader(run_id="r", iteration=2, microbatch=3, origin_id="o", stages=[0, 1, 0],
                                   node_ids=["o", "n", "o"], hop=1)


@pytest.mark.parametrize("name", CODECS)
def test_the_grpc_message_is_the_whole_encoding_of_what_the_wire_sends(name: str) -> None:
    x = torch.randn(3, 70)
    out = build_microbatch(HEADER, x, name, segment_bytes=64)
    assert node_pb2.MicrobatchHeader.FromString(out.header_bytes) == out.header == HEADER
    assert not out.meta.payload and not out.meta.HasField("checksum")
    assert out.meta_bytes == out.meta.SerializeToString()
    # a raw codec travels in its wire dtype (the receiver reads it in place): the same as encoding the cast
    sent = x.to(RAW_CODECS[name]) if name in RAW_CODECS else x
    whole = encode(sent, name, compress=False)
    assert out.whole().SerializeToString() == whole.SerializeToString()
    assert out.nbytes == len(out.meta_bytes) + len(whole.payload)          # what the wire carries of it
    assert not out.meta.payload and not out.meta.HasField("checksum")   # whole() leaves the metadata alone


def test_build_refuses_what_the_codec_refuses() -> None:
    with pytest.raises(ValidationError, match="codec"):
        build_microbatch(HEADER, torch.randn(2), "int3")
    with pytest.raises(ValidationError, match="dtype"):
        build_microbatch(HEADER, torch.zeros(2, dtype=torch.int64), "bf16")


def test_receive_target_only_for_raw_payloads_that_fit_the_tensor() -> None:
    x = torch.randn(2, 3, 8).to(torch.bfloat16)
    meta, payload = encode_split(x, "bf16")
    target = receive_target(meta, len(payload))
    assert target is not None and target.shape == x.shape and target.dtype == torch.bfloat16
    tensor_bytes(target)[:] = payload
    assert torch.equal(target, x)
    assert receive_target(meta, len(payload) - 2) is None               # wrong size
    assert receive_target(meta, len(payload), max_numel=10) is None     # over the bound
    assert receive_target(encode_split(x.float(), "bf16")[0], len(payload)) is None   # needs a dtype conversion
    assert receive_target(encode_split(x.float(), "fp4")[0], 24) is None             # quantized
    assert receive_target(encode(x, "bf16", compress=False), len(payload)) is None   # has a checksum to verify


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16"])
def test_segmented_payload_is_the_split_payload_of_the_cast_tensor(name: str) -> None:
    x = torch.randn(5, 333)
    meta, payload = encode_segmented(x, name, segment_bytes=1000)
    wire_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    split_meta, split_payload = encode_split(x.to(wire_dtype), name)
    assert meta.SerializeToString() == split_meta.SerializeToString()
    segments = list(payload.segments())
    assert len(segments) == -(-len(payload) // (1000 // wire_dtype.itemsize * wire_dtype.itemsize))
    assert b"".join(bytes(s) for s in segments) == bytes(split_payload) == bytes(payload)
    assert len(payload) == len(split_payload)
    decoded = decode(OutgoingMicrobatch(HEADER, b"", meta, meta.SerializeToString(), payload).whole())
    assert decoded.dtype == wire_dtype and torch.equal(decoded, x.to(wire_dtype))
    # cast into a transport's reused scratch: the same bytes, written into the scratch (a raw fp32
    # payload is its source's own memory: nothing to cast, nothing copied)
    scratch = bytearray(b"\xab" * (len(payload) + 16))
    in_scratch = list(payload.segments(scratch))
    assert b"".join(bytes(s) for s in in_scratch) == bytes(split_payload)
    home = x.numpy() if name == "fp32" else np.frombuffer(scratch, dtype=np.uint8)
    assert all(np.shares_memory(np.asarray(s), home) for s in in_scratch)
    assert scratch[len(payload):] == b"\xab" * 16          # nothing written past the payload
    with pytest.raises(ValueError, match="scratch"):
        next(payload.segments(bytearray(len(payload) - 1)))
    # a short first segment (sent with the frame head), then the usual ones from where it ended
    step = 1000 // wire_dtype.itemsize * wire_dtype.itemsize
    for first in (1, 64, 999, 5000, 10**6):
        sizes = [len(s) for s in payload.segments(scratch, first_bytes=first)]
        head = min(step, max(wire_dtype.itemsize, first // wire_dtype.itemsize * wire_dtype.itemsize))
        rest = len(payload) - head
        assert sizes == [head] + [step] * (rest // step) + ([rest % step] if rest % step else [])
        assert b"".join(bytes(s) for s in payload.segments(scratch, first_bytes=first)) == bytes(split_payload)
    _, empty = encode_segmented(torch.empty(0), name)
    assert list(empty.segments(first_bytes=64)) == []


def test_segmented_encoding_refuses_quantized_codecs() -> None:
    with pytest.raises(ValidationError, match="raw codec"):
        encode_segmented(torch.randn(4), "fp4")


def test_the_grpc_stream_carries_the_whole_message_in_chunks_with_the_header_first() -> None:
    x = torch.randn(4, 16, 64)
    out = build_microbatch(HEADER, x, "fp32")
    requests, nbytes = out.grpc_stream(chunk_bytes=4096)
    requests = list(requests)
    assert len(requests) == 5 and requests[0].header == HEADER
    assert not any(r.HasField("header") for r in requests[1:])
    assembler = ChunkAssembler()
    assert [assembler.add(r.chunk) for r in requests] == [False] * 4 + [True]
    whole = assembler.finish()
    assert nbytes == whole.ByteSize() == sum(len(r.chunk.data) for r in requests)
    torch.testing.assert_close(decode(whole), x, rtol=0, atol=0)   # checksummed: decode requires it
