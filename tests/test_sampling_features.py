"""vLLM's sampling extras in the engine, each against an independent reference: logprobs against a numpy
log_softmax of the model's own cache-free forward; penalties, logit_bias and min_tokens against a numpy
re-implementation of vLLM's definitions applied to those logits, token by token (greedy); min_p on given
logits; stop_reason, include_stop_str_in_output, n > 1 and LLM.chat through the offline API. Async scheduling
(the default) is on throughout, so a penalised token that is still pending on the device is counted too."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.config import ModelConfig
from jaxserve.engine.sampling import MAX_LOGPROBS, greedy_tokens, sample_extended, sample_tokens
from jaxserve.model.decoder import forward_dense

CFG = ModelConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=256,
                  eos_token_id=(257,), dtype="float32")
EOS = 257


@pytest.fixture(scope="module")
def llm():
    return LLM(model=CFG, page_size=8, num_pages=128, max_num_batched_tokens=64, max_num_seqs=8, seed=0,
               compilation_cache="off")


def _dense_logits(llm, tokens) -> np.ndarray:
    """f32[len(tokens), V]: the model's logits after each prefix, computed without any cache."""
    return np.asarray(forward_dense(llm.engine.params, CFG, np.asarray([tokens], np.int32))[0], np.float64)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _prompts(seed, lengths):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, 256, n)] for n in lengths]


def _reference_processed(logits, prompt, output, p: SamplingParams):
    """vLLM's definitions, in the order the engine documents: bias (+ min_tokens mask), repetition over prompt
    and output, frequency and presence over the output."""
    x = logits.copy()
    for t, b in p.logit_bias:
        x[t] += b
    if len(output) < p.min_tokens:
        for t in set(p.stop_token_ids) | ({EOS} if not p.ignore_eos else set()):
            x[t] = -np.inf
    counts = np.bincount(np.asarray(output, np.int64), minlength=len(x)) if output else np.zeros(len(x))
    seen = counts > 0
    seen[np.asarray(prompt, np.int64)] = True
    r = p.repetition_penalty
    x = np.where(seen, np.where(x > 0, x / r, x * r), x)
    return x - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)


def test_logprobs_match_log_softmax_of_the_dense_forward(llm):
    prompts = _prompts(1, [5, 13, 30])
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True, logprobs=5))
    for prompt, out in zip(prompts, outs):
        o = out.outputs[0]
        assert len(o.logprobs) == len(o.token_ids) == 8
        lp = _log_softmax(_dense_logits(llm, prompt + o.token_ids))
        for i, tok in enumerate(o.token_ids):
            ref = lp[len(prompt) - 1 + i]
            entry = o.logprobs[i]
            assert tok in entry and entry[tok].logprob == pytest.approx(ref[tok], abs=2e-3)
            top = sorted(((t, v) for t, v in entry.items() if v.rank is not None), key=lambda kv: kv[1].rank)
            assert len(top) == 5
            assert [t for t, _ in top] == list(np.argsort(-ref)[:5])
            for t, v in top:
                assert v.logprob == pytest.approx(ref[t], abs=2e-3)
        assert o.cumulative_logprob == pytest.approx(sum(o.logprobs[i][t].logprob
                                                         for i, t in enumerate(o.token_ids)))


def test_logprobs_zero_gives_only_the_sampled_token(llm):
    out = llm.generate(_prompts(2, [7]), SamplingParams(max_tokens=4, ignore_eos=True, logprobs=0))[0]
    assert [list(d) for d in out.outputs[0].logprobs] == [[t] for t in out.token_ids]
    assert llm.generate(_prompts(2, [7]), SamplingParams(max_tokens=4, ignore_eos=True))[0].outputs[0].logprobs \
        is None


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=12, ignore_eos=True, repetition_penalty=1.8),
    SamplingParams(max_tokens=12, ignore_eos=True, frequency_penalty=1.5),
    SamplingParams(max_tokens=12, ignore_eos=True, presence_penalty=2.0, repetition_penalty=0.7),
    SamplingParams(max_tokens=12, ignore_eos=True, logit_bias={65: 3.0, 66: 250.0, 10: -100}),
], ids=["repetition", "frequency", "presence+repetition", "logit_bias"])
def test_greedy_with_penalties_matches_numpy_reference(llm, params):
    prompts = _prompts(3, [4, 11, 25])
    outs = llm.generate(prompts, params)
    plain = llm.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True))
    assert any(o.token_ids != p.token_ids for o, p in zip(outs, plain)), "the feature changed nothing"
    for prompt, out in zip(prompts, outs):
        logits = _dense_logits(llm, prompt + out.token_ids)
        for i, tok in enumerate(out.token_ids):
            x = _reference_processed(logits[len(prompt) - 1 + i], prompt, out.token_ids[:i], params)
            assert tok == int(np.argmax(x)), (i, tok, int(np.argmax(x)))


def test_min_tokens_masks_eos_and_stop_ids_then_stop_reason(llm):
    prompt = _prompts(4, [9])[0]
    forced = SamplingParams(max_tokens=20, logit_bias={EOS: 100.0}, min_tokens=5)
    o = llm.generate([prompt], forced)[0].outputs[0]
    assert len(o.token_ids) == 6 and o.token_ids[-1] == EOS and EOS not in o.token_ids[:-1]
    assert o.finish_reason == "stop" and o.stop_reason is None  # EOS: vLLM's stop_reason is None
    stop_id = 33
    o = llm.generate([prompt], SamplingParams(max_tokens=20, logit_bias={stop_id: 100.0}, min_tokens=3,
                                              stop_token_ids=[stop_id]))[0].outputs[0]
    assert len(o.token_ids) == 4 and o.token_ids[-1] == stop_id
    assert o.finish_reason == "stop" and o.stop_reason == stop_id
    assert "!" not in o.text  # 33 is "!": the stop token's text is left out ...
    o = llm.generate([prompt], SamplingParams(max_tokens=20, logit_bias={stop_id: 100.0}, stop_token_ids=[stop_id],
                                              include_stop_str_in_output=True))[0].outputs[0]
    assert o.text.endswith("!") and o.token_ids == [stop_id]  # ... unless asked for


def test_stop_string_reason_and_include_stop_str(llm):
    prompt = _prompts(5, [10])[0]
    free = llm.generate([prompt], SamplingParams(max_tokens=16, ignore_eos=True))[0]
    stop = free.text[5:7]
    assert len(stop) == 2
    cut = free.text.find(stop)
    o = llm.generate([prompt], SamplingParams(max_tokens=16, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert o.text == free.text[:cut] and o.stop_reason == stop and o.finish_reason == "stop"
    o = llm.generate([prompt], SamplingParams(max_tokens=16, ignore_eos=True, stop=[stop],
                                              include_stop_str_in_output=True))[0].outputs[0]
    assert o.text == free.text[:cut + 2] and o.stop_reason == stop
    o = llm.generate([prompt], SamplingParams(max_tokens=3, ignore_eos=True))[0].outputs[0]
    assert o.finish_reason == "length" and o.stop_reason is None


def test_min_p_on_given_logits():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 64, np.float32))
    base = dict(temperature=np.ones(64, np.float32), top_k=np.full(64, -1, np.int32),
                top_p=np.ones(64, np.float32), seeds=np.arange(64, dtype=np.uint32),
                output_index=np.zeros(64, np.int32))
    # min_p 0.5: only tokens with p >= 0.25 (0 and 1) may be drawn; 0.0: all may.
    got = np.asarray(jax.jit(sample_tokens)(logits, **base, min_p=np.full(64, 0.5, np.float32)))
    assert set(got) == {0, 1}
    got = np.asarray(jax.jit(sample_tokens)(logits, **base, min_p=np.zeros(64, np.float32)))
    assert set(got) >= {0, 1, 2}


def test_extended_sampler_counts_a_pending_fed_token():
    """The host counts only the outputs it knows; the fed token still on the device is added on the device."""
    V = 8
    logits = np.array([[0.0, 5.0, 4.9, 0, 0, 0, 0, 0]] * 2, np.float32)
    sampling = dict(temperature=np.zeros(2, np.float32), top_k=np.full(2, -1, np.int32),
                    top_p=np.ones(2, np.float32), seeds=np.zeros(2, np.uint32), output_index=np.zeros(2, np.int32))
    extra = dict(bias=np.zeros((2, V), np.float32), counts=np.zeros((2, V), np.int32),
                 prompt_mask=np.zeros((2, V), bool), presence=np.ones(2, np.float32),
                 frequency=np.zeros(2, np.float32), repetition=np.ones(2, np.float32),
                 min_p=np.zeros(2, np.float32))
    tokens, (lp, top_ids, top_lp) = jax.jit(sample_extended)(logits, sampling, extra, np.array([1, 1], np.int32),
                                                               np.array([True, False]))
    assert list(np.asarray(tokens)) == [2, 1]  # row 0: token 1 pending -> presence-penalised
    assert top_ids.shape == (2, min(MAX_LOGPROBS, V))
    np.testing.assert_allclose(np.asarray(lp), _log_softmax(logits.astype(np.float64))[[0, 1], [2, 1]], atol=1e-5)


def test_n_samples_per_prompt_and_seeds(llm):
    prompts = _prompts(6, [6, 9])
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True, temperature=1.0, seed=7, n=3))
    assert [len(o.outputs) for o in outs] == [3, 3]
    assert [c.index for c in outs[0].outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in outs[0].outputs}) > 1
    again = llm.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True, temperature=1.0, seed=7, n=3))
    assert [[c.token_ids for c in o.outputs] for o in outs] == [[c.token_ids for c in o.outputs] for o in again]
    # Output j with seed s is the single request with seed s + j.
    one = llm.generate(prompts[:1], SamplingParams(max_tokens=8, ignore_eos=True, temperature=1.0, seed=9))[0]
    assert outs[0].outputs[2].token_ids == one.token_ids
    assert outs[0].text == outs[0].outputs[0].text


def test_chat_renders_the_template_and_generates(llm):
    msgs = [{"role": "user", "content": "def add(a, b):"}]
    out = llm.chat(msgs, SamplingParams(max_tokens=6, ignore_eos=True))[0]
    ref = llm.generate(["user: def add(a, b):\nassistant:"], SamplingParams(max_tokens=6, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == ref.token_ids


def test_bad_params_are_refused_naming_them(llm):
    for kw, name in [(dict(logprobs=21), "logprobs"), (dict(presence_penalty=3.0), "presence_penalty"),
                     (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(min_p=1.5), "min_p"),
                     (dict(min_tokens=20, max_tokens=4), "min_tokens"), (dict(n=0), "n"),
                     (dict(logit_bias={"x": 1}), "logit_bias")]:
        with pytest.raises(ValueError, match=name):
            SamplingParams(**kw)
    with pytest.raises(ValueError, match="logit_bias token id 999"):
        llm.generate([[1, 2]], SamplingParams(logit_bias={999: 1.0}))


def test_disaggregated_pair_carries_logprobs_and_penalties(llm):
    """Prefill samples the first token (its logprobs travel with the hand-over), decode the rest: the same
    tokens and logprobs as the colocated engine."""
    pd = LLM(model=CFG, page_size=8, num_pages=64, max_num_batched_tokens=64, max_num_seqs=8, seed=0,
             compilation_cache="off", disaggregated=True, prefill_devices=[0], decode_devices=[1])
    prompts = _prompts(7, [6, 19])
    params = SamplingParams(max_tokens=8, ignore_eos=True, logprobs=2, frequency_penalty=1.0)
    for a, b in zip(pd.generate(prompts, params), llm.generate(prompts, params)):
        assert a.token_ids == b.token_ids
        assert [d[t].logprob for t, d in zip(a.token_ids, a.outputs[0].logprobs)] == pytest.approx(
            [d[t].logprob for t, d in zip(b.token_ids, b.outputs[0].logprobs)], abs=1e-4)


def test_neutral_extras_change_no_token():
    from jaxserve.engine.sampling import neutral_extras
    logits = np.random.default_rng(0).normal(size=(4, 300)).astype(np.float32)
    sampling = dict(temperature=np.array([0, 0, 1, 1], np.float32), top_k=np.full(4, -1, np.int32),
                    top_p=np.ones(4, np.float32), seeds=np.arange(4, dtype=np.uint32),
                    output_index=np.zeros(4, np.int32))
    plain = np.asarray(jax.jit(sample_tokens)(logits, **sampling))
    ext, _ = jax.jit(sample_extended)(logits, sampling, neutral_extras(4, 300), np.zeros(4, np.int32),
                                      np.zeros(4, bool))
    assert list(np.asarray(ext)) == list(plain)


@pytest.mark.parametrize("rows,vocab", [(1, 7), (8, 258), (33, 8192)])
def test_greedy_tokens_is_numpy_argmax(rows, vocab):
    # numpy's argmax is the reference: the first index of the maximum, a NaN counting as the maximum.
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, vocab)).astype(np.float32)
    x[0, vocab // 2] = x[0, vocab - 1] = 50.0  # a tie: the first wins
    if rows > 1:
        x[1, :] = -np.inf
        x[-1, 3] = np.inf
    if rows > 2:
        x[2, vocab // 3] = x[2, vocab // 2] = np.nan
        x[3, :] = 1.5
        x[4, :] = np.round(x[4, :])  # many ties
    got = np.asarray(greedy_tokens(jax.numpy.asarray(x)))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
