from jaxserve.proto.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InstanceState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INSTANCE_STATE_UNSPECIFIED: _ClassVar[InstanceState]
    INSTANCE_STATE_HEALTHY: _ClassVar[InstanceState]
    INSTANCE_STATE_SUSPECT: _ClassVar[InstanceState]
    INSTANCE_STATE_DRAINING: _ClassVar[InstanceState]
INSTANCE_STATE_UNSPECIFIED: InstanceState
INSTANCE_STATE_HEALTHY: InstanceState
INSTANCE_STATE_SUSPECT: InstanceState
INSTANCE_STATE_DRAINING: InstanceState

class GenerateRequest(_message.Message):
    __slots__ = ("text", "token_ids", "max_tokens", "sampling", "session_id", "request_id", "cache_salt")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _common_pb2.TokenIds
    max_tokens: int
    sampling: _common_pb2.SamplingParams
    session_id: str
    request_id: str
    cache_salt: str
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Union[_common_pb2.TokenIds, _Mapping]] = ..., max_tokens: _Optional[int] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., session_id: _Optional[str] = ..., request_id: _Optional[str] = ..., cache_salt: _Optional[str] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "cached_tokens", "completion_tokens", "ttft_s", "queue_time_s", "e2e_s", "instance_id", "prefill_instance_id", "num_migrations")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTFT_S_FIELD_NUMBER: _ClassVar[int]
    QUEUE_TIME_S_FIELD_NUMBER: _ClassVar[int]
    E2E_S_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    PREFILL_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_MIGRATIONS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft_s: float
    queue_time_s: float
    e2e_s: float
    instance_id: str
    prefill_instance_id: str
    num_migrations: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., ttft_s: _Optional[float] = ..., queue_time_s: _Optional[float] = ..., e2e_s: _Optional[float] = ..., instance_id: _Optional[str] = ..., prefill_instance_id: _Optional[str] = ..., num_migrations: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "token_ids", "text", "finish_reason", "usage", "logprobs", "stop_reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    finish_reason: _common_pb2.FinishReason
    usage: Usage
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprobs]
    stop_reason: _common_pb2.StopReason
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprobs, _Mapping]]] = ..., stop_reason: _Optional[_Union[_common_pb2.StopReason, _Mapping]] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("token_ids", "max_model_len")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    max_model_len: int
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., max_model_len: _Optional[int] = ...) -> None: ...

class InstanceInfo(_message.Message):
    __slots__ = ("instance_id", "address", "role", "state", "load", "in_flight_requests", "indexed_tokens", "num_requests", "prompt_tokens", "cached_tokens", "hit_rate", "cost_model_calibrated", "last_report_age_s", "kv_cache_dtype", "kv_page_bytes")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    INDEXED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    COST_MODEL_CALIBRATED_FIELD_NUMBER: _ClassVar[int]
    LAST_REPORT_AGE_S_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    KV_PAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    address: str
    role: _common_pb2.Role
    state: InstanceState
    load: _common_pb2.Load
    in_flight_requests: int
    indexed_tokens: int
    num_requests: int
    prompt_tokens: int
    cached_tokens: int
    hit_rate: float
    cost_model_calibrated: bool
    last_report_age_s: float
    kv_cache_dtype: str
    kv_page_bytes: int
    def __init__(self, instance_id: _Optional[str] = ..., address: _Optional[str] = ..., role: _Optional[_Union[_common_pb2.Role, str]] = ..., state: _Optional[_Union[InstanceState, str]] = ..., load: _Optional[_Union[_common_pb2.Load, _Mapping]] = ..., in_flight_requests: _Optional[int] = ..., indexed_tokens: _Optional[int] = ..., num_requests: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., hit_rate: _Optional[float] = ..., cost_model_calibrated: _Optional[bool] = ..., last_report_age_s: _Optional[float] = ..., kv_cache_dtype: _Optional[str] = ..., kv_page_bytes: _Optional[int] = ...) -> None: ...

class ListInstancesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListInstancesResponse(_message.Message):
    __slots__ = ("instances",)
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[InstanceInfo]
    def __init__(self, instances: _Optional[_Iterable[_Union[InstanceInfo, _Mapping]]] = ...) -> None: ...

class SchedulerStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PromptTreeStats(_message.Message):
    __slots__ = ("role", "num_nodes", "num_tokens")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    NUM_NODES_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    role: _common_pb2.Role
    num_nodes: int
    num_tokens: int
    def __init__(self, role: _Optional[_Union[_common_pb2.Role, str]] = ..., num_nodes: _Optional[int] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class SchedulerStats(_message.Message):
    __slots__ = ("policy", "queued_requests", "queued_tokens", "max_queued_requests", "max_queued_tokens", "num_requests", "num_rejected", "num_failed", "num_migrations", "prompt_tokens", "cached_tokens", "hit_rate", "predicted_cached_tokens", "trees")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    NUM_REJECTED_FIELD_NUMBER: _ClassVar[int]
    NUM_FAILED_FIELD_NUMBER: _ClassVar[int]
    NUM_MIGRATIONS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TREES_FIELD_NUMBER: _ClassVar[int]
    policy: str
    queued_requests: int
    queued_tokens: int
    max_queued_requests: int
    max_queued_tokens: int
    num_requests: int
    num_rejected: int
    num_failed: int
    num_migrations: int
    prompt_tokens: int
    cached_tokens: int
    hit_rate: float
    predicted_cached_tokens: int
    trees: _containers.RepeatedCompositeFieldContainer[PromptTreeStats]
    def __init__(self, policy: _Optional[str] = ..., queued_requests: _Optional[int] = ..., queued_tokens: _Optional[int] = ..., max_queued_requests: _Optional[int] = ..., max_queued_tokens: _Optional[int] = ..., num_requests: _Optional[int] = ..., num_rejected: _Optional[int] = ..., num_failed: _Optional[int] = ..., num_migrations: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., hit_rate: _Optional[float] = ..., predicted_cached_tokens: _Optional[int] = ..., trees: _Optional[_Iterable[_Union[PromptTreeStats, _Mapping]]] = ...) -> None: ...

class DrainInstanceRequest(_message.Message):
    __slots__ = ("instance_id", "timeout_s", "wait")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    timeout_s: float
    wait: bool
    def __init__(self, instance_id: _Optional[str] = ..., timeout_s: _Optional[float] = ..., wait: _Optional[bool] = ...) -> None: ...

class DrainInstanceResponse(_message.Message):
    __slots__ = ("num_unfinished",)
    NUM_UNFINISHED_FIELD_NUMBER: _ClassVar[int]
    num_unfinished: int
    def __init__(self, num_unfinished: _Optional[int] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("instance_id", "address", "role", "model", "page_size", "max_model_len", "vocab_size", "num_pages", "profile", "kv_cache_dtype", "kv_page_bytes", "architecture", "tokenizer_fingerprint", "generate_many")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_PAGES_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    KV_PAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    GENERATE_MANY_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    address: str
    role: _common_pb2.Role
    model: str
    page_size: int
    max_model_len: int
    vocab_size: int
    num_pages: int
    profile: _containers.RepeatedCompositeFieldContainer[_common_pb2.ProfileSample]
    kv_cache_dtype: str
    kv_page_bytes: int
    architecture: str
    tokenizer_fingerprint: str
    generate_many: bool
    def __init__(self, instance_id: _Optional[str] = ..., address: _Optional[str] = ..., role: _Optional[_Union[_common_pb2.Role, str]] = ..., model: _Optional[str] = ..., page_size: _Optional[int] = ..., max_model_len: _Optional[int] = ..., vocab_size: _Optional[int] = ..., num_pages: _Optional[int] = ..., profile: _Optional[_Iterable[_Union[_common_pb2.ProfileSample, _Mapping]]] = ..., kv_cache_dtype: _Optional[str] = ..., kv_page_bytes: _Optional[int] = ..., architecture: _Optional[str] = ..., tokenizer_fingerprint: _Optional[str] = ..., generate_many: _Optional[bool] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("instance_id", "report_interval_s")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    REPORT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    report_interval_s: float
    def __init__(self, instance_id: _Optional[str] = ..., report_interval_s: _Optional[float] = ...) -> None: ...

class InstanceReport(_message.Message):
    __slots__ = ("instance_id", "events", "load")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    events: _containers.RepeatedCompositeFieldContainer[_common_pb2.IndexEvent]
    load: _common_pb2.Load
    def __init__(self, instance_id: _Optional[str] = ..., events: _Optional[_Iterable[_Union[_common_pb2.IndexEvent, _Mapping]]] = ..., load: _Optional[_Union[_common_pb2.Load, _Mapping]] = ...) -> None: ...

class ReportEventsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeregisterRequest(_message.Message):
    __slots__ = ("instance_id",)
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    def __init__(self, instance_id: _Optional[str] = ...) -> None: ...

class DeregisterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
