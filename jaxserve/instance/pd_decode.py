"""Decode side of the PD protocol (role decode; a PD-Caching-3 prefill instance serves Prepare / Commit too, for
the decode-phase KV sent back to it): every transfer is a `KvReceiver` reservation moving prepared -> pulling
-> filled -> committed (or failed / cancelled, its pages freed, nothing indexed).

    PrepareKvTransfer   engine thread: reference the cached prefix (caching2/3), reserve the rest
    CommitKvTransfer    pull the offered block (a worker thread; on a multi-process instance every process
                        pulls its own pieces on the engine thread), then on the engine thread write it, index it
                        (transfer_with_insert) and admit the request (`add_prefilled`): it decodes at once and
                        its tokens wait for the Decode call naming the transfer
    Decode              stream the tokens of a committed transfer's request

One table, the receiver's: a transfer is one `Reservation` from PrepareKvTransfer until its Decode call
claims it (`KvReceiver.hand_over` / `claim`; the claim is the one access from the event loop, under the
receiver's lock). Deadlines: the reaper frees a reservation never committed (the prefill side died) and aborts
a committed request no Decode call claimed."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import time
from typing import Iterator

import grpc

from jaxserve.cache_salt import salt_tokens
from jaxserve.instance.pd_common import Identity, KvPath, QueueSink, pump, sampling_params
from jaxserve.instance.pd_send_back import SendBack
from jaxserve.mempool.transfer import KvReceiver
from jaxserve.proto.v1 import instance_pb2

log = logging.getLogger("jaxserve.instance")


class DecodeSide:
    """The receive side of an instance (role decode; a caching3 prefill instance for the send-back): the
    servicer delegates PrepareKvTransfer, CommitKvTransfer and Decode to `prepare`, `commit` and `decode`, and
    the decode part of Abort and GetStats to `abort` and `stats`. `start()` starts the reaper, `stop()` stops it."""

    def __init__(self, kv: KvPath, identity: Identity, ids: Iterator[int], *, cache_only: bool,
                 send_back: SendBack | None = None):
        """kv: the instance's engine thread, peers and transport; identity: who this instance is (for error
        messages); ids: the instance's internal request id counter; cache_only: this instance only takes KV for
        its prefix cache (a caching3 prefill instance); send_back: sends a finished request's decode-phase KV
        back (caching3 decode instance)."""
        self.kv, self.identity, self.ids = kv, identity, ids
        self.cache_only, self.send_back = cache_only, send_back
        self.engine, self.loop_thread, self.config = kv.engine, kv.loop_thread, kv.config
        self.num_processes = kv.num_processes
        self.receiver = KvReceiver(self.engine.pool)
        # The one table of this side's transfers, prepare to Decode call: a committed transfer's request is
        # admitted at commit and its reservation, handed over, holds the sink its Decode call claims.
        self._reaper: asyncio.Task | None = None
        self._pulls = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="kv-pull")

    def start(self) -> None:
        self._reaper = asyncio.get_running_loop().create_task(self._reap())

    def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        self._pulls.shutdown(wait=False, cancel_futures=True)

    @property
    def me(self) -> str:
        return f"instance {self.identity.instance_id}"

    async def prepare(self, request, context):
        """Reserve pages for a context's KV; the cached prefix (caching2/3) is not sent."""
        ps = self.engine.pool.page_size
        mine, theirs = self.engine.pool.kv_cache_dtype, request.kv_cache_dtype or "auto"
        if theirs != mine:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{self.me}: kv_cache_dtype differs: the sender stores {theirs!r}, this instance "
                                f"{mine!r}; prefill and decode instances must use the same --kv_cache_dtype")
        try:
            r = await self.kv.on_engine(lambda: self.receiver.prepare(
                request.request_id, request.token_ids, request.page_size, self.config.kv_transfer_timeout_s))
        except MemoryError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.me}: {e}")
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.me}: {e}")
        return instance_pb2.PrepareKvTransferResponse(
            transfer_id=r.transfer_id, cached_tokens=r.start_page * ps, num_pages_reserved=len(r.new_pages),
            receiver_shards=self.kv.receiver_shards())

    async def abort(self, request_id: str) -> bool:
        """Abort's decode part: free a reservation whose prefill gave up, forget a received request."""
        return await self.kv.on_engine(lambda: self.receiver.cancel_request(request_id))

    async def stats(self) -> tuple[int, int]:
        """(transfers pending or waiting for their Decode call, pages reserved)."""
        pending = held = 0
        with contextlib.suppress(Exception):
            pending, held = await self.kv.on_engine(
                lambda: (len(self.receiver.pending), self.receiver.held_pages()))
        return pending, held

    async def commit(self, request, context):
        """Pull the block, write and index it, admit the request (if given): it starts decoding at once and its
        tokens wait for the Decode call naming this transfer."""
        tid = request.transfer_id
        if self.cache_only and not (request.cache_only and request.insert):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.me} (prefill) only "
                                "takes KV for its prefix cache: cache_only and insert must be set")
        if request.cache_only and request.HasField("request"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a cache_only transfer admits no request")
        ps = self.engine.pool.page_size
        committed = False
        try:
            try:
                r = await self.kv.on_engine(lambda: self.receiver.get(tid))
            except KeyError as e:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"{self.me}: {e.args[0]}")
            if request.start_token != r.start_page * ps or request.num_tokens != len(r.tokens) - r.start_page * ps:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"transfer {tid} sends tokens [{request.start_token}, "
                                    f"{request.start_token + request.num_tokens}) but "
                                    f"[{r.start_page * ps}, {len(r.tokens)}) were reserved")
            if not request.cache_only and not request.HasField("request"):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"transfer {tid}: a transfer to a decode "
                                    "instance carries its request (or is cache_only)")
            from jaxserve.mempool import transfer as tr
            try:
                self.receiver.begin(tid)  # prepared -> pulling (touches no pool state)
            except (KeyError, tr.IllegalTransition) as e:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{self.me}: {e}")
            block, nbytes, write, transport = None, 0, None, None
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
                                        f"{self.me} has {self.num_processes} processes: it takes "
                                        "per-shard KV transfers only (CommitKvTransferRequest.sources)")
                if sources and self.num_processes > 1:
                    # Every process pulls its own pieces and writes them, on the engine thread (in order with the
                    # steps, which wait meanwhile): see multihost.receive.
                    from jaxserve.engine import multihost
                    nbytes = tr.shard_bytes(sources, shape, spec.dtype, k)
                    write = functools.partial(multihost.receive, self.engine, self.kv.transfer_server, sources, shape,
                                              spec.dtype, k, timeout=timeout)
                else:
                    try:  # the sender names its backend; either kind is pulled here
                        transport = self.kv.transport_for("jax" if sources else request.kv_transport)
                    except ValueError as e:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.me}: transfer {tid}: {e}")
                    if request.kv_transport == "grpc":
                        offer = tr.StreamOffer(request.source_address, request.pull_uuid, tuple(shape), spec.dtype, k)
                    else:
                        offer = tr.BlockOffer(request.source_address, request.pull_uuid, tuple(shape), spec.dtype,
                                              spec.num_shards, k, sources)
                    pull = functools.partial(transport.fetch, self.engine.pool, offer, timeout)
                    try:
                        block = await asyncio.get_running_loop().run_in_executor(self._pulls, pull)
                    except tr.TransferError as e:
                        await context.abort(grpc.StatusCode.ABORTED,
                                            f"{self.me}: KV pull for transfer {tid} failed: {e}")
                    nbytes = sum(int(x.nbytes) for x in block)
            sink = None
            if request.HasField("request"):
                inner = request.request
                on_finish = None
                if self.send_back is not None and request.HasField("send_back_to") and request.send_back_to.address:
                    target, rid, salt = request.send_back_to, inner.request_id, inner.cache_salt
                    on_finish = lambda tokens: self.send_back.start(  # noqa: E731
                        rid, salt_tokens(tokens, salt), target)
                sink = QueueSink(asyncio.get_running_loop(),
                                  list(inner.prompt_token_ids) + list(inner.generated_token_ids), on_finish)
            internal_id = f"{request.request_id}#{next(self.ids)}"
            arrival = time.perf_counter()

            def finish():  # engine thread
                self.receiver.fill(tid, block, transport, write=write)
                got = self.receiver.commit(tid, nbytes)
                if request.cache_only:  # PD-Caching-3 send-back: the index keeps the pages, we let go
                    self.engine.pool.free(self.receiver.take(tid).pages)
                elif sink is not None:  # the entry stays, with the sink, until its Decode call claims it
                    r = self.receiver.hand_over(tid, internal_id, sink, self.config.kv_transfer_timeout_s)
                    try:
                        self._admit(r, request.request, sink, internal_id, arrival)
                    except BaseException:
                        self.receiver.claim(tid)  # nothing to claim: the pages are freed
                        raise
                return got

            try:
                r = await self.kv.on_engine(self.loop_thread.guarded(finish, timeout))
            except KeyError as e:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"{self.me}: {e.args[0]}")
            except ValueError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.me}: {e}")
            except tr.TransferError as e:
                await context.abort(grpc.StatusCode.ABORTED,
                                    f"{self.me}: KV pull for transfer {tid} failed: {e}")
            except Exception as e:  # noqa: BLE001 - a clear error, pages freed below
                await context.abort(grpc.StatusCode.INTERNAL,
                                    f"{self.me}: commit of {tid} failed: {type(e).__name__}: {e}")
            committed = True
            return instance_pb2.CommitKvTransferResponse(
                received_tokens=len(r.tokens) - r.start_page * ps,
                inserted_tokens=len(r.tokens) // ps * ps if r.insert else 0, received_bytes=nbytes)
        finally:
            if not committed:  # failed, refused or cancelled: nothing half-received stays
                self.loop_thread.submit(lambda: self.receiver.cancel(tid))

    def _admit(self, r, inner, sink: "QueueSink", internal_id: str, arrival: float) -> None:
        """Engine thread: admit a request whose KV a committed reservation holds; frees the pages on failure."""
        try:
            params = sampling_params(inner)
            prompt, generated = list(inner.prompt_token_ids), list(inner.generated_token_ids)
            if not generated or salt_tokens(prompt + generated[:-1], inner.cache_salt) != r.tokens:
                raise ValueError("the request's context does not match the transferred tokens")
            ps = self.engine.pool.page_size
            self.loop_thread.add_prefilled(internal_id, inner.request_id, prompt, generated, params, r.pages,
                                           num_computed=len(r.tokens),
                                           num_indexed_pages=len(r.tokens) // ps if r.insert else 0,
                                           sink=sink, arrival=arrival, num_resumed=len(generated),
                                           cache_salt=inner.cache_salt)
        except BaseException:
            self.engine.pool.free(r.pages)
            raise

    async def decode(self, request, context):
        """Stream the tokens of a request whose KV arrived with transfer `kv_handle`."""
        tid = request.kv_handle
        r = self.receiver.claim(tid)  # the receiver's table is locked for this event-loop call
        if r is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"{self.me}: no KV for handle {tid!r} (never committed, aborted, "
                                f"or not claimed within {self.config.kv_transfer_timeout_s:g} s)")
        async for response in pump(r.waiter, r.internal_id, context, self.loop_thread, self.identity):
            yield response

    async def _reap(self) -> None:
        """Decode side: free reservations never committed and abort received requests never claimed."""
        while True:
            await asyncio.sleep(min(0.5, self.config.kv_transfer_timeout_s / 4))
            now = time.monotonic()
            try:
                expired = await self.kv.on_engine(lambda: [
                    r for r in self.receiver.expired(now) if self.receiver.cancel(r.transfer_id)])
            except Exception:  # noqa: BLE001 - the engine loop is stopping
                return
            for r in expired:
                if r.handed_over:  # committed and admitted, but no Decode call claimed it
                    log.warning("request %s: no Decode call for transfer %s within %.1f s: aborted", r.internal_id,
                                r.transfer_id, self.config.kv_transfer_timeout_s)
                    self.loop_thread.abort(r.internal_id)
                else:
                    log.warning("KV transfer %s (request %s) not committed within %.1f s: its pages are freed",
                                r.transfer_id, r.request_id, self.config.kv_transfer_timeout_s)
