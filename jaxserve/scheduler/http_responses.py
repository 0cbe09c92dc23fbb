"""The OpenAI HTTP front's response side: runs a route's GenerateRequests through the scheduler core, maps
the core's errors to HTTP statuses, and builds the JSON body or the server-sent-event stream (vLLM's shapes:
errors are `{"error": {"message", "type", "param", "code"}}`; a stream that fails after it started ends with
an error event and `data: [DONE]`)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time

from aiohttp import web

from jaxserve.proto.enums import FINISH_REASON_NAMES
from jaxserve.scheduler.core import SchedulerCore
from jaxserve.scheduler.errors import SchedulerError
from jaxserve.scheduler.http_openai import LogprobsFormatter
from jaxserve.scheduler.http_requests import HttpError

log = logging.getLogger("jaxserve.scheduler.http")

_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                405: "MethodNotAllowedError", 408: "RequestTimeoutError", 413: "RequestEntityTooLargeError",
                415: "UnsupportedMediaTypeError",
                429: "RateLimitError", 499: "ClientClosedRequestError", 500: "InternalServerError",
                503: "ServiceUnavailableError", 504: "GatewayTimeoutError"}
# The scheduler core's errors (by their gRPC status name) as HTTP statuses; anything else is a 500.
HTTP_STATUS = {"INVALID_ARGUMENT": 400, "OUT_OF_RANGE": 400, "FAILED_PRECONDITION": 400, "NOT_FOUND": 404,
               "RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504, "CANCELLED": 499}


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "Error"), "param": param,
                      "code": status}}


def error_response(status: int, message: str, param: str | None = None) -> web.Response:
    return web.json_response(error_body(status, message, param), status=status)


def http_error(error: SchedulerError) -> HttpError:
    """A core error as the HTTP error; counted: the core already counted it in the metrics."""
    return HttpError(HTTP_STATUS.get(error.status, 500), str(error), counted=True)


@dataclasses.dataclass(frozen=True)
class Job:
    """One HTTP request's choices: len(echoes) GenerateRequests, n per prompt."""

    rid: str
    model: str
    chat: bool
    n: int
    stream: bool
    include_usage: bool
    echoes: list[str]
    # vLLM's extras (http_openai.py): top logprobs per token (None: no logprobs), usage in every chunk
    # (needs each choice's prompt length), and the tokenizer that names logprob tokens.
    top_logprobs: int | None = None
    continuous_usage: bool = False
    prompt_lens: tuple[int, ...] = ()
    tokenizer: object = None


def _stop_reason(r):
    """A final GenerateResponse's stop_reason as vLLM reports it: the stop token id or string, else None."""
    if not r.HasField("stop_reason"):
        return None
    which = r.stop_reason.WhichOneof("reason")
    return getattr(r.stop_reason, which) if which else None


async def _generate(core: SchedulerCore, request, deadline: float | None):
    valid = core.validate(request)
    async with contextlib.aclosing(core.generate(valid, deadline)) as responses:
        async for response in responses:
            yield response


async def _close(gens) -> None:
    """Close the core's generators: each one's finally releases its admission and cancels its call."""
    for g in gens:
        with contextlib.suppress(Exception):
            await g.aclose()


async def _start(core: SchedulerCore, reqs, deadline: float | None):
    """Start every request and wait for its first response, so that refusals (validation, admission,
    no instance) become the HTTP status. Returns (generators, first responses)."""
    gens = [_generate(core, r, deadline) for r in reqs]
    try:
        firsts = await asyncio.gather(*(g.__anext__() for g in gens), return_exceptions=True)
    except BaseException:  # cancelled: the client went away
        await _close(gens)
        raise
    errors = [f for f in firsts if isinstance(f, BaseException)]
    if errors:
        await _close(gens)
        e = next((f for f in errors if isinstance(f, SchedulerError)), errors[0])
        if isinstance(e, SchedulerError):
            raise http_error(e)
        if isinstance(e, StopAsyncIteration):
            raise HttpError(500, "The scheduler ended the request without a response.")
        raise e
    return gens, firsts


async def _responses(gens, firsts):
    """(choice index, GenerateResponse) of all choices as they come; raises SchedulerError."""
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


def _usage(usages: list, n: int) -> dict:
    prompt = sum(u.prompt_tokens for k, u in enumerate(usages) if u is not None and k % n == 0)
    cached = sum(u.cached_tokens for k, u in enumerate(usages) if u is not None and k % n == 0)
    completion = sum(u.completion_tokens for u in usages if u is not None)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _finish_name(code: int) -> str:
    return FINISH_REASON_NAMES.get(code, "stop")


async def respond(request: web.Request, core: SchedulerCore, reqs, job: Job,
                  deadline: float | None = None) -> web.StreamResponse:
    """Run the job's requests (deadline: time.monotonic(), None for none) and answer the HTTP request."""
    gens, firsts = await _start(core, reqs, deadline)
    try:
        if job.stream:
            return await _stream(request, gens, firsts, job, core.step_trace, reqs)
        return await _complete(gens, firsts, job)
    finally:
        await _close(gens)  # normally closed already; not when the client left before the first write


async def _complete(gens, firsts, job: Job) -> web.Response:
    created = int(time.time())
    texts = [[e] for e in job.echoes]
    finishes: list = [None] * len(gens)
    stops: list = [None] * len(gens)
    usages: list = [None] * len(gens)
    fmt = LogprobsFormatter(job.tokenizer, job.chat, job.top_logprobs or 0)
    logprobs = [fmt.empty() if job.top_logprobs is not None else None for _ in gens]
    offsets = [len(e) for e in job.echoes]
    try:
        async with contextlib.aclosing(_responses(gens, firsts)) as responses:
            async for i, r in responses:
                texts[i].append(r.text)
                if logprobs[i] is not None:
                    offsets[i] = fmt.add(logprobs[i], r.token_ids, r.logprobs, offsets[i])
                if r.finish_reason:
                    finishes[i] = _finish_name(r.finish_reason)
                    stops[i] = _stop_reason(r)
                    usages[i] = r.usage
    except SchedulerError as e:
        raise http_error(e) from None
    if job.chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": "".join(t), "tool_calls": []},
                    "logprobs": logprobs[i], "finish_reason": finishes[i], "stop_reason": stops[i]}
                   for i, t in enumerate(texts)]
        obj = "chat.completion"
    else:
        choices = [{"index": i, "text": "".join(t), "logprobs": logprobs[i], "finish_reason": finishes[i],
                    "stop_reason": stops[i]} for i, t in enumerate(texts)]
        obj = "text_completion"
    return web.json_response({"id": job.rid, "object": obj, "created": created, "model": job.model,
                              "choices": choices, "usage": _usage(usages, job.n)})


def sse_head(rid: str, obj: str, created: int, model: str) -> bytes:
    """The bytes of a chunk event up to its choices, as `json.dumps` writes them (see `token_event`)."""
    return ("data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": model},
                                  ensure_ascii=False)[:-1] + ', "choices": [').encode()


def token_event(head: bytes, i: int, text: str, chat: bool, usage_null: bool = False) -> bytes:
    """One token's chunk event without logprobs, finish or running usage (usage_null: with `"usage": null`, as
    when the final chunk carries the usage): the same bytes as json.dumps of the whole chunk, at half its
    cost (the hot path: one event per generated token per request)."""
    t = json.dumps(text, ensure_ascii=False)
    end = ', "usage": null}\n\n' if usage_null else '}\n\n'
    if chat:
        body = f'{{"index": {i}, "delta": {{"content": {t}}}, "logprobs": null, "finish_reason": null}}]{end}'
    else:
        body = f'{{"index": {i}, "text": {t}, "logprobs": null, "finish_reason": null}}]{end}'
    return head + body.encode()


async def _stream(request, gens, firsts, job: Job, trace=None, reqs=()) -> web.StreamResponse:
    """The SSE answer. trace: the core's step trace (None: off), told when each choice's first token is written
    (`reqs[i]`: choice i's request)."""
    created = int(time.time())
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    chat = job.chat
    obj = "chat.completion.chunk" if chat else "text_completion"
    usages: list = [None] * len(gens)
    fmt = LogprobsFormatter(job.tokenizer, chat, job.top_logprobs or 0)
    offsets = [len(e) for e in job.echoes]
    generated = [0] * len(gens)

    def running_usage(i) -> dict | None:
        """continuous_usage_stats: this choice's counts so far (vLLM reports them per choice)."""
        if not job.continuous_usage:
            return None
        prompt = job.prompt_lens[i] if i < len(job.prompt_lens) else 0
        return {"prompt_tokens": prompt, "completion_tokens": generated[i], "total_tokens": prompt + generated[i]}

    head = sse_head(job.rid, obj, created, job.model)
    plain = not job.continuous_usage  # token events may take `token_event`

    def chunk(choices, usage=None) -> bytes:
        data = {"id": job.rid, "object": obj, "created": created, "model": job.model, "choices": choices}
        if job.include_usage or job.continuous_usage:
            data["usage"] = usage
        return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"

    def choice(i, text, finish, logprobs=None, stop_reason=None, token=False):
        extra = {} if finish is None else {"stop_reason": stop_reason}
        if chat:
            delta = {"content": text} if text or token else {}
            return {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish, **extra}
        return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish, **extra}

    def token_logprobs(i, token_id, lp):
        if job.top_logprobs is None:
            return None
        acc = fmt.empty()
        offsets[i] = fmt.add(acc, [token_id], [lp], offsets[i])
        return acc

    def events(i, r):
        """One event per generated token (vLLM), the response's text on its last token; a response without
        tokens (a final one after everything was sent) is one event."""
        finish = _finish_name(r.finish_reason) if r.finish_reason else None
        stop = _stop_reason(r) if finish else None
        ids = list(r.token_ids)
        if not ids:
            return [chunk([choice(i, r.text, finish, None, stop)], running_usage(i))] if r.text or finish else []
        lps = list(r.logprobs) if len(r.logprobs) == len(ids) else [None] * len(ids)
        out = []
        for j, (tid, lp) in enumerate(zip(ids, lps)):
            last = j == len(ids) - 1
            generated[i] += 1
            if plain and lp is None and (not last or finish is None):
                out.append(token_event(head, i, r.text if last else "", chat, job.include_usage))
                continue
            out.append(chunk([choice(i, r.text if last else "", finish if last else None,
                                     token_logprobs(i, tid, lp) if lp is not None else None,
                                     stop if last else None, token=True)], running_usage(i)))
        return out

    try:
        await resp.prepare(request)
        for i, echo in enumerate(job.echoes):
            if chat:
                await resp.write(chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}]))
            if echo:
                await resp.write(chunk([choice(i, echo, None)]))
        try:
            async with contextlib.aclosing(_responses(gens, firsts)) as responses:
                async for i, r in responses:
                    if r.finish_reason:
                        usages[i] = r.usage
                    out = events(i, r)
                    if out:  # one write (one syscall) per response, still one SSE event per token
                        await resp.write(out[0] if len(out) == 1 else b"".join(out))
                        if trace is not None and r.token_ids and generated[i] == len(r.token_ids):
                            trace("first_write", request_id=reqs[i].request_id)
        except SchedulerError as e:
            err = http_error(e)
            await resp.write(b"data: " + json.dumps(error_body(err.status, err.message)).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            return resp
        if job.include_usage:
            await resp.write(chunk([], _usage(usages, job.n)))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    except ConnectionError:
        log.info("request %s: the client went away", job.rid)
    return resp
