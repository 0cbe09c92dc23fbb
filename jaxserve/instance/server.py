"""The Instance gRPC server: one engine (owned by an `EngineLoop` thread) served as `jaxserve.v1.Instance`
plus `grpc.health.v1`, registered with the global scheduler through `InstanceReporter`, to which it streams
its prompt-index inserts/evictions and its load (`jaxserve.testing.fake_instance` is its engine-less stand-in).
This module is the servicer and its lifecycle; the PD protocol lives in `pd_prefill.py` (prefill side),
`pd_decode.py` (decode side), `pd_send_back.py` (PD-Caching-3 send-back) and `pd_common.py` (transport
selection), the KV path itself in `jaxserve.mempool.transfer`.

Role colocated serves Generate. Role prefill serves Prefill: it prefills with `prefill_only`, samples the
first token and sends the KV its decode target lacks (PrepareKvTransfer / CommitKvTransfer on the target; the
KV moves by `jax.experimental.transfer`, see `pd_prefill.py`). Role decode serves PrepareKvTransfer,
CommitKvTransfer (admits the request as soon as its KV is in place) and Decode (streams the rest). An RPC a
role does not serve answers UNIMPLEMENTED. `pd_mode` (basic | caching1 | caching2 | caching3) says what each
side caches. In caching3 the prefill side names itself in CommitKvTransfer (`send_back_to`); when the request
finishes, the decode side sends the KV of its context that the prefill side lacks (its decode phase) back with
transfer_with_insert semantics (PrepareKvTransfer / CommitKvTransfer(cache_only) on the prefill instance,
which indexes it and lets go of the pages), so the next turn's prefill reuses it.

A multi-process instance (jaxserve/engine/multihost.py) serves any role from its leader (process 0); its KV
transfers go per shard (`CommitKvTransferRequest.sources`): each process offers or pulls only its own devices'
shards, so no host ever carries the whole KV, and the receiver tells the sender its layout in
PrepareKvTransfer (`receiver_shards`)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import time
from typing import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from jaxserve.engine.disagg import PD_MODES, mode_caching
from jaxserve.engine.engine import Engine
from jaxserve.instance.engine_loop import EngineLoop
from jaxserve.instance.pd_common import KvPath, QueueSink, sampling_params  # noqa: F401 (sampling_params re-exported)
from jaxserve.instance.pd_decode import DecodeSide
from jaxserve.instance.pd_prefill import PrefillSide
from jaxserve.instance.pd_send_back import SendBack
from jaxserve.mempool.transfer import CrossProcessTransport, KvReceiver
from jaxserve.proto.enums import FINISH_REASON_CODES
from jaxserve.proto.v1 import common_pb2, instance_pb2, instance_pb2_grpc, scheduler_pb2
from jaxserve.scheduler.reporter import InstanceReporter

log = logging.getLogger("jaxserve.instance")

SERVICE_NAME = "jaxserve.v1.Instance"
ROLES = {"colocated": common_pb2.ROLE_COLOCATED, "prefill": common_pb2.ROLE_PREFILL,
         "decode": common_pb2.ROLE_DECODE}
ROLE_NAMES = {v: k for k, v in ROLES.items()}


def pd_mode_caching(role: str, pd_mode: str, colocated_default: bool = True) -> bool:
    """Whether an instance of `role` caches prefixes in `pd_mode` (MemServe's PD modes): the prefill side from
    caching1 on, the decode side from caching2 on; colocated instances keep their own setting."""
    prefill, decode = mode_caching(pd_mode)
    return {"prefill": prefill, "decode": decode}.get(role, colocated_default)


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
    # Disaggregation: what each side caches (PD_MODES), and the deadline of each KV transfer step (a decode
    # reservation not committed, or a received KV not claimed by Decode, within it is freed).
    pd_mode: str = "basic"
    kv_transfer_timeout_s: float = 30.0
    # Step watchdog (multi-process instances): a step or KV transfer op that has not finished after this many
    # seconds breaks the instance (a process hangs: requests fail, health NOT_SERVING); 0: off. A step that
    # compiles first gets compile_grace_s more.
    step_timeout_s: float = 0.0
    compile_grace_s: float = 600.0
    # Per-shard KV transfers even between single-process instances (tests); they are used automatically when
    # either side has several processes.
    kv_per_shard: bool = False

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {sorted(ROLES)}, got {self.role!r}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65536), got {self.port}")
        if self.pd_mode not in PD_MODES:
            raise ValueError(f"pd_mode must be one of {PD_MODES}, got {self.pd_mode!r}")
        if self.kv_transfer_timeout_s <= 0:
            raise ValueError(f"kv_transfer_timeout_s must be > 0, got {self.kv_transfer_timeout_s}")
        if self.step_timeout_s < 0 or self.compile_grace_s < 0:
            raise ValueError(f"step_timeout_s and compile_grace_s must be >= 0, got {self.step_timeout_s}, "
                             f"{self.compile_grace_s}")


class InstanceServer(PrefillSide, DecodeSide, SendBack, KvPath, instance_pb2_grpc.InstanceServicer):
    def __init__(self, engine: Engine, config: InstanceConfig = InstanceConfig(), *,
                 scheduler_credentials: grpc.ChannelCredentials | None = None, transfer_server=None,
                 transfer_addresses: Sequence[str] | None = None):
        """transfer_server / transfer_addresses: a multi-process instance's leader passes its own transfer
        server and every process's address, by process index (`multihost.exchange_addresses`); otherwise the
        server starts its own when its role transfers KV."""
        import jax
        self.engine = engine
        self.config = config
        self.role = ROLES[config.role]
        self.instance_id = config.instance_id
        self.num_processes = jax.process_count()
        self.loop_thread = EngineLoop(engine, on_index_event=self._on_index_event,
                                      step_timeout_s=config.step_timeout_s, compile_grace_s=config.compile_grace_s)
        self.reporter: InstanceReporter | None = None
        self.health = health_aio.HealthServicer()
        self.draining = False
        self.port: int | None = None
        self._scheduler_credentials = scheduler_credentials
        self._server: grpc.aio.Server | None = None
        self._ids = itertools.count()
        self._stopped = False
        # Disaggregation state.
        self.transfer_server = transfer_server  # jax.experimental.transfer server (roles prefill and decode)
        self.kv_transport: CrossProcessTransport | None = None  # on it; owns the OpCounts of this instance's KV
        self._transfer_addresses = list(transfer_addresses) if transfer_addresses else None
        self._layout: list[instance_pb2.KvShard] | None = None  # this pool's, for PrepareKvTransfer answers
        # The decode side receives KV; in caching3 the prefill side also receives the decode-phase KV back.
        self.send_back = config.pd_mode == "caching3" and self.role in (common_pb2.ROLE_PREFILL,
                                                                         common_pb2.ROLE_DECODE)
        receives = self.role == common_pb2.ROLE_DECODE or (self.send_back and self.role == common_pb2.ROLE_PREFILL)
        self.kv_receiver = KvReceiver(engine.pool) if receives else None
        self.kv_counters = dict(kv_sent_tokens=0, kv_sent_bytes=0, kv_transfers=0, kv_transfer_failures=0,
                                kv_sent_back_tokens=0, kv_sent_back_bytes=0, kv_send_back_failures=0)
        self._send_backs: set[asyncio.Task] = set()
        self._peers: dict[str, grpc.aio.Channel] = {}
        # transfer id -> (internal id, sink, deadline): admitted at commit, waiting for its Decode call
        self._awaiting_decode: dict[str, tuple[str, QueueSink, float]] = {}
        self._reaper: asyncio.Task | None = None
        self._pulls = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="kv-pull")

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    # ------------------------------------------------------------------------------------- lifecycle
    async def start(self) -> "InstanceServer":
        """Start the engine thread and the server; register with the scheduler (if any)."""
        if self.role in (common_pb2.ROLE_PREFILL, common_pb2.ROLE_DECODE) and self.transfer_server is None:
            if self.num_processes > 1:
                raise RuntimeError("a multi-process instance needs the transfer server of every process: pass "
                                   "transfer_server and transfer_addresses (launch.instance does)")
            from jaxserve.mempool.transfer import TransferServer
            self.transfer_server = TransferServer(address=f"{self.config.host}:0")
        if self.transfer_server is not None and self._transfer_addresses is None:
            self._transfer_addresses = [self.transfer_server.address]
        if self.transfer_server is not None:
            self.kv_transport = CrossProcessTransport(self.transfer_server, self._transfer_addresses)
        if self.kv_receiver is not None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap())
        loop = asyncio.get_running_loop()
        self.loop_thread.on_broken = lambda why: asyncio.run_coroutine_threadsafe(self._set_serving(False), loop)
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
        await self._stop_disagg()
        await asyncio.get_running_loop().run_in_executor(None, self.loop_thread.stop)

    async def _stop_disagg(self) -> None:
        for task in list(self._send_backs):
            task.cancel()
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for channel in self._peers.values():
            await channel.close(grace=0)
        self._peers.clear()
        self._pulls.shutdown(wait=False, cancel_futures=True)

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
        sink = QueueSink(asyncio.get_running_loop())
        # Ids are per instance: two callers may reuse a request id, and a moved request comes back with its own.
        internal_id = f"{request.request_id}#{next(self._ids)}"
        self.loop_thread.add(internal_id, request.request_id, request.prompt_token_ids, request.generated_token_ids,
                             params, sink, arrival)
        async for response in self._pump(sink, internal_id, context):
            yield response

    async def _pump(self, sink: QueueSink, internal_id: str, context):
        """Yield a running request's InstanceGenerateResponses from its sink; if the call goes away first
        (cancelled, deadline), abort the request in the engine, which frees its pages."""
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
                        token_ids=last, finish_reason=FINISH_REASON_CODES[reason],
                        usage=common_pb2.InstanceUsage(**usage))
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

    # ------------------------------------------------------------------------------- disaggregation
    async def _require_role(self, role: int, rpc: str, context, *, send_back: bool = False) -> None:
        """send_back: a PD-Caching-3 prefill instance serves this RPC too (it receives the decode-phase KV)."""
        if self.role != role and not (send_back and self.send_back and self.role == common_pb2.ROLE_PREFILL):
            await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                                f"{rpc} is served by instances of role {ROLE_NAMES[role]}; instance "
                                f"{self.instance_id or self.address} has role {ROLE_NAMES[self.role]}")
        if self.draining or self._stopped:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"instance {self.instance_id} is draining")
        if self.loop_thread.broken:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"instance {self.instance_id}: the engine is broken ({self.loop_thread.broken})")

    # ----------------------------------------------------------------------------------- operations
    async def Abort(self, request, context):
        found = await asyncio.wrap_future(self.loop_thread.abort_external(request.request_id))
        if self.kv_receiver is not None:  # a reservation whose prefill gave up
            found = await asyncio.wrap_future(self.loop_thread.submit(
                lambda: self.kv_receiver.cancel_request(request.request_id))) or found
            for tid, (internal_id, sink, _) in list(self._awaiting_decode.items()):
                if internal_id.rsplit("#", 1)[0] == request.request_id:
                    self._awaiting_decode.pop(tid, None)
                    found = True
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
        kv = dict(self.kv_counters)
        pending = held = 0
        if self.kv_receiver is not None:
            for k, v in self.kv_receiver.counters.items():
                kv[k] = kv.get(k, 0) + v
            with contextlib.suppress(Exception):
                pending, held = await asyncio.wrap_future(self.loop_thread.submit(
                    lambda: (len(self.kv_receiver.pending), self.kv_receiver.held_pages())))
            pending += len(self._awaiting_decode)
        return instance_pb2.InstanceStats(
            kv_pending=pending, kv_held_pages=held, **kv,
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
