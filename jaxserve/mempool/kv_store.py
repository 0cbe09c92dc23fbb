"""KvStore: the KV arrays of one instance's pool — the paged device cache (a jax array, possibly sharded over
a mesh or several processes), the host tier (numpy), and the copies between them (one gather / one in-place
scatter for all layers). It knows nothing about which page holds what: that is the PageBook's
(jaxserve/mempool/pagebook.py); MemPool (jaxserve/mempool/mempool.py) joins the two.

On a multi-process instance (its pool a global array spanning several hosts) every process keeps the host tier
of its own shards only (`host_cache` holds this process's range of the KV-head axis). Every copy between the
tiers runs as a device op ("copy_to_host" / "copy_to_device") on the instance's op channel, given to the
constructor: the leader sends it to the other processes, which run the same copy on their shards
(jaxserve/engine/device_ops.py, multihost.py); the host-side bookkeeping is the leader's.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import CacheConfig, ModelConfig, kv_row_width
from jaxserve.util import next_pow2


@jax.jit
def _gather_pages(kv: jax.Array, idx: jax.Array) -> jax.Array:
    # One gather for all layers (MemServe's huge-page aggregation), laid out page-major so each page's K and
    # V for every layer are one contiguous block on the host.
    return jnp.swapaxes(kv[:, idx], 0, 1)


def _scatter_pages(kv: jax.Array, idx: jax.Array, data: jax.Array) -> jax.Array:
    return kv.at[:, idx].set(convert_storage(jnp.swapaxes(data, 0, 1), kv.dtype))


@functools.lru_cache(maxsize=None)
def _scatter_fn(sharding: jax.sharding.Sharding | None):
    # Module-level cache: pools with the same sharding share compiled executables. The output sharding is
    # pinned to the pool's so the cache stays where the engine's jitted step expects it, and the donated
    # input can be reused in place.
    if sharding is None:
        return jax.jit(_scatter_pages, donate_argnums=0)
    return jax.jit(_scatter_pages, donate_argnums=0, out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _gather_fn(sharding: jax.sharding.Sharding):
    # Multi-process pools: the gathered pages keep the pool's head sharding, so each process reads its shards.
    return jax.jit(lambda kv, idx: jnp.swapaxes(kv[:, idx], 0, 1), out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _zeros_fn(shape: tuple[int, ...], dtype: np.dtype, sharding: jax.sharding.Sharding):
    # Creating the zeros under jit with out_shardings materialises each shard on its own device instead of
    # building the whole cache on one device first.
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


def _local_heads(sharding: jax.sharding.Sharding, shape: tuple[int, ...]) -> tuple[int, int]:
    """This process's range of the KV-head axis (3) of a pool sharded over several processes."""
    ranges = sorted({index[3].indices(shape[3])[:2] for index in
                     sharding.addressable_devices_indices_map(shape).values()})
    for (_, end), (start, _) in zip(ranges, ranges[1:]):
        if start != end:
            raise ValueError(f"a multi-process pool needs each process's KV heads contiguous, got {ranges}")
    for index in sharding.addressable_devices_indices_map(shape).values():
        if any(sl.indices(n)[:2] != (0, n) for axis, (sl, n) in enumerate(zip(index, shape)) if axis != 3):
            raise ValueError(f"a multi-process pool must be sharded on the KV-head axis only, got {sharding}")
    return ranges[0][0], ranges[-1][1]


# An unquantized bf16 pool on CPU stores its rows' bits in uint16 (engine.kv_storage_dtype; the attention
# kernels bitcast them back, kernels/kv_quant.py): XLA:CPU scatters uint16 in place but a bf16 cache through f32.
BF16_BITS = np.dtype(np.uint16)


def convert_storage(x: jax.Array, storage) -> jax.Array:
    """Unquantized rows from one storage dtype to another, `BF16_BITS` on either side (a page moved between
    pools stored differently: a GPU's bf16, a CPU's bf16 bits or f32); the same dtype is left as it is."""
    storage = jnp.dtype(storage)
    if x.dtype == storage:
        return x
    if x.dtype == BF16_BITS:
        x = jax.lax.bitcast_convert_type(x, jnp.bfloat16)
    if storage == BF16_BITS:
        return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), BF16_BITS)
    return x.astype(storage)


def storage_dtype(cache_cfg: CacheConfig, dtype) -> np.dtype:
    """The pool array's dtype: uint8 for an 8-bit kv_cache_dtype (XLA:CPU scatters it in place; a float8
    scatter converts the whole cache), else `dtype`."""
    return np.dtype("uint8") if cache_cfg.kv_cache_dtype != "auto" else np.dtype(jnp.dtype(dtype))


def page_bytes(model_cfg: ModelConfig, cache_cfg: CacheConfig, dtype) -> int:
    """Bytes of one page: K and V of every layer and KV head, scales included."""
    rows = model_cfg.num_layers * cache_cfg.page_size * 2 * model_cfg.num_kv_heads
    return rows * kv_row_width(model_cfg.head_dim, cache_cfg.kv_cache_dtype) * storage_dtype(cache_cfg, dtype).itemsize


def size_cache(model_cfg: ModelConfig, cache_cfg: CacheConfig, dtype) -> CacheConfig:
    """`cache_cfg` with num_pages (num_host_pages) derived from memory_bytes (host_memory_bytes) when set:
    the pages that fit the budget at this storage dtype, page 0 (the padding sink) included."""
    per_page = page_bytes(model_cfg, cache_cfg, dtype)
    changes = {}
    if cache_cfg.memory_bytes is not None:
        pages = cache_cfg.memory_bytes // per_page
        if pages < 2:
            raise ValueError(f"memory_bytes={cache_cfg.memory_bytes} holds {pages} pages of {per_page} bytes; at "
                             "least 2 are needed (page 0 is reserved)")
        changes["num_pages"] = int(pages)
    if cache_cfg.host_memory_bytes is not None:
        changes["num_host_pages"] = int(cache_cfg.host_memory_bytes // per_page)
    return dataclasses.replace(cache_cfg, **changes) if changes else cache_cfg


class _Direct:
    """The channel of a store built without one (a single process): runs the bound function."""

    def __init__(self):
        self._fns = {}

    def bind(self, name, fn) -> None:
        self._fns[name] = fn

    def call(self, name, *args):
        return self._fns[name](*args)


class KvStore:
    """Device and host KV pages of a pool: `kv_cache` [layers, pages, page_size, 2 * kv_heads, head_dim] on
    device (page 0 is the padding sink), `host_cache` [host pages, layers, page_size, heads, head_dim]."""

    def __init__(self, model_cfg: ModelConfig, cache_cfg: CacheConfig, *,
                 sharding: jax.sharding.Sharding | None = None, dtype=None, ops=None):
        """`ops`: the instance's device-op channel (jaxserve.engine.device_ops.DeviceOps); None: one process."""
        self.num_pages = cache_cfg.num_pages
        self.num_host_pages = cache_cfg.num_host_pages
        # Quantized pages (kv_cache_dtype != "auto") are uint8 rows of head_dim values + their scale's bytes
        # (jaxserve/kernels/kv_quant.py): every copy of a page below carries its scales with it.
        self.kv_cache_dtype = cache_cfg.kv_cache_dtype
        self.dtype = jnp.dtype(storage_dtype(cache_cfg, dtype if dtype is not None else model_cfg.dtype))
        self.page_shape = (model_cfg.num_layers, cache_cfg.page_size, 2 * model_cfg.num_kv_heads,
                           kv_row_width(model_cfg.head_dim, cache_cfg.kv_cache_dtype))
        self.page_bytes = int(np.prod(self.page_shape)) * self.dtype.itemsize
        self.sharding = sharding
        shape = (model_cfg.num_layers, self.num_pages) + self.page_shape[1:]
        if sharding is None:
            self.kv_cache: jax.Array = jnp.zeros(shape, self.dtype)
        else:
            self.kv_cache = _zeros_fn(shape, self.dtype, sharding)()
        # A multi-process pool's host tier holds this process's heads [lo, hi) only (see the module docstring).
        self._local_heads = None if sharding is None or sharding.is_fully_addressable else _local_heads(sharding, shape)
        host_shape = self.page_shape
        if self._local_heads is not None:
            lo, hi = self._local_heads
            host_shape = self.page_shape[:2] + (hi - lo,) + self.page_shape[3:]
        self.host_cache = np.zeros((self.num_host_pages,) + host_shape, self.dtype)
        self._scatter_jit = _scatter_fn(sharding)
        # Anything with the `bind(name, fn)` / `call(name, *args)` of jaxserve.engine.device_ops.DeviceOps
        # (the mempool layer does not import the engine's); None: run here.
        self.ops = ops if ops is not None else _Direct()
        self.ops.bind("copy_to_host", self._copy_to_host)
        self.ops.bind("copy_to_device", self._copy_to_device)

    def check(self) -> None:
        assert self.kv_cache.shape == (self.page_shape[0], self.num_pages) + self.page_shape[1:], self.kv_cache.shape

    def copy_to_host(self, pages: Sequence[int], host_pages: Sequence[int]) -> None:
        """Device pages -> host pages (one gather for all layers), as the "copy_to_host" device op: on a
        multi-process pool every process copies its own shards."""
        self.ops.call("copy_to_host", [int(p) for p in pages], [int(h) for h in host_pages])

    def copy_to_device(self, host_pages: Sequence[int], pages: Sequence[int]) -> None:
        """Host pages -> device pages (one in-place scatter), as the "copy_to_device" device op."""
        self.ops.call("copy_to_device", [int(h) for h in host_pages], [int(p) for p in pages])

    def _copy_to_host(self, pages: list[int], host_pages: list[int]) -> None:
        self.host_cache[host_pages] = self._gather(pages)

    def _copy_to_device(self, host_pages: list[int], pages: list[int]) -> None:
        self._scatter(pages, self.host_cache[host_pages])

    def _gather(self, pages: list[int]) -> np.ndarray:
        n = len(pages)
        idx = np.zeros(next_pow2(n), np.int32)  # padding reads page 0, which is never indexed
        idx[:n] = pages
        if self._local_heads is None:
            return np.asarray(_gather_pages(self.kv_cache, idx))[:n]
        out = _gather_fn(self.sharding)(self.kv_cache, idx)
        parts = {}
        for shard in out.addressable_shards:  # replicas of a range: any one
            parts.setdefault(shard.index[3].indices(out.shape[3])[0], shard.data)
        return np.concatenate([np.asarray(parts[k]) for k in sorted(parts)], axis=3)[:n]

    def _scatter(self, pages: list[int], data: np.ndarray) -> None:
        n = len(pages)
        b = next_pow2(n)
        idx = np.zeros(b, np.int32)  # padding writes land in page 0, the padding sink
        idx[:n] = pages
        buf = np.zeros((b,) + data.shape[1:], self.dtype)
        buf[:n] = data
        if self._local_heads is not None:  # this process's shards of the global buffer, straight to their devices
            shape = (b,) + self.page_shape
            lo = self._local_heads[0]
            arrays = [jax.device_put(buf[:, :, :, index[3].indices(shape[3])[0] - lo:
                                         index[3].indices(shape[3])[1] - lo], device)
                      for device, index in self.sharding.addressable_devices_indices_map(shape).items()]
            buf = jax.make_array_from_single_device_arrays(shape, self.sharding, arrays)
        self.kv_cache = self._scatter_jit(self.kv_cache, idx, buf)
