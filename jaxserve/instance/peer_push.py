"""Pushing a cached prefix's KV to another instance with transfer_with_insert semantics (PrepareKvTransfer
there, one gather + offer here, CommitKvTransfer(cache_only) there: it pulls, indexes and lets go), the
`pd_protocol.send_kv` exchange. Used by PD-Caching-3's send-back (pd_send_back.py) and by peer fetch
(issue 18: the scheduler asks a prefix's holder, with PushKv, to offer it to the instance a request goes to)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import grpc

from jaxserve.engine.pd_protocol import send_kv
from jaxserve.instance.pd_common import GrpcPeer, KvFailed, KvPath
from jaxserve.proto.v1 import instance_pb2

log = logging.getLogger("jaxserve.instance")


async def push_prefix(kv: KvPath, request_id: str, tokens: Sequence[int], target_address: str,
                      name: str) -> tuple[int, int, int]:
    """Send the whole pages of `tokens` this instance holds to the instance at target_address, which indexes
    them; returns (tokens held here, tokens sent, bytes sent). This side's pages are referenced only while
    the transfer runs; any failure is raised after they are let go (the target keeps nothing half-received)."""
    pool = kv.engine.pool
    ps = pool.page_size
    seq = list(tokens[:len(tokens) // ps * ps])
    if not seq:
        return 0, 0, 0
    timeout = kv.config.kv_transfer_timeout_s
    # References what this side holds of it (a host-tier part is swapped in), so eviction cannot take it
    # while it is offered.
    n, pages = await kv.on_engine(lambda: pool.match(seq))
    try:
        if n < ps:
            return 0, 0, 0
        seq = seq[:n]
        peer = GrpcPeer(kv.peer(target_address), name, request_id, timeout, kv.source_address,
                        insert=True, cache_only=True, kv_cache_dtype=kv.engine.pool.kv_cache_dtype)

        async def offer(start: int, prepared):  # engine thread: one gather of the missing pages, parked
            layout = kv.per_shard_layout(prepared.answer, name)
            return await kv.on_engine(kv.loop_thread.guarded(lambda: kv.offer_pages(pages[start:], layout),
                                                             timeout))

        sent = await send_kv(peer, request_id, seq, ps, offer)
        return n, n - sent.start_page * ps, peer.nbytes
    finally:
        with contextlib.suppress(Exception):
            await asyncio.shield(kv.on_engine(lambda: pool.free(pages)))


class PeerPush:
    """The holder's side of peer fetch: serves PushKv; owns its counters (kv_peer_*)."""

    def __init__(self, kv: KvPath):
        self.kv = kv
        self.counters = dict(kv_peer_sent_tokens=0, kv_peer_sent_bytes=0, kv_peer_push_failures=0)

    async def push(self, request: instance_pb2.PushKvRequest, context) -> instance_pb2.PushKvResponse:
        if not request.target.address:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "PushKv needs target.address (host:port)")
        if not request.token_ids:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "PushKv needs token_ids (the prefix to send)")
        name = f"instance {request.target.instance_id or request.target.address}"
        try:
            held, sent, nbytes = await push_prefix(self.kv, request.request_id, request.token_ids,
                                                   request.target.address, name)
        except KvFailed as e:
            self.counters["kv_peer_push_failures"] += 1
            await context.abort(e.code, f"pushing the prefix to {name} failed: {e.message}")
        except Exception as e:  # noqa: BLE001 - a clear error; this side's pages are already let go
            self.counters["kv_peer_push_failures"] += 1
            log.warning("request %s: pushing the prefix to %s failed: %s: %s", request.request_id, name,
                        type(e).__name__, e)
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"pushing the prefix to {name} failed: {type(e).__name__}: {e}")
        self.counters["kv_peer_sent_tokens"] += sent
        self.counters["kv_peer_sent_bytes"] += nbytes
        return instance_pb2.PushKvResponse(held_tokens=held, sent_tokens=sent, sent_bytes=nbytes)
