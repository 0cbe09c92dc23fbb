"""A thread-safe copy of the prefixes an instance's prompt index holds, fed by its insert/evict events, so
the reporter thread can snapshot the index without touching the pool (which only the engine thread may)."""

from __future__ import annotations

import threading
from collections.abc import Sequence


class IndexMirror:
    """The set of page-aligned prefixes the MemPool's index holds, rebuilt from its insert/evict events (a
    trie of pages), so the reporter can take a snapshot from any thread without touching the pool."""

    def __init__(self, page_size: int):
        self.page_size = page_size
        self._root: dict = {}
        self._lock = threading.Lock()

    def _pages(self, tokens: Sequence[int]) -> list[tuple[int, ...]]:
        ps = self.page_size
        return [tuple(tokens[i:i + ps]) for i in range(0, len(tokens) // ps * ps, ps)]

    def insert(self, tokens: Sequence[int]) -> None:
        with self._lock:
            node = self._root
            for page in self._pages(tokens):
                node = node.setdefault(page, {})

    def evict(self, tokens: Sequence[int]) -> None:
        pages = self._pages(tokens)
        if not pages:
            return
        with self._lock:
            node = self._root
            for page in pages[:-1]:
                node = node.get(page)
                if node is None:
                    return
            node.pop(pages[-1], None)

    def snapshot(self) -> list[tuple[int, ...]]:
        """One token sequence per leaf: inserting them all rebuilds the index's prefix set."""
        with self._lock:
            out, stack = [], [((), self._root)]
            while stack:
                prefix, node = stack.pop()
                if not node and prefix:
                    out.append(prefix)
                for page, child in node.items():
                    stack.append((prefix + page, child))
            return out

    def num_pages(self) -> int:
        with self._lock:
            n, stack = 0, [self._root]
            while stack:
                node = stack.pop()
                n += len(node)
                stack.extend(node.values())
            return n
