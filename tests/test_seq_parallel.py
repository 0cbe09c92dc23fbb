"""Sequence-parallel (context-parallel) prefill: ring attention vs its dense oracle, model logits vs the
single-device dense forward (with and without a cached prefix read from pool pages), engine greedy tokens vs
the dense greedy loop on 2-D meshes (seq x tp), no page leaks. Shapes are chosen so each mesh compiles few
programs (the suite shares 2 CPU cores)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.config import CacheConfig, ModelConfig
from jaxserve.engine.seq_parallel import SequenceParallelPrefill
from jaxserve.kernels import ring_attention as ra
from jaxserve.mempool import MemPool
from jaxserve.model.decoder import forward_dense, init_params, kv_cache_partition_spec, param_partition_specs

CFG = ModelConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=256,
                  eos_token_id=(257,))
PAGE = 8
ATOL = 2e-5  # f32


def mesh_of(seq: int, tp: int = 1):
    return jax.sharding.Mesh(np.asarray(jax.devices()[:seq * tp]).reshape(seq, tp), ("seq", "tp"))


@functools.lru_cache(maxsize=None)
def _params():
    return init_params(CFG, jax.random.PRNGKey(0))


@functools.lru_cache(maxsize=None)
def _dense():
    return jax.jit(lambda p, x: forward_dense(p, CFG, x))


def dense_logits(tokens):
    return np.asarray(_dense()(_params(), jnp.asarray([tokens], jnp.int32)))[0]


def dense_greedy(prompt, n, width=80):
    toks = list(prompt)
    for _ in range(n):
        logits = _dense()(_params(), jnp.asarray([toks + [0] * (width - len(toks))], jnp.int32))
        toks.append(int(jnp.argmax(logits[0, len(toks) - 1])))
    return toks[len(prompt):]


# ----------------------------------------------------------------------------------------------- kernel
@pytest.mark.parametrize("n,length,prefix_rows,prefix_len", [(2, 13, 16, 9), (8, 50, 32, 30)])
def test_ring_attention_matches_dense(n, length, prefix_rows, prefix_len):
    rng = np.random.default_rng(n)
    lpad = ra.padded_length(length, n)
    order = ra.zigzag_order(lpad, n)
    assert sorted(order) == list(range(lpad))
    q = rng.standard_normal((lpad, 4, 16)).astype(np.float32)
    k, v = (rng.standard_normal((lpad, 2, 16)).astype(np.float32) for _ in range(2))
    pkv = rng.standard_normal((prefix_rows, 4, 16)).astype(np.float32)
    pkv[prefix_len:] = np.nan  # rows past the prefix (page tails) must be invisible
    pos = (prefix_len + np.arange(lpad)).astype(np.int32)
    ref = np.asarray(ra.ring_attention_reference(q, k, v, pos, pkv[:, 0::2], pkv[:, 1::2], prefix_len,
                                                 sm_scale=0.25))
    out = jax.jit(lambda *a: ra.ring_attention(*a, mesh=mesh_of(n), sm_scale=0.25))(
        q[order], k[order], v[order], pos[order], pkv, prefix_len)
    out = np.asarray(out)[np.argsort(order)]
    np.testing.assert_allclose(out[:length], ref[:length], atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------ model
@pytest.mark.parametrize("seq,tp", [(2, 1), (4, 1), (8, 1)])
def test_prefill_logits_and_kv_match_single_device(seq, tp):
    """Prompt of 45 tokens (not a multiple of the page size 8 or of 2N): the first 21 are prefilled
    sequence-parallel with no prefix (one of its pages is partial), then the other 24 with those 21 as cached
    prefix read from the pool. Logits of every token match the dense forward; the pool's K/V match a
    single-device paged prefill of the whole prompt."""
    mesh = mesh_of(seq, tp)
    pool = MemPool(CFG, CacheConfig(page_size=PAGE, num_pages=16),
                   sharding=jax.sharding.NamedSharding(mesh, kv_cache_partition_spec()))
    params = jax.tree.map(lambda x, s: jax.device_put(x, jax.sharding.NamedSharding(mesh, s)), _params(),
                          param_partition_specs(CFG))
    sp = SequenceParallelPrefill(CFG, params, pool, mesh)
    tokens = list(np.random.default_rng(seq * 10 + tp).integers(0, 256, 45))
    pages = pool.alloc(-(-45 // PAGE))
    dense = dense_logits(tokens)
    greedy_1, first = sp.forward(tokens[:21], 0, pages, logits_for="all")
    greedy_2, second = sp.forward(tokens[21:], 21, pages, logits_for="all")
    np.testing.assert_allclose(np.asarray(first), dense[:21], atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(second), dense[21:], atol=ATOL, rtol=0)
    # Greedy next tokens at every position (the engine samples the last one) = the dense run's.
    np.testing.assert_array_equal(np.concatenate([greedy_1, greedy_2]), dense.argmax(-1))

    # K/V in the pool = the single-device engine step's K/V for the same prompt.
    from jaxserve.engine.model_runner import jitted_step
    from jaxserve.engine.sampling import sampling_arrays
    from jaxserve.model.batch import make_attention_batch
    ref_cache = jnp.zeros_like(np.asarray(pool.kv_cache))
    ref_pages = list(range(1, 7))
    batch, positions = make_attention_batch([45], [45], [ref_pages], page_size=PAGE, num_tokens=48)
    toks = np.zeros(48, np.int32)
    toks[:45] = tokens
    no_previous = np.full(48, -1, np.int32)  # every token given (none read from a previous step's samples)
    _, _, ref_cache = jitted_step(CFG, "reference")(_params(), ref_cache, np.zeros(8, np.int32), toks, no_previous,
                                                    positions, batch, np.array([44], np.int32),
                                                    sampling_arrays([None], [0], [0], 1), decode_only=False)
    got = np.asarray(pool.kv_cache)[:, pages].reshape(CFG.num_layers, -1, 2 * CFG.num_kv_heads, CFG.head_dim)
    want = np.asarray(ref_cache)[:, ref_pages].reshape(got.shape)
    np.testing.assert_allclose(got[:, :45], want[:, :45], atol=ATOL, rtol=0)
    pool.free(pages)
    pool.check_invariants()


# ----------------------------------------------------------------------------------------------- engine
def assert_no_leak(llm):
    pool = llm.engine.pool
    pool.check_invariants()
    assert not llm.engine.has_unfinished()
    assert pool.num_free_pages() + pool.num_evictable_pages() == pool.num_pages - 1, pool.stats()


def test_engine_long_prompts_use_sequence_parallel_prefill(seq=2, tp=2):
    """2-D mesh seq=2 x tp=2. A long prompt (no cache), a second one sharing 40 cached tokens with it (cached
    prefix read from the pool, suffix still above the threshold), and a short one (normal path): greedy tokens
    equal the dense greedy loop; decode continues from the KV the ring wrote into the pool. (2, 4 and 8
    devices without tp are covered at the model level above: same code path, fewer compilations.)"""
    rng = np.random.default_rng(7)
    doc = list(rng.integers(0, 256, 43))
    long_a = doc + list(rng.integers(0, 256, 10))        # 53 tokens, nothing cached
    long_b = doc + list(rng.integers(0, 256, 18))        # 61 tokens, 40 cached (5 pages), 21 computed
    short = list(rng.integers(0, 256, 5))
    llm = LLM(model=CFG, page_size=PAGE, num_pages=64, max_num_batched_tokens=64, max_num_seqs=4, seed=0,
              compilation_cache="off", sequence_parallel=seq, tp=tp, sp_threshold=16)
    sp = SamplingParams(max_tokens=3, ignore_eos=True)
    outs = [llm.generate([p], sp)[0] for p in (long_a, long_b, short)]
    for p, o in zip((long_a, long_b, short), outs):
        assert o.token_ids == dense_greedy(p, 3), (len(p), o.num_cached_tokens)
    assert [o.num_cached_tokens for o in outs] == [0, 40, 0]
    assert llm.stats()["num_sequence_parallel_prefills"] == 2
    assert_no_leak(llm)


def test_disaggregated_prefill_on_seq_tp_mesh():
    """Prefill engine on a seq=2 x tp=2 mesh (sequence-parallel prefill), decode engine tp=1 on other devices,
    PD-Caching-2: greedy tokens equal the dense loop, the second turn sends only its 21 new tokens' KV, no leaks
    on either side."""
    rng = np.random.default_rng(7)
    doc = list(rng.integers(0, 256, 43))
    prompts = [doc + list(rng.integers(0, 256, 10)), doc + list(rng.integers(0, 256, 18))]
    llm = LLM(model=CFG, page_size=PAGE, num_pages=64, max_num_batched_tokens=64, max_num_seqs=4, seed=0,
              compilation_cache="off", disaggregated=True, prefill_devices=[0, 1, 2, 3], decode_devices=[4, 5],
              prefill_tp=2, decode_tp=1, sequence_parallel=2, sp_threshold=16, pd_mode="caching2")
    outs = [llm.generate([p], SamplingParams(max_tokens=3, ignore_eos=True))[0] for p in prompts]
    for p, o in zip(prompts, outs):
        assert o.token_ids == dense_greedy(p, 3)
    assert [o.num_cached_tokens for o in outs] == [0, 40]
    assert [o.transferred_tokens for o in outs] == [53, 21]
    assert dict(llm.pair.prefill.mesh.shape) == {"seq": 2, "tp": 2}
    assert llm.pair.prefill.stats()["num_sequence_parallel_prefills"] == 2
    for engine in (llm.pair.prefill, llm.pair.decode):
        engine.pool.check_invariants()
        assert engine.pool.num_free_pages() + engine.pool.num_evictable_pages() == engine.pool.num_pages - 1


def test_block_attention_query_tiling_is_exact():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((64, 4, 16)).astype(np.float32)
    kv = rng.standard_normal((40, 2, 16)).astype(np.float32)
    q_pos, k_pos = np.arange(64, dtype=np.int32), np.arange(40, dtype=np.int32) * 2
    tiled = ra.block_attention(q, kv, kv, q_pos, k_pos, k_pos < 70, sm_scale=0.3, block_q=16)
    whole = ra.block_attention(q, kv, kv, q_pos, k_pos, k_pos < 70, sm_scale=0.3, block_q=64)
    np.testing.assert_allclose(np.asarray(tiled[0]), np.asarray(whole[0]), atol=ATOL, rtol=0)
    np.testing.assert_array_equal(np.isinf(tiled[1]), np.isinf(whole[1]))
    np.testing.assert_allclose(np.where(np.isinf(tiled[1]), 0, tiled[1]), np.where(np.isinf(whole[1]), 0, whole[1]),
                               atol=ATOL, rtol=0)
