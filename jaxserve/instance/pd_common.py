"""What the PD sides of an instance share (pd_prefill.py, pd_decode.py, pd_send_back.py): the sink that hands
engine events to a handler, the request's sampling parameters, the status a failed transfer step answers, and
`pump` (a request's sink as InstanceGenerateResponses), `KvPath`: peers, the engine thread, and the transport
selection -- one whole block, or per-shard pieces when
either instance has several processes (or `kv_per_shard`), through `CrossProcessTransport` on a single-process
instance and through the multi-process channel (jaxserve/engine/multihost.py: `offer`, `receive`) otherwise.

Two backends move a whole block (`kv_transport`): "jax" (`jax.experimental.transfer`, fast, plaintext TCP,
for trusted networks) and "grpc" (`GrpcStreamTransport`: raw bytes over FetchKv on the instance's own
authenticated, with TLS mTLS-encrypted, link; single-process instances). The sender uses its configured one
and names it in CommitKvTransfer; a receiver pulls either kind."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
from typing import Iterator, Sequence

import grpc

from jaxserve.engine.pd_protocol import Prepared
from jaxserve.engine.sampling import SamplingParams
from jaxserve.instance.engine_loop import Sink, default_seed
from jaxserve.proto.enums import FINISH_REASON_CODES
from jaxserve.proto.v1 import common_pb2, instance_pb2, instance_pb2_grpc
from jaxserve.security import LinkSecurity


log = logging.getLogger("jaxserve.instance")

KV_TRANSPORTS = ("auto", "jax", "grpc")
PEER_MAX_BACKOFF_MS = 1000
# Each peer channel has its own subchannels: a fresh channel would otherwise share gRPC's global subchannel
# for the address, back-off state included, and be no fresher than the one it replaces.
PEER_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                        ("grpc.max_reconnect_backoff_ms", PEER_MAX_BACKOFF_MS), ("grpc.use_local_subchannel_pool", 1)]


class KvFailed(Exception):
    """A KV transfer step failed; `peer`: the other instance failed it (its RPC), not this one."""

    def __init__(self, code: grpc.StatusCode, message: str, peer: bool = False):
        super().__init__(message)
        self.code, self.message, self.peer = code, message, peer


class QueueSink(Sink):
    """Hands engine-thread events to the handler's asyncio queue. With `on_finish(tokens)`, also keeps the
    request's whole token sequence (starting from `context`) and calls it on the event loop when the request
    finishes normally (PD-Caching-3's send-back)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, context: Sequence[int] | None = None, on_finish=None):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tokens = list(context) if on_finish is not None else None
        self.on_finish = on_finish

    def stage(self, event: tuple):
        """Engine thread: note the event; returns (loop, fn) for `fn(event)` on the loop (`engine_loop.deliver`
        batches a step's events into one call)."""
        if self.tokens is not None:
            if event[0] == "tokens":
                self.tokens += event[1]
            elif event[0] == "finish":
                self.tokens += event[3]
                if event[1] != "abort":
                    with contextlib.suppress(RuntimeError):
                        self.loop.call_soon_threadsafe(self.on_finish, list(self.tokens))
        return self.loop, self.queue.put_nowait

    def push(self, event: tuple) -> None:
        loop, fn = self.stage(event)
        try:
            loop.call_soon_threadsafe(fn, event)
        except RuntimeError:
            pass  # the event loop is closed: nobody is listening any more


def sampling_params(request: instance_pb2.InstanceGenerateRequest) -> SamplingParams:
    """Engine SamplingParams for an instance request; max_tokens counts the resumed tokens too (the engine
    counts every output token). ValueError for invalid values."""
    s = request.sampling
    seed = s.seed if s.HasField("seed") else default_seed(request.request_id)
    max_tokens = len(request.generated_token_ids) + max(request.max_tokens, 1)
    return SamplingParams(
        max_tokens=max_tokens, temperature=s.temperature,
        top_k=s.top_k if s.HasField("top_k") else -1, top_p=s.top_p if s.HasField("top_p") else 1.0,
        seed=seed, stop_token_ids=tuple(s.stop_token_ids), stop=tuple(s.stop), ignore_eos=s.ignore_eos,
        logprobs=s.logprobs if s.HasField("logprobs") else None, presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else 1.0,
        logit_bias=dict(s.logit_bias), min_p=s.min_p, min_tokens=min(s.min_tokens, max_tokens),
        include_stop_str_in_output=s.include_stop_str_in_output, json_schema=s.json_schema or None)


def logprobs_messages(entries: list | None) -> list:
    """TokenLogprobs for an event's logprobs (engine_loop._logprobs): [] when none were asked for; a token
    without any (resumed from elsewhere) gets an empty message, so the list stays aligned with the tokens."""
    if entries is None:
        return []
    out = []
    for e in entries:
        m = common_pb2.TokenLogprobs()
        if e is not None:
            m.logprob = e[0]
            m.top_ids.extend(t for t, _ in e[1])
            m.top_logprobs.extend(v for _, v in e[1])
        out.append(m)
    return out


def stop_reason_message(reason) -> common_pb2.StopReason | None:
    if reason is None:
        return None
    return common_pb2.StopReason(text=reason) if isinstance(reason, str) else common_pb2.StopReason(token_id=reason)



async def add_request(loop_thread, ids: Iterator[int], inner: instance_pb2.InstanceGenerateRequest, context,
                      arrival: float, **kwargs) -> tuple[str, QueueSink]:
    """Start `inner` on the engine (`EngineLoop.add`, with kwargs): its internal id and the sink its events
    arrive on. Invalid sampling parameters end the call with INVALID_ARGUMENT."""
    try:
        params = sampling_params(inner)
    except ValueError as e:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    sink = QueueSink(asyncio.get_running_loop())
    # Ids are per instance: two callers may reuse a request id, and a moved request comes back with its own.
    internal_id = f"{inner.request_id}#{next(ids)}"
    loop_thread.add(internal_id, inner.request_id, inner.prompt_token_ids, inner.generated_token_ids, params, sink,
                    arrival, cache_salt=inner.cache_salt, **kwargs)
    return internal_id, sink


def tensor_specs(offer) -> list[instance_pb2.TensorSpec]:
    """The control message's description of an offered block (`BlockOffer`): one TensorSpec per chunk."""
    return [instance_pb2.TensorSpec(shape=list(offer.shape), dtype=offer.dtype, num_shards=offer.num_shards)
            for _ in range(offer.num_chunks)]


def kv_code(error: grpc.aio.AioRpcError) -> grpc.StatusCode:
    """The status a Prefill answers when its decode target failed a transfer step."""
    code = error.code()
    if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INVALID_ARGUMENT):
        return code
    return grpc.StatusCode.ABORTED  # deadline, pull failure, cancelled...: the transfer, not this instance


@dataclasses.dataclass
class Identity:
    """Who this instance is, as the PD sides name it: set by the servicer when it starts (address) and when the
    scheduler registers it (instance_id)."""
    instance_id: str = ""
    address: str = ""


def event_response(event: tuple) -> instance_pb2.InstanceGenerateResponse:
    """A sink's "tokens" or "finish" event as the message Generate streams."""
    if event[0] == "tokens":
        return instance_pb2.InstanceGenerateResponse(token_ids=event[1], logprobs=logprobs_messages(event[2]))
    _, reason, usage, last, extra = event
    return instance_pb2.InstanceGenerateResponse(
        token_ids=last, finish_reason=FINISH_REASON_CODES[reason], usage=common_pb2.InstanceUsage(**usage),
        logprobs=logprobs_messages(extra.get("logprobs")), stop_reason=stop_reason_message(extra.get("stop_reason")))


async def pump(sink: QueueSink, internal_id: str, context, loop_thread, identity: Identity):
    """Yield a running request's InstanceGenerateResponses from its sink; if the call goes away first
    (cancelled, deadline), abort the request in the engine, which frees its pages."""
    done = False
    queue = sink.queue
    try:
        while True:
            event = await queue.get()
            if event[0] == "tokens":
                ids, lps = event[1], event[2]
                # Token events that queued up while this stream was behind go out as one message.
                while not queue.empty() and queue._queue[0][0] == "tokens":  # noqa: SLF001 - peek
                    more = queue.get_nowait()
                    ids = ids + more[1]
                    lps = None if lps is None else lps + more[2]
                yield instance_pb2.InstanceGenerateResponse(token_ids=ids, logprobs=logprobs_messages(lps))
            elif event[0] == "finish":
                done = True
                yield event_response(event)
                return
            else:
                done = True
                _, code, message = event
                await context.abort(code, f"instance {identity.instance_id}: {message}")
    finally:
        if not done:
            loop_thread.abort(internal_id)


def resolve_kv_transport(choice: str, *, tls: bool, num_processes: int = 1, per_shard: bool = False) -> str:
    """The backend an instance sends KV with: "auto" is "grpc" when the instance has TLS (its KV is then
    encrypted like every other link), else "jax". "grpc" moves whole blocks from one process: a multi-process
    (or kv_per_shard) instance refuses it explicitly and, on "auto", stays on "jax" with a warning."""
    if choice not in KV_TRANSPORTS:
        raise ValueError(f"kv_transport must be one of {KV_TRANSPORTS}, got {choice!r}")
    whole_block = num_processes == 1 and not per_shard
    if choice == "grpc" and not whole_block:
        raise ValueError("--kv_transport=grpc is single-process only: a multi-process (or kv_per_shard) instance "
                         "moves KV per shard, which only --kv_transport=jax does (plaintext: keep its transfer "
                         "ports on a private network)")
    if choice == "auto":
        if tls and not whole_block:
            log.warning("kv_transport auto: this instance moves KV per shard, which only the jax backend does: "
                        "its KV bytes cross the network unencrypted even though its gRPC links use TLS")
        return "grpc" if tls and whole_block else "jax"
    return choice


class KvPath:
    """What the PD sides share: the engine thread, peers (gRPC channels to other instances) and the KV
    transports -- one whole block (backend "jax" or "grpc"), or per-shard pieces (jax). `start()` creates
    the transports (and a transfer server when the instance sends with "jax" and passed none); `close()`
    closes the peers' channels."""

    def __init__(self, engine, loop_thread, config, *, num_processes: int = 1, transfer_server=None,
                 transfer_addresses: Sequence[str] | None = None, link: LinkSecurity = LinkSecurity(),
                 kv_transport: str = "jax"):
        """link: how peers are reached (the cluster secret on every call, mTLS when configured); kv_transport:
        the backend this instance sends with, resolved ("jax" | "grpc", `resolve_kv_transport`)."""
        self.engine, self.loop_thread, self.config = engine, loop_thread, config
        self.link = link
        self.num_processes = num_processes
        self.kv_transport = kv_transport
        self.transfer_server = transfer_server  # jax.experimental.transfer server (roles prefill and decode)
        self.transport = None  # the sending transport; owns the OpCounts of this instance's KV
        self.jax = None        # CrossProcessTransport on the transfer server (sends with "jax", pulls jax offers)
        self.stream = None     # GrpcStreamTransport: always there to pull "grpc" offers; sends with "grpc"
        self.addresses = list(transfer_addresses) if transfer_addresses else None
        self._layout: list[instance_pb2.KvShard] | None = None  # this pool's, for PrepareKvTransfer answers
        self._peers: dict[str, grpc.aio.Channel] = {}
        self._jax_lock = threading.Lock()
        self._reaper: asyncio.Task | None = None

    def start(self, transfers: bool) -> None:
        """transfers: this instance's role moves KV (it needs a transport to send with). On the event loop."""
        from jaxserve.instance.kv_stream import StreamFetch
        from jaxserve.mempool.transfer import GrpcStreamTransport, ParkedOffers
        if self.kv_transport == "grpc":  # refuses a multi-process / per-shard instance (ValueError)
            resolve_kv_transport("grpc", tls=True, num_processes=self.num_processes, per_shard=self.config.kv_per_shard)
        # An offer nobody fetched (the receiver died or gave up at its deadline) goes after twice that.
        ttl = 2 * self.config.kv_transfer_timeout_s + 5.0
        self.stream = GrpcStreamTransport(StreamFetch(self.peer, asyncio.get_running_loop()), ParkedOffers(ttl_s=ttl))
        if transfers and self.transfer_server is None and self.kv_transport == "jax":
            if self.num_processes > 1:
                raise RuntimeError("a multi-process instance needs the transfer server of every process: pass "
                                   "transfer_server and transfer_addresses (jaxserve.launch.instance does)")
            from jaxserve.mempool.transfer import TransferServer
            self.transfer_server = TransferServer(address=f"{self.config.host}:0")
        if self.transfer_server is not None:
            self._start_jax()
        self.transport = self.stream if self.kv_transport == "grpc" else self.jax
        self._reaper = asyncio.get_running_loop().create_task(self._reap_parked(ttl))

    def _start_jax(self) -> None:
        from jaxserve.mempool.transfer import CrossProcessTransport
        if self.addresses is None:
            self.addresses = [self.transfer_server.address]
        self.jax = CrossProcessTransport(self.transfer_server, self.addresses)

    def set_address(self, address: str) -> None:
        """Where peers reach this instance's gRPC server: the address its "grpc" offers name."""
        if self.stream is not None:
            self.stream.address = address

    @property
    def source_address(self) -> str:
        """The address a commit names for this instance's offers (the transfer server's, or its gRPC server's)."""
        return self.stream.address if self.kv_transport == "grpc" else self.transfer_server.address

    def transport_for(self, backend: str):
        """The transport that pulls an offer of `backend` ("" = "jax"). A "grpc" instance pulling a jax offer
        starts its transfer server on first use (the sender chose the backend)."""
        if backend == "grpc":
            return self.stream
        if backend not in ("", "jax"):
            raise ValueError(f"unknown kv_transport {backend!r} (this instance knows 'jax' and 'grpc')")
        with self._jax_lock:
            if self.jax is None:
                from jaxserve.mempool.transfer import TransferServer
                self.transfer_server = TransferServer(address=f"{self.config.host}:0")
                self._start_jax()
        return self.jax

    async def _reap_parked(self, ttl: float) -> None:
        # Frees offers nobody fetched even when no new offer comes to reap them.
        while True:
            await asyncio.sleep(max(ttl / 4, 0.5))
            if self.stream.parked.reap():
                log.info("dropped KV offers nobody fetched within %.0f s", ttl)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for channel in self._peers.values():
            await channel.close(grace=0)
        self._peers.clear()

    def peer(self, address: str) -> instance_pb2_grpc.InstanceStub:
        """A stub on the cached channel to `address`. A channel that failed to connect sits in reconnect
        back-off (up to PEER_MAX_BACKOFF_MS, gRPC's default grows to 2 minutes) and fails every call meanwhile,
        so an instance restarted at that address would be unreachable for that long: such a channel is
        replaced by a fresh one, which connects at once."""
        channel = self._peers.get(address)
        if channel is not None and channel.get_state() == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            self.forget(address)
            channel = None
        if channel is None:
            channel = self._peers[address] = self.link.channel(address, options=PEER_CHANNEL_OPTIONS)
        return instance_pb2_grpc.InstanceStub(channel)

    def forget(self, address: str) -> None:
        """Drops the cached channel to `address` (a call on it failed UNAVAILABLE: the peer may come back at
        that address, and a fresh channel reaches it at once where this one would wait out its back-off)."""
        channel = self._peers.pop(address, None)
        if channel is not None:
            asyncio.get_running_loop().create_task(channel.close(grace=0))

    async def on_engine(self, fn):
        return await asyncio.wrap_future(self.loop_thread.submit(fn))

    def per_shard_layout(self, prep, peer: str):
        """The receiver's layout (`HeadShard`s) when this transfer goes per shard -- either instance has several
        processes, or config.kv_per_shard -- else None (the whole block moves as one offer)."""
        shards = list(prep.receiver_shards)
        if not (self.num_processes > 1 or any(x.process for x in shards) or self.config.kv_per_shard):
            return None
        if self.kv_transport == "grpc":
            raise ValueError(f"{peer} has several processes: its KV moves per shard, which kv_transport=grpc does "
                             "not do (whole blocks from a single process); run this side with --kv_transport=jax")
        if not shards:
            raise ValueError(f"{peer} does not describe its KV layout (PrepareKvTransferResponse.receiver_shards: "
                             "an older version?); per-shard transfers need it")
        from jaxserve.mempool.transfer import HeadShard
        return [HeadShard(x.process, x.head_start, x.head_end) for x in shards]

    def offer_pages(self, pages: Sequence[int], layout) -> tuple[dict, int]:
        """Engine thread: gather `pages` and park them for the receiver (as one block, or per shard for the
        receiver `layout`: on a multi-process instance every process offers its own shards). Returns the
        CommitKvTransferRequest fields describing what was offered and the bytes it moves."""
        if self.kv_transport == "grpc":
            offer = self.stream.offer(self.engine.pool, pages)
            return (dict(source_address=offer.address, pull_uuid=offer.uuid, tensors=tensor_specs(offer),
                         kv_transport=offer.backend), offer.nbytes)
        if layout is not None and self.num_processes > 1:
            from jaxserve.engine import multihost
            sources, chunks, _, total = multihost.offer(self.engine, self.transfer_server, self.addresses,
                                                        pages, layout)
            offer = self.jax.describe(chunks, self.transfer_server.address, sources=sources, nbytes=total)
        else:
            offer = self.jax.offer(self.engine.pool, pages, layout)
        if not offer.sources:
            return (dict(source_address=offer.address, pull_uuid=offer.uuid, tensors=tensor_specs(offer)),
                    offer.nbytes)
        return (dict(source_address=offer.address, tensors=tensor_specs(offer),
                     sources=[instance_pb2.KvSource(
                         receiver_process=x.receiver_process, address=x.address, pull_uuid=x.uuid,
                         pieces=[instance_pb2.KvPiece(receiver_shard=j, head_start=a, head_end=b)
                                 for j, a, b in x.pieces]) for x in offer.sources]), offer.nbytes)

    def receiver_shards(self) -> list[instance_pb2.KvShard]:
        if self._layout is None:
            from jaxserve.mempool.transfer import pool_layout
            self._layout = [instance_pb2.KvShard(process=x.process, head_start=x.start, head_end=x.end)
                            for x in pool_layout(self.engine.pool)]
        return self._layout


class GrpcPeer:
    """The other instance of a PD exchange (`jaxserve.engine.pd_protocol.Peer`) over its gRPC API: prepare is
    PrepareKvTransfer, commit is CommitKvTransfer with the offer's fields plus `commit_fields` (the decode
    request, or cache_only), abort is Abort. A failed RPC raises KvFailed with the status to answer."""

    def __init__(self, stub, name: str, request_id: str, timeout: float, source_address: str, *,
                 kv_cache_dtype: str = "auto", **commit_fields):
        """`kv_cache_dtype`: the sender's KV storage, told in PrepareKvTransfer so a receiver that stores KV
        differently refuses before anything moves."""
        self.stub, self.name, self.request_id, self.timeout = stub, name, request_id, timeout
        self.kv_cache_dtype = kv_cache_dtype
        self.source_address = source_address
        self.commit_fields = commit_fields
        self.nbytes = 0
        self._tokens, self._page_size = 0, 0

    async def prepare(self, request_id: str, tokens: Sequence[int], page_size: int) -> Prepared:
        self._tokens, self._page_size = len(tokens), page_size
        try:
            prep = await self.stub.PrepareKvTransfer(instance_pb2.PrepareKvTransferRequest(
                request_id=request_id, token_ids=tokens, page_size=page_size, kv_cache_dtype=self.kv_cache_dtype),
                timeout=self.timeout)
        except grpc.aio.AioRpcError as e:
            raise KvFailed(kv_code(e), f"KV transfer to {self.name} failed at PrepareKvTransfer: "
                                       f"{e.code().name}: {e.details()}", peer=True) from None
        return Prepared(prep.transfer_id, prep.cached_tokens, prep)

    async def commit(self, prepared: Prepared, start_page: int, offer) -> int:
        """offer: (CommitKvTransferRequest fields, bytes) from `KvPath.offer_pages`, or None (nothing sent)."""
        fields, self.nbytes = offer if offer is not None else (dict(source_address=self.source_address), 0)
        ps = self._page_size
        try:
            commit = await self.stub.CommitKvTransfer(instance_pb2.CommitKvTransferRequest(
                transfer_id=prepared.transfer_id, request_id=self.request_id, start_token=start_page * ps,
                num_tokens=self._tokens - start_page * ps, **fields, **self.commit_fields),
                timeout=self.timeout + 5.0)
        except grpc.aio.AioRpcError as e:
            raise KvFailed(kv_code(e), f"KV transfer to {self.name} failed at CommitKvTransfer: "
                                       f"{e.code().name}: {e.details()}", peer=True) from None
        return commit.received_tokens

    async def abort(self, request_id: str) -> None:
        """Best effort: free the target's reservation now rather than at its deadline."""
        await asyncio.shield(self.stub.Abort(instance_pb2.AbortRequest(request_id=request_id), timeout=2.0))

