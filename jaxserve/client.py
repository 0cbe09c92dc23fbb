"""Client library for the jaxserve scheduler: `Client` (blocking) and `AsyncClient` (asyncio), over gRPC.

    with Client("127.0.0.1:50050", api_key="sk-...") as client:   # api_key: when the scheduler has one
        print(client.generate("Hello", max_tokens=32).text)
        for delta in client.stream("Hello", max_tokens=32):
            print(delta.text, end="", flush=True)

`generate` returns the whole completion, `stream` yields deltas as they arrive. `timeout_s` is the deadline
of the whole call, retries included; a call that fails with UNAVAILABLE before its first token is retried
with exponential backoff (after the first token it is not: the tokens would repeat). Leaving a stream early
cancels the request, and the instance frees its pages. Imports grpcio and protobuf only, never jax."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from typing import AsyncIterator, Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jaxserve.proto.enums import FINISH_REASON_NAMES
from jaxserve.proto.messages import set_prompt
from jaxserve.proto.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

__all__ = ["AsyncClient", "Client", "ClientError", "Completion", "Delta", "RetryPolicy", "Usage",
           "tls_credentials"]

class ClientError(Exception):
    """A failed call: `code` is the grpc.StatusCode, `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Retries of UNAVAILABLE before the first token: attempts in all, and the backoff between them."""

    max_attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.2  # each backoff is scaled by a random factor in [1 - jitter, 1 + jitter]

    def __post_init__(self):
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not 0 <= self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError(f"need 0 <= initial_backoff_s <= max_backoff_s, got {self.initial_backoff_s}, "
                             f"{self.max_backoff_s}")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")

    def backoff(self, retry: int) -> float:
        base = min(self.initial_backoff_s * self.multiplier ** retry, self.max_backoff_s)
        return base * random.uniform(1 - self.jitter, 1 + self.jitter)


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft_s: float
    queue_time_s: float
    e2e_s: float
    instance_id: str
    prefill_instance_id: str
    num_migrations: int

    @classmethod
    def from_proto(cls, u: scheduler_pb2.Usage) -> "Usage":
        return cls(u.prompt_tokens, u.cached_tokens, u.completion_tokens, u.ttft_s, u.queue_time_s, u.e2e_s,
                   u.instance_id, u.prefill_instance_id, u.num_migrations)


@dataclasses.dataclass(frozen=True)
class Delta:
    """New tokens and text; the last delta of a stream has finish_reason ("stop" | "length" | "abort")
    and usage."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    usage: Usage | None = None
    request_id: str = ""


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    usage: Usage | None
    request_id: str


def tls_credentials(root_certificates: bytes | None = None, private_key: bytes | None = None,
                    certificate_chain: bytes | None = None) -> grpc.ChannelCredentials:
    """TLS channel credentials (system roots when root_certificates is None; the key and chain for mTLS)."""
    return grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)


def build_request(prompt: str | Sequence[int], *, max_tokens: int | None = None, temperature: float = 0.0,
                  top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                  stop: str | Sequence[str] = (), stop_token_ids: Sequence[int] = (), ignore_eos: bool = False,
                  session_id: str = "", request_id: str = "", cache_salt: str = "") -> scheduler_pb2.GenerateRequest:
    """The GenerateRequest for these arguments; the server validates them. cache_salt: requests with
    different salts never share prefix-cache KV (vLLM's name and semantics)."""
    sampling = common_pb2.SamplingParams(temperature=temperature, stop=[stop] if isinstance(stop, str) else stop,
                                         stop_token_ids=stop_token_ids, ignore_eos=ignore_eos)
    if top_p is not None:
        sampling.top_p = top_p
    if top_k is not None:
        sampling.top_k = top_k
    if seed is not None:
        sampling.seed = seed
    return set_prompt(scheduler_pb2.GenerateRequest(sampling=sampling, session_id=session_id,
                                                    request_id=request_id, cache_salt=cache_salt), prompt, max_tokens)


def _delta(resp: scheduler_pb2.GenerateResponse, request_id: str) -> Delta:
    return Delta(text=resp.text, token_ids=tuple(resp.token_ids),
                 finish_reason=FINISH_REASON_NAMES.get(resp.finish_reason),
                 usage=Usage.from_proto(resp.usage) if resp.HasField("usage") else None, request_id=request_id)


def _join(deltas: list[Delta]) -> Completion:
    last = deltas[-1] if deltas else Delta("", ())
    return Completion(text="".join(d.text for d in deltas), token_ids=tuple(t for d in deltas for t in d.token_ids),
                      finish_reason=last.finish_reason, usage=last.usage, request_id=last.request_id)


def _channel_args(options):
    return [("grpc.max_receive_message_length", 64 << 20), *(options or [])]


class _Deadline:
    def __init__(self, timeout_s: float | None):
        self.at = None if timeout_s is None else time.monotonic() + timeout_s

    def remaining(self) -> float | None:
        return None if self.at is None else max(self.at - time.monotonic(), 0.0)

    def allows(self, sleep_s: float) -> bool:
        return self.at is None or time.monotonic() + sleep_s < self.at


class _Connected:
    """What both clients hold: the channel (made by `_channels`, grpc or grpc.aio), the stubs, the defaults."""
    _channels = grpc

    def __init__(self, target: str, *, credentials: grpc.ChannelCredentials | None = None,
                 timeout_s: float | None = None, retry: RetryPolicy = RetryPolicy(), options=None,
                 api_key: str | None = None):
        """api_key: sent as `authorization: Bearer <api_key>` on every call (a scheduler with an API key
        answers UNAUTHENTICATED without it; an operator passes the cluster secret for DrainInstance)."""
        self.timeout_s = timeout_s
        self.retry = retry
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        if credentials is not None:
            self._channel = self._channels.secure_channel(target, credentials, options=_channel_args(options))
        else:
            self._channel = self._channels.insecure_channel(target, options=_channel_args(options))
        self._stub = scheduler_pb2_grpc.SchedulerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _call(self, prompt, timeout_s: float | None, kwargs: dict) -> tuple[scheduler_pb2.GenerateRequest, _Deadline]:
        """A stream's request (build_request's keyword arguments) and its deadline (default: the client's)."""
        return build_request(prompt, **kwargs), _Deadline(timeout_s if timeout_s is not None else self.timeout_s)

    def _backoff(self, error: grpc.RpcError, started: bool, attempt: int, deadline: _Deadline) -> float:
        """How long to wait before attempt `attempt + 1` of a stream that failed with `error`: only a stream
        refused before its first response (UNAVAILABLE) is retried, within the policy and the deadline;
        otherwise raises ClientError."""
        code = error.code()
        backoff = self.retry.backoff(attempt - 1)
        if (code == grpc.StatusCode.UNAVAILABLE and not started and attempt < self.retry.max_attempts
                and deadline.allows(backoff)):
            return backoff
        raise ClientError(code, error.details()) from None


class Client(_Connected):
    """Blocking client. `timeout_s` is the default deadline of each call (None: none)."""

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stream(self, prompt: str | Sequence[int], *, timeout_s: float | None = None, **kwargs) -> Iterator[Delta]:
        """Yield deltas; the keyword arguments are build_request's. Closing the iterator early cancels."""
        request, deadline = self._call(prompt, timeout_s, kwargs)
        attempt = 0
        while True:
            call = self._stub.Generate(request, timeout=deadline.remaining(), metadata=self._metadata)
            started, rid = False, ""
            try:
                for resp in call:
                    started = True
                    rid = rid or resp.request_id  # the server sends it in the first message only
                    yield _delta(resp, rid)
                return
            except grpc.RpcError as e:
                attempt += 1
                time.sleep(self._backoff(e, started, attempt, deadline))
            finally:
                call.cancel()  # no-op when finished; frees the request when the caller stopped early

    def generate(self, prompt: str | Sequence[int], *, timeout_s: float | None = None, **kwargs) -> Completion:
        return _join(list(self.stream(prompt, timeout_s=timeout_s, **kwargs)))

    def _unary(self, method, request, timeout_s):
        try:
            return method(request, timeout=timeout_s if timeout_s is not None else self.timeout_s,
                          metadata=self._metadata)
        except grpc.RpcError as e:
            raise ClientError(e.code(), e.details()) from None

    def tokenize(self, text: str, timeout_s: float | None = None) -> list[int]:
        return list(self._unary(self._stub.Tokenize, scheduler_pb2.TokenizeRequest(text=text), timeout_s).token_ids)

    def list_instances(self, timeout_s: float | None = None) -> list[scheduler_pb2.InstanceInfo]:
        return list(self._unary(self._stub.ListInstances, scheduler_pb2.ListInstancesRequest(), timeout_s).instances)

    def stats(self, timeout_s: float | None = None) -> scheduler_pb2.SchedulerStats:
        return self._unary(self._stub.GetStats, scheduler_pb2.SchedulerStatsRequest(), timeout_s)

    def drain_instance(self, instance_id: str, drain_timeout_s: float = 0.0, timeout_s: float | None = None,
                       wait: bool = False) -> int:
        """Take an instance out of routing and have it drain; returns at once, or with wait=True once its
        running requests finished (or drain_timeout_s / timeout_s passed). Returns the requests still running."""
        request = scheduler_pb2.DrainInstanceRequest(instance_id=instance_id, timeout_s=drain_timeout_s, wait=wait)
        return self._unary(self._stub.DrainInstance, request, timeout_s).num_unfinished

    def health(self, service: str = "", timeout_s: float | None = 5.0) -> str:
        """The server's health status name ("SERVING", "NOT_SERVING", ...)."""
        resp = self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


class AsyncClient(_Connected):
    """asyncio client; the same calls as Client, awaited. Create it inside the event loop that uses it."""
    _channels = grpc.aio

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def stream(self, prompt: str | Sequence[int], *, timeout_s: float | None = None,
                     **kwargs) -> AsyncIterator[Delta]:
        request, deadline = self._call(prompt, timeout_s, kwargs)
        attempt = 0
        while True:
            call = self._stub.Generate(request, timeout=deadline.remaining(), metadata=self._metadata)
            started, rid = False, ""
            try:
                async for resp in call:
                    started = True
                    rid = rid or resp.request_id  # the server sends it in the first message only
                    yield _delta(resp, rid)
                return
            except grpc.aio.AioRpcError as e:
                attempt += 1
                await asyncio.sleep(self._backoff(e, started, attempt, deadline))
            finally:
                call.cancel()

    async def generate(self, prompt: str | Sequence[int], *, timeout_s: float | None = None,
                       **kwargs) -> Completion:
        return _join([d async for d in self.stream(prompt, timeout_s=timeout_s, **kwargs)])

    async def _unary(self, method, request, timeout_s):
        try:
            return await method(request, timeout=timeout_s if timeout_s is not None else self.timeout_s,
                                metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            raise ClientError(e.code(), e.details()) from None

    async def tokenize(self, text: str, timeout_s: float | None = None) -> list[int]:
        resp = await self._unary(self._stub.Tokenize, scheduler_pb2.TokenizeRequest(text=text), timeout_s)
        return list(resp.token_ids)

    async def list_instances(self, timeout_s: float | None = None) -> list[scheduler_pb2.InstanceInfo]:
        resp = await self._unary(self._stub.ListInstances, scheduler_pb2.ListInstancesRequest(), timeout_s)
        return list(resp.instances)

    async def stats(self, timeout_s: float | None = None) -> scheduler_pb2.SchedulerStats:
        return await self._unary(self._stub.GetStats, scheduler_pb2.SchedulerStatsRequest(), timeout_s)

    async def drain_instance(self, instance_id: str, drain_timeout_s: float = 0.0,
                             timeout_s: float | None = None, wait: bool = False) -> int:
        """See Client.drain_instance."""
        request = scheduler_pb2.DrainInstanceRequest(instance_id=instance_id, timeout_s=drain_timeout_s, wait=wait)
        return (await self._unary(self._stub.DrainInstance, request, timeout_s)).num_unfinished

    async def health(self, service: str = "", timeout_s: float | None = 5.0) -> str:
        resp = await self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
