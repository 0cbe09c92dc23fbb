"""The global scheduler process's gRPC server (grpc.aio): `Scheduler` ties the fleet (`instances`) and the
request core (`core`) to one server, and `_Servicer` is the thin adapter of the Scheduler service: it calls
the core and maps its errors (`jaxserve.scheduler.errors`) to gRPC status codes.

    scheduler = Scheduler(GlobalSchedulerConfig(port=0), load_model_info("demo"))
    port = await scheduler.start()
    ...
    await scheduler.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc
from grpc_health.v1 import health_pb2_grpc

from jaxserve.proto.v1 import scheduler_pb2, scheduler_pb2_grpc
from jaxserve.scheduler.config import GlobalSchedulerConfig
from jaxserve.scheduler.core import SchedulerCore
from jaxserve.scheduler.errors import SchedulerError
from jaxserve.scheduler.instances import CHANNEL_OPTIONS, InstanceRegistry, RegistrationRefused
from jaxserve.scheduler.router import DRAINING
from jaxserve.scheduler.tokenizer import ModelInfo
from jaxserve.scheduler.validation import tenant_cache_salt
from jaxserve.security import AuthInterceptor, LinkSecurity, Secrets, check_bind, serve_port

log = logging.getLogger("jaxserve.scheduler")


class Scheduler:
    """The scheduler process's state and gRPC server. All state lives on the server's event loop.

    `instances` (InstanceRegistry): registration, health, the router; `core` (SchedulerCore): the request
    path, also called by the HTTP front (`jaxserve.scheduler.http_front`)."""

    def __init__(self, config: GlobalSchedulerConfig, model: ModelInfo, observer=None, *,
                 secrets: Secrets = Secrets()):
        """secrets: the client API key and the cluster secret (`jaxserve.security`; default: none, so the
        gRPC API is open and the scheduler binds loopback only unless config.insecure)."""
        self.config = config
        self.model = model
        self.secrets = secrets
        self.link = LinkSecurity(secrets, config.tls, config.insecure)
        self.instances = InstanceRegistry(config, model, self.link)
        self.core = SchedulerCore(config, model, self.instances, observer)
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None

    # The parts other modules read (metrics, launchers, tests).
    @property
    def router(self):
        return self.instances.router

    @property
    def admission(self):
        return self.core.admission

    @property
    def observer(self):
        """Metrics hooks (`jaxserve.scheduler.metrics.SchedulerMetrics` or None), see `SchedulerCore`."""
        return self.core.observer

    @observer.setter
    def observer(self, value) -> None:
        self.core.observer = value

    def max_model_len(self) -> int:
        return self.instances.max_model_len()

    # ------------------------------------------------------------------------------------- lifecycle
    async def start(self) -> int:
        """Bind and start serving; returns the port."""
        check_bind(self.config.host, self.secrets.api_key or self.secrets.cluster_secret, self.config.insecure,
                   "scheduler")
        server = grpc.aio.server(options=CHANNEL_OPTIONS, interceptors=[AuthInterceptor(self.secrets, "scheduler")])
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(_Servicer(self), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.instances.health, server)
        # Clients of the scheduler are users: TLS without client certificates; the cluster secret is what
        # tells an instance from a user.
        self.port = serve_port(server, self.config.address, self.config.tls, require_client_cert=False)
        if self.port == 0:
            raise RuntimeError(f"could not bind {self.config.address}")
        await self.instances.start()
        await server.start()
        self._server = server
        log.info("scheduler serving on %s:%d (policy %s, model %s, max_model_len %d)", self.config.host, self.port,
                 self.config.policy, self.model.name, self.model.max_model_len)
        return self.port

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def stop(self, grace: float | None = None) -> None:
        await self.instances.shut_down()
        if self._server is not None:
            await self._server.stop(self.config.shutdown_grace_s if grace is None else grace)
        await self.instances.close()

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


def _salted_by_key(request, context):
    """`request` with its cache_salt bound to the bearer token of its `authorization` metadata."""
    token = ""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            scheme, _, token = str(value).partition(" ")
            token = token.strip() if scheme.lower() == "bearer" else ""
    salted = scheduler_pb2.GenerateRequest()
    salted.CopyFrom(request)
    salted.cache_salt = tenant_cache_salt(token, request.cache_salt)
    return salted


async def _abort(context, error: SchedulerError):
    await context.abort(grpc.StatusCode[error.status], str(error))


class _Servicer(scheduler_pb2_grpc.SchedulerServicer):
    """The Scheduler service: each handler calls the core or the registry and maps errors to status codes."""

    def __init__(self, scheduler: Scheduler):
        self.s = scheduler
        self.core = scheduler.core
        self.instances = scheduler.instances

    async def Generate(self, request, context):
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        try:
            if self.s.config.salt_cache_by_api_key:
                request = _salted_by_key(request, context)
            valid = self.core.validate(request)
            async with contextlib.aclosing(self.core.generate(valid, deadline)) as responses:
                async for response in responses:
                    yield response
        except SchedulerError as e:
            await _abort(context, e)

    async def Tokenize(self, request, context):
        tokenizer = self.s.model.tokenizer
        if tokenizer is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"This scheduler has no tokenizer for model {self.s.model.name!r}.")
        return scheduler_pb2.TokenizeResponse(token_ids=tokenizer.encode(request.text),
                                              max_model_len=self.s.max_model_len())

    async def ListInstances(self, request, context):
        return scheduler_pb2.ListInstancesResponse(instances=self.instances.instance_infos())

    async def GetStats(self, request, context):
        return self.core.scheduler_stats()

    async def DrainInstance(self, request, context):
        """Out of routing now; the instance drains in the background (Instance.Drain). Without `wait`, returns
        at once; with it, once the instance finished its requests, or just before the call's deadline."""
        record = self.instances.router.instances.get(request.instance_id)
        if record is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no instance {request.instance_id!r}")
        record.state = DRAINING
        self.instances.notify_changed()
        task = self.instances.spawn(self.instances.drain(record, request.timeout_s))
        if not request.wait or task is None:
            return scheduler_pb2.DrainInstanceResponse(num_unfinished=len(record.attempts))
        remaining = context.time_remaining()
        budget = None if remaining is None else max(0.0, remaining - min(0.5, 0.1 * remaining))
        done, _ = await asyncio.wait({task}, timeout=budget)  # on timeout the drain goes on regardless
        if not done:
            return scheduler_pb2.DrainInstanceResponse(num_unfinished=len(record.attempts))
        result = task.result()
        if isinstance(result, grpc.aio.AioRpcError):
            await context.abort(result.code(), f"instance {request.instance_id}: {result.details()}")
        return scheduler_pb2.DrainInstanceResponse(num_unfinished=result)

    async def Register(self, request, context):
        try:
            record = self.instances.register(request)
        except RegistrationRefused as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return scheduler_pb2.RegisterResponse(instance_id=record.instance_id,
                                              report_interval_s=self.s.config.report_interval_s)

    async def ReportEvents(self, request_iterator, context):
        instances = self.instances
        record = None
        try:
            async for report in request_iterator:
                if record is None:
                    record = instances.router.instances.get(report.instance_id)
                    if record is None:
                        await context.abort(grpc.StatusCode.NOT_FOUND,
                                            f"unknown instance {report.instance_id!r}: register first")
                if instances.router.instances.get(record.instance_id) is not record:
                    await context.abort(grpc.StatusCode.NOT_FOUND,
                                        f"instance {record.instance_id} was taken out of routing: register again")
                try:
                    instances.report(record, report)
                except ValueError as e:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"instance {record.instance_id}: {e}")
        finally:
            if record is not None and not record.removed:
                # The stream broke or ended without Deregister: is the instance still there?
                instances.suspect(record)
        return scheduler_pb2.ReportEventsResponse()

    async def Deregister(self, request, context):
        record = self.instances.router.instances.get(request.instance_id)
        if record is not None:
            self.instances.retire(record, "deregistered", lost=False)
        return scheduler_pb2.DeregisterResponse()
