"""A thread-safe copy of the prefixes an instance's prompt index holds, fed by its insert/evict/offload events, so
the reporter thread can snapshot the index (and which parts are in the host tier) without touching the pool
(which only the engine thread may)."""

from __future__ import annotations

import threading
from collections.abc import Sequence


class _Node:
    __slots__ = ("children", "host")

    def __init__(self):
        self.children: dict[tuple[int, ...], _Node] = {}
        self.host = False  # this page (and so everything below it) is in the host tier only


class IndexMirror:
    """The set of page-aligned prefixes the MemPool's index holds, rebuilt from its events (a trie of pages), so
    the reporter can take a snapshot from any thread without touching the pool."""

    def __init__(self, page_size: int):
        self.page_size = page_size
        self._root = _Node()
        self._lock = threading.Lock()

    def _pages(self, tokens: Sequence[int]) -> list[tuple[int, ...]]:
        ps = self.page_size
        return [tuple(tokens[i:i + ps]) for i in range(0, len(tokens) // ps * ps, ps)]

    def insert(self, tokens: Sequence[int]) -> None:
        """Every page of tokens is held, on device."""
        with self._lock:
            node = self._root
            for page in self._pages(tokens):
                node = node.children.setdefault(page, _Node())
                node.host = False

    def evict(self, tokens: Sequence[int]) -> None:
        pages = self._pages(tokens)
        if not pages:
            return
        with self._lock:
            node = self._find(pages[:-1])
            if node is not None:
                node.children.pop(pages[-1], None)

    def offload(self, tokens: Sequence[int]) -> None:
        """The last page of tokens and everything held below it moved to the host tier."""
        pages = self._pages(tokens)
        if not pages:
            return
        with self._lock:
            node = self._find(pages)
            stack = [node] if node is not None else []
            while stack:
                n = stack.pop()
                n.host = True
                stack.extend(n.children.values())

    def _find(self, pages) -> _Node | None:
        node = self._root
        for page in pages:
            node = node.children.get(page)
            if node is None:
                return None
        return node

    def snapshot(self) -> list[tuple[int, ...]]:
        """One token sequence per leaf: inserting them all rebuilds the index's prefix set."""
        return self.snapshot_tiers()[0]

    def snapshot_tiers(self) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
        """(leaves as in `snapshot`, the prefixes ending with each page where a host-tier part begins):
        INSERT of the first and then OFFLOAD of the second rebuilds prefixes and tiers."""
        with self._lock:
            leaves, offloads, stack = [], [], [((), self._root, False)]
            while stack:
                prefix, node, parent_host = stack.pop()
                if not node.children and prefix:
                    leaves.append(prefix)
                if node.host and not parent_host:
                    offloads.append(prefix)
                for page, child in node.children.items():
                    stack.append((prefix + page, child, node.host))
            return leaves, offloads

    def num_pages(self) -> int:
        with self._lock:
            n, stack = 0, [self._root]
            while stack:
                node = stack.pop()
                n += len(node.children)
                stack.extend(node.children.values())
            return n
