"""The scheduler's fleet: instances register (and are calibrated), report index events and load, and are
probed for health; a failed or departed instance is taken out of routing and the requests it was serving are
told to move. Owns the router (prompt trees + policy) and the scheduler's own health status."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from jaxserve.config import KV_CACHE_DTYPES
from jaxserve.proto.v1 import instance_pb2, instance_pb2_grpc, scheduler_pb2
from jaxserve.scheduler.config import GlobalSchedulerConfig
from jaxserve.scheduler.cost_model import CostModel, profile_points
from jaxserve.scheduler.policies import LoadGuard
from jaxserve.scheduler.router import (COLOCATED, DRAINING, HEALTHY, PREFILL, ROLE_NAMES, ROLES, SUSPECT,
                                      InstanceRecord, Router)
from jaxserve.scheduler.tokenizer import ModelInfo, identity_mismatch
from jaxserve.security import LinkSecurity

log = logging.getLogger("jaxserve.scheduler")

SERVICE_NAME = "jaxserve.v1.Scheduler"
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


class RegistrationRefused(Exception):
    """A well-formed registration that does not fit this deployment (other model, other page size)."""


def cancelled_from_outside() -> bool:
    """In an `except CancelledError`: was the running task itself cancelled (not just a call it awaited)?"""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class InstanceRegistry:
    """The registered instances and their health. All state lives on the server's event loop."""

    def __init__(self, config: GlobalSchedulerConfig, model: ModelInfo, link: LinkSecurity = LinkSecurity()):
        """link: how to reach the instances (the cluster secret on every call; mTLS with a CA)."""
        self.config = config
        self.model = model
        self.link = link
        guard = LoadGuard(config.load_guard_factor, config.load_guard_slack)
        self.router = Router(config.policy, guard, config.mode)
        self.links = None
        if config.peer_fetch:
            from jaxserve.scheduler.kv_pool import KVPool, MeasuredLinks, TransferModel
            transfer = TransferModel(kv_bytes_per_token=config.kv_bytes_per_token,
                                     link_bytes_s=config.peer_link_bytes_s, link_latency_s=config.peer_link_latency_s)
            self.links = MeasuredLinks(transfer)
            # The instances that compute prompts pull: colocated ones, and prefill ones when disaggregated.
            self._kv_pools = [KVPool(guard, transfer=transfer, peer_fetch=True) for _ in (COLOCATED, PREFILL)]
            for role, policy in zip((COLOCATED, PREFILL), self._kv_pools):
                self.router.set_policy(role, policy)
        self.health = health_aio.HealthServicer()
        self._tasks: set[asyncio.Task] = set()
        self._changed = asyncio.Event()
        self._ids = itertools.count()
        self._stopping = False

    # ------------------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        await self.set_health()
        self.spawn(self._health_loop())

    async def shut_down(self) -> None:
        """Stop the background tasks and say NOT_SERVING (before the server stops)."""
        self._stopping = True
        await self.health.enter_graceful_shutdown()
        for task in list(self._tasks):
            task.cancel()

    async def close(self) -> None:
        """Forget every instance and close the channels (after the server stopped)."""
        for record in list(self.router.instances.values()):
            self.router.remove(record.instance_id)
            if record.channel is not None:
                await record.channel.close()

    def spawn(self, coro) -> asyncio.Task | None:
        if self._stopping:
            coro.close()
            return None
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---------------------------------------------------------------------------------------- changes
    def notify_changed(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        self.spawn(self.set_health())

    async def wait_changed(self, timeout: float) -> None:
        """Until the set of routable instances may have changed, or timeout seconds."""
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    async def set_health(self) -> None:
        serving = self.router.effective_mode() is not None
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)

    def max_model_len(self) -> int:
        return self.router.max_model_len(self.model.max_model_len)

    # ----------------------------------------------------------------------------------- registration
    def register(self, request: scheduler_pb2.RegisterRequest) -> InstanceRecord:
        """Raises ValueError for a malformed registration, RegistrationRefused for one that does not fit."""
        if request.role not in ROLES:
            raise ValueError(f"role must be colocated, prefill or decode, got {request.role}")
        if not request.address:
            raise ValueError("address (host:port of the Instance service) is required")
        if request.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {request.page_size}")
        if (request.kv_cache_dtype or "auto") not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {request.kv_cache_dtype!r}")
        mismatch = identity_mismatch(self.model, request.model, request.architecture, request.vocab_size,
                                     request.tokenizer_fingerprint)
        if mismatch:
            raise RegistrationRefused(mismatch)
        instance_id = request.instance_id or f"{ROLE_NAMES[request.role]}-{next(self._ids)}"
        record = InstanceRecord(instance_id=instance_id, address=request.address, role=request.role,
                                page_size=request.page_size, max_model_len=request.max_model_len,
                                vocab_size=request.vocab_size, num_pages=request.num_pages, model=request.model,
                                kv_cache_dtype=request.kv_cache_dtype or "auto", kv_page_bytes=request.kv_page_bytes,
                                generate_many=request.generate_many)
        try:
            old = self.router.add(record)
        except ValueError as e:
            raise RegistrationRefused(str(e)) from None
        # Its own subchannels: a channel to the same address left by an earlier registration (an instance
        # restarted there) may sit in reconnect back-off, and a shared subchannel would make this one wait too.
        record.channel = self.link.channel(request.address,
                                           options=CHANNEL_OPTIONS + [("grpc.use_local_subchannel_pool", 1)])
        record.stub = instance_pb2_grpc.InstanceStub(record.channel)
        record.health_stub = health_pb2_grpc.HealthStub(record.channel)
        if old is not None:
            self.retire(old, "it registered again", lost=True)
        if request.profile:
            record.cost_model = CostModel.fit((s.prompt_len, s.cached_len, s.seconds) for s in request.profile)
            record.calibrated = True
        elif self.config.profile_instances:
            self.spawn(self._calibrate(record))
        log.info("instance %s registered: %s at %s, page_size %d", instance_id, ROLE_NAMES[request.role],
                 request.address, request.page_size)
        self.notify_changed()
        return record

    async def _calibrate(self, record: InstanceRecord) -> None:
        points = profile_points(self.max_model_len())
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

    def report(self, record: InstanceRecord, report: scheduler_pb2.InstanceReport) -> None:
        """Apply one ReportEvents message (raises ValueError for an event that does not fit the tree)."""
        for event in report.events:
            self.router.apply_event(record, event)
        if report.HasField("load"):
            record.load = report.load
        record.last_report = time.monotonic()

    # -------------------------------------------------------------------------------------- retirement
    def retire(self, record: InstanceRecord, reason: str, lost: bool) -> None:
        """Take an instance out (it failed, left or was replaced). lost: its running requests are gone with
        it and must move; otherwise they finish where they are."""
        if self.router.instances.get(record.instance_id) is record:
            self.router.remove(record.instance_id)
        record.removed = True
        # A departure the instance announced (deregistered, drained) is routine; a lost one is not.
        log.log(logging.WARNING if lost else logging.INFO, "instance %s out of routing: %s (%d requests %s)",
                record.instance_id, reason, len(record.attempts), "to move" if lost else "finishing there")
        if lost:
            for attempt in list(record.attempts):
                attempt.mark_lost(f"instance {record.instance_id} {reason}")
        self._maybe_close_channel(record)
        self.notify_changed()

    def _maybe_close_channel(self, record: InstanceRecord) -> None:
        if record.removed and not record.attempts and not record.pins and record.channel is not None:
            channel, record.channel = record.channel, None
            self.spawn(channel.close())

    def on_attempt_closed(self, record: InstanceRecord) -> None:
        if record.removed:
            self._maybe_close_channel(record)

    async def drain(self, record: InstanceRecord, timeout_s: float) -> int | grpc.aio.AioRpcError:
        """Ask the instance to drain (Instance.Drain): it refuses new requests, lets its running ones finish (up
        to timeout_s, 0: no limit) and deregisters. Returns how many it left running, or the call's error. The
        channel stays open meanwhile: the instance deregisters before it answers, and closing the channel
        then would cancel this call and leave it without an answer."""
        record.pins += 1
        try:
            resp = await record.stub.Drain(instance_pb2.DrainRequest(timeout_s=timeout_s),
                                           timeout=timeout_s + 30.0 if timeout_s else None)
            return resp.num_unfinished
        except grpc.aio.AioRpcError as e:
            log.warning("instance %s: Drain failed (%s: %s)", record.instance_id, e.code().name, e.details())
            return e
        finally:
            record.pins -= 1
            self._maybe_close_channel(record)

    def observe_pull(self, tokens: int, nbytes: int, seconds: float) -> None:
        """A timed, successful peer fetch: the kv_pool policies route with the link model refitted to it."""
        if self.links is not None:
            model = self.links.observe(tokens, nbytes, seconds)
            for policy in self._kv_pools:
                policy.transfer = model

    async def push_kv(self, record: InstanceRecord, request: instance_pb2.PushKvRequest,
                      timeout_s: float) -> instance_pb2.PushKvResponse | grpc.aio.AioRpcError:
        """Peer fetch: the holder `record` pushes a prefix to another instance. Its channel stays open meanwhile
        (as for Drain): an instance leaving mid-push must answer with an error, not leave the call hanging.
        A successful push is timed into the link model (`observe_pull`)."""
        record.pins += 1
        try:
            t0 = time.monotonic()
            resp = await record.stub.PushKv(request, timeout=timeout_s)
            self.observe_pull(resp.sent_tokens, resp.sent_bytes, time.monotonic() - t0)
            return resp
        except grpc.aio.AioRpcError as e:
            return e
        finally:
            record.pins -= 1
            self._maybe_close_channel(record)

    # ------------------------------------------------------------------------------------------ health
    def suspect(self, record: InstanceRecord) -> None:
        """Something suggests the instance is gone: stop routing to it and probe it now."""
        if record.removed:
            return
        if record.state == HEALTHY:
            record.state = SUSPECT
            self.notify_changed()
        self.spawn(self._probe(record))

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
                if cancelled_from_outside():
                    raise
                return  # its channel was closed under it: the instance is gone already
            if record.removed:
                return
            if status is None:
                record.probe_failures += 1
                if record.state == HEALTHY:
                    record.state = SUSPECT
                    self.notify_changed()
                if record.probe_failures >= self.config.unhealthy_after:
                    self.retire(record, f"stopped answering health checks ({error})", lost=True)
                return
            record.probe_failures = 0
            if record.state == DRAINING:
                return
            new_state = HEALTHY if status == health_pb2.HealthCheckResponse.SERVING else SUSPECT
            if new_state != record.state:
                record.state = new_state
                self.notify_changed()
        finally:
            record.probing = False

    # ------------------------------------------------------------------------------------------- views
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
                cost_model_calibrated=r.calibrated, last_report_age_s=now - r.last_report,
                kv_cache_dtype=r.kv_cache_dtype, kv_page_bytes=r.kv_page_bytes))
        return infos
