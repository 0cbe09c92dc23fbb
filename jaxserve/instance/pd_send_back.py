"""PD-Caching-3 send-back (decode side): when a request finishes, the whole pages of its computed context that
the prefill instance lacks (its decode phase) go back with transfer_with_insert semantics -- PrepareKvTransfer
there, one gather + offer here, CommitKvTransfer(cache_only) there -- so the next turn's prefill reuses them.
An optimisation only: a failure is logged and counted, never surfaced to the (finished) request."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from jaxserve.proto.v1 import instance_pb2

log = logging.getLogger("jaxserve.instance")


class SendBack:
    """Mixin of `InstanceServer` (with `KvPath`)."""

    def _start_send_back(self, request_id: str, tokens: list[int], target) -> None:
        """Event loop, at a decode request's finish: send its decode-phase KV back in the background."""
        if self._stopped:
            return
        task = asyncio.get_running_loop().create_task(self._send_back_kv(request_id, tokens, target))
        self._send_backs.add(task)
        task.add_done_callback(self._send_backs.discard)

    async def _send_back_kv(self, request_id: str, tokens: list[int], target) -> None:
        """Decode side, caching3: the whole pages of the finished request's computed context (every token but
        the last sampled one) that the prefill instance lacks go to it with transfer_with_insert semantics:
        PrepareKvTransfer there (it references what it holds and reserves the rest), one gather + offer here,
        CommitKvTransfer(cache_only) there (pull, scatter, index, release). An optimisation only: a failure is
        logged and counted, never surfaced to the (finished) request."""
        ps = self.engine.pool.page_size
        seq = tokens[:(len(tokens) - 1) // ps * ps]
        if not seq:
            return
        name = f"prefill instance {target.instance_id or target.address}"
        timeout = self.config.kv_transfer_timeout_s
        pool = self.engine.pool
        # Reference what this side still holds of it (normally all of it: the decode side indexes its KV).
        n, pages = await self._on_engine(lambda: pool.match(seq))
        if n < ps:
            await self._on_engine(lambda: pool.free(pages))
            return
        seq = seq[:n]
        stub = self._peer(target.address)
        prepared = offered = False
        try:
            prep = await stub.PrepareKvTransfer(instance_pb2.PrepareKvTransferRequest(
                request_id=request_id, token_ids=seq, page_size=ps),
                timeout=timeout)
            prepared = True
            start = prep.cached_tokens // ps
            if prep.cached_tokens % ps or start > len(pages):
                raise RuntimeError(f"{name} holds {prep.cached_tokens} tokens of {len(seq)} with pages of {ps}")
            layout = self._per_shard_layout(prep, name)
            fields, nbytes = dict(source_address=self.transfer_server.address), 0
            if start < len(pages):  # engine thread: one gather of the missing pages, parked for the pull
                fields, nbytes = await self._on_engine(self.loop_thread.guarded(
                    lambda: self._offer_pages(pages[start:], layout), timeout))
                offered = True
            await stub.CommitKvTransfer(instance_pb2.CommitKvTransferRequest(
                transfer_id=prep.transfer_id, request_id=request_id, start_token=start * ps,
                num_tokens=len(seq) - start * ps, **fields, insert=True, cache_only=True), timeout=timeout + 5.0)
            self.kv_counters["kv_sent_back_tokens"] += len(seq) - start * ps
            self.kv_counters["kv_sent_back_bytes"] += nbytes
        except BaseException as e:
            self.kv_counters["kv_send_back_failures"] += 1
            if prepared:
                with contextlib.suppress(Exception):
                    await asyncio.shield(stub.Abort(instance_pb2.AbortRequest(request_id=request_id), timeout=2.0))
            if isinstance(e, Exception):
                detail = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.aio.AioRpcError) else \
                    f"{type(e).__name__}: {e}"
                log.warning("request %s: sending the decode-phase KV back to %s failed (offered: %s): %s",
                            request_id, name, offered, detail)
            else:
                raise
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._on_engine(lambda: pool.free(pages)))
