"""Ragged paged attention as Pallas kernels: a batch mixing prefill chunks and decode steps.

Contract (identical to `reference.ref_ragged_paged_attention`, the oracle):
  q            [T, Hq, D]                 packed queries of all sequences
  kv_pages     [P, page_size, 2*Hkv, D]   K of kv head h at axis-2 index 2h, V at 2h + 1
  kv_lens      i32[S]                     keys per sequence
  page_indices i32[S, pages_per_seq]      page table
  cu_q_lens    i32[S + 1]                 query rows of sequence s are cu_q_lens[s]:cu_q_lens[s+1]
  num_seqs     i32[1]                     live sequences; rows past cu_q_lens[num_seqs] come back zero
Query i of a sequence sits at position kv_len - q_len + i and sees keys 0..that position (optionally only
the last `sliding_window` of them); scores are `sm_scale * q.k`, optionally soft-capped
`soft_cap * tanh(s / soft_cap)`. With `return_lse` the natural-log log-sum-exp of the (scaled, capped)
scores comes back as well ([T, Hq] f32, -inf where a row sees no key), so attention over disjoint KV
ranges can be merged exactly (`merge_attention`). `sinks` f32[Hq] (gpt-oss attention sinks) adds one
logit per q head to every row's softmax: the kernel then writes f32 tiles plus lse and the wrapper
applies `reference.apply_sinks` (out * sigmoid(lse - sink)) after untiling; the lse returned stays
that of the keys only, so merge halves first and apply the sink once.

Algorithm (both variants)
-------------------------
Outside the kernel (plain jnp, O(T + S) work) the queries are cut into *tiles* of `block_q` rows that
never cross a sequence boundary, and per tile we precompute its sequence, first query position, live
rows, KV length and the range of KV blocks it must visit. Queries are re-laid out per tile and kv head
as `[tiles, Hkv, block_q * Gp, D]` (row r = query r // Gp, q head r % Gp of the group; Gp is the
GQA group padded to a power of two), so one kernel instance handles *all* q heads that share a kv head
(grouped-query attention: each K/V block is loaded once per group, and the group rows fill the matmul's
M dimension). The kernel runs flash attention (online softmax, f32 statistics and accumulator) over
KV blocks of `pages_per_block` pages, gathering each block's pages through the page table. The KV loop
stops at the block holding the tile's last query position (causal early exit) and, with a sliding
window, starts at the first block inside the window. Blocks entirely below the tile's first query
position need no mask (the "interior" loop); the others are masked. Invalid keys (past kv_len, in
unused pages) are masked in the scores *and* zeroed in V, so garbage/NaN in unused pages cannot leak;
page slots past the needed pages read a page that is in use instead of whatever the table holds.
Afterwards the tile outputs are gathered back into packed token order.

Variants
--------
* ``backend="gpu"``: `pl.pallas_call` over grid (tiles, Hkv), plain BlockSpecs for the per-tile
  q / out blocks, the page pool and page table passed whole and gathered with ref indexing inside a
  `fori_loop`. This is the portable kernel: it runs in interpret mode (CPU) and lowers with the Pallas
  **Triton** GPU lowering, selected explicitly through `triton.CompilerParams`. Why Triton and not Mosaic
  GPU: the Triton lowering exists in both jax 0.10 and 0.11 (deprecated in 0.11, still present) and
  supports the dynamic page gather a paged kernel needs with ordinary ref indexing; Mosaic GPU
  (Hopper/Blackwell only) wants TMA/`copy_gmem_to_smem` pipelines and `plgpu.kernel`, i.e. a separate
  kernel, and `pl.pallas_call` for Mosaic GPU is itself deprecated. Triton requires power-of-two
  array sizes: page_size and head_dim must be powers of two (checked); block_q and pages_per_block are
  rounded up to powers of two and the GQA group is padded; its dot needs M, N >= 16 (enforced).
  Verified here: interpret mode against the oracle, and that it *lowers* to Triton IR for CUDA
  (cross-lowering on CPU). Not verified without a GPU: Triton's own compilation to PTX, run-time
  results and speed.
* ``backend="tpu"``: Mosaic TPU variant. `pltpu.PrefetchScalarGridSpec` puts tile metadata and the page
  table in SMEM; grid (kv head blocks, tiles, KV blocks) with the KV axis "arbitrary"; each KV block is
  `pages_per_block` BlockSpec inputs of one page each whose index maps read the page table, so the
  Pallas TPU pipeline double-buffers the page DMAs; KV steps past the tile's last block repeat the
  previous block index (no new DMA) and skip compute. K and V of kv head h are read as
  `page[:, 2h, :]` / `page[:, 2h + 1, :]` (sublane-strided: they are interleaved on axis 2), one page
  block holds all kv heads of the head block so a page is one contiguous DMA. Every KV block is
  masked (no interior fast path). m / l live lane-replicated ([rows, 128]) in VMEM scratch; rows =
  block_q * Gp is rounded up to whole sublane tiles.
  Verified here: the TPU interpreter (`pltpu.InterpretParams` / `force_tpu_interpret_mode`) against the
  oracle and lowering to Mosaic MLIR for TPU. Not verified without a TPU: Mosaic's layout passes (notably
  strided loads of packed bf16 rows, which may need a u32-bitcast split), VMEM limits, speed.

`interpret=None` means interpret mode when the default backend is CPU. `backend=None` picks "tpu" on
TPU, else "gpu". Outputs of a Pallas call are uninitialised memory on GPU (and `jnp.empty` is
uninitialised from jax 0.11): every kernel writes every element of its output blocks.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxserve.kernels import kv_quant, reference
from jaxserve.kernels.reference import MASK_VALUE, apply_sinks
from jaxserve.util import next_pow2
_NUM_LANES = 128


# ----------------------------------------------------------------------------------------------------
# small helpers shared with decode_attention.py


def cdiv(a, b):
    return (a + b - 1) // b


def resolve_backend(interpret, backend):
    """-> (backend, interpret) with defaults filled in: backend in {"gpu", "tpu"}."""
    platform = jax.default_backend()
    if backend is None:
        backend = "tpu" if platform == "tpu" else "gpu"
    if backend not in ("gpu", "tpu"):
        raise ValueError(f"backend must be 'gpu', 'tpu' or None, got {backend!r}")
    if interpret is None:
        interpret = platform == "cpu"
    return backend, interpret


def triton_compiler_params(num_warps: int, num_stages: int):
    """Explicit Triton params select the Triton lowering on GPU whatever the default (0.11 defaults
    differ); the module is deprecated in jax 0.11, so its import warning is silenced here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas import triton as pltriton
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def dot_precision(dtype):
    # f32 inputs: full precision (the GPU default would be TF32); bf16: the native MMA.
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def dot_nt(a, b, precision):
    """a [M, K] . b [N, K]^T -> [M, N] in f32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def dot_nn(a, b, precision):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def kernel_geometry(q, kv_pages):
    """(tokens, q heads, head dim, pages, page size, kv heads, GQA group, group padded to a power of two);
    head dim is q's (quantized pages have longer rows)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, page_size, combined, _ = kv_pages.shape
    num_kv_heads = combined // 2
    group = num_q_heads // num_kv_heads
    return num_tokens, num_q_heads, head_dim, num_pages, page_size, num_kv_heads, group, next_pow2(group)


def whole(shape):
    """BlockSpec of a whole array (kept in global memory and indexed inside the kernel on GPU)."""
    return pl.BlockSpec(tuple(shape), lambda *_: (0,) * len(shape))


validate = reference.validate_inputs


def check_quantized_backend(kv_cache_dtype, backend: str) -> None:
    if kv_quant.is_quantized(kv_cache_dtype) and backend == "tpu":
        raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} is not supported by the TPU (Mosaic) kernel yet; "
                         "use kv_cache_dtype='auto' or the GPU / interpret variant")


def merge_attention(out_a, lse_a, out_b, lse_b):
    """Exact merge of attention over two disjoint KV ranges A and B of the same queries.

    out_* [..., H, D], lse_* [..., H] (natural log, -inf where the range had no visible key). Returns
    (out, lse) equal to attention over A u B."""
    lse_a = lse_a.astype(jnp.float32)
    lse_b = lse_b.astype(jnp.float32)
    m = jnp.maximum(lse_a, lse_b)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    wa = jnp.exp(lse_a - m_safe)  # exp(-inf) = 0 for an empty range
    wb = jnp.exp(lse_b - m_safe)
    tot = wa + wb
    has = tot > 0
    tot_safe = jnp.where(has, tot, 1.0)
    out = (out_a.astype(jnp.float32) * (wa / tot_safe)[..., None]
           + out_b.astype(jnp.float32) * (wb / tot_safe)[..., None])
    lse = jnp.where(has, m_safe + jnp.log(tot_safe), -jnp.inf)
    return out.astype(out_a.dtype), lse


# ----------------------------------------------------------------------------------------------------
# tile planning (jnp, outside the kernel)


def _tile_plan(kv_lens, cu_q_lens, num_seqs, num_tokens, block_q):
    """Cut each live sequence's queries into tiles of <= block_q rows. Returns a dict of per-tile
    int32 arrays (static length max_tiles) and per-sequence `first_tile`."""
    max_seqs = kv_lens.shape[0]
    sid = jnp.arange(max_seqs, dtype=jnp.int32)
    q_lens = jnp.where(sid < num_seqs[0], cu_q_lens[1:] - cu_q_lens[:-1], 0)
    q_lens = jnp.maximum(q_lens, 0).astype(jnp.int32)
    tiles_per_seq = cdiv(q_lens, block_q)
    tile_end = jnp.cumsum(tiles_per_seq).astype(jnp.int32)
    first_tile = tile_end - tiles_per_seq
    max_tiles = cdiv(num_tokens, block_q) + min(max_seqs, num_tokens)
    tid = jnp.arange(max_tiles, dtype=jnp.int32)
    seq = jnp.searchsorted(tile_end, tid, side="right").astype(jnp.int32)
    live = seq < max_seqs
    seq = jnp.minimum(seq, max_seqs - 1)
    local0 = (tid - first_tile[seq]) * block_q
    nrows = jnp.where(live, jnp.clip(q_lens[seq] - local0, 0, block_q), 0).astype(jnp.int32)
    kv_len = kv_lens[seq].astype(jnp.int32)
    qpos0 = (kv_len - q_lens[seq] + local0).astype(jnp.int32)
    row0 = (cu_q_lens[seq] + local0).astype(jnp.int32)
    return dict(seq=seq, nrows=nrows, kv_len=kv_len, qpos0=qpos0, row0=row0, first_tile=first_tile,
                q_lens=q_lens, max_tiles=max_tiles)


def _kv_block_ranges(plan, block_k, page_size, sliding_window):
    """Per tile: [blk_lo, blk_hi) KV blocks to visit, blk_full (blocks [blk_lo, blk_full) need no mask),
    and the number of pages holding keys the tile may see."""
    nrows, qpos0, kv_len = plan["nrows"], plan["qpos0"], plan["kv_len"]
    kv_end = jnp.where(nrows > 0, jnp.clip(qpos0 + nrows, 0, kv_len), 0)  # causal early exit
    blk_hi = cdiv(kv_end, block_k)
    if sliding_window is None:
        blk_lo = jnp.zeros_like(blk_hi)
        blk_full = jnp.minimum(jnp.maximum(qpos0 + 1, 0) // block_k, blk_hi)
    else:
        kv_start = jnp.maximum(qpos0 - sliding_window + 1, 0)
        blk_lo = jnp.minimum(kv_start // block_k, blk_hi)
        blk_full = blk_lo
    n_pages = cdiv(kv_end, page_size)
    return blk_lo.astype(jnp.int32), blk_full.astype(jnp.int32), blk_hi.astype(jnp.int32), \
        n_pages.astype(jnp.int32)


def _q_tiles(q, plan, block_q, num_kv_heads, group_pad):
    """q [T, Hq, D] -> [tiles, Hkv, block_q * Gp, D]; rows of no live query are zero."""
    num_tokens, num_q_heads, head_dim = q.shape
    group = num_q_heads // num_kv_heads
    q5 = q.reshape(num_tokens, num_kv_heads, group, head_dim)
    if group_pad != group:
        q5 = jnp.pad(q5, ((0, 0), (0, 0), (0, group_pad - group), (0, 0)))
    r = jnp.arange(block_q, dtype=jnp.int32)
    rows = jnp.clip(plan["row0"][:, None] + r[None, :], 0, num_tokens - 1)  # [tiles, bq]
    valid = r[None, :] < plan["nrows"][:, None]
    qt = q5[rows]  # [tiles, bq, Hkv, Gp, D]
    qt = jnp.where(valid[:, :, None, None, None], qt, jnp.zeros((), q.dtype))
    qt = qt.transpose(0, 2, 1, 3, 4)
    return qt.reshape(qt.shape[0], num_kv_heads, block_q * group_pad, head_dim)


def _untile(o_tiles, lse_tiles, plan, cu_q_lens, num_seqs, num_tokens, block_q, group, group_pad):
    """Tile outputs [tiles, Hkv, bq*Gp, D] (+ lse [tiles, Hkv, bq*Gp]) -> packed [T, Hq, D] (+ [T, Hq])."""
    max_tiles, num_kv_heads, _, head_dim = o_tiles.shape
    max_seqs = cu_q_lens.shape[0] - 1
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(cu_q_lens[1:], t, side="right").astype(jnp.int32), max_seqs - 1)
    end = cu_q_lens[jnp.minimum(num_seqs[0], max_seqs)]
    live = (seq < num_seqs[0]) & (t < end) & (t >= cu_q_lens[seq])
    local = t - cu_q_lens[seq]
    tile = jnp.clip(plan["first_tile"][seq] + local // block_q, 0, max_tiles - 1)
    row = jnp.clip(local % block_q, 0, block_q - 1)
    o5 = o_tiles.reshape(max_tiles, num_kv_heads, block_q, group_pad, head_dim)
    out = o5[tile, :, row][:, :, :group]  # [T, Hkv, G, D]
    out = out.reshape(num_tokens, num_kv_heads * group, head_dim)
    out = jnp.where(live[:, None, None], out, jnp.zeros((), out.dtype))
    if lse_tiles is None:
        return out, None
    l4 = lse_tiles.reshape(max_tiles, num_kv_heads, block_q, group_pad)
    lse = l4[tile, :, row][:, :, :group].reshape(num_tokens, num_kv_heads * group)
    lse = jnp.where(live[:, None], lse, -jnp.inf)
    return out, lse


def _page_table(page_indices, num_pages, pages_per_block, multiple_blocks=1):
    """Clip entries into [0, P) (a bad entry can never address outside the pool) and pad the table's
    width to a multiple of pages_per_block * multiple_blocks."""
    pt = jnp.clip(page_indices.astype(jnp.int32), 0, num_pages - 1)
    width = pt.shape[1]
    unit = pages_per_block * multiple_blocks
    padded = cdiv(width, unit) * unit
    if padded != width:
        pt = jnp.pad(pt, ((0, 0), (0, padded - width)))
    return pt


# ----------------------------------------------------------------------------------------------------
# the flash step shared by the GPU ragged and decode kernels


def flash_block(carry, q, k, v, key_pos, row_pos, kv_len, *, masked, sm_scale, soft_cap,
                sliding_window, precision):
    """One online-softmax step. q [M, D]; k, v [bk, D]; key_pos [M, bk] (or broadcastable) absolute key
    positions; row_pos [M, bk] absolute query positions. carry = (m [M], l [M], acc [M, D]) in f32."""
    m_prev, l_prev, acc_prev = carry
    s = dot_nt(q, k, precision) * sm_scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    if masked:
        mask = (key_pos <= row_pos) & (key_pos < kv_len)
        if sliding_window is not None:
            mask = mask & (key_pos > row_pos - sliding_window)
        s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.exp(s - m_new[:, None])
    if masked:
        p = jnp.where(mask, p, 0.0)
    l_new = alpha * l_prev + jnp.sum(p, axis=1)
    acc = acc_prev * alpha[:, None] + dot_nn(p.astype(v.dtype), v, precision)
    return m_new, l_new, acc


def finish(m, l, acc):
    has = l > 0.0
    l_safe = jnp.where(has, l, 1.0)
    out = acc / l_safe[:, None]
    lse = jnp.where(has, m + jnp.log(l_safe), -jnp.inf)
    return out, lse


def load_kv_block(kv_ref, pt_ref, seq, blk, head, n_pages, pages_per_block, page_size, kv_cache_dtype="auto",
                  dtype=None):
    """Gather K and V [pages_per_block * page_size, D] of kv head `head` for KV block `blk` of `seq`.
    Page slots at or past `n_pages` re-read the block's first page (in use, cached) instead of whatever
    the table holds there; V rows of keys >= kv_len are zeroed by the caller's mask. Quantized pages
    (`kv_cache_dtype`) are dequantized here, in the kernel, to `dtype`."""
    start = blk * pages_per_block
    pages = pt_ref[seq, pl.ds(start, pages_per_block)]
    slot = start + lax.broadcasted_iota(jnp.int32, (pages_per_block,), 0)
    pages = jnp.where(slot < n_pages, pages, pt_ref[seq, start])
    bk = pages_per_block * page_size
    if kv_quant.is_quantized(kv_cache_dtype):
        # The values and each scale byte are loaded apart: Triton wants power-of-two shapes (a whole row is
        # head_dim + 4) and has no slice.
        head_dim = kv_ref.shape[-1] - kv_quant.SCALE_BYTES

        def load(slot):
            values = kv_ref[pages, :, slot, pl.ds(0, head_dim)].reshape(bk, head_dim)
            scale = kv_quant.scale_from_bytes(*(kv_ref[pages, :, slot, pl.ds(head_dim + i, 1)].reshape(bk, 1)
                                                for i in range(kv_quant.SCALE_BYTES)))
            return kv_quant.dequantize_values(values, scale, kv_cache_dtype, dtype)
        return load(2 * head), load(2 * head + 1)
    head_dim = kv_ref.shape[-1]
    k = kv_ref[pages, :, 2 * head, :].reshape(bk, head_dim)
    v = kv_ref[pages, :, 2 * head + 1, :].reshape(bk, head_dim)
    return k, v


# ----------------------------------------------------------------------------------------------------
# GPU / interpret variant


def _gpu_kernel(meta_ref, pt_ref, q_ref, kv_ref, o_ref, *lse_refs, group_pad, page_size, pages_per_block,
                sm_scale, soft_cap, sliding_window, precision, kv_cache_dtype):
    t = pl.program_id(0)
    h = pl.program_id(1)
    seq = meta_ref[t, 0]
    qpos0 = meta_ref[t, 1]
    kv_len = meta_ref[t, 2]
    blk_lo = meta_ref[t, 3]
    blk_full = meta_ref[t, 4]
    blk_hi = meta_ref[t, 5]
    n_pages = meta_ref[t, 6]
    q = q_ref[...]
    rows, head_dim = q.shape
    bk = pages_per_block * page_size
    row_pos = qpos0 + lax.div(lax.broadcasted_iota(jnp.int32, (rows, bk), 0), group_pad)
    key_iota = lax.broadcasted_iota(jnp.int32, (rows, bk), 1)
    v_iota = lax.broadcasted_iota(jnp.int32, (bk, head_dim), 0)
    step = functools.partial(flash_block, sm_scale=sm_scale, soft_cap=soft_cap,
                             sliding_window=sliding_window, precision=precision)

    def interior(b, carry):  # every key visible to every row: no mask
        k, v = load_kv_block(kv_ref, pt_ref, seq, b, h, n_pages, pages_per_block, page_size, kv_cache_dtype,
                             q.dtype)
        return step(carry, q, k, v, None, None, kv_len, masked=False)

    def edge(b, carry):
        k, v = load_kv_block(kv_ref, pt_ref, seq, b, h, n_pages, pages_per_block, page_size, kv_cache_dtype,
                             q.dtype)
        v = jnp.where(b * bk + v_iota < kv_len, v, jnp.zeros((), v.dtype))
        return step(carry, q, k, v, b * bk + key_iota, row_pos, kv_len, masked=True)

    carry = (jnp.full((rows,), MASK_VALUE, jnp.float32), jnp.zeros((rows,), jnp.float32),
             jnp.zeros((rows, head_dim), jnp.float32))
    carry = lax.fori_loop(blk_lo, blk_full, interior, carry)
    carry = lax.fori_loop(jnp.maximum(blk_lo, blk_full), blk_hi, edge, carry)
    out, lse = finish(*carry)
    o_ref[...] = out.astype(o_ref.dtype)
    if lse_refs:
        lse_refs[0][...] = lse


def _ragged_gpu(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale, sliding_window,
                soft_cap, return_lse, interpret, block_q, pages_per_block, num_warps, num_stages,
                out_dtype=None, kv_cache_dtype="auto"):
    num_tokens, num_q_heads, head_dim, num_pages, page_size, num_kv_heads, group, group_pad = \
        kernel_geometry(q, kv_pages)
    if block_q is None:
        block_q = max(1, 64 // group_pad)
    block_q = next_pow2(block_q)
    if group_pad * block_q < 16 and not interpret:
        block_q = 16 // group_pad  # Triton's dot needs M >= 16
    if pages_per_block is None:
        pages_per_block = max(1, 64 // page_size)
    pages_per_block = min(next_pow2(pages_per_block), next_pow2(page_indices.shape[1]))
    if not interpret:
        pages_per_block = max(pages_per_block, cdiv(16, page_size))  # Triton's dot needs N >= 16
    bk = pages_per_block * page_size
    plan = _tile_plan(kv_lens, cu_q_lens, num_seqs, num_tokens, block_q)
    blk_lo, blk_full, blk_hi, n_pages = _kv_block_ranges(plan, bk, page_size, sliding_window)
    meta = jnp.stack([plan["seq"], plan["qpos0"], plan["kv_len"], blk_lo, blk_full, blk_hi, n_pages],
                     axis=1).astype(jnp.int32)
    pt = _page_table(page_indices, num_pages, pages_per_block)
    qt = _q_tiles(q, plan, block_q, num_kv_heads, group_pad)
    max_tiles = plan["max_tiles"]
    rows = block_q * group_pad
    kernel = functools.partial(_gpu_kernel, group_pad=group_pad, page_size=page_size,
                               pages_per_block=pages_per_block, sm_scale=sm_scale, soft_cap=soft_cap,
                               sliding_window=sliding_window, precision=dot_precision(q.dtype),
                               kv_cache_dtype=kv_cache_dtype)
    tile_spec = pl.BlockSpec((None, None, rows, head_dim), lambda t, h: (t, h, 0, 0))
    out_shape = [jax.ShapeDtypeStruct((max_tiles, num_kv_heads, rows, head_dim), out_dtype or q.dtype)]
    out_specs = [tile_spec]
    if return_lse:
        out_shape.append(jax.ShapeDtypeStruct((max_tiles, num_kv_heads, rows), jnp.float32))
        out_specs.append(pl.BlockSpec((None, None, rows), lambda t, h: (t, h, 0)))
    outs = pl.pallas_call(
        kernel,
        grid=(max_tiles, num_kv_heads),
        in_specs=[whole(meta.shape), whole(pt.shape), tile_spec, whole(kv_pages.shape)],
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        compiler_params=None if interpret else triton_compiler_params(num_warps, num_stages),
        name="jaxserve_ragged_paged_attention",
    )(meta, pt, qt, kv_pages)
    return _untile(outs[0], outs[1] if return_lse else None, plan, cu_q_lens, num_seqs, num_tokens,
                   block_q, group, group_pad)


# ----------------------------------------------------------------------------------------------------
# public entry point


@functools.partial(jax.jit, static_argnames=(
    "sm_scale", "sliding_window", "soft_cap", "return_lse", "interpret", "backend", "block_q",
    "pages_per_block", "num_warps", "num_stages", "kv_heads_per_block", "kv_cache_dtype"))
def _ragged_jit(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sinks, *, sm_scale, sliding_window,
                soft_cap, return_lse, interpret, backend, block_q, pages_per_block, num_warps, num_stages,
                kv_heads_per_block, kv_cache_dtype):
    # With sinks the kernel keeps its output in f32 and always produces lse, for the sink step below.
    kw = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
              return_lse=return_lse or sinks is not None, interpret=interpret, block_q=block_q,
              pages_per_block=pages_per_block, out_dtype=None if sinks is None else jnp.float32)
    if backend == "tpu":
        from jaxserve.kernels.ragged_paged_attention_tpu import ragged_tpu  # imports this module's helpers
        out, lse = ragged_tpu(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                               kv_heads_per_block=kv_heads_per_block, **kw)
    else:
        out, lse = _ragged_gpu(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, num_warps=num_warps,
                               num_stages=num_stages, kv_cache_dtype=kv_cache_dtype, **kw)
    if sinks is not None:
        out = apply_sinks(out, lse, sinks).astype(q.dtype)
    return (out, lse) if return_lse else out


def ragged_paged_attention(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale=1.0,
                           sliding_window=None, soft_cap=None, return_lse=False, interpret=None, backend=None,
                           block_q=None, pages_per_block=None, num_warps=4, num_stages=2,
                           kv_heads_per_block=None, sinks=None, kv_cache_dtype="auto"):
    """Pallas ragged paged attention; the oracle's semantics (see the module docstring), `sinks` f32[Hq].

    Tuning: `block_q` query rows per tile (default 64 / Gp on GPU, 128 / Gp on TPU), `pages_per_block`
    pages per KV block (default 64 tokens on GPU, 128 on TPU), `num_warps` / `num_stages` (Triton),
    `kv_heads_per_block` (TPU; default all kv heads, so each page is one contiguous DMA).
    `kv_cache_dtype`: quantized pages (kv_quant.py) are dequantized inside the kernel (GPU / interpret
    variant; the TPU variant refuses them)."""
    validate(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, kv_cache_dtype)
    reference.validate_sinks(sinks, q.shape[1])
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")
    if soft_cap is not None and soft_cap == 0:
        raise ValueError("soft_cap must be non-zero")
    backend, interpret = resolve_backend(interpret, backend)
    check_quantized_backend(kv_cache_dtype, backend)
    if backend == "gpu" and not interpret:
        for name, v in (("page_size", kv_pages.shape[1]), ("head_dim", q.shape[2])):
            if v & (v - 1):
                raise ValueError(f"the Triton lowering needs a power-of-two {name}, got {v}")
    return _ragged_jit(q, kv_pages, kv_lens.astype(jnp.int32), page_indices.astype(jnp.int32),
                       cu_q_lens.astype(jnp.int32), num_seqs.astype(jnp.int32), sinks,
                       sm_scale=float(sm_scale),
                       sliding_window=None if sliding_window is None else int(sliding_window),
                       soft_cap=None if soft_cap is None else float(soft_cap), return_lse=bool(return_lse),
                       interpret=interpret, backend=backend, block_q=block_q, pages_per_block=pages_per_block,
                       num_warps=num_warps, num_stages=num_stages, kv_heads_per_block=kv_heads_per_block,
                       kv_cache_dtype=kv_quant.check_kv_cache_dtype(kv_cache_dtype))

