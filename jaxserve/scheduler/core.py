"""The scheduler core, one for both fronts: `validate` a request, then `generate(valid, deadline)` admits it,
routes it with the prompt trees and the policy, proxies the instances' token streams with incremental text,
and moves it to another instance when its instance fails. It raises `jaxserve.scheduler.errors` and knows
nothing of the client's transport: the gRPC servicer and the HTTP front map those errors to their codes.

    valid = core.validate(request)                     # raises InvalidRequest
    async for response in core.generate(valid, deadline=time.monotonic() + 30):
        ...                                            # raises Overloaded, Unavailable, DeadlineExceeded, ...

Cancellation is the caller's: closing the generator (or cancelling the task iterating it) cancels the
instance call and releases the request's admission."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

import grpc

from jaxserve.cache_salt import salt_tokens
from jaxserve.proto.messages import FAILED_PEER_DECODE, FAILED_PEER_KEY
from jaxserve.proto.v1 import common_pb2, instance_pb2, scheduler_pb2
from jaxserve.scheduler.config import GlobalSchedulerConfig
from jaxserve.scheduler.errors import DeadlineExceeded, InstanceError, Overloaded, SchedulerError, Unavailable
from jaxserve.scheduler.instances import InstanceRegistry, cancelled_from_outside
from jaxserve.scheduler.mux import open_generate
from jaxserve.scheduler.router import InstanceRecord, RouteDecision
from jaxserve.scheduler.tokenizer import ModelInfo, TextStream
from jaxserve.scheduler.validation import ValidRequest, validate

log = logging.getLogger("jaxserve.scheduler")

STOP = common_pb2.FINISH_REASON_STOP
LENGTH = common_pb2.FINISH_REASON_LENGTH

# Instance errors after which the request goes to another instance. An instance that is full
# (RESOURCE_EXHAUSTED) or draining (UNAVAILABLE) is not broken, but another one may take the request.
_MIGRATE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED,
                            grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNKNOWN,
                            grpc.StatusCode.INTERNAL})
# Of those, the ones that say the instance itself may be gone: probe it now.
_SUSPECT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
                            grpc.StatusCode.INTERNAL})


def _decode_target_failed(error: grpc.aio.AioRpcError) -> bool:
    """A failed Prefill says its decode target failed the KV transfer (trailing metadata)."""
    metadata = error.trailing_metadata() or ()
    return any(k == FAILED_PEER_KEY and v == FAILED_PEER_DECODE for k, v in metadata)


async def _abort_quietly(record: InstanceRecord, request_id: str) -> None:
    stub = record.stub
    if stub is None:
        return
    with contextlib.suppress(Exception):
        await stub.Abort(instance_pb2.AbortRequest(request_id=request_id), timeout=5.0)


class _InstanceFailed(Exception):
    """The request must move to another instance."""

    def __init__(self, record: InstanceRecord, reason: str):
        super().__init__(reason)
        self.record = record
        self.reason = reason


class Admission:
    """The bounded queue: requests admitted and not finished, counted in requests and in tokens (prompt +
    max_tokens, the most a request can hold)."""

    def __init__(self, max_requests: int, max_tokens: int):
        self.max_requests, self.max_tokens = max_requests, max_tokens
        self.requests = self.tokens = 0

    def admit(self, tokens: int) -> str | None:
        """Admits and returns None, or returns why not."""
        if tokens > self.max_tokens:
            return (f"This request needs {tokens} tokens (prompt + max_tokens), more than the scheduler's queue "
                    f"limit of {self.max_tokens} tokens.")
        if self.requests + 1 > self.max_requests or self.tokens + tokens > self.max_tokens:
            return (f"The scheduler's queue is full: {self.requests} requests holding {self.tokens} tokens are "
                    f"queued or running (limits: {self.max_requests} requests, {self.max_tokens} tokens) and "
                    f"this request needs {tokens} tokens. Retry later.")
        self.requests += 1
        self.tokens += tokens
        return None

    def release(self, tokens: int) -> None:
        self.requests -= 1
        self.tokens -= tokens


class _Attempt:
    """One call to one instance on a request's behalf; keeps the instance's load accounting right and lets
    the health monitor cut the call when the instance is declared dead."""

    __slots__ = ("record", "estimate_s", "prefilling", "call", "lost", "finished", "on_close")

    def __init__(self, record: InstanceRecord, estimate_s: float, on_close):
        self.record, self.estimate_s = record, estimate_s
        self.prefilling = True
        self.call = None
        self.lost: str | None = None
        self.finished = False
        self.on_close = on_close
        record.in_flight_requests += 1
        record.pending_prefill_s += estimate_s
        record.attempts.add(self)

    def prefill_done(self) -> None:
        if self.prefilling:
            self.prefilling = False
            self.record.pending_prefill_s = max(self.record.pending_prefill_s - self.estimate_s, 0.0)

    def mark_lost(self, reason: str) -> None:
        self.lost = reason
        if self.call is not None:
            self.call.cancel()

    def close(self) -> None:
        if self.record is None:
            return
        self.prefill_done()
        if self.call is not None and not self.finished:
            self.call.cancel()  # the request ended early (client gone, stop string): the instance frees it
        self.record.in_flight_requests -= 1
        self.record.attempts.discard(self)
        self.on_close(self.record)
        self.record = None


async def _read(call, attempt: _Attempt, stall_timeout_s: float | None):
    """The next message of an instance stream (grpc.aio.EOF at the end), with failures classified.
    stall_timeout_s: how long a stream that has started may go quiet before its instance counts as failed
    (the health probe cannot see an engine that hangs behind a live gRPC server)."""
    try:
        if stall_timeout_s is None or attempt.prefilling:
            return await call.read()
        return await asyncio.wait_for(call.read(), stall_timeout_s)
    except asyncio.TimeoutError:
        raise _InstanceFailed(attempt.record, f"instance {attempt.record.instance_id} sent nothing for "
                                              f"{stall_timeout_s:g} s") from None
    except asyncio.CancelledError:
        if attempt.lost is not None and not cancelled_from_outside():
            raise _InstanceFailed(attempt.record, attempt.lost) from None
        raise


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


class SchedulerCore:
    """Admission, routing, streaming and migration of client requests, with the scheduler's request stats."""

    def __init__(self, config: GlobalSchedulerConfig, model: ModelInfo, instances: InstanceRegistry,
                 observer=None):
        self.config = config
        self.model = model
        self.instances = instances
        self.router = instances.router
        # Metrics hooks (`jaxserve.scheduler.metrics.SchedulerMetrics` or None): on_rejected, on_failed,
        # on_route, on_migration, on_kv_transfer, on_finished. Called on the event loop; must not block.
        self.observer = observer
        # `step_trace(event, **fields)` records a served request's milestones (`--step_trace`); None: off.
        self.step_trace = None
        self.admission = Admission(config.max_queued_requests, config.max_queued_tokens)
        self.stats = dict(num_requests=0, num_rejected=0, num_failed=0, num_migrations=0, prompt_tokens=0,
                          cached_tokens=0, predicted_cached_tokens=0)
        # Peer fetch (issue 18): prefixes pushed by their holders ahead of a request, and failed pushes.
        self.peer_fetch = dict(tokens=0, bytes=0, failures=0)

    # ------------------------------------------------------------------------------------- entry points
    def validate(self, request: scheduler_pb2.GenerateRequest) -> ValidRequest:
        """The request tokenized and checked; raises InvalidRequest (counted as a rejection)."""
        arrival = time.monotonic()
        try:
            return validate(request, self.model, self.instances.max_model_len(), self.config.default_max_tokens,
                            request.request_id or uuid.uuid4().hex, arrival, self.config.max_prompt_bytes)
        except SchedulerError:
            self.stats["num_rejected"] += 1
            if self.observer is not None:
                self.observer.on_rejected("invalid")
            raise

    async def generate(self, valid: ValidRequest, deadline: float | None = None):
        """An async generator of GenerateResponse for a validated request; the last one has finish_reason
        and usage. deadline: time.monotonic() by which the request must be done (None: no deadline).
        Raises Overloaded (admission queue full), Unavailable, DeadlineExceeded or InstanceError."""
        budget = len(valid.prompt_ids) + valid.max_tokens
        refused = self.admission.admit(budget)
        if refused is not None:
            self.stats["num_rejected"] += 1
            if self.observer is not None:
                self.observer.on_rejected("over_capacity")
            raise Overloaded(refused)
        try:
            async with contextlib.aclosing(self._serve(valid, deadline)) as responses:
                async for response in responses:
                    yield response
        except SchedulerError as e:
            self.stats["num_failed"] += 1
            if self.observer is not None:
                self.observer.on_failed(e.status)
            raise
        finally:
            self.admission.release(budget)
            self.stats["num_requests"] += 1

    # ------------------------------------------------------------------------------------------ routing
    async def _route(self, valid: ValidRequest, exclude: set[str], deadline: float | None,
                     failures: list[str]) -> RouteDecision:
        """A routing decision, waiting up to no_instance_wait_s (within the deadline) for an instance."""
        wait_until = time.monotonic() + self.config.no_instance_wait_s
        if deadline is not None:
            wait_until = min(wait_until, deadline)
        while True:
            # The prompt trees hold the instances' index keys: salted for a salted request.
            decision = self.router.route(tuple(salt_tokens(valid.prompt_ids, valid.cache_salt)), valid.session_id,
                                         exclude)
            if decision is not None:
                return decision
            left = wait_until - time.monotonic()
            if left <= 0:
                if self.observer is not None:
                    self.observer.on_route(None)
                registered = len(self.router.instances)
                why = "; ".join(failures) if failures else f"{registered} instances registered, none can take it"
                raise Unavailable(f"No instance could serve request {valid.request_id} "
                                  f"(waited {self.config.no_instance_wait_s:g} s): {why}.")
            await self.instances.wait_changed(left)

    # ---------------------------------------------------------------------------------- instance calls
    @staticmethod
    def _instance_request(valid: ValidRequest, generated: list[int]) -> instance_pb2.InstanceGenerateRequest:
        return instance_pb2.InstanceGenerateRequest(
            request_id=valid.request_id, prompt_token_ids=valid.prompt_ids, generated_token_ids=generated,
            max_tokens=valid.max_tokens - len(generated), sampling=valid.sampling, session_id=valid.session_id,
            cache_salt=valid.cache_salt)

    def _classify(self, record: InstanceRecord, error: grpc.aio.AioRpcError) -> Exception:
        code = error.code()
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            # The instance does not accept our cluster secret: a misconfigured instance, not the client's
            # fault. Out of routing; the request moves to an instance that does.
            log.error("instance %s refuses the scheduler's credentials (%s): check its --cluster_secret",
                      record.instance_id, error.details())
            self.instances.retire(record, "refused the scheduler's cluster secret", lost=True)
            return _InstanceFailed(record, f"instance {record.instance_id} refused the scheduler's credentials")
        if code in _MIGRATE_CODES:
            if code in _SUSPECT_CODES:
                self.instances.suspect(record)
            return _InstanceFailed(record, f"instance {record.instance_id} failed: {code.name}: {error.details()}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceeded(f"Deadline exceeded while instance {record.instance_id} was serving the "
                                    "request.")
        return InstanceError(f"Instance {record.instance_id}: {error.details()}", code.name)

    def _attempt(self, record: InstanceRecord, estimate_s: float) -> _Attempt:
        return _Attempt(record, estimate_s, self.instances.on_attempt_closed)

    async def _stream_from(self, call, attempt: _Attempt):
        """Yield (token_ids, finish_reason, usage, logprobs, stop_reason) from an instance's token stream."""
        record = attempt.record
        while True:
            try:
                resp = await _read(call, attempt, self.config.stall_timeout_s)
            except grpc.aio.AioRpcError as e:
                raise self._classify(record, e) from None
            except _InstanceFailed:
                self.instances.suspect(record)
                raise
            if resp is grpc.aio.EOF:
                raise _InstanceFailed(record, f"instance {record.instance_id} ended the stream without a finish "
                                              "reason")
            if resp.token_ids:
                attempt.prefill_done()
            usage = resp.usage if resp.HasField("usage") else None
            if resp.finish_reason:
                attempt.finished = True  # the call ends on its own (OK status); no need to cancel it
            yield (list(resp.token_ids), resp.finish_reason, usage, list(resp.logprobs),
                   resp.stop_reason if resp.HasField("stop_reason") else None)
            if resp.finish_reason:
                return

    async def _colocated(self, decision: RouteDecision, valid: ValidRequest, generated: list[int],
                         deadline: float | None):
        attempt = self._attempt(decision.instance, decision.estimate_s)
        try:
            if decision.pull_from is not None and not generated:
                await self._peer_fetch(decision, decision.instance, valid, deadline)
            request = self._instance_request(valid, list(generated))
            attempt.call = open_generate(decision.instance, request, deadline, _remaining(deadline),
                                         shared=self.config.generate_many)
            async with contextlib.aclosing(self._stream_from(attempt.call, attempt)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            attempt.close()

    async def _peer_fetch(self, decision: RouteDecision, target: InstanceRecord, valid: ValidRequest,
                          deadline: float | None) -> None:
        """The prefix's holder pushes it to `target` (the colocated or prefill instance the request goes to;
        PushKv) before the request goes there; any failure (holder gone, transfer broken, too slow) only
        means the instance recomputes the prefix."""
        holder, remaining = decision.pull_from, _remaining(deadline)
        timeout = min(self.config.peer_fetch_timeout_s, self.config.peer_fetch_timeout_s if remaining is None
                      else remaining)
        cached = decision.cached_tokens if decision.mode == "colocated" else decision.prefill_cached_tokens
        request = instance_pb2.PushKvRequest(
            request_id=valid.request_id, token_ids=valid.prompt_ids[:cached],
            target=instance_pb2.KvTarget(instance_id=target.instance_id, address=target.address))
        ok, tokens, nbytes = False, 0, 0
        resp = await self.instances.push_kv(holder, request, timeout)
        if isinstance(resp, grpc.aio.AioRpcError):
            self.peer_fetch["failures"] += 1
            log.warning("request %s: peer fetch from %s to %s failed (%s: %s); it recomputes the prefix",
                        valid.request_id, holder.instance_id, target.instance_id, resp.code().name, resp.details())
        else:
            ok, tokens, nbytes = True, resp.sent_tokens, resp.sent_bytes
            self.peer_fetch["tokens"] += tokens
            self.peer_fetch["bytes"] += nbytes
        if self.observer is not None and hasattr(self.observer, "on_peer_fetch"):
            self.observer.on_peer_fetch(holder.instance_id, target.instance_id, tokens, nbytes, ok)

    async def _disaggregated(self, decision: RouteDecision, valid: ValidRequest, generated: list[int],
                             deadline: float | None):
        prefill, decode = decision.prefill, decision.instance
        completed = False
        p_attempt = self._attempt(prefill, decision.estimate_s)
        d_attempt = self._attempt(decode, 0.0)
        try:
            if decision.pull_from is not None and not generated:
                await self._peer_fetch(decision, prefill, valid, deadline)
            generated = list(generated)
            request = instance_pb2.PrefillRequest(
                request=self._instance_request(valid, generated),
                decode_target=instance_pb2.KvTarget(instance_id=decode.instance_id, address=decode.address))
            p_attempt.call = prefill.stub.Prefill(request, timeout=_remaining(deadline))
            try:
                first = await p_attempt.call
            except asyncio.CancelledError:
                if p_attempt.lost is not None and not cancelled_from_outside():
                    raise _InstanceFailed(prefill, p_attempt.lost) from None
                raise
            except grpc.aio.AioRpcError as e:
                # A transfer its decode target failed is the decode instance's failure: retry on another one.
                blamed = decode if _decode_target_failed(e) else prefill
                raise self._classify(blamed, e) from None
            p_attempt.close()
            if self.observer is not None:
                self.observer.on_kv_transfer(prefill.instance_id, decode.instance_id, first.transferred_tokens,
                                             getattr(first, "transferred_bytes", 0))
            if first.finish_reason:
                completed = True  # nothing went to the decode instance
            yield ([first.first_token_id], first.finish_reason, first.usage,
                   [first.first_token_logprobs] if first.HasField("first_token_logprobs") else [],
                   first.stop_reason if first.HasField("stop_reason") else None)
            if first.finish_reason:
                return
            generated.append(first.first_token_id)
            request = instance_pb2.DecodeRequest(request=self._instance_request(valid, generated),
                                                 kv_handle=first.kv_handle)
            d_attempt.call = decode.stub.Decode(request, timeout=_remaining(deadline))
            async with contextlib.aclosing(self._stream_from(d_attempt.call, d_attempt)) as chunks:
                async for chunk in chunks:
                    yield chunk
            completed = True
        finally:
            p_attempt.close()
            d_attempt.close()
            if not completed:
                # Abandoned (client gone, deadline, failure): the decode instance may hold the request, admitted
                # at commit and decoding, that no Decode call will claim; it would run until its transfer
                # timeout. Abort it there now (best effort; the prefill side aborts its own on cancel).
                self.instances.spawn(_abort_quietly(decode, valid.request_id))

    # ------------------------------------------------------------------------------------------ serving
    async def _serve(self, valid: ValidRequest, deadline: float | None):
        t0 = valid.arrival or time.monotonic()
        prompt = valid.prompt_ids
        generated: list[int] = []
        text = TextStream(self.model.tokenizer, prompt, valid.stop, valid.sampling.include_stop_str_in_output)
        exclude: set[str] = set()
        failures: list[str] = []
        migrations = 0
        first_token_at = dispatched_at = None
        cached_tokens = None
        instance_queue_s = 0.0
        observer = self.observer
        gaps: list[float] | None = [] if observer is not None else None  # inter-token latencies
        last_token_at = None
        # The request id goes in the first message only (a client's id may be 128 characters; per chunk that
        # would multiply the stream). `rid()` hands it out once.
        unsent = [valid.request_id]

        def rid() -> str:
            return unsent.pop() if unsent else ""
        while True:
            decision = await self._route(valid, exclude, deadline, failures)
            if observer is not None:
                observer.on_route(decision)
            if self.step_trace is not None:
                self.step_trace("routed", request_id=valid.request_id, instance_id=decision.instance.instance_id)
            if dispatched_at is None:
                dispatched_at = time.monotonic()
                self.stats["predicted_cached_tokens"] += decision.prefill_cached_tokens if decision.prefill \
                    else decision.cached_tokens
            attempt = (self._colocated if decision.mode == "colocated" else self._disaggregated)(
                decision, valid, generated, deadline)
            try:
                async with contextlib.aclosing(attempt):
                    async for token_ids, finish, usage, logprobs, stop_reason in attempt:
                        remaining = valid.max_tokens - len(generated)
                        if len(token_ids) >= remaining:
                            token_ids, finish = token_ids[:remaining], finish or LENGTH
                            logprobs = logprobs[:remaining]
                        generated.extend(token_ids)
                        shown = token_ids
                        if finish == STOP and stop_reason is not None and stop_reason.HasField("token_id") \
                                and not valid.sampling.include_stop_str_in_output:
                            shown = token_ids[:-1]  # a stop token's text is left out, as offline (and vLLM)
                        delta = text.push(shown)
                        if text.stopped:
                            finish = STOP
                            stop_reason = common_pb2.StopReason(text=text.stop_reason)
                        if usage is not None and cached_tokens is None:
                            cached_tokens = min(usage.cached_tokens, len(prompt))
                            instance_queue_s = usage.queue_time_s
                        now = time.monotonic()
                        if first_token_at is None and token_ids:
                            first_token_at = now
                            if self.step_trace is not None:
                                self.step_trace("first_response", request_id=valid.request_id)
                        elif gaps is not None and token_ids:
                            gaps.append((now - last_token_at) / len(token_ids))
                        if token_ids:
                            last_token_at = now
                        if not finish:
                            if token_ids or delta:
                                yield scheduler_pb2.GenerateResponse(request_id=rid(), token_ids=token_ids,
                                                                     text=delta, logprobs=logprobs)
                            continue
                        self._account(decision, len(prompt), cached_tokens or 0)
                        final = scheduler_pb2.GenerateResponse(
                            request_id=rid(), token_ids=token_ids, text=delta + text.flush(),
                            finish_reason=finish, logprobs=logprobs,
                            stop_reason=stop_reason if finish == STOP else None,
                            usage=scheduler_pb2.Usage(
                                prompt_tokens=len(prompt), cached_tokens=cached_tokens or 0,
                                completion_tokens=len(generated),
                                ttft_s=(first_token_at or now) - t0,
                                queue_time_s=(dispatched_at - t0) + instance_queue_s, e2e_s=now - t0,
                                instance_id=decision.instance.instance_id,
                                prefill_instance_id=decision.prefill.instance_id if decision.prefill else "",
                                num_migrations=migrations))
                        if observer is not None:
                            observer.on_finished(decision, final.usage, finish, gaps)
                        yield final
                        return
            except _InstanceFailed as failure:
                exclude.add(failure.record.instance_id)
                failures.append(failure.reason)
                migrations += 1
                self.stats["num_migrations"] += 1
                if observer is not None:
                    observer.on_migration(failure.record.instance_id)
                log.warning("request %s: %s; sending it again with %d tokens generated (move %d)",
                            valid.request_id, failure.reason, len(generated), migrations)
                if migrations > self.config.max_migrations:
                    raise Unavailable(f"Request {valid.request_id} failed after {len(generated)} tokens: "
                                      f"{'; '.join(failures)}; it was sent again {migrations - 1} times "
                                      f"(max_migrations {self.config.max_migrations}).") from None

    def _account(self, decision: RouteDecision, prompt_len: int, cached: int) -> None:
        record = decision.prefill or decision.instance
        record.num_requests += 1
        record.prompt_tokens += prompt_len
        record.cached_tokens += cached
        self.stats["prompt_tokens"] += prompt_len
        self.stats["cached_tokens"] += cached

    # -------------------------------------------------------------------------------------------- views
    def scheduler_stats(self) -> scheduler_pb2.SchedulerStats:
        s = self.stats
        return scheduler_pb2.SchedulerStats(
            policy=self.config.policy, queued_requests=self.admission.requests,
            queued_tokens=self.admission.tokens, max_queued_requests=self.admission.max_requests,
            max_queued_tokens=self.admission.max_tokens, num_requests=s["num_requests"],
            num_rejected=s["num_rejected"], num_failed=s["num_failed"], num_migrations=s["num_migrations"],
            prompt_tokens=s["prompt_tokens"], cached_tokens=s["cached_tokens"],
            hit_rate=s["cached_tokens"] / s["prompt_tokens"] if s["prompt_tokens"] else 0.0,
            predicted_cached_tokens=s["predicted_cached_tokens"],
            trees=[scheduler_pb2.PromptTreeStats(role=role, num_nodes=t.num_nodes, num_tokens=t.num_tokens)
                   for role, t in sorted(self.router.trees.items())])
