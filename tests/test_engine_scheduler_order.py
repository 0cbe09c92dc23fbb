"""The engine scheduler's order within a step, driven by hand over a PageBook (no model): a request deferred
behind an in-flight shared prefix keeps its place in line, so it runs before a later arrival's prefill
chunk once the prefix is computed."""

from __future__ import annotations

from jaxserve.config import SchedulerConfig
from jaxserve.engine.request import Request
from jaxserve.engine.sampling import SamplingParams
from jaxserve.engine.scheduler import Scheduler
from jaxserve.mempool.pagebook import PageBook

PAGE = 4
PREFIX = list(range(100, 124))  # 6 pages


def make_scheduler(caching=True, budget=16):
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=8, enable_chunked_prefill=True,
                             cut_padding=False)
    return Scheduler(config, PageBook(PAGE, 64, prefix_caching=caching), enable_prefix_caching=caching)


def add(sched, name, tokens, arrival):
    req = Request(name, list(tokens), SamplingParams(max_tokens=8), seed=0, max_total_len=256, arrival_time=arrival)
    sched.add(req)
    return req


def step(sched):
    """One engine step's bookkeeping: tokens computed at dispatch, a sample once the prompt is done, full pages
    offered to the index."""
    batch = sched.schedule()
    for req, n in batch.entries:
        req.num_computed += n
        if req.num_computed >= req.num_tokens:
            req.output_token_ids.append(7)
        sched.index_computed_pages(req)
    return [(req.request_id, n) for req, n in batch.entries]


def test_deferred_followers_run_before_a_later_arrivals_chunk():
    sched = make_scheduler()
    add(sched, "A", PREFIX + [1, 2], 0.0)
    add(sched, "B", PREFIX + [3, 4], 1.0)
    add(sched, "C", PREFIX + [5, 6], 2.0)
    add(sched, "D", range(200, 230), 3.0)
    assert step(sched) == [("A", 16)]
    # A's prefix is still being computed: B and C wait for it (deferred), D starts in the budget left.
    assert step(sched) == [("A", 10), ("D", 6)]
    assert sched.num_deferred_for_shared_prefix == 2
    # The prefix is in the index now. B and C arrived before D, so they run before D's next chunk.
    assert step(sched) == [("A", 1), ("B", 2), ("C", 2), ("D", 11)]
    assert [r.request_id for r in sched.running] == ["A", "B", "C", "D"]
    assert [r.num_cached_tokens for r in sched.running] == [0, 24, 24, 0]
    assert step(sched) == [("A", 1), ("B", 1), ("C", 1), ("D", 13)]


def test_a_follower_deferred_at_its_leaders_last_chunk_runs_next_step_beside_decodes():
    sched = make_scheduler(budget=20)
    add(sched, "X", range(300, 304), 0.0)
    add(sched, "A", list(range(100, 140)) + [1], 1.0)  # 40-token prefix: 10 pages, computed over 3 steps
    add(sched, "B", list(range(100, 140)) + [2], 2.0)
    add(sched, "D", range(200, 240), 3.0)
    assert step(sched) == [("X", 4), ("A", 16)]
    assert step(sched) == [("X", 1), ("A", 19)]
    # A's last 6 tokens; B is deferred (A has computed 35 of the 40 it shares), D starts.
    assert step(sched) == [("X", 1), ("A", 6), ("D", 13)]
    # B (deferred, earlier) is now admitted ahead of D's chunk.
    assert step(sched) == [("X", 1), ("A", 1), ("B", 1), ("D", 17)]


def test_without_caching_nothing_is_deferred_and_running_prefills_keep_their_order():
    sched = make_scheduler(caching=False)
    add(sched, "A", PREFIX + [1, 2], 0.0)
    add(sched, "B", PREFIX + [3, 4], 1.0)
    add(sched, "D", range(200, 230), 3.0)
    assert step(sched) == [("A", 16)]
    assert step(sched) == [("A", 10), ("B", 6)]
    assert step(sched) == [("A", 1), ("B", 15)]
    assert sched.num_deferred_for_shared_prefix == 0


def _shares_reference(running, tokens, n_cached, page):
    """The definition: some running prefill shares whole pages with `tokens` (short of its last token) beyond
    both what `tokens` has cached and what that prefill has computed."""
    for other in running:
        if other.num_computed >= len(other.prompt_token_ids):
            continue
        theirs = other.all_token_ids
        common = next((i for i, (a, b) in enumerate(zip(theirs, tokens)) if a != b), min(len(theirs), len(tokens)))
        shared = min(common, len(tokens) - 1) // page * page
        if shared > n_cached and other.num_computed < shared:
            return True
    return False


def test_shares_prefix_in_flight_matches_its_definition():
    import random
    rng = random.Random(0)
    sched = make_scheduler()
    for case in range(400):
        base = [rng.randrange(4) for _ in range(rng.randrange(1, 40))]
        running = []
        for i in range(rng.randrange(1, 4)):
            cut = rng.randrange(len(base) + 1)
            prompt = base[:cut] + [rng.randrange(4) for _ in range(rng.randrange(0, 12))] or [1]
            req = Request(f"r{i}", prompt, SamplingParams(), seed=0, max_total_len=256)
            req.num_computed = rng.randrange(len(prompt) + 1)
            running.append(req)
        sched.running = running
        cut = rng.randrange(len(base) + 1)
        tokens = base[:cut] + [rng.randrange(4) for _ in range(rng.randrange(0, 12))] or [2]
        n_cached = rng.randrange(len(tokens) // PAGE + 1) * PAGE
        assert sched._shares_prefix_in_flight(tokens, n_cached) == _shares_reference(running, tokens, n_cached, PAGE), case
