"""Tier tracking of the global prompt tree (issue 18): OFFLOAD marks an instance's copy as host-tier only,
INSERT brings it back to device, EVICT drops it; `match_tiers` against a brute-force model."""

from hypothesis import given, settings, strategies as st

from jaxserve.scheduler.prompt_tree import PromptTree

PS = 2
INSTANCES = ("a", "b", "c")


class BruteForce:
    """Each instance's held page-aligned prefixes, each with its tier."""

    def __init__(self):
        self.held = {i: {} for i in INSTANCES}

    def insert(self, i, seq):
        for k in range(1, len(seq) // PS + 1):
            self.held[i][tuple(seq[:k * PS])] = "device"

    def _under(self, i, seq):
        n = len(seq) // PS * PS
        prefix = tuple(seq[:n])
        return [p for p in self.held[i] if n and len(p) >= n and p[:n] == prefix]

    def evict(self, i, seq):
        for p in self._under(i, seq):
            del self.held[i][p]

    def offload(self, i, seq):
        for p in self._under(i, seq):
            self.held[i][p] = "host"

    def remove(self, i):
        self.held[i] = {}

    def match_tiers(self, query):
        out = {}
        for i, prefixes in self.held.items():
            lens = [k * PS for k in range(1, len(query) // PS + 1) if tuple(query[:k * PS]) in prefixes]
            if lens:
                dev = [n for n in lens if prefixes[tuple(query[:n])] == "device"]
                out[i] = (max(lens), max(dev, default=0))
        return out


tokens = st.lists(st.integers(0, 2), max_size=12)
ops = st.one_of(
    st.tuples(st.just("insert"), st.sampled_from(INSTANCES), tokens),
    st.tuples(st.just("evict"), st.sampled_from(INSTANCES), tokens),
    st.tuples(st.just("offload"), st.sampled_from(INSTANCES), tokens),
    st.tuples(st.just("remove"), st.sampled_from(INSTANCES), st.just([])),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(ops, max_size=40), st.lists(tokens, min_size=1, max_size=6))
def test_tiers_match_brute_force(operations, queries):
    tree, model = PromptTree(PS), BruteForce()
    for op, inst, seq in operations:
        if op == "remove":
            tree.remove_instance(inst)
            model.remove(inst)
        else:
            getattr(tree, op)(inst, seq)
            getattr(model, op)(inst, seq)
        tree.check_invariants()
        for i in INSTANCES:
            assert tree.held_tokens(i) == len(model.held[i]) * PS
            assert tree.host_tokens(i) == sum(t == "host" for t in model.held[i].values()) * PS
        for q in queries + [seq]:
            expect = model.match_tiers(q)
            assert tree.match_tiers(q) == expect, (op, inst, seq, q)
            assert tree.match(q) == {i: total for i, (total, _) in expect.items()}


def test_offload_and_reload_by_hand():
    tree = PromptTree(4)
    seq = list(range(16))
    tree.insert("a", seq)
    tree.insert("b", seq[:8])
    # a's last two pages go to its host tier: still a holder (match), no longer on device.
    assert tree.offload("a", seq[:12]) == 8
    assert tree.match(seq) == {"a": 16, "b": 8}
    assert tree.match_tiers(seq) == {"a": (16, 8), "b": (8, 8)}
    assert tree.host_tokens("a") == 8 and tree.held_tokens("a") == 16
    # A swap-in of the first of them (an INSERT of that prefix) brings it back to device.
    tree.insert("a", seq[:12])
    assert tree.match_tiers(seq)["a"] == (16, 12)
    # Offloading what the instance does not hold changes nothing.
    assert tree.offload("b", seq) == 0
    tree.evict("a", seq[:16])
    assert tree.match_tiers(seq) == {"a": (12, 12), "b": (8, 8)}
    assert tree.host_tokens("a") == 0
    tree.check_invariants()
    tree.remove_instance("a")
    tree.check_invariants()


def _book_tiers(book, tokens):
    """(cached tokens on either tier, on device) of tokens' longest cached prefix in a PageBook."""
    from jaxserve.mempool.prompt_index import DEVICE
    path, last = book.index.walk(book.index.page_keys(tokens))
    total = device = 0
    for j, node in enumerate(path):
        n = (last if j == len(path) - 1 else len(node)) * book.page_size
        total += n
        if node.tier == DEVICE and device == total - n:
            device = total
    return total, device


def test_pagebook_events_keep_the_tree_tiers_in_step():
    """A PageBook with a host tier (eviction offloads, match swaps in, insert replaces host copies) feeding a
    prompt tree through its events: the tree's tiers equal the book's after every operation."""
    import random
    from jaxserve.mempool.pagebook import PageBook
    tree = PromptTree(2)
    book = PageBook(2, 12, 10)
    book.set_event_listener(lambda kind, tokens: getattr(tree, kind)("i0", tokens))
    rng = random.Random(0)
    stems = [[rng.randrange(4) for _ in range(rng.randrange(1, 4) * 2)] for _ in range(4)]
    held = []
    offloads = 0
    for _ in range(600):
        tokens = rng.choice(stems) + [rng.randrange(3) for _ in range(rng.randrange(0, 12))]
        op = rng.random()
        if op < 0.35:
            n, pages = book.match(tokens)
            more = book.alloc(len(tokens) // 2 - len(pages))
            if more is None:
                book.free(pages)
            else:
                book.insert(tokens, pages + more)
                held.append(pages + more)
        elif op < 0.6:
            n, pages = book.match(tokens)
            held.append(pages)
        elif op < 0.8 and held:
            book.free(held.pop(rng.randrange(len(held))))
        else:
            offloads += book.evict(rng.randrange(1, 5))
        tree.check_invariants()
        for q in stems + [tokens]:
            total, device = _book_tiers(book, q)
            got = tree.match_tiers(q).get("i0", (0, 0))
            assert got == (total, device), (q, got, total, device)
    assert offloads and book.stats()["swapped_in_pages"] > 0


def test_index_mirror_snapshot_rebuilds_prefixes_and_tiers():
    """After a report gap the instance resends its index from its IndexMirror (INSERT each leaf, then OFFLOAD
    where each host-tier part begins): the rebuilt tree equals the one fed event by event, tiers included."""
    import random
    from jaxserve.instance.index_mirror import IndexMirror
    from jaxserve.mempool.pagebook import PageBook
    live, mirror = PromptTree(2), IndexMirror(2)

    def on_event(kind, tokens):
        getattr(live, kind)("i0", tokens)
        getattr(mirror, kind)(tokens)
    book = PageBook(2, 12, 10)
    book.set_event_listener(on_event)
    rng = random.Random(1)
    stems = [[rng.randrange(4) for _ in range(rng.randrange(1, 4) * 2)] for _ in range(4)]
    checked = 0
    for step in range(400):
        tokens = rng.choice(stems) + [rng.randrange(3) for _ in range(rng.randrange(0, 12))]
        n, pages = book.match(tokens)
        more = book.alloc(len(tokens) // 2 - len(pages))
        if more is not None:
            book.insert(tokens, pages + more)
            book.free(more)
        book.free(pages)
        if rng.random() < 0.3:
            book.evict(rng.randrange(1, 5))
        if step % 20 == 0:
            rebuilt = PromptTree(2)
            held, offloaded = mirror.snapshot_tiers()
            for seq in held:
                rebuilt.insert("i0", seq)
            for seq in offloaded:
                rebuilt.offload("i0", seq)
            rebuilt.check_invariants()
            assert rebuilt.held_tokens("i0") == live.held_tokens("i0") == 2 * mirror.num_pages()
            assert rebuilt.host_tokens("i0") == live.host_tokens("i0")
            for q in stems + [tokens]:
                assert rebuilt.match_tiers(q) == live.match_tiers(q)
            checked += bool(offloaded)
    assert checked  # some snapshots had host-tier parts
