"""Async scheduling (step N+1 dispatched before step N's samples reach the host, its decode tokens read on the
device): the tokens are those of the synchronous engine, whatever stops a request (EOS, stop ids, stop
strings, length), under prefix caching, preemption and seeded sampling; an abort while a step is in flight
and a stop seen a step late leave no page behind."""

from __future__ import annotations

import numpy as np
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.config import ModelConfig

CFG = ModelConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=256,
                  eos_token_id=(257,))
PAGE = 8


def make_llm(overlap: bool, **kw):
    opts = dict(page_size=PAGE, num_pages=128, max_num_batched_tokens=64, max_num_seqs=8, seed=0,
                compilation_cache="off", async_scheduling=overlap)
    opts.update(kw)
    return LLM(model=CFG, **opts)


def assert_no_leak(llm):
    pool = llm.engine.pool
    pool.check_invariants()
    assert not llm.engine.has_unfinished()
    assert pool.num_free_pages() + pool.num_evictable_pages() == pool.num_pages - 1, pool.stats()


def _prompts(seed, lengths, prefix_len=24):
    rng = np.random.default_rng(seed)
    prefix = [int(t) for t in rng.integers(0, 256, prefix_len)]
    return [prefix + [int(t) for t in rng.integers(0, 256, n)] for n in lengths]


def _outputs(llm, prompts, params):
    return [(o.token_ids, o.finish_reason, o.text) for o in llm.generate(prompts, params)]


@pytest.mark.parametrize("pages", [128, 14], ids=["roomy", "preempting"])
def test_same_tokens_as_synchronous_engine_for_every_stop(pages):
    prompts = _prompts(0, [3, 9, 17, 30, 5, 12])
    free = make_llm(False, num_pages=pages).generate(prompts, SamplingParams(max_tokens=24, ignore_eos=True))
    # Stops that land mid-sequence: a stop id and a stop string taken from the unconstrained outputs.
    stop_id = free[1].token_ids[6]
    stop_text = free[3].text[4:6]
    params = [SamplingParams(max_tokens=24, ignore_eos=True),
              SamplingParams(max_tokens=24, stop_token_ids=[stop_id]),
              SamplingParams(max_tokens=7),
              SamplingParams(max_tokens=24, stop=[stop_text]) if stop_text else SamplingParams(max_tokens=9),
              SamplingParams(max_tokens=24, temperature=0.9, seed=5),
              SamplingParams(max_tokens=1)]
    for round_ in range(2):  # the second round reuses the first one's cached prefixes
        runs = {}
        for overlap in (False, True):
            llm = make_llm(overlap, num_pages=pages)
            runs[overlap] = [_outputs(llm, prompts, params) for _ in range(round_ + 1)][-1]
            assert_no_leak(llm)
            if pages == 14:
                assert llm.engine.scheduler.num_preemptions > 0
        assert runs[True] == runs[False]
    assert runs[True][1][0][-1] == stop_id and runs[True][1][1] == "stop"
    assert len(runs[True][2][0]) == 7 and len(runs[True][5][0]) == 1


def test_tokens_arrive_one_step_later_and_abort_in_flight_leaves_no_page():
    prompts = _prompts(1, [4, 6, 8], prefix_len=0)  # no shared prefix: all three prefill in the first step
    ref = make_llm(False).generate(prompts, SamplingParams(max_tokens=10, ignore_eos=True))
    llm = make_llm(True)
    eng = llm.engine
    reqs = [eng.add_request(p, SamplingParams(max_tokens=10, ignore_eos=True), f"r{i}") for i, p in enumerate(prompts)]
    assert eng.step() == []             # the prefill is dispatched; nothing has completed yet
    assert [r.request_id for r in eng.step()] == [r.request_id for r in reqs]  # completes during decode 1
    assert all(r.ready_output_token_ids == [t] for r, t in zip(reqs, (o.token_ids[0] for o in ref)))
    eng.step()
    eng.abort("r1")                      # its sample is in flight: discarded, pages freed
    while any(not r.finished for r in reqs):
        eng.step()
    eng.sync()
    assert reqs[1].finish_reason == "abort" and -1 not in reqs[1].output_token_ids
    assert [reqs[0].output_token_ids, reqs[2].output_token_ids] == [ref[0].token_ids, ref[2].token_ids]
    for r in reqs:
        eng.requests.pop(r.request_id, None)
    assert_no_leak(llm)
