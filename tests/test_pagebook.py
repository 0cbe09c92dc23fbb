"""Page bookkeeping apart from KV storage: the numpy-only PageBook decides exactly what a MemPool decides, the
PrefixCache (simulator, fake instance) keeps the scheduler's prompt tree in step, and the control plane and
the bookkeeping import without jax."""

import importlib
import pkgutil
import random
import subprocess
import sys
from pathlib import Path

from jaxserve.mempool import DEVICE, PageBook
from jaxserve.mempool.prefix_cache import PrefixCache
from jaxserve.scheduler.prompt_tree import PromptTree

ROOT = Path(__file__).resolve().parents[1]
BOOKKEEPING = ["jaxserve.mempool", "jaxserve.mempool.allocator", "jaxserve.mempool.prompt_index",
               "jaxserve.mempool.eviction", "jaxserve.mempool.pagebook", "jaxserve.mempool.prefix_cache"]


def _submodules(package: str) -> list[str]:
    pkg = importlib.import_module(package)
    return [package] + [f"{package}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)]


def test_control_plane_and_bookkeeping_import_without_jax():
    modules = (_submodules("jaxserve.scheduler") + _submodules("jaxserve.sim") + _submodules("jaxserve.testing")
               + ["jaxserve.client", "jaxserve.engine.step_trace", "jaxserve.launch.step_trace_summary"]
               + BOOKKEEPING)
    assert "jaxserve.testing.fake_instance" in modules and "jaxserve.sim.instance" in modules
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            "jaxish = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib'))\n"
            "assert not jaxish, jaxish\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def _random_ops(pool, seed: int, steps: int = 300) -> list:
    """A random request workload (match, alloc, insert, free, delete, swap out / in, evict) on `pool`;
    returns everything the pool answered, so two pools can be compared decision by decision."""
    rng = random.Random(seed)
    ps, log, held, swapped = pool.page_size, [], [], []
    prefixes = [[rng.randrange(5) for _ in range(rng.randrange(1, 6) * ps)] for _ in range(6)]
    for _ in range(steps):
        op = rng.random()
        if op < 0.45:  # a request: cached prefix, new pages for the rest, index it
            tokens = rng.choice(prefixes) + [rng.randrange(3) for _ in range(rng.randrange(0, 3 * ps))]
            n, pages = pool.match(tokens[:-1])
            new = pool.alloc(-(-len(tokens) // ps) - len(pages))
            log.append(("match", n, tuple(pages), None if new is None else tuple(new)))
            if new is None:
                pool.free(pages)
                continue
            log.append(("insert", pool.insert(tokens, pages + new)))
            held.append((tokens, pages + new))
        elif op < 0.75 and held:
            tokens, pages = held.pop(rng.randrange(len(held)))
            pool.free(pages)
            if rng.random() < 0.2:
                log.append(("delete", pool.delete(tokens)))
        elif op < 0.85 and held and pool.num_host_pages:
            tokens, pages = held.pop(rng.randrange(len(held)))
            try:
                swapped.append((tokens, pool.swap_out(pages)))
            except MemoryError:
                held.append((tokens, pages))
                continue
            pool.free(pages)
            log.append(("swap_out", tuple(swapped[-1][1])))
        elif op < 0.95 and swapped:
            tokens, host = swapped.pop(0)
            dev = pool.swap_in(host)
            log.append(("swap_in", None if dev is None else tuple(dev)))
            (swapped.insert(0, (tokens, host)) if dev is None else held.append((tokens, dev)))
        else:
            log.append(("evict", pool.evict(rng.randrange(1, 4))))
        pool.check_invariants()
        log.append(("free", pool.num_free_pages(), pool.num_evictable_pages()))
    for _, pages in held:
        pool.free(pages)
    for _, host in swapped:
        pool.free_host(host)
    pool.check_invariants()
    log.append(("stats", tuple(sorted(pool.stats().items()))))
    return log


def test_pagebook_decides_exactly_what_a_mempool_decides():
    from jaxserve.config import CacheConfig, ModelConfig
    from jaxserve.mempool import MemPool
    mc = ModelConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2,
                     num_kv_heads=2, head_dim=4)
    for seed, host in ((0, 0), (1, 6), (2, 12)):
        pool = MemPool(mc, CacheConfig(page_size=2, num_pages=14, num_host_pages=host))
        book = PageBook(2, 14, host)
        assert _random_ops(pool, seed) == _random_ops(book, seed)
        assert book.index.num_pages[DEVICE] == pool.index.num_pages[DEVICE]


def test_prefix_cache_keeps_the_prompt_tree_in_step():
    tree = PromptTree(2)

    def on_event(kind, tokens):
        getattr(tree, kind)("i0", tokens)

    cache = PrefixCache(2, 10, on_event)
    rng = random.Random(0)
    stems = [[rng.randrange(4) for _ in range(rng.randrange(1, 5) * 2)] for _ in range(4)]
    for step in range(400):
        tokens = rng.choice(stems) + [rng.randrange(3) for _ in range(rng.randrange(0, 16))]
        if rng.random() < 0.6:
            cache.insert(tokens)
        else:
            assert cache.match(tokens) == tree.match(tokens).get("i0", 0)
        if step % 7 == 0:
            cache.shrink(rng.randrange(0, 10))
        assert len(cache) <= 10 and tree.held_tokens("i0") == 2 * len(cache)
        cache.book.check_invariants()
        tree.check_invariants()
    rebuilt = PrefixCache(2, 10)
    for seq in cache.snapshot():
        rebuilt.insert(seq)
    assert sorted(rebuilt.snapshot()) == sorted(cache.snapshot())


def test_prefix_cache_caches_a_too_long_sequence_as_far_as_it_fits():
    cache = PrefixCache(4, 3)
    assert cache.insert(list(range(20))) == 3 and len(cache) == 3
    assert cache.match(list(range(20))) == 12


def test_unreferenced_cached_pages_bound_what_eviction_frees():
    book = PageBook(page_size=2, num_pages=16)
    a = book.alloc(3)
    book.insert([1, 2, 3, 4, 5, 6], a)
    # A request still holds its pages: nothing is evictable, and the vector count agrees.
    assert book.num_evictable_pages() == book.num_unreferenced_cached_pages() == 0
    book.free(a)
    assert book.num_evictable_pages() == book.num_unreferenced_cached_pages() == 3
    # A request computed the cached 4-token prefix again in its own pages and indexes a third page under the
    # index's copy: the index's two pages are unreferenced but not evictable while that page is held.
    b = book.alloc(3)
    book.insert([1, 2, 3, 4, 9, 9], b)
    assert book.refcount(b[2]) == 2 and book.refcount(a[0]) == 1
    assert book.num_unreferenced_cached_pages() == 3 and book.num_evictable_pages() == 1
    book.check_invariants()
    book.free(b)  # once nothing is referenced the two agree again
    assert book.num_evictable_pages() == book.num_unreferenced_cached_pages() == 4
    book.check_invariants()
