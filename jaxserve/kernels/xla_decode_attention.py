"""The engine's decode attention under plain XLA (the CPU path for steps that only decode): one query per
sequence, an online softmax over key blocks in lockstep up to the longest live sequence, the prefix a group of
sequences shares gathered once (`xla_attention.shared_prefix`)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxserve.kernels.reference import MASK_VALUE, apply_sinks, validate_sinks
from jaxserve.kernels.xla_attention import SHARED_BLOCK_K, _accumulate, _kv_in, _normalize, shared_prefix

# Keys per block of the decode path: each sequence visits whole blocks up to the batch's longest context, so a
# small block wastes little on short contexts. On this CPU 32 beats 64 at every measured batch and context
# but the longest (32 x 96 tokens 0.46 vs 0.58 ms a layer, 128 x 300 4.7 vs 5.5, 32 x 1800 equal;
# `jaxserve.launch.bench_cpu_ops`).
DECODE_BLOCK_K = 32
# A step's only live sequence (one user's decode) takes its cached keys through the shared phase's big blocks
# from this many on, instead of the lockstep 32-key loop, which also runs every padding slot of the step's
# 8 (issue 14's model, whole decode step over bf16 bits: 600 keys 3.4-3.8 -> 2.3 ms, 1800 keys 10.4 -> 3.1-3.2;
# below ~256 keys a 512-key block costs more than the few small ones: 32 keys 1.3 -> 1.7 ms).
LONE_MIN_KEYS = 256


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "return_lse", "block_k",
                                             "kv_cache_dtype", "layer", "shared_block_k", "lone_min_keys"))
def decode_paged_attention_blocked(q, kv_pages, kv_lens, page_indices, *, sm_scale=1.0, sliding_window=None,
                                   soft_cap=None, return_lse=False, block_k=None, sinks=None, kv_cache_dtype="auto",
                                   layer=None, shared_block_k=SHARED_BLOCK_K, lone_min_keys=LONE_MIN_KEYS):
    """One query per sequence (position kv_len - 1), as `reference.ref_decode_paged_attention`, with an online
    softmax over key blocks up to the batch's longest sequence (a `fori_loop` with a traced bound). Its cost
    follows the live context, not the width of `page_indices`, so the engine can pass one page-table width
    for every decode step: one compilation per batch size instead of one per (batch size, context bucket).

    q [S, Hq, D]; kv_pages [P, page_size, 2*Hkv, D] (quantized: uint8 rows of D + 4, `kv_cache_dtype`);
    kv_lens i32[S] (0: no sequence, zeros out); page_indices i32[S, pages_per_seq]; sinks f32[Hq] or None
    -> out [S, Hq, D] (and lse f32[S, Hq]). `shared_block_k` (static): keys per block of the shared prefix;
    `lone_min_keys` (static): cached keys from which the only live sequence takes that phase (LONE_MIN_KEYS)."""
    validate_sinks(sinks, q.shape[1])
    num_seqs, num_q_heads, head_dim = q.shape
    pages_per_seq = page_indices.shape[1]
    layer_shape = kv_pages.shape if layer is None else kv_pages.shape[1:]
    page_size, num_kv_heads = layer_shape[1], layer_shape[2] // 2
    group = num_q_heads // num_kv_heads
    pages_per_block = max(1, min(pages_per_seq, (block_k or DECODE_BLOCK_K) // page_size))
    block_k = pages_per_block * page_size
    num_blocks = -(-pages_per_seq // pages_per_block)
    table = jnp.pad(page_indices, ((0, 0), (0, num_blocks * pages_per_block - pages_per_seq)))
    qg = q.reshape(num_seqs, num_kv_heads, group, head_dim)
    q_pos = kv_lens - 1
    live = kv_lens > 0
    hi = jnp.minimum((jnp.max(kv_lens) + block_k - 1) // block_k, num_blocks)
    # Keys a group of the sequences share (`shared_prefix`) are gathered once and visited by every member's
    # query in one dot; the blocks below then start past them for the members.
    ref, shared_len, member = shared_prefix(kv_lens, jnp.ones_like(kv_lens), live, page_indices, page_size,
                                            lone_min_keys=lone_min_keys)
    skip = jnp.where(member, shared_len, 0)
    first_key = skip
    if sliding_window is not None:
        first_key = jnp.maximum(first_key, q_pos - sliding_window + 1)
    lo = jnp.minimum(jnp.min(jnp.where(live, jnp.maximum(first_key, 0), hi * block_k)) // block_k, hi)

    def visit(b, carry):  # carry (m, l, acc): [S, Hkv, G], [S, Hkv, G], [S, Hkv, G, D]
        pages = jax.lax.dynamic_slice_in_dim(table, b * pages_per_block, pages_per_block, axis=1)
        # With `layer`, kv_pages is the whole stacked cache and the gather reads the layer's pages from it:
        # slicing the layer first makes XLA copy the whole layer into the loop on every step.
        gathered = kv_pages[pages] if layer is None else kv_pages[layer, pages]
        rows = gathered.reshape(num_seqs, block_k, 2 * num_kv_heads, layer_shape[3])
        k, v = _kv_in(rows, kv_cache_dtype, q.dtype)
        k_pos = b * block_k + jnp.arange(block_k)
        mask = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] >= skip[:, None])  # [S, K]: also < kv_len
        if sliding_window is not None:
            mask &= k_pos[None, :] > (q_pos - sliding_window)[:, None]
        s = jnp.einsum("shgd,skhd->shgk", qg, k, preferred_element_type=jnp.float32) * sm_scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        s = jnp.where(mask[:, None, None, :], s, MASK_VALUE)
        # Invisible slots may hold anything, NaN included: 0 * NaN would leak into the sum.
        v = jnp.where(mask[:, :, None, None], v, 0)
        return _accumulate(carry, s, mask[:, None, None, :], v, "shgk,skhd->shgd")

    shared_pages_per_block = max(1, min(pages_per_seq, shared_block_k // page_size))
    shared_k = shared_pages_per_block * page_size
    ref_table = jnp.pad(page_indices[ref], (0, shared_pages_per_block))

    def shared_visit(b, carry):
        pages = jax.lax.dynamic_slice_in_dim(ref_table, b * shared_pages_per_block, shared_pages_per_block)
        gathered = kv_pages[pages] if layer is None else kv_pages[layer, pages]
        k, v = _kv_in(gathered.reshape(shared_k, 2 * num_kv_heads, layer_shape[3]), kv_cache_dtype, q.dtype)
        k_pos = b * shared_k + jnp.arange(shared_k)
        valid = k_pos < shared_len
        mask = member[:, None] & valid[None, :]  # [S, K]
        if sliding_window is not None:
            mask &= k_pos[None, :] > (q_pos - sliding_window)[:, None]
        k, v = jnp.transpose(k, (1, 0, 2)), jnp.transpose(jnp.where(valid[:, None, None], v, 0), (1, 0, 2))
        s = jnp.einsum("shgd,hkd->shgk", qg, k, preferred_element_type=jnp.float32) * sm_scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        s = jnp.where(mask[:, None, None, :], s, MASK_VALUE)
        return _accumulate(carry, s, mask[:, None, None, :], v, "shgk,hkd->shgd")

    init = (jnp.full((num_seqs, num_kv_heads, group), MASK_VALUE, jnp.float32),
            jnp.zeros((num_seqs, num_kv_heads, group), jnp.float32),
            jnp.zeros((num_seqs, num_kv_heads, group, head_dim), jnp.float32))
    init = jax.lax.fori_loop(0, (shared_len + shared_k - 1) // shared_k, shared_visit, init)
    out, lse = _normalize(*jax.lax.fori_loop(lo, hi, visit, init))
    out, lse = out.reshape(num_seqs, num_q_heads, head_dim), lse.reshape(num_seqs, num_q_heads)
    if sinks is not None:
        out = apply_sinks(out, lse, sinks)
    out = out.astype(q.dtype)
    return (out, lse) if return_lse else out
