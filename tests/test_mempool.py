"""MemPool: page ownership, eviction, host tier and KV content under simulated request workloads (CPU)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxserve.config import CacheConfig, ModelConfig
from jaxserve.mempool import DEVICE, HOST, MemPool, PageAllocator
from jaxserve.mempool import kv_store as kv_store_mod

MC = ModelConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=2,
                 head_dim=4)
PS = 4
PAGE_SHAPE = (MC.num_layers, PS, 2 * MC.num_kv_heads, MC.head_dim)
PAGE_ELEMS = math.prod(PAGE_SHAPE)


def make_pool(num_pages=16, host=0, dtype=None, **kw):
    return MemPool(MC, CacheConfig(page_size=PS, num_pages=num_pages, num_host_pages=host, **kw), dtype=dtype)


def page_keys(tokens):
    return [tuple(tokens[i:i + PS]) for i in range(0, len(tokens) // PS * PS, PS)]


def pattern(prefix):
    """The recognisable 'KV' of the page ending `prefix`: a function of every token before it, like real KV.
    Exact in float32 and bfloat16 is not needed: content is compared in the pool's dtype."""
    base = hash(tuple(prefix)) % 65521
    return (base * PAGE_ELEMS + np.arange(PAGE_ELEMS, dtype=np.float64)).reshape(PAGE_SHAPE)


def page_content(tokens, i):
    return pattern(tokens[:min((i + 1) * PS, len(tokens))])


@functools.partial(jax.jit, donate_argnums=0)
def _write_page(kv, page, value):
    return kv.at[:, page].set(value.astype(kv.dtype))


def write(pool, pages, tokens, first=0):
    """What a prefill step does: fill the request's own pages with its KV."""
    for i, p in enumerate(pages):
        pool.kv_cache = _write_page(pool.kv_cache, p, page_content(tokens, first + i))


def clobber(pool, pages):
    for p in pages:
        pool.kv_cache = _write_page(pool.kv_cache, p, np.full(PAGE_SHAPE, -1.0))


def as_dtype(pool, x):
    return np.asarray(jnp.asarray(x, pool.dtype))


def tree_map(pool):
    """{page-key prefix: (tier, page)} for every page the index holds."""
    out, stack = {}, [(pool.index.root, ())]
    while stack:
        node, prefix = stack.pop()
        for child in node.children.values():
            p = prefix
            for chunk, page in zip(child.chunks, child.pages):
                p = p + (chunk,)
                out[p] = (child.tier, page)
            stack.append((child, p))
    return out


def longest_cached(cached, keys):
    j = 0
    while j < len(keys) and tuple(keys[:j + 1]) in cached:
        j += 1
    return j


def snapshot(pool):
    return (pool.stats(), tree_map(pool), pool.allocator.refcount.copy(), pool.allocator.free_pages(),
            pool.host_allocator.refcount.copy())


def assert_same(a, b):
    assert a[0] == b[0] and a[1] == b[1] and a[3] == b[3]
    assert np.array_equal(a[2], b[2]) and np.array_equal(a[4], b[4])


def finish_all_and_check_no_leak(pool, live):
    for _, pages, _ in live:
        pool.free(pages)
    live.clear()
    pool.check_invariants()
    rc = pool.allocator.refcount
    # no leak: each page is free, or held by the index alone
    assert np.array_equal(rc, pool._indexed.astype(rc.dtype))
    pool.evict(pool.num_pages)
    assert pool.num_free_pages() == pool.num_pages - 1
    pool.check_invariants()


# ====================================================================== allocator
def test_allocator_alloc_free_incref():
    a = PageAllocator(6)
    assert a.num_free == 5 and a.alloc(6) is None and a.num_free == 5
    pages = a.alloc(3)
    assert 0 not in pages and len(set(pages)) == 3 and all(a.refcount[p] == 1 for p in pages)
    a.incref(pages[:1])
    assert a.free(pages) == sorted(pages[1:])
    assert a.free(pages[:1]) == pages[:1]
    assert a.num_free == 5
    a.check()


def test_allocator_rejects_misuse_without_side_effects():
    a = PageAllocator(6)
    pages = a.alloc(2)
    with pytest.raises(ValueError):
        a.free([0])
    with pytest.raises(ValueError):
        a.incref([0])
    with pytest.raises(ValueError):
        a.free([pages[0], pages[0]])  # one reference, two frees
    with pytest.raises(ValueError):
        a.free([pages[1], 7])
    assert [a.refcount[p] for p in pages] == [1, 1]
    a.free(pages)
    with pytest.raises(ValueError):
        a.free(pages[:1])  # double free
    with pytest.raises(ValueError):
        a.incref(pages[:1])  # not allocated
    a.check()
    assert a.num_free == 5


def test_pool_free_rejects_double_free_and_freeing_the_index_reference():
    pool = make_pool()
    toks = list(range(8))
    pages = pool.alloc(2)
    write(pool, pages, toks)
    pool.insert(toks, pages)
    pool.free(pages)
    with pytest.raises(ValueError):
        pool.free(pages[:1])  # only the index holds it now
    with pytest.raises(ValueError):
        pool.free([0])
    with pytest.raises(ValueError):
        pool.incref([0])
    other = pool.alloc(1)
    with pytest.raises(ValueError):
        pool.insert(list(range(100, 108)), [other[0], pages[0]])  # pages[0] already holds another prefix
    pool.free(other)
    pool.check_invariants()


# ====================================================================== randomized workloads
class Sim:
    """Simulated requests (match -> alloc -> prefill writes -> insert, possibly while still running -> free)
    with every check after each step."""

    def __init__(self, pool):
        self.pool = pool
        self.live = []          # [tokens, pages, {page-key prefix: page the index held for it}] per request
        self.cached = set()     # page-key prefixes cached on either tier, as told by the pool's events
        self.ever = set()
        pool.set_event_listener(self.on_event)

    def on_event(self, kind, toks):
        keys = tuple(page_keys(list(toks)))
        assert keys and len(toks) == len(keys) * PS
        if kind == "insert":
            self.cached.update(keys[:i + 1] for i in range(len(keys)))
        elif kind == "offload":  # moved to the host tier: still cached
            assert keys in self.cached
        else:
            assert kind == "evict" and keys in self.cached
            self.cached -= {q for q in self.cached if q[:len(keys)] == keys}

    def _note_indexed(self, req):
        """Remembers which of the request's pages the index holds: they must stay there while it runs."""
        tokens, pages, held = req
        for i, p in enumerate(pages[:len(tokens) // PS]):
            if self.pool._indexed[p]:
                held[tuple(page_keys(tokens)[:i + 1])] = p

    def start(self, tokens):
        pool, keys = self.pool, page_keys(tokens)
        expect = longest_cached(self.cached, keys)
        n, pages = pool.match(tokens)
        assert n == len(pages) * PS and n <= expect * PS
        if n < expect * PS:  # only a host-tier remainder that device memory could not take
            assert pool.num_host_pages and pool.num_free_pages() + pool.num_evictable_pages() == 0
            assert tree_map(pool)[tuple(keys[:len(pages) + 1])][0] == HOST
        kv = np.asarray(pool.kv_cache)
        for i, p in enumerate(pages):  # match never returns overwritten content
            assert np.array_equal(kv[:, p], as_dtype(pool, page_content(tokens, i))), f"page {p} of match corrupt"
        need = -(-len(tokens) // PS) - len(pages)
        before = snapshot(pool)
        new = pool.alloc(need)
        if new is None:
            assert pool.num_free_pages() + pool.num_evictable_pages() < need
            assert_same(before, snapshot(pool))  # nothing allocated, nothing evicted
            pool.free(pages)
            return
        write(pool, new, tokens, first=len(pages))
        req = [tokens, pages + new, {}]
        self._note_indexed(req)
        self.live.append(req)

    def insert(self, k, upto=None):
        """Indexes a running request's whole pages (all, or the first `upto` tokens' worth)."""
        if not self.live:
            return
        req = self.live[k % len(self.live)]
        tokens = req[0] if upto is None else req[0][:upto]
        keys = page_keys(tokens)
        pre = set(self.cached)
        added = self.pool.insert(tokens, req[1])
        assert added == (len(keys) - longest_cached(pre, keys)) * PS
        assert all(tuple(keys[:i + 1]) in self.cached for i in range(len(keys)))
        self.ever.update(tuple(keys[:i + 1]) for i in range(len(keys)))
        self._note_indexed(req)

    def finish(self, k, insert):
        if not self.live:
            return
        if insert:
            self.insert(k)
        tokens, pages, _ = self.live.pop(k % len(self.live))
        self.pool.free(pages)

    def check(self):
        pool = self.pool
        pool.check_invariants()
        kv = np.asarray(pool.kv_cache)
        rc = pool.allocator.refcount
        expect_rc = pool._indexed.astype(np.int64)
        tree = tree_map(pool)
        for tokens, pages, held in self.live:
            for i, p in enumerate(pages):
                expect_rc[p] += 1
                # a running request's pages are never freed or overwritten...
                assert np.array_equal(kv[:, p], as_dtype(pool, page_content(tokens, i))), f"live page {p} changed"
            for prefix, p in held.items():  # ...nor evicted from the index, nor moved
                assert tree.get(prefix) == (DEVICE, p), f"page {p} of a running request left the index"
        assert np.array_equal(rc, expect_rc), "refcounts != index references + running requests' references"
        assert set(tree) == self.cached and self.cached <= self.ever
        for prefix, (tier, page) in tree.items():  # every cached page, either tier, holds its prefix's KV
            toks = [t for chunk in prefix for t in chunk]
            data = kv[:, page] if tier == DEVICE else pool.host_cache[page]
            assert np.array_equal(data, as_dtype(pool, pattern(toks))), f"cached {tier} page {page} corrupt"


@st.composite
def docs_st(draw, n_tokens=26):
    docs = [draw(st.lists(st.integers(0, 3), min_size=n_tokens, max_size=n_tokens))]
    for _ in range(draw(st.integers(0, 3))):
        cut = draw(st.integers(0, n_tokens))
        docs.append(docs[-1][:cut] + draw(st.lists(st.integers(0, 3), min_size=n_tokens - cut,
                                                   max_size=n_tokens - cut)))
    return docs


_start = st.tuples(st.just("start"), st.integers(0, 3), st.integers(1, 26))
_finish = st.tuples(st.just("finish"), st.integers(0, 7), st.sampled_from([True, True, True, False]))
op_st = st.one_of(  # mostly requests; now and then a mid-request insert, an explicit evict or delete
    _start, _start, _start, _finish, _finish, _finish,
    st.tuples(st.just("insert"), st.integers(0, 7), st.integers(0, 26)),
    st.tuples(st.just("evict"), st.integers(1, 6), st.none()),
    st.tuples(st.just("delete"), st.integers(0, 3), st.integers(1, 26)),
)


@pytest.mark.parametrize("host", [0, 6])
@settings(max_examples=30, deadline=None)
@given(docs=docs_st(), ops=st.lists(op_st, min_size=20, max_size=60))
def test_random_request_workload(host, docs, ops):
    pool = make_pool(num_pages=16, host=host)
    sim = Sim(pool)
    for op in ops:
        if op[0] == "start":
            sim.start(docs[op[1] % len(docs)][:op[2]])
        elif op[0] == "finish":
            sim.finish(op[1], op[2])
        elif op[0] == "insert":
            sim.insert(op[1], op[2])
        elif op[0] == "evict":
            assert pool.evict(op[1]) <= op[1]
        else:
            pool.delete(docs[op[1] % len(docs)][:op[2]])
        sim.check()
    finish_all_and_check_no_leak(pool, sim.live)


@pytest.mark.parametrize("host", [0, 5])
def test_long_seeded_workload(host):
    """A few hundred requests against a pool far too small for them: steady eviction and swapping."""
    rng = np.random.default_rng(host)
    pool = make_pool(num_pages=16, host=host)
    sim = Sim(pool)
    systems = [list(rng.integers(0, 50, 8)) for _ in range(3)]
    for step in range(300):
        r = rng.random()
        if r < 0.5:
            prompt = systems[rng.integers(3)] + list(rng.integers(0, 4, rng.integers(0, 14)))
            sim.start(prompt)
        elif r < 0.75:
            sim.finish(int(rng.integers(8)), bool(rng.random() < 0.9))
        elif r < 0.9:
            sim.insert(int(rng.integers(8)), int(rng.integers(4, 24)))  # after a prefill chunk
        elif r < 0.95:
            pool.evict(int(rng.integers(1, 4)))
        else:
            pool.delete(systems[rng.integers(3)] + list(rng.integers(0, 4, 4)))
        if len(sim.live) > 3:
            sim.finish(0, True)
        sim.check()
    s = pool.stats()
    assert s["evicted_pages"] > 0 and s["hit_tokens"] > 0
    if host:
        assert s["swapped_out_pages"] > 0 and s["swapped_in_pages"] > 0
    else:
        assert s["swapped_out_pages"] == 0 and s["dropped_pages"] > 0
    finish_all_and_check_no_leak(pool, sim.live)


# ====================================================================== deterministic behaviour
def cache_seq(pool, tokens):
    """A finished request: compute what is not cached, insert, free."""
    n, pages = pool.match(tokens)
    new = pool.alloc(-(-len(tokens) // PS) - len(pages))
    assert new is not None
    write(pool, new, tokens, first=len(pages))
    pool.insert(tokens, pages + new)
    pool.free(pages + new)


def test_alloc_none_has_no_side_effects():
    pool = make_pool(num_pages=10, host=2)  # 9 usable pages
    a, b = list(range(8)), list(range(50, 62))
    cache_seq(pool, a)
    cache_seq(pool, b)  # 2 + 3 pages cached
    n, held = pool.match(a)  # hold a: 2 pages not evictable
    assert n == 8
    assert pool.num_free_pages() == 4 and pool.num_evictable_pages() == 3
    assert not pool.can_alloc(8) and pool.can_alloc(7)
    before = snapshot(pool)
    assert pool.alloc(8) is None
    assert_same(before, snapshot(pool))
    got = pool.alloc(7)
    assert got is not None and pool.stats()["evicted_pages"] == 3
    pool.free(got)
    pool.free(held)
    pool.check_invariants()


def test_lru_order_exact():
    pool = make_pool(num_pages=16)
    events = []
    pool.set_event_listener(lambda kind, toks: events.append(toks) if kind == "evict" else None)
    seqs = [[i] * 8 for i in (1, 2, 3)]  # two pages each, one leaf each
    for s in seqs:
        cache_seq(pool, s)
    _, pages = pool.match(seqs[0])  # order by last use: 2, 3, 1
    pool.free(pages)
    assert pool.evict(2) == 2 and events == [tuple([2] * 4)]
    assert pool.evict(2) == 2 and events[1:] == [tuple([3] * 4)]
    assert pool.evict(2) == 2 and events[2:] == [tuple([1] * 4)]
    assert pool.evict(2) == 0 and pool.stats()["cached_pages"] == 0
    pool.check_invariants()


def test_parents_become_leaves_and_go_after_their_children():
    pool = make_pool(num_pages=16)
    system = [9] * 8
    cache_seq(pool, system + [1] * 4)
    cache_seq(pool, system + [2] * 4)  # system prompt node with two children
    assert pool.evict(3) == 3  # both children first (older one first), then the system's last page
    assert pool.match(system)[0] == 4
    pool.check_invariants()


def test_referenced_pages_are_never_evicted():
    pool = make_pool(num_pages=12, host=0)
    a = list(range(16))  # 4 pages
    cache_seq(pool, a)
    cache_seq(pool, list(range(100, 116)))
    n, held = pool.match(a[:8])  # a running request holds the first 2 pages of a
    assert n == 8
    freed = pool.evict(100)
    assert freed == 6  # b entirely and a's unreferenced tail
    assert pool.alloc(pool.num_pages) is None
    rest = pool.alloc(pool.num_free_pages())
    clobber(pool, rest)
    n2, again = pool.match(a)
    assert n2 == 8 and again == held
    kv = np.asarray(pool.kv_cache)
    for i, p in enumerate(held):
        assert np.array_equal(kv[:, p], page_content(a, i))
    pool.free(again + held + rest)
    pool.check_invariants()


def test_unreferenced_parent_of_a_referenced_leaf_is_not_evictable():
    pool = make_pool(num_pages=16)
    prompt, longer = list(range(8)), list(range(8)) + list(range(50, 58))
    # two running requests computed the shared prompt concurrently; r1 indexed it first
    r1, r2 = pool.alloc(2), pool.alloc(4)
    write(pool, r1, prompt)
    write(pool, r2, longer)
    assert pool.insert(prompt, r1) == 8
    assert pool.insert(longer, r2) == 8  # the tree keeps r1's pages for the prompt and takes r2's tail
    pool.free(r1)  # r1's pages are now held by the index alone, but r2's indexed tail hangs below them
    assert pool.num_evictable_pages() == 0 and not pool.can_alloc(pool.num_free_pages() + 1)
    before = snapshot(pool)
    assert pool.evict(10) == 0 and pool.alloc(pool.num_free_pages() + 1) is None
    assert_same(before, snapshot(pool))
    pool.free(r2)
    assert pool.num_evictable_pages() == 4 and pool.evict(10) == 4
    pool.check_invariants()


def test_host_tier_round_trip_is_bit_exact():
    pool = make_pool(num_pages=9, host=8)  # 8 usable device pages
    a, b = list(range(16)), list(range(100, 116))
    cache_seq(pool, a)
    cache_seq(pool, b)
    hog = pool.alloc(8)  # forces both to the host tier
    assert hog is not None and pool.stats()["host_cached_pages"] == 8 and pool.stats()["cached_pages"] == 0
    assert all(tier == HOST for tier, _ in tree_map(pool).values())
    clobber(pool, hog)  # their old device pages now hold other data
    pool.free(hog)
    for s in (a, b):
        n, pages = pool.match(s)
        assert n == 16
        kv = np.asarray(pool.kv_cache)
        for i, p in enumerate(pages):
            assert np.array_equal(kv[:, p], page_content(s, i)), f"page {i} of {s[:4]} not restored"
        pool.free(pages)
    s = pool.stats()
    assert s["swapped_out_pages"] == 8 and s["swapped_in_pages"] == 8 and s["host_used_pages"] == 0
    pool.check_invariants()


def test_without_host_tier_evicted_prefixes_are_dropped():
    pool = make_pool(num_pages=9, host=0)
    a = list(range(16))
    events = []
    pool.set_event_listener(lambda kind, toks: events.append((kind, toks)))
    cache_seq(pool, a)
    hog = pool.alloc(8)
    assert events[-1] == ("evict", tuple(a[:4]))
    pool.free(hog)
    assert pool.match(a) == (0, [])
    assert pool.stats()["dropped_pages"] == 4 and pool.stats()["swapped_out_pages"] == 0
    pool.check_invariants()


def test_full_host_tier_drops_its_least_recently_used():
    pool = make_pool(num_pages=9, host=4)
    a, b, c = list(range(16)), list(range(100, 116)), list(range(200, 216))
    cache_seq(pool, a)
    cache_seq(pool, b)
    pool.free(pool.alloc(8))  # both leave the device: the host takes a (least recently used), b is dropped
    cache_seq(pool, c)
    pool.free(pool.alloc(8))  # c needs the host room: the older host prefix goes
    on_host = {p[0][0] for p, (tier, _) in tree_map(pool).items() if tier == HOST}
    assert on_host == {200}
    n, pages = pool.match(c)
    assert n == 16
    kv = np.asarray(pool.kv_cache)
    assert all(np.array_equal(kv[:, p], page_content(c, i)) for i, p in enumerate(pages))
    pool.free(pages)
    pool.check_invariants()


def test_match_swaps_in_only_what_fits():
    pool = make_pool(num_pages=9, host=8)
    a = list(range(16))
    cache_seq(pool, a)
    hog = pool.alloc(8)  # a -> host
    pool.free(hog[:2])
    n, pages = pool.match(a)  # 2 free device pages, nothing evictable: half of a comes back
    assert n == 8 and len(pages) == 2
    assert [t for t, _ in tree_map(pool).values()].count(HOST) == 2
    kv = np.asarray(pool.kv_cache)
    assert all(np.array_equal(kv[:, p], page_content(a, i)) for i, p in enumerate(pages))
    pool.free(hog[2:])
    n2, pages2 = pool.match(a)
    assert n2 == 16 and pages2[:2] == pages
    kv = np.asarray(pool.kv_cache)
    assert all(np.array_equal(kv[:, p], page_content(a, i)) for i, p in enumerate(pages2))
    pool.free(pages + pages2)
    pool.check_invariants()


def test_insert_over_host_prefix_adopts_the_callers_pages():
    pool = make_pool(num_pages=9, host=8)
    a = list(range(16))
    cache_seq(pool, a)
    pool.free(pool.alloc(8))  # a -> host
    mine = pool.alloc(4)  # a request that recomputed a instead of matching it
    write(pool, mine, a)
    assert pool.insert(a[:12], mine) == 0  # nothing new: the first 3 pages were cached (on host)
    tree = tree_map(pool)
    assert [tree[tuple(page_keys(a)[:i + 1])] for i in range(4)][:3] == [(DEVICE, p) for p in mine[:3]]
    assert tree[tuple(page_keys(a))][0] == HOST
    assert pool.stats()["host_cached_pages"] == 1
    pool.free(mine)
    n, pages = pool.match(a)
    assert n == 16 and pages[:3] == mine[:3]
    pool.free(pages)
    pool.check_invariants()


def test_public_swap_out_swap_in():
    pool = make_pool(num_pages=9, host=4)
    toks = list(range(12))
    pages = pool.alloc(3)
    write(pool, pages, toks)
    host = pool.swap_out(pages)
    assert len(host) == 3 and pool.stats()["host_used_pages"] == 3
    clobber(pool, pages)
    pool.free(pages)
    full = pool.alloc(8)
    before = snapshot(pool)
    assert pool.swap_in(host) is None  # no device room: nothing changes
    assert_same(before, snapshot(pool))
    pool.free(full)
    back = pool.swap_in(host)
    kv = np.asarray(pool.kv_cache)
    assert all(np.array_equal(kv[:, p], page_content(toks, i)) for i, p in enumerate(back))
    assert pool.stats()["host_used_pages"] == 0  # swap_in released the caller's host pages
    with pytest.raises(ValueError):
        pool.swap_in(host)
    h2 = pool.swap_out(back[:1])
    pool.free_host(h2)
    pool.free(back)
    pool.check_invariants()
    no_host = make_pool(host=0)
    with pytest.raises(MemoryError):
        no_host.swap_out(no_host.alloc(1))


def test_swap_out_makes_room_by_dropping_host_leaves():
    pool = make_pool(num_pages=9, host=4)
    a = list(range(16))
    cache_seq(pool, a)
    pool.free(pool.alloc(8))  # a on host, host full
    pages = pool.alloc(2)
    host = pool.swap_out(pages)  # drops a's last two host pages
    assert len(host) == 2 and pool.stats()["dropped_host_pages"] == 2
    pool.free(pages)
    pool.free_host(host)
    assert pool.match(a)[0] == 8
    pool.check_invariants()


def test_delete_spares_referenced_pages():
    pool = make_pool(num_pages=16)
    system, a, b = [5] * 8, [5] * 8 + [1] * 8, [5] * 8 + [2] * 8
    cache_seq(pool, a)
    cache_seq(pool, b)
    assert pool.delete(system) == 0  # longer cached sequences extend it
    n, held = pool.match(a[:12])  # a running request holds system + a's first own page
    assert pool.delete(a) == 4  # only a's unreferenced last page
    assert pool.delete(b) == 8  # b's own pages, up to the branch point
    pool.free(held)
    assert pool.delete(a) == 12 and pool.stats()["cached_pages"] == 0
    pool.check_invariants()


def test_events_describe_cached_prefixes():
    pool = make_pool(num_pages=9, host=0)
    events = []
    pool.set_event_listener(lambda kind, toks: events.append((kind, toks)))
    a = list(range(10))  # two whole pages and a partial one
    cache_seq(pool, a)
    assert events == [("insert", tuple(a[:8]))]
    cache_seq(pool, a)
    assert len(events) == 1  # nothing new
    pool.evict(1)
    assert events[-1] == ("evict", tuple(a[:8]))
    pool.delete(a)
    assert events[-1] == ("evict", tuple(a[:4]))
    pool.set_event_listener(None)
    cache_seq(pool, a)
    assert len(events) == 3


def test_prefix_caching_disabled():
    pool = make_pool(num_pages=9, enable_prefix_caching=False)
    a = list(range(16))
    cache_seq(pool, a)
    assert pool.match(a) == (0, []) and pool.stats()["cached_pages"] == 0
    assert pool.num_free_pages() == 8
    pool.check_invariants()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_dtype_round_trip(dtype):
    pool = make_pool(num_pages=5, host=4, dtype=dtype)
    assert pool.kv_cache.dtype == jnp.dtype(dtype) and pool.host_cache.dtype == jnp.dtype(dtype)
    a = list(range(16))
    cache_seq(pool, a)
    pool.free(pool.alloc(4))
    n, pages = pool.match(a)
    kv = np.asarray(pool.kv_cache)
    assert n == 16 and all(np.array_equal(kv[:, p], as_dtype(pool, page_content(a, i))) for i, p in enumerate(pages))
    pool.free(pages)


def test_sharded_cache_keeps_its_sharding():
    tp = 2 if len(jax.devices()) >= 2 else 1
    mesh = Mesh(np.array(jax.devices()[:tp]), ("tp",))
    sharding = NamedSharding(mesh, PartitionSpec(None, None, None, "tp", None))
    pool = MemPool(MC, CacheConfig(page_size=PS, num_pages=9, num_host_pages=8), sharding=sharding)
    assert pool.kv_cache.sharding == sharding and not np.asarray(pool.kv_cache).any()
    a = list(range(16))
    cache_seq(pool, a)
    pool.free(pool.alloc(8))
    n, pages = pool.match(a)
    assert n == 16 and pool.kv_cache.sharding == sharding
    kv = np.asarray(pool.kv_cache)
    assert all(np.array_equal(kv[:, p], page_content(a, i)) for i, p in enumerate(pages))
    pool.free(pages)
    pool.check_invariants()


def test_gather_and_scatter_compile_once_per_bucket():
    pool = make_pool(num_pages=40, host=32)
    gather0 = kv_store_mod._gather_pages._cache_size()
    scatter = kv_store_mod._scatter_fn(None)
    scatter0 = scatter._cache_size()
    for n in range(1, 17):
        pages = pool.alloc(n)
        host = pool.swap_out(pages)
        pool.free(pages)
        pool.free(pool.swap_in(host))
    # buckets 1, 2, 4, 8, 16
    assert kv_store_mod._gather_pages._cache_size() - gather0 <= 5
    assert scatter._cache_size() - scatter0 <= 5
    pool.check_invariants()


def test_token_arrays_are_accepted():
    pool = make_pool(num_pages=9)
    a = np.arange(12, dtype=np.int32)
    pages = pool.alloc(3)
    write(pool, pages, a.tolist())
    assert pool.insert(a, pages) == 12
    pool.free(pages)
    n, got = pool.match(jnp.asarray(a))
    assert n == 12 and got == pages
    assert pool.match(a.tolist()[:10]) == (8, pages[:2])
    pool.free(got + pages[:2])
    pool.check_invariants()
