"""An 8-bit KV cache through the engine (issue 19): an fp8 disaggregated pair in every PD mode, and an fp8
instance whose prefixes go round the host tier, token-identical to the fp8 colocated uncached run (same
quantization on both sides, so the only difference left would be a transfer or a swap losing something);
greedy agreement with the unquantized run within a stated tolerance, and that tolerance failing when a
transfer drops the scales."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxserve import SamplingParams
from jaxserve.kernels import kv_quant
from jaxserve.mempool import transfer as tr
from test_engine import PAGE, make_llm

MAX_TOKENS = 6
GREEDY = SamplingParams(max_tokens=MAX_TOKENS)
FIRST_LENS = (13, 21)
NEW_PER_TURN = 5
TURNS = 3
FP8 = "fp8_e4m3"


@pytest.fixture(scope="module")
def fp8_sessions():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    rng = np.random.default_rng(0)
    base = make_llm(enable_prefix_caching=False, kv_cache_dtype=FP8)
    turns = [[list(rng.integers(0, 256, n)) for n in FIRST_LENS]]
    refs = []
    for t in range(TURNS):
        refs.append([o.token_ids for o in base.generate(turns[t], GREEDY)])
        if t + 1 < TURNS:
            turns.append([p + r + list(rng.integers(0, 256, NEW_PER_TURN)) for p, r in zip(turns[t], refs[t])])
    return turns, refs


def make_pair(mode, **kw):
    opts = dict(disaggregated=True, pd_mode=mode, prefill_devices=[0, 1, 2, 3], decode_devices=[4, 5, 6, 7],
                kv_cache_dtype=FP8)
    opts.update(kw)
    return make_llm(**opts)


@pytest.mark.parametrize("mode", ["basic", "caching2", "caching3"])
def test_fp8_pd_modes_match_fp8_colocated(fp8_sessions, mode):
    turns, refs = fp8_sessions
    llm = make_pair(mode)
    assert llm.pair.prefill.pool.kv_cache_dtype == llm.pair.decode.pool.kv_cache_dtype == FP8
    returned = 0
    for t in range(TURNS):
        outs = llm.generate(turns[t], GREEDY)
        assert [o.token_ids for o in outs] == refs[t], f"turn {t}"
        assert all(o.error is None and o.transferred_tokens > 0 for o in outs)
        if mode == "caching3":  # the send-back moved the decode-phase pages that filled up
            assert [o.returned_tokens for o in outs] == [(len(p) + MAX_TOKENS - 1) // PAGE * PAGE - len(p) // PAGE * PAGE
                                                         for p in turns[t]]
            returned += sum(o.returned_tokens for o in outs)
        if t and mode != "basic":
            assert all(o.num_cached_tokens > 0 for o in outs)
    assert returned > 0 or mode != "caching3"
    for eng in (llm.pair.prefill, llm.pair.decode):
        eng.pool.check_invariants()


def test_fp8_prefill_tp_differs_from_decode_tp(fp8_sessions):
    turns, refs = fp8_sessions
    llm = make_pair("caching2", prefill_devices=[0, 1], decode_devices=[2], prefill_tp=2, decode_tp=1)
    for t in range(2):
        assert [o.token_ids for o in llm.generate(turns[t], GREEDY)] == refs[t]


def test_fp8_host_tier_round_trip_matches(fp8_sessions):
    rng = np.random.default_rng(2)
    a, b = [list(rng.integers(0, 256, 40)) for _ in range(2)]
    base = make_llm(enable_prefix_caching=False, kv_cache_dtype=FP8)
    ref_a = base.generate([a], GREEDY)[0].token_ids
    llm = make_llm(num_pages=10, num_host_pages=32, kv_cache_dtype=FP8)
    assert llm.generate([a], GREEDY)[0].token_ids == ref_a
    llm.generate([b], GREEDY)  # pushes a's pages to the host tier
    assert llm.stats()["swapped_out_pages"] > 0
    again = llm.generate([a], GREEDY)[0]
    assert again.token_ids == ref_a and again.num_cached_tokens >= 32
    assert llm.stats()["swapped_in_pages"] > 0


def test_mismatched_pair_is_refused():
    from jaxserve.engine.disagg import DisaggregatedPair
    p = make_llm(kv_cache_dtype=FP8, device_ids=[0])
    d = make_llm(kv_cache_dtype="int8", device_ids=[1], enable_prefix_caching=False)
    with pytest.raises(ValueError, match="kv_cache_dtype differs: prefill 'fp8_e4m3', decode 'int8'"):
        DisaggregatedPair(p.engine, d.engine, "caching1")


class ScaleDroppingTransport(tr.InProcessTransport):
    """A broken transfer that moves the 8-bit values but not their scales (every row arrives with scale 1.0):
    what the tolerance test below must catch."""

    def fetch(self, pool, offer):
        block = super().fetch(pool, offer)
        one = np.frombuffer(np.float32(1.0).tobytes(), np.uint8)
        return block.at[..., -kv_quant.SCALE_BYTES:].set(jax.numpy.asarray(one))


# Tolerance of an 8-bit cache against the unquantized run on this model (measured in docs/notes-issue-19.md):
# the mean share of each output before its first difference from the unquantized greedy output.
MIN_PREFIX_AGREEMENT = {"fp8_e4m3": 0.75, "int8": 0.9}
TOL_TOKENS = 16


def prefix_agreement(refs, outs):
    shares = []
    for r, o in zip(refs, outs):
        diverge = next((i for i, (x, y) in enumerate(zip(r, o)) if x != y), len(r))
        shares.append(diverge / len(r))
    return float(np.mean(shares))


def test_agreement_tolerance_and_dropped_scales_fail_it():
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices")
    rng = np.random.default_rng(4)
    prompts = [list(rng.integers(0, 256, int(n))) for n in rng.integers(10, 40, 6)]
    params = SamplingParams(max_tokens=TOL_TOKENS)
    ref = [o.token_ids for o in make_llm(kv_cache_dtype="auto").generate(prompts, params)]
    for kvd, tol in MIN_PREFIX_AGREEMENT.items():
        got = [o.token_ids for o in make_llm(kv_cache_dtype=kvd).generate(prompts, params)]
        assert prefix_agreement(ref, got) >= tol, (kvd, prefix_agreement(ref, got))
    broken = make_pair("basic", prefill_devices=[0], decode_devices=[1])
    broken.pair.transport = ScaleDroppingTransport()
    got = [o.token_ids for o in broken.generate(prompts, params)]
    assert prefix_agreement(ref, got) < MIN_PREFIX_AGREEMENT[FP8], prefix_agreement(ref, got)


# Teacher-forced agreement on a random HF checkpoint (its near-tied logits make free-running greedy diverge
# early, see docs/notes-issue-19.md): (min share of positions whose argmax is the unquantized token, max mean
# |log-prob difference| in nats); 12 prompts x 64 tokens measured 0.975 / 0.011 (int8), 0.909 / 0.051 (e4m3),
# 0.796 / 0.113 (e5m2).
HF_TOL = {"int8": (0.9, 0.03), "fp8_e4m3": (0.8, 0.1), "fp8_e5m2": (0.65, 0.2)}


def test_random_hf_checkpoint_teacher_forced_agreement(tmp_path):
    from jaxserve import LLM
    from jaxserve import model as model_lib
    from jaxserve.bench import kv_quant_eval as ev
    ev.random_hf_llama(str(tmp_path), seed=1)
    cfg, params, _ = model_lib.load(str(tmp_path))
    prompts = ev.random_prompts(np.random.default_rng(1), 4, cfg.vocab_size)
    refs = ev.generate(LLM(str(tmp_path), num_pages=64, compilation_cache="off"), prompts, 32)
    seqs = [p + r for p, r in zip(prompts, refs)]
    ref_lp = [ev.forced_logprobs(cfg, params, s, "auto") for s in seqs]
    for kvd, (min_agree, max_dlp) in HF_TOL.items():
        agree, dlp = [], []
        for p, r, s, lp_ref in zip(prompts, refs, seqs, ref_lp):
            lp = ev.forced_logprobs(cfg, params, s, kvd)
            rows = np.arange(len(p) - 1, len(s) - 1)
            agree.append(np.mean(lp[rows].argmax(-1) == np.asarray(r)))
            dlp.append(np.mean(np.abs(lp[rows, r] - lp_ref[rows, r])))
        # The unquantized run's own forced argmax is its greedy output (the check is not vacuous).
        assert np.mean(agree) >= min_agree and np.mean(dlp) <= max_dlp, (kvd, np.mean(agree), np.mean(dlp))
    for p, r, lp in zip(prompts, refs, ref_lp):
        assert (lp[np.arange(len(p) - 1, len(p) + len(r) - 1)].argmax(-1) == np.asarray(r)).mean() >= 0.95
