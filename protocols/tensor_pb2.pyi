from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "codec", "block_size", "scales", "payload", "compression", "raw_size", "checksum", "subspace")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    RAW_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    SUBSPACE_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    codec: str
    block_size: int
    scales: bytes
    payload: bytes
    compression: str
    raw_size: int
    checksum: int
    subspace: SubspaceCoding
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., codec: _Optional[str] = ..., block_size: _Optional[int] = ..., scales: _Optional[bytes] = ..., payload: _Optional[bytes] = ..., compression: _Optional[str] = ..., raw_size: _Optional[int] = ..., checksum: _Optional[int] = ..., subspace: _Optional[_Union[SubspaceCoding, _Mapping]] = ...) -> None: ...

class SubspaceCoding(_message.Message):
    __slots__ = ("fingerprint", "dim", "tokens", "token_bytes")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_BYTES_FIELD_NUMBER: _ClassVar[int]
    fingerprint: int
    dim: int
    tokens: bytes
    token_bytes: int
    def __init__(self, fingerprint: _Optional[int] = ..., dim: _Optional[int] = ..., tokens: _Optional[bytes] = ..., token_bytes: _Optional[int] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("seq", "num_chunks", "total_size", "checksum", "data")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    seq: int
    num_chunks: int
    total_size: int
    checksum: int
    data: bytes
    def __init__(self, seq: _Optional[int] = ..., num_chunks: _Optional[int] = ..., total_size: _Optional[int] = ..., checksum: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...
