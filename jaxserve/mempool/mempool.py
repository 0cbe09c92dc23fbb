"""MemPool: one instance's elastic KV-cache memory (MemServe §3) — device and host page tiers, reference
counted pages, a prompt index over them, and LRU eviction of unreferenced index leaves from device to host
to nowhere.

On a multi-process instance (its pool a global array spanning several hosts) every process keeps the host tier
of its own shards only (`host_cache` holds this process's range of the KV-head axis), and `host_copy_hook`
lets the leader send each device<->host copy to the other processes, which run the same copy on their shards
(jaxserve/engine/multihost.py); the host-side bookkeeping is the leader's.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import CacheConfig, ModelConfig
from jaxserve.mempool.allocator import PageAllocator
from jaxserve.mempool.prompt_index import DEVICE, HOST, Node, PromptIndex

EventListener = Callable[[str, tuple[int, ...]], None]


def _bucket(n: int) -> int:
    """Page counts are padded to a power of two so the gather/scatter compile O(log num_pages) times."""
    return 1 << max(0, (n - 1).bit_length())


@jax.jit
def _gather_pages(kv: jax.Array, idx: jax.Array) -> jax.Array:
    # One gather for all layers (MemServe's huge-page aggregation), laid out page-major so each page's K and
    # V for every layer are one contiguous block on the host.
    return jnp.swapaxes(kv[:, idx], 0, 1)


def _scatter_pages(kv: jax.Array, idx: jax.Array, data: jax.Array) -> jax.Array:
    return kv.at[:, idx].set(jnp.swapaxes(data, 0, 1).astype(kv.dtype))


@functools.lru_cache(maxsize=None)
def _scatter_fn(sharding: jax.sharding.Sharding | None):
    # Module-level cache: pools with the same sharding share compiled executables. The output sharding is
    # pinned to the pool's so the cache stays where the engine's jitted step expects it, and the donated
    # input can be reused in place.
    if sharding is None:
        return jax.jit(_scatter_pages, donate_argnums=0)
    return jax.jit(_scatter_pages, donate_argnums=0, out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _gather_fn(sharding: jax.sharding.Sharding):
    # Multi-process pools: the gathered pages keep the pool's head sharding, so each process reads its shards.
    return jax.jit(lambda kv, idx: jnp.swapaxes(kv[:, idx], 0, 1), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _zeros_fn(shape: tuple[int, ...], dtype: np.dtype, sharding: jax.sharding.Sharding):
    # Creating the zeros under jit with out_shardings materialises each shard on its own device instead of
    # building the whole cache on one device first.
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


def _local_heads(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> tuple[int, int]:
    """This process's range of the KV-head axis (3) of a pool sharded over several processes."""
    ranges = sorted({index[3].indices(shape[3])[:2] for index in
                     sharding.addressable_devices_indices_map(shape).values()})
    for (_, end), (start, _) in zip(ranges, ranges[1:]):
        if start != end:
            raise ValueError(f"a multi-process pool needs each process's KV heads contiguous, got {ranges}")
    for index in sharding.addressable_devices_indices_map(shape).values():
        if any(sl.indices(n)[:2] != (0, n) for axis, (sl, n) in enumerate(zip(index, shape)) if axis != 3):
            raise ValueError(f"a multi-process pool must be sharded on the KV-head axis only, got {sharding}")
    return ranges[0][0], ranges[-1][1]


class MemPool:
    """Page pool of one serving instance.

    Ownership: every device page except page 0 is either free (refcount 0) or referenced. References are
    held by the index (at most one per page: the page is cached) and by callers (running requests), who
    get them from `alloc`, `match`, `incref` and `swap_in` and give them back with `free`. Eviction only
    touches index pages nobody else references, so a running request's pages are never freed or moved.
    Host pages work the same way; the index's host pages are never handed out (`match` swaps them in).
    """

    def __init__(self, model_cfg: ModelConfig, cache_cfg: CacheConfig, *,
                 sharding: jax.sharding.Sharding | None = None, dtype=None):
        self.model_cfg = model_cfg
        self.cache_cfg = cache_cfg
        self.page_size = cache_cfg.page_size
        self.num_pages = cache_cfg.num_pages
        self.num_host_pages = cache_cfg.num_host_pages
        self.dtype = jnp.dtype(dtype if dtype is not None else model_cfg.dtype)
        self.page_shape = (model_cfg.num_layers, self.page_size, 2 * model_cfg.num_kv_heads, model_cfg.head_dim)
        self.sharding = sharding
        shape = (model_cfg.num_layers, self.num_pages) + self.page_shape[1:]
        if sharding is None:
            self.kv_cache: jax.Array = jnp.zeros(shape, self.dtype)
        else:
            self.kv_cache = _zeros_fn(shape, self.dtype, sharding)()
        # A multi-process pool's host tier holds this process's heads [lo, hi) only (see the module docstring).
        self._local_heads = None if sharding is None or sharding.is_fully_addressable else _local_heads(sharding, shape)
        host_shape = self.page_shape
        if self._local_heads is not None:
            lo, hi = self._local_heads
            host_shape = self.page_shape[:2] + (hi - lo,) + self.page_shape[3:]
        self.host_cache = np.zeros((self.num_host_pages,) + host_shape, self.dtype)
        # Set by a multi-process instance's leader: called as hook(kind, device_pages, host_pages), kind
        # "to_host" or "to_device", before each copy between the tiers.
        self.host_copy_hook: Callable[[str, list[int], list[int]], None] | None = None
        self._scatter_jit = _scatter_fn(sharding)

        self.allocator = PageAllocator(self.num_pages, reserved=(0,))
        self.host_allocator = PageAllocator(self.num_host_pages, reserved=())
        self.index = PromptIndex(self.page_size)
        # Which pages the index holds a reference to, so misuse (freeing the index's reference, indexing a
        # page twice) is caught at the call instead of corrupting the cache later.
        self._indexed = np.zeros(self.num_pages, bool)
        self._host_indexed = np.zeros(self.num_host_pages, bool)
        self._outside_refs = 0       # device references held by callers, all pages together
        self._outside_host_refs = 0  # host pages held by callers (from swap_out)
        self._pinned_host_pages = 0
        # Offloads decided during one eviction pass, copied to host together in one gather at its end.
        self._pending: list[tuple[list[int], list[int], Node]] = []
        self._listener: EventListener | None = None
        self._events: list[tuple[str, tuple[int, ...]]] = []
        self._counters = dict(hit_tokens=0, query_tokens=0, evicted_pages=0, dropped_pages=0,
                              dropped_host_pages=0, deleted_pages=0, swapped_out_pages=0, swapped_in_pages=0)

    # ================================================================== memory
    def alloc(self, n: int) -> list[int] | None:
        """`n` device pages with refcount 1 each, evicting unreferenced index leaves (LRU first) when the
        free list is short; None, with nothing allocated or evicted, if `n` pages cannot be had."""
        pages = self._take(int(n))
        if pages is not None:
            self._outside_refs += len(pages)
        self._emit()
        return pages

    def free(self, pages: Sequence[int]) -> None:
        """Drops one caller reference per listed page; a page returns to the free list at refcount 0."""
        idx = self._check_pages(pages, "free")
        if idx.size == 0:
            return
        uniq, counts = np.unique(idx, return_counts=True)
        short = counts > self.allocator.refcount[uniq] - self._indexed[uniq]
        if np.any(short):
            raise ValueError(f"double free: pages {uniq[short].tolist()} would lose references they do not hold "
                             f"(refcounts {self.allocator.refcount[uniq[short]].tolist()}, the index's included)")
        self.allocator.free(idx)
        self._outside_refs -= int(idx.size)

    def incref(self, pages: Sequence[int]) -> None:
        idx = self._check_pages(pages, "incref")
        self.allocator.incref(idx)
        self._outside_refs += int(idx.size)

    def swap_out(self, pages: Sequence[int]) -> list[int]:
        """Copies device pages to newly allocated host pages (one gather for all layers) and returns their
        ids, owned by the caller. The device pages are untouched (the caller still holds and frees them).
        Unreferenced host-tier index leaves are dropped LRU-first for room; raises MemoryError if the host
        tier still cannot hold them."""
        idx = self._check_pages(pages, "swap_out")
        if idx.size and np.any(self.allocator.refcount[idx] <= 0):
            raise ValueError(f"swap_out of unallocated pages: {idx[self.allocator.refcount[idx] <= 0].tolist()}")
        if idx.size == 0:
            return []
        host = self._host_take(int(idx.size))
        if host is None:
            self._emit()
            raise MemoryError(f"host tier cannot hold {idx.size} pages ({self.host_allocator.num_free} free)")
        self.copy_to_host(idx.tolist(), host)
        self._outside_host_refs += len(host)
        self._counters["swapped_out_pages"] += len(host)
        self._emit()
        return host

    def swap_in(self, host_pages: Sequence[int]) -> list[int] | None:
        """Copies host pages back into newly allocated device pages (refcount 1, owned by the caller) with one
        in-place scatter. On success the caller's host pages are released (this is how swapped-out pages go
        back to the host free list); on None (device pages cannot be had) nothing changed."""
        hidx = self._check_host_pages(host_pages, "swap_in")
        if hidx.size == 0:
            return []
        dev = self._take(int(hidx.size))
        if dev is None:
            self._emit()
            return None
        self.copy_to_device([int(h) for h in hidx], dev)
        self.host_allocator.free(hidx)
        self._outside_host_refs -= int(hidx.size)
        self._outside_refs += len(dev)
        self._counters["swapped_in_pages"] += len(dev)
        self._emit()
        return dev

    def free_host(self, host_pages: Sequence[int]) -> None:
        """Releases host pages from `swap_out` without swapping them in (e.g. an aborted preempted request)."""
        hidx = self._check_host_pages(host_pages, "free_host")
        self.host_allocator.free(hidx)
        self._outside_host_refs -= int(hidx.size)

    def num_free_pages(self) -> int:
        return self.allocator.num_free

    def num_evictable_pages(self) -> int:
        """Device pages eviction could free now. O(device index nodes)."""
        return self._evictable()

    def can_alloc(self, n: int) -> bool:
        """Whether `alloc(n)` would succeed. O(1) when the free list suffices, else O(device index nodes)."""
        short = int(n) - self.allocator.num_free
        return short <= 0 or self._evictable(stop_at=short) >= short

    def refcount(self, page: int) -> int:
        return int(self.allocator.refcount[page])

    # ================================================================== index
    def match(self, tokens: Sequence[int]) -> tuple[int, list[int]]:
        """Longest cached whole-page prefix of `tokens`: (n_cached_tokens, device pages), with
        n_cached_tokens == len(pages) * page_size.

        Parts cached on the host tier are swapped in first (one scatter); if device pages cannot be had for
        all of them, the match ends where the budget ends. Each returned page carries one reference owned by
        the caller (give it back with `free`). The whole prompt may match: a caller that needs logits keeps
        at least one token to compute, e.g. by matching `tokens[:-1]`. Costs O(len(tokens)) (plus
        O(device index nodes) when a swap-in needs eviction).
        """
        self._counters["query_tokens"] += len(tokens)
        if not self.cache_cfg.enable_prefix_caching:
            return 0, []
        keys = self.index.page_keys(tokens)
        path, last = self.index.match_prefix(keys)
        pages: list[int] = []
        first_host = len(path)
        for i, node in enumerate(path):
            if node.tier != DEVICE:
                first_host = i
                break
            pages.extend(node.pages[:last] if i == len(path) - 1 else node.pages)
        # Referenced before anything is allocated, so a swap-in's eviction cannot take them.
        self.allocator.incref(pages)
        self._outside_refs += len(pages)
        if first_host < len(path):
            pages.extend(self._swap_in_path(path[first_host:], last))
        n_tokens = len(pages) * self.page_size
        self._counters["hit_tokens"] += n_tokens
        self._emit()
        return n_tokens, pages

    def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> int:
        """Indexes the whole pages of `tokens`, `pages[i]` holding page i (only the first
        len(tokens) // page_size pages are used). Where a prefix is already indexed on device the tree keeps
        its own pages; where it is only on the host tier the caller's pages replace the host copy (they hold
        the same KV and save a later swap-in). Every page the index takes gets one reference owned by the
        index; the caller keeps its own references. Returns the number of tokens newly indexed."""
        if not self.cache_cfg.enable_prefix_caching:
            return 0
        keys = self.index.page_keys(tokens)
        n = len(keys)
        pages = list(pages)
        if len(pages) < n:
            raise ValueError(f"insert of {n} whole pages of tokens with only {len(pages)} pages")
        pages = [int(p) for p in pages[:n]]
        self._validate_insert(keys, pages)
        path, last, new_pages = self.index.insert(keys, pages)
        off = 0
        for j, node in enumerate(path):
            covered = last if j == len(path) - 1 else len(node)
            if node.tier == HOST:
                if covered < len(node):
                    node = self.index.split(node, covered)
                mine = pages[off:off + covered]
                self._release_host(node.pages)
                self.index.set_tier(node, DEVICE, mine)
                self._adopt(mine)
            off += covered
        if new_pages:
            self._adopt(new_pages)
            self._event("insert", tuple(itertools.chain.from_iterable(keys)))
        self._emit()
        return len(new_pages) * self.page_size

    def delete(self, tokens: Sequence[int]) -> int:
        """Removes this sequence's unshared cached suffix (from the end of its cached path up to the nearest
        branch point), on either tier, sparing pages still referenced by callers and everything before them.
        Nothing is removed if a longer cached sequence extends it. Returns the number of tokens removed."""
        keys = self.index.page_keys(tokens)
        removed = self.index.delete(keys, self._keep)
        if not removed:
            return 0
        self._evict_event(removed[-1])
        n = 0
        for node in removed:
            self._release(node)
            n += len(node)
        self._counters["deleted_pages"] += n
        self._emit()
        return n * self.page_size

    def evict(self, n_pages: int) -> int:
        """Frees up to `n_pages` device pages from unreferenced index leaves, least recently used first
        (moved to the host tier when it has room, else dropped). Returns how many were freed."""
        freed = self._evict(int(n_pages))
        self._emit()
        return freed

    def set_event_listener(self, fn: EventListener | None) -> None:
        """`fn(kind, tokens_prefix)` after index changes, for the global scheduler's prompt trees:
        ("insert", t): every whole-page prefix of t is now cached here;
        ("evict", t): nothing starting with t is cached here any more (t ends with the first dropped page).
        Moving between device and host tiers is not reported: the prefix stays cached."""
        self._listener = fn

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
            return dst.receive_with_insert(
                tokens, start_page, len(src_pages), lambda pages: tr.local_transfer(self, dst, src_pages, pages))
        return dst.push(self, src_pages, tokens=tokens, start_page=start_page, request_id=request_id,
                        timeout=timeout)

    def cached_prefix_pages(self, tokens: Sequence[int]) -> int:
        """How many leading whole pages of `tokens` the index holds (either tier); takes no references and
        changes nothing. What a sender asks first so it sends only what this pool lacks."""
        if not self.cache_cfg.enable_prefix_caching:
            return 0
        path, last = self.index.walk(self.index.page_keys(tokens))
        return sum(len(n) for n in path[:-1]) + (last if path else 0)

    def receive_with_insert(self, tokens: Sequence[int], start_page: int, n_pages: int,
                            fill: Callable[[list[int]], None]) -> list[int]:
        """Receive side of `transfer_with_insert`: takes references to the cached first `start_page` pages of
        `tokens`, allocates `n_pages` more, lets `fill(new_pages)` write them, then indexes the whole pages
        of `tokens` (a trailing partial page is received but not indexed). Returns all pages, caller-owned.
        If anything fails, every reference taken here is dropped before TransferError is raised, and
        nothing half-received was indexed."""
        from jaxserve.mempool.transfer import TransferError, _maybe_fail
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
            _maybe_fail("insert")
        except Exception as e:
            self.free(prefix + new)
            if isinstance(e, TransferError):
                raise
            raise TransferError(f"receive failed: {type(e).__name__}: {e}") from e
        self.insert(tokens, prefix + new)
        return prefix + new

    # ================================================================== reporting
    def stats(self) -> dict:
        free = self.allocator.num_free
        cached = self.index.num_pages[DEVICE]
        q = self._counters["query_tokens"]
        return dict(
            free_pages=free,
            used_pages=self.allocator.num_used,
            cached_pages=cached,
            total_pages=self.allocator.num_usable,
            host_pages=self.num_host_pages,
            host_used_pages=self.host_allocator.num_used,
            host_cached_pages=self.index.num_pages[HOST],
            index_nodes=self.index.num_nodes,
            hit_rate=self._counters["hit_tokens"] / q if q else 0.0,
            **self._counters,
        )

    def check_invariants(self) -> None:
        """AssertionError describing the first broken invariant of pages, references, tiers or the tree."""
        self.allocator.check()
        self.host_allocator.check()
        self.index.check(quiescent=True)
        assert not self._pending, f"offloads left uncopied: {self._pending}"
        assert self._pinned_host_pages == 0, f"{self._pinned_host_pages} host pages left pinned"
        rc, hrc = self.allocator.refcount, self.host_allocator.refcount
        dev, host = [], []
        for node in self.index.iter_nodes():
            (dev if node.tier == DEVICE else host).extend(node.pages)
        assert len(set(dev)) == len(dev), f"a device page is indexed twice: {sorted(dev)}"
        assert len(set(host)) == len(host), f"a host page is indexed twice: {sorted(host)}"
        assert 0 not in dev, "reserved page 0 is indexed"
        mask = np.zeros(self.num_pages, bool)
        mask[dev] = True
        assert np.array_equal(mask, self._indexed), \
            f"index page set {sorted(dev)} != recorded {np.nonzero(self._indexed)[0].tolist()}"
        hmask = np.zeros(self.num_host_pages, bool)
        hmask[host] = True
        assert np.array_equal(hmask, self._host_indexed), \
            f"host index page set {sorted(host)} != recorded {np.nonzero(self._host_indexed)[0].tolist()}"
        if dev:
            bad = [p for p in dev if rc[p] < 1]
            assert not bad, f"indexed pages {bad} are free"
        if host:
            bad = [h for h in host if hrc[h] != 1]
            assert not bad, f"indexed host pages {bad} have refcounts {[int(hrc[h]) for h in bad]}, want 1"
        assert int(rc.sum()) == len(dev) + self._outside_refs, \
            f"device refcounts sum to {int(rc.sum())} but index holds {len(dev)} and callers {self._outside_refs}"
        assert self._outside_refs >= 0 and self._outside_host_refs >= 0
        assert int(hrc.sum()) == len(host) + self._outside_host_refs, \
            f"host refcounts sum to {int(hrc.sum())} but index holds {len(host)} and callers {self._outside_host_refs}"
        assert self.kv_cache.shape == (self.page_shape[0], self.num_pages) + self.page_shape[1:], self.kv_cache.shape

    # ================================================================== internals: memory
    def _check_pages(self, pages: Sequence[int], op: str) -> np.ndarray:
        idx = np.asarray(list(pages) if not isinstance(pages, np.ndarray) else pages, np.int64).reshape(-1)
        if idx.size and (idx.min() < 1 or idx.max() >= self.num_pages):
            raise ValueError(f"{op}: page ids must be in [1, {self.num_pages}) (page 0 is reserved): {idx.tolist()}")
        return idx

    def _check_host_pages(self, host_pages: Sequence[int], op: str) -> np.ndarray:
        hidx = np.asarray(list(host_pages), np.int64).reshape(-1)
        if hidx.size == 0:
            return hidx
        if hidx.min() < 0 or hidx.max() >= self.num_host_pages:
            raise ValueError(f"{op}: host page ids must be in [0, {self.num_host_pages}): {hidx.tolist()}")
        if len(set(hidx.tolist())) != hidx.size:
            raise ValueError(f"{op}: repeated host pages {hidx.tolist()}")
        if np.any(self._host_indexed[hidx]) or np.any(self.host_allocator.refcount[hidx] < 1):
            raise ValueError(f"{op}: host pages {hidx.tolist()} are not held by the caller")
        return hidx

    def _take(self, n: int) -> list[int] | None:
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        short = n - self.allocator.num_free
        if short > 0:
            # Decide before touching anything, so a failed allocation has no side effects.
            if self._evictable(stop_at=short) < short:
                return None
            self._evict(short)
        pages = self.allocator.alloc(n)
        assert pages is not None, "eviction freed fewer pages than it promised"
        return pages

    def _unref_tail(self, node: Node) -> int:
        """How many trailing pages of a device node only the index references."""
        r = self.allocator.refcount[node.pages]
        held = np.flatnonzero(r != 1)
        return len(node.pages) - (int(held[-1]) + 1 if held.size else 0)

    def _keep(self, node: Node) -> int:
        if node.tier == HOST:
            return len(node) if node.pin else 0
        return len(node) - self._unref_tail(node)

    def _evictable(self, stop_at: int | None = None) -> int:
        """Device pages that repeated LRU-leaf eviction could free: a page qualifies when it and every device
        page after it (later in its node, and in its device subtree) are referenced by the index alone.
        One post-order pass over device nodes; returns early once `stop_at` is reached."""
        total = 0
        root = self.index.root

        def device_children(node: Node):
            return iter([c for c in node.children.values() if c.tier == DEVICE])

        stack = [[root, device_children(root), True]]  # node, children left, subtree clean so far
        while stack:
            frame = stack[-1]
            child = next(frame[1], None)
            if child is not None:
                stack.append([child, device_children(child), True])
                continue
            stack.pop()
            node, clean = frame[0], frame[2]
            if node is root:
                break
            if clean:
                k = self._unref_tail(node)
                total += k
                clean = k == len(node)
            if not clean:
                stack[-1][2] = False
            if stop_at is not None and total >= stop_at:
                return total
        return total

    def _evict(self, n: int) -> int:
        """LRU device leaves lose unreferenced pages from their tail until `n` pages are freed.

        Cost: O(log nodes) amortised heap work per visited leaf, plus O(pages) for the copies; a leaf whose
        tail is still referenced is set aside and re-queued afterwards."""
        freed, skipped = 0, []
        while freed < n:
            node = self.index.pop_lru(DEVICE)
            if node is None:
                break
            k = self._unref_tail(node)
            if k == 0:
                skipped.append(node)
                continue
            k = min(k, n - freed)
            if k < len(node):
                self.index.split(node, len(node) - k)  # `node` keeps the k-page tail
            freed += self._offload_or_drop(node)
        self._flush_offloads()
        for node in skipped:
            self.index.note(node)
        return freed

    def _offload_or_drop(self, node: Node) -> int:
        dev = node.pages
        host = self._host_take(len(dev)) if self.num_host_pages else None
        if host is None:
            self._drop(node)
            return len(dev)
        # The copy is deferred to one gather at the end of the pass; the pin keeps the host pages from
        # being recycled for a later victim before the data has arrived.
        self._pending.append((dev, host, node))
        node.pin += 1
        self._pinned_host_pages += len(host)
        self._host_indexed[host] = True
        self.index.set_tier(node, HOST, host)
        self._indexed[dev] = False
        self.allocator.free(dev)
        self._counters["evicted_pages"] += len(dev)
        self._counters["swapped_out_pages"] += len(dev)
        return len(dev)

    def _flush_offloads(self) -> None:
        if not self._pending:
            return
        dev = [p for ds, _, _ in self._pending for p in ds]
        host = [h for _, hs, _ in self._pending for h in hs]
        # The freed device pages cannot have been reused yet: nothing allocates during an eviction pass.
        self.copy_to_host(dev, host)
        for _, h, node in self._pending:
            node.pin -= 1
            self._pinned_host_pages -= len(h)
            self.index.note(node)
        self._pending.clear()

    def _host_take(self, n: int) -> list[int] | None:
        """`n` host pages, dropping LRU host leaves (tail pages first) for room; None if impossible."""
        ha = self.host_allocator
        short = n - ha.num_free
        if short > 0:
            # Every unpinned host page of the index can be dropped: pinned nodes only have pinned or device
            # ancestors, so no unpinned host node is stuck above a pinned one.
            if self.index.num_pages[HOST] - self._pinned_host_pages < short:
                return None
            skipped = []
            while ha.num_free < n:
                node = self.index.pop_lru(HOST)
                assert node is not None, "host tier ran out of droppable leaves"
                if node.pin:
                    skipped.append(node)
                    continue
                k = min(len(node), n - ha.num_free)
                if k < len(node):
                    self.index.split(node, len(node) - k)
                self._drop(node)
            for node in skipped:
                self.index.note(node)
        return ha.alloc(n)

    def _drop(self, node: Node) -> None:
        """Forgets `node` and its (host) subtree, freeing their pages on both tiers."""
        if node.children and self._pending:
            self._flush_offloads()  # pending offloads below may be dropped with it
        self._evict_event(node)
        order = []
        stack = [node]
        while stack:
            cur = stack.pop()
            order.append(cur)
            stack.extend(cur.children.values())
        for cur in reversed(order):  # children before parents
            assert cur.pin == 0, f"dropping pinned node {cur}"
            key = "dropped_pages" if cur.tier == DEVICE else "dropped_host_pages"
            self._counters[key] += len(cur)
            if cur.tier == DEVICE:
                self._counters["evicted_pages"] += len(cur)
            self.index.remove(cur)
            self._release(cur)

    def _release(self, node: Node) -> None:
        """Gives back the index's reference to a removed node's pages."""
        if node.tier == DEVICE:
            self._indexed[node.pages] = False
            self.allocator.free(node.pages)
        else:
            self._release_host(node.pages)

    def _release_host(self, host: list[int]) -> None:
        self._host_indexed[host] = False
        self.host_allocator.free(host)

    def _adopt(self, pages: list[int]) -> None:
        """The index takes a reference to caller pages it now holds."""
        self.allocator.incref(pages)
        self._indexed[pages] = True

    def copy_to_host(self, pages: Sequence[int], host_pages: Sequence[int]) -> None:
        """Device pages -> host pages (one gather for all layers); on a multi-process pool, this process's
        shards only (a follower replays the leader's copies through this)."""
        pages, host_pages = [int(p) for p in pages], [int(h) for h in host_pages]
        if self.host_copy_hook is not None:
            self.host_copy_hook("to_host", pages, host_pages)
        self.host_cache[host_pages] = self._gather(pages)

    def copy_to_device(self, host_pages: Sequence[int], pages: Sequence[int]) -> None:
        """Host pages -> device pages (one in-place scatter); see `copy_to_host`."""
        pages, host_pages = [int(p) for p in pages], [int(h) for h in host_pages]
        if self.host_copy_hook is not None:
            self.host_copy_hook("to_device", pages, host_pages)
        self._scatter(pages, self.host_cache[host_pages])

    def _gather(self, pages: list[int]) -> np.ndarray:
        n = len(pages)
        idx = np.zeros(_bucket(n), np.int32)  # padding reads page 0, which is never indexed
        idx[:n] = pages
        if self._local_heads is None:
            return np.asarray(_gather_pages(self.kv_cache, idx))[:n]
        out = _gather_fn(self.sharding)(self.kv_cache, idx)
        parts = {}
        for shard in out.addressable_shards:  # replicas of a range: any one
            parts.setdefault(shard.index[3].indices(out.shape[3])[0], shard.data)
        return np.concatenate([np.asarray(parts[k]) for k in sorted(parts)], axis=3)[:n]

    def _scatter(self, pages: list[int], data: np.ndarray) -> None:
        n = len(pages)
        b = _bucket(n)
        idx = np.zeros(b, np.int32)  # padding writes land in page 0, the padding sink
        idx[:n] = pages
        buf = np.zeros((b,) + data.shape[1:], self.dtype)
        buf[:n] = data
        if self._local_heads is not None:  # this process's shards of the global buffer, straight to their devices
            shape = (b,) + self.page_shape
            lo = self._local_heads[0]
            arrays = [jax.device_put(buf[:, :, :, index[3].indices(shape[3])[0] - lo:
                                         index[3].indices(shape[3])[1] - lo], device)
                      for device, index in self.sharding.addressable_devices_indices_map(shape).items()]
            buf = jax.make_array_from_single_device_arrays(shape, self.sharding, arrays)
        self.kv_cache = self._scatter_jit(self.kv_cache, idx, buf)

    # ================================================================== internals: index
    def _validate_insert(self, keys, pages: list[int]) -> None:
        """Pages the index would take must be held by the caller and not indexed already."""
        path, last = self.index.walk(keys)
        taken, off = [], 0
        for j, node in enumerate(path):
            covered = last if j == len(path) - 1 else len(node)
            if node.tier == HOST:
                taken.extend(pages[off:off + covered])
            off += covered
        taken.extend(pages[off:])
        if not taken:
            return
        idx = self._check_pages(taken, "insert")
        if len(set(taken)) != len(taken):
            raise ValueError(f"insert: the same page appears twice among {taken}")
        if np.any(self.allocator.refcount[idx] < 1):
            raise ValueError(f"insert: pages {idx[self.allocator.refcount[idx] < 1].tolist()} are not allocated")
        if np.any(self._indexed[idx]):
            raise ValueError(f"insert: pages {idx[self._indexed[idx]].tolist()} already hold another cached prefix")

    def _swap_in_path(self, nodes: list[Node], last: int) -> list[int]:
        """Brings the matched host part of a path to device, as far as device pages can be had."""
        if last < len(nodes[-1]):
            nodes[-1] = self.index.split(nodes[-1], last)
        want = sum(len(node) for node in nodes)
        budget = self.allocator.num_free
        if budget < want:
            budget += self._evictable(stop_at=want - budget)
        kept, left = [], min(budget, want)
        for node in nodes:
            if left == 0:
                break
            if len(node) > left:
                node = self.index.split(node, left)
            kept.append(node)
            left -= len(node)
        if not kept:
            return []
        for node in kept:
            node.pin += 1
            self._pinned_host_pages += len(node)
        n = sum(len(node) for node in kept)
        dev = self._take(n)
        assert dev is not None, "swap-in budget was wrong"
        host = [h for node in kept for h in node.pages]
        self.copy_to_device(host, dev)
        off = 0
        for node in kept:
            node.pin -= 1
            self._pinned_host_pages -= len(node)
            mine = dev[off:off + len(node)]
            off += len(node)
            self._release_host(node.pages)
            self.index.set_tier(node, DEVICE, mine)
            self._indexed[mine] = True  # alloc's reference becomes the index's
        self.allocator.incref(dev)
        self._outside_refs += n
        self._counters["swapped_in_pages"] += n
        return dev

    def _event(self, kind: str, tokens: tuple[int, ...]) -> None:
        if self._listener is not None:
            self._events.append((kind, tokens))

    def _evict_event(self, node: Node) -> None:
        """Reports that nothing from `node`'s first page on is cached (its parent must still be in the tree)."""
        if self._listener is not None:  # naming the prefix costs O(depth): only when someone listens
            self._events.append(("evict", self.index.path_tokens(node.parent) + node.chunks[0]))

    def _emit(self) -> None:
        # Delivered after each public call returns the pool to a consistent state, so a listener may call
        # back into the pool.
        if not self._events:
            return
        events, self._events = self._events, []
        if self._listener is not None:
            for kind, tokens in events:
                self._listener(kind, tokens)
