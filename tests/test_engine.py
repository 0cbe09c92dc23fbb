"""Engine behaviour: greedy output equals an independent dense (cache-free) greedy loop and the uncached
run, with prefix caching, chunked prefill, preemption, host tier and tensor parallelism; sampling
determinism; stops; validation; no page leaks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.config import ModelConfig
from jaxserve.model.decoder import forward_dense, init_params

CFG = ModelConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=256,
                  eos_token_id=(257,))
PAGE = 8


def make_llm(**kw):
    opts = dict(page_size=PAGE, num_pages=128, max_num_batched_tokens=64, max_num_seqs=8, seed=0,
                compilation_cache="off")
    opts.update(kw)
    return LLM(model=CFG, **opts)


@functools.lru_cache(maxsize=None)
def _dense_fn():
    params = init_params(CFG, jax.random.PRNGKey(0))
    return params, jax.jit(lambda p, x: forward_dense(p, CFG, x))


def dense_greedy(prompt, n):
    """Independent reference: full recompute with plain causal attention at every step."""
    params, fwd = _dense_fn()
    toks = list(prompt)
    width = 64  # one padded shape: causal attention makes the tail padding invisible to earlier positions
    assert len(prompt) + n <= width
    for _ in range(n):
        logits = fwd(params, jnp.asarray([toks + [0] * (width - len(toks))], jnp.int32))
        toks.append(int(jnp.argmax(logits[0, len(toks) - 1])))
    return toks[len(prompt):]


def prompts_sharing_prefix(rng, n, prefix_len, suffix_len):
    prefix = list(rng.integers(0, 256, prefix_len))
    return [prefix + list(rng.integers(0, 256, suffix_len)) for _ in range(n)]


def assert_no_leak(llm):
    pool = llm.engine.pool
    pool.check_invariants()
    s = pool.stats()
    assert not llm.engine.has_unfinished()
    # Every page is free or held by the index only.
    assert pool.num_free_pages() + pool.num_evictable_pages() == pool.num_pages - 1, s


GREEDY = SamplingParams(max_tokens=12)


def test_greedy_matches_dense_reference():
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, 256, n)) for n in (5, 8, 19, 33)]
    llm = make_llm(enable_prefix_caching=False)
    outs = llm.generate(prompts, GREEDY)
    for p, o in zip(prompts, outs):
        assert o.token_ids == dense_greedy(p, 12)
        assert o.finish_reason == "length" and o.num_cached_tokens == 0
    assert_no_leak(llm)


@pytest.mark.parametrize("variant", [
    dict(),                                                        # caching on, chunked
    dict(enable_chunked_prefill=False, max_num_batched_tokens=128),
    dict(max_num_batched_tokens=16, max_num_seqs=4),              # tiny budget: many chunks
    dict(num_pages=10),                                            # tiny pool: preemption
    dict(num_pages=10, num_host_pages=16),                         # host tier takes evicted prefixes
])
def test_cached_runs_match_uncached(variant):
    rng = np.random.default_rng(1)
    turns = prompts_sharing_prefix(rng, 3, 24, 6)
    base = make_llm(enable_prefix_caching=False)
    llm = make_llm(**variant)
    # Two rounds: the second reuses what the first cached (multi-turn shape).
    for round_ in range(2):
        ref = base.generate(turns, GREEDY)
        got = llm.generate(turns, GREEDY)
        assert [o.token_ids for o in got] == [o.token_ids for o in ref]
        if round_ == 1 and variant.get("num_pages", 128) > 12:
            assert all(o.num_cached_tokens >= 24 for o in got)
        turns = [t + o.token_ids + list(rng.integers(0, 256, 3)) for t, o in zip(turns, ref)]
    if "num_pages" in variant:
        assert llm.stats()["num_preemptions"] > 0
    assert_no_leak(llm)


def test_host_tier_swaps_out_and_back():
    rng = np.random.default_rng(2)
    a, b = [list(rng.integers(0, 256, 40)) for _ in range(2)]
    base = make_llm(enable_prefix_caching=False)
    llm = make_llm(num_pages=10, num_host_pages=32)
    ref_a = base.generate([a], GREEDY)[0]
    assert llm.generate([a], GREEDY)[0].token_ids == ref_a.token_ids
    llm.generate([b], GREEDY)            # pushes a's pages to the host tier
    assert llm.stats()["swapped_out_pages"] > 0
    again = llm.generate([a], GREEDY)[0]
    assert again.token_ids == ref_a.token_ids
    assert again.num_cached_tokens >= 32
    assert llm.stats()["swapped_in_pages"] > 0
    assert_no_leak(llm)


def test_concurrent_shared_prefix_is_computed_once():
    rng = np.random.default_rng(3)
    prompts = prompts_sharing_prefix(rng, 4, 48, 5)
    base = make_llm(enable_prefix_caching=False)
    ref = base.generate(prompts, GREEDY)
    llm = make_llm()
    got = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    # The 48-token prefix (6 pages) is computed by the first request only.
    assert llm.stats()["num_prefill_tokens_computed"] == 48 + 4 * 5
    assert base.stats()["num_prefill_tokens_computed"] == 4 * 53
    assert sorted(o.num_cached_tokens for o in got) == [0, 48, 48, 48]
    assert_no_leak(llm)


def test_tensor_parallel_matches_single_device():
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    rng = np.random.default_rng(4)
    prompts = prompts_sharing_prefix(rng, 3, 16, 7)
    ref = make_llm().generate(prompts, GREEDY)
    got = make_llm(tp=2).generate(prompts, GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]


def test_seeded_sampling_is_independent_of_batch():
    rng = np.random.default_rng(5)
    target = list(rng.integers(0, 256, 10))
    others = [list(rng.integers(0, 256, n)) for n in (3, 17, 30)]
    sp = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    llm = make_llm()
    alone = llm.generate([target], sp)[0].token_ids
    mixed = llm.generate(others + [target], [SamplingParams(max_tokens=16, temperature=1.0)] * 3 + [sp])[-1]
    assert mixed.token_ids == alone
    different_seed = llm.generate([target], SamplingParams(max_tokens=16, temperature=1.0, seed=99))[0]
    assert different_seed.token_ids != alone
    # Preemption (tiny pool) does not change a seeded sample either.
    small = make_llm(num_pages=8)
    assert small.generate(others[:2] + [target], [SamplingParams(max_tokens=16, temperature=1.0)] * 2 + [sp]
                          )[-1].token_ids == alone


def test_top_k_1_and_tiny_top_p_are_greedy():
    rng = np.random.default_rng(6)
    p = list(rng.integers(0, 256, 9))
    llm = make_llm()
    greedy = llm.generate([p], GREEDY)[0].token_ids
    assert llm.generate([p], SamplingParams(max_tokens=12, temperature=2.0, top_k=1, seed=3))[0].token_ids == greedy
    assert llm.generate([p], SamplingParams(max_tokens=12, temperature=2.0, top_p=1e-6, seed=3))[0].token_ids == greedy


def test_stops():
    rng = np.random.default_rng(7)
    p = list(rng.integers(0, 256, 9))
    llm = make_llm()
    full = llm.generate([p], SamplingParams(max_tokens=12))[0]
    stop_tok = full.token_ids[4]
    first = full.token_ids.index(stop_tok)
    out = llm.generate([p], SamplingParams(max_tokens=12, stop_token_ids=(stop_tok,)))[0]
    assert out.token_ids == full.token_ids[:first + 1] and out.finish_reason == "stop"
    text = llm.tokenizer.decode(full.token_ids)
    stop_str = text[3:5]
    if stop_str and stop_str not in text[:3]:
        out = llm.generate([p], SamplingParams(max_tokens=12, stop=(stop_str,)))[0]
        assert out.finish_reason == "stop" and out.text == text[:text.index(stop_str)]
    assert llm.generate([p], SamplingParams(max_tokens=3))[0].token_ids == full.token_ids[:3]


def test_bad_arguments_are_rejected_with_the_limit():
    llm = make_llm(max_model_len=64)
    with pytest.raises(ValueError, match="maximum model length is 64"):
        llm.generate([[1] * 64], GREEDY)
    with pytest.raises(ValueError, match="max_tokens must be at least 1"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="temperature must be non-negative"):
        SamplingParams(temperature=-0.1)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 258\)"):
        llm.generate([[1, 300]], GREEDY)
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate([[]], GREEDY)
    with pytest.raises(ValueError, match="needs more KV memory than the pool holds"):
        make_llm(num_pages=4).generate([[1] * 20], SamplingParams(max_tokens=30))
    assert not llm.engine.has_unfinished()


def test_compilations_are_bounded():
    rng = np.random.default_rng(8)
    llm = make_llm()
    for n in range(1, 40, 3):
        llm.generate([list(rng.integers(0, 256, n))], SamplingParams(max_tokens=4))
    # decode slot buckets + mixed token buckets stay small (one page-table width on CPU).
    assert llm.stats()["num_compilations"] <= 8


def test_precompile_covers_every_shape_and_leaves_outputs_unchanged():
    from jaxserve.engine.precompile import precompile_steps, step_shapes
    rng = np.random.default_rng(9)
    prompts = [list(rng.integers(0, 256, n)) for n in (3, 17, 40, 9)]
    llm = make_llm()
    want = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    seen = llm.engine.runner.shapes_seen
    shapes = set(step_shapes(llm.engine.runner))
    # Whatever the batching produced is in the precompiled list (else a served request would compile).
    assert seen <= shapes, seen - shapes
    # CPU: one page-table width (the XLA attention loops over live key blocks only), decode 8 slots (1-8
    # rows), mixed steps 2 token buckets (32, 64) x the one slot bucket (max_num_seqs 8); the samplers'
    # programs for 8 slots.
    assert shapes == {(True, 8, 8, 64), (False, 32, 8, 64), (False, 64, 8, 64), ("sample", 8),
                      ("extended", 8)}, shapes
    # Dummy steps write only the sink page: a fresh engine's outputs are the same after them (the shapes
    # already seen: in-process jit cache hits, so this test compiles nothing new).
    fresh = make_llm(enable_prefix_caching=False)
    assert precompile_steps(fresh.engine.runner, sorted(seen)) == len(seen) > 2
    assert fresh.engine.runner.shapes_seen == seen
    assert [o.token_ids for o in fresh.generate(prompts, GREEDY)] == want
    assert_no_leak(fresh)


def test_a_request_that_can_never_be_scheduled_raises_unschedulable():
    """Pages held by a prefill-only request (waiting for its KV transfer) leave too few for the next one:
    `Engine.step` raises the typed Unschedulable naming it (the instance fails that request alone)."""
    from jaxserve.engine.engine import Unschedulable
    engine = make_llm(num_pages=9, enable_prefix_caching=False).engine  # 8 usable pages of 8 tokens
    engine.add_request(list(range(1, 41)), SamplingParams(max_tokens=4), "held", prefill_only=True)
    while engine.has_unfinished():
        engine.step()
    assert engine.pool.num_free_pages() < 4
    engine.add_request(list(range(50, 80)), SamplingParams(max_tokens=2), "big")
    with pytest.raises(Unschedulable) as e:
        engine.step()
    assert e.value.request_id == "big" and "cannot be scheduled" in str(e.value)
    engine.release("held")
    engine.abort("big")
