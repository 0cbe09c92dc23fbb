"""The instance side of the scheduler's registration protocol, for instance servers: Register, then a
ReportEvents stream of index events and load, reconnecting (and re-registering when the scheduler has
forgotten the instance) until stopped; Deregister on a clean stop. jax-free, so any instance server (the
engine's, or a fake) can use it.

Every (re)connected stream starts with CLEAR and then an INSERT for each sequence of `snapshot()` (and, with
`snapshot_tiers`, an OFFLOAD where each host-tier part begins), so the scheduler's prompt tree is rebuilt from
what the instance really holds, and where, after any gap. `insert`, `evict`, `offload` and `clear` may be
called from any thread."""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Iterable, Sequence

import grpc

from jaxserve.proto.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from jaxserve.security import aio_channel

log = logging.getLogger("jaxserve.scheduler.reporter")

_MAX_EVENTS_PER_REPORT = 256


class InstanceReporter:
    def __init__(self, scheduler_address: str, registration: scheduler_pb2.RegisterRequest, *,
                 snapshot: Callable[[], Iterable[Sequence[int]]] | None = None,
                 snapshot_tiers: Callable[[], tuple[Iterable[Sequence[int]], Iterable[Sequence[int]]]] | None = None,
                 load: Callable[[], common_pb2.Load] | None = None,
                 credentials: grpc.ChannelCredentials | None = None, retry_interval_s: float = 0.5,
                 max_retry_interval_s: float = 5.0, secret: str | None = None):
        """secret: the cluster secret, sent on every call (the scheduler refuses Register without it)."""
        self._address = scheduler_address
        self._registration = scheduler_pb2.RegisterRequest()
        self._registration.CopyFrom(registration)
        # snapshot_tiers (IndexMirror.snapshot_tiers): (sequences held, prefixes where a host-tier part begins)
        self._snapshot_tiers = snapshot_tiers or (lambda: ((snapshot or (lambda: ()))(), ()))
        self._load = load
        self._credentials = credentials
        self._secret = secret
        self.refused: grpc.aio.AioRpcError | None = None  # the scheduler turned our credentials down
        self._retry = retry_interval_s
        self._max_retry = max_retry_interval_s
        self.report_interval_s = 0.5
        self._queue: asyncio.Queue | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._channel = None
        self._stub = None
        self._task: asyncio.Task | None = None
        self.registered = asyncio.Event()
        self.connected_streams = 0  # streams opened so far (tests watch reconnects)
        self._stopping = False
        self._unpaused = asyncio.Event()
        self._unpaused.set()

    @property
    def instance_id(self) -> str:
        return self._registration.instance_id

    async def start(self, wait: bool = True, timeout: float | None = 10.0) -> None:
        """Start reporting; with wait, return once registered (TimeoutError past timeout)."""
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self._channel = aio_channel(self._address, secret=self._secret, credentials=self._credentials)
        self._stub = scheduler_pb2_grpc.SchedulerStub(self._channel)
        self._task = self._loop.create_task(self._run())
        if wait:
            registered = self._loop.create_task(self.registered.wait())
            try:
                await asyncio.wait({registered, self._task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                registered.cancel()
            if self.refused is not None:
                raise PermissionError(f"the scheduler at {self._address} refused this instance: "
                                      f"{self.refused.code().name}: {self.refused.details()}")
            if not self.registered.is_set():
                raise asyncio.TimeoutError(f"not registered with the scheduler at {self._address} "
                                           f"after {timeout} s")

    # ------------------------------------------------------------------------- events (any thread)
    def _put(self, event: common_pb2.IndexEvent) -> None:
        if self._loop is None:
            return  # not started: the first stream's snapshot will carry it
        self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    def insert(self, token_ids: Sequence[int]) -> None:
        self._put(common_pb2.IndexEvent(kind=common_pb2.IndexEvent.INSERT, token_ids=token_ids,
                                        page_size=self._registration.page_size))

    def evict(self, token_ids: Sequence[int]) -> None:
        self._put(common_pb2.IndexEvent(kind=common_pb2.IndexEvent.EVICT, token_ids=token_ids,
                                        page_size=self._registration.page_size))

    def offload(self, token_ids: Sequence[int]) -> None:
        self._put(common_pb2.IndexEvent(kind=common_pb2.IndexEvent.OFFLOAD, token_ids=token_ids,
                                        page_size=self._registration.page_size))

    def event(self, kind: str, token_ids: Sequence[int]) -> None:
        """A PageBook listener event ("insert", "evict" or "offload")."""
        {"insert": self.insert, "evict": self.evict, "offload": self.offload}[kind](token_ids)

    def clear(self) -> None:
        self._put(common_pb2.IndexEvent(kind=common_pb2.IndexEvent.CLEAR))

    def pause(self) -> None:
        """Send nothing until resume() (a hung instance, in tests)."""
        self._unpaused.clear()

    def resume(self) -> None:
        self._unpaused.set()

    # ------------------------------------------------------------------------------------- stream
    async def _register(self) -> None:
        resp = await self._stub.Register(self._registration, timeout=30)
        self._registration.instance_id = resp.instance_id
        self.report_interval_s = resp.report_interval_s or self.report_interval_s
        self.registered.set()

    async def _reports(self):
        # Events queued before this stream are covered by the snapshot.
        while not self._queue.empty():
            self._queue.get_nowait()
        events = [common_pb2.IndexEvent(kind=common_pb2.IndexEvent.CLEAR)]
        held, offloaded = self._snapshot_tiers()
        ps = self._registration.page_size
        events += [common_pb2.IndexEvent(kind=common_pb2.IndexEvent.INSERT, token_ids=seq, page_size=ps)
                   for seq in held]
        events += [common_pb2.IndexEvent(kind=common_pb2.IndexEvent.OFFLOAD, token_ids=seq, page_size=ps)
                   for seq in offloaded]
        for i in range(0, len(events), _MAX_EVENTS_PER_REPORT):
            yield self._report(events[i:i + _MAX_EVENTS_PER_REPORT])
        while True:
            events = []
            try:
                events.append(await asyncio.wait_for(self._queue.get(), self.report_interval_s))
                while not self._queue.empty() and len(events) < _MAX_EVENTS_PER_REPORT:
                    events.append(self._queue.get_nowait())
            except asyncio.TimeoutError:
                pass  # nothing happened: a load report alone
            await self._unpaused.wait()
            yield self._report(events)

    def _report(self, events) -> scheduler_pb2.InstanceReport:
        report = scheduler_pb2.InstanceReport(instance_id=self.instance_id, events=events)
        if self._load is not None:
            report.load.CopyFrom(self._load())
        return report

    async def _run(self) -> None:
        delay = self._retry
        need_register = True
        while not self._stopping:
            try:
                await self._unpaused.wait()
                if need_register:
                    await self._register()
                    need_register = False
                self.connected_streams += 1
                await self._stub.ReportEvents(self._reports())
                delay = self._retry  # the scheduler ended the stream cleanly: reconnect at once
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as e:
                if e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    self.refused = e  # retrying with the same credentials cannot help
                    log.error("instance %s: the scheduler refused us: %s", self.instance_id, e.details())
                    return
                if e.code() == grpc.StatusCode.NOT_FOUND:
                    need_register = True  # the scheduler forgot us (restart, or it declared us dead)
                log.info("instance %s: scheduler stream ended (%s: %s); retrying in %.1f s", self.instance_id,
                         e.code().name, e.details(), delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._max_retry)

    async def stop(self, deregister: bool = True) -> None:
        """Stop reporting; deregister=False leaves like a crash would (the scheduler finds out by itself)."""
        self._stopping = True
        # Deregister before the stream closes, so the scheduler does not take the closing for a failure.
        if deregister and self.registered.is_set():
            try:
                await self._stub.Deregister(scheduler_pb2.DeregisterRequest(instance_id=self.instance_id), timeout=5)
            except grpc.aio.AioRpcError as e:
                log.info("instance %s: deregister failed (%s)", self.instance_id, e.code().name)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
