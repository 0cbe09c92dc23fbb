"""The OpenAI HTTP front's request side: reads and checks a /v1/completions or /v1/chat/completions body
(field types, unsupported options, sampling, prompts, messages) and builds the scheduler's GenerateRequests.
Every refusal is an HttpError (400 with vLLM's wording and the offending `param`)."""

from __future__ import annotations

import re

from jaxserve.proto.messages import set_prompt
from jaxserve.proto.v1 import common_pb2, scheduler_pb2
from jaxserve.cache_salt import MAX_SALT_BYTES
from jaxserve.scheduler.validation import SEED_LIMIT

INT32_MAX = 2**31 - 1


class HttpError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, counted: bool = False):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.counted = counted  # the scheduler counted the refusal in its metrics already


def bad_request(message: str, param: str | None = None) -> HttpError:
    return HttpError(400, message, param)


def _top(path: str) -> str | None:
    """The top-level field of a JSON path like `messages[0].content` (the error's `param`)."""
    return re.split(r"[.\[]", path, maxsplit=1)[0] or None


def _check_string(s: str, path: str) -> None:
    if s.isascii():
        return
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad_request(f"{path or 'The request body'} contains a lone surrogate ({s[e.start]!r}): strings must "
                          "be valid Unicode (UTF-8 encodable, no unpaired \\ud800-\\udfff escapes).",
                          _top(path)) from None


def check_json(body, max_depth: int) -> None:
    """Walks the parsed body without recursion: arrays and objects nest at most `max_depth` deep (the body
    itself is depth 1), and every string and key is valid Unicode. A 400 naming the field otherwise."""
    stack = [(body, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if depth > max_depth:
            raise bad_request(f"The request body is nested too deeply at {path}: JSON arrays and objects may "
                              f"nest at most {max_depth} deep.", _top(path))
        if isinstance(value, list):
            if _all_ints(value):  # token ids: nothing to check, and no path to build per element
                continue
            items = ((i, v) for i, v in enumerate(value) if isinstance(v, (str, dict, list)))
        else:
            items = value.items()
        for key, v in items:
            if isinstance(key, str):
                _check_string(key, f"{path}.{key}" if path else key)
                child = f"{path}.{key}" if path else key
            else:
                child = f"{path}[{key}]"
            if isinstance(v, str):
                _check_string(v, child)
            elif isinstance(v, (dict, list)):
                stack.append((v, child, depth + 1))


def prompt_bytes(prompts_: list) -> int:
    """The size of completion prompts as the limit counts it: UTF-8 bytes of text, 4 bytes per token id."""
    return sum(len(p.encode("utf-8")) if isinstance(p, str) else 4 * len(p) for p in prompts_)


def check_fanout(num_prompts: int, n: int, limit: int) -> None:
    if num_prompts * n > limit:
        raise bad_request(f"This request asks for {num_prompts} prompt(s) x n={n} = {num_prompts * n} completions; "
                          f"at most {limit} are allowed per request (prompts x n <= {limit}).", "n")


def check_prompt_bytes(size: int, limit: int, param: str) -> None:
    if size > limit:
        raise bad_request(f"The prompt is {size} bytes (UTF-8 text, 4 bytes per token id); at most {limit} bytes "
                          "are allowed per request.", param)


# Names the chat template's render sets itself: chat_template_kwargs may not override them.
RESERVED_TEMPLATE_KWARGS = ("messages", "add_generation_prompt", "bos_token", "eos_token")


def template_kwargs(body: dict) -> dict:
    extra = body.get("chat_template_kwargs")
    if extra is None:
        return {}
    if not isinstance(extra, dict):
        raise bad_request(f"chat_template_kwargs must be an object, got {extra!r:.80}.", "chat_template_kwargs")
    bad = [k for k in extra if k in RESERVED_TEMPLATE_KWARGS]
    if bad:
        raise bad_request(f"chat_template_kwargs may not set {', '.join(bad)}: the server sets "
                          f"{', '.join(RESERVED_TEMPLATE_KWARGS)} itself (use the request's messages and "
                          "add_generation_prompt fields).", "chat_template_kwargs")
    return extra


def _number(body: dict, name: str) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad_request(f"{name} must be a number, got {v!r}.", name)
    return float(v)


def _integer(body: dict, name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad_request(f"{name} must be an integer, got {v!r}.", name)
    return v


def _typed(body: dict, name: str, kind: type, what: str, default=None):
    """body[name] if it is a `kind` (`what` in the error), `default` if absent; a 400 otherwise."""
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, kind):
        raise bad_request(f"{name} must be {what}, got {v!r}.", name)
    return v


def boolean(body: dict, name: str, default: bool = False) -> bool:
    return _typed(body, name, bool, "a boolean", default)


def _string(body: dict, name: str) -> str | None:
    return _typed(body, name, str, "a string")


def cache_salt(body: dict) -> str:
    """vLLM's `cache_salt`: requests with different salts never share prefix-cache KV (empty: no salt)."""
    salt = _string(body, "cache_salt")
    if salt is not None and len(salt.encode("utf-8")) > MAX_SALT_BYTES:
        raise bad_request(f"cache_salt must be at most {MAX_SALT_BYTES} bytes (UTF-8), got "
                          f"{len(salt.encode('utf-8'))}.", "cache_salt")
    return salt or ""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _all_ints(values: list) -> bool:
    """Every element an int and none a bool (`type(...) is int`: a prompt's hundreds of token ids are checked
    per request, and this is ~3x cheaper than an isinstance pair per element)."""
    return all(type(v) is int for v in values)


def _unsupported(body: dict, chat: bool) -> None:
    # logprobs, penalties, logit_bias, suffix, response_format and the other vLLM extras: http_openai.py.
    if chat and body.get("tools") and body.get("tool_choice") != "none":
        raise bad_request("tools are not supported by this server.", "tools")


def _sampling(body: dict, vocab_size: int) -> tuple[common_pb2.SamplingParams, int | None]:
    """SamplingParams and the seed (applied per choice by the caller)."""
    s = common_pb2.SamplingParams()
    t = _number(body, "temperature")
    s.temperature = 1.0 if t is None else t
    top_p = _number(body, "top_p")
    if top_p is not None:
        s.top_p = top_p
    top_k = _integer(body, "top_k")
    if top_k is not None:
        if top_k < -1:
            raise bad_request(f"top_k must be -1 (disable), or at least 1, got {top_k}.", "top_k")
        s.top_k = min(top_k, INT32_MAX)
    seed = _integer(body, "seed")
    if seed is not None and not 0 <= seed < SEED_LIMIT:
        raise bad_request(f"seed must be in [0, 2**32), got {seed}.", "seed")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(x, str) for x in stop):
            raise bad_request(f"stop must be a string or a list of strings, got {stop!r}.", "stop")
        s.stop.extend(stop)
    ids = body.get("stop_token_ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(_is_int(x) for x in ids):
            raise bad_request(f"stop_token_ids must be a list of integers, got {ids!r}.", "stop_token_ids")
        bad = next((x for x in ids if not 0 <= x <= INT32_MAX), None)
        if bad is not None:
            raise bad_request(f"stop_token_ids must be in the vocabulary [0, {vocab_size}), got {bad}.",
                              "stop_token_ids")
        s.stop_token_ids.extend(ids)
    s.ignore_eos = boolean(body, "ignore_eos")
    return s, seed


def max_tokens(body: dict, names: tuple[str, ...]) -> int | None:
    for name in names:
        v = _integer(body, name)
        if v is not None:
            if v < 1:
                raise bad_request(f"max_tokens must be at least 1, got {v}.", name)
            if v > INT32_MAX:
                raise bad_request(f"max_tokens must be at most {INT32_MAX}, got {v}.", name)
            return v
    return None


def _check_ids(ids: list, vocab_size: int) -> None:
    if not ids or (min(ids) >= 0 and max(ids) <= INT32_MAX):  # builtins: the common case in C
        return
    bad = next((t for t in ids if not 0 <= t <= INT32_MAX), None)
    if bad is not None:
        raise bad_request(f"Token id {bad} is out of vocabulary: this model's vocabulary has {vocab_size} tokens "
                          f"(valid ids are 0 to {vocab_size - 1}).", "prompt")


def prompts(body: dict, vocab_size: int) -> list:
    """The completions `prompt` as a list of str | list[int]."""
    if "prompt" not in body or body["prompt"] is None:
        raise bad_request("The request has no prompt: set prompt to a string, a list of token ids, or a list of "
                          "either.", "prompt")
    p = body["prompt"]
    shape = ("prompt must be a string, a list of strings, a list of token ids, or a list of lists of token ids, "
             f"got {p!r:.80}.")
    if isinstance(p, str):
        return [p]
    if not isinstance(p, list):
        raise bad_request(shape, "prompt")
    if not p or _all_ints(p):
        _check_ids(p, vocab_size)
        return [p]
    if all(isinstance(x, str) for x in p):
        return list(p)
    if all(isinstance(x, list) and _all_ints(x) for x in p):
        for x in p:
            _check_ids(x, vocab_size)
        return list(p)
    raise bad_request(shape, "prompt")



_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


def messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad_request("messages must be a non-empty list of messages.", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad_request(f"messages[{i}] must be an object with role and content, got {m!r:.80}.", "messages")
        role = m.get("role")
        if role not in _ROLES:
            raise bad_request(f"messages[{i}].role must be one of {', '.join(_ROLES)}, got {role!r}.", "messages")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise bad_request(f"messages[{i}]: content part type {kind!r} is not supported: only text parts.",
                                      "messages")
                parts.append(part["text"])
            content = "\n".join(parts)
        elif content is not None and not isinstance(content, str):
            raise bad_request(f"messages[{i}].content must be a string or a list of text parts, got {content!r:.80}.",
                              "messages")
        if content is None and role != "assistant":
            raise bad_request(f"messages[{i}].content is required for role {role}.", "messages")
        out.append({**m, "role": role, "content": content})
    return out


def options(body: dict, chat: bool, vocab_size: int):
    """The fields both routes share: (sampling, seed, n, stream, include_usage, session_id)."""
    _unsupported(body, chat)
    sampling, seed = _sampling(body, vocab_size)
    n = _integer(body, "n")
    n = 1 if n is None else n
    if n < 1:
        raise bad_request(f"n must be at least 1, got {n}.", "n")
    if n > 128:
        raise bad_request(f"n must be at most 128, got {n}.", "n")
    best_of = _integer(body, "best_of")
    if best_of is not None and best_of != n:
        raise bad_request("best_of is not supported by this server (it must equal n).", "best_of")
    stream = boolean(body, "stream")
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not stream:
            raise bad_request("Stream options can only be defined when `stream=True`.", "stream_options")
        if not isinstance(stream_options, dict):
            raise bad_request(f"stream_options must be an object, got {stream_options!r}.", "stream_options")
    include_usage = bool(stream and stream_options and boolean(stream_options, "include_usage"))
    session = _string(body, "session_id") or ""
    return sampling, seed, n, stream, include_usage, session


def generate_requests(prompts_: list, sampling, seed, n: int, max_tokens_, session: str, request_id: str):
    """One GenerateRequest per prompt and choice (n per prompt; with a seed, choice j uses seed + j)."""
    out = []
    for i, prompt in enumerate(prompts_):
        for j in range(n):
            r = scheduler_pb2.GenerateRequest(sampling=sampling, session_id=session,
                                              request_id=f"{request_id}-{i * n + j}")
            if seed is not None:
                r.sampling.seed = (seed + j) % SEED_LIMIT
            out.append(set_prompt(r, prompt, max_tokens_))
    return out
