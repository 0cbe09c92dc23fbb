"""The Instance gRPC server: one engine (owned by an `EngineLoop` thread) served as `jaxserve.v1.Instance`
plus `grpc.health.v1`, registered with the global scheduler through `InstanceReporter`, to which it streams
its prompt-index inserts/evictions and its load. A drop-in for `jaxserve.scheduler.fake_instance`.

Role colocated serves Generate. Prefill / Decode and the KV transfer control RPCs answer UNIMPLEMENTED until
disaggregation lands: they get their own handlers here, next to `Generate`, sharing `_stream_request`."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from typing import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from jaxserve.engine.engine import Engine
from jaxserve.engine.sampling import SamplingParams
from jaxserve.instance.engine_loop import EngineLoop, Sink, default_seed
from jaxserve.proto.v1 import common_pb2, instance_pb2, instance_pb2_grpc, scheduler_pb2
from jaxserve.scheduler.reporter import InstanceReporter

log = logging.getLogger("jaxserve.instance")

SERVICE_NAME = "jaxserve.v1.Instance"
ROLES = {"colocated": common_pb2.ROLE_COLOCATED, "prefill": common_pb2.ROLE_PREFILL,
         "decode": common_pb2.ROLE_DECODE}
ROLE_NAMES = {v: k for k, v in ROLES.items()}
_FINISH = {"stop": common_pb2.FINISH_REASON_STOP, "length": common_pb2.FINISH_REASON_LENGTH,
           "abort": common_pb2.FINISH_REASON_ABORT}
_DISAGG_PENDING = ("disaggregated serving (prefill/decode roles and KV transfer) is not implemented in this "
                   "instance server yet; run the instance with --role=colocated")


@dataclasses.dataclass(frozen=True)
class InstanceConfig:
    role: str = "colocated"
    host: str = "127.0.0.1"
    port: int = 0                          # 0: any free port
    scheduler_address: str | None = None   # None: serve without registering (tests, debugging)
    instance_id: str = ""                  # "": the scheduler assigns one
    model_name: str = ""                   # informational, sent with the registration
    # Measure the Profile points at start and send them with the registration (else the scheduler asks).
    profile_at_start: bool = False
    shutdown_grace_s: float = 5.0

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {sorted(ROLES)}, got {self.role!r}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65536), got {self.port}")


class _QueueSink(Sink):
    """Hands engine-thread events to the handler's asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def push(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:
            pass  # the event loop is closed: nobody is listening any more


def sampling_params(request: instance_pb2.InstanceGenerateRequest) -> SamplingParams:
    """Engine SamplingParams for an instance request; max_tokens counts the resumed tokens too (the engine
    counts every output token). ValueError for invalid values."""
    s = request.sampling
    seed = s.seed if s.HasField("seed") else default_seed(request.request_id)
    return SamplingParams(
        max_tokens=len(request.generated_token_ids) + max(request.max_tokens, 1), temperature=s.temperature,
        top_k=s.top_k if s.HasField("top_k") else -1, top_p=s.top_p if s.HasField("top_p") else 1.0,
        seed=seed, stop_token_ids=tuple(s.stop_token_ids), stop=tuple(s.stop), ignore_eos=s.ignore_eos)


class InstanceServer(instance_pb2_grpc.InstanceServicer):
    def __init__(self, engine: Engine, config: InstanceConfig = InstanceConfig(), *,
                 scheduler_credentials: grpc.ChannelCredentials | None = None):
        self.engine = engine
        self.config = config
        self.role = ROLES[config.role]
        self.instance_id = config.instance_id
        self.loop_thread = EngineLoop(engine, on_index_event=self._on_index_event)
        self.reporter: InstanceReporter | None = None
        self.health = health_aio.HealthServicer()
        self.draining = False
        self.port: int | None = None
        self._scheduler_credentials = scheduler_credentials
        self._server: grpc.aio.Server | None = None
        self._ids = itertools.count()
        self._stopped = False

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    # ------------------------------------------------------------------------------------- lifecycle
    async def start(self) -> "InstanceServer":
        """Start the engine thread and the server; register with the scheduler (if any)."""
        self.loop_thread.start()
        server = grpc.aio.server()
        instance_pb2_grpc.add_InstanceServicer_to_server(self, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self.port = server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        if self.port == 0:
            raise RuntimeError(f"could not bind {self.config.host}:{self.config.port}")
        await server.start()
        self._server = server
        await self._set_serving(not self.loop_thread.broken)
        if self.config.scheduler_address:
            registration = scheduler_pb2.RegisterRequest(
                instance_id=self.instance_id, address=self.address, role=self.role, model=self.config.model_name,
                page_size=self.engine.pool.page_size, max_model_len=self.engine.max_model_len,
                vocab_size=self.engine.model_config.vocab_size, num_pages=self.engine.pool.num_pages - 1)
            if self.config.profile_at_start:
                from jaxserve.scheduler.cost_model import profile_points
                samples = await self.profile(profile_points(self.engine.max_model_len), repeats=3)
                registration.profile.extend(samples)
            self.reporter = InstanceReporter(self.config.scheduler_address, registration,
                                             snapshot=self.loop_thread.mirror.snapshot, load=self.load,
                                             credentials=self._scheduler_credentials, retry_interval_s=0.2,
                                             max_retry_interval_s=2.0)
            await self.reporter.start(timeout=60.0)
            self.instance_id = self.reporter.instance_id
        log.info("instance %s (%s) serving on %s", self.instance_id or "-", self.config.role, self.address)
        return self

    async def stop(self, grace: float | None = None) -> None:
        """A clean exit: NOT_SERVING, deregister, let running requests finish for `grace` seconds, stop."""
        if self._stopped:
            return
        self._stopped = True
        await self._set_serving(False)
        if self.reporter is not None:
            await self.reporter.stop(deregister=True)
        if self._server is not None:
            await self._server.stop(self.config.shutdown_grace_s if grace is None else grace)
        await asyncio.get_running_loop().run_in_executor(None, self.loop_thread.stop)

    async def kill(self) -> None:
        """A crash, for tests: the server and the report stream vanish without deregistering."""
        self._stopped = True
        if self.reporter is not None:
            await self.reporter.stop(deregister=False)
        if self._server is not None:
            await self._server.stop(0)
        await asyncio.get_running_loop().run_in_executor(None, self.loop_thread.stop)

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()

    async def _set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)

    # ------------------------------------------------------------------------------------ reporting
    def _on_index_event(self, kind: str, tokens: tuple) -> None:
        # Engine thread; the reporter's insert/evict are thread-safe. Before registration the mirror's
        # snapshot (sent first on every report stream) covers these.
        if self.reporter is not None:
            (self.reporter.insert if kind == "insert" else self.reporter.evict)(tokens)

    def load(self) -> common_pb2.Load:
        load = dict(self.loop_thread.load)
        load.pop("cached_pages", None)
        return common_pb2.Load(**load)

    # ----------------------------------------------------------------------------------- generation
    async def _stream_request(self, request: instance_pb2.InstanceGenerateRequest, context):
        """Run one request on the engine and yield its InstanceGenerateResponses; cancelling the call (client,
        deadline, scheduler) aborts it in the engine, which frees its pages."""
        arrival = time.perf_counter()
        if self.draining or self._stopped:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"instance {self.instance_id} is draining")
        if self.loop_thread.broken:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"instance {self.instance_id}: the engine is broken ({self.loop_thread.broken})")
        try:
            params = sampling_params(request)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        sink = _QueueSink(asyncio.get_running_loop())
        # Ids are per instance: two callers may reuse a request id, and a moved request comes back with its own.
        internal_id = f"{request.request_id}#{next(self._ids)}"
        self.loop_thread.add(internal_id, request.request_id, request.prompt_token_ids, request.generated_token_ids,
                             params, sink, arrival)
        done = False
        try:
            while True:
                event = await sink.queue.get()
                if event[0] == "tokens":
                    yield instance_pb2.InstanceGenerateResponse(token_ids=event[1])
                elif event[0] == "finish":
                    done = True
                    _, reason, usage, last = event
                    yield instance_pb2.InstanceGenerateResponse(
                        token_ids=last, finish_reason=_FINISH[reason], usage=common_pb2.InstanceUsage(**usage))
                    return
                else:
                    done = True
                    _, code, message = event
                    await context.abort(code, f"instance {self.instance_id}: {message}")
        finally:
            if not done:
                self.loop_thread.abort(internal_id)

    async def Generate(self, request, context):
        if self.role != common_pb2.ROLE_COLOCATED:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"Generate needs role colocated; this instance's role is {ROLE_NAMES[self.role]}")
        async for response in self._stream_request(request, context):
            yield response

    async def Prefill(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"Prefill: {_DISAGG_PENDING}")

    async def Decode(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"Decode: {_DISAGG_PENDING}")
        yield  # an async generator, as a server-streaming handler must be  # pragma: no cover

    async def PrepareKvTransfer(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"PrepareKvTransfer: {_DISAGG_PENDING}")

    async def CommitKvTransfer(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"CommitKvTransfer: {_DISAGG_PENDING}")

    # ----------------------------------------------------------------------------------- operations
    async def Abort(self, request, context):
        found = await asyncio.wrap_future(self.loop_thread.abort_external(request.request_id))
        return instance_pb2.AbortResponse(found=found)

    async def profile(self, points: Sequence[tuple[int, int]], repeats: int = 3) -> list[common_pb2.ProfileSample]:
        future = self.loop_thread.submit(lambda: self.loop_thread.profile(points, repeats))
        samples = await asyncio.wrap_future(future)
        return [common_pb2.ProfileSample(prompt_len=p, cached_len=c, seconds=s) for p, c, s in samples]

    async def Profile(self, request, context):
        points = [(p.prompt_len, p.cached_len) for p in request.points]
        try:
            samples = await self.profile(points, request.repeats or 3)
        except Exception as e:  # noqa: BLE001 - reported, not fatal: the scheduler falls back to a default
            await context.abort(grpc.StatusCode.INTERNAL, f"profiling failed: {type(e).__name__}: {e}")
        return instance_pb2.ProfileResponse(samples=samples)

    async def GetStats(self, request, context):
        c = self.loop_thread.counters
        return instance_pb2.InstanceStats(
            instance_id=self.instance_id, role=self.role, load=self.load(), num_requests=c["num_requests"],
            prompt_tokens=c["prompt_tokens"], cached_tokens=c["cached_tokens"],
            generated_tokens=c["generated_tokens"], cached_pages=self.loop_thread.load.get("cached_pages", 0),
            draining=self.draining)

    async def Drain(self, request, context):
        """Refuse new requests (UNAVAILABLE), finish the running ones (up to timeout_s), deregister."""
        self.draining = True
        await self._set_serving(False)
        deadline = time.monotonic() + (request.timeout_s or float("inf"))
        while self.loop_thread.num_live and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.reporter is not None:
            await self.reporter.stop(deregister=True)
            self.reporter = None
        return instance_pb2.DrainResponse(num_unfinished=self.loop_thread.num_live)


def build_engine(model: str = "demo", **engine_kwargs) -> Engine:
    """An Engine built exactly as the offline `LLM` builds it (same flags, same defaults), so an instance and
    `LLM.generate` produce the same tokens for the same model and seed."""
    from jaxserve.engine.llm import LLM
    return LLM(model=model, **engine_kwargs).engine
