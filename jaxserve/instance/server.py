"""The Instance gRPC server: one engine (owned by an `EngineLoop` thread) served as `jaxserve.v1.Instance`
plus `grpc.health.v1`, registered with the global scheduler through `InstanceReporter`, to which it streams
its prompt-index inserts/evictions and its load (`jaxserve.testing.fake_instance` is its engine-less stand-in).
This module is the servicer and its lifecycle; it delegates the PD RPCs to the objects it owns:
`PrefillSide` (pd_prefill.py), `DecodeSide` (pd_decode.py), `SendBack` (pd_send_back.py, PD-Caching-3), all on
one `KvPath` (pd_common.py: engine thread, peers, transport selection), the KV path itself in
`jaxserve.mempool.transfer`.

Role colocated serves Generate. Role prefill serves Prefill: it prefills with `prefill_only`, samples the
first token and sends the KV its decode target lacks (PrepareKvTransfer / CommitKvTransfer on the target; the
KV moves by `jax.experimental.transfer`, or with `kv_transport` "grpc" as bytes over FetchKv on this service,
see `pd_prefill.py` and `kv_stream.py`). Role decode serves PrepareKvTransfer,
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
from jaxserve.instance.kv_stream import serve_fetch_kv
from jaxserve.instance.mux import generate_many
from jaxserve.instance.pd_common import KV_TRANSPORTS, Identity, KvPath, add_request, pump, resolve_kv_transport
from jaxserve.instance.pd_decode import DecodeSide
from jaxserve.instance.pd_prefill import PrefillSide
from jaxserve.instance.pd_send_back import SendBack
from jaxserve.instance.peer_push import PeerPush
from jaxserve.instance.throughput_log import ThroughputLog
from jaxserve.proto.v1 import common_pb2, instance_pb2, instance_pb2_grpc, scheduler_pb2
from jaxserve.scheduler.reporter import InstanceReporter
from jaxserve.security import AuthInterceptor, LinkSecurity, Secrets, TlsFiles, check_bind, serve_port

log = logging.getLogger("jaxserve.instance")

SERVICE_NAME = "jaxserve.v1.Instance"
ROLES = {"colocated": common_pb2.ROLE_COLOCATED, "prefill": common_pb2.ROLE_PREFILL,
         "decode": common_pb2.ROLE_DECODE}
ROLE_NAMES = {v: k for k, v in ROLES.items()}
KV_COUNTERS = dict(kv_sent_tokens=0, kv_sent_bytes=0, kv_transfers=0, kv_transfer_failures=0,
                   kv_sent_back_tokens=0, kv_sent_back_bytes=0, kv_send_back_failures=0,
                   kv_peer_sent_tokens=0, kv_peer_sent_bytes=0, kv_peer_push_failures=0)


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
    # mTLS on every link of the instance (all three or none): its certificate and key (server identity, and
    # client identity towards the scheduler and peers) and the cluster's CA (verifies every caller).
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_ca_file: str | None = None
    insecure: bool = False                 # allow a non-loopback bind with no cluster secret
    # Peer fetch (issue 18), colocated instances: serve PushKv (offer a cached prefix to another instance) and
    # take pushed prefixes into the prefix cache (PrepareKvTransfer / CommitKvTransfer cache_only).
    peer_fetch: bool = False
    # The backend this instance sends KV with (pd_common.resolve_kv_transport): "jax" (jax.experimental.transfer,
    # plaintext), "grpc" (raw bytes over the instance's own mTLS gRPC link, FetchKv; single-process only) or
    # "auto" ("grpc" with TLS files, else "jax"). Receivers pull either kind.
    kv_transport: str = "auto"

    def __post_init__(self):
        tls = (self.tls_cert_file, self.tls_key_file, self.tls_ca_file)
        if any(f is not None for f in tls) and any(f is None for f in tls):
            raise ValueError("an instance's TLS is mTLS: give tls_cert_file, tls_key_file and tls_ca_file together")
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {sorted(ROLES)}, got {self.role!r}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65536), got {self.port}")
        if self.pd_mode not in PD_MODES:
            raise ValueError(f"pd_mode must be one of {PD_MODES}, got {self.pd_mode!r}")
        if self.kv_transfer_timeout_s <= 0:
            raise ValueError(f"kv_transfer_timeout_s must be > 0, got {self.kv_transfer_timeout_s}")
        if self.peer_fetch and self.role not in ("colocated", "prefill"):
            raise ValueError(f"peer_fetch is for colocated and prefill instances (they compute prompts); this one "
                             f"has role {self.role!r}")
        if self.peer_fetch and self.role == "prefill" and not pd_mode_caching("prefill", self.pd_mode):
            raise ValueError(f"peer_fetch on a prefill instance needs a pd_mode whose prefill side caches "
                             f"(caching1-3), got {self.pd_mode!r}")
        if self.kv_transport not in KV_TRANSPORTS:
            raise ValueError(f"kv_transport must be one of {KV_TRANSPORTS}, got {self.kv_transport!r}")
        if self.step_timeout_s < 0 or self.compile_grace_s < 0:
            raise ValueError(f"step_timeout_s and compile_grace_s must be >= 0, got {self.step_timeout_s}, "
                             f"{self.compile_grace_s}")


def model_identity(model_name: str) -> dict:
    """architecture and tokenizer_fingerprint of a model folder (or bundled name), for the registration."""
    from jaxserve.scheduler.tokenizer import model_architecture, tokenizer_fingerprint
    from jaxserve.util import resolve_model_path
    try:
        folder = resolve_model_path(model_name) if model_name else None
    except (OSError, ValueError):
        folder = None
    if folder is None or not folder.is_dir():
        return {}
    return dict(architecture=model_architecture(folder), tokenizer_fingerprint=tokenizer_fingerprint(folder))


class InstanceServer(instance_pb2_grpc.InstanceServicer):
    def __init__(self, engine: Engine, config: InstanceConfig = InstanceConfig(), *,
                 scheduler_credentials: grpc.ChannelCredentials | None = None, transfer_server=None,
                 transfer_addresses: Sequence[str] | None = None, secrets: Secrets = Secrets()):
        """transfer_server / transfer_addresses: a multi-process instance's leader passes its own transfer
        server and every process's address, by process index (`multihost.exchange_addresses`); otherwise the
        server starts its own when its role transfers KV. secrets: the cluster secret, required from every
        caller (scheduler, peers) and sent on every call this instance makes (`jaxserve.security`)."""
        import jax
        self.engine = engine
        self.config = config
        self.link = LinkSecurity(secrets, TlsFiles.of(config.tls_cert_file, config.tls_key_file, config.tls_ca_file),
                                 config.insecure)
        self.role = ROLES[config.role]
        self.identity = Identity(instance_id=config.instance_id)
        self.num_processes = jax.process_count()
        self.loop_thread = EngineLoop(engine, on_index_event=self._on_index_event,
                                      step_timeout_s=config.step_timeout_s, compile_grace_s=config.compile_grace_s,
                                      throughput_log=ThroughputLog(config.instance_id or config.role))
        self.reporter: InstanceReporter | None = None
        self.health = health_aio.HealthServicer()
        self.draining = False
        self.port: int | None = None
        self._scheduler_credentials = scheduler_credentials
        self._server: grpc.aio.Server | None = None
        self._ids = itertools.count()
        self._stopped = False
        # Disaggregation: the parts the PD RPCs are delegated to.
        self.kv_path = KvPath(engine, self.loop_thread, config, num_processes=self.num_processes,
                              transfer_server=transfer_server, transfer_addresses=transfer_addresses,
                              link=self.link, kv_transport=resolve_kv_transport(
                                  config.kv_transport, tls=self.link.tls is not None,
                                  num_processes=self.num_processes, per_shard=config.kv_per_shard))
        # The decode side receives KV; in caching3 the prefill side also receives the decode-phase KV back.
        self.send_back = config.pd_mode == "caching3" and self.role in (common_pb2.ROLE_PREFILL,
                                                                         common_pb2.ROLE_DECODE)
        self.send_back_side = (SendBack(self.kv_path, stopping=lambda: self._stopped)
                               if self.send_back and self.role == common_pb2.ROLE_DECODE else None)
        self.prefill_side = (PrefillSide(self.kv_path, self.identity, self._ids, send_back=self.send_back)
                             if self.role == common_pb2.ROLE_PREFILL else None)
        self.peer_fetch = config.peer_fetch
        self.peer_push = PeerPush(self.kv_path) if self.peer_fetch else None
        receives = (self.role == common_pb2.ROLE_DECODE or self.peer_fetch
                    or (self.send_back and self.role == common_pb2.ROLE_PREFILL))
        self.decode_side = (DecodeSide(self.kv_path, self.identity, self._ids,
                                       cache_only=self.role != common_pb2.ROLE_DECODE,
                                       send_back=self.send_back_side) if receives else None)

    @property
    def instance_id(self) -> str:
        return self.identity.instance_id

    @instance_id.setter
    def instance_id(self, value: str) -> None:
        self.identity.instance_id = value

    @property
    def transfer_server(self):
        return self.kv_path.transfer_server

    @property
    def kv_transport(self):
        """The transport this instance sends KV with (CrossProcessTransport or GrpcStreamTransport; its `counts`
        are this instance's KV ops), or None."""
        return self.kv_path.transport

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    # ------------------------------------------------------------------------------------- lifecycle
    async def start(self) -> "InstanceServer":
        """Start the engine thread and the server; register with the scheduler (if any)."""
        check_bind(self.config.host, self.link.secrets.cluster_secret, self.config.insecure, "instance",
                   flag="--cluster_secret")
        self.kv_path.start(transfers=self.role in (common_pb2.ROLE_PREFILL, common_pb2.ROLE_DECODE) or self.peer_fetch)
        if self.decode_side is not None:
            self.decode_side.start()
        loop = asyncio.get_running_loop()
        self.loop_thread.on_broken = lambda why: asyncio.run_coroutine_threadsafe(self._set_serving(False), loop)
        self.loop_thread.start()
        server = grpc.aio.server(interceptors=[AuthInterceptor(self.link.secrets, "instance")])
        instance_pb2_grpc.add_InstanceServicer_to_server(self, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self.port = serve_port(server, f"{self.config.host}:{self.config.port}", self.link.tls,
                               require_client_cert=True)
        if self.port == 0:
            raise RuntimeError(f"could not bind {self.config.host}:{self.config.port}")
        await server.start()
        self._server = server
        self.identity.address = self.address
        self.kv_path.set_address(self.address)
        await self._set_serving(not self.loop_thread.broken)
        if self.config.scheduler_address:
            identity = model_identity(self.config.model_name)
            registration = scheduler_pb2.RegisterRequest(
                instance_id=self.instance_id, address=self.address, role=self.role, model=self.config.model_name,
                page_size=self.engine.pool.page_size, max_model_len=self.engine.max_model_len,
                vocab_size=self.engine.model_config.vocab_size, num_pages=self.engine.pool.num_pages - 1,
                kv_cache_dtype=self.engine.pool.kv_cache_dtype, kv_page_bytes=self.engine.pool.page_bytes,
                generate_many=self.role == common_pb2.ROLE_COLOCATED, **identity)
            if self.config.profile_at_start:
                registration.profile.extend(await self._start_profile(identity))
            self.reporter = InstanceReporter(self.config.scheduler_address, registration,
                                             snapshot_tiers=self.loop_thread.mirror.snapshot_tiers, load=self.load,
                                             credentials=self._scheduler_credentials or (
                                                 self.link.tls.channel_credentials() if self.link.mtls else None),
                                             retry_interval_s=0.2, max_retry_interval_s=2.0,
                                             secret=self.link.secrets.cluster_secret)
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
        if self.send_back_side is not None:
            self.send_back_side.cancel()
        if self.decode_side is not None:
            self.decode_side.stop()
        await self.kv_path.close()

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
            self.reporter.event(kind, tokens)

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
        internal_id, sink = await add_request(self.loop_thread, self._ids, request, context, arrival)
        async for response in pump(sink, internal_id, context, self.loop_thread, self.identity):
            yield response

    async def Generate(self, request, context):
        if self.role != common_pb2.ROLE_COLOCATED:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"Generate needs role colocated; this instance's role is {ROLE_NAMES[self.role]}")
        async for response in self._stream_request(request, context):
            yield response

    async def GenerateMany(self, request_iterator, context):
        if self.role != common_pb2.ROLE_COLOCATED:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"GenerateMany needs role colocated; this instance's role is {ROLE_NAMES[self.role]}")
        async for response in generate_many(self, request_iterator, context):
            yield response

    # ------------------------------------------------------------------------------- disaggregation
    async def _require_role(self, role: int, rpc: str, context, *, send_back: bool = False) -> None:
        """send_back: a PD-Caching-3 prefill instance serves this RPC too (it receives the decode-phase KV), and
        so does a colocated instance with peer fetch (it receives pushed prefixes)."""
        if self.role != role and not (send_back and self.send_back and self.role == common_pb2.ROLE_PREFILL) \
                and not (send_back and self.peer_fetch):
            await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                                f"{rpc} is served by instances of role {ROLE_NAMES[role]}; instance "
                                f"{self.instance_id or self.address} has role {ROLE_NAMES[self.role]}")
        if self.draining or self._stopped:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"instance {self.instance_id} is draining")
        if self.loop_thread.broken:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"instance {self.instance_id}: the engine is broken ({self.loop_thread.broken})")

    async def Prefill(self, request, context):
        await self._require_role(common_pb2.ROLE_PREFILL, "Prefill", context)
        return await self.prefill_side.prefill(request, context)

    async def PrepareKvTransfer(self, request, context):
        await self._require_role(common_pb2.ROLE_DECODE, "PrepareKvTransfer", context, send_back=True)
        return await self.decode_side.prepare(request, context)

    async def CommitKvTransfer(self, request, context):
        await self._require_role(common_pb2.ROLE_DECODE, "CommitKvTransfer", context, send_back=True)
        return await self.decode_side.commit(request, context)

    async def PushKv(self, request, context):
        if self.peer_push is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                                f"PushKv is served by colocated instances started with peer fetch; instance "
                                f"{self.instance_id or self.address} ({ROLE_NAMES[self.role]}) was not")
        if self.draining or self._stopped or self.loop_thread.broken:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"instance {self.instance_id} is not serving")
        return await self.peer_push.push(request, context)

    async def FetchKv(self, request, context):
        # Any role that offers KV with kv_transport "grpc" serves it; elsewhere nothing is parked (NOT_FOUND).
        async for chunk in serve_fetch_kv(self.kv_path.stream and self.kv_path.stream.parked, request, context,
                                          f"instance {self.instance_id or self.address}"):
            yield chunk

    async def Decode(self, request, context):
        await self._require_role(common_pb2.ROLE_DECODE, "Decode", context)
        async for response in self.decode_side.decode(request, context):
            yield response

    # ----------------------------------------------------------------------------------- operations
    async def Abort(self, request, context):
        found = await asyncio.wrap_future(self.loop_thread.abort_external(request.request_id))
        if self.decode_side is not None:  # a reservation whose prefill gave up, a received request
            found = await self.decode_side.abort(request.request_id) or found
        return instance_pb2.AbortResponse(found=found)

    async def _start_profile(self, identity: dict) -> list[common_pb2.ProfileSample]:
        """The cost-model profile sent with the registration: reused from the compilation-cache folder when
        this engine was profiled there before (`profiling.profile_cache_file`), else measured and kept."""
        from jaxserve.instance import profiling
        from jaxserve.scheduler.cost_model import profile_points
        points = profile_points(self.engine.max_model_len)
        path = profiling.profile_cache_file(self.engine, identity, points)
        cached = profiling.load_profile(path)
        if cached is not None:
            log.info("cost-model profile reused from %s", path)
            return [common_pb2.ProfileSample(prompt_len=p, cached_len=c, seconds=s) for p, c, s in cached]
        samples = await self.profile(points, repeats=3)
        profiling.store_profile(path, [(s.prompt_len, s.cached_len, s.seconds) for s in samples])
        return samples

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
        kv = dict(KV_COUNTERS)
        pending = held = 0
        for side in (self.prefill_side, self.send_back_side, self.decode_side, self.peer_push):
            if side is not None:
                for k, v in (side.receiver if side is self.decode_side else side).counters.items():
                    kv[k] = kv.get(k, 0) + v
        if self.decode_side is not None:
            pending, held = await self.decode_side.stats()
        pool = self.engine.pool
        return instance_pb2.InstanceStats(
            kv_pending=pending, kv_held_pages=held, **kv,
            instance_id=self.instance_id, role=self.role, load=self.load(), num_requests=c["num_requests"],
            prompt_tokens=c["prompt_tokens"], cached_tokens=c["cached_tokens"],
            generated_tokens=c["generated_tokens"], cached_pages=self.loop_thread.load.get("cached_pages", 0),
            draining=self.draining, kv_cache_dtype=pool.kv_cache_dtype, kv_page_bytes=pool.page_bytes,
            kv_num_pages=pool.num_pages, kv_num_host_pages=pool.num_host_pages)

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
