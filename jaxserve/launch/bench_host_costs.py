"""Host-side costs of the engine's page bookkeeping and scheduling (no model, no jax), as the prompt cache grows:
the load report's free-page count (an index walk vs the vector count over the page table), matching a
prompt whose prefix is cached, and one `schedule()` admitting a burst of suffixes over a shared prefix.

    python -m jaxserve.launch.bench_host_costs --out=out/bench_host_costs.json

Prints a table and writes JSON. Times are the least of --repeats calls (the machine is shared and noisy)."""

from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app, flags

from jaxserve.config import SchedulerConfig
from jaxserve.engine.request import Request
from jaxserve.engine.sampling import SamplingParams
from jaxserve.engine.scheduler import Scheduler
from jaxserve.mempool.pagebook import PageBook

flags.DEFINE_list("cached_bursts", ["10", "50", "200"], "bursts whose prompts fill the cache before timing (each: "
                  "one shared prefix and --burst suffixes, i.e. 1 + --burst index nodes)")
flags.DEFINE_integer("prefix_len", 512, "shared prefix tokens")
flags.DEFINE_integer("suffix_len", 32, "tokens after the prefix")
flags.DEFINE_integer("burst", 8, "prompts per burst")
flags.DEFINE_integer("page_size", 16, "tokens per page")
flags.DEFINE_integer("repeats", 20, "timed calls per row (the least is reported)")
flags.DEFINE_string("out", "out/bench_host_costs.json", "JSON output")
FLAGS = flags.FLAGS


def least_ms(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def burst_prompts(rng, n: int) -> list[list[int]]:
    prefix = [int(x) for x in rng.integers(0, 8000, FLAGS.prefix_len)]
    return [prefix + [int(x) for x in rng.integers(0, 8000, FLAGS.suffix_len)] for _ in range(n)]


def filled_book(rng, bursts: int) -> tuple[PageBook, list[int]]:
    """A PageBook holding `bursts` finished bursts in its index (no request references left), and the last
    burst's shared prefix."""
    pages_per_prompt = -(-(FLAGS.prefix_len + FLAGS.suffix_len) // FLAGS.page_size)
    book = PageBook(FLAGS.page_size, (bursts + 1) * (FLAGS.burst + 1) * pages_per_prompt + 64)
    for _ in range(bursts):
        for tokens in burst_prompts(rng, FLAGS.burst):
            _, pages = book.match(tokens)
            pages += book.alloc(pages_per_prompt - len(pages))
            book.insert(tokens, pages)
            book.free(pages)
    return book, tokens[:FLAGS.prefix_len]


def schedule_burst(book: PageBook, rng) -> float:
    """One `schedule()` admitting a burst's followers while its leader's last chunk is in flight."""
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=1024, max_num_seqs=64, enable_chunked_prefill=True,
                                      cut_padding=True), book, enable_prefix_caching=True)
    leader, *followers = burst_prompts(rng, FLAGS.burst)
    sched.add(Request("leader", leader, SamplingParams(max_tokens=4), seed=0, max_total_len=4096))
    for req, n in sched.schedule().entries:
        req.num_computed += n
        sched.index_computed_pages(req)
    for i, tokens in enumerate(followers):
        sched.add(Request(f"f{i}", tokens, SamplingParams(max_tokens=4), seed=0, max_total_len=4096))
    t = time.perf_counter()
    batch = sched.schedule()
    dt = time.perf_counter() - t
    for req, _ in batch.entries:
        sched.finish(req, "abort")
    return dt * 1e3


def main(argv):
    del argv
    rng = np.random.default_rng(0)
    rows = []
    for bursts in (int(b) for b in FLAGS.cached_bursts):
        book, prefix = filled_book(rng, bursts)
        probe = prefix + [int(x) for x in rng.integers(0, 8000, FLAGS.suffix_len)]  # its prefix is cached

        def match_once():
            _, pages = book.match(probe)
            book.free(pages)

        rows.append(dict(
            cached_bursts=bursts, index_nodes=book.stats()["index_nodes"], cached_pages=book.stats()["cached_pages"],
            evictable_walk_ms=least_ms(book.num_evictable_pages, FLAGS.repeats),
            unreferenced_vector_ms=least_ms(book.num_unreferenced_cached_pages, FLAGS.repeats),
            match_ms=least_ms(match_once, FLAGS.repeats),
            schedule_burst_ms=min(schedule_burst(book, rng) for _ in range(FLAGS.repeats))))
        book.check_invariants()
    print(f"\nHost costs (prompts {FLAGS.prefix_len} + {FLAGS.suffix_len} tokens, bursts of {FLAGS.burst}, "
          f"page {FLAGS.page_size}; least of {FLAGS.repeats}, ms)")
    print("| cached bursts | index nodes | cached pages | evictable: index walk | unreferenced: vector | "
          "match (cached prefix) | schedule() admitting a burst |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['cached_bursts']} | {r['index_nodes']} | {r['cached_pages']} | {r['evictable_walk_ms']:.3f} | "
              f"{r['unreferenced_vector_ms']:.3f} | {r['match_ms']:.3f} | {r['schedule_burst_ms']:.3f} |")
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump(dict(machine=os.uname().nodename, cpus=os.cpu_count(), rows=rows, config=dict(
            prefix_len=FLAGS.prefix_len, suffix_len=FLAGS.suffix_len, burst=FLAGS.burst,
            page_size=FLAGS.page_size, repeats=FLAGS.repeats)), f, indent=1)
    print(f"\nwrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
