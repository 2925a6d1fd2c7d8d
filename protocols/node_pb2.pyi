from lowband.protocols import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeAck(_message.Message):
    __slots__ = ("ok", "message")
    OK_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    message: str
    def __init__(self, ok: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class MicrobatchHeader(_message.Message):
    __slots__ = ("run_id", "iteration", "microbatch", "origin_id", "stages", "node_ids", "hop", "epoch", "evaluate")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    MICROBATCH_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_ID_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    NODE_IDS_FIELD_NUMBER: _ClassVar[int]
    HOP_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    iteration: int
    microbatch: int
    origin_id: str
    stages: _containers.RepeatedScalarFieldContainer[int]
    node_ids: _containers.RepeatedScalarFieldContainer[str]
    hop: int
    epoch: int
    evaluate: bool
    def __init__(self, run_id: _Optional[str] = ..., iteration: _Optional[int] = ..., microbatch: _Optional[int] = ..., origin_id: _Optional[str] = ..., stages: _Optional[_Iterable[int]] = ..., node_ids: _Optional[_Iterable[str]] = ..., hop: _Optional[int] = ..., epoch: _Optional[int] = ..., evaluate: _Optional[bool] = ...) -> None: ...

class MicrobatchChunk(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: MicrobatchHeader
    chunk: _tensor_pb2.TensorChunk
    def __init__(self, header: _Optional[_Union[MicrobatchHeader, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class AbandonRequest(_message.Message):
    __slots__ = ("run_id", "iteration", "microbatch", "origin_id", "reason", "open_iteration")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    MICROBATCH_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    OPEN_ITERATION_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    iteration: int
    microbatch: int
    origin_id: str
    reason: str
    open_iteration: int
    def __init__(self, run_id: _Optional[str] = ..., iteration: _Optional[int] = ..., microbatch: _Optional[int] = ..., origin_id: _Optional[str] = ..., reason: _Optional[str] = ..., open_iteration: _Optional[int] = ...) -> None: ...

class IterationStatusRequest(_message.Message):
    __slots__ = ("run_id", "iteration", "node_id")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    iteration: int
    node_id: str
    def __init__(self, run_id: _Optional[str] = ..., iteration: _Optional[int] = ..., node_id: _Optional[str] = ...) -> None: ...

class IterationStatusReply(_message.Message):
    __slots__ = ("finished", "open_iteration")
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    OPEN_ITERATION_FIELD_NUMBER: _ClassVar[int]
    finished: bool
    open_iteration: int
    def __init__(self, finished: _Optional[bool] = ..., open_iteration: _Optional[int] = ...) -> None: ...

class ShardHeader(_message.Message):
    __slots__ = ("round_id", "stage", "fragment", "shard_index", "num_shards", "sender_id", "outer_step", "abstain", "total_numel")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    FRAGMENT_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    OUTER_STEP_FIELD_NUMBER: _ClassVar[int]
    ABSTAIN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_NUMEL_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    stage: int
    fragment: int
    shard_index: int
    num_shards: int
    sender_id: str
    outer_step: int
    abstain: bool
    total_numel: int
    def __init__(self, round_id: _Optional[int] = ..., stage: _Optional[int] = ..., fragment: _Optional[int] = ..., shard_index: _Optional[int] = ..., num_shards: _Optional[int] = ..., sender_id: _Optional[str] = ..., outer_step: _Optional[int] = ..., abstain: _Optional[bool] = ..., total_numel: _Optional[int] = ...) -> None: ...

class ShardChunk(_message.Message):
    __slots__ = ("header", "chunk", "contributors", "refused")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    header: ShardHeader
    chunk: _tensor_pb2.TensorChunk
    contributors: int
    refused: str
    def __init__(self, header: _Optional[_Union[ShardHeader, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ..., contributors: _Optional[int] = ..., refused: _Optional[str] = ...) -> None: ...

class StateRequest(_message.Message):
    __slots__ = ("stage", "parts", "requester_id")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_ID_FIELD_NUMBER: _ClassVar[int]
    stage: int
    parts: _containers.RepeatedScalarFieldContainer[str]
    requester_id: str
    def __init__(self, stage: _Optional[int] = ..., parts: _Optional[_Iterable[str]] = ..., requester_id: _Optional[str] = ...) -> None: ...

class StateChunk(_message.Message):
    __slots__ = ("part", "name", "chunk", "inner_step", "outer_step", "grad_norm")
    PART_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    INNER_STEP_FIELD_NUMBER: _ClassVar[int]
    OUTER_STEP_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    part: str
    name: str
    chunk: _tensor_pb2.TensorChunk
    inner_step: int
    outer_step: int
    grad_norm: float
    def __init__(self, part: _Optional[str] = ..., name: _Optional[str] = ..., chunk: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ..., inner_step: _Optional[int] = ..., outer_step: _Optional[int] = ..., grad_norm: _Optional[float] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ("sent_at", "padding")
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    sent_at: float
    padding: bytes
    def __init__(self, sent_at: _Optional[float] = ..., padding: _Optional[bytes] = ...) -> None: ...

class PingReply(_message.Message):
    __slots__ = ("sent_at", "node_id", "stage", "wire_port", "outer_steps")
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    WIRE_PORT_FIELD_NUMBER: _ClassVar[int]
    OUTER_STEPS_FIELD_NUMBER: _ClassVar[int]
    sent_at: float
    node_id: str
    stage: int
    wire_port: int
    outer_steps: int
    def __init__(self, sent_at: _Optional[float] = ..., node_id: _Optional[str] = ..., stage: _Optional[int] = ..., wire_port: _Optional[int] = ..., outer_steps: _Optional[int] = ...) -> None: ...
