"""Eviction and tier moves of a PageBook: least-recently-used index leaves lose their unreferenced pages,
device to host (when the host tier has room) to nowhere, and host-tier prefixes come back to device on a
match. Numpy only: the data copies go through the book's `copy_to_host` / `copy_to_device`.

Split out of PageBook (jaxserve/mempool/pagebook.py) to keep each module readable; `Eviction` is a mixin
whose methods use the book's state (allocators, index, `_indexed`, pins, pending offloads, counters).
"""

from __future__ import annotations

import numpy as np

from jaxserve.mempool.prompt_index import DEVICE, HOST, Node


class Eviction:
    """Eviction internals of PageBook (see the module docstring)."""

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
        self._offload_event(node)
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
        if self._listener is not None:  # back on device: the prompt trees' tier follows
            self._events.append(("insert", self.index.path_tokens(kept[-1])))
        return dev
