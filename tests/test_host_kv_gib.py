"""Host tier sized from a byte budget (issue 18): `LLM(host_kv_gib=...)` / `--host_kv_gib` set num_host_pages
from the model's KV page size in the pool's dtype."""

import numpy as np
import pytest

from jaxserve.config import ModelConfig, host_pages_for_gib, kv_page_bytes


def test_page_bytes_and_pages_for_a_budget():
    llama8b = ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                          num_kv_heads=8, head_dim=128)
    assert kv_page_bytes(llama8b, 16, 2) == 32 * 16 * 2 * 8 * 128 * 2 == 2 * 2**20  # 2 MiB per 16-token page
    assert host_pages_for_gib(llama8b, 16, 2, 100) == 51200
    assert host_pages_for_gib(llama8b, 16, 2, 0) == 0
    with pytest.raises(ValueError, match="host_kv_gib must be >= 0"):
        host_pages_for_gib(llama8b, 16, 2, -1)


def test_llm_sizes_its_host_tier_from_gib():
    from jaxserve import LLM
    from jaxserve.engine.engine import kv_storage_dtype
    llm = LLM("demo", page_size=16, num_pages=32, host_kv_gib=0.01)
    cfg = llm.model_config
    page = kv_page_bytes(cfg, 16, np.dtype(kv_storage_dtype(cfg)).itemsize)
    pool = llm.engine.pool
    assert pool.num_host_pages == int(0.01 * 2**30 // page) > 0
    with pytest.raises(ValueError, match="not both"):
        LLM("demo", num_host_pages=8, host_kv_gib=0.01)
