"""Quantized KV pages in the pool (issue 19): the pool sized in bytes, and every path that moves pages moving
their scales with them (they live in the pages' rows, kernels/kv_quant.py): host tier, same-process
transfer between meshes, chunked and per-shard cross-process blocks; mismatched kv_cache_dtype refused."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.config import CacheConfig, ModelConfig
from jaxserve.kernels import kv_quant
from jaxserve.mempool import MemPool
from jaxserve.mempool import transfer as tr
from jaxserve.mempool.kv_store import page_bytes, size_cache
from jaxserve.mempool.transfer import ops

PAGE = 4
CFG = ModelConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, max_position_embeddings=512)


def make_pool(device_ids=(0,), kv_cache_dtype="fp8_e4m3", num_pages=32, num_host_pages=0):
    from jaxserve.model.decoder import kv_cache_partition_spec
    by_id = {d.id: d for d in jax.devices()}
    mesh = jax.sharding.Mesh(np.asarray([by_id[i] for i in device_ids]), ("tp",))
    return MemPool(CFG, CacheConfig(page_size=PAGE, num_pages=num_pages, num_host_pages=num_host_pages,
                                    kv_cache_dtype=kv_cache_dtype),
                   sharding=jax.sharding.NamedSharding(mesh, kv_cache_partition_spec()), dtype="float32")


def fill(pool, pages, seed=0):
    """Random K/V quantized into `pages`; returns the stored bytes [layers, n, ...]."""
    x = np.random.default_rng(seed).standard_normal((pool.page_shape[0], len(pages)) + pool.page_shape[1:3]
                                                    + (CFG.head_dim,)).astype(np.float32) * 3
    data = np.asarray(kv_quant.quantize(jnp.asarray(x), pool.kv_cache_dtype))
    idx = tr.padded_index(pages)
    block = np.zeros((data.shape[0], idx.size) + data.shape[2:], np.uint8)
    block[:, :len(pages)] = data
    tr.scatter_block(pool, pages, jax.device_put(block, pool.sharding))
    return data


def read(pool, pages):
    return np.asarray(pool.kv_cache)[:, list(pages)]


def need_devices(n):
    if len(jax.devices()) < n:
        pytest.skip(f"needs {n} devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")


def test_config_names_agree_with_the_kernels():
    from jaxserve import config
    assert config.KV_CACHE_DTYPES == kv_quant.KV_CACHE_DTYPES and config.KV_SCALE_BYTES == kv_quant.SCALE_BYTES
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        CacheConfig(kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="memory_bytes must be > 0"):
        CacheConfig(memory_bytes=0)


def test_pool_sizes_itself_in_bytes():
    """One budget: 8-bit pages (head_dim + 4 bytes a row) against bf16 (2 * head_dim) and f32 (4 * head_dim)."""
    cfg = dataclasses.replace(CFG, head_dim=128)
    budget = 64 << 20
    pages = {}
    for kvd, dtype in (("auto", "float32"), ("auto", "bfloat16"), ("int8", "float32"), ("fp8_e5m2", "bfloat16")):
        cache = size_cache(cfg, CacheConfig(page_size=16, memory_bytes=budget, host_memory_bytes=budget // 2,
                                            kv_cache_dtype=kvd), dtype)
        row = {"float32": 4 * 128, "bfloat16": 2 * 128}[dtype] if kvd == "auto" else 128 + 4
        per_page = 2 * 16 * 2 * 2 * row
        assert page_bytes(cfg, cache, dtype) == per_page
        assert cache.num_pages == budget // per_page and cache.num_host_pages == budget // 2 // per_page
        pages[kvd, dtype] = cache.num_pages
    assert pages["int8", "float32"] == pages["fp8_e5m2", "bfloat16"]  # 8 bits whatever the model's dtype
    assert 1.85 < pages["int8", "float32"] / pages["auto", "bfloat16"] < 2.0       # 256 / 132
    assert 3.7 < pages["int8", "float32"] / pages["auto", "float32"] < 4.0         # 512 / 132
    with pytest.raises(ValueError, match="at least 2 are needed"):
        size_cache(cfg, CacheConfig(memory_bytes=1000, kv_cache_dtype="int8"), "float32")
    pool = make_pool(kv_cache_dtype="int8")
    assert pool.kv_cache.dtype == jnp.uint8 and pool.page_shape[-1] == CFG.head_dim + 4
    assert pool.page_bytes == pool.kv_cache.nbytes // pool.num_pages


def test_host_tier_round_trip_keeps_values_and_scales():
    pool = make_pool(num_host_pages=8)
    pages = pool.alloc(3)
    data = fill(pool, pages, seed=1)
    pool.copy_to_host(pages, [5, 2, 7])
    assert pool.host_cache.dtype == np.uint8
    back = pool.alloc(3)
    pool.copy_to_device([5, 2, 7], back)
    np.testing.assert_array_equal(read(pool, back), data)
    pool.free(pages)
    pool.free(back)


@pytest.mark.parametrize("src_devs,dst_devs", [((0, 1), (4, 5)), ((0,), (4, 5, 6, 7)), ((0, 1, 2, 3), (6,))])
def test_same_process_transfer_moves_scales(src_devs, dst_devs):
    need_devices(8)
    src, dst = make_pool(src_devs), make_pool(dst_devs)
    sp, dp = src.alloc(5), dst.alloc(5)
    data = fill(src, sp, seed=2)
    src.transfer(dst, sp, dp)
    np.testing.assert_array_equal(read(dst, dp), data)
    got = kv_quant.dequantize(jnp.asarray(read(dst, dp)), "fp8_e4m3")
    np.testing.assert_array_equal(got, kv_quant.dequantize(jnp.asarray(data), "fp8_e4m3"))
    src.free(sp)
    dst.free(dp)


@pytest.mark.parametrize("src_devs,dst_devs", [((0, 1), (4, 5, 6, 7)), ((0, 1, 2, 3), (6,))])
def test_chunked_and_per_shard_blocks_move_scales(src_devs, dst_devs, monkeypatch):
    """The cross-process shapes of a transfer (what multi-process instances and gRPC PD use): a block in
    chunks, and per-shard pieces cut at the receiver's head boundaries; the scales sit on the head_dim axis,
    which no cut crosses."""
    need_devices(8)
    monkeypatch.setattr(ops, "MIN_CHUNK_BYTES", 1)
    src, dst = make_pool(src_devs, "int8"), make_pool(dst_devs, "int8")
    sp, dp = src.alloc(5), dst.alloc(5)
    data = fill(src, sp, seed=3)
    chunks = tr.gather_chunks(src, sp)
    assert len(chunks) > 1
    tr.scatter_block(dst, dp, [jax.device_put(x, dst.sharding) for x in chunks])
    np.testing.assert_array_equal(read(dst, dp), data)
    dp2 = dst.alloc(5)
    server = tr.TransferServer()
    sources, chunks, _, _ = tr.offer_shards(server, src, sp, tr.pool_layout(dst), server.reserve_uuids(1),
                                            [server.address])
    got = tr.receive_shards(server, dst, sources, chunks[0].shape, str(chunks[0].dtype), len(chunks), 30)
    tr.scatter_block(dst, dp2, got)
    np.testing.assert_array_equal(read(dst, dp2), data)
    src.free(sp)
    dst.free(dp + dp2)


def test_mismatched_kv_cache_dtype_is_refused():
    need_devices(2)
    src, dst = make_pool((0,), "fp8_e4m3"), make_pool((1,), "int8")
    sp, dp = src.alloc(1), dst.alloc(1)
    with pytest.raises(ValueError, match="kv_cache_dtype differs: the sender stores 'fp8_e4m3', the receiver 'int8'"):
        src.transfer(dst, sp, dp)
    with pytest.raises(ValueError, match="kv_cache_dtype differs"):
        src.transfer_with_insert(dst, list(range(PAGE)), sp)
    plain = make_pool((1,), "auto")
    with pytest.raises(ValueError, match="kv_cache_dtype differs"):
        src.transfer(plain, sp, plain.alloc(1))


def test_llm_sizes_its_pool_from_a_byte_budget_and_reports_it(caplog):
    """LLM(kv_cache_dtype=..., kv_cache_memory_bytes=...) -> the engine's pool, its page count at that format,
    and the start-up line that reports it."""
    import logging

    from jaxserve import LLM
    budget = 1 << 20
    pages = {}
    with caplog.at_level(logging.INFO, logger="jaxserve.engine.engine"):
        for kvd in ("auto", "int8"):
            llm = LLM(model=CFG, page_size=PAGE, kv_cache_dtype=kvd, kv_cache_memory_bytes=budget,
                      host_kv_gib=budget / 2 / 2**30, compilation_cache="off")
            pool = llm.engine.pool
            assert pool.kv_cache_dtype == kvd and llm.engine.model_config.kv_cache_dtype == kvd
            assert pool.num_pages == budget // pool.page_bytes and pool.num_host_pages == budget // 2 // pool.page_bytes
            pages[kvd] = pool.num_pages
    assert pages["int8"] == budget // (2 * PAGE * 2 * 2 * (16 + 4))  # f32 storage on CPU: 64 bytes a row
    assert pages["int8"] / pages["auto"] == pytest.approx(64 / 20, rel=0.01)
    assert any("KV cache: int8" in r.getMessage() and "pages/GiB" in r.getMessage() for r in caplog.records)
