"""PageBook: the page bookkeeping of one instance's elastic KV memory (MemServe §3), with no KV data and no
jax — device and host page tiers, reference counted pages, the prompt index over them, and LRU eviction of
unreferenced index leaves from device to host to nowhere.

MemPool (jaxserve/mempool/mempool.py) is a PageBook whose pages hold KV arrays (jaxserve/mempool/kv_store.py):
it overrides `copy_to_host` / `copy_to_device`, which here move nothing. The simulator and the fake instance
use a PageBook as is (through jaxserve/mempool/prefix_cache.py), so they cache and evict as real instances do.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np

from jaxserve.mempool.allocator import PageAllocator
from jaxserve.mempool.eviction import Eviction
from jaxserve.mempool.prompt_index import DEVICE, HOST, Node, PromptIndex

EventListener = Callable[[str, tuple[int, ...]], None]


class PageBook(Eviction):
    """Pages, references, tiers and the prompt index of one instance's pool.

    Ownership: every device page except page 0 is either free (refcount 0) or referenced. References are
    held by the index (at most one per page: the page is cached) and by callers (running requests), who
    get them from `alloc`, `match`, `incref` and `swap_in` and give them back with `free`. Eviction only
    touches index pages nobody else references, so a running request's pages are never freed or moved.
    Host pages work the same way; the index's host pages are never handed out (`match` swaps them in).
    """

    def __init__(self, page_size: int, num_pages: int, num_host_pages: int = 0, *, prefix_caching: bool = True):
        self.page_size = int(page_size)
        self.num_pages = int(num_pages)
        self.num_host_pages = int(num_host_pages)
        self.prefix_caching = bool(prefix_caching)
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

    # ================================================================== data (none here)
    def copy_to_host(self, pages: Sequence[int], host_pages: Sequence[int]) -> None:
        """Device pages -> host pages. A PageBook holds no data: MemPool overrides this with the copy."""

    def copy_to_device(self, host_pages: Sequence[int], pages: Sequence[int]) -> None:
        """Host pages -> device pages. A PageBook holds no data: MemPool overrides this with the copy."""

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

    def num_unreferenced_cached_pages(self) -> int:
        """Indexed device pages no request references: one vector pass over the page table (the serving loop
        reports it as load after steps; `num_evictable_pages` walks the index). Equal to `num_evictable_pages`
        except when a request computed a cached prefix again and indexed its later pages under the index's
        copy: that copy is then unreferenced but not evictable before them, so this is an upper bound."""
        return int(np.count_nonzero(self._indexed & (self.allocator.refcount == 1)))

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
        if not self.prefix_caching:
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
        if not self.prefix_caching:
            return 0
        keys = self.index.page_keys(tokens)
        n = len(keys)
        pages = list(pages)
        if len(pages) < n:
            raise ValueError(f"insert of {n} whole pages of tokens with only {len(pages)} pages")
        pages = [int(p) for p in pages[:n]]
        self._validate_insert(keys, pages)
        path, last, new_pages = self.index.insert(keys, pages)
        off, reloaded = 0, False
        for j, node in enumerate(path):
            covered = last if j == len(path) - 1 else len(node)
            if node.tier == HOST:
                reloaded = True
                if covered < len(node):
                    node = self.index.split(node, covered)
                mine = pages[off:off + covered]
                self._release_host(node.pages)
                self.index.set_tier(node, DEVICE, mine)
                self._adopt(mine)
            off += covered
        if new_pages:
            self._adopt(new_pages)
        if new_pages or reloaded:  # INSERT also says "on device": a host-tier part came back
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
        ("evict", t): nothing starting with t is cached here any more (t ends with the first dropped page);
        ("offload", t): the last page of t and every cached page extending it are now in the host tier only
        (still cached); an "insert" covering them says they are back on device (swap-in or re-insert)."""
        self._listener = fn


    def cached_prefix_pages(self, tokens: Sequence[int]) -> int:
        """How many leading whole pages of `tokens` the index holds (either tier); takes no references and
        changes nothing. What a sender asks first so it sends only what this pool lacks."""
        if not self.prefix_caching:
            return 0
        path, last = self.index.walk(self.index.page_keys(tokens))
        return sum(len(n) for n in path[:-1]) + (last if path else 0)


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
        assert self.num_evictable_pages() <= self.num_unreferenced_cached_pages(), \
            f"eviction could free {self.num_evictable_pages()} pages, more than the " \
            f"{self.num_unreferenced_cached_pages()} indexed pages no request references"
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


    def _event(self, kind: str, tokens: tuple[int, ...]) -> None:
        if self._listener is not None:
            self._events.append((kind, tokens))

    def _offload_event(self, node: Node) -> None:
        """Reports that `node` (and everything cached below it) now lives in the host tier."""
        if self._listener is not None:
            self._events.append(("offload", self.index.path_tokens(node.parent) + node.chunks[0]))

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
