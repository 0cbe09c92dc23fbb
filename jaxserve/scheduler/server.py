"""The global scheduler's gRPC server (grpc.aio): validates and admits client requests, routes them with the
prompt trees and the policy, proxies each instance's token stream back with incremental text, and moves a
request to another instance when its instance fails (prompt + the tokens already streamed, so the client's
stream just continues). Instances register, report index events and load, and are probed for health.

    scheduler = Scheduler(GlobalSchedulerConfig(port=0), load_model_info("demo"))
    port = await scheduler.start()
    ...
    await scheduler.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from jaxserve.proto.v1 import common_pb2, instance_pb2, instance_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from jaxserve.scheduler.config import GlobalSchedulerConfig
from jaxserve.scheduler.cost_model import CostModel, profile_points
from jaxserve.scheduler.policies import LoadGuard
from jaxserve.scheduler.router import (DRAINING, HEALTHY, ROLE_NAMES, ROLES, SUSPECT, InstanceRecord,
                                       RouteDecision, Router)
from jaxserve.scheduler.tokenizer import ModelInfo, TextStream
from jaxserve.scheduler.validation import InvalidRequest, ValidRequest, validate

log = logging.getLogger("jaxserve.scheduler")

SERVICE_NAME = "jaxserve.v1.Scheduler"
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
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


class _Abort(Exception):
    """End the client's call with this status."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class _InstanceFailed(Exception):
    def __init__(self, record: InstanceRecord, reason: str):
        super().__init__(reason)
        self.record = record
        self.reason = reason


class RegistrationRefused(Exception):
    """A well-formed registration that does not fit this deployment (other model, other page size)."""


class Admission:
    """The bounded queue: requests admitted and not finished, counted in requests and in tokens (prompt +
    max_tokens, the most a request can hold)."""

    def __init__(self, max_requests: int, max_tokens: int):
        self.max_requests = max_requests
        self.max_tokens = max_tokens
        self.requests = 0
        self.tokens = 0

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
        self.record = record
        self.estimate_s = estimate_s
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


def _cancelled_from_outside() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


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
        if attempt.lost is not None and not _cancelled_from_outside():
            raise _InstanceFailed(attempt.record, attempt.lost) from None
        raise


class Scheduler:
    """The scheduler process's state and gRPC server. All state lives on the server's event loop."""

    def __init__(self, config: GlobalSchedulerConfig, model: ModelInfo, observer=None):
        self.config = config
        # Metrics hooks (`jaxserve.scheduler.metrics.SchedulerMetrics` or None): on_rejected, on_failed,
        # on_route, on_migration, on_kv_transfer, on_finished. Called on the event loop; must not block.
        self.observer = observer
        self.model = model
        self.router = Router(config.policy, LoadGuard(config.load_guard_factor, config.load_guard_slack), config.mode)
        self.admission = Admission(config.max_queued_requests, config.max_queued_tokens)
        self.health = health_aio.HealthServicer()
        self.stats = dict(num_requests=0, num_rejected=0, num_failed=0, num_migrations=0, prompt_tokens=0,
                          cached_tokens=0, predicted_cached_tokens=0)
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._changed = asyncio.Event()
        self._ids = itertools.count()
        self._stopping = False

    # ------------------------------------------------------------------------------------- lifecycle
    async def start(self) -> int:
        """Bind and start serving; returns the port."""
        server = grpc.aio.server(options=_CHANNEL_OPTIONS)
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(_Servicer(self), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if self.config.tls_cert_file:
            with open(self.config.tls_key_file, "rb") as k, open(self.config.tls_cert_file, "rb") as c:
                creds = grpc.ssl_server_credentials([(k.read(), c.read())])
            self.port = server.add_secure_port(self.config.address, creds)
        else:
            self.port = server.add_insecure_port(self.config.address)
        if self.port == 0:
            raise RuntimeError(f"could not bind {self.config.address}")
        await self._set_health()
        await server.start()
        self._server = server
        self._spawn(self._health_loop())
        log.info("scheduler serving on %s:%d (policy %s, model %s, max_model_len %d)", self.config.host, self.port,
                 self.config.policy, self.model.name, self.model.max_model_len)
        return self.port

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def stop(self, grace: float | None = None) -> None:
        self._stopping = True
        await self.health.enter_graceful_shutdown()
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            await self._server.stop(self.config.shutdown_grace_s if grace is None else grace)
        for record in list(self.router.instances.values()):
            self.router.remove(record.instance_id)
            if record.channel is not None:
                await record.channel.close()

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()

    def _spawn(self, coro) -> asyncio.Task | None:
        if self._stopping:
            coro.close()
            return None
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------------------------------- instances
    def _notify_changed(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        self._spawn(self._set_health())

    async def _set_health(self) -> None:
        serving = self.router.effective_mode() is not None
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)

    def register(self, request: scheduler_pb2.RegisterRequest) -> InstanceRecord:
        """Raises ValueError for a malformed registration, RegistrationRefused for one that does not fit."""
        if request.role not in ROLES:
            raise ValueError(f"role must be colocated, prefill or decode, got {request.role}")
        if not request.address:
            raise ValueError("address (host:port of the Instance service) is required")
        if request.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {request.page_size}")
        if request.vocab_size and request.vocab_size < self.model.vocab_size:
            raise RegistrationRefused(f"the instance's vocab_size {request.vocab_size} is smaller than the scheduler's "
                             f"vocabulary of {self.model.vocab_size} ({self.model.name}): is it the same model?")
        instance_id = request.instance_id or f"{ROLE_NAMES[request.role]}-{next(self._ids)}"
        record = InstanceRecord(instance_id=instance_id, address=request.address, role=request.role,
                                page_size=request.page_size, max_model_len=request.max_model_len,
                                vocab_size=request.vocab_size, num_pages=request.num_pages, model=request.model)
        try:
            old = self.router.add(record)
        except ValueError as e:
            raise RegistrationRefused(str(e)) from None
        record.channel = grpc.aio.insecure_channel(request.address, options=_CHANNEL_OPTIONS)
        record.stub = instance_pb2_grpc.InstanceStub(record.channel)
        record.health_stub = health_pb2_grpc.HealthStub(record.channel)
        if old is not None:
            self._retire(old, "it registered again", lost=True)
        if request.profile:
            record.cost_model = CostModel.fit((s.prompt_len, s.cached_len, s.seconds) for s in request.profile)
            record.calibrated = True
        elif self.config.profile_instances:
            self._spawn(self._calibrate(record))
        log.info("instance %s registered: %s at %s, page_size %d", instance_id, ROLE_NAMES[request.role],
                 request.address, request.page_size)
        self._notify_changed()
        return record

    async def _calibrate(self, record: InstanceRecord) -> None:
        points = profile_points(self.router.max_model_len(self.model.max_model_len))
        req = instance_pb2.ProfileRequest(points=[instance_pb2.ProfileRequest.Point(prompt_len=p, cached_len=c)
                                                  for p, c in points], repeats=3)
        try:
            resp = await record.stub.Profile(req, timeout=self.config.profile_timeout_s)
        except grpc.aio.AioRpcError as e:
            log.warning("instance %s: profiling failed (%s: %s); using the default cost model",
                        record.instance_id, e.code().name, e.details())
            return
        if resp.samples and not record.removed:
            record.cost_model = CostModel.fit((s.prompt_len, s.cached_len, s.seconds) for s in resp.samples)
            record.calibrated = True
            log.info("instance %s: cost model %s", record.instance_id, record.cost_model)

    def _retire(self, record: InstanceRecord, reason: str, lost: bool) -> None:
        """Take an instance out (it failed, left or was replaced). lost: its running requests are gone with
        it and must move; otherwise they finish where they are."""
        if self.router.instances.get(record.instance_id) is record:
            self.router.remove(record.instance_id)
        record.removed = True
        log.warning("instance %s out of routing: %s (%d requests %s)", record.instance_id, reason,
                    len(record.attempts), "to move" if lost else "finishing there")
        if lost:
            for attempt in list(record.attempts):
                attempt.mark_lost(f"instance {record.instance_id} {reason}")
        self._maybe_close_channel(record)
        self._notify_changed()

    def _maybe_close_channel(self, record: InstanceRecord) -> None:
        if record.removed and not record.attempts and record.channel is not None:
            channel, record.channel = record.channel, None
            self._spawn(channel.close())

    def _suspect(self, record: InstanceRecord) -> None:
        """Something suggests the instance is gone: stop routing to it and probe it now."""
        if record.removed:
            return
        if record.state == HEALTHY:
            record.state = SUSPECT
            self._notify_changed()
        self._spawn(self._probe(record))

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            records = [r for r in self.router.instances.values() if not r.probing]
            results = await asyncio.gather(*(self._probe(r) for r in records), return_exceptions=True)
            for record, result in zip(records, results):
                if isinstance(result, Exception):  # a bug: keep probing the others regardless
                    log.error("probing instance %s failed: %r", record.instance_id, result)

    async def _probe(self, record: InstanceRecord) -> None:
        if record.probing or record.removed:
            return
        record.probing = True
        try:
            try:
                resp = await record.health_stub.Check(health_pb2.HealthCheckRequest(service=""),
                                                      timeout=self.config.health_timeout_s)
                status = resp.status
            except grpc.aio.AioRpcError as e:
                status, error = None, f"{e.code().name}: {e.details()}"
            except asyncio.CancelledError:
                if _cancelled_from_outside():
                    raise
                return  # its channel was closed under it: the instance is gone already
            if record.removed:
                return
            if status is None:
                record.probe_failures += 1
                if record.state == HEALTHY:
                    record.state = SUSPECT
                    self._notify_changed()
                if record.probe_failures >= self.config.unhealthy_after:
                    self._retire(record, f"stopped answering health checks ({error})", lost=True)
                return
            record.probe_failures = 0
            if record.state == DRAINING:
                return
            new_state = HEALTHY if status == health_pb2.HealthCheckResponse.SERVING else SUSPECT
            if new_state != record.state:
                record.state = new_state
                self._notify_changed()
        finally:
            record.probing = False

    def _on_attempt_closed(self, record: InstanceRecord) -> None:
        if record.removed:
            self._maybe_close_channel(record)

    # --------------------------------------------------------------------------------------- requests
    def max_model_len(self) -> int:
        return self.router.max_model_len(self.model.max_model_len)

    async def generate(self, request: scheduler_pb2.GenerateRequest, context):
        """The Generate handler (an async generator of GenerateResponse)."""
        t0 = time.monotonic()
        request_id = request.request_id or uuid.uuid4().hex
        try:
            valid = validate(request, self.model, self.max_model_len(), self.config.default_max_tokens, request_id)
        except InvalidRequest as e:
            self.stats["num_rejected"] += 1
            if self.observer is not None:
                self.observer.on_rejected("invalid")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        budget = len(valid.prompt_ids) + valid.max_tokens
        refused = self.admission.admit(budget)
        if refused is not None:
            self.stats["num_rejected"] += 1
            if self.observer is not None:
                self.observer.on_rejected("over_capacity")
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refused)
        try:
            async for response in self._serve(valid, context, t0):
                yield response
        except _Abort as e:
            self.stats["num_failed"] += 1
            if self.observer is not None:
                self.observer.on_failed(e.code.name)
            await context.abort(e.code, e.message)
        finally:
            self.admission.release(budget)
            self.stats["num_requests"] += 1

    async def _route(self, valid: ValidRequest, exclude: set[str], context, failures: list[str]) -> RouteDecision:
        """A routing decision, waiting up to no_instance_wait_s (within the deadline) for an instance."""
        wait_until = time.monotonic() + self.config.no_instance_wait_s
        remaining = context.time_remaining()
        if remaining is not None:
            wait_until = min(wait_until, time.monotonic() + remaining)
        while True:
            decision = self.router.route(valid.prompt_ids, valid.session_id, exclude)
            if decision is not None:
                return decision
            left = wait_until - time.monotonic()
            if left <= 0:
                if self.observer is not None:
                    self.observer.on_route(None)
                registered = len(self.router.instances)
                why = "; ".join(failures) if failures else f"{registered} instances registered, none can take it"
                raise _Abort(grpc.StatusCode.UNAVAILABLE, f"No instance could serve request {valid.request_id} "
                             f"(waited {self.config.no_instance_wait_s:g} s): {why}.")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    def _instance_request(self, valid: ValidRequest, generated: list[int], expected_cached: int):
        return instance_pb2.InstanceGenerateRequest(
            request_id=valid.request_id, prompt_token_ids=valid.prompt_ids, generated_token_ids=generated,
            max_tokens=valid.max_tokens - len(generated), sampling=valid.sampling, session_id=valid.session_id)

    def _classify(self, record: InstanceRecord, error: grpc.aio.AioRpcError) -> Exception:
        code = error.code()
        if code in _MIGRATE_CODES:
            if code in _SUSPECT_CODES:
                self._suspect(record)
            return _InstanceFailed(record, f"instance {record.instance_id} failed: {code.name}: {error.details()}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return _Abort(code, f"Deadline exceeded while instance {record.instance_id} was serving the request.")
        return _Abort(code, f"Instance {record.instance_id}: {error.details()}")

    async def _stream_from(self, call, attempt: _Attempt):
        """Yield (token_ids, finish_reason, usage) from an instance's token stream."""
        record = attempt.record
        while True:
            try:
                resp = await _read(call, attempt, self.config.stall_timeout_s)
            except grpc.aio.AioRpcError as e:
                raise self._classify(record, e) from None
            except _InstanceFailed:
                self._suspect(record)
                raise
            if resp is grpc.aio.EOF:
                raise _InstanceFailed(record, f"instance {record.instance_id} ended the stream without a finish "
                                              "reason")
            if resp.token_ids:
                attempt.prefill_done()
            usage = resp.usage if resp.HasField("usage") else None
            if resp.finish_reason:
                attempt.finished = True  # the call ends on its own (OK status); no need to cancel it
            yield list(resp.token_ids), resp.finish_reason, usage
            if resp.finish_reason:
                return

    async def _colocated(self, decision: RouteDecision, valid: ValidRequest, generated: list[int], context):
        attempt = _Attempt(decision.instance, decision.estimate_s, self._on_attempt_closed)
        try:
            request = self._instance_request(valid, list(generated), decision.cached_tokens)
            attempt.call = decision.instance.stub.Generate(request, timeout=context.time_remaining())
            async with contextlib.aclosing(self._stream_from(attempt.call, attempt)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            attempt.close()

    async def _disaggregated(self, decision: RouteDecision, valid: ValidRequest, generated: list[int], context):
        prefill, decode = decision.prefill, decision.instance
        p_attempt = _Attempt(prefill, decision.estimate_s, self._on_attempt_closed)
        d_attempt = _Attempt(decode, 0.0, self._on_attempt_closed)
        try:
            generated = list(generated)
            request = instance_pb2.PrefillRequest(
                request=self._instance_request(valid, generated, decision.prefill_cached_tokens),
                decode_target=instance_pb2.KvTarget(instance_id=decode.instance_id, address=decode.address))
            p_attempt.call = prefill.stub.Prefill(request, timeout=context.time_remaining())
            try:
                first = await p_attempt.call
            except asyncio.CancelledError:
                if p_attempt.lost is not None and not _cancelled_from_outside():
                    raise _InstanceFailed(prefill, p_attempt.lost) from None
                raise
            except grpc.aio.AioRpcError as e:
                raise self._classify(prefill, e) from None
            p_attempt.close()
            if self.observer is not None:
                self.observer.on_kv_transfer(prefill.instance_id, decode.instance_id, first.transferred_tokens,
                                             getattr(first, "transferred_bytes", 0))
            yield [first.first_token_id], first.finish_reason, first.usage
            if first.finish_reason:
                return
            generated.append(first.first_token_id)
            request = instance_pb2.DecodeRequest(
                request=self._instance_request(valid, generated, decision.cached_tokens),
                kv_handle=first.kv_handle)
            d_attempt.call = decode.stub.Decode(request, timeout=context.time_remaining())
            async with contextlib.aclosing(self._stream_from(d_attempt.call, d_attempt)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            p_attempt.close()
            d_attempt.close()

    async def _serve(self, valid: ValidRequest, context, t0: float):
        prompt = valid.prompt_ids
        generated: list[int] = []
        text = TextStream(self.model.tokenizer, prompt, valid.stop)
        exclude: set[str] = set()
        failures: list[str] = []
        migrations = 0
        first_token_at = dispatched_at = None
        cached_tokens = None
        instance_queue_s = 0.0
        observer = self.observer
        gaps: list[float] | None = [] if observer is not None else None  # inter-token latencies
        last_token_at = None
        while True:
            decision = await self._route(valid, exclude, context, failures)
            if observer is not None:
                observer.on_route(decision)
            if dispatched_at is None:
                dispatched_at = time.monotonic()
                self.stats["predicted_cached_tokens"] += decision.prefill_cached_tokens if decision.prefill \
                    else decision.cached_tokens
            attempt = (self._colocated if decision.mode == "colocated" else self._disaggregated)(
                decision, valid, generated, context)
            try:
                async with contextlib.aclosing(attempt):
                    async for token_ids, finish, usage in attempt:
                        remaining = valid.max_tokens - len(generated)
                        if len(token_ids) >= remaining:
                            token_ids, finish = token_ids[:remaining], finish or LENGTH
                        generated.extend(token_ids)
                        delta = text.push(token_ids)
                        if text.stopped:
                            finish = STOP
                        if usage is not None and cached_tokens is None:
                            cached_tokens = min(usage.cached_tokens, len(prompt))
                            instance_queue_s = usage.queue_time_s
                        now = time.monotonic()
                        if first_token_at is None and token_ids:
                            first_token_at = now
                        elif gaps is not None and token_ids:
                            gaps.append((now - last_token_at) / len(token_ids))
                        if token_ids:
                            last_token_at = now
                        if not finish:
                            if token_ids or delta:
                                yield scheduler_pb2.GenerateResponse(request_id=valid.request_id,
                                                                     token_ids=token_ids, text=delta)
                            continue
                        self._account(decision, len(prompt), cached_tokens or 0)
                        final = scheduler_pb2.GenerateResponse(
                            request_id=valid.request_id, token_ids=token_ids, text=delta + text.flush(),
                            finish_reason=finish,
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
                    raise _Abort(grpc.StatusCode.UNAVAILABLE,
                                 f"Request {valid.request_id} failed after {len(generated)} tokens: "
                                 f"{'; '.join(failures)}; it was sent again {migrations - 1} times "
                                 f"(max_migrations {self.config.max_migrations}).") from None

    def _account(self, decision: RouteDecision, prompt_len: int, cached: int) -> None:
        record = decision.prefill or decision.instance
        record.num_requests += 1
        record.prompt_tokens += prompt_len
        record.cached_tokens += cached
        self.stats["prompt_tokens"] += prompt_len
        self.stats["cached_tokens"] += cached

    # ----------------------------------------------------------------------------------------- views
    def instance_infos(self) -> list[scheduler_pb2.InstanceInfo]:
        now = time.monotonic()
        infos = []
        for r in self.router.instances.values():
            infos.append(scheduler_pb2.InstanceInfo(
                instance_id=r.instance_id, address=r.address, role=r.role, state=r.state, load=r.load,
                in_flight_requests=r.in_flight_requests,
                indexed_tokens=self.router.trees[r.role].held_tokens(r.instance_id),
                num_requests=r.num_requests, prompt_tokens=r.prompt_tokens, cached_tokens=r.cached_tokens,
                hit_rate=r.cached_tokens / r.prompt_tokens if r.prompt_tokens else 0.0,
                cost_model_calibrated=r.calibrated, last_report_age_s=now - r.last_report))
        return infos

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


class _Servicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, scheduler: Scheduler):
        self.s = scheduler
        # grpc.aio tells streaming handlers by their type: hand it the async generator function itself.
        self.Generate = scheduler.generate

    async def Tokenize(self, request, context):
        tokenizer = self.s.model.tokenizer
        if tokenizer is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"This scheduler has no tokenizer for model {self.s.model.name!r}.")
        return scheduler_pb2.TokenizeResponse(token_ids=tokenizer.encode(request.text),
                                              max_model_len=self.s.max_model_len())

    async def ListInstances(self, request, context):
        return scheduler_pb2.ListInstancesResponse(instances=self.s.instance_infos())

    async def GetStats(self, request, context):
        return self.s.scheduler_stats()

    async def DrainInstance(self, request, context):
        record = self.s.router.instances.get(request.instance_id)
        if record is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no instance {request.instance_id!r}")
        record.state = DRAINING
        self.s._notify_changed()
        try:
            resp = await record.stub.Drain(instance_pb2.DrainRequest(timeout_s=request.timeout_s),
                                           timeout=context.time_remaining())
        except grpc.aio.AioRpcError as e:
            await context.abort(e.code(), f"instance {request.instance_id}: {e.details()}")
        return scheduler_pb2.DrainInstanceResponse(num_unfinished=resp.num_unfinished)

    async def Register(self, request, context):
        try:
            record = self.s.register(request)
        except RegistrationRefused as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return scheduler_pb2.RegisterResponse(instance_id=record.instance_id,
                                              report_interval_s=self.s.config.report_interval_s)

    async def ReportEvents(self, request_iterator, context):
        s = self.s
        record = None
        try:
            async for report in request_iterator:
                if record is None:
                    record = s.router.instances.get(report.instance_id)
                    if record is None:
                        await context.abort(grpc.StatusCode.NOT_FOUND,
                                            f"unknown instance {report.instance_id!r}: register first")
                if s.router.instances.get(record.instance_id) is not record:
                    await context.abort(grpc.StatusCode.NOT_FOUND,
                                        f"instance {record.instance_id} was taken out of routing: register again")
                try:
                    for event in report.events:
                        s.router.apply_event(record, event)
                except ValueError as e:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"instance {record.instance_id}: {e}")
                if report.HasField("load"):
                    record.load = report.load
                record.last_report = time.monotonic()
        finally:
            if record is not None and not record.removed:
                # The stream broke or ended without Deregister: is the instance still there?
                s._suspect(record)
        return scheduler_pb2.ReportEventsResponse()

    async def Deregister(self, request, context):
        record = self.s.router.instances.get(request.instance_id)
        if record is not None:
            self.s._retire(record, "deregistered", lost=False)
        return scheduler_pb2.DeregisterResponse()
