"""MemPool: one instance's elastic KV-cache memory (MemServe §3), the facade the engine and instance use.

A MemPool is a PageBook (jaxserve/mempool/pagebook.py: pages, references, tiers, the prompt index and
eviction, numpy only) whose pages hold data: a KvStore (jaxserve/mempool/kv_store.py: the device and host KV
arrays and the copies between them). It adds the KV transfers between pools (jaxserve/mempool/transfer/).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax

from jaxserve.config import CacheConfig, ModelConfig
from jaxserve.mempool.kv_store import KvStore
from jaxserve.mempool.pagebook import EventListener, PageBook  # noqa: F401 (EventListener re-exported)


class MemPool(PageBook):
    """Page pool of one serving instance: PageBook bookkeeping over the KV arrays of a KvStore.

    `kv_cache`, `host_cache`, `sharding`, `dtype` and `page_shape` are the store's. `ops`: the instance's
    device-op channel, passed to the store (its tier copies are device ops)."""

    def __init__(self, model_cfg: ModelConfig, cache_cfg: CacheConfig, *,
                 sharding: jax.sharding.Sharding | None = None, dtype=None, ops=None):
        super().__init__(cache_cfg.page_size, cache_cfg.num_pages, cache_cfg.num_host_pages,
                         prefix_caching=cache_cfg.enable_prefix_caching)
        self.model_cfg = model_cfg
        self.cache_cfg = cache_cfg
        self.store = KvStore(model_cfg, cache_cfg, sharding=sharding, dtype=dtype, ops=ops)
        self._transport = None

    # ================================================================== data
    @property
    def kv_cache(self) -> jax.Array:
        return self.store.kv_cache

    @kv_cache.setter
    def kv_cache(self, value: jax.Array) -> None:
        self.store.kv_cache = value

    @property
    def host_cache(self):
        return self.store.host_cache

    @property
    def sharding(self) -> jax.sharding.Sharding | None:
        return self.store.sharding

    @property
    def dtype(self):
        return self.store.dtype

    @property
    def page_shape(self) -> tuple[int, ...]:
        return self.store.page_shape

    @property
    def kv_cache_dtype(self) -> str:
        """How pages store K/V: "auto" or an 8-bit format whose scales live inside each page's rows."""
        return self.store.kv_cache_dtype

    @property
    def page_bytes(self) -> int:
        return self.store.page_bytes

    def copy_to_host(self, pages: Sequence[int], host_pages: Sequence[int]) -> None:
        """Device pages -> host pages (one gather for all layers); a device op: on a multi-process pool every
        process copies its own shards."""
        self.store.copy_to_host(pages, host_pages)

    def copy_to_device(self, host_pages: Sequence[int], pages: Sequence[int]) -> None:
        """Host pages -> device pages (one in-place scatter); see `copy_to_host`."""
        self.store.copy_to_device(host_pages, pages)

    def check_invariants(self) -> None:
        """AssertionError describing the first broken invariant of pages, references, tiers, the tree or
        the arrays' shapes."""
        super().check_invariants()
        self.store.check()

    # ================================================================== transfer
    @property
    def transport(self):
        """This pool's in-process transport (it owns the OpCounts of the transfers this pool sends); a test may
        replace it with a wrapper that fails at a chosen stage."""
        if self._transport is None:
            from jaxserve.mempool.transfer import InProcessTransport
            self._transport = InProcessTransport()
        return self._transport

    @transport.setter
    def transport(self, value) -> None:
        self._transport = value

    def transfer(self, dst: "MemPool", src_pages: Sequence[int], dst_pages: Sequence[int], *,
                 transport=None) -> None:
        """Copies the KV of `src_pages` (held by the caller) into `dst_pages` of `dst` (held by the caller
        there), `dst` a MemPool of this process on any mesh (resharded by `device_put`): one gather for all
        layers, one move, one in-place scatter. Raises TransferError on failure; `dst_pages` stay the caller's
        to free. Pools in other processes are reached through `transfer.CrossProcessTransport`."""
        src_pages = [int(p) for p in self._check_pages(src_pages, "transfer")]
        dst_pages = [int(p) for p in dst._check_pages(dst_pages, "transfer")]
        (transport or self.transport).transfer(self, dst, src_pages, dst_pages)

    def transfer_with_insert(self, dst: "MemPool", tokens: Sequence[int], src_pages: Sequence[int], *,
                             start_page: int = 0, request_id: str = "", transport=None) -> list[int]:
        """Sends pages `start_page, start_page + 1, ...` of `tokens` (their KV in `src_pages`) to `dst`, which
        allocates pages for them, receives, and indexes `tokens` in one step (MemServe: one round trip
        fewer; the receive path is `transfer.KvReceiver`, the same as between instances). The receiver must
        already cache the first `start_page` pages (see `cached_prefix_pages`). Returns the receiver's pages
        for all of `tokens`' KV (the first `start_page` from its index), each with one reference owned by the
        caller on the receiving side. On failure raises TransferError with nothing allocated or indexed on
        the receiver."""
        src_pages = [int(p) for p in self._check_pages(src_pages, "transfer_with_insert")]
        return (transport or self.transport).transfer_with_insert(self, dst, tokens, src_pages, start_page,
                                                                  request_id)
