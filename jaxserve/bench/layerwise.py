"""Benchmark baseline without aggregation (jaxserve/launch/bench_disagg.py, tests/test_transfer.py): the KV of each layer's
K and V moves separately, 2 x layers gathers, device_puts and scatters per request, as a system whose cache is
one array per layer and per K/V would do. Not used for serving."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxserve.mempool.transfer.ops import OpCounts, _count, check_compatible, padded_index, pool_sharding


@jax.jit
def _gather_layer(kv: jax.Array, layer: jax.Array, idx: jax.Array, kv_half: jax.Array) -> jax.Array:
    # Layer-by-layer baseline: one layer's K (kv_half=0) or V (kv_half=1) of the pages, heads interleaved.
    x = jax.lax.dynamic_index_in_dim(kv, layer, 0, keepdims=False)[idx]
    return jax.lax.dynamic_slice_in_dim(x.reshape(x.shape[:2] + (-1, 2, x.shape[-1])), kv_half, 1, axis=3)


@functools.lru_cache(maxsize=None)
def _scatter_layer_fn(sharding):
    def scatter(kv, layer, idx, kv_half, part):
        shape = kv.shape
        x = kv.reshape(shape[:3] + (-1, 2, shape[-1]))
        cur = x[layer, idx]
        cur = jax.lax.dynamic_update_slice_in_dim(cur, part.astype(kv.dtype), kv_half, axis=3)
        return x.at[layer, idx].set(cur).reshape(shape)
    if sharding is None:
        return jax.jit(scatter, donate_argnums=0)
    return jax.jit(scatter, donate_argnums=0, out_shardings=sharding)


def local_transfer_layerwise(src, dst, src_pages: Sequence[int], dst_pages: Sequence[int],
                             counts: OpCounts | None = None) -> None:
    """Baseline without aggregation: K and V of each layer move separately (2 x layers gathers, device_puts
    and scatters), as a system whose cache is one array per layer and per K/V would do."""
    if len(src_pages) != len(dst_pages):
        raise ValueError(f"{len(src_pages)} source pages but {len(dst_pages)} destination pages")
    if not src_pages:
        return
    check_compatible(src, dst)
    sidx, didx = padded_index(src_pages), padded_index(dst_pages)
    scatter = _scatter_layer_fn(dst.sharding)
    target = pool_sharding(dst)
    if isinstance(target, NamedSharding):  # a part is [pages, page_size, Hkv, 1, D]: heads on axis 2
        target = NamedSharding(target.mesh, PartitionSpec(None, None, target.spec[3], None, None))
    for layer in range(src.kv_cache.shape[0]):
        for half in (0, 1):
            _count(counts, "gather")
            part = _gather_layer(src.kv_cache, np.int32(layer), sidx, np.int32(half))
            _count(counts, "device_put")
            part = jax.device_put(part, target)
            _count(counts, "scatter")
            dst.kv_cache = scatter(dst.kv_cache, np.int32(layer), didx, np.int32(half), part)
