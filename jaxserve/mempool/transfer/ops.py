"""Array operations of the KV transfer path: one gather of a request's pages for all layers (as one block or as
equal-size chunks), one donated in-place scatter, the page-count buckets that bound compilations, and the
sharding helpers. Every operation counts itself in the `OpCounts` its caller owns (a transport), so tests and
benchmarks read the number of array operations per request from the object that issued them.

A request's KV moves as one block holding its pages for every layer (MemServe's huge-page aggregation): one
gather `kv_cache[:, pages]`, one move, one scatter, whatever the number of layers. Page counts are padded to
powers of two (padding reads/writes page 0, the pool's reserved sink) so the number of compilations stays
O(log num_pages).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from jaxserve.mempool.kv_store import convert_storage
from jaxserve.mempool.transfer.state import TransferError
from jaxserve.util import next_pow2


@dataclasses.dataclass
class OpCounts:
    """Array operations issued by one transport (aggregation: a constant per request)."""
    gather: int = 0
    device_put: int = 0
    scatter: int = 0
    pull: int = 0

    def snapshot(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def since(self, before: dict[str, int]) -> dict[str, int]:
        return {k: v - before[k] for k, v in self.snapshot().items()}

    def total(self) -> int:
        return sum(self.snapshot().values())


def _count(counts: OpCounts | None, what: str) -> None:
    if counts is not None:
        setattr(counts, what, getattr(counts, what) + 1)


def padded_index(pages: Sequence[int], size: int | None = None) -> np.ndarray:
    idx = np.zeros(next_pow2(len(pages)) if size is None else size, np.int32)  # padding names page 0 (the sink)
    idx[:len(pages)] = pages
    return idx


# Cross-process blocks travel as several arrays ("chunks") of equal page count: the transfer server moves a
# list of arrays much faster than one array of the same bytes (measured on this box, 8 MiB: 1 array ~17-23 ms,
# 4-8 arrays ~9-16 ms; see WORKSPACE_NOTES.md). Still one gather and one scatter executable per request.
MAX_CHUNKS = 8
MIN_CHUNK_BYTES = 512 * 1024


def chunk_pages(n_pages: int, page_bytes: int) -> int:
    """Pages per chunk for a transfer of n_pages: a power of two dividing next_pow2(n_pages), so that at most
    MAX_CHUNKS chunks of at least MIN_CHUNK_BYTES (or one chunk) cover the pages."""
    padded = next_pow2(n_pages)
    k = 1
    while k < MAX_CHUNKS and padded // (2 * k) >= 1 and padded // (2 * k) * page_bytes >= MIN_CHUNK_BYTES:
        k *= 2
    return padded // k


# ------------------------------------------------------------------------------------------- array operations
@jax.jit
def _gather(kv: jax.Array, idx: jax.Array) -> jax.Array:
    return kv[:, idx]  # [layers, pages, page_size, 2*Hkv, D], still sharded on the head axis


@functools.lru_cache(maxsize=None)
def _scatter_fn(sharding):
    # One donated in-place write per real page (`n` of them; the padding rows are never written), each a
    # dynamic_update_slice of [layers, 1, page_size, 2*Hkv, D]: on XLA:CPU this runs near memory-copy speed,
    # while the equivalent `kv.at[:, idx].set(block)` scatter was 2-6x slower (see WORKSPACE_NOTES.md).
    def scatter(kv, idx, n, block):
        block = convert_storage(block, kv.dtype)

        def body(j, kv):
            page = jax.lax.dynamic_slice_in_dim(block, j, 1, axis=1)
            return jax.lax.dynamic_update_slice_in_dim(kv, page, idx[j], axis=1)
        return jax.lax.fori_loop(0, n, body, kv)
    if sharding is None:
        return jax.jit(scatter, donate_argnums=0)
    return jax.jit(scatter, donate_argnums=0, out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _gather_chunks_fn(k: int):
    def gather(kv, idx):
        c = idx.shape[0] // k
        return tuple(kv[:, idx[i * c:(i + 1) * c]] for i in range(k))
    return jax.jit(gather)


@functools.lru_cache(maxsize=None)
def _scatter_chunks_fn(sharding, k: int):
    # As `_scatter_fn`, for k chunks of equal page count in one executable (chunk i holds padded rows
    # [i*c, (i+1)*c)); only the first n rows overall are written.
    def scatter(kv, idx, n, *chunks):
        c = chunks[0].shape[1]
        for i, chunk in enumerate(chunks):
            chunk = convert_storage(chunk, kv.dtype)

            def body(j, kv, chunk=chunk, i=i):
                page = jax.lax.dynamic_slice_in_dim(chunk, j, 1, axis=1)
                return jax.lax.dynamic_update_slice_in_dim(kv, page, idx[i * c + j], axis=1)
            kv = jax.lax.fori_loop(0, jnp.clip(n - i * c, 0, c), body, kv)
        return kv
    if sharding is None:
        return jax.jit(scatter, donate_argnums=0)
    return jax.jit(scatter, donate_argnums=0, out_shardings=sharding)


def pool_sharding(pool) -> jax.sharding.Sharding:
    return pool.sharding if pool.sharding is not None else pool.kv_cache.sharding


def gather_block(pool, pages: Sequence[int], counts: OpCounts | None = None) -> jax.Array:
    """One gather of `pages` for all layers: [layers, next_pow2(n), page_size, 2*Hkv, D] on the pool's devices."""
    _count(counts, "gather")
    return _gather(pool.kv_cache, padded_index(pages))


def gather_chunks(pool, pages: Sequence[int], counts: OpCounts | None = None) -> list[jax.Array]:
    """One gather of `pages` for all layers, returned as chunks of `chunk_pages` pages each (one executable;
    the chunks together cover the pages, the last one padded with page 0)."""
    _count(counts, "gather")
    page_bytes = int(np.prod(pool.page_shape)) * jnp.dtype(pool.dtype).itemsize
    c = chunk_pages(len(pages), page_bytes)
    k = -(-len(pages) // c)
    return list(_gather_chunks_fn(k)(pool.kv_cache, padded_index(pages, k * c)))


def scatter_block(pool, pages: Sequence[int], block, counts: OpCounts | None = None) -> None:
    """One donated in-place scatter of a gathered block (a single array of next_pow2(len(pages)) pages), or of
    its chunks (a list of equal-size arrays covering the pages, as `gather_chunks` makes them)."""
    if isinstance(block, (list, tuple)):
        chunks = list(block)
        c = chunks[0].shape[1] if chunks else 0
        if not chunks or any(x.shape[1] != c for x in chunks) or len(chunks) != -(-len(pages) // c):
            raise TransferError(f"chunks of {[x.shape[1] for x in chunks]} pages do not cover {len(pages)} pages")
        _count(counts, "scatter")
        pool.kv_cache = _scatter_chunks_fn(pool.sharding, len(chunks))(
            pool.kv_cache, padded_index(pages, len(chunks) * c), np.int32(len(pages)), *chunks)
        return
    _count(counts, "scatter")
    idx = padded_index(pages)
    if block.shape[1] != idx.size:
        raise TransferError(f"block holds {block.shape[1]} pages, expected bucket {idx.size} for {len(pages)}")
    pool.kv_cache = _scatter_fn(pool.sharding)(pool.kv_cache, idx, np.int32(len(pages)), block)



def num_head_shards(block: jax.Array) -> int:
    s = block.sharding
    if isinstance(s, NamedSharding):
        ax = s.spec[3] if len(s.spec) > 3 else None
        if ax is None:
            return 1
        names = ax if isinstance(ax, tuple) else (ax,)
        return int(np.prod([s.mesh.shape[n] for n in names]))
    return 1


def sharding_head_shards(sharding) -> int:
    """Shards along the KV-head axis (axis 3) of a pool sharding; 1 for an unsharded or single device one."""
    if isinstance(sharding, NamedSharding):
        ax = sharding.spec[3] if len(sharding.spec) > 3 else None
        if ax is None:
            return 1 if len(sharding.device_set) == 1 else 0  # replicated over several devices: not a match
        names = ax if isinstance(ax, tuple) else (ax,)
        if int(np.prod([sharding.mesh.shape[n] for n in names])) != len(sharding.device_set):
            return 0  # also sharded or replicated along another axis: not the sender's layout
        return int(np.prod([sharding.mesh.shape[n] for n in names]))
    return 1 if len(sharding.device_set) == 1 else 0


def check_compatible(src, dst) -> None:
    src_kv, dst_kv = getattr(src, "kv_cache_dtype", "auto"), getattr(dst, "kv_cache_dtype", "auto")
    if src_kv != dst_kv:
        raise ValueError(f"kv_cache_dtype differs: the sender stores {src_kv!r}, the receiver {dst_kv!r}; both "
                         "sides of a KV transfer must use the same kv_cache_dtype")
    if src.page_shape != dst.page_shape:
        raise ValueError(f"page shapes differ: {src.page_shape} vs {dst.page_shape}")
