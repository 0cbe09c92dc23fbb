from jaxserve.proto.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InstanceGenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "generated_token_ids", "max_tokens", "sampling", "session_id", "cache_salt")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    generated_token_ids: _containers.RepeatedScalarFieldContainer[int]
    max_tokens: int
    sampling: _common_pb2.SamplingParams
    session_id: str
    cache_salt: str
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., generated_token_ids: _Optional[_Iterable[int]] = ..., max_tokens: _Optional[int] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., session_id: _Optional[str] = ..., cache_salt: _Optional[str] = ...) -> None: ...

class InstanceGenerateResponse(_message.Message):
    __slots__ = ("token_ids", "finish_reason", "usage", "logprobs", "stop_reason")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: _common_pb2.FinishReason
    usage: _common_pb2.InstanceUsage
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenLogprobs]
    stop_reason: _common_pb2.StopReason
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.InstanceUsage, _Mapping]] = ..., logprobs: _Optional[_Iterable[_Union[_common_pb2.TokenLogprobs, _Mapping]]] = ..., stop_reason: _Optional[_Union[_common_pb2.StopReason, _Mapping]] = ...) -> None: ...

class MuxRequest(_message.Message):
    __slots__ = ("stream_id", "generate", "abort", "batch")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATE_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    stream_id: int
    generate: InstanceGenerateRequest
    abort: bool
    batch: _containers.RepeatedCompositeFieldContainer[MuxRequest]
    def __init__(self, stream_id: _Optional[int] = ..., generate: _Optional[_Union[InstanceGenerateRequest, _Mapping]] = ..., abort: _Optional[bool] = ..., batch: _Optional[_Iterable[_Union[MuxRequest, _Mapping]]] = ...) -> None: ...

class MuxItem(_message.Message):
    __slots__ = ("stream_id", "response", "error_code", "error_message")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    stream_id: int
    response: InstanceGenerateResponse
    error_code: int
    error_message: str
    def __init__(self, stream_id: _Optional[int] = ..., response: _Optional[_Union[InstanceGenerateResponse, _Mapping]] = ..., error_code: _Optional[int] = ..., error_message: _Optional[str] = ...) -> None: ...

class MuxResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[MuxItem]
    def __init__(self, items: _Optional[_Iterable[_Union[MuxItem, _Mapping]]] = ...) -> None: ...

class KvTarget(_message.Message):
    __slots__ = ("instance_id", "address")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    address: str
    def __init__(self, instance_id: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class PushKvRequest(_message.Message):
    __slots__ = ("request_id", "token_ids", "target")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    target: KvTarget
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., target: _Optional[_Union[KvTarget, _Mapping]] = ...) -> None: ...

class PushKvResponse(_message.Message):
    __slots__ = ("held_tokens", "sent_tokens", "sent_bytes")
    HELD_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SENT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    held_tokens: int
    sent_tokens: int
    sent_bytes: int
    def __init__(self, held_tokens: _Optional[int] = ..., sent_tokens: _Optional[int] = ..., sent_bytes: _Optional[int] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request", "decode_target")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    DECODE_TARGET_FIELD_NUMBER: _ClassVar[int]
    request: InstanceGenerateRequest
    decode_target: KvTarget
    def __init__(self, request: _Optional[_Union[InstanceGenerateRequest, _Mapping]] = ..., decode_target: _Optional[_Union[KvTarget, _Mapping]] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("first_token_id", "finish_reason", "usage", "transferred_tokens", "kv_handle", "transferred_bytes", "first_token_logprobs", "stop_reason")
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TRANSFERRED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_HANDLE_FIELD_NUMBER: _ClassVar[int]
    TRANSFERRED_BYTES_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    first_token_id: int
    finish_reason: _common_pb2.FinishReason
    usage: _common_pb2.InstanceUsage
    transferred_tokens: int
    kv_handle: str
    transferred_bytes: int
    first_token_logprobs: _common_pb2.TokenLogprobs
    stop_reason: _common_pb2.StopReason
    def __init__(self, first_token_id: _Optional[int] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.InstanceUsage, _Mapping]] = ..., transferred_tokens: _Optional[int] = ..., kv_handle: _Optional[str] = ..., transferred_bytes: _Optional[int] = ..., first_token_logprobs: _Optional[_Union[_common_pb2.TokenLogprobs, _Mapping]] = ..., stop_reason: _Optional[_Union[_common_pb2.StopReason, _Mapping]] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("request", "kv_handle")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    KV_HANDLE_FIELD_NUMBER: _ClassVar[int]
    request: InstanceGenerateRequest
    kv_handle: str
    def __init__(self, request: _Optional[_Union[InstanceGenerateRequest, _Mapping]] = ..., kv_handle: _Optional[str] = ...) -> None: ...

class PrepareKvTransferRequest(_message.Message):
    __slots__ = ("request_id", "token_ids", "page_size", "kv_cache_dtype")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    page_size: int
    kv_cache_dtype: str
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., page_size: _Optional[int] = ..., kv_cache_dtype: _Optional[str] = ...) -> None: ...

class PrepareKvTransferResponse(_message.Message):
    __slots__ = ("transfer_id", "cached_tokens", "num_pages_reserved", "receiver_shards")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_PAGES_RESERVED_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_SHARDS_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    cached_tokens: int
    num_pages_reserved: int
    receiver_shards: _containers.RepeatedCompositeFieldContainer[KvShard]
    def __init__(self, transfer_id: _Optional[str] = ..., cached_tokens: _Optional[int] = ..., num_pages_reserved: _Optional[int] = ..., receiver_shards: _Optional[_Iterable[_Union[KvShard, _Mapping]]] = ...) -> None: ...

class KvShard(_message.Message):
    __slots__ = ("process", "head_start", "head_end")
    PROCESS_FIELD_NUMBER: _ClassVar[int]
    HEAD_START_FIELD_NUMBER: _ClassVar[int]
    HEAD_END_FIELD_NUMBER: _ClassVar[int]
    process: int
    head_start: int
    head_end: int
    def __init__(self, process: _Optional[int] = ..., head_start: _Optional[int] = ..., head_end: _Optional[int] = ...) -> None: ...

class KvPiece(_message.Message):
    __slots__ = ("receiver_shard", "head_start", "head_end")
    RECEIVER_SHARD_FIELD_NUMBER: _ClassVar[int]
    HEAD_START_FIELD_NUMBER: _ClassVar[int]
    HEAD_END_FIELD_NUMBER: _ClassVar[int]
    receiver_shard: int
    head_start: int
    head_end: int
    def __init__(self, receiver_shard: _Optional[int] = ..., head_start: _Optional[int] = ..., head_end: _Optional[int] = ...) -> None: ...

class KvSource(_message.Message):
    __slots__ = ("receiver_process", "address", "pull_uuid", "pieces")
    RECEIVER_PROCESS_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PULL_UUID_FIELD_NUMBER: _ClassVar[int]
    PIECES_FIELD_NUMBER: _ClassVar[int]
    receiver_process: int
    address: str
    pull_uuid: int
    pieces: _containers.RepeatedCompositeFieldContainer[KvPiece]
    def __init__(self, receiver_process: _Optional[int] = ..., address: _Optional[str] = ..., pull_uuid: _Optional[int] = ..., pieces: _Optional[_Iterable[_Union[KvPiece, _Mapping]]] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("shape", "dtype", "num_shards")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    num_shards: int
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., num_shards: _Optional[int] = ...) -> None: ...

class CommitKvTransferRequest(_message.Message):
    __slots__ = ("transfer_id", "request_id", "start_token", "num_tokens", "source_address", "pull_uuid", "tensors", "insert", "request", "send_back_to", "cache_only", "sources", "kv_transport")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    START_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PULL_UUID_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    INSERT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    SEND_BACK_TO_FIELD_NUMBER: _ClassVar[int]
    CACHE_ONLY_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    request_id: str
    start_token: int
    num_tokens: int
    source_address: str
    pull_uuid: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    insert: bool
    request: InstanceGenerateRequest
    send_back_to: KvTarget
    cache_only: bool
    sources: _containers.RepeatedCompositeFieldContainer[KvSource]
    kv_transport: str
    def __init__(self, transfer_id: _Optional[str] = ..., request_id: _Optional[str] = ..., start_token: _Optional[int] = ..., num_tokens: _Optional[int] = ..., source_address: _Optional[str] = ..., pull_uuid: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., insert: _Optional[bool] = ..., request: _Optional[_Union[InstanceGenerateRequest, _Mapping]] = ..., send_back_to: _Optional[_Union[KvTarget, _Mapping]] = ..., cache_only: _Optional[bool] = ..., sources: _Optional[_Iterable[_Union[KvSource, _Mapping]]] = ..., kv_transport: _Optional[str] = ...) -> None: ...

class FetchKvRequest(_message.Message):
    __slots__ = ("pull_uuid",)
    PULL_UUID_FIELD_NUMBER: _ClassVar[int]
    pull_uuid: int
    def __init__(self, pull_uuid: _Optional[int] = ...) -> None: ...

class KvChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class CommitKvTransferResponse(_message.Message):
    __slots__ = ("received_tokens", "inserted_tokens", "received_bytes")
    RECEIVED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    INSERTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    received_tokens: int
    inserted_tokens: int
    received_bytes: int
    def __init__(self, received_tokens: _Optional[int] = ..., inserted_tokens: _Optional[int] = ..., received_bytes: _Optional[int] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class ProfileRequest(_message.Message):
    __slots__ = ("points", "repeats")
    class Point(_message.Message):
        __slots__ = ("prompt_len", "cached_len")
        PROMPT_LEN_FIELD_NUMBER: _ClassVar[int]
        CACHED_LEN_FIELD_NUMBER: _ClassVar[int]
        prompt_len: int
        cached_len: int
        def __init__(self, prompt_len: _Optional[int] = ..., cached_len: _Optional[int] = ...) -> None: ...
    POINTS_FIELD_NUMBER: _ClassVar[int]
    REPEATS_FIELD_NUMBER: _ClassVar[int]
    points: _containers.RepeatedCompositeFieldContainer[ProfileRequest.Point]
    repeats: int
    def __init__(self, points: _Optional[_Iterable[_Union[ProfileRequest.Point, _Mapping]]] = ..., repeats: _Optional[int] = ...) -> None: ...

class ProfileResponse(_message.Message):
    __slots__ = ("samples",)
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    samples: _containers.RepeatedCompositeFieldContainer[_common_pb2.ProfileSample]
    def __init__(self, samples: _Optional[_Iterable[_Union[_common_pb2.ProfileSample, _Mapping]]] = ...) -> None: ...

class InstanceStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InstanceStats(_message.Message):
    __slots__ = ("instance_id", "role", "load", "num_requests", "prompt_tokens", "cached_tokens", "generated_tokens", "cached_pages", "draining", "kv_sent_tokens", "kv_sent_bytes", "kv_received_tokens", "kv_received_bytes", "kv_transfers", "kv_transfer_failures", "kv_pending", "kv_held_pages", "kv_sent_back_tokens", "kv_sent_back_bytes", "kv_send_back_failures", "kv_cache_dtype", "kv_page_bytes", "kv_num_pages", "kv_num_host_pages", "kv_peer_sent_tokens", "kv_peer_sent_bytes", "kv_peer_push_failures")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    NUM_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PAGES_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    KV_SENT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_SENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_RECEIVED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFERS_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_FAILURES_FIELD_NUMBER: _ClassVar[int]
    KV_PENDING_FIELD_NUMBER: _ClassVar[int]
    KV_HELD_PAGES_FIELD_NUMBER: _ClassVar[int]
    KV_SENT_BACK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_SENT_BACK_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_SEND_BACK_FAILURES_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    KV_PAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_NUM_PAGES_FIELD_NUMBER: _ClassVar[int]
    KV_NUM_HOST_PAGES_FIELD_NUMBER: _ClassVar[int]
    KV_PEER_SENT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_PEER_SENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_PEER_PUSH_FAILURES_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    role: _common_pb2.Role
    load: _common_pb2.Load
    num_requests: int
    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int
    cached_pages: int
    draining: bool
    kv_sent_tokens: int
    kv_sent_bytes: int
    kv_received_tokens: int
    kv_received_bytes: int
    kv_transfers: int
    kv_transfer_failures: int
    kv_pending: int
    kv_held_pages: int
    kv_sent_back_tokens: int
    kv_sent_back_bytes: int
    kv_send_back_failures: int
    kv_cache_dtype: str
    kv_page_bytes: int
    kv_num_pages: int
    kv_num_host_pages: int
    kv_peer_sent_tokens: int
    kv_peer_sent_bytes: int
    kv_peer_push_failures: int
    def __init__(self, instance_id: _Optional[str] = ..., role: _Optional[_Union[_common_pb2.Role, str]] = ..., load: _Optional[_Union[_common_pb2.Load, _Mapping]] = ..., num_requests: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., cached_pages: _Optional[int] = ..., draining: _Optional[bool] = ..., kv_sent_tokens: _Optional[int] = ..., kv_sent_bytes: _Optional[int] = ..., kv_received_tokens: _Optional[int] = ..., kv_received_bytes: _Optional[int] = ..., kv_transfers: _Optional[int] = ..., kv_transfer_failures: _Optional[int] = ..., kv_pending: _Optional[int] = ..., kv_held_pages: _Optional[int] = ..., kv_sent_back_tokens: _Optional[int] = ..., kv_sent_back_bytes: _Optional[int] = ..., kv_send_back_failures: _Optional[int] = ..., kv_cache_dtype: _Optional[str] = ..., kv_page_bytes: _Optional[int] = ..., kv_num_pages: _Optional[int] = ..., kv_num_host_pages: _Optional[int] = ..., kv_peer_sent_tokens: _Optional[int] = ..., kv_peer_sent_bytes: _Optional[int] = ..., kv_peer_push_failures: _Optional[int] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("timeout_s",)
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    timeout_s: float
    def __init__(self, timeout_s: _Optional[float] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("num_unfinished",)
    NUM_UNFINISHED_FIELD_NUMBER: _ClassVar[int]
    num_unfinished: int
    def __init__(self, num_unfinished: _Optional[int] = ...) -> None: ...
