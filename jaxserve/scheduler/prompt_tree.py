"""Global prompt tree: a page-aligned radix tree over token ids whose nodes record which instances hold that
prefix's KV cache. Built from the instances' index events; `match` finds every instance's cached prefix.

Invariant: an instance that holds a node holds all its ancestors (instances evict leaves first, and an
EVICT drops the whole subtree), so the holders of a child are a subset of its parent's. Tiers: a node's
`host` set names the holders whose copy is only in their host tier (OFFLOAD events); an instance's device
copy is a subtree containing the root, so once a path reaches an instance's host copy the rest is host too. Every non-root node
has at least one holder; edges are whole pages; children are keyed by their first page, so `match` and
`insert` cost grows with the prompt (pages walked, edges compared in C), not with the number of sequences."""

from __future__ import annotations

from typing import Iterable, Sequence


class _Node:
    __slots__ = ("tokens", "children", "holders", "parent", "depth", "host")

    def __init__(self, tokens: tuple, parent: "_Node | None", depth: int, holders: set):
        self.tokens = tokens      # edge label from the parent; a whole number of pages
        self.children: dict[tuple, _Node] = {}
        self.holders = holders    # instance ids holding every token from the root through this node
        self.parent = parent
        self.depth = depth        # tokens from the root through the end of this node
        self.host = set()         # holders whose copy of this node is in their host tier only (<= holders)


class PromptTree:
    def __init__(self, page_size: int):
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.page_size = page_size
        self._root = _Node((), None, 0, set())
        self.num_nodes = 0
        self.num_tokens = 0                     # distinct tokens in the tree (sum of edge lengths)
        self._held_tokens: dict[str, int] = {}  # tokens each instance holds (its indexed cache)
        self._host_tokens: dict[str, int] = {}  # of those, tokens held in its host tier only
        self.nodes_visited = 0                  # nodes walked by the last match (for cost tests)

    # ------------------------------------------------------------------------------------------- queries
    def match(self, token_ids: Sequence[int]) -> dict[str, int]:
        """instance id -> length of the longest page-aligned prefix of token_ids it holds (absent: 0)."""
        tokens = token_ids if isinstance(token_ids, tuple) else tuple(token_ids)
        ps = self.page_size
        result: dict[str, int] = {}
        node, pos, visited = self._root, 0, 0
        while True:
            child = node.children.get(tokens[pos:pos + ps])
            if child is None:
                break
            visited += 1
            m = self._common(child.tokens, tokens, pos)
            for holder in child.holders:
                result[holder] = pos + m  # deeper nodes overwrite: holders shrink going down
            if m < len(child.tokens):
                break
            node, pos = child, pos + m
        self.nodes_visited = visited
        return result

    def match_tiers(self, token_ids: Sequence[int]) -> dict[str, tuple[int, int]]:
        """instance id -> (longest page-aligned prefix of token_ids it holds on either tier, the part of that
        on device). The device part is a prefix of the whole: an instance's host copy hangs below its device
        copy."""
        tokens = token_ids if isinstance(token_ids, tuple) else tuple(token_ids)
        ps = self.page_size
        result: dict[str, tuple[int, int]] = {}
        node, pos = self._root, 0
        while True:
            child = node.children.get(tokens[pos:pos + ps])
            if child is None:
                break
            m = self._common(child.tokens, tokens, pos)
            for holder in child.holders:
                if holder in child.host:
                    result[holder] = (pos + m, result[holder][1] if holder in result else 0)
                else:
                    result[holder] = (pos + m, pos + m)
            if m < len(child.tokens):
                break
            node, pos = child, pos + m
        return result

    def host_tokens(self, instance_id: str) -> int:
        """Tokens the instance holds in its host tier only."""
        return self._host_tokens.get(instance_id, 0)

    def held_tokens(self, instance_id: str) -> int:
        return self._held_tokens.get(instance_id, 0)

    def instances(self) -> set[str]:
        return set(self._held_tokens)

    # ------------------------------------------------------------------------------------------- updates
    def _whole_pages(self, token_ids: Sequence[int]) -> tuple[int, ...]:
        """token_ids without a trailing partial page."""
        return tuple(token_ids[:len(token_ids) // self.page_size * self.page_size])

    def insert(self, instance_id: str, token_ids: Sequence[int]) -> int:
        """The instance holds every page of token_ids on device (a trailing partial page is ignored; pages it
        held in its host tier are back on device); returns the tokens it newly holds."""
        ps, tokens = self.page_size, self._whole_pages(token_ids)
        n = len(tokens)
        if n == 0:
            return 0
        gained = 0
        node, pos = self._root, 0
        while pos < n:
            key = tokens[pos:pos + ps]
            child = node.children.get(key)
            if child is None:
                child = _Node(tokens[pos:], node, n, {instance_id})
                node.children[key] = child
                self.num_nodes += 1
                self.num_tokens += n - pos
                gained += n - pos
                break
            m = self._common(child.tokens, tokens, pos)
            if m < len(child.tokens):
                if pos + m == n and instance_id in child.holders and instance_id not in child.host:
                    break  # already holds the whole node on device, so this prefix of it too
                child = self._split(child, m)
            if instance_id not in child.holders:
                child.holders.add(instance_id)
                gained += m
            elif instance_id in child.host:
                child.host.discard(instance_id)
                self._add_host(instance_id, -m)
            node, pos = child, pos + m
        if gained:
            self._held_tokens[instance_id] = self._held_tokens.get(instance_id, 0) + gained
        return gained

    def evict(self, instance_id: str, token_ids: Sequence[int]) -> int:
        """The instance dropped the last page of token_ids and everything extending it; returns the tokens
        it no longer holds."""
        child = self._last_page_node(instance_id, token_ids)
        if child is None:
            return 0
        lost = self._drop_subtree(child, instance_id)
        self._held_tokens[instance_id] -= lost
        if not self._held_tokens[instance_id]:
            del self._held_tokens[instance_id]
        self._compact(child)
        return lost

    def offload(self, instance_id: str, token_ids: Sequence[int]) -> int:
        """The instance moved the last page of token_ids, and every page it holds extending it, to its host
        tier (still cached there); returns the tokens newly marked host-only."""
        child = self._last_page_node(instance_id, token_ids)
        if child is None:
            return 0
        moved = 0
        stack = [child]
        while stack:
            cur = stack.pop()
            if instance_id not in cur.host:
                cur.host.add(instance_id)
                moved += len(cur.tokens)
            stack.extend(c for c in cur.children.values() if instance_id in c.holders)
        self._add_host(instance_id, moved)
        self._compact(child)
        return moved

    def _last_page_node(self, instance_id: str, token_ids: Sequence[int]):
        """The node, held by instance_id, that begins at the last whole page of token_ids (split so that one
        begins there); None when the instance does not hold that page on this path."""
        ps, tokens = self.page_size, self._whole_pages(token_ids)
        if not tokens:
            return None
        start = len(tokens) - ps  # the page begins here
        node, pos = self._root, 0
        while True:
            child = node.children.get(tokens[pos:pos + ps])
            if child is None or instance_id not in child.holders:
                return None
            m = self._common(child.tokens, tokens, pos)
            if pos + m <= start:
                if m < len(child.tokens):
                    return None  # the path diverges before the page: it was never indexed
                node, pos = child, pos + m
                continue
            if start > pos:  # the page lies inside this node: cut it so that a node begins at `start`
                upper = self._split(child, start - pos)
                child = next(iter(upper.children.values()))
            return child

    def _add_host(self, instance_id: str, delta: int) -> None:
        left = self._host_tokens.get(instance_id, 0) + delta
        if left:
            self._host_tokens[instance_id] = left
        else:
            self._host_tokens.pop(instance_id, None)

    def remove_instance(self, instance_id: str) -> int:
        """Forget everything the instance holds (it left, or it cleared its cache); returns the tokens."""
        if instance_id not in self._held_tokens:
            return 0
        lost = 0
        for child in list(self._root.children.values()):
            if instance_id in child.holders:
                lost += self._drop_subtree(child, instance_id)
                self._compact(child)
        self._held_tokens.pop(instance_id, None)
        self._host_tokens.pop(instance_id, None)
        return lost

    def clear(self) -> None:
        self._root = _Node((), None, 0, set())
        self.num_nodes = self.num_tokens = 0
        self._held_tokens.clear()
        self._host_tokens.clear()

    # ----------------------------------------------------------------------------------------- internals
    def _common(self, edge: tuple, tokens: tuple, pos: int) -> int:
        """Length of the page-aligned common prefix of `edge` and tokens[pos:] (the first page is known
        to match)."""
        length = len(edge)
        if tokens[pos:pos + length] == edge:
            return length
        ps = self.page_size
        m = ps
        while m < length and tokens[pos + m:pos + m + ps] == edge[m:m + ps]:
            m += ps
        return m

    def _split(self, node: _Node, m: int) -> _Node:
        """Cut `node` after m tokens; returns the new upper node (node keeps the lower part)."""
        parent = node.parent
        upper = _Node(node.tokens[:m], parent, node.depth - len(node.tokens) + m, set(node.holders))
        upper.host = set(node.host)
        parent.children[node.tokens[:self.page_size]] = upper
        node.tokens = node.tokens[m:]
        node.parent = upper
        upper.children[node.tokens[:self.page_size]] = node
        self.num_nodes += 1
        return upper

    def _drop_subtree(self, top: _Node, instance_id: str) -> int:
        """Remove the instance from `top` and every descendant it holds; unlink nodes nobody holds."""
        lost = 0
        stack = [top]
        while stack:
            node = stack.pop()
            node.holders.discard(instance_id)
            if instance_id in node.host:
                node.host.discard(instance_id)
                self._add_host(instance_id, -len(node.tokens))
            if node.holders:
                lost += len(node.tokens)
                stack.extend(c for c in node.children.values() if instance_id in c.holders)
            else:
                # Nobody holds it, so nobody holds its descendants either: unlink the whole subtree.
                del node.parent.children[node.tokens[:self.page_size]]
                lost += self._forget(node)
        return lost

    def _forget(self, node: _Node) -> int:
        """Account for an unlinked subtree; returns its tokens."""
        tokens = 0
        stack = [node]
        while stack:
            n = stack.pop()
            self.num_nodes -= 1
            self.num_tokens -= len(n.tokens)
            tokens += len(n.tokens)
            stack.extend(n.children.values())
            n.children = {}
        return tokens

    def _compact(self, node: _Node) -> None:
        """Merge `node`'s parent with its only child where the two have the same holders (undoing splits
        that no longer separate anything), so the tree does not fragment over time."""
        parent = node.parent
        for candidate in (parent, node):
            if candidate is None or candidate is self._root or candidate.parent is None:
                continue
            if candidate.parent.children.get(candidate.tokens[:self.page_size]) is not candidate:
                continue  # unlinked
            if len(candidate.children) == 1:
                (only,) = candidate.children.values()
                if only.holders == candidate.holders and only.host == candidate.host:
                    candidate.tokens = candidate.tokens + only.tokens
                    candidate.depth = only.depth
                    candidate.children = only.children
                    for grandchild in candidate.children.values():
                        grandchild.parent = candidate
                    self.num_nodes -= 1

    # ---------------------------------------------------------------------------------------- debugging
    def iter_sequences(self) -> Iterable[tuple[tuple, frozenset]]:
        """(prefix tokens, holders) of every node, root first (tiers: `match_tiers`)."""
        stack = [((), c) for c in self._root.children.values()]
        while stack:
            prefix, node = stack.pop()
            full = prefix + node.tokens
            yield full, frozenset(node.holders)
            stack.extend((full, c) for c in node.children.values())

    def check_invariants(self) -> None:
        """Raises AssertionError when the structure is inconsistent (tests)."""
        nodes = tokens = 0
        held: dict[str, int] = {}
        host: dict[str, int] = {}
        stack = list(self._root.children.items())
        while stack:
            key, node = stack.pop()
            nodes += 1
            tokens += len(node.tokens)
            assert node.tokens and len(node.tokens) % self.page_size == 0, "edge not page aligned"
            assert key == node.tokens[:self.page_size], "child keyed by the wrong page"
            assert node.holders, "a node nobody holds"
            assert node.parent is self._root or node.holders <= node.parent.holders, "holders not downward closed"
            assert node.depth == node.parent.depth + len(node.tokens), "depth"
            assert node.host <= node.holders, "a host-tier holder that does not hold the node"
            assert node.parent is self._root or all(h in node.host for h in node.parent.host & node.holders), \
                "a device copy below a host copy"
            for h in node.holders:
                held[h] = held.get(h, 0) + len(node.tokens)
            for h in node.host:
                host[h] = host.get(h, 0) + len(node.tokens)
            for k, c in node.children.items():
                assert c.parent is node, "parent link"
                stack.append((k, c))
        assert nodes == self.num_nodes, f"num_nodes {self.num_nodes} != {nodes}"
        assert tokens == self.num_tokens, f"num_tokens {self.num_tokens} != {tokens}"
        assert held == self._held_tokens, f"held tokens {self._held_tokens} != {held}"
        assert host == self._host_tokens, f"host tokens {self._host_tokens} != {host}"
