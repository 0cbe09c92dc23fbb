"""Page allocator: a free list plus per-page reference counts (nano-vllm's block manager, minus hashing).

Used for both tiers of a MemPool: device pages (page 0 reserved as the padding sink) and host pages.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import numpy as np


class PageAllocator:
    """Hands out page ids with refcount 1; a page goes back to the free list when its count reaches 0.

    Every method validates its whole argument before changing anything, so a call that raises leaves the
    allocator as it was.
    """

    def __init__(self, num_pages: int, reserved: Iterable[int] = (0,)):
        self.num_pages = int(num_pages)
        self.reserved = frozenset(int(p) for p in reserved)
        for p in self.reserved:
            if not 0 <= p < self.num_pages:
                raise ValueError(f"reserved page {p} out of range [0, {self.num_pages})")
        self.refcount = np.zeros(self.num_pages, np.int32)
        # FIFO reuse: a freed page is handed out again as late as possible, which makes use-after-free bugs
        # in callers show up as wrong content rather than hide behind a lucky immediate reuse.
        self._free: deque[int] = deque(p for p in range(self.num_pages) if p not in self.reserved)

    # ------------------------------------------------------------------ queries
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_usable(self) -> int:
        return self.num_pages - len(self.reserved)

    @property
    def num_used(self) -> int:
        return self.num_usable - len(self._free)

    def free_pages(self) -> list[int]:
        return list(self._free)

    # ------------------------------------------------------------------ updates
    def alloc(self, n: int) -> list[int] | None:
        """`n` pages with refcount 1, or None (allocating nothing) if fewer than `n` are free."""
        n = int(n)
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > len(self._free):
            return None
        pages = [self._free.popleft() for _ in range(n)]
        if pages:
            self.refcount[pages] = 1
        return pages

    def incref(self, pages: Iterable[int]) -> None:
        idx = self._as_index(pages)
        if idx.size == 0:
            return
        if np.any(self.refcount[idx] <= 0):
            bad = sorted({int(p) for p in idx if self.refcount[p] <= 0})
            raise ValueError(f"incref of pages that are not allocated: {bad}")
        np.add.at(self.refcount, idx, 1)

    def free(self, pages: Iterable[int]) -> list[int]:
        """Drops one reference per listed page (a page listed twice drops two); returns the pages now free."""
        idx = self._as_index(pages)
        if idx.size == 0:
            return []
        uniq, counts = np.unique(idx, return_counts=True)
        short = counts > self.refcount[uniq]
        if np.any(short):
            raise ValueError(f"double free: pages {uniq[short].tolist()} have fewer references than frees "
                             f"(refcounts {self.refcount[uniq[short]].tolist()})")
        self.refcount[uniq] -= counts.astype(np.int32)
        released = uniq[self.refcount[uniq] == 0].tolist()
        self._free.extend(released)
        return released

    def _as_index(self, pages: Iterable[int]) -> np.ndarray:
        idx = np.asarray(list(pages) if not isinstance(pages, np.ndarray) else pages, dtype=np.int64).reshape(-1)
        if idx.size:
            if idx.min() < 0 or idx.max() >= self.num_pages:
                raise ValueError(f"page ids out of range [0, {self.num_pages}): {idx.tolist()}")
            if self.reserved and any(int(p) in self.reserved for p in idx):
                raise ValueError(f"reserved pages {sorted(self.reserved)} cannot be freed or referenced: "
                                 f"{idx.tolist()}")
        return idx

    # ------------------------------------------------------------------ checking
    def check(self) -> None:
        """AssertionError on any broken invariant: each usable page is exactly one of free / referenced."""
        free = list(self._free)
        assert len(set(free)) == len(free), f"free list has duplicates: {free}"
        free_set = set(free)
        assert not (free_set & self.reserved), f"reserved pages on the free list: {free_set & self.reserved}"
        assert np.all(self.refcount >= 0), f"negative refcounts at {np.nonzero(self.refcount < 0)[0].tolist()}"
        for p in self.reserved:
            assert self.refcount[p] == 0, f"reserved page {p} has refcount {self.refcount[p]}"
        free_mask = np.zeros(self.num_pages, bool)
        free_mask[free] = True
        reserved_mask = np.zeros(self.num_pages, bool)
        reserved_mask[list(self.reserved)] = True
        in_use = self.refcount > 0
        both = np.nonzero(in_use & free_mask)[0]
        assert both.size == 0, f"pages both free and referenced: {both.tolist()}"
        lost = np.nonzero(~(in_use | free_mask | reserved_mask))[0]
        assert lost.size == 0, f"pages neither free nor referenced (leaked from the free list): {lost.tolist()}"
