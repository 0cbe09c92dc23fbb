"""A step's last prefill chunk ends at a smaller token bucket when the step would pad far past its tokens
(`engine.buckets.padding_cut`): which cuts are made, and that a cut prompt decodes the same greedy tokens as
the uncut one-step prefill."""

from __future__ import annotations

import numpy as np
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.config import ModelConfig
from jaxserve.engine.buckets import padding_cut, token_bucket, token_buckets

CFG = ModelConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, max_position_embeddings=1024, bos_token_id=256,
                  eos_token_id=(257,))


@pytest.mark.parametrize("tokens, chunk, want", [
    (544, 544, 32),    # 768-row step -> 512 + 32
    (800, 800, 32),    # 1024 -> 768 + 32
    (272, 272, 16),    # 384 -> 256 + 16
    (544, 1, 0),       # only a decode token to cut: nothing
    (600, 56, 0),      # the chunk is too short to reach the bucket below
    (700, 700, 0),     # 768 pads 68 rows: not worth a step
    (130, 130, 0),     # 192 -> 128 + 32 saves 32 rows: under the 64-row floor
    (1024, 1024, 0),   # fills its bucket
])
def test_cuts(tokens, chunk, want):
    assert padding_cut(tokens, chunk, max_bucket=1024) == want


def test_a_cut_step_fills_a_bucket_and_keeps_a_token():
    buckets = token_buckets(32, 1024)
    for tokens in range(2, 1025):
        for chunk in (tokens, tokens // 2 + 1, 2):
            cut = padding_cut(tokens, chunk, 1024)
            if cut:
                assert tokens - cut in buckets and 0 < cut < chunk
                assert token_bucket(tokens - cut) + token_bucket(cut) < token_bucket(tokens)


def _steps_and_tokens(cut_padding: bool, prompts, max_tokens=8):
    llm = LLM(model=CFG, page_size=8, num_pages=256, max_num_batched_tokens=512, max_num_seqs=8, seed=0,
              compilation_cache="off", cut_padding=cut_padding)
    sizes = []
    schedule = llm.engine.scheduler.schedule

    def recording():
        batch = schedule()
        sizes.append([n for _, n in batch.entries])
        return batch
    llm.engine.scheduler.schedule = recording
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens))
    return [s for s in sizes if s], [o.token_ids for o in outs]


def test_cut_prefill_decodes_like_one_step():
    rng = np.random.default_rng(0)
    prompt = list(rng.integers(0, 256, 272))
    cut_steps, cut_tokens = _steps_and_tokens(True, [prompt])
    whole_steps, whole_tokens = _steps_and_tokens(False, [prompt])
    assert whole_steps[0] == [272]
    assert cut_steps[:2] == [[256], [16]]
    assert cut_tokens == whole_tokens


def test_cut_with_decodes_in_the_step():
    """A long prompt admitted beside running decodes: the step is cut to a bucket and every request's tokens
    equal the uncut run's."""
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(0, 256, n)) for n in (9, 11, 263)]
    cut_steps, cut_tokens = _steps_and_tokens(True, prompts)
    _, whole_tokens = _steps_and_tokens(False, prompts)
    assert cut_steps[0] == [9, 11, 236]   # 283 tokens would pad to 384; 256 fills a bucket
    assert cut_tokens == whole_tokens
