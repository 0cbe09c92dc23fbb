"""Request validation: tokenizes the prompt and checks every field against the model's limits. Messages
follow vLLM's wording and name the limit, so clients can fix the request without reading our code."""

from __future__ import annotations

import dataclasses
import math

from jaxserve.cache_salt import MAX_SALT_BYTES, api_key_salt
from jaxserve.proto.v1 import common_pb2, scheduler_pb2
from jaxserve.scheduler.errors import InvalidRequest
from jaxserve.scheduler.tokenizer import ModelInfo

SEED_LIMIT = 2**32
MAX_LOGPROBS = 20  # as OpenAI and vLLM (the engine's sampling.MAX_LOGPROBS)
REQUEST_ID_MAX_LEN = 128  # a request id is echoed in every streamed response and in logs


@dataclasses.dataclass(frozen=True)
class ValidRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    max_tokens: int
    sampling: common_pb2.SamplingParams
    session_id: str
    arrival: float = 0.0  # time.monotonic() when the request arrived (TTFT and queue time count from it)
    cache_salt: str = ""  # tenant isolation of the prefix cache (jaxserve.cache_salt)

    @property
    def stop(self) -> tuple[str, ...]:
        return tuple(self.sampling.stop)


def check_sampling(sampling: common_pb2.SamplingParams, vocab_size: int) -> None:
    t = sampling.temperature
    if not t >= 0 or math.isinf(t):  # also rejects NaN
        raise InvalidRequest(f"temperature must be non-negative, got {t}.")
    if sampling.HasField("top_p") and not 0.0 < sampling.top_p <= 1.0:
        raise InvalidRequest(f"top_p must be in (0, 1], got {sampling.top_p}.")
    if sampling.HasField("top_k") and (sampling.top_k < -1 or sampling.top_k == 0):
        raise InvalidRequest(f"top_k must be -1 (disable), or at least 1, got {sampling.top_k}.")
    if sampling.HasField("seed") and not 0 <= sampling.seed < SEED_LIMIT:
        raise InvalidRequest(f"seed must be in [0, 2**32), got {sampling.seed}.")
    if any(not s for s in sampling.stop):
        raise InvalidRequest("stop strings must be non-empty.")
    for t in sampling.stop_token_ids:
        if not 0 <= t < vocab_size:
            raise InvalidRequest(f"stop_token_ids must be in the vocabulary [0, {vocab_size}), got {t}.")
    check_extras(sampling, vocab_size)


def check_extras(sampling: common_pb2.SamplingParams, vocab_size: int) -> None:
    """vLLM's sampling extras (fields 55+), with vLLM's limits."""
    if sampling.HasField("logprobs") and not 0 <= sampling.logprobs <= MAX_LOGPROBS:
        raise InvalidRequest(f"logprobs must be in [0, {MAX_LOGPROBS}], got {sampling.logprobs}.")
    for name in ("presence_penalty", "frequency_penalty"):
        v = getattr(sampling, name)
        if not -2.0 <= v <= 2.0:  # also rejects NaN
            raise InvalidRequest(f"{name} must be in [-2, 2], got {v}.")
    if sampling.HasField("repetition_penalty") and not 0.0 < sampling.repetition_penalty < math.inf:
        raise InvalidRequest(f"repetition_penalty must be greater than 0, got {sampling.repetition_penalty}.")
    if not 0.0 <= sampling.min_p <= 1.0:
        raise InvalidRequest(f"min_p must be in [0, 1], got {sampling.min_p}.")
    for t, b in sampling.logit_bias.items():
        if not 0 <= t < vocab_size:
            raise InvalidRequest(f"logit_bias keys must be token ids in the vocabulary [0, {vocab_size}), got {t}.")
        if math.isnan(b):
            raise InvalidRequest(f"logit_bias values must be numbers, got {b} for token {t}.")


def check_request_id(request_id: str) -> None:
    """A client's request_id: at most REQUEST_ID_MAX_LEN characters of printable ASCII without spaces."""
    if len(request_id) > REQUEST_ID_MAX_LEN:
        raise InvalidRequest(f"request_id must be at most {REQUEST_ID_MAX_LEN} characters, got {len(request_id)}.")
    if not all("!" <= c <= "~" for c in request_id):
        raise InvalidRequest(f"request_id may contain only printable ASCII characters without spaces ('!' to "
                             f"'~'), got {request_id[:80]!r}.")


def check_cache_salt(salt: str) -> None:
    if len(salt.encode("utf-8")) > MAX_SALT_BYTES:
        raise InvalidRequest(f"cache_salt must be at most {MAX_SALT_BYTES} bytes (UTF-8), got "
                             f"{len(salt.encode('utf-8'))}.")


def tenant_cache_salt(api_key: str, salt: str) -> str:
    """The salt of a request under `salt_cache_by_api_key`: its tenant's (a hash of the API key it presented)
    combined with its own `salt`, so tenants never share KV whatever salts they choose."""
    check_cache_salt(salt)
    return api_key_salt(f"{len(api_key)}:{api_key}{salt}")


def validate(request: scheduler_pb2.GenerateRequest, model: ModelInfo, max_model_len: int,
             default_max_tokens: int, request_id: str, arrival: float = 0.0,
             max_prompt_bytes: int = 4 << 20) -> ValidRequest:
    """Raises InvalidRequest with the client-facing message. The prompt's size is checked before it is
    tokenized or scanned: text at most `max_prompt_bytes` (UTF-8), token ids fewer than `max_model_len`."""
    check_request_id(request.request_id)
    check_cache_salt(request.cache_salt)
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise InvalidRequest("The request has no prompt: set either text or token_ids.")
    if request.HasField("max_tokens") and request.max_tokens < 1:
        raise InvalidRequest(f"max_tokens must be at least 1, got {request.max_tokens}.")
    check_sampling(request.sampling, model.vocab_size)
    if request.HasField("max_tokens") and request.sampling.min_tokens > request.max_tokens:
        raise InvalidRequest(f"min_tokens ({request.sampling.min_tokens}) must be at most max_tokens "
                             f"({request.max_tokens}).")

    if kind == "text":
        if not request.text:
            raise InvalidRequest("The prompt cannot be empty.")
        size = len(request.text.encode("utf-8"))
        if size > max_prompt_bytes:
            raise InvalidRequest(f"The prompt is {size} bytes; this server takes at most {max_prompt_bytes} bytes "
                                 "of prompt text per request (max_prompt_bytes).")
        if model.tokenizer is None:
            raise InvalidRequest(f"This scheduler has no tokenizer for model {model.name!r}: send the prompt "
                                 "as token_ids.")
        prompt = tuple(model.tokenizer.encode(request.text))
    else:
        if len(request.token_ids.ids) >= max_model_len:
            n = len(request.token_ids.ids)
            raise InvalidRequest(f"This model's maximum context length is {max_model_len} tokens. However, you "
                                 f"requested {n} tokens in the messages, which leaves no room for the completion. "
                                 "Please reduce the length of the messages.")
        prompt = tuple(request.token_ids.ids)
        if not prompt:
            raise InvalidRequest("The prompt cannot be empty.")
        bad = next((t for t in prompt if not 0 <= t < model.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"Token id {bad} is out of vocabulary: this model's vocabulary has "
                                 f"{model.vocab_size} tokens (valid ids are 0 to {model.vocab_size - 1}).")

    n = len(prompt)
    if n >= max_model_len:
        raise InvalidRequest(f"This model's maximum context length is {max_model_len} tokens. However, you "
                             f"requested {n} tokens in the messages, which leaves no room for the completion. "
                             "Please reduce the length of the messages.")
    if request.HasField("max_tokens"):
        max_tokens = request.max_tokens
        if n + max_tokens > max_model_len:
            raise InvalidRequest(
                f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                f"{n + max_tokens} tokens ({n} in the messages, {max_tokens} in the completion). Please reduce "
                "the length of the messages or completion.")
    else:
        max_tokens = min(default_max_tokens, max_model_len - n)
    return ValidRequest(request_id=request_id, prompt_ids=prompt, max_tokens=max_tokens,
                        sampling=request.sampling, session_id=request.session_id, arrival=arrival,
                        cache_salt=request.cache_salt)
