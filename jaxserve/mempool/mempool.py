"""MemPool: one instance's elastic KV-cache memory (MemServe §3), the facade the engine and instance use.

A MemPool is a PageBook (jaxserve/mempool/pagebook.py: pages, references, tiers, the prompt index and
eviction, numpy only) whose pages hold data: a KvStore (jaxserve/mempool/kv_store.py: the device and host KV
arrays and the copies between them). It adds the KV transfers between pools (jaxserve/mempool/transfer.py).
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
    def transfer(self, dst, src_pages: Sequence[int], dst_pages: Sequence[int], *,
                 timeout: float | None = None, request_id: str = "") -> None:
        """Copies the KV of `src_pages` (held by the caller) into `dst_pages` of `dst` (held by the
        caller there): one gather for all layers, one move, one in-place scatter. `dst` is a MemPool of this
        process (any mesh; resharded by `device_put`) or a `transfer.RemotePool`. Raises TransferError on
        failure; `dst_pages` stay the caller's to free."""
        from jaxserve.mempool import transfer as tr
        src_pages = [int(p) for p in self._check_pages(src_pages, "transfer")]
        if isinstance(dst, MemPool):
            dst_pages = [int(p) for p in dst._check_pages(dst_pages, "transfer")]
            tr.local_transfer(self, dst, src_pages, dst_pages)
        else:
            dst.push(self, src_pages, dst_pages=dst_pages, request_id=request_id, timeout=timeout)

    def transfer_with_insert(self, dst, tokens: Sequence[int], src_pages: Sequence[int], *, start_page: int = 0,
                             timeout: float | None = None, request_id: str = "") -> list[int]:
        """Sends pages `start_page, start_page + 1, ...` of `tokens` (their KV in `src_pages`) to `dst`, which
        allocates pages for them, receives, and indexes `tokens` in one step (MemServe: one round trip
        fewer). The receiver must already cache the first `start_page` pages (see `cached_prefix_pages`).
        Returns the receiver's pages for all of `tokens`' KV (the first `start_page` from its index), each
        with one reference owned by the caller on the receiving side. On failure raises TransferError with
        nothing allocated or indexed on the receiver."""
        from jaxserve.mempool import transfer as tr
        src_pages = [int(p) for p in self._check_pages(src_pages, "transfer_with_insert")]
        if isinstance(dst, MemPool):
            fill = tr.insert_fill(lambda pages: tr.local_transfer(self, dst, src_pages, pages))
            return dst.receive_with_insert(tokens, start_page, len(src_pages), fill)
        return dst.push(self, src_pages, tokens=tokens, start_page=start_page, request_id=request_id,
                        timeout=timeout)

    def receive_with_insert(self, tokens: Sequence[int], start_page: int, n_pages: int,
                            fill: Callable[[list[int]], None]) -> list[int]:
        """Receive side of `transfer_with_insert`: takes references to the cached first `start_page` pages of
        `tokens`, allocates `n_pages` more, lets `fill(new_pages)` write them, then indexes the whole pages
        of `tokens` (a trailing partial page is received but not indexed). Returns all pages, caller-owned.
        If anything fails, every reference taken here is dropped before TransferError is raised, and
        nothing half-received was indexed."""
        from jaxserve.mempool.transfer import TransferError
        tokens = [int(t) for t in tokens]
        ps = self.page_size
        if not (start_page + n_pages - 1) * ps < len(tokens) <= (start_page + n_pages) * ps:
            raise ValueError(f"{len(tokens)} tokens do not fill pages {start_page}..{start_page + n_pages - 1}")
        prefix: list[int] = []
        if start_page:
            got, prefix = self.match(tokens[:start_page * ps])
            if got < start_page * ps:
                self.free(prefix)
                raise TransferError(f"receiver holds {got // ps} of the {start_page} pages the sender skipped")
        new = self.alloc(n_pages)
        if new is None:
            self.free(prefix)
            raise TransferError(f"receiver cannot allocate {n_pages} pages ({self.num_free_pages()} free)")
        try:
            fill(new)
        except Exception as e:
            self.free(prefix + new)
            if isinstance(e, TransferError):
                raise
            raise TransferError(f"receive failed: {type(e).__name__}: {e}") from e
        self.insert(tokens, prefix + new)
        return prefix + new
