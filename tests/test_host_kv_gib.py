"""Host tier sized from a byte budget (issue 18): `LLM(host_kv_gib=...)` / `--host_kv_gib` set num_host_pages
from the pool's page size (its storage dtype, scales included for 8-bit KV)."""

import pytest

from jaxserve.config import ModelConfig, kv_page_bytes


def test_page_bytes_of_a_real_model():
    llama8b = ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                          num_kv_heads=8, head_dim=128)
    assert kv_page_bytes(llama8b, 16, 2) == 32 * 16 * 2 * 8 * 128 * 2 == 2 * 2**20  # 2 MiB per 16-token page


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_llm_sizes_its_host_tier_from_gib(kv_cache_dtype):
    from jaxserve import LLM
    llm = LLM("demo", page_size=16, num_pages=32, host_kv_gib=0.01, kv_cache_dtype=kv_cache_dtype,
              compilation_cache="off")
    pool = llm.engine.pool
    assert pool.num_host_pages == int(0.01 * 2**30 // pool.page_bytes) > 0
    if kv_cache_dtype == "auto":  # f32 storage on CPU
        assert pool.page_bytes == kv_page_bytes(llm.model_config, 16, 4)
    with pytest.raises(ValueError, match="not both"):
        LLM("demo", num_host_pages=8, host_kv_gib=0.01)
    with pytest.raises(ValueError, match="host_kv_gib must be >= 0"):
        LLM("demo", host_kv_gib=-1)
