"""vLLM's OpenAI extras for the HTTP front (issue 17): the sampling extras a body may set (logprobs,
penalties, logit_bias, min_p, min_tokens, include_stop_str_in_output), the parameters refused with a 400
naming them, and the logprobs objects of completions and chat responses. Kept apart from http_requests.py,
which reads the core fields."""

from __future__ import annotations

import json

from jaxserve.proto.v1 import common_pb2
from jaxserve.scheduler.http_requests import _integer, _number, bad_request, boolean

MAX_LOGPROBS = 20
JSON_OBJECT_SCHEMA = '{"type": "object"}'  # as engine/structured.py (the front does not import the engine)

# vLLM / OpenAI parameters this server does not implement: refused by name rather than silently ignored.
REFUSED = {
    "suffix": "suffix is not supported by this server.",
    "prompt_logprobs": "prompt_logprobs is not supported by this server.",
    "guided_regex": "guided_regex is not supported by this server.",
    "guided_choice": "guided_choice is not supported by this server.",
    "guided_grammar": "guided_grammar is not supported by this server.",
    "structured_outputs": "structured_outputs is not supported by this server.",
    "allowed_token_ids": "allowed_token_ids is not supported by this server.",
    "bad_words": "bad_words is not supported by this server.",
    "use_beam_search": "use_beam_search is not supported by this server.",
    "logits_processors": "logits_processors is not supported by this server.",
    "truncate_prompt_tokens": "truncate_prompt_tokens is not supported by this server.",
    "return_tokens_as_token_ids": "return_tokens_as_token_ids is not supported by this server.",
}


def refuse_unsupported(body: dict) -> None:
    for name, message in REFUSED.items():
        v = body.get(name)
        if v is not None and v is not False and v != [] and v != "":
            raise bad_request(message, name)


def json_schema(body: dict) -> str | None:
    """The JSON schema the output must follow (as JSON text), from OpenAI's response_format or vLLM's
    guided_json; None for free text. The instance compiles it (an invalid schema is a 400 from there)."""
    fmt = body.get("response_format")
    guided = body.get("guided_json")
    if fmt is not None and guided is not None:
        raise bad_request("Set either response_format or guided_json, not both.", "guided_json")
    if guided is not None:
        if isinstance(guided, str):
            try:
                guided = json.loads(guided)
            except ValueError as e:
                raise bad_request(f"guided_json is not valid JSON: {e}.", "guided_json") from None
        if not isinstance(guided, dict):
            raise bad_request(f"guided_json must be a JSON schema object, got {guided!r:.80}.", "guided_json")
        return json.dumps(guided)
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT_SCHEMA
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema", spec.get("json_schema")) if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise bad_request("response_format json_schema needs json_schema.schema, a JSON schema object.",
                              "response_format")
        return json.dumps(schema)
    raise bad_request(f"response_format type must be text, json_object or json_schema, got {kind!r}.",
                      "response_format")


def logprobs_count(body: dict, chat: bool) -> int | None:
    """How many top alternatives per token the body asks for (None: no logprobs). Completions: `logprobs`
    is that count; chat: `logprobs` is a boolean and `top_logprobs` the count (OpenAI's shapes)."""
    if chat:
        want = boolean(body, "logprobs")
        top = _integer(body, "top_logprobs")
        if top is not None and not want:
            raise bad_request("top_logprobs needs logprobs set to true.", "top_logprobs")
        if top is not None and not 0 <= top <= MAX_LOGPROBS:
            raise bad_request(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {top}.", "top_logprobs")
        return (top or 0) if want else None
    k = _integer(body, "logprobs")
    if k is not None and not 0 <= k <= MAX_LOGPROBS:
        raise bad_request(f"logprobs must be in [0, {MAX_LOGPROBS}], got {k}.", "logprobs")
    return k


def set_extras(body: dict, chat: bool, s: common_pb2.SamplingParams, vocab_size: int) -> None:
    """Reads the extras into `s` (fields 55+), with vLLM's ranges; a 400 naming the field otherwise."""
    refuse_unsupported(body)
    schema = json_schema(body)
    if schema is not None:
        s.json_schema = schema
    k = logprobs_count(body, chat)
    if k is not None:
        s.logprobs = k
    for name in ("presence_penalty", "frequency_penalty"):
        v = _number(body, name)
        if v is not None:
            if not -2.0 <= v <= 2.0:
                raise bad_request(f"{name} must be in [-2, 2], got {v}.", name)
            setattr(s, name, v)
    v = _number(body, "repetition_penalty")
    if v is not None:
        if not 0.0 < v < float("inf"):
            raise bad_request(f"repetition_penalty must be greater than 0, got {v}.", "repetition_penalty")
        s.repetition_penalty = v
    v = _number(body, "min_p")
    if v is not None:
        if not 0.0 <= v <= 1.0:
            raise bad_request(f"min_p must be in [0, 1], got {v}.", "min_p")
        s.min_p = v
    v = _integer(body, "min_tokens")
    if v is not None:
        if not 0 <= v < 2**31:
            raise bad_request(f"min_tokens must be at least 0, got {v}.", "min_tokens")
        s.min_tokens = v
    s.include_stop_str_in_output = boolean(body, "include_stop_str_in_output")
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise bad_request(f"logit_bias must be an object mapping token ids to biases, got {bias!r:.80}.",
                              "logit_bias")
        for key, b in bias.items():
            try:
                tok = int(key)
            except ValueError:
                raise bad_request(f"logit_bias keys must be token ids, got {key!r}.", "logit_bias") from None
            if not 0 <= tok < vocab_size:
                raise bad_request(f"logit_bias token id {tok} is out of vocabulary [0, {vocab_size}).",
                                  "logit_bias")
            if isinstance(b, bool) or not isinstance(b, (int, float)):
                raise bad_request(f"logit_bias values must be numbers, got {b!r} for token {key}.", "logit_bias")
            s.logit_bias[tok] = min(max(float(b), -100.0), 100.0)  # OpenAI's documented range, as vLLM


def check_stream_options(stream_options: dict | None) -> bool:
    """continuous_usage_stats (vLLM): usage in every chunk."""
    if not stream_options:
        return False
    return boolean(stream_options, "continuous_usage_stats")


# ------------------------------------------------------------------------------------- response side
class LogprobsFormatter:
    """Turns TokenLogprobs into OpenAI's logprobs objects. Token strings are the tokenizer's decode of the
    single token (a byte-level token inside a multi-byte character decodes to U+FFFD, as in vLLM)."""

    def __init__(self, tokenizer, chat: bool, top: int):
        self.tok = tokenizer
        self.chat = chat
        self.top = top

    def _text(self, token_id: int) -> str:
        return self.tok.decode([token_id]) if self.tok is not None else f"token_id:{token_id}"

    def empty(self):
        return {"content": []} if self.chat else {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                                  "text_offset": []}

    def add(self, acc, token_ids, logprobs, offset: int) -> int:
        """Appends one token per entry to `acc` (an `empty()` object); returns the text offset after them."""
        for tid, lp in zip(token_ids, logprobs):
            text = self._text(tid)
            tops = list(zip(lp.top_ids, lp.top_logprobs))[:self.top]
            if self.chat:
                acc["content"].append({
                    "token": text, "logprob": lp.logprob, "bytes": list(text.encode("utf-8")),
                    "top_logprobs": [{"token": self._text(t), "logprob": v,
                                      "bytes": list(self._text(t).encode("utf-8"))} for t, v in tops]})
            else:
                acc["tokens"].append(text)
                acc["token_logprobs"].append(lp.logprob)
                top = {self._text(t): v for t, v in tops}
                top.setdefault(text, lp.logprob)
                acc["top_logprobs"].append(top)
                acc["text_offset"].append(offset)
            offset += len(text)
        return offset
