"""Prompt index: a radix tree over token ids whose edges are runs of whole pages (SGLang's radix cache, page
aligned), with least-recently-used order over its leaves for eviction.

The tree records which page holds which token run and on which tier ("device" or "host"); reference counts
and data movement belong to MemPool, which drives the tree through the primitives below.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator, Sequence

import numpy as np

DEVICE = "device"
HOST = "host"

PageKey = tuple[int, ...]  # the page_size token ids of one page


class Node:
    """One edge of the tree: a run of whole pages, `chunks[i]` being the tokens held by `pages[i]`.

    `pages` are device page ids when `tier == DEVICE`, host page ids when `tier == HOST`. Host nodes only
    ever hang below device nodes or other host nodes (the device tier is a subtree containing the root), so
    a prefix that is cached at all is cached on device up to some point and on host after it.
    """

    __slots__ = ("parent", "children", "chunks", "pages", "tier", "last_access", "pin", "num_device_children",
                 "heap_key", "alive")

    def __init__(self, parent: Node | None, chunks: list[PageKey], pages: list[int], tier: str, last_access: int):
        self.parent = parent
        self.children: dict[PageKey, Node] = {}
        self.chunks = chunks
        self.pages = pages
        self.tier = tier
        self.last_access = last_access
        # Pins keep a host node from being dropped while MemPool is in the middle of moving it.
        self.pin = 0
        # Kept up to date so "is this a device leaf" is O(1) even under a node with thousands of children.
        self.num_device_children = 0
        # (tier, last_access) of the node's live LRU-heap entry, or None when it has none.
        self.heap_key: tuple[str, int] | None = None
        self.alive = True

    def __len__(self) -> int:
        return len(self.chunks)

    def __bool__(self) -> bool:  # a node is never "empty" (the root has no pages but is still a node)
        return True

    def __repr__(self) -> str:
        return (f"Node({self.tier}, pages={self.pages}, first={self.chunks[0] if self.chunks else None}, "
                f"t={self.last_access}, children={len(self.children)}, pin={self.pin})")


class _LRUHeap:
    """Min-heap on last_access over one tier's eviction candidates, with lazy deletion.

    The index pushes a node whenever it may have become a candidate or was touched; entries that no longer
    describe their node (stale time, other tier, not a candidate, node removed) are dropped when they reach
    the top or at compaction, which runs when the heap outgrows twice the node count. Push and pop are
    therefore O(log n) amortised, with n the number of nodes.
    """

    def __init__(self, tier: str, is_candidate: Callable[[Node], bool]):
        self.tier = tier
        self._is_candidate = is_candidate
        self._heap: list[tuple[int, int, Node]] = []
        self._seq = itertools.count()  # tie-break so nodes are never compared

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, node: Node) -> None:
        key = (self.tier, node.last_access)
        if node.heap_key == key:
            return
        node.heap_key = key
        heapq.heappush(self._heap, (node.last_access, next(self._seq), node))

    def _valid(self, entry: tuple[int, int, Node]) -> bool:
        t, _, node = entry
        return (node.alive and node.heap_key == (self.tier, t) and node.last_access == t
                and self._is_candidate(node))

    def _discard(self, entry: tuple[int, int, Node]) -> None:
        t, _, node = entry
        # Forget the key so a later push of the same (tier, time) is not mistaken for a duplicate.
        if node.heap_key == (self.tier, t):
            node.heap_key = None

    def pop(self) -> Node | None:
        """The least recently used candidate, removed from the heap (push it again to keep it)."""
        while self._heap:
            entry = heapq.heappop(self._heap)
            valid = self._valid(entry)
            self._discard(entry)
            if valid:
                return entry[2]
        return None

    def compact(self, limit: int) -> None:
        if len(self._heap) <= limit:
            return
        live = []
        for entry in self._heap:
            if self._valid(entry):
                live.append(entry)
            else:
                self._discard(entry)
        heapq.heapify(live)
        self._heap = live

    def live_nodes(self) -> set[int]:
        return {id(e[2]) for e in self._heap if self._valid(e)}


class PromptIndex:
    """Radix tree over page-aligned token runs. Children are keyed by the tokens of their first page, so a
    walk costs one dict lookup per node plus one tuple comparison per page: O(len(tokens)), independent of
    how many sequences are cached.

    Eviction candidates are leaves of a tier: device nodes without device children, host nodes without
    children. `pop_lru(tier)` hands them out least recently used first (see `_LRUHeap` for the cost).
    """

    def __init__(self, page_size: int):
        self.page_size = int(page_size)
        self.root = Node(None, [], [], DEVICE, 0)
        self._clock = itertools.count(1)
        self.node_visits = 0  # dict lookups made by walks; tests use it to check cost independence
        self.num_nodes = 0    # root excluded
        self.num_pages = {DEVICE: 0, HOST: 0}
        self._heaps = {DEVICE: _LRUHeap(DEVICE, self._is_device_candidate),
                       HOST: _LRUHeap(HOST, self._is_host_candidate)}

    # ------------------------------------------------------------------ candidates
    def _is_device_candidate(self, node: Node) -> bool:
        return node.parent is not None and node.tier == DEVICE and node.num_device_children == 0

    @staticmethod
    def _is_host_candidate(node: Node) -> bool:
        return node.tier == HOST and not node.children

    def note(self, node: Node | None) -> None:
        """Records that `node` may have become an eviction candidate or got a newer access time."""
        if node is None or not node.alive:
            return
        if self._is_device_candidate(node):
            heap = self._heaps[DEVICE]
        elif self._is_host_candidate(node):
            heap = self._heaps[HOST]
        else:
            return
        heap.push(node)
        heap.compact(2 * self.num_nodes + 64)

    def pop_lru(self, tier: str) -> Node | None:
        """Least recently used candidate of `tier`, or None. The caller evicts it or `note`s it back."""
        return self._heaps[tier].pop()

    # ------------------------------------------------------------------ walking
    def page_keys(self, tokens: Sequence[int]) -> list[PageKey]:
        """The whole pages of `tokens` as tuples of ints (a trailing partial page is ignored)."""
        if isinstance(tokens, (list, tuple)):
            toks = [int(t) for t in tokens]
        else:  # numpy / jax arrays
            toks = np.asarray(tokens).reshape(-1).tolist()
        ps = self.page_size
        return [tuple(toks[i:i + ps]) for i in range(0, len(toks) // ps * ps, ps)]

    def walk(self, keys: Sequence[PageKey]) -> tuple[list[Node], int]:
        """Nodes along the longest cached prefix of `keys` (root excluded) and how many pages of the last one
        match (all of them unless the prefix ends inside it). Changes nothing but `node_visits`."""
        node, path, i, n, last = self.root, [], 0, len(keys), 0
        while i < n:
            self.node_visits += 1
            child = node.children.get(keys[i])
            if child is None:
                break
            chunks, j = child.chunks, 1
            size = len(chunks)
            while j < size and i + j < n and chunks[j] == keys[i + j]:
                j += 1
            path.append(child)
            i += j
            last = j
            if j < size:
                break
            node = child
        return path, last

    def match_prefix(self, keys: Sequence[PageKey]) -> tuple[list[Node], int]:
        """`walk`, then mark the path as just used."""
        path, last = self.walk(keys)
        self._touch(path)
        return path, last

    def _touch(self, nodes: Sequence[Node]) -> None:
        # Every touch covers a root path with one stamp, so a parent is never older than its children and
        # leaves are always the first of their branch to go.
        stamp = next(self._clock)
        for node in nodes:
            node.last_access = stamp
            self.note(node)

    # ------------------------------------------------------------------ structure
    def insert(self, keys: Sequence[PageKey], pages: Sequence[int]) -> tuple[list[Node], int, list[int]]:
        """Indexes `keys` with `pages[i]` holding `keys[i]` where the tree has no page for it yet.

        Where a prefix is already indexed the tree keeps its own pages and tier. Returns the path of nodes
        covering the already-indexed prefix, how many pages of the last of them it covers, and the page ids
        newly indexed (on device). New pages extend the path's last node in place when it is a device
        leaf ending exactly there (a request inserting page by page as it decodes keeps one node, not one
        per page), else they form a new leaf. If the path holds host nodes the caller must bring them to
        device, since device nodes may not hang below host nodes (MemPool promotes them with the caller's
        own pages).
        """
        if len(pages) < len(keys):
            raise ValueError(f"{len(keys)} pages of tokens but only {len(pages)} page ids")
        path, last = self.walk(keys)
        matched = sum(len(node) for node in path[:-1]) + last if path else 0
        new_pages = [int(p) for p in pages[matched:len(keys)]]
        touched = path
        if new_pages:
            tail = path[-1] if path else None
            if tail is not None and last == len(tail) and not tail.children and tail.tier == DEVICE:
                tail.chunks.extend(keys[matched:])
                tail.pages.extend(new_pages)
                self.num_pages[DEVICE] += len(new_pages)
            else:
                if tail is not None and last < len(tail):
                    path[-1] = self.split(tail, last)
                parent = path[-1] if path else self.root
                touched = path + [self._add_child(parent, list(keys[matched:]), new_pages, DEVICE)]
        self._touch(touched)
        return path, last, new_pages

    def _add_child(self, parent: Node, chunks: list[PageKey], pages: list[int], tier: str) -> Node:
        assert chunks and len(chunks) == len(pages) and chunks[0] not in parent.children
        node = Node(parent, chunks, pages, tier, parent.last_access)
        parent.children[chunks[0]] = node
        if tier == DEVICE:
            parent.num_device_children += 1
        self.num_nodes += 1
        self.num_pages[tier] += len(pages)
        return node

    def split(self, node: Node, k: int) -> Node:
        """Cuts `node` after its first `k` pages; returns the new head (the parent side). `node` keeps the
        tail and its children, so references to it stay valid. Costs O(len(node))."""
        assert node.parent is not None and 0 < k < len(node), (node, k)
        assert node.pin == 0, f"cannot split a pinned node {node}"
        parent = node.parent
        head = Node(parent, node.chunks[:k], node.pages[:k], node.tier, node.last_access)
        parent.children[head.chunks[0]] = head
        node.chunks = node.chunks[k:]
        node.pages = node.pages[k:]
        node.parent = head
        head.children[node.chunks[0]] = node
        head.num_device_children = 1 if node.tier == DEVICE else 0
        self.num_nodes += 1
        return head

    def remove(self, node: Node) -> None:
        """Detaches a childless node. Its `parent` link is kept so callers can still name its prefix."""
        assert node.parent is not None and not node.children and node.alive, node
        parent = node.parent
        del parent.children[node.chunks[0]]
        if node.tier == DEVICE:
            parent.num_device_children -= 1
        self.num_nodes -= 1
        self.num_pages[node.tier] -= len(node.pages)
        node.alive = False
        self.note(parent)

    def set_tier(self, node: Node, tier: str, pages: Sequence[int]) -> None:
        """Moves `node` to `tier`, now held by `pages` (the caller copies the data and frees the old pages)."""
        assert node.parent is not None and len(pages) == len(node)
        if node.tier != tier:
            node.parent.num_device_children += 1 if tier == DEVICE else -1
        self.num_pages[node.tier] -= len(node.pages)
        self.num_pages[tier] += len(pages)
        node.tier = tier
        node.pages = [int(p) for p in pages]
        self.note(node)
        self.note(node.parent)

    def delete(self, keys: Sequence[PageKey], keep: Callable[[Node], int]) -> list[Node]:
        """Removes the unshared tail of the cached path of `keys`: from its end up to the nearest branch point.

        Only acts when the cached part of `keys` ends exactly at a leaf (if a longer cached sequence extends
        it, nothing of it is unshared). `keep(node)` says how many leading pages of a node must stay (e.g.
        pages still in use); removal stops there. Returns the removed nodes, deepest first; the last one's
        `parent` is still in the tree.
        """
        path, last = self.walk(keys)
        if not path or last < len(path[-1]) or path[-1].children:
            return []
        removed: list[Node] = []
        node = path[-1]
        while node is not self.root and not node.children:
            k = keep(node)
            if k >= len(node):
                break
            if k > 0:
                self.split(node, k)
            parent = node.parent
            self.remove(node)
            removed.append(node)
            if k > 0:
                break
            node = parent
        return removed

    # ------------------------------------------------------------------ inspection
    def path_tokens(self, node: Node) -> tuple[int, ...]:
        """All tokens from the root through the end of `node` (O(depth in pages))."""
        runs = []
        while node is not None and node.parent is not None:
            runs.append(node.chunks)
            node = node.parent
        return tuple(t for chunks in reversed(runs) for chunk in chunks for t in chunk)

    def iter_nodes(self) -> Iterator[Node]:
        """Every node but the root, parents before children."""
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def check(self, *, quiescent: bool = True) -> None:
        """AssertionError on a broken structural invariant. `quiescent`: no MemPool operation in progress,
        so no pins may be held."""
        ps = self.page_size
        root = self.root
        assert root.parent is None and root.tier == DEVICE and not root.chunks and not root.pages
        live = {DEVICE: self._heaps[DEVICE].live_nodes(), HOST: self._heaps[HOST].live_nodes()}
        count, pages = 0, {DEVICE: 0, HOST: 0}
        stack = [root]
        while stack:
            node = stack.pop()
            assert node.alive, f"removed node still in the tree: {node}"
            n_dev = 0
            for key, child in node.children.items():
                assert child.parent is node, f"child {child} does not point back to {node}"
                assert child.chunks and child.chunks[0] == key, f"child {child} stored under key {key}"
                assert len(child.chunks) == len(child.pages), \
                    f"{child}: {len(child.chunks)} chunks, {len(child.pages)} pages"
                assert all(len(c) == ps for c in child.chunks), f"{child}: a chunk is not one page of tokens"
                assert child.tier in (DEVICE, HOST), child
                assert not (node.tier == HOST and child.tier == DEVICE), f"device node {child} under host node {node}"
                assert child.last_access <= node.last_access or node is root, \
                    f"child {child} used more recently than its parent {node}"
                if quiescent:
                    assert child.pin == 0, f"pin left on {child}"
                n_dev += child.tier == DEVICE
                count += 1
                pages[child.tier] += len(child.pages)
                stack.append(child)
            assert node.num_device_children == n_dev, \
                f"{node}: num_device_children {node.num_device_children} != {n_dev}"
            for tier, is_cand in ((DEVICE, self._is_device_candidate), (HOST, self._is_host_candidate)):
                if node is not root and is_cand(node):
                    assert id(node) in live[tier], f"eviction candidate {node} missing from the {tier} LRU heap"
        assert count == self.num_nodes, f"num_nodes {self.num_nodes} but {count} nodes in the tree"
        assert pages == self.num_pages, f"page counts {self.num_pages} but tree holds {pages}"
