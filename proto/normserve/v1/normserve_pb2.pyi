import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]

class NormKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NORM_KIND_UNSPECIFIED: _ClassVar[NormKind]
    NORM_KIND_BATCH_NORM: _ClassVar[NormKind]
    NORM_KIND_LAYER_NORM: _ClassVar[NormKind]
    NORM_KIND_GROUP_NORM: _ClassVar[NormKind]
    NORM_KIND_INSTANCE_NORM: _ClassVar[NormKind]
    NORM_KIND_RMS_NORM: _ClassVar[NormKind]
    NORM_KIND_BATCH_RENORM: _ClassVar[NormKind]
    NORM_KIND_GHOST_BATCH_NORM: _ClassVar[NormKind]
    NORM_KIND_RECURRENT_BATCH_NORM: _ClassVar[NormKind]

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_UNSPECIFIED: _ClassVar[Mode]
    MODE_TRAIN: _ClassVar[Mode]
    MODE_EVAL: _ClassVar[Mode]
    MODE_CALIBRATE: _ClassVar[Mode]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT64: DType
DTYPE_INT64: DType
NORM_KIND_UNSPECIFIED: NormKind
NORM_KIND_BATCH_NORM: NormKind
NORM_KIND_LAYER_NORM: NormKind
NORM_KIND_GROUP_NORM: NormKind
NORM_KIND_INSTANCE_NORM: NormKind
NORM_KIND_RMS_NORM: NormKind
NORM_KIND_BATCH_RENORM: NormKind
NORM_KIND_GHOST_BATCH_NORM: NormKind
NORM_KIND_RECURRENT_BATCH_NORM: NormKind
MODE_UNSPECIFIED: Mode
MODE_TRAIN: Mode
MODE_EVAL: Mode
MODE_CALIBRATE: Mode

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class NamedTensor(_message.Message):
    __slots__ = ("name", "tensor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    tensor: Tensor
    def __init__(self, name: _Optional[str] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class SessionConfig(_message.Message):
    __slots__ = ("kind", "num_features", "eps", "momentum", "affine", "track_running_stats", "initial_weight", "initial_bias", "device", "allow_non_finite", "ttl_seconds", "normalized_shape", "num_groups", "bias", "renorm", "ghost_batch_size", "time_steps", "sync")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NUM_FEATURES_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    AFFINE_FIELD_NUMBER: _ClassVar[int]
    TRACK_RUNNING_STATS_FIELD_NUMBER: _ClassVar[int]
    INITIAL_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    INITIAL_BIAS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    ALLOW_NON_FINITE_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_SHAPE_FIELD_NUMBER: _ClassVar[int]
    NUM_GROUPS_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    RENORM_FIELD_NUMBER: _ClassVar[int]
    GHOST_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    TIME_STEPS_FIELD_NUMBER: _ClassVar[int]
    SYNC_FIELD_NUMBER: _ClassVar[int]
    kind: NormKind
    num_features: int
    eps: float
    momentum: float
    affine: bool
    track_running_stats: bool
    initial_weight: Tensor
    initial_bias: Tensor
    device: str
    allow_non_finite: bool
    ttl_seconds: float
    normalized_shape: _containers.RepeatedScalarFieldContainer[int]
    num_groups: int
    bias: bool
    renorm: BatchRenormConfig
    ghost_batch_size: int
    time_steps: int
    sync: SyncGroup
    def __init__(self, kind: _Optional[_Union[NormKind, str]] = ..., num_features: _Optional[int] = ..., eps: _Optional[float] = ..., momentum: _Optional[float] = ..., affine: _Optional[bool] = ..., track_running_stats: _Optional[bool] = ..., initial_weight: _Optional[_Union[Tensor, _Mapping]] = ..., initial_bias: _Optional[_Union[Tensor, _Mapping]] = ..., device: _Optional[str] = ..., allow_non_finite: _Optional[bool] = ..., ttl_seconds: _Optional[float] = ..., normalized_shape: _Optional[_Iterable[int]] = ..., num_groups: _Optional[int] = ..., bias: _Optional[bool] = ..., renorm: _Optional[_Union[BatchRenormConfig, _Mapping]] = ..., ghost_batch_size: _Optional[int] = ..., time_steps: _Optional[int] = ..., sync: _Optional[_Union[SyncGroup, _Mapping]] = ...) -> None: ...

class Adaptation(_message.Message):
    __slots__ = ("batch_weight", "accumulate")
    BATCH_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    ACCUMULATE_FIELD_NUMBER: _ClassVar[int]
    batch_weight: float
    accumulate: bool
    def __init__(self, batch_weight: _Optional[float] = ..., accumulate: _Optional[bool] = ...) -> None: ...

class CalibrationStatus(_message.Message):
    __slots__ = ("batches", "samples", "start_time")
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    batches: int
    samples: int
    start_time: _timestamp_pb2.Timestamp
    def __init__(self, batches: _Optional[int] = ..., samples: _Optional[int] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class AdaptedStatistics(_message.Message):
    __slots__ = ("batches", "mean", "var")
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    VAR_FIELD_NUMBER: _ClassVar[int]
    batches: int
    mean: Tensor
    var: Tensor
    def __init__(self, batches: _Optional[int] = ..., mean: _Optional[_Union[Tensor, _Mapping]] = ..., var: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class SyncGroup(_message.Message):
    __slots__ = ("participants", "timeout_seconds")
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    participants: int
    timeout_seconds: float
    def __init__(self, participants: _Optional[int] = ..., timeout_seconds: _Optional[float] = ...) -> None: ...

class SyncStep(_message.Message):
    __slots__ = ("rank", "step")
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    rank: int
    step: int
    def __init__(self, rank: _Optional[int] = ..., step: _Optional[int] = ...) -> None: ...

class BatchRenormConfig(_message.Message):
    __slots__ = ("rmax", "dmax", "rmax_warmup_steps", "dmax_warmup_steps")
    RMAX_FIELD_NUMBER: _ClassVar[int]
    DMAX_FIELD_NUMBER: _ClassVar[int]
    RMAX_WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    DMAX_WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    rmax: float
    dmax: float
    rmax_warmup_steps: int
    dmax_warmup_steps: int
    def __init__(self, rmax: _Optional[float] = ..., dmax: _Optional[float] = ..., rmax_warmup_steps: _Optional[int] = ..., dmax_warmup_steps: _Optional[int] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("session_id", "config", "device", "version", "num_batches_tracked", "running_mean", "running_var", "weight", "bias", "create_time", "update_time", "expire_time", "frozen", "calibration", "adapted")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_BATCHES_TRACKED_FIELD_NUMBER: _ClassVar[int]
    RUNNING_MEAN_FIELD_NUMBER: _ClassVar[int]
    RUNNING_VAR_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    FROZEN_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    ADAPTED_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    config: SessionConfig
    device: str
    version: int
    num_batches_tracked: int
    running_mean: Tensor
    running_var: Tensor
    weight: Tensor
    bias: Tensor
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    expire_time: _timestamp_pb2.Timestamp
    frozen: bool
    calibration: CalibrationStatus
    adapted: AdaptedStatistics
    def __init__(self, session_id: _Optional[str] = ..., config: _Optional[_Union[SessionConfig, _Mapping]] = ..., device: _Optional[str] = ..., version: _Optional[int] = ..., num_batches_tracked: _Optional[int] = ..., running_mean: _Optional[_Union[Tensor, _Mapping]] = ..., running_var: _Optional[_Union[Tensor, _Mapping]] = ..., weight: _Optional[_Union[Tensor, _Mapping]] = ..., bias: _Optional[_Union[Tensor, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., frozen: _Optional[bool] = ..., calibration: _Optional[_Union[CalibrationStatus, _Mapping]] = ..., adapted: _Optional[_Union[AdaptedStatistics, _Mapping]] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("session_id", "config")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    config: SessionConfig
    def __init__(self, session_id: _Optional[str] = ..., config: _Optional[_Union[SessionConfig, _Mapping]] = ...) -> None: ...

class CreateSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id", "omit_tensors")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OMIT_TENSORS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    omit_tensors: bool
    def __init__(self, session_id: _Optional[str] = ..., omit_tensors: _Optional[bool] = ...) -> None: ...

class GetSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions", "next_page_token")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[Session]
    next_page_token: str
    def __init__(self, sessions: _Optional[_Iterable[_Union[Session, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class DeleteSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ResetSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class ExportStateRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ExportStateResponse(_message.Message):
    __slots__ = ("entries", "version")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    version: int
    def __init__(self, entries: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., version: _Optional[int] = ...) -> None: ...

class ImportStateRequest(_message.Message):
    __slots__ = ("session_id", "entries", "strict")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    STRICT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    entries: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    strict: bool
    def __init__(self, session_id: _Optional[str] = ..., entries: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., strict: _Optional[bool] = ...) -> None: ...

class ImportStateResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class NormalizeRequest(_message.Message):
    __slots__ = ("session_id", "mode", "input", "statistics_only", "idempotency_key", "time_step", "sync", "adaptation")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    STATISTICS_ONLY_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    TIME_STEP_FIELD_NUMBER: _ClassVar[int]
    SYNC_FIELD_NUMBER: _ClassVar[int]
    ADAPTATION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    mode: Mode
    input: Tensor
    statistics_only: bool
    idempotency_key: str
    time_step: int
    sync: SyncStep
    adaptation: Adaptation
    def __init__(self, session_id: _Optional[str] = ..., mode: _Optional[_Union[Mode, str]] = ..., input: _Optional[_Union[Tensor, _Mapping]] = ..., statistics_only: _Optional[bool] = ..., idempotency_key: _Optional[str] = ..., time_step: _Optional[int] = ..., sync: _Optional[_Union[SyncStep, _Mapping]] = ..., adaptation: _Optional[_Union[Adaptation, _Mapping]] = ...) -> None: ...

class NormalizeResponse(_message.Message):
    __slots__ = ("output", "mean", "var", "version", "batch_statistics", "replayed")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    VAR_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BATCH_STATISTICS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    output: Tensor
    mean: Tensor
    var: Tensor
    version: int
    batch_statistics: bool
    replayed: bool
    def __init__(self, output: _Optional[_Union[Tensor, _Mapping]] = ..., mean: _Optional[_Union[Tensor, _Mapping]] = ..., var: _Optional[_Union[Tensor, _Mapping]] = ..., version: _Optional[int] = ..., batch_statistics: _Optional[bool] = ..., replayed: _Optional[bool] = ...) -> None: ...

class NormalizeStreamRequest(_message.Message):
    __slots__ = ("session_id", "mode", "chunk", "end_of_batch", "statistics_only", "idempotency_key", "time_step", "sync", "adaptation")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    END_OF_BATCH_FIELD_NUMBER: _ClassVar[int]
    STATISTICS_ONLY_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    TIME_STEP_FIELD_NUMBER: _ClassVar[int]
    SYNC_FIELD_NUMBER: _ClassVar[int]
    ADAPTATION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    mode: Mode
    chunk: Tensor
    end_of_batch: bool
    statistics_only: bool
    idempotency_key: str
    time_step: int
    sync: SyncStep
    adaptation: Adaptation
    def __init__(self, session_id: _Optional[str] = ..., mode: _Optional[_Union[Mode, str]] = ..., chunk: _Optional[_Union[Tensor, _Mapping]] = ..., end_of_batch: _Optional[bool] = ..., statistics_only: _Optional[bool] = ..., idempotency_key: _Optional[str] = ..., time_step: _Optional[int] = ..., sync: _Optional[_Union[SyncStep, _Mapping]] = ..., adaptation: _Optional[_Union[Adaptation, _Mapping]] = ...) -> None: ...

class NormalizeStreamResponse(_message.Message):
    __slots__ = ("batch_index", "chunk", "end_of_batch", "mean", "var", "version", "batch_statistics", "replayed")
    BATCH_INDEX_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    END_OF_BATCH_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    VAR_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BATCH_STATISTICS_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    batch_index: int
    chunk: Tensor
    end_of_batch: bool
    mean: Tensor
    var: Tensor
    version: int
    batch_statistics: bool
    replayed: bool
    def __init__(self, batch_index: _Optional[int] = ..., chunk: _Optional[_Union[Tensor, _Mapping]] = ..., end_of_batch: _Optional[bool] = ..., mean: _Optional[_Union[Tensor, _Mapping]] = ..., var: _Optional[_Union[Tensor, _Mapping]] = ..., version: _Optional[int] = ..., batch_statistics: _Optional[bool] = ..., replayed: _Optional[bool] = ...) -> None: ...

class SyncReduceRequest(_message.Message):
    __slots__ = ("session_id", "sync", "sum_dy", "sum_dy_xhat", "count")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SYNC_FIELD_NUMBER: _ClassVar[int]
    SUM_DY_FIELD_NUMBER: _ClassVar[int]
    SUM_DY_XHAT_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    sync: SyncStep
    sum_dy: Tensor
    sum_dy_xhat: Tensor
    count: int
    def __init__(self, session_id: _Optional[str] = ..., sync: _Optional[_Union[SyncStep, _Mapping]] = ..., sum_dy: _Optional[_Union[Tensor, _Mapping]] = ..., sum_dy_xhat: _Optional[_Union[Tensor, _Mapping]] = ..., count: _Optional[int] = ...) -> None: ...

class SyncReduceResponse(_message.Message):
    __slots__ = ("sum_dy", "sum_dy_xhat", "count", "replayed")
    SUM_DY_FIELD_NUMBER: _ClassVar[int]
    SUM_DY_XHAT_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    sum_dy: Tensor
    sum_dy_xhat: Tensor
    count: int
    replayed: bool
    def __init__(self, sum_dy: _Optional[_Union[Tensor, _Mapping]] = ..., sum_dy_xhat: _Optional[_Union[Tensor, _Mapping]] = ..., count: _Optional[int] = ..., replayed: _Optional[bool] = ...) -> None: ...

class StartCalibrationRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class StartCalibrationResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class CommitCalibrationRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CommitCalibrationResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class AbortCalibrationRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class AbortCalibrationResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class FreezeSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class FreezeSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class UnfreezeSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class UnfreezeSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class ResetAdaptationRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ResetAdaptationResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class PromoteAdaptationRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class PromoteAdaptationResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...
