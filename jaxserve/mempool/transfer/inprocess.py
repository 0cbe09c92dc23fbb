"""In-process backend: source and destination pools live in this process, usually on different meshes. The
block goes through `jax.device_put` to the destination pool's sharding, which also reshards between
tensor-parallel degrees: gather, device_put, scatter -- three array operations per request whatever the
number of layers."""

from __future__ import annotations

from collections.abc import Sequence

import jax

from jaxserve.mempool.transfer.base import Transport
from jaxserve.mempool.transfer.ops import _count, check_compatible, gather_block, pool_sharding
from jaxserve.mempool.transfer.receiver import KvReceiver
from jaxserve.mempool.transfer.state import TransferError


class InProcessTransport(Transport):
    def offer(self, pool, pages: Sequence[int]) -> jax.Array:
        """Sender: one gather of `pages` for all layers, on the source pool's devices."""
        return gather_block(pool, pages, self.counts)

    def fetch(self, pool, offer: jax.Array) -> jax.Array:
        """Receiver: the block moved (and resharded) to the destination pool's sharding."""
        _count(self.counts, "device_put")
        return jax.device_put(offer, pool_sharding(pool))

    def transfer(self, src, dst, src_pages: Sequence[int], dst_pages: Sequence[int]) -> None:
        """Copies the KV of `src_pages` into `dst_pages` (both already held by the caller)."""
        if len(src_pages) != len(dst_pages):
            raise ValueError(f"{len(src_pages)} source pages but {len(dst_pages)} destination pages")
        if not src_pages:
            return
        check_compatible(src, dst)
        self.write(dst, dst_pages, self.fetch(dst, self.offer(src, src_pages)))

    def transfer_with_insert(self, src, dst, tokens: Sequence[int], src_pages: Sequence[int], start_page: int = 0,
                             request_id: str = "") -> list[int]:
        """The receiver references the first `start_page` pages of `tokens` it holds, reserves the rest,
        receives, and indexes (MemServe's transfer_with_insert). Returns the receiver's pages for all of
        `tokens`, caller-owned; on failure TransferError with nothing allocated or indexed there."""
        check_compatible(src, dst)
        receiver = KvReceiver(dst)
        r = receiver.prepare(request_id, tokens, start_page=start_page, n_pages=len(src_pages), insert=True)
        tid = r.transfer_id
        try:
            receiver.begin(tid)
            receiver.fill(tid, self.fetch(dst, self.offer(src, src_pages)), self)
            receiver.commit(tid)
        except Exception as e:
            receiver.cancel(tid)
            if isinstance(e, TransferError):
                raise
            raise TransferError(f"receive failed: {type(e).__name__}: {e}") from e
        return receiver.take(tid).pages
