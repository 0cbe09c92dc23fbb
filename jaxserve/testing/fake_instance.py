"""A fake instance server for tests and benchmarks: the real Instance gRPC service (any role) and the
registration protocol, without an engine. Tokens are a deterministic function of their position, so a
request moved to another instance continues with exactly the tokens it would have had; the real prompt
index and eviction without KV data (`PrefixCache`, a MemPool's PageBook) stand in for the MemPool and report
its inserts and evictions to the scheduler.

Failure injection: `kill()` (the server goes away, like a crash), `freeze()` (it stops answering, health
checks included), `set_serving(False)` (health NOT_SERVING)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jaxserve.cache_salt import salt_tokens
from jaxserve.mempool.prefix_cache import PrefixCache
from jaxserve.proto.messages import decode_request
from jaxserve.proto.v1 import common_pb2, instance_pb2, instance_pb2_grpc, scheduler_pb2
from jaxserve.scheduler.cost_model import CostModel
from jaxserve.scheduler.reporter import InstanceReporter
from jaxserve.security import AuthInterceptor, LinkSecurity, serve_port

EOS = 257  # the byte tokenizer's


def fake_token(position: int, seed: int = 0) -> int:
    """The token a fake instance emits at sequence position `position`: a lowercase ASCII letter."""
    return 97 + (position * 7 + seed * 13) % 26


def expected_tokens(context_len: int, n: int, seed: int = 0) -> list[int]:
    """What a fake instance generates after a context of context_len tokens."""
    return [fake_token(context_len + i, seed) for i in range(n)]


class _Health(health_pb2_grpc.HealthServicer):
    def __init__(self, fake: "FakeInstance"):
        self.fake = fake

    async def Check(self, request, context):
        if not self.fake._health_ignores_freeze:
            await self.fake._unfrozen.wait()
        status = (health_pb2.HealthCheckResponse.SERVING if self.fake.serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        return health_pb2.HealthCheckResponse(status=status)


class FakeInstance(instance_pb2_grpc.InstanceServicer):
    def __init__(self, role: int = common_pb2.ROLE_COLOCATED, *, scheduler_address: str | None = None,
                 instance_id: str = "", page_size: int = 16, cache_pages: int = 4096, max_model_len: int = 0,
                 vocab_size: int = 258, token_delay_s: float = 0.0, tokens_per_message: int = 1,
                 eos_after: int | None = None, cost_model: CostModel = CostModel(),
                 simulate_prefill: bool = False, report_profile: bool = False,
                 scheduler_credentials: grpc.ChannelCredentials | None = None, link: LinkSecurity = LinkSecurity()):
        """link: the cluster secret (checked on every call, sent on every call) and TLS files (with a CA:
        mTLS on its server, its reporter and its peer channels), as a real instance uses them."""
        self.role = role
        self.link = link
        self.scheduler_address = scheduler_address
        self.instance_id = instance_id
        self.page_size = page_size
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.token_delay_s = token_delay_s
        self.tokens_per_message = tokens_per_message
        self.eos_after = eos_after            # emit EOS as the n-th output token
        self.cost_model = cost_model          # what Profile reports (and prefill sleeps, if simulated)
        self.simulate_prefill = simulate_prefill
        self.report_profile = report_profile  # send the profile with Register instead of answering Profile
        self.scheduler_credentials = scheduler_credentials
        self.cache = PrefixCache(page_size, cache_pages, self._on_cache_event)
        self.reporter: InstanceReporter | None = None
        self.serving = True
        self.draining = False
        self._unfrozen = asyncio.Event()
        self._unfrozen.set()
        self._prefill_lock = asyncio.Lock()
        self._health_ignores_freeze = False
        self._server: grpc.aio.Server | None = None
        self._peers: dict[str, grpc.aio.Channel] = {}
        self._pending_kv: dict[str, tuple] = {}
        self.port: int | None = None
        # What happened, for tests.
        self.requests: list = []              # every Generate / Prefill / Decode request
        self.cancelled: set[str] = set()      # request ids whose call was cancelled (client, deadline)
        self.finished: set[str] = set()
        self.running = 0
        self.profiled = 0
        self.num_prompt_tokens = 0
        self.num_cached_tokens = 0
        self.num_generated = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> "FakeInstance":
        self._server = grpc.aio.server(interceptors=[AuthInterceptor(self.link.secrets, "fake instance")])
        instance_pb2_grpc.add_InstanceServicer_to_server(self, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(_Health(self), self._server)
        self.port = serve_port(self._server, "127.0.0.1:0", self.link.tls if self.link.mtls else None,
                               require_client_cert=True)
        await self._server.start()
        if self.scheduler_address:
            registration = scheduler_pb2.RegisterRequest(
                instance_id=self.instance_id, address=self.address, role=self.role, model="fake",
                page_size=self.page_size, max_model_len=self.max_model_len, vocab_size=self.vocab_size,
                num_pages=self.cache.capacity)
            if self.report_profile:
                registration.profile.extend(self._profile([(n, c) for n in (64, 256, 1024) for c in (0, n // 2)]))
            self.reporter = InstanceReporter(self.scheduler_address, registration, snapshot=self.cache.snapshot,
                                             load=self.load, credentials=self.scheduler_credentials or (
                                                 self.link.tls.channel_credentials() if self.link.mtls else None),
                                             retry_interval_s=0.1, max_retry_interval_s=0.5,
                                             secret=self.link.secrets.cluster_secret)
            await self.reporter.start()
            self.instance_id = self.reporter.instance_id
        return self

    async def stop(self) -> None:
        """A clean exit: deregister, then stop serving."""
        if self.reporter is not None:
            await self.reporter.stop(deregister=True)
        await self._shutdown()

    async def kill(self) -> None:
        """A crash: the server and the report stream vanish without a word."""
        if self.reporter is not None:
            await self.reporter.stop(deregister=False)
        await self._shutdown()

    async def _shutdown(self) -> None:
        self._unfrozen.set()  # let blocked handlers run into the server's cancellation
        if self._server is not None:
            await self._server.stop(0)
        for channel in self._peers.values():
            await channel.close()

    def freeze(self, streams_only: bool = False) -> None:
        """Stop answering anything (a hung process whose connections stay open); streams_only: health
        checks still say SERVING (a hung engine behind a live server)."""
        self._health_ignores_freeze = streams_only
        self._unfrozen.clear()
        if self.reporter is not None and not streams_only:
            self.reporter.pause()

    def unfreeze(self) -> None:
        self._health_ignores_freeze = False
        self._unfrozen.set()
        if self.reporter is not None:
            self.reporter.resume()

    def set_serving(self, serving: bool) -> None:
        self.serving = serving

    def load(self) -> common_pb2.Load:
        return common_pb2.Load(num_running_requests=self.running, num_free_pages=self.cache.capacity - len(self.cache),
                               num_total_pages=self.cache.capacity)

    def _on_cache_event(self, kind: str, tokens: Sequence[int]) -> None:
        if self.reporter is not None:
            self.reporter.event(kind, tokens)

    def _match(self, tokens: Sequence[int]) -> int:
        """Cached prefix length; at least one token is left to compute (its logits are needed)."""
        usable = (len(tokens) - 1) // self.page_size * self.page_size
        return min(self.cache.match(tokens), max(usable, 0))

    def _profile(self, points) -> list[common_pb2.ProfileSample]:
        return [common_pb2.ProfileSample(prompt_len=p, cached_len=c, seconds=self.cost_model.exec(p, c))
                for p, c in points]

    # ------------------------------------------------------------------------------------ generation
    async def _prefill(self, context_ids: Sequence[int]) -> tuple[int, float]:
        """(cached tokens, seconds queued). Simulated prefills run one at a time, as an engine's would, so
        work routed to a busy instance waits."""
        await self._unfrozen.wait()
        t0 = time.monotonic()
        async with self._prefill_lock if self.simulate_prefill else contextlib.nullcontext():
            queued = time.monotonic() - t0
            cached = self._match(context_ids)
            self.num_prompt_tokens += len(context_ids)
            self.num_cached_tokens += cached
            if self.simulate_prefill:
                await asyncio.sleep(self.cost_model.exec(len(context_ids), cached))
        return cached, queued

    async def _decode(self, request, context_ids: list[int], first_index: int, cached: int, t0: float,
                      queued: float = 0.0):
        """Stream tokens (as InstanceGenerateResponse) after context_ids; output index starts at first_index."""
        seed = request.sampling.seed if request.sampling.HasField("seed") else 0
        out: list[int] = []
        batch: list[int] = []
        finish = common_pb2.FINISH_REASON_UNSPECIFIED
        ttft = None
        for i in range(request.max_tokens):
            await self._unfrozen.wait()
            if self.token_delay_s:
                await asyncio.sleep(self.token_delay_s)
            if self.eos_after is not None and first_index + i + 1 >= self.eos_after and not request.sampling.ignore_eos:
                token = EOS
                finish = common_pb2.FINISH_REASON_STOP
            else:
                token = fake_token(len(context_ids) + i, seed)
            ttft = ttft if ttft is not None else time.monotonic() - t0
            out.append(token)
            batch.append(token)
            if finish:
                break
            if len(batch) >= self.tokens_per_message and i + 1 < request.max_tokens:
                yield instance_pb2.InstanceGenerateResponse(token_ids=batch)
                batch = []
        self.num_generated += len(out)
        self.cache.insert([*context_ids, *out])
        self.finished.add(request.request_id)
        yield instance_pb2.InstanceGenerateResponse(
            token_ids=batch, finish_reason=finish or common_pb2.FINISH_REASON_LENGTH,
            usage=common_pb2.InstanceUsage(prompt_tokens=len(context_ids), cached_tokens=cached,
                                           completion_tokens=len(out), ttft_s=ttft or 0.0, queue_time_s=queued))

    async def _serve_stream(self, request, context, role: int, first_index: int):
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "instance is draining")
        if self.role != role:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"this instance's role is {self.role}")
        self.requests.append(request)
        t0 = time.monotonic()
        with self._running(request.request_id):
            # Keyed as a real instance keys them (salted by cache_salt); only their number feeds the fake tokens.
            context_ids = salt_tokens([*request.prompt_token_ids, *request.generated_token_ids], request.cache_salt)
            if role == common_pb2.ROLE_COLOCATED:
                cached, queued = await self._prefill(context_ids)
            else:
                cached, queued = self._match(context_ids), 0.0
            async for response in self._decode(request, context_ids, first_index, cached, t0, queued):
                yield response

    @contextlib.contextmanager
    def _running(self, request_id: str):
        """Counts a request as running while it is served; a cancelled one is recorded in `cancelled`: cancelled
        while it awaits (CancelledError) or closed while its stream waits at a `yield` (GeneratorExit: the call
        ended between two responses, as a deadline on a loaded box can)."""
        self.running += 1
        try:
            yield
        except asyncio.CancelledError:
            self.cancelled.add(request_id)
            raise
        except GeneratorExit:
            if request_id not in self.finished:  # not the close after its last response
                self.cancelled.add(request_id)
            raise
        finally:
            self.running -= 1

    async def Generate(self, request, context):
        async for response in self._serve_stream(request, context, common_pb2.ROLE_COLOCATED,
                                                 len(request.generated_token_ids)):
            yield response

    async def Decode(self, request, context):
        inner = request.request
        async for response in self._serve_stream(inner, context, common_pb2.ROLE_DECODE,
                                                 len(inner.generated_token_ids)):
            yield response

    async def Prefill(self, request, context):
        inner = request.request
        if self.role != common_pb2.ROLE_PREFILL:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"this instance's role is {self.role}")
        self.requests.append(request)
        t0 = time.monotonic()
        with self._running(inner.request_id):
            context_ids = salt_tokens([*inner.prompt_token_ids, *inner.generated_token_ids], inner.cache_salt)
            cached, queued = await self._prefill(context_ids)
            seed = inner.sampling.seed if inner.sampling.HasField("seed") else 0
            first = fake_token(len(context_ids), seed)
            self.cache.insert(context_ids)  # PD-Caching: the prefill side keeps its prompt KV
            finish = common_pb2.FINISH_REASON_LENGTH if inner.max_tokens <= 1 else 0
            transferred, handle = 0, ""
            if not finish:
                target = request.decode_target.address
                if target not in self._peers:
                    self._peers[target] = self.link.channel(target)
                peer = instance_pb2_grpc.InstanceStub(self._peers[target])
                prep = await peer.PrepareKvTransfer(instance_pb2.PrepareKvTransferRequest(
                    request_id=inner.request_id, token_ids=context_ids, page_size=self.page_size),
                    timeout=context.time_remaining())
                transferred = len(context_ids) - prep.cached_tokens
                await peer.CommitKvTransfer(instance_pb2.CommitKvTransferRequest(  # as the real prefill side does
                    transfer_id=prep.transfer_id, request_id=inner.request_id, start_token=prep.cached_tokens,
                    num_tokens=transferred, insert=True, request=decode_request(inner, first)),
                    timeout=context.time_remaining())
                handle = prep.transfer_id
            self.num_generated += 1
            return instance_pb2.PrefillResponse(
                first_token_id=first, finish_reason=finish, transferred_tokens=transferred, kv_handle=handle,
                usage=common_pb2.InstanceUsage(prompt_tokens=len(context_ids), cached_tokens=cached,
                                               completion_tokens=1, ttft_s=time.monotonic() - t0,
                                               queue_time_s=queued))

    # ------------------------------------------------------------------------------- KV transfer control
    async def PrepareKvTransfer(self, request, context):
        transfer_id = uuid.uuid4().hex
        self._pending_kv[transfer_id] = tuple(request.token_ids)
        cached = self._match(request.token_ids)
        return instance_pb2.PrepareKvTransferResponse(transfer_id=transfer_id, cached_tokens=cached)

    async def CommitKvTransfer(self, request, context):
        tokens = self._pending_kv.pop(request.transfer_id, None)
        if tokens is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no transfer {request.transfer_id}")
        if not request.cache_only and not request.HasField("request"):  # as the real decode side answers
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"transfer {request.transfer_id}: a transfer "
                                "to a decode instance carries its request (or is cache_only)")
        if request.insert:
            self.cache.insert(tokens)
        return instance_pb2.CommitKvTransferResponse(received_tokens=request.num_tokens,
                                                     inserted_tokens=len(tokens) if request.insert else 0)

    # ------------------------------------------------------------------------------------ operations
    async def Abort(self, request, context):
        return instance_pb2.AbortResponse(found=False)

    async def Profile(self, request, context):
        self.profiled += 1
        return instance_pb2.ProfileResponse(samples=self._profile((p.prompt_len, p.cached_len) for p in request.points))

    async def GetStats(self, request, context):
        return instance_pb2.InstanceStats(
            instance_id=self.instance_id, role=self.role, load=self.load(), num_requests=len(self.requests),
            prompt_tokens=self.num_prompt_tokens, cached_tokens=self.num_cached_tokens,
            generated_tokens=self.num_generated, cached_pages=len(self.cache), draining=self.draining)

    async def Drain(self, request, context):
        self.draining = True
        self.serving = False
        deadline = time.monotonic() + (request.timeout_s or float("inf"))
        while self.running and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self.reporter is not None:  # as the real instance does: deregister once drained
            await self.reporter.stop(deregister=True)
            self.reporter = None
        return instance_pb2.DrainResponse(num_unfinished=self.running)
