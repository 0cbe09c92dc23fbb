"""The Instance gRPC server: one engine (owned by an `EngineLoop` thread) served as `jaxserve.v1.Instance`
plus `grpc.health.v1`, registered with the global scheduler through `InstanceReporter`, to which it streams
its prompt-index inserts/evictions and its load. A drop-in for `jaxserve.scheduler.fake_instance`.

Role colocated serves Generate. Role prefill serves Prefill: it prefills with `prefill_only`, samples the
first token and sends the KV its decode target lacks (PrepareKvTransfer / CommitKvTransfer on the target; the
KV moves by `jax.experimental.transfer`, see `kv_transfer.py`). Role decode serves PrepareKvTransfer,
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
import functools
import itertools
import logging
import os
import time
from typing import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from jaxserve.engine.engine import Engine
from jaxserve.engine.sampling import SamplingParams
from jaxserve.instance.engine_loop import EngineLoop, Sink, default_seed
from jaxserve.instance.kv_transfer import KvReceiver, fault
from jaxserve.proto.enums import FINISH_REASON_CODES
from jaxserve.proto.v1 import common_pb2, instance_pb2, instance_pb2_grpc, scheduler_pb2
from jaxserve.scheduler.reporter import InstanceReporter

log = logging.getLogger("jaxserve.instance")

SERVICE_NAME = "jaxserve.v1.Instance"
ROLES = {"colocated": common_pb2.ROLE_COLOCATED, "prefill": common_pb2.ROLE_PREFILL,
         "decode": common_pb2.ROLE_DECODE}
ROLE_NAMES = {v: k for k, v in ROLES.items()}
PD_MODES = ("basic", "caching1", "caching2", "caching3")


def pd_mode_caching(role: str, pd_mode: str, colocated_default: bool = True) -> bool:
    """Whether an instance of `role` caches prefixes in `pd_mode` (MemServe's PD modes): the prefill side from
    caching1 on, the decode side from caching2 on; colocated instances keep their own setting."""
    if pd_mode not in PD_MODES:
        raise ValueError(f"pd_mode must be one of {PD_MODES}, got {pd_mode!r}")
    if role == "prefill":
        return pd_mode != "basic"
    if role == "decode":
        return pd_mode in ("caching2", "caching3")
    return colocated_default


class _KvFailed(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


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


class _QueueSink(Sink):
    """Hands engine-thread events to the handler's asyncio queue. With `on_finish(tokens)`, also keeps the
    request's whole token sequence (starting from `context`) and calls it on the event loop when the request
    finishes normally (PD-Caching-3's send-back)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, context: Sequence[int] | None = None, on_finish=None):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tokens = list(context) if on_finish is not None else None
        self.on_finish = on_finish

    def push(self, event: tuple) -> None:
        if self.tokens is not None:
            if event[0] == "tokens":
                self.tokens += event[1]
            elif event[0] == "finish":
                self.tokens += event[3]
                if event[1] != "abort":
                    with contextlib.suppress(RuntimeError):
                        self.loop.call_soon_threadsafe(self.on_finish, list(self.tokens))
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
        self._awaiting_decode: dict[str, tuple[str, "_QueueSink", float]] = {}
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

    async def kill(self) -> None:
        """A crash, for tests: the server and the report stream vanish without deregistering."""
        self._stopped = True
        if self.reporter is not None:
            await self.reporter.stop(deregister=False)
        if self._server is not None:
            await self._server.stop(0)
        await self._stop_disagg()
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
        async for response in self._pump(sink, internal_id, context):
            yield response

    async def _pump(self, sink: "_QueueSink", internal_id: str, context):
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

    def _peer(self, address: str) -> instance_pb2_grpc.InstanceStub:
        channel = self._peers.get(address)
        if channel is None:
            channel = self._peers[address] = grpc.aio.insecure_channel(address)
        return instance_pb2_grpc.InstanceStub(channel)

    async def _on_engine(self, fn):
        return await asyncio.wrap_future(self.loop_thread.submit(fn))

    async def Prefill(self, request, context):
        """Role prefill: prefill (prefill_only), sample the first token, send the KV the decode target lacks,
        release the pages (the index keeps the full ones from caching1 on), answer."""
        await self._require_role(common_pb2.ROLE_PREFILL, "Prefill", context)
        arrival = time.perf_counter()
        inner = request.request
        try:
            params = sampling_params(inner)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        sink = _QueueSink(asyncio.get_running_loop())
        internal_id = f"{inner.request_id}#{next(self._ids)}"
        self.loop_thread.add(internal_id, inner.request_id, inner.prompt_token_ids, inner.generated_token_ids,
                             params, sink, arrival, prefill_only=True)
        try:
            event = await sink.queue.get()
            if event[0] == "error":
                await context.abort(event[1], f"instance {self.instance_id}: {event[2]}")
            if event[0] == "finish":  # the first token ends the request: nothing to send
                _, reason, usage, last = event
                return instance_pb2.PrefillResponse(first_token_id=last[-1] if last else 0,
                                                     finish_reason=FINISH_REASON_CODES[reason],
                                                     usage=common_pb2.InstanceUsage(**usage))
            assert event[0] == "prefilled", event
            _, first, usage = event
            if not request.decode_target.address:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Prefill needs decode_target.address")
            try:
                tid, sent_tokens, sent_bytes = await self._send_kv(internal_id, inner, first,
                                                                   request.decode_target, context)
            except _KvFailed as e:
                self.kv_counters["kv_transfer_failures"] += 1
                log.warning("request %s: %s", inner.request_id, e.message)
                await context.abort(e.code, f"instance {self.instance_id}: {e.message}")
            self.kv_counters["kv_sent_tokens"] += sent_tokens
            self.kv_counters["kv_sent_bytes"] += sent_bytes
            self.kv_counters["kv_transfers"] += 1
            return instance_pb2.PrefillResponse(first_token_id=first, usage=common_pb2.InstanceUsage(**usage),
                                                transferred_tokens=sent_tokens, kv_handle=tid,
                                                transferred_bytes=sent_bytes)
        finally:
            # Sent, failed or cancelled: the prefill side's pages go (the block on its way is a copy).
            # Unknown ids (finished, failed) are a no-op.
            self.loop_thread.abort(internal_id)

    def _per_shard_layout(self, prep, peer: str):
        """The receiver's layout (`HeadShard`s) when this transfer goes per shard -- either instance has several
        processes, or config.kv_per_shard -- else None (the whole block moves as one offer)."""
        shards = list(prep.receiver_shards)
        if not (self.num_processes > 1 or any(x.process for x in shards) or self.config.kv_per_shard):
            return None
        if not shards:
            raise ValueError(f"{peer} does not describe its KV layout (PrepareKvTransferResponse.receiver_shards: "
                             "an older version?); per-shard transfers need it")
        from jaxserve.mempool.transfer import HeadShard
        return [HeadShard(x.process, x.head_start, x.head_end) for x in shards]

    def _offer_pages(self, pages: Sequence[int], layout) -> tuple[dict, int]:
        """Engine thread: gather `pages` and park them for the receiver (as one block, or per shard for the
        receiver `layout`: on a multi-process instance every process offers its own shards). Returns the
        CommitKvTransferRequest fields describing what was offered and the bytes it moves."""
        from jaxserve.mempool import transfer as tr
        if layout is None:
            uuid, chunks = tr.offer_block(self.transfer_server, self.engine.pool, pages)
            return (dict(source_address=self.transfer_server.address, pull_uuid=uuid, tensors=_tensor_specs(chunks)),
                    sum(int(x.nbytes) for x in chunks))
        if self.num_processes > 1:
            from jaxserve.engine import multihost
            sources, chunks, _, total = multihost.offer(self.engine, self.transfer_server, self._transfer_addresses,
                                                        pages, layout)
        else:
            uuid = self.transfer_server.reserve_uuids(max(x.process for x in layout) + 1)
            sources, chunks, _, total = tr.offer_shards(self.transfer_server, self.engine.pool, pages, layout, uuid,
                                                        self._transfer_addresses)
        return (dict(source_address=self.transfer_server.address, tensors=_tensor_specs(chunks),
                     sources=[instance_pb2.KvSource(
                         receiver_process=x.receiver_process, address=x.address, pull_uuid=x.uuid,
                         pieces=[instance_pb2.KvPiece(receiver_shard=j, head_start=a, head_end=b)
                                 for j, a, b in x.pieces]) for x in sources]), total)

    def _offer(self, internal_id: str, start_page: int, layout):
        """Engine thread: gather the held pages from start_page on and park them on the transfer server(s)."""
        return self._offer_pages(self.loop_thread.held_pages(internal_id)[start_page:], layout)

    async def _send_kv(self, internal_id: str, inner, first: int, target, context) -> tuple[str, int, int]:
        """Prepare on the decode target, offer the missing pages, commit. (transfer id, tokens, bytes) sent;
        _KvFailed with the status to answer otherwise (the decode side frees its reservation on its own)."""
        ps = self.engine.pool.page_size
        ctx = list(inner.prompt_token_ids) + list(inner.generated_token_ids)
        n_pages = -(-len(ctx) // ps)
        timeout = self.config.kv_transfer_timeout_s
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = max(min(timeout, remaining), 0.1)
        stub = self._peer(target.address)
        name = f"decode instance {target.instance_id or target.address}"
        try:
            prep = await stub.PrepareKvTransfer(instance_pb2.PrepareKvTransferRequest(
                request_id=inner.request_id, token_ids=ctx, page_size=ps),
                timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise _KvFailed(_kv_code(e), f"KV transfer to {name} failed at PrepareKvTransfer: "
                                         f"{e.code().name}: {e.details()}") from None
        start = prep.cached_tokens // ps
        try:
            if prep.cached_tokens % ps or start > n_pages:
                raise _KvFailed(grpc.StatusCode.INTERNAL, f"{name} holds {prep.cached_tokens} tokens of a "
                                                          f"{len(ctx)}-token context with pages of {ps}")
            try:
                layout = self._per_shard_layout(prep, name)
            except ValueError as e:
                raise _KvFailed(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from None
            fields, nbytes = dict(source_address=self.transfer_server.address), 0
            if start < n_pages:
                fields, nbytes = await self._on_engine(self.loop_thread.guarded(
                    lambda: self._offer(internal_id, start, layout), self.config.kv_transfer_timeout_s))
            decode_request = instance_pb2.InstanceGenerateRequest()
            decode_request.CopyFrom(inner)
            decode_request.generated_token_ids.append(first)
            decode_request.max_tokens = max(inner.max_tokens - 1, 1)
            commit = await stub.CommitKvTransfer(instance_pb2.CommitKvTransferRequest(
                transfer_id=prep.transfer_id, request_id=inner.request_id, start_token=start * ps,
                num_tokens=len(ctx) - start * ps, **fields,
                insert=self.config.pd_mode in ("caching2", "caching3"),
                request=decode_request, send_back_to=instance_pb2.KvTarget(
                    instance_id=self.instance_id, address=self.address) if self.send_back else None),
                timeout=timeout + 5.0)
        except BaseException as e:
            # Best effort: free the target's reservation now rather than at its deadline.
            with contextlib.suppress(Exception):
                await asyncio.shield(stub.Abort(instance_pb2.AbortRequest(request_id=inner.request_id), timeout=2.0))
            if isinstance(e, grpc.aio.AioRpcError):
                raise _KvFailed(_kv_code(e), f"KV transfer to {name} failed at CommitKvTransfer: "
                                             f"{e.code().name}: {e.details()}") from None
            if isinstance(e, Exception) and not isinstance(e, _KvFailed):  # broken: a process of this instance
                raise _KvFailed(grpc.StatusCode.UNAVAILABLE if self.loop_thread.broken else grpc.StatusCode.INTERNAL,
                                f"KV transfer to {name} failed: {type(e).__name__}: {e}") from None
            raise
        return prep.transfer_id, commit.received_tokens, nbytes

    async def PrepareKvTransfer(self, request, context):
        """Role decode: reserve pages for a context's KV; the cached prefix (caching2/3) is not sent."""
        await self._require_role(common_pb2.ROLE_DECODE, "PrepareKvTransfer", context, send_back=True)
        ps = self.engine.pool.page_size
        try:
            r = await self._on_engine(lambda: self.kv_receiver.prepare(
                request.request_id, request.token_ids, request.page_size, self.config.kv_transfer_timeout_s))
        except MemoryError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"instance {self.instance_id}: {e}")
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"instance {self.instance_id}: {e}")
        return instance_pb2.PrepareKvTransferResponse(
            transfer_id=r.transfer_id, cached_tokens=r.start_page * ps, num_pages_reserved=len(r.new_pages),
            receiver_shards=self._receiver_shards())

    def _receiver_shards(self) -> list[instance_pb2.KvShard]:
        if self._layout is None:
            from jaxserve.mempool.transfer import pool_layout
            self._layout = [instance_pb2.KvShard(process=x.process, head_start=x.start, head_end=x.end)
                            for x in pool_layout(self.engine.pool)]
        return self._layout

    async def CommitKvTransfer(self, request, context):
        """Role decode: pull the block, write and index it, admit the request (if given): it starts decoding
        at once and its tokens wait for the Decode call naming this transfer."""
        if fault("exit_before_commit"):
            log.error("test fault %s: exiting", "exit_before_commit")
            os._exit(17)
        await self._require_role(common_pb2.ROLE_DECODE, "CommitKvTransfer", context, send_back=True)
        tid = request.transfer_id
        if self.role == common_pb2.ROLE_PREFILL and not (request.cache_only and request.insert):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"instance {self.instance_id} (prefill) only "
                                "takes KV for its prefix cache: cache_only and insert must be set")
        if request.cache_only and request.HasField("request"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a cache_only transfer admits no request")
        ps = self.engine.pool.page_size
        committed = False
        try:
            try:
                r = await self._on_engine(lambda: self.kv_receiver.get(tid))
            except KeyError as e:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"instance {self.instance_id}: {e.args[0]}")
            if request.start_token != r.start_page * ps or request.num_tokens != len(r.tokens) - r.start_page * ps:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"transfer {tid} sends tokens [{request.start_token}, "
                                    f"{request.start_token + request.num_tokens}) but "
                                    f"[{r.start_page * ps}, {len(r.tokens)}) were reserved")
            from jaxserve.mempool import transfer as tr
            block, nbytes, write = None, 0, None
            timeout = self.config.kv_transfer_timeout_s
            if r.new_pages:
                if not request.tensors:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"transfer {tid}: no tensor described")
                spec = request.tensors[0]
                if any(t.shape != spec.shape or t.dtype != spec.dtype or t.num_shards != spec.num_shards
                       for t in request.tensors):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"transfer {tid}: the tensors (chunks) of a block must have one shape")
                shape, k = list(spec.shape), len(request.tensors)
                sources = [tr.ShardSource(x.receiver_process, x.address, x.pull_uuid,
                                          tuple((p.receiver_shard, p.head_start, p.head_end) for p in x.pieces))
                           for x in request.sources]
                if not sources and self.num_processes > 1:
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                        f"instance {self.instance_id} has {self.num_processes} processes: it takes "
                                        "per-shard KV transfers only (CommitKvTransferRequest.sources)")
                if sources and self.num_processes > 1:
                    # Every process pulls its own pieces and writes them, on the engine thread (in order with the
                    # steps, which wait meanwhile): see multihost.receive.
                    from jaxserve.engine import multihost
                    nbytes = tr.shard_bytes(sources, shape, spec.dtype, k)
                    write = functools.partial(multihost.receive, self.engine, self.transfer_server, sources, shape,
                                              spec.dtype, k, timeout=timeout)
                else:
                    pull = functools.partial(tr.receive_shards, self.transfer_server, self.engine.pool, sources,
                                             shape, spec.dtype, k, timeout) if sources else functools.partial(
                        tr.pull_block, self.transfer_server, self.engine.pool, request.source_address,
                        request.pull_uuid, shape, spec.dtype, spec.num_shards, timeout, chunks=k)
                    try:
                        block = await asyncio.get_running_loop().run_in_executor(self._pulls, pull)
                    except tr.TransferError as e:
                        await context.abort(grpc.StatusCode.ABORTED,
                                            f"instance {self.instance_id}: KV pull for transfer {tid} failed: {e}")
                    nbytes = sum(int(x.nbytes) for x in block)
            sink = None
            if request.HasField("request"):
                inner = request.request
                on_finish = None
                if self.send_back and request.HasField("send_back_to") and request.send_back_to.address:
                    target, rid = request.send_back_to, inner.request_id
                    on_finish = lambda tokens: self._start_send_back(rid, tokens, target)  # noqa: E731
                sink = _QueueSink(asyncio.get_running_loop(),
                                  list(inner.prompt_token_ids) + list(inner.generated_token_ids), on_finish)
            internal_id = f"{request.request_id}#{next(self._ids)}"
            arrival = time.perf_counter()

            def finish():  # engine thread
                got = self.kv_receiver.fill(tid, block, nbytes, write=write)
                if request.cache_only:  # PD-Caching-3 send-back: the index keeps the pages, we let go
                    self.engine.pool.free(self.kv_receiver.take(tid).pages)
                elif sink is not None:
                    self._admit(self.kv_receiver.take(tid), request.request, sink, internal_id, arrival)
                return got

            try:
                r = await self._on_engine(self.loop_thread.guarded(finish, timeout))
            except KeyError as e:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"instance {self.instance_id}: {e.args[0]}")
            except ValueError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"instance {self.instance_id}: {e}")
            except tr.TransferError as e:
                await context.abort(grpc.StatusCode.ABORTED,
                                    f"instance {self.instance_id}: KV pull for transfer {tid} failed: {e}")
            except Exception as e:  # noqa: BLE001 - a clear error, pages freed below
                await context.abort(grpc.StatusCode.INTERNAL,
                                    f"instance {self.instance_id}: commit of {tid} failed: {type(e).__name__}: {e}")
            committed = True
            if sink is not None:
                self._awaiting_decode[tid] = (internal_id, sink, time.monotonic() + self.config.kv_transfer_timeout_s)
            return instance_pb2.CommitKvTransferResponse(
                received_tokens=len(r.tokens) - r.start_page * ps,
                inserted_tokens=len(r.tokens) // ps * ps if r.insert else 0, received_bytes=nbytes)
        finally:
            if not committed:  # failed, refused or cancelled: nothing half-received stays
                self.loop_thread.submit(lambda: self.kv_receiver.cancel(tid))

    # ------------------------------------------------------------------------- PD-Caching-3 send-back
    def _start_send_back(self, request_id: str, tokens: list[int], target) -> None:
        """Event loop, at a decode request's finish: send its decode-phase KV back in the background."""
        if self._stopped:
            return
        task = asyncio.get_running_loop().create_task(self._send_back_kv(request_id, tokens, target))
        self._send_backs.add(task)
        task.add_done_callback(self._send_backs.discard)

    async def _send_back_kv(self, request_id: str, tokens: list[int], target) -> None:
        """Decode side, caching3: the whole pages of the finished request's computed context (every token but
        the last sampled one) that the prefill instance lacks go to it with transfer_with_insert semantics:
        PrepareKvTransfer there (it references what it holds and reserves the rest), one gather + offer here,
        CommitKvTransfer(cache_only) there (pull, scatter, index, release). An optimisation only: a failure is
        logged and counted, never surfaced to the (finished) request."""
        ps = self.engine.pool.page_size
        seq = tokens[:(len(tokens) - 1) // ps * ps]
        if not seq:
            return
        name = f"prefill instance {target.instance_id or target.address}"
        timeout = self.config.kv_transfer_timeout_s
        pool = self.engine.pool
        # Reference what this side still holds of it (normally all of it: the decode side indexes its KV).
        n, pages = await self._on_engine(lambda: pool.match(seq))
        if n < ps:
            await self._on_engine(lambda: pool.free(pages))
            return
        seq = seq[:n]
        stub = self._peer(target.address)
        prepared = offered = False
        try:
            prep = await stub.PrepareKvTransfer(instance_pb2.PrepareKvTransferRequest(
                request_id=request_id, token_ids=seq, page_size=ps),
                timeout=timeout)
            prepared = True
            start = prep.cached_tokens // ps
            if prep.cached_tokens % ps or start > len(pages):
                raise RuntimeError(f"{name} holds {prep.cached_tokens} tokens of {len(seq)} with pages of {ps}")
            layout = self._per_shard_layout(prep, name)
            fields, nbytes = dict(source_address=self.transfer_server.address), 0
            if start < len(pages):  # engine thread: one gather of the missing pages, parked for the pull
                fields, nbytes = await self._on_engine(self.loop_thread.guarded(
                    lambda: self._offer_pages(pages[start:], layout), timeout))
                offered = True
            await stub.CommitKvTransfer(instance_pb2.CommitKvTransferRequest(
                transfer_id=prep.transfer_id, request_id=request_id, start_token=start * ps,
                num_tokens=len(seq) - start * ps, **fields, insert=True, cache_only=True), timeout=timeout + 5.0)
            self.kv_counters["kv_sent_back_tokens"] += len(seq) - start * ps
            self.kv_counters["kv_sent_back_bytes"] += nbytes
        except BaseException as e:
            self.kv_counters["kv_send_back_failures"] += 1
            if prepared:
                with contextlib.suppress(Exception):
                    await asyncio.shield(stub.Abort(instance_pb2.AbortRequest(request_id=request_id), timeout=2.0))
            if isinstance(e, Exception):
                detail = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.aio.AioRpcError) else \
                    f"{type(e).__name__}: {e}"
                log.warning("request %s: sending the decode-phase KV back to %s failed (offered: %s): %s",
                            request_id, name, offered, detail)
            else:
                raise
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._on_engine(lambda: pool.free(pages)))

    def _admit(self, r, inner, sink: "_QueueSink", internal_id: str, arrival: float) -> None:
        """Engine thread: admit a request whose KV a committed reservation holds; frees the pages on failure."""
        try:
            params = sampling_params(inner)
            prompt, generated = list(inner.prompt_token_ids), list(inner.generated_token_ids)
            if not generated or prompt + generated[:-1] != r.tokens:
                raise ValueError("the request's context does not match the transferred tokens")
            ps = self.engine.pool.page_size
            self.loop_thread.add_prefilled(internal_id, inner.request_id, prompt, generated, params, r.pages,
                                           num_computed=len(r.tokens),
                                           num_indexed_pages=len(r.tokens) // ps if r.insert else 0,
                                           sink=sink, arrival=arrival, num_resumed=len(generated))
        except BaseException:
            self.engine.pool.free(r.pages)
            raise

    async def Decode(self, request, context):
        """Role decode: stream the tokens of a request whose KV arrived with transfer `kv_handle`."""
        await self._require_role(common_pb2.ROLE_DECODE, "Decode", context)
        tid = request.kv_handle
        entry = self._awaiting_decode.pop(tid, None)
        if entry is None:
            # Committed without a request (an older prefill side): admit it now.
            sink = _QueueSink(asyncio.get_running_loop())
            internal_id = f"{request.request.request_id}#{next(self._ids)}"
            arrival = time.perf_counter()

            def admit():
                r = self.kv_receiver.get(tid)
                if not r.committed:
                    raise KeyError(f"KV transfer {tid!r} is not committed yet")
                self._admit(self.kv_receiver.take(tid), request.request, sink, internal_id, arrival)
            try:
                await self._on_engine(admit)
            except KeyError as e:
                await context.abort(grpc.StatusCode.NOT_FOUND,
                                    f"instance {self.instance_id}: no KV for handle {tid!r}: {e.args[0]} "
                                    f"(received KV waits {self.config.kv_transfer_timeout_s:g} s for its Decode)")
            except ValueError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"instance {self.instance_id}: {e}")
            entry = (internal_id, sink, 0.0)
        internal_id, sink, _ = entry
        async for response in self._pump(sink, internal_id, context):
            yield response

    async def _reap(self) -> None:
        """Decode side: free reservations never committed and abort received requests never claimed."""
        while True:
            await asyncio.sleep(min(0.5, self.config.kv_transfer_timeout_s / 4))
            now = time.monotonic()
            try:
                expired = await self._on_engine(lambda: [
                    (r.transfer_id, r.request_id) for r in self.kv_receiver.expired(now)
                    if self.kv_receiver.cancel(r.transfer_id)])
            except Exception:  # noqa: BLE001 - the engine loop is stopping
                return
            for tid, rid in expired:
                log.warning("KV transfer %s (request %s) not committed within %.1f s: its pages are freed",
                            tid, rid, self.config.kv_transfer_timeout_s)
            for tid, (internal_id, sink, deadline) in list(self._awaiting_decode.items()):
                if deadline < now:
                    self._awaiting_decode.pop(tid, None)
                    self.kv_receiver.counters["kv_transfer_failures"] += 1
                    log.warning("request %s: no Decode call for transfer %s within %.1f s: aborted", internal_id,
                                tid, self.config.kv_transfer_timeout_s)
                    self.loop_thread.abort(internal_id)

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


def _tensor_specs(chunks) -> list[instance_pb2.TensorSpec]:
    """The control message's description of an offered block: one TensorSpec per chunk."""
    from jaxserve.mempool.transfer import num_head_shards
    return [instance_pb2.TensorSpec(shape=list(x.shape), dtype=str(x.dtype), num_shards=num_head_shards(x))
            for x in chunks]


def _kv_code(error: grpc.aio.AioRpcError) -> grpc.StatusCode:
    """The status a Prefill answers when its decode target failed a transfer step."""
    code = error.code()
    if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INVALID_ARGUMENT):
        return code
    return grpc.StatusCode.ABORTED  # deadline, pull failure, cancelled...: the transfer, not this instance


def build_engine(model: str = "demo", **engine_kwargs) -> Engine:
    """An Engine built exactly as the offline `LLM` builds it (same flags, same defaults), so an instance and
    `LLM.generate` produce the same tokens for the same model and seed."""
    from jaxserve.engine.llm import LLM
    return LLM(model=model, **engine_kwargs).engine
