"""End to end: the engine with the Pallas kernels (interpret mode on CPU) gives the same greedy tokens as
with the jnp reference, for mixed prefill/decode steps and a cached prefix; the CPU decode path's own big blocks
give the tokens of its lockstep loop."""

from __future__ import annotations

import numpy as np

from jaxserve import LLM, SamplingParams
from jaxserve.config import ModelConfig

# head_dim 64 and page size 16: the Triton lowering wants powers of two >= 16.
CFG = ModelConfig(vocab_size=258, hidden_size=128, intermediate_size=128, num_layers=1, num_heads=4,
                  num_kv_heads=2, head_dim=64, max_position_embeddings=256, bos_token_id=256,
                  eos_token_id=(257,))


def test_pallas_engine_matches_reference_engine():
    rng = np.random.default_rng(0)
    prefix = list(rng.integers(0, 256, 20))
    prompts = [prefix + list(rng.integers(0, 256, n)) for n in (3, 11)] + [list(rng.integers(0, 256, 7))]
    params = SamplingParams(max_tokens=4)
    outs = {}
    for impl in ("reference", "pallas"):
        llm = LLM(model=CFG, attention_impl=impl, page_size=16, num_pages=32, max_num_batched_tokens=32,
                  max_num_seqs=4, compilation_cache="off")
        first = llm.generate(prompts, params)
        second = llm.generate(prompts[:2], params)  # reuses the cached 16-token page of the prefix
        assert all(o.num_cached_tokens == 16 for o in second)
        outs[impl] = [o.token_ids for o in first + second]
    assert outs["pallas"] == outs["reference"]


def test_few_long_decodes_in_their_own_blocks_match_the_lockstep_loop(monkeypatch):
    """Two live decodes over 590- and 890-token prompts in an 8-slot step: the CPU decode attention takes each
    one's keys in its own big blocks (cheaper than the loop over 8 slots) and the engine's greedy tokens equal
    those of the same engine with the lockstep loop only."""
    import functools

    import jax
    import jax.numpy as jnp

    from jaxserve.kernels import xla_decode_attention as decode

    lens = jnp.array([600, 900] + [0] * 6, jnp.int32)
    assert bool(decode.own_blocks_cheaper(jnp.zeros(8, jnp.int32), lens, 0, 900 // 32 + 1, 32, 512))
    cfg = ModelConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
                      num_kv_heads=1, head_dim=32, max_position_embeddings=1024, bos_token_id=256,
                      eos_token_id=(257,))
    rng = np.random.default_rng(5)
    prompts = [list(rng.integers(0, 256, n)) for n in (590, 890)]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    outs = {}
    for own in (True, False):
        jax.clear_caches()  # the runner keeps one jitted step per configuration: trace it again
        with monkeypatch.context() as m:
            m.setattr(decode, "decode_paged_attention_blocked",
                      functools.partial(decode.decode_paged_attention_blocked, own_blocks=own))
            llm = LLM(model=cfg, page_size=16, num_pages=160, max_num_batched_tokens=512, max_num_seqs=8,
                      max_model_len=1024, enable_prefix_caching=False, compilation_cache="off")
            outs[own] = [o.token_ids for o in llm.generate(prompts, params)]
    assert outs[True] == outs[False]
