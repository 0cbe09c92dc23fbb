"""Prompt index: the radix tree against a brute-force model of cached page prefixes, and match cost."""

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxserve.config import CacheConfig, ModelConfig
from jaxserve.mempool import DEVICE, HOST, MemPool, PromptIndex

PS = 2  # small pages and a 3-letter alphabet make shared prefixes and mid-node splits common

# Requests are prefixes of a few random documents, so they share prefixes and repeat, as real prompts do.
@st.composite
def docs_st(draw):
    """1-4 documents of 12 tokens; each copies a prefix of the one before and continues at random, so
    requests branch off one another at any page (or inside one)."""
    docs = [draw(st.lists(st.integers(0, 2), min_size=12, max_size=12))]
    for _ in range(draw(st.integers(0, 3))):
        cut = draw(st.integers(0, 12))
        docs.append(docs[-1][:cut] + draw(st.lists(st.integers(0, 2), min_size=12 - cut, max_size=12 - cut)))
    return docs


seq_st = st.tuples(st.integers(0, 3), st.integers(0, 12))  # (document, length)


def seq(docs, ref):
    doc, length = ref
    return docs[doc % len(docs)][:length]


def page_keys(tokens, ps=PS):
    return [tuple(tokens[i:i + ps]) for i in range(0, len(tokens) // ps * ps, ps)]


def longest_cached(cached, keys):
    """Brute force: length in pages of the longest prefix of `keys` in the set/dict `cached`."""
    j = 0
    while j < len(keys) and tuple(keys[:j + 1]) in cached:
        j += 1
    return j


def extended(cached, prefix):
    """Whether some cached prefix strictly extends `prefix`."""
    return any(len(q) > len(prefix) and q[:len(prefix)] == prefix for q in cached)


def expected_delete(cached, keys, held=frozenset()):
    """Brute force of delete: the prefixes of `keys` removed, deepest first. Only when the cached part of
    `keys` is not extended by another cached prefix; back up to the nearest branch point or held prefix."""
    m = longest_cached(cached, keys)
    if m == 0 or extended(cached, tuple(keys[:m])):
        return []
    gone, remaining = [], set(cached)
    for j in range(m, 0, -1):
        q = tuple(keys[:j])
        if q in held or extended(remaining, q):
            break
        gone.append(q)
        remaining.discard(q)
    return gone


def tree_map(index):
    """{page-key prefix: (tier, page id)} for every page the tree holds."""
    out, stack = {}, [(index.root, ())]
    while stack:
        node, prefix = stack.pop()
        for child in node.children.values():
            p = prefix
            for chunk, page in zip(child.chunks, child.pages):
                p = p + (chunk,)
                assert p not in out, f"prefix {p} held twice"
                out[p] = (child.tier, page)
            stack.append((child, p))
    return out


# ====================================================================== the bare tree
op_st = st.tuples(st.sampled_from(["insert", "insert", "match", "delete", "hold", "release"]), seq_st)


@settings(max_examples=60, deadline=None)
@given(docs=docs_st(), ops=st.lists(op_st, min_size=10, max_size=60))
def test_tree_matches_brute_force(docs, ops):
    index = PromptIndex(PS)
    model = {}        # page-key prefix -> page id (the first inserter's page)
    held = set()      # prefixes pinned as "in use": delete must spare them and everything before them
    next_page = iter(range(1, 10**6))

    def keep(node):
        # leading pages of `node` up to its last held one
        base = page_keys(list(index.path_tokens(node)))[:-len(node)] if len(node) else []
        k = 0
        for i, chunk in enumerate(node.chunks):
            if tuple(base + node.chunks[:i + 1]) in held:
                k = i + 1
        return k

    for kind, ref in ops:
        tokens = seq(docs, ref)
        keys = page_keys(tokens)
        if kind == "insert":
            pages = [next(next_page) for _ in keys]
            matched = longest_cached(model, keys)
            path, last, new = index.insert(keys, pages)
            assert new == pages[matched:]
            for i in range(matched, len(keys)):
                model[tuple(keys[:i + 1])] = pages[i]
        elif kind == "match":
            path, last = index.match_prefix(keys)
            got = [p for node in path[:-1] for p in node.pages] + (path[-1].pages[:last] if path else [])
            j = longest_cached(model, keys)
            assert got == [model[tuple(keys[:i + 1])] for i in range(j)]
        elif kind == "hold":
            j = longest_cached(model, keys)
            held.update(tuple(keys[:i + 1]) for i in range(j))
        elif kind == "release":
            held.clear()
        else:
            expect = expected_delete(model, keys, held)
            removed = index.delete(keys, keep)
            assert sum(len(n) for n in removed) == len(expect)
            for q in expect:
                del model[q]
        index.check()
        assert {k: v for k, (_, v) in tree_map(index).items()} == model


def test_split_keeps_structure_and_lru_candidates():
    index = PromptIndex(PS)
    keys = page_keys([1, 1, 2, 2, 0, 0, 1, 2])
    index.insert(keys, [10, 11, 12, 13])
    node = index.root.children[keys[0]]
    head = index.split(node, 1)
    assert head.pages == [10] and node.pages == [11, 12, 13] and node.parent is head
    index.check()
    # only the tail is an eviction candidate: the head has a device child
    assert index.pop_lru(DEVICE) is node and index.pop_lru(DEVICE) is None
    index.note(node)
    index.set_tier(node, HOST, [0, 1, 2])
    index.check()
    assert index.pop_lru(DEVICE) is head and index.pop_lru(HOST) is node


def test_growing_sequence_extends_its_leaf():
    index = PromptIndex(PS)
    keys = page_keys(list(range(12)))
    for n in range(1, 7):  # a decoding request indexes each page as it fills
        assert index.insert(keys[:n], list(range(1, n + 1)))[2] == [n]
    assert index.num_nodes == 1 and index.walk(keys)[1] == 6
    index.insert(page_keys([0, 1, 2, 3, 9, 9]), [7, 8, 9])  # a branch still splits it
    assert index.num_nodes == 3
    index.check()


def test_lru_order_follows_access():
    index = PromptIndex(PS)
    for i in range(3):
        index.insert(page_keys([i, i]), [i + 1])
    leaves = [index.root.children[(i, i)] for i in range(3)]
    index.match_prefix(page_keys([0, 0]))  # 0 becomes most recent
    assert [index.pop_lru(DEVICE) for _ in range(3)] == [leaves[1], leaves[2], leaves[0]]
    assert index.pop_lru(DEVICE) is None


def test_lru_heap_stays_bounded_under_repeated_touches():
    index = PromptIndex(PS)
    for i in range(20):
        index.insert(page_keys([i, i, i, i]), [2 * i + 1, 2 * i + 2])
    for _ in range(2000):
        index.match_prefix(page_keys([3, 3, 3, 3]))
    assert len(index._heaps[DEVICE]) <= 2 * index.num_nodes + 64 + 1
    index.check()


# ====================================================================== cost independence
def _build(n_seqs, ps=4, seed=0):
    """A tree holding `n_seqs` sequences: half share a 3-page system prompt, half are unrelated."""
    rng = random.Random(seed)
    index = PromptIndex(ps)
    system = [7] * (3 * ps)
    page = iter(range(1, 10**7))
    for i in range(n_seqs):
        tail = [rng.randrange(1000, 10**6) for _ in range(2 * ps)]
        toks = (system + tail) if i % 2 else tail + system
        keys = index.page_keys(toks)
        index.insert(keys, [next(page) for _ in keys])
    query_hit = system + [5] * (2 * ps)
    keys = index.page_keys(query_hit)
    index.insert(keys, [next(page) for _ in keys])
    return index


@pytest.mark.parametrize("query", ["hit", "shared", "miss"])
def test_match_cost_independent_of_cached_sequences(query):
    ps = 4
    q = {"hit": [7] * (3 * ps) + [5] * (2 * ps),
         "shared": [7] * (3 * ps) + [9] * (2 * ps),
         "miss": [3] * (5 * ps)}[query]
    visits = []
    for n in (10, 10_000):
        index = _build(n, ps)
        before = index.node_visits
        path, last = index.match_prefix(index.page_keys(q))
        visits.append(index.node_visits - before)
        expect = {"hit": 5, "shared": 3, "miss": 0}[query]
        assert sum(len(nd) for nd in path[:-1]) + (last if path else 0) == expect
    assert visits[0] == visits[1], visits


def test_pool_match_cost_independent_of_cached_sequences():
    mc = ModelConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=1,
                     num_kv_heads=1, head_dim=2)
    ps, visits = 4, []
    system = [7] * (2 * ps)
    for n in (10, 10_000):
        pool = MemPool(mc, CacheConfig(page_size=ps, num_pages=n + 8))
        for i in range(n):
            toks = system + [1000 + i] * ps
            _, cached = pool.match(toks)
            new = pool.alloc(3 - len(cached))
            pool.insert(toks, cached + new)
            pool.free(cached + new)
        before = pool.index.node_visits
        n_cached, pages = pool.match(system + [1005] * ps)
        visits.append(pool.index.node_visits - before)
        assert n_cached == 3 * ps
        pool.free(pages)
        pool.check_invariants()
    assert visits[0] == visits[1], visits


# ====================================================================== through MemPool, with eviction
MODEL = ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                    num_kv_heads=1, head_dim=2)
pool_op_st = st.tuples(st.sampled_from(["insert", "insert", "insert", "match", "delete", "evict"]), seq_st,
                       st.integers(1, 4))


@pytest.mark.parametrize("host_pages", [0, 3])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(docs=docs_st(), ops=st.lists(pool_op_st, min_size=10, max_size=50))
def test_pool_index_matches_brute_force(host_pages, docs, ops):
    """match == the longest whole-page prefix of a live inserted sequence that was not evicted since.

    The model is the set of cached page prefixes, grown by inserts and shrunk by the pool's evict events; it
    is checked against the tree after every step, and against everything ever inserted."""
    pool = MemPool(MODEL, CacheConfig(page_size=PS, num_pages=9, num_host_pages=host_pages))
    cached, ever = set(), set()

    def on_event(kind, toks):
        keys = tuple(page_keys(list(toks)))
        assert len(toks) % PS == 0 and keys
        if kind == "insert":
            cached.update(keys[:i + 1] for i in range(len(keys)))
        elif kind == "offload":  # moved to the host tier: still cached
            assert keys in cached, f"offloaded prefix {keys} was not cached"
        else:
            assert keys in cached, f"evicted prefix {keys} was not cached"
            cached.difference_update({q for q in cached if q[:len(keys)] == keys})

    pool.set_event_listener(on_event)
    for kind, ref, n in ops:
        tokens = seq(docs, ref)
        keys = page_keys(tokens)
        before = set(cached)
        if kind in ("insert", "match"):
            expect = longest_cached(before, keys)
            n_cached, pages = pool.match(tokens)
            # with nothing else referenced, host prefixes can always be swapped in, except when device
            # memory is short and then the shortfall must stay cached on host
            assert n_cached <= expect * PS
            if n_cached < expect * PS:
                assert host_pages and pool.num_free_pages() + pool.num_evictable_pages() == 0
            if kind == "insert":
                new = pool.alloc(len(keys) - len(pages))
                if new is None:
                    assert pool.num_free_pages() + pool.num_evictable_pages() < len(keys) - len(pages)
                else:
                    pre = set(cached)
                    added = pool.insert(tokens, pages + new)
                    assert added == (len(keys) - longest_cached(pre, keys)) * PS
                    assert all(tuple(keys[:i + 1]) in cached for i in range(len(keys)))
                    ever.update(tuple(keys[:i + 1]) for i in range(len(keys)))
                    pool.free(new)
            pool.free(pages)
        elif kind == "delete":
            expect = expected_delete(before, keys)
            removed = pool.delete(tokens)
            assert removed == len(expect) * PS
            assert before - cached == set(expect)
        else:
            freed = pool.evict(n)
            assert freed <= n
            if not host_pages:
                assert len(before - cached) == freed
        pool.check_invariants()
        tree = tree_map(pool.index)
        assert set(tree) == cached
        assert cached <= ever
    # everything cached is only held by the index; evicting all of it leaves every page free
    pool.evict(pool.num_pages)
    assert pool.stats()["cached_pages"] == 0 and pool.num_free_pages() == pool.num_pages - 1
    pool.check_invariants()
