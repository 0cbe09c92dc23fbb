"""Elastic memory pool of one serving instance: paged KV cache on device and host tiers, prompt index,
LRU eviction (MemServe §3).

The bookkeeping (allocator, prompt_index, eviction, pagebook, prefix_cache) is numpy only and imports without
jax; `MemPool` (the bookkeeping over jax arrays: kv_store, mempool) and `transfer` are imported on first use.
"""

from jaxserve.mempool.allocator import PageAllocator
from jaxserve.mempool.pagebook import PageBook
from jaxserve.mempool.prompt_index import DEVICE, HOST, Node, PromptIndex

__all__ = ["DEVICE", "HOST", "MemPool", "Node", "PageAllocator", "PageBook", "PromptIndex"]


def __getattr__(name: str):
    if name == "MemPool":  # lazily: it imports jax
        from jaxserve.mempool.mempool import MemPool
        return MemPool
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
