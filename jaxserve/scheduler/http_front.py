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

Requests take the same internal path as gRPC `Scheduler.Generate`: the scheduler core's `validate` and
`generate` are called directly (no loopback call), so validation, admission, routing, migration and metrics
are the same, and so is the wording of every 400 (vLLM's). The core's errors map to HTTP statuses
(`http_responses.HTTP_STATUS`): 400 bad input, 401 missing/wrong API key, 404 unknown model or route, 429
the scheduler's admission queue is full, 503 no instance can serve, 504 deadline (an optional
`X-Request-Timeout: <seconds>` header sets the request's deadline; without it there is none). Errors are
`{"error": {"message", "type", "param", "code"}}` (vLLM's shape: `type` is the status's class name, `code`
the status). A stream that fails after it started ends with an error event and `data: [DONE]`.

Modules: `http_requests` (body parsing and checks), `chat_template`, `http_responses` (running the requests,
JSON and SSE bodies); this one holds the app, its middleware (API key, errors, metrics) and the routes.

Sampling fields: temperature (default 1.0 as in the OpenAI API), top_p, top_k, seed, stop,
stop_token_ids, ignore_eos, max_tokens (chat: max_completion_tokens or max_tokens; absent: the scheduler's
default_max_tokens), n (n > 1 runs n requests; with a seed, copy j uses seed + j), echo (completions).
Extensions: session_id (routing affinity for the `session` policy), cache_salt (vLLM's: requests with
different salts never share prefix-cache KV; with the scheduler's salt_cache_by_api_key the salt is also
bound to the presented API key, so tenants never share whatever salt they send; `api_key` may be a list).
Refused with 400 because the engine cannot do them: logprobs, top_logprobs, best_of > n, suffix, non-zero presence/frequency penalties,
repetition_penalty != 1, logit_bias, response_format other than text, tools (unless tool_choice is "none"),
non-text content parts.

Limits (issue 16; HttpFront arguments, `--http_max_*` flags of jaxserve.launch.scheduler): every string and key in
a body must be valid Unicode (a lone surrogate such as \\ud800 is a 400 naming the field), bodies nest at
most `max_json_depth` (64) deep (checked without recursion), a request asks for at most
`max_completions_per_request` (256) prompts x n, and its prompts total at most `max_prompt_bytes` (4 MiB;
UTF-8 text, 4 bytes per token id), checked before anything is tokenized. chat_template_kwargs may not set
messages, add_generation_prompt, bos_token or eos_token. Each is a 400 naming the limit. Connections:
a connection that has not sent a whole request line and headers `header_timeout_s` (10 s) after it opened or
after its last response is closed (slowloris); a body not received within `body_timeout_s` (30 s) is a 408
and the connection closes; beyond `max_connections` (1024) open connections requests get 503 and their
connection closes, while /health still answers.

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
import hmac
import json
import logging
import time
import uuid
from pathlib import Path

from aiohttp import web

from jaxserve.scheduler import http_openai as ho
from jaxserve.scheduler import http_requests as hr
from jaxserve.scheduler.chat_template import ChatTemplate, load_template, special_token
from jaxserve.scheduler.http_requests import HttpError, bad_request
from jaxserve.scheduler.http_responses import Job, error_response, respond
from jaxserve.scheduler.metrics import CONTENT_TYPE, SchedulerMetrics, kv_bytes_per_token
from jaxserve.scheduler.tokenizer import resolve_model_path
from jaxserve.scheduler.validation import tenant_cache_salt
from jaxserve.security import TlsFiles, check_bind

log = logging.getLogger("jaxserve.scheduler.http")


class HttpFront:
    def __init__(self, scheduler, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                 served_model_names: list[str] | None = None, chat_template: str | None = None,
                 model_path=None, metrics: SchedulerMetrics | None = None, shutdown_grace_s: float = 1.0,
                 max_body_bytes: int = 64 << 20, max_json_depth: int = 64, max_completions_per_request: int = 256,
                 max_prompt_bytes: int = 4 << 20, tls: TlsFiles | None = None, insecure: bool = False,
                 header_timeout_s: float = 10.0, body_timeout_s: float = 30.0, max_connections: int = 1024):
        """tls: serve HTTPS with tls.cert_file / key_file; insecure: allow a non-loopback bind without an
        API key; api_key: one key, several comma-separated or a list (one per tenant)."""
        self.scheduler = scheduler
        self.tls = tls
        self.insecure = insecure
        self.host = host
        self.requested_port = port
        # One key, or several (one per tenant: with the scheduler's salt_cache_by_api_key they never share KV).
        keys = api_key.split(",") if isinstance(api_key, str) else list(api_key or ())
        self.api_keys = [k for k in keys if k]
        self.api_key = self.api_keys[0] if self.api_keys else None
        self.names = list(served_model_names or [scheduler.model.name])
        folder = Path(model_path) if model_path is not None else resolve_model_path(scheduler.model.name)
        folder = folder if folder.is_dir() else None
        self.template = ChatTemplate(load_template(folder, chat_template), special_token(folder, "bos_token"),
                                     special_token(folder, "eos_token"))
        if metrics is None:
            metrics = scheduler.observer if isinstance(scheduler.observer, SchedulerMetrics) else None
        if metrics is None:
            metrics = SchedulerMetrics(scheduler, self.names[0],
                                       kv_bytes_per_token(folder) if folder is not None else 0)
            if scheduler.observer is None:
                scheduler.observer = metrics
        self.metrics = metrics
        self.shutdown_grace_s = shutdown_grace_s
        self.max_json_depth = max_json_depth
        self.max_completions_per_request = max_completions_per_request
        self.max_prompt_bytes = max_prompt_bytes
        for name, value in (("header_timeout_s", header_timeout_s), ("body_timeout_s", body_timeout_s),
                            ("max_connections", max_connections)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.max_connections = max_connections
        self.created = int(time.time())
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        app = web.Application(middlewares=[self._middleware], client_max_size=max_body_bytes)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_post("/detokenize", self._detokenize)
        app.router.add_get("/version", self._version)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        self.app = app

    async def start(self) -> int:
        check_bind(self.host, self.api_key, self.insecure, "HTTP front")
        ssl_context = self.tls.ssl_context() if self.tls is not None else None
        # aiohttp closes a connection that has not sent a whole request line and headers within the keep-alive
        # timeout, counted from the connection's start and from the end of each response: our header timeout
        # (slowloris holding connections with half-sent headers).
        runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None,
                               shutdown_timeout=self.shutdown_grace_s, keepalive_timeout=self.header_timeout_s)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.requested_port, ssl_context=ssl_context)
        await site.start()
        self._runner = runner
        self.port = runner.addresses[0][1]
        log.info("OpenAI HTTP front on %s (model %s, API key %s)", self.url, self.names[0],
                 "on" if self.api_key else "off")
        return self.port

    @property
    def url(self) -> str:
        return f"{'https' if self.tls is not None else 'http'}://{self.host}:{self.port}"

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
        token = token.strip().encode()
        # Every key compared, so the time taken says nothing about which one (if any) matched.
        return sum(hmac.compare_digest(token, key.encode()) for key in self.api_keys) > 0

    def _salt(self, request: web.Request, body: dict, reqs) -> None:
        """Sets each request's cache_salt: the body's, bound to the presented API key when the scheduler
        salts by key (tenant isolation of the prefix cache)."""
        salt = hr.cache_salt(body)
        if self.scheduler.config.salt_cache_by_api_key:
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            salt = tenant_cache_salt(token.strip() if scheme.lower() == "bearer" else "", salt)
        for r in reqs:
            r.cache_salt = salt

    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
        try:
            if request.path != "/health" and self._over_capacity():
                response = error_response(503, f"Too many connections: this server serves at most "
                                               f"{self.max_connections} at once; try again later.")
                response.force_close()
            elif self.api_key and request.path != "/health" and not self._authorized(request):
                response = error_response(401, "Unauthorized: a valid API key is required "
                                                "(Authorization: Bearer <key>).")
            else:
                response = await handler(request)
        except HttpError as e:
            if e.status == 400 and not e.counted:
                self.metrics.on_rejected("invalid")
            response = error_response(e.status, e.message, e.param)
            if e.status == 408:
                response.force_close()  # the rest of a half-sent body is never read: the connection ends
        except web.HTTPException as e:
            if e.status < 400:
                raise
            response = error_response(e.status, e.reason if e.status != 413 else e.text)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("HTTP %s %s failed", request.method, request.path)
            response = error_response(500, "Internal server error.")
        self.metrics.on_http(route, request.method, response.status)
        return response

    def _over_capacity(self) -> bool:
        """More connections open than max_connections (the newest get 503 and are closed; /health still
        answers, so a full server is not mistaken for a dead one)."""
        server = self._runner.server if self._runner is not None else None
        return server is not None and len(server.connections) > self.max_connections

    # ----------------------------------------------------------------------------------- simple routes
    async def _health(self, request):
        if self.scheduler.router.effective_mode() is None:
            return error_response(503, "No instance can serve requests.")
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
            data = await asyncio.wait_for(request.read(), self.body_timeout_s)
        except asyncio.TimeoutError:
            raise HttpError(408, f"The request body did not arrive within {self.body_timeout_s:g} s "
                                 "(body_timeout_s).") from None
        try:
            body = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise bad_request(f"The request body is not valid JSON: {e}.") from None
        except RecursionError:
            raise bad_request(f"The request body is nested too deeply: JSON arrays and objects may nest at most "
                              f"{self.max_json_depth} deep.") from None
        if not isinstance(body, dict):
            raise bad_request("The request body must be a JSON object.")
        hr.check_json(body, self.max_json_depth)
        model = body.get("model")
        if model is not None and model not in self.names:
            raise HttpError(404, f"The model `{model}` does not exist.", "model")
        return body

    async def _completions(self, request):
        t0 = time.time()  # the step trace's `http_in`: parsing and validation count as the front's
        body = await self._body(request)
        vocab = self.scheduler.model.vocab_size
        sampling, seed, n, stream, include_usage, session = hr.options(body, False, vocab)
        ho.set_extras(body, False, sampling, vocab)
        prompts = hr.prompts(body, vocab)
        hr.check_fanout(len(prompts), n, self.max_completions_per_request)
        hr.check_prompt_bytes(hr.prompt_bytes(prompts), self.max_prompt_bytes, "prompt")
        max_tokens = hr.max_tokens(body, ("max_tokens",))
        echo = hr.boolean(body, "echo")
        if echo and sampling.HasField("logprobs"):
            raise bad_request("echo together with logprobs needs prompt logprobs, which this server does not "
                              "compute: drop one of them.", "echo")
        rid = f"cmpl-{uuid.uuid4().hex}"
        reqs = hr.generate_requests(prompts, sampling, seed, n, max_tokens, session, rid)
        self._salt(request, body, reqs)
        echoes = [self._prompt_text(p) if echo else "" for p in prompts for _ in range(n)]
        return await self._run(request, t0, reqs, Job(rid, self.names[0], False, n, stream, include_usage, echoes,
                                                  **self._extras(body, sampling, prompts, n, stream)))

    def _extras(self, body, sampling, prompts, n: int, stream: bool) -> dict:
        """The Job's extras (http_openai.py): logprobs count, continuous usage and the prompt lengths it needs."""
        continuous = stream and ho.check_stream_options(body.get("stream_options"))
        tok = self.scheduler.model.tokenizer
        lens = ()
        if continuous:
            lens = tuple(len(p) if not isinstance(p, str) else len(tok.encode(p)) if tok is not None else 0
                         for p in prompts for _ in range(n))
        return dict(top_logprobs=sampling.logprobs if sampling.HasField("logprobs") else None,
                    continuous_usage=continuous, prompt_lens=lens, tokenizer=tok)

    def _prompt_text(self, prompt) -> str:
        if isinstance(prompt, str):
            return prompt
        tok = self.scheduler.model.tokenizer
        return tok.decode(prompt) if tok is not None else ""

    async def _chat(self, request):
        t0 = time.time()  # the step trace's `http_in`
        body = await self._body(request)
        sampling, seed, n, stream, include_usage, session = hr.options(body, True, self.scheduler.model.vocab_size)
        ho.set_extras(body, True, sampling, self.scheduler.model.vocab_size)
        messages = hr.messages(body)
        hr.check_fanout(1, n, self.max_completions_per_request)
        hr.check_prompt_bytes(sum(len((m["content"] or "").encode("utf-8")) for m in messages),
                              self.max_prompt_bytes, "messages")
        max_tokens = hr.max_tokens(body, ("max_completion_tokens", "max_tokens"))
        add_generation_prompt = hr.boolean(body, "add_generation_prompt", True)
        extra = hr.template_kwargs(body)
        text = self.template.render(messages, add_generation_prompt, **extra)
        hr.check_prompt_bytes(len(text.encode("utf-8")), self.max_prompt_bytes, "messages")
        tok = self.scheduler.model.tokenizer
        if tok is None:
            raise bad_request(f"This scheduler has no tokenizer for model {self.scheduler.model.name!r}: use "
                              "/v1/completions with token ids.")
        ids = tok.encode(text)
        if not ids:
            raise bad_request("The prompt cannot be empty.", "messages")
        bos = tok.bos_token_id
        if bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
            ids = ids[1:]  # the template wrote BOS and the tokenizer added another
        if max_tokens is None:  # vLLM: the rest of the context, not a fixed default
            max_tokens = max(self.scheduler.max_model_len() - len(ids), 1)
        # vLLM's chat echo: the last message, when it is the assistant's, starts the answer.
        echo = (messages[-1]["content"] or "") if hr.boolean(body, "echo") and messages[-1]["role"] == "assistant" \
            else ""
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        reqs = hr.generate_requests([ids], sampling, seed, n, max_tokens, session, rid)
        self._salt(request, body, reqs)
        return await self._run(request, t0, reqs, Job(rid, self.names[0], True, n, stream, include_usage,
                                                  [echo] * len(reqs), **self._extras(body, sampling, [ids], n, stream)))

    # ------------------------------------------------------------------------ tokenize / detokenize / version
    async def _tokenize(self, request):
        """vLLM's /tokenize: {"prompt"} or {"messages"} -> {"tokens", "count", "max_model_len"}."""
        body = await self._body(request)
        tok = self._tokenizer()
        if "messages" in body:
            messages = hr.messages(body)
            text = self.template.render(messages, hr.boolean(body, "add_generation_prompt", True),
                                        **hr.template_kwargs(body))
        else:
            text = body.get("prompt")
            if not isinstance(text, str):
                raise bad_request(f"prompt must be a string, got {text!r:.80}.", "prompt")
        hr.check_prompt_bytes(len(text.encode("utf-8")), self.max_prompt_bytes, "prompt")
        ids = tok.encode(text)
        if not hr.boolean(body, "add_special_tokens", True) and tok.bos_token_id is not None and ids[:1] == [
                tok.bos_token_id]:
            ids = ids[1:]
        return web.json_response({"tokens": ids, "count": len(ids), "max_model_len": self.scheduler.max_model_len()})

    async def _detokenize(self, request):
        """vLLM's /detokenize: {"tokens": [ids]} -> {"prompt": text}."""
        body = await self._body(request)
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(hr._is_int(t) for t in ids):
            raise bad_request(f"tokens must be a list of token ids, got {ids!r:.80}.", "tokens")
        vocab = self.scheduler.model.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_request(f"Token id {bad} is out of vocabulary [0, {vocab}).", "tokens")
        return web.json_response({"prompt": self._tokenizer().decode(ids)})

    async def _version(self, request):
        from importlib import metadata
        try:
            version = metadata.version("jaxserve")
        except metadata.PackageNotFoundError:
            version = "unknown"
        return web.json_response({"version": version})

    def _tokenizer(self):
        tok = self.scheduler.model.tokenizer
        if tok is None:
            raise bad_request(f"This scheduler has no tokenizer for model {self.scheduler.model.name!r}.")
        return tok

    async def _run(self, request, t0: float, reqs, job: Job):
        """The requests through the scheduler core (the same path as gRPC Generate, no loopback call)."""
        trace = self.scheduler.core.step_trace
        if trace is not None:
            trace("http_in", t0=t0, request_ids=[r.request_id for r in reqs], stream=job.stream)
        return await respond(request, self.scheduler.core, reqs, job, self._deadline(request))

    def _deadline(self, request) -> float | None:
        """The request's deadline (time.monotonic()) from its X-Request-Timeout header (seconds), if any."""
        value = request.headers.get("X-Request-Timeout")
        if value is None:
            return None
        try:
            seconds = float(value)
        except ValueError:
            raise bad_request(f"X-Request-Timeout must be a number of seconds, got {value!r}.") from None
        if not seconds > 0 or seconds == float("inf"):
            raise bad_request(f"X-Request-Timeout must be a positive number of seconds, got {value!r}.")
        return time.monotonic() + seconds
