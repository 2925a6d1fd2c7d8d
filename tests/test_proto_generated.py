"""The committed *_pb2*.py/.pyi modules are exactly what the .proto files generate."""

from __future__ import annotations

from pathlib import Path

import pytest

from lowband.protocols import generate


def test_generated_modules_match_protos(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    generate.generate(tmp_path)
    fresh_dir = tmp_path
    protos = generate.proto_files()
    assert protos, "no .proto files found"
    stale = []
    for proto in protos:
        for suffix in ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi"):
            name = proto.stem + suffix
            fresh = fresh_dir / name
            committed = generate.PROTO_DIR / name
            assert fresh.exists(), f"protoc did not produce {name}"
            if not committed.exists() or committed.read_bytes() != fresh.read_bytes():
                stale.append(name)
    assert not stale, f"generated modules out of date: {stale}; run `python -m lowband.protocols.generate`"


def test_generated_modules_import_and_know_the_tensor_messages() -> None:
    from lowband.protocols import node_pb2, tensor_pb2

    chunk = tensor_pb2.TensorChunk(seq=1, num_chunks=2, total_size=3, checksum=4, data=b"x")
    wrapped = node_pb2.MicrobatchChunk(chunk=chunk)
    assert node_pb2.MicrobatchChunk.FromString(wrapped.SerializeToString()).chunk == chunk
    fields = {f.name for f in tensor_pb2.Tensor.DESCRIPTOR.fields}
    assert {"dtype", "shape", "codec", "block_size", "scales", "payload", "compression", "raw_size",
            "checksum"} <= fields
