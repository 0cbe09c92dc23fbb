"""Disaggregated prefill/decode pair (MemServe PD modes): greedy output token-identical to the colocated
uncached run on multi-turn sessions, the KV moved per turn in each mode, no page leaks on either side,
different tensor-parallel degrees, and a failed transfer surfacing as an error with nothing leaked."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxserve import LLM, SamplingParams
from kv_faults import FailingTransport

from test_engine import CFG, PAGE, make_llm

MAX_TOKENS = 6
GREEDY = SamplingParams(max_tokens=MAX_TOKENS)
FIRST_LENS = (13, 21)   # two sessions
NEW_PER_TURN = 5        # user tokens appended after each answer
TURNS = 3


@pytest.fixture(scope="module")
def sessions():
    """The turns' prompts and the colocated, uncached greedy outputs they must reproduce."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    rng = np.random.default_rng(0)
    base = make_llm(enable_prefix_caching=False)
    turns = [[list(rng.integers(0, 256, n)) for n in FIRST_LENS]]
    refs = []
    for t in range(TURNS):
        refs.append([o.token_ids for o in base.generate(turns[t], GREEDY)])
        if t + 1 < TURNS:
            turns.append([p + r + list(rng.integers(0, 256, NEW_PER_TURN)) for p, r in zip(turns[t], refs[t])])
    return turns, refs


def make_pair(mode, **kw):
    opts = dict(disaggregated=True, pd_mode=mode, prefill_devices=[0, 1, 2, 3], decode_devices=[4, 5, 6, 7])
    opts.update(kw)
    return make_llm(**opts)


def assert_no_leak_both(llm):
    for eng in (llm.pair.prefill, llm.pair.decode):
        pool = eng.pool
        pool.check_invariants()
        assert not eng.has_unfinished() and not eng.requests
        assert pool.num_free_pages() + pool.num_evictable_pages() == pool.num_pages - 1, pool.stats()
    assert not llm.pair.has_unfinished() and not llm.pair.requests


def whole(n):
    return n // PAGE * PAGE


def expected_transfer(mode, turn, prompt_len, prev_prompt_len):
    """Prompt tokens whose KV goes prefill -> decode in this turn."""
    if mode in ("basic", "caching1") or turn == 0:
        return prompt_len
    # The decode side indexed the previous turn's prompt + computed output (all but the last token).
    return prompt_len - whole(prev_prompt_len + MAX_TOKENS - 1)


def expected_prefill_cached(mode, turn, prompt_len, prev_prompt_len):
    if mode == "basic" or turn == 0:
        return 0
    if mode == "caching3":  # the decode side sent back its decode-phase KV
        return whole(min(prev_prompt_len + MAX_TOKENS - 1, prompt_len - 1))
    return whole(prev_prompt_len)


@pytest.mark.parametrize("mode", ["basic", "caching1", "caching2", "caching3"])
def test_modes_match_colocated_and_send_only_what_is_missing(sessions, mode):
    turns, refs = sessions
    llm = make_pair(mode)
    assert llm.pair.prefill.mesh.devices.size == 2 and llm.pair.decode.mesh.devices.size == 2
    for t in range(TURNS):
        outs = llm.generate(turns[t], GREEDY)
        assert [o.token_ids for o in outs] == refs[t], f"turn {t}"
        for s, o in enumerate(outs):
            L = len(turns[t][s])
            prev = len(turns[t - 1][s]) if t else 0
            assert o.error is None and o.finish_reason == "length"
            assert o.transferred_tokens == expected_transfer(mode, t, L, prev), (t, s)
            assert o.num_cached_tokens == expected_prefill_cached(mode, t, L, prev), (t, s)
            want_back = whole(L + MAX_TOKENS - 1) - whole(L) if mode == "caching3" else 0
            assert o.returned_tokens == want_back, (t, s)
    if mode in ("caching2", "caching3"):
        # Later turns send less than their prompt: only the new turn's tokens and the partial page.
        assert all(o.transferred_tokens < len(p) for o, p in zip(outs, turns[-1]))
    assert_no_leak_both(llm)


def test_prefill_tp_differs_from_decode_tp(sessions):
    turns, refs = sessions
    llm = make_pair("caching2", prefill_devices=[0, 1], decode_devices=[2, 3, 4, 5, 6, 7], prefill_tp=2,
                    decode_tp=1)
    assert llm.pair.prefill.mesh.devices.size == 2 and llm.pair.decode.mesh.devices.size == 1
    for t in range(2):
        assert [o.token_ids for o in llm.generate(turns[t], GREEDY)] == refs[t]
    assert_no_leak_both(llm)


def test_failed_transfer_is_an_error_and_leaks_nothing(sessions):
    turns, refs = sessions
    for mode, stage in (("basic", "receive"), ("caching2", "insert")):
        llm = make_pair(mode, prefill_devices=[0], decode_devices=[1])
        llm.pair.transport = FailingTransport(stage)
        outs = llm.generate(turns[0], GREEDY)
        failed = [o for o in outs if o.error is not None]
        assert len(failed) == 1 and failed[0].finish_reason == "error" and "injected" in failed[0].error
        ok = [o for o in outs if o.error is None]
        assert [o.token_ids for o in ok] == [r for o, r in zip(outs, refs[0]) if o.error is None]
        assert llm.pair.decode.pool.cached_prefix_pages(failed[0].prompt_token_ids) == 0
        assert llm.pair.counters["transfer_failures"] == 1
        assert_no_leak_both(llm)
        # The pair keeps working afterwards.
        assert [o.token_ids for o in llm.generate(turns[0], GREEDY)] == refs[0]
        assert_no_leak_both(llm)


def test_stop_at_first_token_and_abort_leave_no_pages(sessions):
    turns, refs = sessions
    llm = make_pair("caching3", prefill_devices=[0], decode_devices=[1])
    out = llm.generate([turns[0][0]], SamplingParams(max_tokens=1))[0]
    assert out.token_ids == refs[0][0][:1] and out.transferred_tokens == 0
    pair = llm.pair
    a = pair.add_request(turns[0][0], GREEDY)
    b = pair.add_request(turns[0][1], GREEDY)
    pair.step()                # a and b prefilled and handed over
    pair.abort(a.request_id)
    pair.abort(b.request_id)
    # Engine hook: a prefill-only request keeps its pages after the first token until released or aborted.
    eng = pair.prefill
    for end in ("release", "abort"):
        req = eng.add_request(turns[0][1], GREEDY, f"held-{end}", prefill_only=True)
        while not req.finished:
            eng.step()
        assert req.finish_reason == "prefilled" and len(req.pages) == -(-len(turns[0][1]) // PAGE)
        assert req.output_token_ids == refs[0][1][:1]
        getattr(eng, end)(req.request_id)
        assert not req.pages
    assert_no_leak_both(llm)


def test_llm_rejects_bad_mode_and_shared_devices():
    with pytest.raises(ValueError, match="pd_mode must be one of"):
        LLM(model=CFG, disaggregated=True, pd_mode="caching4", compilation_cache="off")
    with pytest.raises(ValueError, match="share devices"):
        make_pair("basic", prefill_devices=[0, 1], decode_devices=[1, 2])
