"""Flash-decoding paged attention: one query per sequence, the KV length split across the grid.

Contract (identical to `reference.ref_decode_paged_attention`): q [S, Hq, D] (query of sequence s at
position kv_lens[s] - 1), kv_pages [P, page_size, 2*Hkv, D] (K of kv head h at axis-2 index 2h, V at
2h + 1), kv_lens i32[S], page_indices i32[S, pages_per_seq], optional attention sinks f32[Hq]. Sequences
with kv_len 0 give zeros (lse -inf).

Algorithm (``backend="gpu"``, runs in interpret mode and under the Pallas Triton lowering)
---------------------------------------------------------------------------------------
Grid (S, Hkv, num_kv_splits). One program owns one sequence, one kv head (all Gp q heads of its GQA
group form the matmul's rows; Gp is the group padded to a power of two, and to >= 16 under Triton,
whose dot needs M >= 16) and one contiguous split of the sequence's KV blocks. It walks its split's
blocks of `pages_per_block` pages (gathered through the page table) with an online softmax, stopping at
kv_len (early exit: splits wholly past kv_len do no work) and starting at the sliding window's first
block, and writes a normalised partial output and its log-sum-exp (f32). A second, tiny jnp step merges
the splits exactly: out = sum_i exp(lse_i - lse) out_i with lse = logsumexp_i lse_i. Splitting the KV
axis is what lets small batches use the whole GPU: the default picks enough splits for ~512 programs.
Sinks are applied once, after the merge, in f32: out * sigmoid(lse - sink) (`reference.apply_sinks`);
the lse returned is that of the keys only.

Decode is bandwidth-bound: per (sequence, kv head) the kernel reads kv_len * D * 2 elements of K and
V once and does ~4 * Gp * D flops per key, far below the H200 ridge (~165 flop/byte in bf16).

``backend="tpu"`` delegates to the ragged kernel's TPU variant with one query per sequence (a TPU
flash-decoding variant is future work).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxserve.kernels import ragged_paged_attention as rpa
from jaxserve.kernels import kv_quant, reference
from jaxserve.kernels.ragged_paged_attention_tpu import ragged_tpu
from jaxserve.util import next_pow2

_TARGET_PROGRAMS = 512  # ~4 waves of 132 SMs (H200) when choosing num_kv_splits


def default_num_kv_splits(num_seqs: int, num_kv_heads: int, num_kv_blocks: int) -> int:
    want = rpa.cdiv(_TARGET_PROGRAMS, max(1, num_seqs * num_kv_heads))
    return int(max(1, min(next_pow2(want), num_kv_blocks)))


def _decode_kernel(lens_ref, pt_ref, q_ref, kv_ref, o_ref, lse_ref, *, page_size, pages_per_block,
                   blocks_per_split, sm_scale, soft_cap, sliding_window, precision, kv_cache_dtype):
    s = pl.program_id(0)
    h = pl.program_id(1)
    split = pl.program_id(2)
    kv_len = lens_ref[s]
    bk = pages_per_block * page_size
    n_pages = rpa.cdiv(kv_len, page_size)
    lo = split * blocks_per_split
    hi = jnp.minimum(lo + blocks_per_split, rpa.cdiv(kv_len, bk))
    if sliding_window is None:
        full = jnp.clip(kv_len // bk, lo, hi)  # blocks wholly below kv_len: no mask
    else:
        lo = jnp.maximum(lo, jnp.maximum(kv_len - sliding_window, 0) // bk)
        full = lo
    q = q_ref[...]
    rows, head_dim = q.shape
    row_pos = jnp.full((rows, bk), kv_len - 1, jnp.int32)
    key_iota = lax.broadcasted_iota(jnp.int32, (rows, bk), 1)
    v_iota = lax.broadcasted_iota(jnp.int32, (bk, head_dim), 0)
    step = functools.partial(rpa.flash_block, sm_scale=sm_scale, soft_cap=soft_cap,
                             sliding_window=sliding_window, precision=precision)

    def interior(b, carry):
        k, v = rpa.load_kv_block(kv_ref, pt_ref, s, b, h, n_pages, pages_per_block, page_size, kv_cache_dtype,
                                 q.dtype)
        return step(carry, q, k, v, None, None, kv_len, masked=False)

    def edge(b, carry):
        k, v = rpa.load_kv_block(kv_ref, pt_ref, s, b, h, n_pages, pages_per_block, page_size, kv_cache_dtype,
                                 q.dtype)
        v = jnp.where(b * bk + v_iota < kv_len, v, jnp.zeros((), v.dtype))
        return step(carry, q, k, v, b * bk + key_iota, row_pos, kv_len, masked=True)

    carry = (jnp.full((rows,), rpa.MASK_VALUE, jnp.float32), jnp.zeros((rows,), jnp.float32),
             jnp.zeros((rows, head_dim), jnp.float32))
    carry = lax.fori_loop(lo, full, interior, carry)
    carry = lax.fori_loop(jnp.maximum(lo, full), hi, edge, carry)
    out, lse = rpa.finish(*carry)
    o_ref[...] = out
    lse_ref[...] = lse


def merge_splits(o_part, lse_part, axis):
    """Exact merge of normalised partial attentions along `axis` (o_part has one more trailing dim)."""
    m = jnp.max(lse_part, axis=axis, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse_part - m_safe)
    tot = jnp.sum(w, axis=axis)
    has = tot > 0
    tot_safe = jnp.where(has, tot, 1.0)
    out = jnp.sum(o_part * w[..., None], axis=axis) / tot_safe[..., None]
    lse = jnp.where(has, jnp.squeeze(m_safe, axis) + jnp.log(tot_safe), -jnp.inf)
    return out, lse


def _decode_gpu(q, kv_pages, kv_lens, page_indices, *, sm_scale, sliding_window, soft_cap, interpret,
                num_kv_splits, pages_per_block, num_warps, num_stages, kv_cache_dtype="auto"):
    num_seqs, num_q_heads, head_dim = q.shape
    num_pages, page_size, combined, _ = kv_pages.shape
    num_kv_heads = combined // 2
    group = num_q_heads // num_kv_heads
    group_pad = next_pow2(group) if interpret else max(16, next_pow2(group))
    pages_per_seq = page_indices.shape[1]
    if pages_per_block is None:
        pages_per_block = max(1, 128 // page_size)
    pages_per_block = min(next_pow2(pages_per_block), next_pow2(pages_per_seq))
    if not interpret:
        pages_per_block = max(pages_per_block, rpa.cdiv(16, page_size))  # Triton's dot needs N >= 16
    num_blocks = rpa.cdiv(pages_per_seq, pages_per_block)
    if num_kv_splits is None:
        num_kv_splits = default_num_kv_splits(num_seqs, num_kv_heads, num_blocks)
    num_kv_splits = max(1, min(int(num_kv_splits), num_blocks))
    blocks_per_split = rpa.cdiv(num_blocks, num_kv_splits)
    pt = rpa._page_table(page_indices, num_pages, pages_per_block * blocks_per_split * num_kv_splits)
    q4 = q.reshape(num_seqs, num_kv_heads, group, head_dim)
    if group_pad != group:
        q4 = jnp.pad(q4, ((0, 0), (0, 0), (0, group_pad - group), (0, 0)))
    kernel = functools.partial(_decode_kernel, page_size=page_size, pages_per_block=pages_per_block,
                               blocks_per_split=blocks_per_split, sm_scale=sm_scale, soft_cap=soft_cap,
                               sliding_window=sliding_window, precision=rpa.dot_precision(q.dtype),
                               kv_cache_dtype=kv_cache_dtype)
    o_part, lse_part = pl.pallas_call(
        kernel,
        grid=(num_seqs, num_kv_heads, num_kv_splits),
        in_specs=[rpa.whole(kv_lens.shape), rpa.whole(pt.shape),
                  pl.BlockSpec((None, None, group_pad, head_dim), lambda s, h, k: (s, h, 0, 0)),
                  rpa.whole(kv_pages.shape)],
        out_specs=[pl.BlockSpec((None, None, None, group_pad, head_dim), lambda s, h, k: (s, h, k, 0, 0)),
                   pl.BlockSpec((None, None, None, group_pad), lambda s, h, k: (s, h, k, 0))],
        out_shape=[jax.ShapeDtypeStruct((num_seqs, num_kv_heads, num_kv_splits, group_pad, head_dim),
                                        jnp.float32),
                   jax.ShapeDtypeStruct((num_seqs, num_kv_heads, num_kv_splits, group_pad), jnp.float32)],
        interpret=interpret,
        compiler_params=None if interpret else rpa.triton_compiler_params(num_warps, num_stages),
        name="jaxserve_flash_decoding",
    )(kv_lens, pt, q4, kv_pages)
    out, lse = merge_splits(o_part, lse_part, axis=2)  # [S, Hkv, Gp, D], [S, Hkv, Gp]
    out = out[:, :, :group].reshape(num_seqs, num_q_heads, head_dim)  # f32: the caller casts
    lse = lse[:, :, :group].reshape(num_seqs, num_q_heads)
    return out, lse


@functools.partial(jax.jit, static_argnames=(
    "sm_scale", "sliding_window", "soft_cap", "return_lse", "interpret", "backend", "num_kv_splits",
    "pages_per_block", "num_warps", "num_stages", "kv_cache_dtype"))
def _decode_jit(q, kv_pages, kv_lens, page_indices, sinks, *, sm_scale, sliding_window, soft_cap, return_lse,
                interpret, backend, num_kv_splits, pages_per_block, num_warps, num_stages, kv_cache_dtype):
    if backend == "tpu":
        num_seqs = q.shape[0]
        cu = jnp.arange(num_seqs + 1, dtype=jnp.int32)
        out, lse = ragged_tpu(q, kv_pages, kv_lens, page_indices, cu, jnp.array([num_seqs], jnp.int32),
                                   sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                                   return_lse=return_lse or sinks is not None, interpret=interpret, block_q=1,
                                   pages_per_block=pages_per_block, kv_heads_per_block=None,
                                   out_dtype=None if sinks is None else jnp.float32)
    else:
        out, lse = _decode_gpu(q, kv_pages, kv_lens, page_indices, sm_scale=sm_scale,
                               sliding_window=sliding_window, soft_cap=soft_cap, interpret=interpret,
                               num_kv_splits=num_kv_splits, pages_per_block=pages_per_block,
                               num_warps=num_warps, num_stages=num_stages, kv_cache_dtype=kv_cache_dtype)
    if sinks is not None:
        out = reference.apply_sinks(out, lse, sinks)
    out = out.astype(q.dtype)
    return (out, lse) if return_lse else out


def decode_paged_attention(q, kv_pages, kv_lens, page_indices, *, sm_scale=1.0, sliding_window=None,
                           soft_cap=None, return_lse=False, num_kv_splits=None, pages_per_block=None,
                           interpret=None, backend=None, num_warps=4, num_stages=2, sinks=None,
                           kv_cache_dtype="auto"):
    """Flash-decoding paged attention (see the module docstring). `num_kv_splits=None` picks enough
    splits for ~512 programs; `pages_per_block` defaults to 128 tokens per KV block; `sinks` f32[Hq];
    quantized pages (`kv_cache_dtype`, kv_quant.py) are dequantized inside the kernel."""
    if q.ndim != 3 or q.shape[0] != page_indices.shape[0] or kv_lens.shape != (q.shape[0],):
        raise ValueError(f"q must be [S, Hq, D] with S = page_indices.shape[0] = kv_lens.shape[0]; got "
                         f"{q.shape}, {page_indices.shape}, {kv_lens.shape}")
    if kv_pages.ndim != 4 or kv_pages.shape[2] % 2 or q.shape[1] % (kv_pages.shape[2] // 2) \
            or q.shape[2] != kv_quant.head_dim_of(kv_pages.shape[3], kv_cache_dtype):
        raise ValueError(f"kv_pages must be [P, page_size, 2*Hkv, D] matching q; got {kv_pages.shape} vs "
                         f"{q.shape}")
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")
    reference.validate_sinks(sinks, q.shape[1])
    backend, interpret = rpa.resolve_backend(interpret, backend)
    rpa.check_quantized_backend(kv_cache_dtype, backend)
    if backend == "gpu" and not interpret:
        for name, v in (("page_size", kv_pages.shape[1]), ("head_dim", q.shape[2])):
            if v & (v - 1):
                raise ValueError(f"the Triton lowering needs a power-of-two {name}, got {v}")
    return _decode_jit(q, kv_pages, kv_lens.astype(jnp.int32), page_indices.astype(jnp.int32), sinks,
                       sm_scale=float(sm_scale),
                       sliding_window=None if sliding_window is None else int(sliding_window),
                       soft_cap=None if soft_cap is None else float(soft_cap), return_lse=bool(return_lse),
                       interpret=interpret, backend=backend, num_kv_splits=num_kv_splits,
                       pages_per_block=pages_per_block, num_warps=num_warps, num_stages=num_stages,
                       kv_cache_dtype=kv_quant.check_kv_cache_dtype(kv_cache_dtype))
