"""A bf16 model's KV pool on CPU stores its rows' bf16 bits in uint16 (`engine.kv_storage_dtype`): greedy output is
token-identical to the same engine over an f32 pool (the attention paths round every key block to bf16 either way),
with prefix caching, a host tier, preemption and a disaggregated pair; a page takes half the bytes; pages move
between pools stored differently."""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.config import ModelConfig
from jaxserve.engine import engine as engine_module
from jaxserve.engine.engine import kv_storage_dtype
from jaxserve.kernels import kv_quant
from jaxserve.mempool.kv_store import BF16_BITS, convert_storage

CFG = ModelConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=256,
                  eos_token_id=(257,), weight_dtype="bfloat16")
PAGE = 8
GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


def test_which_models_store_bf16_bits():
    assert kv_storage_dtype(CFG, "cpu") == "uint16"
    assert kv_storage_dtype(dataclasses.replace(CFG, dtype="bfloat16", weight_dtype=None), "cpu") == "uint16"
    assert kv_storage_dtype(CFG, "cpu", attention_impl="pallas") == "float32"  # the kernels read the pool as is
    assert kv_storage_dtype(dataclasses.replace(CFG, weight_dtype=None), "cpu") == "float32"  # an f32 model
    assert kv_storage_dtype(dataclasses.replace(CFG, kv_cache_dtype="int8"), "cpu") == "float32"  # uint8 rows
    assert kv_storage_dtype(dataclasses.replace(CFG, dtype="bfloat16", weight_dtype=None), "gpu") == "bfloat16"


def test_converting_between_storages_keeps_the_bf16_values():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4, 16)), jnp.float32)
    as_bf16 = x.astype(jnp.bfloat16)
    bits = convert_storage(x, BF16_BITS)
    assert bits.dtype == BF16_BITS
    np.testing.assert_array_equal(np.asarray(kv_quant.dequantize(bits, "auto", jnp.float32)),
                                  np.asarray(as_bf16.astype(jnp.float32)))
    np.testing.assert_array_equal(np.asarray(convert_storage(bits, jnp.bfloat16)), np.asarray(as_bf16))
    np.testing.assert_array_equal(np.asarray(convert_storage(as_bf16, BF16_BITS)), np.asarray(bits))
    np.testing.assert_array_equal(np.asarray(convert_storage(bits, jnp.float32)),
                                  np.asarray(as_bf16.astype(jnp.float32)))
    assert convert_storage(bits, BF16_BITS) is bits
    np.testing.assert_array_equal(np.asarray(kv_quant.encode_kv(x, "auto", BF16_BITS)), np.asarray(bits))


def _prompts():
    rng = np.random.default_rng(3)
    prefix = rng.integers(0, 256, 40).tolist()
    return [prefix + rng.integers(0, 256, n).tolist() for n in (3, 11, 29)] + [rng.integers(0, 256, 70).tolist()]


def _generate(monkeypatch, storage: str | None, **kw):
    """Token ids of two passes over the prompts (the second over cached prefixes), and the engine."""
    if storage is not None:
        monkeypatch.setattr(engine_module, "kv_storage_dtype", lambda *a, **k: storage)
    opts = dict(page_size=PAGE, num_pages=96, max_num_batched_tokens=64, max_num_seqs=8, seed=0,
                compilation_cache="off")
    opts.update(kw)
    llm = LLM(model=CFG, **opts)
    prompts = [{"prompt_token_ids": p} for p in _prompts()]
    first = llm.generate(prompts, GREEDY)
    second = llm.generate(prompts, GREEDY)
    monkeypatch.undo()
    return [o.outputs[0].token_ids for o in first + second], first + second, llm


@functools.lru_cache(maxsize=None)
def _colocated() -> tuple:
    """The reference: a colocated engine over the bits pool with room for every prompt."""
    return tuple(map(tuple, _generate(pytest.MonkeyPatch(), None)[0]))


def test_bits_pool_matches_an_f32_pool_token_for_token(monkeypatch):
    """A pool too small for all prompts at once (preemption) with a host tier, over bits and over f32."""
    kw = dict(num_pages=24, num_host_pages=48)
    bits, outs, llm = _generate(monkeypatch, None, **kw)
    assert llm.engine.pool.dtype == BF16_BITS
    f32, _, f32_llm = _generate(monkeypatch, "float32", **kw)
    assert f32_llm.engine.pool.dtype == jnp.float32
    assert bits == f32 == [list(t) for t in _colocated()]
    assert sum(o.num_cached_tokens for o in outs[4:]) >= 3 * 40  # the second pass reused the prefixes
    assert sum(o.num_preemptions for o in outs) > 0
    assert llm.engine.pool.page_bytes * 2 == f32_llm.engine.pool.page_bytes


def test_half_the_bytes_per_page_doubles_the_pages_of_a_budget():
    budget = 1 << 20
    bits = LLM(model=CFG, page_size=PAGE, kv_cache_memory_bytes=budget, compilation_cache="off").engine.pool
    f32 = LLM(model=dataclasses.replace(CFG, weight_dtype=None), page_size=PAGE, kv_cache_memory_bytes=budget,
              compilation_cache="off").engine.pool
    assert (bits.dtype, f32.dtype) == (BF16_BITS, jnp.float32)
    assert bits.num_pages == 2 * f32.num_pages


def test_disaggregated_pair_of_bits_pools_matches_colocated(monkeypatch):
    pair, _, llm = _generate(monkeypatch, None, disaggregated=True, pd_mode="caching2", prefill_devices=[0, 1],
                             decode_devices=[2, 3])
    assert pair == [list(t) for t in _colocated()]
    assert llm.pair.prefill.pool.dtype == llm.pair.decode.pool.dtype == BF16_BITS


def test_pages_move_between_an_f32_pool_and_a_bits_pool(monkeypatch):
    """A prefill engine over f32 (as a Pallas one on CPU stores it) beside a decode engine over bf16 bits: the
    moved pages are converted on arrival and greedy output matches colocated."""
    storages = iter(["float32", "uint16"])  # the pair builds its prefill engine first
    monkeypatch.setattr(engine_module, "kv_storage_dtype", lambda *a, **k: next(storages))
    llm = LLM(model=CFG, page_size=PAGE, num_pages=96, max_num_batched_tokens=64, max_num_seqs=8, seed=0,
              compilation_cache="off", disaggregated=True, pd_mode="basic", prefill_devices=[0, 1],
              decode_devices=[2, 3])
    monkeypatch.undo()
    assert (llm.pair.prefill.pool.dtype, llm.pair.decode.pool.dtype) == (jnp.float32, BF16_BITS)
    prompts = [{"prompt_token_ids": p} for p in _prompts()]
    outs = llm.generate(prompts, GREEDY) + llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == [list(t) for t in _colocated()]
