"""The Mosaic TPU variant of ragged paged attention (see `ragged_paged_attention`'s docstring for the contract,
the algorithm and what was verified without a TPU); it shares the tile plan and flash-attention helpers of
the portable kernel."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxserve.kernels.ragged_paged_attention import (_NUM_LANES, MASK_VALUE, _kv_block_ranges, _page_table, _q_tiles,
                                                     _tile_plan, _untile, cdiv, dot_nn, dot_nt, dot_precision,
                                                     kernel_geometry)
from jaxserve.util import next_pow2



def _lanes(x, width):
    """Lane-replicated [M, 128] statistic -> [M, width]."""
    if width == _NUM_LANES:
        return x
    if width < _NUM_LANES:
        return x[:, :width]
    assert width % _NUM_LANES == 0, width
    return jnp.concatenate([x] * (width // _NUM_LANES), axis=1)


def _tpu_kernel(seq_ref, qpos_ref, kvlen_ref, lo_ref, hi_ref, last_page_ref, pt_ref,  # SMEM prefetch
                q_ref, *refs, pages_per_block, page_size, group_pad, heads_per_block, sm_scale, soft_cap,
                sliding_window, return_lse, precision):
    kv_refs = refs[:pages_per_block]
    o_ref = refs[pages_per_block]
    lse_ref = refs[pages_per_block + 1] if return_lse else None
    m_sc, l_sc, acc_sc = refs[-3:]
    del seq_ref, last_page_ref, pt_ref  # only the index maps use them
    t = pl.program_id(1)
    b = pl.program_id(2)
    blk = lo_ref[t] + b
    kv_len = kvlen_ref[t]
    qpos0 = qpos_ref[t]
    _, rows, head_dim = q_ref.shape
    bk = pages_per_block * page_size

    @pl.when(b == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(blk < hi_ref[t])
    def _compute():
        key_pos = blk * bk + lax.broadcasted_iota(jnp.int32, (rows, bk), 1)
        row_pos = qpos0 + lax.div(lax.broadcasted_iota(jnp.int32, (rows, bk), 0), group_pad)
        mask = (key_pos <= row_pos) & (key_pos < kv_len)
        if sliding_window is not None:
            mask = mask & (key_pos > row_pos - sliding_window)
        v_ok = blk * bk + lax.broadcasted_iota(jnp.int32, (bk, head_dim), 0) < kv_len
        for h in range(heads_per_block):
            k = jnp.concatenate([r[:, 2 * h, :] for r in kv_refs], axis=0)
            v = jnp.concatenate([r[:, 2 * h + 1, :] for r in kv_refs], axis=0)
            v = jnp.where(v_ok, v, jnp.zeros((), v.dtype))
            s = dot_nt(q_ref[h], k, precision) * sm_scale
            if soft_cap is not None:
                s = soft_cap * jnp.tanh(s / soft_cap)
            s = jnp.where(mask, s, MASK_VALUE)
            m_prev = m_sc[h]  # [rows, 128], lane-replicated
            l_prev = l_sc[h]
            m_cur = jnp.max(s, axis=1, keepdims=True)
            m_new = jnp.maximum(m_prev, m_cur)
            alpha = jnp.exp(m_prev - m_new)
            p = jnp.where(mask, jnp.exp(s - _lanes(m_new, bk)), 0.0)
            l_sc[h] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
            m_sc[h] = m_new
            acc_sc[h] = acc_sc[h] * _lanes(alpha, head_dim) + dot_nn(p.astype(v.dtype), v, precision)

    @pl.when(b == pl.num_programs(2) - 1)
    def _store():
        for h in range(heads_per_block):
            l = l_sc[h]
            has = l > 0.0
            l_safe = jnp.where(has, l, 1.0)
            o_ref[h] = (acc_sc[h] / _lanes(l_safe, head_dim)).astype(o_ref.dtype)
            if return_lse:
                lse_ref[h] = jnp.where(has, m_sc[h] + jnp.log(l_safe), -jnp.inf)


def ragged_tpu(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale, sliding_window,
                soft_cap, return_lse, interpret, block_q, pages_per_block, kv_heads_per_block,
                out_dtype=None):
    num_tokens, num_q_heads, head_dim, num_pages, page_size, num_kv_heads, group, group_pad = \
        kernel_geometry(q, kv_pages)
    if block_q is None:
        block_q = max(1, 128 // group_pad)
    # rows = block_q * Gp should fill whole sublane tiles (8 rows f32, 16 bf16)
    sublanes = 8 * (4 // jnp.dtype(q.dtype).itemsize)
    block_q = max(next_pow2(block_q), cdiv(sublanes, group_pad))
    if pages_per_block is None:
        pages_per_block = max(1, 128 // page_size)
    pages_per_block = max(1, min(pages_per_block, page_indices.shape[1]))
    heads_per_block = kv_heads_per_block or num_kv_heads
    if num_kv_heads % heads_per_block:
        raise ValueError(f"kv_heads_per_block {heads_per_block} must divide Hkv {num_kv_heads}")
    bk = pages_per_block * page_size
    plan = _tile_plan(kv_lens, cu_q_lens, num_seqs, num_tokens, block_q)
    blk_lo, _, blk_hi, n_pages = _kv_block_ranges(plan, bk, page_size, sliding_window)
    last_page = jnp.maximum(n_pages - 1, 0).astype(jnp.int32)
    pt = _page_table(page_indices, num_pages, pages_per_block)
    num_kv_blocks = pt.shape[1] // pages_per_block
    qt = _q_tiles(q, plan, block_q, num_kv_heads, group_pad)
    max_tiles = plan["max_tiles"]
    rows = block_q * group_pad

    def page_map(i):
        def index_map(hb, t, b, seq_ref, qpos_ref, kvlen_ref, lo_ref, hi_ref, last_ref, pt_ref):
            # Steps past the tile's last block repeat its block index: the pipeline issues no new DMA.
            blk = jnp.minimum(lo_ref[t] + b, jnp.maximum(hi_ref[t] - 1, lo_ref[t]))
            slot = jnp.minimum(blk * pages_per_block + i, last_ref[t])
            return pt_ref[seq_ref[t], slot], 0, hb, 0
        return index_map

    tile_spec = pl.BlockSpec((None, heads_per_block, rows, head_dim), lambda hb, t, b, *_: (t, hb, 0, 0))
    in_specs = [tile_spec] + [pl.BlockSpec((None, page_size, 2 * heads_per_block, head_dim), page_map(i))
                              for i in range(pages_per_block)]
    out_shape = [jax.ShapeDtypeStruct((max_tiles, num_kv_heads, rows, head_dim), out_dtype or q.dtype)]
    out_specs = [tile_spec]
    if return_lse:
        out_shape.append(jax.ShapeDtypeStruct((max_tiles, num_kv_heads, rows, _NUM_LANES), jnp.float32))
        out_specs.append(pl.BlockSpec((None, heads_per_block, rows, _NUM_LANES),
                                      lambda hb, t, b, *_: (t, hb, 0, 0)))
    from jax.experimental.pallas import tpu as pltpu

    scratch = [pltpu.VMEM((heads_per_block, rows, _NUM_LANES), jnp.float32),
               pltpu.VMEM((heads_per_block, rows, _NUM_LANES), jnp.float32),
               pltpu.VMEM((heads_per_block, rows, head_dim), jnp.float32)]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=7,
        grid=(num_kv_heads // heads_per_block, max_tiles, num_kv_blocks),
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=scratch,
    )
    kernel = functools.partial(_tpu_kernel, pages_per_block=pages_per_block, page_size=page_size,
                               group_pad=group_pad, heads_per_block=heads_per_block, sm_scale=sm_scale,
                               soft_cap=soft_cap, sliding_window=sliding_window, return_lse=return_lse,
                               precision=dot_precision(q.dtype))
    if interpret is True:
        interpret = pltpu.InterpretParams()
    outs = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        name="jaxserve_ragged_paged_attention_tpu",
    )(plan["seq"], plan["qpos0"], plan["kv_len"], blk_lo, blk_hi, last_page, pt, qt,
      *([kv_pages] * pages_per_block))
    lse_tiles = outs[1][..., 0] if return_lse else None
    return _untile(outs[0], lse_tiles, plan, cu_q_lens, num_seqs, num_tokens, block_q, group, group_pad)
