"""PrefixCache: a prompt cache of bounded size with no KV data, for the cluster simulator and the fake
instance. It is a PageBook (the real allocator, prompt index and LRU eviction, numpy only) driven the way an
engine drives its MemPool: match a prefix, allocate pages for the rest, index them, give the references
back. So it caches and evicts exactly as a real instance's index does (least recently used leaves first,
tail pages first), and reports the same "insert" / "evict" events to the scheduler's prompt trees.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from jaxserve.mempool.pagebook import PageBook
from jaxserve.mempool.prompt_index import DEVICE


class PrefixCache:
    """Whole-page prefixes of token sequences, at most `capacity_pages` pages. `on_event(kind, tokens)` as in
    `PageBook.set_event_listener`: ("insert", t) every whole-page prefix of t is cached (on device); ("evict",
    t) nothing starting with t is cached any more; ("offload", t) from t's last page on it is in the host tier."""

    def __init__(self, page_size: int, capacity_pages: int,
                 on_event: Callable[[str, tuple[int, ...]], None] | None = None, host_pages: int = 0):
        self.page_size = int(page_size)
        self.capacity = int(capacity_pages)
        # host_pages: a host tier that evicted prefixes move to (PageBook semantics)
        self.book = PageBook(self.page_size, self.capacity + 1, int(host_pages))  # + page 0, reserved
        self.book.set_event_listener(on_event)

    def __len__(self) -> int:
        """Pages cached."""
        return self.book.index.num_pages[DEVICE]

    def match(self, tokens: Sequence[int], device_only: bool = False) -> int:
        """Tokens of the longest cached whole-page prefix of `tokens` (marked as just used); holds nothing.
        A host-tier part is swapped in, or with device_only left out (the caller recomputes it)."""
        if device_only:
            tokens = tokens[:self.tiers(tokens)[1]]
        n, pages = self.book.match(tokens)
        self.book.free(pages)
        return n

    def tiers(self, tokens: Sequence[int]) -> tuple[int, int]:
        """(tokens of the longest cached whole-page prefix on either tier, of that on device); changes
        nothing. The device part is a prefix (host copies hang below device ones)."""
        index = self.book.index
        path, last = index.walk(index.page_keys(tokens))
        total = device = 0
        for j, node in enumerate(path):
            n = (last if j == len(path) - 1 else len(node)) * self.page_size
            total += n
            if node.tier == DEVICE and device == total - n:
                device = total
        return total, device

    def insert(self, tokens: Sequence[int]) -> int:
        """Caches the whole pages of `tokens`, evicting least recently used leaves for room (never the prefix
        itself); a sequence longer than the capacity is cached as far as it fits. Returns the pages added."""
        book, ps = self.book, self.page_size
        n_pages = len(tokens) // ps
        _, held = book.match(tokens[:n_pages * ps])  # referenced, so the eviction below spares them
        want = n_pages - len(held)
        new = book.alloc(want)
        if new is None:
            new = book.alloc(book.num_free_pages() + book.num_evictable_pages())
        pages = held + new
        added = book.insert(tokens[:len(pages) * ps], pages) // ps
        book.free(pages)
        return added

    def shrink(self, limit: int) -> int:
        """Evicts least recently used pages until at most `limit` are cached; returns how many went."""
        excess = len(self) - max(int(limit), 0)
        return self.book.evict(excess) if excess > 0 else 0

    def snapshot(self) -> list[tuple[int, ...]]:
        """One token sequence per leaf: inserting them all rebuilds the cache's contents."""
        index = self.book.index
        return [index.path_tokens(node) for node in index.iter_nodes() if not node.children]
