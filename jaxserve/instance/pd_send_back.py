"""PD-Caching-3 send-back (decode side): when a request finishes, the whole pages of its computed context that
the prefill instance lacks (its decode phase) go back with transfer_with_insert semantics -- PrepareKvTransfer
there, one gather + offer here, CommitKvTransfer(cache_only) there: `pd_protocol.send_kv` in the other
direction, as the in-process DisaggregatedPair runs it -- so the next turn's prefill reuses them.
An optimisation only: a failure is logged and counted, never surfaced to the (finished) request."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from jaxserve.instance.pd_common import KvFailed, KvPath
from jaxserve.instance.peer_push import push_prefix

log = logging.getLogger("jaxserve.instance")


class SendBack:
    """The decode side's PD-Caching-3 send-back: `start(request_id, tokens, target)` at a request's finish.
    Owns its background tasks and counters (kv_sent_back_*)."""

    def __init__(self, kv: KvPath, stopping: Callable[[], bool]):
        """kv: the instance's engine thread, peers and transport; stopping: whether the instance is stopping
        (no new send-back then)."""
        self.kv, self.stopping = kv, stopping
        self.engine, self.loop_thread, self.config = kv.engine, kv.loop_thread, kv.config
        self.counters = dict(kv_sent_back_tokens=0, kv_sent_back_bytes=0, kv_send_back_failures=0)
        self._tasks: set[asyncio.Task] = set()

    def start(self, request_id: str, tokens: list[int], target) -> None:
        """Event loop, at a decode request's finish: send its decode-phase KV back in the background."""
        if self.stopping():
            return
        task = asyncio.get_running_loop().create_task(self._send_back_kv(request_id, tokens, target))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    async def _send_back_kv(self, request_id: str, tokens: list[int], target) -> None:
        """Decode side, caching3: the whole pages of the finished request's computed context (every token but
        the last sampled one) that the prefill instance lacks go to it with transfer_with_insert semantics
        (peer_push.push_prefix). An optimisation only: a failure is logged and counted, never surfaced to the
        (finished) request."""
        ps = self.engine.pool.page_size
        seq = tokens[:(len(tokens) - 1) // ps * ps]
        if not seq:
            return
        name = f"prefill instance {target.instance_id or target.address}"
        try:
            _, sent, nbytes = await push_prefix(self.kv, request_id, seq, target.address, name)
            self.counters["kv_sent_back_tokens"] += sent
            self.counters["kv_sent_back_bytes"] += nbytes
        except BaseException as e:
            self.counters["kv_send_back_failures"] += 1
            if isinstance(e, Exception):
                log.warning("request %s: sending the decode-phase KV back to %s failed: %s", request_id, name,
                            e.message if isinstance(e, KvFailed) else f"{type(e).__name__}: {e}")
            else:
                raise
