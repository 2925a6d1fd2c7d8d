from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Ack(_message.Message):
    __slots__ = ("ok", "message")
    OK_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    message: str
    def __init__(self, ok: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class PeerInfo(_message.Message):
    __slots__ = ("node_id", "address", "stage", "sync_maddrs")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SYNC_MADDRS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    stage: int
    sync_maddrs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., stage: _Optional[int] = ..., sync_maddrs: _Optional[_Iterable[str]] = ...) -> None: ...

class NodeMetrics(_message.Message):
    __slots__ = ("step", "loss", "tokens_per_s", "bytes_sent", "bytes_received", "grad_norm", "outer_step", "sync_bytes_sent", "activation_bytes_sent", "val_loss", "tokens", "state_bytes_sent", "rejected_updates", "heartbeat_rtt_s", "control_bytes_sent", "rejected_peers", "last_rejection")
    class RejectedPeersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    OUTER_STEP_FIELD_NUMBER: _ClassVar[int]
    SYNC_BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    VAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    REJECTED_UPDATES_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_RTT_S_FIELD_NUMBER: _ClassVar[int]
    CONTROL_BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    REJECTED_PEERS_FIELD_NUMBER: _ClassVar[int]
    LAST_REJECTION_FIELD_NUMBER: _ClassVar[int]
    step: int
    loss: float
    tokens_per_s: float
    bytes_sent: int
    bytes_received: int
    grad_norm: float
    outer_step: int
    sync_bytes_sent: int
    activation_bytes_sent: int
    val_loss: float
    tokens: int
    state_bytes_sent: int
    rejected_updates: int
    heartbeat_rtt_s: float
    control_bytes_sent: int
    rejected_peers: _containers.ScalarMap[str, int]
    last_rejection: str
    def __init__(self, step: _Optional[int] = ..., loss: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ..., grad_norm: _Optional[float] = ..., outer_step: _Optional[int] = ..., sync_bytes_sent: _Optional[int] = ..., activation_bytes_sent: _Optional[int] = ..., val_loss: _Optional[float] = ..., tokens: _Optional[int] = ..., state_bytes_sent: _Optional[int] = ..., rejected_updates: _Optional[int] = ..., heartbeat_rtt_s: _Optional[float] = ..., control_bytes_sent: _Optional[int] = ..., rejected_peers: _Optional[_Mapping[str, int]] = ..., last_rejection: _Optional[str] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("node_id", "address", "device", "memory_bytes", "throughput", "version", "stage", "has_data", "preferred_stage", "secret", "tokenizer_sha256", "stored_stages")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    HAS_DATA_FIELD_NUMBER: _ClassVar[int]
    PREFERRED_STAGE_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_SHA256_FIELD_NUMBER: _ClassVar[int]
    STORED_STAGES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    device: str
    memory_bytes: int
    throughput: float
    version: str
    stage: int
    has_data: bool
    preferred_stage: int
    secret: bytes
    tokenizer_sha256: str
    stored_stages: _containers.RepeatedCompositeFieldContainer[StoredStage]
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., device: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., throughput: _Optional[float] = ..., version: _Optional[str] = ..., stage: _Optional[int] = ..., has_data: _Optional[bool] = ..., preferred_stage: _Optional[int] = ..., secret: _Optional[bytes] = ..., tokenizer_sha256: _Optional[str] = ..., stored_stages: _Optional[_Iterable[_Union[StoredStage, _Mapping]]] = ...) -> None: ...

class StoredStage(_message.Message):
    __slots__ = ("stage", "outer_step", "inner_step", "fingerprint")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    OUTER_STEP_FIELD_NUMBER: _ClassVar[int]
    INNER_STEP_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    stage: int
    outer_step: int
    inner_step: int
    fingerprint: str
    def __init__(self, stage: _Optional[int] = ..., outer_step: _Optional[int] = ..., inner_step: _Optional[int] = ..., fingerprint: _Optional[str] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("node_id", "stage", "run_config_json", "epoch", "heartbeat_interval_s", "lease_s", "origin_index", "num_origins", "instruction", "tokenizer_sha256", "tokenizer_json")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    RUN_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    LEASE_S_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_ORIGINS_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_SHA256_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    stage: int
    run_config_json: str
    epoch: int
    heartbeat_interval_s: float
    lease_s: float
    origin_index: int
    num_origins: int
    instruction: Instruction
    tokenizer_sha256: str
    tokenizer_json: str
    def __init__(self, node_id: _Optional[str] = ..., stage: _Optional[int] = ..., run_config_json: _Optional[str] = ..., epoch: _Optional[int] = ..., heartbeat_interval_s: _Optional[float] = ..., lease_s: _Optional[float] = ..., origin_index: _Optional[int] = ..., num_origins: _Optional[int] = ..., instruction: _Optional[_Union[Instruction, _Mapping]] = ..., tokenizer_sha256: _Optional[str] = ..., tokenizer_json: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "metrics", "epoch")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    metrics: NodeMetrics
    epoch: int
    def __init__(self, node_id: _Optional[str] = ..., metrics: _Optional[_Union[NodeMetrics, _Mapping]] = ..., epoch: _Optional[int] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("epoch", "instruction")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    instruction: Instruction
    def __init__(self, epoch: _Optional[int] = ..., instruction: _Optional[_Union[Instruction, _Mapping]] = ...) -> None: ...

class Instruction(_message.Message):
    __slots__ = ("kind", "stage", "recovery")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        NONE: _ClassVar[Instruction.Kind]
        RELOAD_SCHEDULE: _ClassVar[Instruction.Kind]
        CHANGE_STAGE: _ClassVar[Instruction.Kind]
        RECOVER: _ClassVar[Instruction.Kind]
        REJOIN: _ClassVar[Instruction.Kind]
        SHUTDOWN: _ClassVar[Instruction.Kind]
    NONE: Instruction.Kind
    RELOAD_SCHEDULE: Instruction.Kind
    CHANGE_STAGE: Instruction.Kind
    RECOVER: Instruction.Kind
    REJOIN: Instruction.Kind
    SHUTDOWN: Instruction.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    RECOVERY_FIELD_NUMBER: _ClassVar[int]
    kind: Instruction.Kind
    stage: int
    recovery: RecoveryPlan
    def __init__(self, kind: _Optional[_Union[Instruction.Kind, str]] = ..., stage: _Optional[int] = ..., recovery: _Optional[_Union[RecoveryPlan, _Mapping]] = ...) -> None: ...

class RecoveryPlan(_message.Message):
    __slots__ = ("stage", "method", "sources", "weights", "lr_scale", "plan_id")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    LR_SCALE_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    stage: int
    method: str
    sources: _containers.RepeatedCompositeFieldContainer[PeerInfo]
    weights: _containers.RepeatedScalarFieldContainer[float]
    lr_scale: float
    plan_id: int
    def __init__(self, stage: _Optional[int] = ..., method: _Optional[str] = ..., sources: _Optional[_Iterable[_Union[PeerInfo, _Mapping]]] = ..., weights: _Optional[_Iterable[float]] = ..., lr_scale: _Optional[float] = ..., plan_id: _Optional[int] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("node_id", "reason", "metrics")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    reason: str
    metrics: NodeMetrics
    def __init__(self, node_id: _Optional[str] = ..., reason: _Optional[str] = ..., metrics: _Optional[_Union[NodeMetrics, _Mapping]] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ("ok",)
    OK_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    def __init__(self, ok: _Optional[bool] = ...) -> None: ...

class ScheduleRequest(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    def __init__(self, node_id: _Optional[str] = ...) -> None: ...

class Path(_message.Message):
    __slots__ = ("microbatch", "stages", "node_ids")
    MICROBATCH_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    NODE_IDS_FIELD_NUMBER: _ClassVar[int]
    microbatch: int
    stages: _containers.RepeatedScalarFieldContainer[int]
    node_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, microbatch: _Optional[int] = ..., stages: _Optional[_Iterable[int]] = ..., node_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ScheduleReply(_message.Message):
    __slots__ = ("epoch", "paths", "peers", "visits", "stage", "origin_index", "num_origins")
    class VisitsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PATHS_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    VISITS_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_ORIGINS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    paths: _containers.RepeatedCompositeFieldContainer[Path]
    peers: _containers.RepeatedCompositeFieldContainer[PeerInfo]
    visits: _containers.ScalarMap[str, int]
    stage: int
    origin_index: int
    num_origins: int
    def __init__(self, epoch: _Optional[int] = ..., paths: _Optional[_Iterable[_Union[Path, _Mapping]]] = ..., peers: _Optional[_Iterable[_Union[PeerInfo, _Mapping]]] = ..., visits: _Optional[_Mapping[str, int]] = ..., stage: _Optional[int] = ..., origin_index: _Optional[int] = ..., num_origins: _Optional[int] = ...) -> None: ...

class SyncRoundRequest(_message.Message):
    __slots__ = ("node_id", "stage", "fragment", "outer_step", "sync_maddrs")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    FRAGMENT_FIELD_NUMBER: _ClassVar[int]
    OUTER_STEP_FIELD_NUMBER: _ClassVar[int]
    SYNC_MADDRS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    stage: int
    fragment: int
    outer_step: int
    sync_maddrs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_id: _Optional[str] = ..., stage: _Optional[int] = ..., fragment: _Optional[int] = ..., outer_step: _Optional[int] = ..., sync_maddrs: _Optional[_Iterable[str]] = ...) -> None: ...

class SyncRoundReply(_message.Message):
    __slots__ = ("round_id", "participants", "ready", "retry_after_s", "abandoned", "reason", "outer_step", "adopt_outer_step")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    ABANDONED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    OUTER_STEP_FIELD_NUMBER: _ClassVar[int]
    ADOPT_OUTER_STEP_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    participants: _containers.RepeatedCompositeFieldContainer[PeerInfo]
    ready: bool
    retry_after_s: float
    abandoned: bool
    reason: str
    outer_step: int
    adopt_outer_step: int
    def __init__(self, round_id: _Optional[int] = ..., participants: _Optional[_Iterable[_Union[PeerInfo, _Mapping]]] = ..., ready: _Optional[bool] = ..., retry_after_s: _Optional[float] = ..., abandoned: _Optional[bool] = ..., reason: _Optional[str] = ..., outer_step: _Optional[int] = ..., adopt_outer_step: _Optional[int] = ...) -> None: ...

class FailureReport(_message.Message):
    __slots__ = ("reporter_id", "suspect_id", "reason")
    REPORTER_ID_FIELD_NUMBER: _ClassVar[int]
    SUSPECT_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    reporter_id: str
    suspect_id: str
    reason: str
    def __init__(self, reporter_id: _Optional[str] = ..., suspect_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class LinkMeasurement(_message.Message):
    __slots__ = ("peer_id", "rtt_s", "bandwidth_bytes_per_s")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    RTT_S_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    rtt_s: float
    bandwidth_bytes_per_s: float
    def __init__(self, peer_id: _Optional[str] = ..., rtt_s: _Optional[float] = ..., bandwidth_bytes_per_s: _Optional[float] = ...) -> None: ...

class LinkReport(_message.Message):
    __slots__ = ("node_id", "links")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    links: _containers.RepeatedCompositeFieldContainer[LinkMeasurement]
    def __init__(self, node_id: _Optional[str] = ..., links: _Optional[_Iterable[_Union[LinkMeasurement, _Mapping]]] = ...) -> None: ...

class RecoveryReport(_message.Message):
    __slots__ = ("node_id", "plan_id", "success", "message")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_ID_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    plan_id: int
    success: bool
    message: str
    def __init__(self, node_id: _Optional[str] = ..., plan_id: _Optional[int] = ..., success: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("max_events", "document", "tokenizer")
    MAX_EVENTS_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    max_events: int
    document: bool
    tokenizer: bool
    def __init__(self, max_events: _Optional[int] = ..., document: _Optional[bool] = ..., tokenizer: _Optional[bool] = ...) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("node_id", "address", "stage", "state", "heartbeat_age_s", "metrics", "throughput", "device", "has_data", "memory_bytes")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_AGE_S_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    HAS_DATA_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    stage: int
    state: str
    heartbeat_age_s: float
    metrics: NodeMetrics
    throughput: float
    device: str
    has_data: bool
    memory_bytes: int
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., stage: _Optional[int] = ..., state: _Optional[str] = ..., heartbeat_age_s: _Optional[float] = ..., metrics: _Optional[_Union[NodeMetrics, _Mapping]] = ..., throughput: _Optional[float] = ..., device: _Optional[str] = ..., has_data: _Optional[bool] = ..., memory_bytes: _Optional[int] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("time", "kind", "node_id", "stage", "detail")
    TIME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    time: float
    kind: str
    node_id: str
    stage: int
    detail: str
    def __init__(self, time: _Optional[float] = ..., kind: _Optional[str] = ..., node_id: _Optional[str] = ..., stage: _Optional[int] = ..., detail: _Optional[str] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("epoch", "nodes", "stage_coverage", "outer_step", "events", "run_config_json", "status_json", "tokenizer_json")
    class StageCoverageEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    STAGE_COVERAGE_FIELD_NUMBER: _ClassVar[int]
    OUTER_STEP_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    RUN_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    STATUS_JSON_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    stage_coverage: _containers.ScalarMap[int, int]
    outer_step: int
    events: _containers.RepeatedCompositeFieldContainer[Event]
    run_config_json: str
    status_json: str
    tokenizer_json: str
    def __init__(self, epoch: _Optional[int] = ..., nodes: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ..., stage_coverage: _Optional[_Mapping[int, int]] = ..., outer_step: _Optional[int] = ..., events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., run_config_json: _Optional[str] = ..., status_json: _Optional[str] = ..., tokenizer_json: _Optional[str] = ...) -> None: ...
