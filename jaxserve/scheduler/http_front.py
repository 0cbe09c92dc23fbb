"""OpenAI-compatible HTTP front of the scheduler (aiohttp), served by the scheduler process on its own port.

    front = HttpFront(scheduler, port=8000, api_key="sk-...")   # scheduler: a started `Scheduler`
    port = await front.start()
    ...
    await front.stop()

Routes:
  POST /v1/completions       prompt: a string, a list of token ids, or a list of either (a batch)
  POST /v1/chat/completions  messages rendered with the model's chat template (below)
  GET  /v1/models            the served model (id, max_model_len)
  GET  /health               200 while an instance can serve, else 503; never needs the API key
  GET  /metrics              Prometheus exposition (`jaxserve.scheduler.metrics`)

Requests take the same internal path as gRPC `Scheduler.Generate` (the scheduler's `generate` coroutine is
called directly, with no loopback call), so validation, admission, routing, migration and metrics are the
same, and so is the wording of every 400 (vLLM's). Status codes: 400 bad input, 401 missing/wrong API key,
404 unknown model or route, 429 the scheduler's admission queue is full, 503 no instance can serve, 504
deadline. Errors are `{"error": {"message", "type", "param", "code"}}` (vLLM's shape: `type` is the
status's class name, `code` the status). A stream that fails after it started ends with an error event and
`data: [DONE]`.

Sampling fields: temperature (default 1.0 as in the OpenAI API), top_p, top_k, seed, stop,
stop_token_ids, ignore_eos, max_tokens (chat: max_completion_tokens or max_tokens; absent: the scheduler's
default_max_tokens), n (n > 1 runs n requests; with a seed, copy j uses seed + j), echo (completions).
Extensions: session_id (routing affinity for the `session` policy). Refused with 400 because the engine
cannot do them: logprobs, top_logprobs, best_of > n, suffix, non-zero presence/frequency penalties,
repetition_penalty != 1, logit_bias, response_format other than text, tools (unless tool_choice is "none"),
non-text content parts.

Chat template: `chat_template` given to HttpFront (a path or the template text; `--chat_template`), else
the model folder's `chat_template.jinja`, else `tokenizer_config.json`'s `chat_template` (rendered with
jinja2 in a sandbox, as Hugging Face does: messages, add_generation_prompt, bos_token, eos_token,
raise_exception, strftime_now). Without one, the plain template:

    system: <content>\\n          one line per message: "<role>: <content>\\n"
    user: <content>\\n
    assistant:                    appended when add_generation_prompt (the default)
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hmac
import json
import logging
import time
import uuid
from pathlib import Path

import grpc
from aiohttp import web

from jaxserve.proto.v1 import common_pb2, scheduler_pb2
from jaxserve.scheduler.metrics import CONTENT_TYPE, SchedulerMetrics, kv_bytes_per_token
from jaxserve.scheduler.tokenizer import resolve_model_path

log = logging.getLogger("jaxserve.scheduler.http")

INT32_MAX = 2**31 - 1
SEED_LIMIT = 2**32
_FINISH = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length",
           common_pb2.FINISH_REASON_ABORT: "abort"}
_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                405: "MethodNotAllowedError", 413: "RequestEntityTooLargeError", 415: "UnsupportedMediaTypeError",
                429: "RateLimitError", 499: "ClientClosedRequestError", 500: "InternalServerError",
                503: "ServiceUnavailableError", 504: "GatewayTimeoutError"}
_GRPC_TO_HTTP = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.OUT_OF_RANGE: 400,
                 grpc.StatusCode.FAILED_PRECONDITION: 400, grpc.StatusCode.NOT_FOUND: 404,
                 grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAVAILABLE: 503,
                 grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.CANCELLED: 499}
PLAIN_TEMPLATE_DOC = 'one line "<role>: <content>\\n" per message, then "assistant:"'


class HttpError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, counted: bool = False):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.counted = counted  # the scheduler counted the refusal in its metrics already


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "Error"), "param": param,
                      "code": status}}


def _error_response(status: int, message: str, param: str | None = None) -> web.Response:
    return web.json_response(error_body(status, message, param), status=status)


class _GenerateAbort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def http(self) -> HttpError:
        return HttpError(_GRPC_TO_HTTP.get(self.code, 500), self.message, counted=True)


class _Context:
    """What `Scheduler.generate` needs of a grpc.aio context."""

    def time_remaining(self):
        return None

    async def abort(self, code, details=""):
        raise _GenerateAbort(code, details)


# ------------------------------------------------------------------------------------------- parsing
def _bad(message: str, param: str | None = None) -> HttpError:
    return HttpError(400, message, param)


def _number(body: dict, name: str) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(f"{name} must be a number, got {v!r}.", name)
    return float(v)


def _integer(body: dict, name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(f"{name} must be an integer, got {v!r}.", name)
    return v


def _boolean(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(f"{name} must be a boolean, got {v!r}.", name)
    return v


def _string(body: dict, name: str) -> str | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, str):
        raise _bad(f"{name} must be a string, got {v!r}.", name)
    return v


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _unsupported(body: dict, chat: bool) -> None:
    if chat:
        if body.get("logprobs"):
            raise _bad("logprobs is not supported by this server.", "logprobs")
    elif body.get("logprobs") is not None:
        raise _bad("logprobs is not supported by this server.", "logprobs")
    if body.get("top_logprobs"):
        raise _bad("top_logprobs is not supported by this server.", "top_logprobs")
    if body.get("suffix"):
        raise _bad("suffix is not supported by this server.", "suffix")
    for name in ("presence_penalty", "frequency_penalty"):
        v = _number(body, name)
        if v:
            raise _bad(f"{name} is not supported by this server (it must be 0), got {v}.", name)
    v = _number(body, "repetition_penalty")
    if v is not None and v != 1.0:
        raise _bad(f"repetition_penalty is not supported by this server (it must be 1), got {v}.",
                   "repetition_penalty")
    if body.get("logit_bias"):
        raise _bad("logit_bias is not supported by this server.", "logit_bias")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise _bad("response_format is not supported by this server (only {\"type\": \"text\"}).",
                   "response_format")
    if chat and body.get("tools") and body.get("tool_choice") != "none":
        raise _bad("tools are not supported by this server.", "tools")


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
            raise _bad(f"top_k must be -1 (disable), or at least 1, got {top_k}.", "top_k")
        s.top_k = min(top_k, INT32_MAX)
    seed = _integer(body, "seed")
    if seed is not None and not 0 <= seed < SEED_LIMIT:
        raise _bad(f"seed must be in [0, 2**32), got {seed}.", "seed")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(x, str) for x in stop):
            raise _bad(f"stop must be a string or a list of strings, got {stop!r}.", "stop")
        s.stop.extend(stop)
    ids = body.get("stop_token_ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(_is_int(x) for x in ids):
            raise _bad(f"stop_token_ids must be a list of integers, got {ids!r}.", "stop_token_ids")
        bad = next((x for x in ids if not 0 <= x <= INT32_MAX), None)
        if bad is not None:
            raise _bad(f"stop_token_ids must be in the vocabulary [0, {vocab_size}), got {bad}.", "stop_token_ids")
        s.stop_token_ids.extend(ids)
    s.ignore_eos = _boolean(body, "ignore_eos")
    return s, seed


def _max_tokens(body: dict, names: tuple[str, ...]) -> int | None:
    for name in names:
        v = _integer(body, name)
        if v is not None:
            if v < 1:
                raise _bad(f"max_tokens must be at least 1, got {v}.", name)
            if v > INT32_MAX:
                raise _bad(f"max_tokens must be at most {INT32_MAX}, got {v}.", name)
            return v
    return None


def _check_ids(ids: list, vocab_size: int) -> None:
    bad = next((t for t in ids if not 0 <= t <= INT32_MAX), None)
    if bad is not None:
        raise _bad(f"Token id {bad} is out of vocabulary: this model's vocabulary has {vocab_size} tokens (valid "
                   f"ids are 0 to {vocab_size - 1}).", "prompt")


def _prompts(body: dict, vocab_size: int) -> list:
    """The completions `prompt` as a list of str | list[int]."""
    if "prompt" not in body or body["prompt"] is None:
        raise _bad("The request has no prompt: set prompt to a string, a list of token ids, or a list of either.",
                   "prompt")
    p = body["prompt"]
    shape = ("prompt must be a string, a list of strings, a list of token ids, or a list of lists of token ids, "
             f"got {p!r:.80}.")
    if isinstance(p, str):
        return [p]
    if not isinstance(p, list):
        raise _bad(shape, "prompt")
    if not p or all(_is_int(t) for t in p):
        _check_ids(p, vocab_size)
        return [p]
    if all(isinstance(x, str) for x in p):
        return list(p)
    if all(isinstance(x, list) and all(_is_int(t) for t in x) for x in p):
        for x in p:
            _check_ids(x, vocab_size)
        return list(p)
    raise _bad(shape, "prompt")


# ---------------------------------------------------------------------------------------- chat template
def _load_template(folder: Path | None, override: str | None) -> str | None:
    if override:
        path = Path(override)
        with contextlib.suppress(OSError):
            if path.is_file():
                return path.read_text()
        return override
    if folder is None:
        return None
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        template = json.loads(config_file.read_text()).get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if isinstance(template, str) and template:
            return template
    return None


def _special_token(folder: Path | None, key: str) -> str:
    if folder is None or not (folder / "tokenizer_config.json").is_file():
        return ""
    token = json.loads((folder / "tokenizer_config.json").read_text()).get(key)
    content = token.get("content") if isinstance(token, dict) else token
    return content if isinstance(content, str) else ""


class ChatTemplate:
    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = ""):
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._compiled = None
        if source is not None:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.policies["json.dumps_kwargs"] = {"ensure_ascii": False, "sort_keys": False}
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
            self._compiled = env.from_string(source)

    @property
    def is_plain(self) -> bool:
        return self._compiled is None

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        if self._compiled is None:
            text = "".join(f"{m['role']}: {m['content'] or ''}\n" for m in messages)
            return text + ("assistant:" if add_generation_prompt else "")
        from jinja2.exceptions import TemplateError
        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token, **extra)
        except TemplateError as e:
            raise _bad(f"The chat template could not render these messages: {e}", "messages") from None


_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages must be a non-empty list of messages.", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object with role and content, got {m!r:.80}.", "messages")
        role = m.get("role")
        if role not in _ROLES:
            raise _bad(f"messages[{i}].role must be one of {', '.join(_ROLES)}, got {role!r}.", "messages")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise _bad(f"messages[{i}]: content part type {kind!r} is not supported: only text parts.",
                               "messages")
                parts.append(part["text"])
            content = "\n".join(parts)
        elif content is not None and not isinstance(content, str):
            raise _bad(f"messages[{i}].content must be a string or a list of text parts, got {content!r:.80}.",
                       "messages")
        if content is None and role != "assistant":
            raise _bad(f"messages[{i}].content is required for role {role}.", "messages")
        out.append({**m, "role": role, "content": content})
    return out


async def _close(gens) -> None:
    """Close the scheduler's generators: each one's finally releases its admission and cancels its call."""
    for g in gens:
        with contextlib.suppress(Exception):
            await g.aclose()


# -------------------------------------------------------------------------------------------- front
class HttpFront:
    def __init__(self, scheduler, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                 served_model_names: list[str] | None = None, chat_template: str | None = None,
                 model_path=None, metrics: SchedulerMetrics | None = None, shutdown_grace_s: float = 1.0,
                 max_body_bytes: int = 64 << 20):
        self.scheduler = scheduler
        self.host = host
        self.requested_port = port
        self.api_key = api_key or None
        self.names = list(served_model_names or [scheduler.model.name])
        folder = Path(model_path) if model_path is not None else resolve_model_path(scheduler.model.name)
        folder = folder if folder.is_dir() else None
        self.template = ChatTemplate(_load_template(folder, chat_template), _special_token(folder, "bos_token"),
                                     _special_token(folder, "eos_token"))
        if metrics is None:
            metrics = scheduler.observer if isinstance(scheduler.observer, SchedulerMetrics) else None
        if metrics is None:
            metrics = SchedulerMetrics(scheduler, self.names[0],
                                       kv_bytes_per_token(folder) if folder is not None else 0)
            if scheduler.observer is None:
                scheduler.observer = metrics
        self.metrics = metrics
        self.shutdown_grace_s = shutdown_grace_s
        self.created = int(time.time())
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        app = web.Application(middlewares=[self._middleware], client_max_size=max_body_bytes)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        self.app = app

    async def start(self) -> int:
        runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None,
                               shutdown_timeout=self.shutdown_grace_s)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.requested_port)
        await site.start()
        self._runner = runner
        self.port = runner.addresses[0][1]
        log.info("OpenAI HTTP front on http://%s:%d (model %s, API key %s)", self.host, self.port, self.names[0],
                 "on" if self.api_key else "off")
        return self.port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --------------------------------------------------------------------------------- middleware
    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            token = ""
        return hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
        try:
            if self.api_key and request.path != "/health" and not self._authorized(request):
                response = _error_response(401, "Unauthorized: a valid API key is required "
                                                "(Authorization: Bearer <key>).")
            else:
                response = await handler(request)
        except HttpError as e:
            if e.status == 400 and not e.counted:
                self.metrics.on_rejected("invalid")
            response = _error_response(e.status, e.message, e.param)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            response = _error_response(e.status, e.reason if e.status != 413 else e.text)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("HTTP %s %s failed", request.method, request.path)
            response = _error_response(500, "Internal server error.")
        self.metrics.on_http(route, request.method, response.status)
        return response

    # ----------------------------------------------------------------------------------- simple routes
    async def _health(self, request):
        if self.scheduler.router.effective_mode() is None:
            return _error_response(503, "No instance can serve requests.")
        return web.json_response({"status": "ok"})

    async def _models(self, request):
        data = [{"id": name, "object": "model", "created": self.created, "owned_by": "jaxserve", "root": self.names[0],
                 "parent": None, "max_model_len": self.scheduler.max_model_len()} for name in self.names]
        return web.json_response({"object": "list", "data": data})

    async def _metrics(self, request):
        return web.Response(body=self.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    # --------------------------------------------------------------------------------------- requests
    async def _body(self, request) -> dict:
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError) as e:
            raise _bad(f"The request body is not valid JSON: {e}.") from None
        if not isinstance(body, dict):
            raise _bad("The request body must be a JSON object.")
        model = body.get("model")
        if model is not None and model not in self.names:
            raise HttpError(404, f"The model `{model}` does not exist.", "model")
        return body

    def _common(self, body: dict, chat: bool):
        _unsupported(body, chat)
        vocab = self.scheduler.model.vocab_size
        sampling, seed = _sampling(body, vocab)
        n = _integer(body, "n")
        n = 1 if n is None else n
        if n < 1:
            raise _bad(f"n must be at least 1, got {n}.", "n")
        if n > 128:
            raise _bad(f"n must be at most 128, got {n}.", "n")
        best_of = _integer(body, "best_of")
        if best_of is not None and best_of != n:
            raise _bad("best_of is not supported by this server (it must equal n).", "best_of")
        stream = _boolean(body, "stream")
        options = body.get("stream_options")
        if options is not None:
            if not stream:
                raise _bad("Stream options can only be defined when `stream=True`.", "stream_options")
            if not isinstance(options, dict):
                raise _bad(f"stream_options must be an object, got {options!r}.", "stream_options")
        include_usage = bool(stream and options and _boolean(options, "include_usage"))
        session = _string(body, "session_id") or ""
        return sampling, seed, n, stream, include_usage, session

    def _requests(self, prompts: list, sampling, seed, n: int, max_tokens, session: str, request_id: str):
        out = []
        for i, prompt in enumerate(prompts):
            for j in range(n):
                r = scheduler_pb2.GenerateRequest(sampling=sampling, session_id=session,
                                                  request_id=f"{request_id}-{i * n + j}")
                if seed is not None:
                    r.sampling.seed = (seed + j) % SEED_LIMIT
                if isinstance(prompt, str):
                    r.text = prompt
                else:
                    r.token_ids.ids.extend(prompt)
                if max_tokens is not None:
                    r.max_tokens = max_tokens
                out.append(r)
        return out

    async def _completions(self, request):
        body = await self._body(request)
        sampling, seed, n, stream, include_usage, session = self._common(body, chat=False)
        prompts = _prompts(body, self.scheduler.model.vocab_size)
        max_tokens = _max_tokens(body, ("max_tokens",))
        echo = _boolean(body, "echo")
        rid = f"cmpl-{uuid.uuid4().hex}"
        reqs = self._requests(prompts, sampling, seed, n, max_tokens, session, rid)
        echoes = [self._prompt_text(p) if echo else "" for p in prompts for _ in range(n)]
        return await self._run(request, reqs, n, stream, include_usage, rid, chat=False, echoes=echoes)

    def _prompt_text(self, prompt) -> str:
        if isinstance(prompt, str):
            return prompt
        tok = self.scheduler.model.tokenizer
        return tok.decode(prompt) if tok is not None else ""

    async def _chat(self, request):
        body = await self._body(request)
        sampling, seed, n, stream, include_usage, session = self._common(body, chat=True)
        messages = _messages(body)
        max_tokens = _max_tokens(body, ("max_completion_tokens", "max_tokens"))
        add_generation_prompt = _boolean(body, "add_generation_prompt", True)
        extra = body.get("chat_template_kwargs") or {}
        if not isinstance(extra, dict):
            raise _bad("chat_template_kwargs must be an object.", "chat_template_kwargs")
        text = self.template.render(messages, add_generation_prompt, **extra)
        tok = self.scheduler.model.tokenizer
        if tok is None:
            raise _bad(f"This scheduler has no tokenizer for model {self.scheduler.model.name!r}: use "
                       "/v1/completions with token ids.")
        ids = tok.encode(text)
        if not ids:
            raise _bad("The prompt cannot be empty.", "messages")
        bos = tok.bos_token_id
        if bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
            ids = ids[1:]  # the template wrote BOS and the tokenizer added another
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        reqs = self._requests([ids], sampling, seed, n, max_tokens, session, rid)
        return await self._run(request, reqs, n, stream, include_usage, rid, chat=True, echoes=[""] * len(reqs))

    # ------------------------------------------------------------------------------------------ running
    async def _start(self, reqs):
        """Start every request and wait for its first response, so that refusals (validation, admission,
        no instance) become the HTTP status. Returns (generators, first responses)."""
        gens = [self.scheduler.generate(r, _Context()) for r in reqs]
        try:
            firsts = await asyncio.gather(*(g.__anext__() for g in gens), return_exceptions=True)
        except BaseException:  # cancelled: the client went away
            await _close(gens)
            raise
        errors = [f for f in firsts if isinstance(f, BaseException)]
        if errors:
            await _close(gens)
            e = next((f for f in errors if isinstance(f, _GenerateAbort)), errors[0])
            if isinstance(e, _GenerateAbort):
                raise e.http()
            if isinstance(e, StopAsyncIteration):
                raise HttpError(500, "The scheduler ended the request without a response.")
            raise e
        return gens, firsts

    async def _responses(self, gens, firsts):
        """(choice index, GenerateResponse) of all choices as they come; raises _GenerateAbort."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i, gen):
            try:
                async for r in gen:
                    await queue.put((i, r, None))
                await queue.put((i, None, None))
            except Exception as e:  # noqa: BLE001 - handed to the consumer
                await queue.put((i, None, e))

        tasks = []
        try:
            for i, first in enumerate(firsts):
                yield i, first
            if len(gens) == 1:
                if not firsts[0].finish_reason:
                    async for r in gens[0]:
                        yield 0, r
                return
            tasks = [asyncio.get_running_loop().create_task(pump(i, g))
                     for i, g in enumerate(gens) if not firsts[i].finish_reason]
            left = len(tasks)
            while left:
                i, r, e = await queue.get()
                if e is not None:
                    raise e
                if r is None:
                    left -= 1
                    continue
                yield i, r
        finally:
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            await _close(gens)

    def _usage(self, usages: list, n: int) -> dict:
        prompt = sum(u.prompt_tokens for k, u in enumerate(usages) if u is not None and k % n == 0)
        cached = sum(u.cached_tokens for k, u in enumerate(usages) if u is not None and k % n == 0)
        completion = sum(u.completion_tokens for u in usages if u is not None)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    async def _run(self, request, reqs, n, stream, include_usage, rid, chat, echoes):
        gens, firsts = await self._start(reqs)
        try:
            return await self._finish(request, gens, firsts, n, stream, include_usage, rid, chat, echoes)
        finally:
            await _close(gens)  # normally closed already; not when the client left before the first write

    async def _finish(self, request, gens, firsts, n, stream, include_usage, rid, chat, echoes):
        model = self.names[0]
        created = int(time.time())
        if stream:
            return await self._stream(request, gens, firsts, n, include_usage, rid, chat, echoes, model, created)
        texts = [[e] for e in echoes]
        finishes: list = [None] * len(gens)
        usages: list = [None] * len(gens)
        try:
            async with contextlib.aclosing(self._responses(gens, firsts)) as responses:
                async for i, r in responses:
                    texts[i].append(r.text)
                    if r.finish_reason:
                        finishes[i] = _FINISH.get(r.finish_reason, "stop")
                        usages[i] = r.usage
        except _GenerateAbort as e:
            raise e.http() from None
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": "".join(t), "tool_calls": []},
                        "logprobs": None, "finish_reason": finishes[i], "stop_reason": None}
                       for i, t in enumerate(texts)]
            obj = "chat.completion"
        else:
            choices = [{"index": i, "text": "".join(t), "logprobs": None, "finish_reason": finishes[i],
                        "stop_reason": None} for i, t in enumerate(texts)]
            obj = "text_completion"
        return web.json_response({"id": rid, "object": obj, "created": created, "model": model, "choices": choices,
                                  "usage": self._usage(usages, n)})

    async def _stream(self, request, gens, firsts, n, include_usage, rid, chat, echoes, model, created):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        obj = "chat.completion.chunk" if chat else "text_completion"
        usages: list = [None] * len(gens)

        def chunk(choices, usage=None, final=False) -> bytes:
            data = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
            if include_usage:
                data["usage"] = usage
            return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"

        def choice(i, text, finish):
            if chat:
                delta = {"content": text} if text else {}
                return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {"index": i, "text": text, "logprobs": None, "finish_reason": finish}

        try:
            await resp.prepare(request)
            for i, echo in enumerate(echoes):
                if chat:
                    await resp.write(chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]))
                elif echo:
                    await resp.write(chunk([choice(i, echo, None)]))
            try:
                async with contextlib.aclosing(self._responses(gens, firsts)) as responses:
                    async for i, r in responses:
                        finish = _FINISH.get(r.finish_reason, "stop") if r.finish_reason else None
                        if finish:
                            usages[i] = r.usage
                        if r.text or finish:
                            await resp.write(chunk([choice(i, r.text, finish)]))
            except _GenerateAbort as e:
                err = e.http()
                await resp.write(b"data: " + json.dumps(error_body(err.status, err.message)).encode() + b"\n\n")
                await resp.write(b"data: [DONE]\n\n")
                return resp
            if include_usage:
                await resp.write(chunk([], self._usage(usages, n)))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionError:
            log.info("request %s: the client went away", rid)
        return resp
