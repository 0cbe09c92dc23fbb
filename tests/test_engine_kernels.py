"""End to end: the engine with the Pallas kernels (interpret mode on CPU) gives the same greedy tokens as
with the jnp reference, for mixed prefill/decode steps and a cached prefix."""

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
