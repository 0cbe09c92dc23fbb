"""Prefill side of the PD protocol (role prefill, any PD mode): prefill with `prefill_only`, sample the first
token, then move the KV the decode target lacks:

The steps are `jaxserve.engine.pd_protocol.send_kv` (the in-process DisaggregatedPair runs them too), with
D reached through `GrpcPeer`:

    PrepareKvTransfer(context) on D  ->  D references what it caches and reserves the rest (transfer id)
    engine thread: one gather of the missing pages, offered on this process's transfer server (per shard for
                   multi-process instances)
    CommitKvTransfer(offer, the decode request) on D  ->  D pulls, writes, indexes, admits
    release this side's pages (from caching1 on, the index keeps the whole ones)

A failed step answers the status of `kv_code` and asks D to Abort (best effort: D frees its reservation at
its deadline anyway)."""

from __future__ import annotations

import logging
import time
from typing import Iterator

import grpc

from jaxserve.engine.pd_protocol import ProtocolError, send_kv
from jaxserve.cache_salt import salt_tokens
from jaxserve.instance.pd_common import (GrpcPeer, Identity, KvFailed, KvPath, add_request, logprobs_messages,
                                         stop_reason_message)
from jaxserve.proto.enums import FINISH_REASON_CODES
from jaxserve.proto.messages import FAILED_PEER_DECODE, FAILED_PEER_KEY, decode_request
from jaxserve.proto.v1 import common_pb2, instance_pb2

log = logging.getLogger("jaxserve.instance")


class PrefillSide:
    """The prefill side of an instance (role prefill): the servicer delegates Prefill to `prefill`. Owns its
    counters (kv_sent_*, kv_transfers, kv_transfer_failures)."""

    def __init__(self, kv: KvPath, identity: Identity, ids: Iterator[int], *, send_back: bool):
        """kv: the instance's engine thread, peers and transport; identity: who this instance is (named in
        CommitKvTransfer for a caching3 send-back); ids: the instance's internal request id counter;
        send_back: PD-Caching-3 (ask the decode side to send the decode-phase KV back)."""
        self.kv, self.identity, self.ids, self.send_back = kv, identity, ids, send_back
        self.loop_thread, self.engine, self.config = kv.loop_thread, kv.engine, kv.config
        self.counters = dict(kv_sent_tokens=0, kv_sent_bytes=0, kv_transfers=0, kv_transfer_failures=0)

    @property
    def me(self) -> str:
        return f"instance {self.identity.instance_id}"

    async def prefill(self, request, context):
        """Role prefill: prefill (prefill_only), sample the first token, send the KV the decode target lacks,
        release the pages (the index keeps the full ones from caching1 on), answer."""
        arrival = time.perf_counter()
        inner = request.request
        internal_id, sink = await add_request(self.loop_thread, self.ids, inner, context, arrival, prefill_only=True)
        try:
            event = await sink.queue.get()
            if event[0] == "error":
                await context.abort(event[1], f"{self.me}: {event[2]}")
            if event[0] == "finish":  # the first token ends the request: nothing to send
                _, reason, usage, last, extra = event
                lps = logprobs_messages(extra.get("logprobs"))
                return instance_pb2.PrefillResponse(first_token_id=last[-1] if last else 0,
                                                     finish_reason=FINISH_REASON_CODES[reason],
                                                     usage=common_pb2.InstanceUsage(**usage),
                                                     first_token_logprobs=lps[-1] if lps else None,
                                                     stop_reason=stop_reason_message(extra.get("stop_reason")))
            assert event[0] == "prefilled", event
            _, first, usage, first_lp = event
            lps = logprobs_messages(first_lp)
            if not request.decode_target.address:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Prefill needs decode_target.address")
            try:
                tid, sent_tokens, sent_bytes = await self._send_kv(internal_id, inner, first,
                                                                   request.decode_target, context)
            except KvFailed as e:
                self.counters["kv_transfer_failures"] += 1
                if e.peer and e.code == grpc.StatusCode.UNAVAILABLE:
                    self.kv.forget(request.decode_target.address)
                log.warning("request %s: %s", inner.request_id, e.message)
                # The decode target's failure is marked so the scheduler blames it, not this instance.
                blame = ((FAILED_PEER_KEY, FAILED_PEER_DECODE),) if e.peer else ()
                await context.abort(e.code, f"{self.me}: {e.message}", trailing_metadata=blame)
            self.counters["kv_sent_tokens"] += sent_tokens
            self.counters["kv_sent_bytes"] += sent_bytes
            self.counters["kv_transfers"] += 1
            return instance_pb2.PrefillResponse(first_token_id=first, usage=common_pb2.InstanceUsage(**usage),
                                                transferred_tokens=sent_tokens, kv_handle=tid,
                                                transferred_bytes=sent_bytes,
                                                first_token_logprobs=lps[0] if lps else None)
        finally:
            # Sent, failed or cancelled: the prefill side's pages go (the block on its way is a copy).
            # Unknown ids (finished, failed) are a no-op.
            self.loop_thread.abort(internal_id)

    def _offer(self, internal_id: str, start_page: int, layout):
        """Engine thread: gather the held pages from start_page on and park them on the transfer server(s)."""
        return self.kv.offer_pages(self.loop_thread.held_pages(internal_id)[start_page:], layout)

    async def _send_kv(self, internal_id: str, inner, first: int, target, context) -> tuple[str, int, int]:
        """`pd_protocol.send_kv` to the decode target: prepare there, offer the missing pages, commit with the
        decode request. (transfer id, tokens, bytes) sent; KvFailed with the status to answer otherwise (the
        decode side frees its reservation on its own)."""
        ps = self.engine.pool.page_size
        # The decode side indexes what it receives under these tokens: the salted ones (jaxserve.cache_salt).
        ctx = salt_tokens(list(inner.prompt_token_ids) + list(inner.generated_token_ids), inner.cache_salt)
        timeout = self.config.kv_transfer_timeout_s
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = max(min(timeout, remaining), 0.1)
        name = f"decode instance {target.instance_id or target.address}"
        peer = GrpcPeer(self.kv.peer(target.address), name, inner.request_id, timeout, self.kv.source_address,
                        kv_cache_dtype=self.kv.engine.pool.kv_cache_dtype,
                        insert=self.config.pd_mode in ("caching2", "caching3"), request=decode_request(inner, first),
                        send_back_to=instance_pb2.KvTarget(instance_id=self.identity.instance_id,
                                                           address=self.identity.address)
                        if self.send_back else None)

        async def offer(start: int, prepared):  # engine thread: one gather of the held pages from start on
            try:
                layout = self.kv.per_shard_layout(prepared.answer, name)
            except ValueError as e:
                raise KvFailed(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from None
            return await self.kv.on_engine(self.loop_thread.guarded(
                lambda: self._offer(internal_id, start, layout), self.config.kv_transfer_timeout_s))

        try:
            sent = await send_kv(peer, inner.request_id, ctx, ps, offer)
        except KvFailed:
            raise
        except ProtocolError as e:
            raise KvFailed(grpc.StatusCode.INTERNAL, str(e)) from None
        except Exception as e:  # noqa: BLE001 - broken: a process of this instance
            raise KvFailed(grpc.StatusCode.UNAVAILABLE if self.loop_thread.broken else grpc.StatusCode.INTERNAL,
                           f"KV transfer to {name} failed: {type(e).__name__}: {e}") from None
        return sent.prepared.transfer_id, sent.received, peer.nbytes
