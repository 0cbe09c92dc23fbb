"""Start-up compilation (issue 17): after `precompile`, a mixed workload compiles nothing (JAX's own compile
events, not the runner's counter), and the number of step shapes stays small on CPU."""

from __future__ import annotations

import numpy as np
from jax import monitoring

from jaxserve import LLM, SamplingParams
from jaxserve.config import ModelConfig
from jaxserve.engine.precompile import precompile, step_shapes

CFG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, max_position_embeddings=512)
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Counts XLA backend compilations (persistent-cache hits excluded) from JAX's monitoring events."""

    def __init__(self):
        self.count = 0
        self.active = False
        monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, name, secs, **kw):
        if self.active and name == COMPILE_EVENT:
            self.count += 1


COUNTER = CompileCounter()


def test_no_compilation_after_precompile_for_a_mixed_workload():
    """With a host tier small enough that the workload swaps pages out and back in."""
    llm = LLM(model=CFG, page_size=8, num_pages=64, num_host_pages=96, max_num_batched_tokens=64, max_num_seqs=8,
              seed=0, compilation_cache="off", max_model_len=256)
    result = precompile(llm.engine)
    # 3 step shapes (decode 8 slots, mixed 32 and 64 tokens x 8 slots) and the samplers for 8 slots (plain
    # and extended).
    assert result["step_shapes"] == len(step_shapes(llm.engine.runner)) == 3 + 2
    rng = np.random.default_rng(3)
    shared = list(rng.integers(0, 256, 40))
    # Short and long prompts (chunked prefill), shared prefixes (cache hits), batches of 1-8, greedy and
    # sampled, stop strings and ids: every kind of step a server runs.
    workloads = [
        ([list(rng.integers(0, 256, n)) for n in (1, 5, 17, 63, 64, 65, 200)], SamplingParams(max_tokens=9)),
        ([shared + list(rng.integers(0, 256, n)) for n in (3, 30)], SamplingParams(max_tokens=20, temperature=0.8,
                                                                                 top_p=0.9, top_k=20, seed=1)),
        ([shared + [7]], SamplingParams(max_tokens=3, stop_token_ids=(5,))),
        ([list(rng.integers(0, 256, 10)) for _ in range(8)], SamplingParams(max_tokens=30, ignore_eos=True)),
        # The extended sampler: logprobs, penalties, bias, min_p / min_tokens.
        ([list(rng.integers(0, 256, n)) for n in (4, 70)], SamplingParams(max_tokens=12, logprobs=3,
                                                                          repetition_penalty=1.2)),
        ([shared + [9]] * 3, SamplingParams(max_tokens=6, presence_penalty=0.5, logit_bias={3: 5.0},
                                            min_tokens=2, min_p=0.1, temperature=0.7, seed=2)),
    ]
    COUNTER.active = True
    try:
        for prompts, params in workloads:
            outs = llm.generate(prompts, params)
            assert all(o.token_ids for o in outs)
        # The first long prompt's pages went to the host tier since: they come back in.
        again = llm.generate([workloads[0][0][-1][:120] + [1, 2, 3]], SamplingParams(max_tokens=2))
        assert again[0].num_cached_tokens == 120
    finally:
        COUNTER.active = False
    stats = llm.engine.pool.stats()
    assert stats["swapped_out_pages"] > 0 and stats["swapped_in_pages"] > 0, stats  # the host tier was used
    assert COUNTER.count == 0, f"{COUNTER.count} compilations after precompile"


def test_warm_runs_touch_only_the_sink_page_and_change_no_output():
    """`precompile` runs every step program on sink-page inputs (one live sequence, every slot live): afterwards
    every page but the sink is as allocated (zeros), no page is taken, and greedy outputs equal those of an
    engine that never precompiled."""
    kw = dict(model=CFG, page_size=8, num_pages=64, max_num_batched_tokens=64, max_num_seqs=8, seed=0,
              compilation_cache="off", max_model_len=256)
    warm, plain = LLM(**kw), LLM(**kw)
    free = warm.engine.pool.num_free_pages()
    precompile(warm.engine)
    assert warm.engine.pool.num_free_pages() == free
    assert not np.asarray(warm.engine.pool.kv_cache)[:, 1:].any(), "a warm run wrote outside the sink page"
    rng = np.random.default_rng(4)
    prompts = [list(rng.integers(0, 256, n)) for n in (3, 40, 64, 100)]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    assert [o.token_ids for o in warm.generate(prompts, params)] == [o.token_ids for o in plain.generate(prompts,
                                                                                                         params)]


def test_start_profile_is_kept_next_to_the_compilation_cache(tmp_path):
    """A restart with the same engine and the same compilation-cache folder reuses the start-up profile; any
    change to what the timings depend on (here the points, the engine config) names another file."""
    import jax

    from jaxserve.instance import profiling
    llm = LLM(model=CFG, page_size=8, num_pages=64, max_num_batched_tokens=64, max_num_seqs=8, seed=0,
              compilation_cache="off", max_model_len=256)
    previous = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        assert profiling.profile_cache_file(llm.engine, {}, [(32, 0)]) is None  # no cache folder: no file
        jax.config.update("jax_compilation_cache_dir", str(tmp_path))
        path = profiling.profile_cache_file(llm.engine, {"architecture": "x"}, [(32, 0), (32, 16)])
        assert path.startswith(str(tmp_path)) and profiling.load_profile(path) is None
        profiling.store_profile(path, [(32, 0, 0.01), (32, 16, 0.005)])
        assert profiling.load_profile(path) == [(32, 0, 0.01), (32, 16, 0.005)]
        assert profiling.profile_cache_file(llm.engine, {"architecture": "x"}, [(32, 0), (32, 16)]) == path
        assert profiling.profile_cache_file(llm.engine, {"architecture": "x"}, [(32, 0)]) != path
        other = LLM(model=CFG, page_size=8, num_pages=64, max_num_batched_tokens=64, max_num_seqs=4, seed=0,
                    compilation_cache="off", max_model_len=256)
        assert profiling.profile_cache_file(other.engine, {"architecture": "x"}, [(32, 0), (32, 16)]) != path
        with open(path, "w") as f:
            f.write("{not json")
        assert profiling.load_profile(path) is None  # unreadable: measured again
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)
