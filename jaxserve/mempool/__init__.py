"""Elastic memory pool of one serving instance: paged KV cache on device and host tiers, prompt index,
LRU eviction (MemServe §3)."""

from jaxserve.mempool.allocator import PageAllocator
from jaxserve.mempool.mempool import MemPool
from jaxserve.mempool.prompt_index import DEVICE, HOST, Node, PromptIndex

__all__ = ["DEVICE", "HOST", "MemPool", "Node", "PageAllocator", "PromptIndex"]
