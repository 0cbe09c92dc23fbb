"""The engine's decode attention under plain XLA (the CPU path for steps that only decode): one query per
sequence, an online softmax over key blocks in lockstep up to the longest live sequence, the prefix a group of
sequences shares gathered once (`xla_attention.shared_prefix`), or, for a step's few live sequences, each one's
keys in big blocks of its own."""

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
# A step whose few live sequences would cost less each in big blocks of its own than in the lockstep loop (which
# also runs every padding slot of the step's 8 or more) takes them one after the other instead
# (`own_blocks_cheaper`), a key of its own blocks counted as this many slot-keys of the loop (one layer of issue
# 14's model, bf16 bits, 8 slots, `bench_cpu_ops`: 0.26-0.41 us a key of its own blocks, 0.13-0.15 us a slot-key
# of the loop). So 1 live sequence of 600 keys 0.81 -> 0.50 ms, 2 of 1800 2.01 -> 1.20 ms; 4 of 600 stay in the
# loop (counted as 1 slot-key, they took their own blocks: 0.87 -> 1.17 ms; docs/notes-issue-14.md, session 14).
OWN_KEY_COST = 2


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "return_lse", "block_k",
                                             "kv_cache_dtype", "layer", "shared_block_k", "own_blocks"))
def decode_paged_attention_blocked(q, kv_pages, kv_lens, page_indices, *, sm_scale=1.0, sliding_window=None,
                                   soft_cap=None, return_lse=False, block_k=None, sinks=None, kv_cache_dtype="auto",
                                   layer=None, shared_block_k=SHARED_BLOCK_K, own_blocks=True):
    """One query per sequence (position kv_len - 1), as `reference.ref_decode_paged_attention`, with an online
    softmax over key blocks up to the batch's longest sequence (a `fori_loop` with a traced bound). Its cost
    follows the live context, not the width of `page_indices`, so the engine can pass one page-table width
    for every decode step: one compilation per batch size instead of one per (batch size, context bucket).

    q [S, Hq, D]; kv_pages [P, page_size, 2*Hkv, D] (quantized: uint8 rows of D + 4, `kv_cache_dtype`);
    kv_lens i32[S] (0: no sequence, zeros out); page_indices i32[S, pages_per_seq]; sinks f32[Hq] or None
    -> out [S, Hq, D] (and lse f32[S, Hq]). `shared_block_k` (static): keys per block of the shared prefix and of
    a sequence's own blocks; `own_blocks` (static): let a step take each live sequence's keys in its own big
    blocks when that costs less than the lockstep loop (`own_blocks_cheaper`; compiled only for a table wider
    than one big block); False: the loop only."""
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
    ref, shared_len, member = shared_prefix(kv_lens, jnp.ones_like(kv_lens), live, page_indices, page_size)
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
    first_key = jnp.where(live, jnp.maximum(first_key, 0), 0)
    own_table = jnp.pad(page_indices, ((0, 0), (0, shared_pages_per_block)))

    def own_visit(seq, b, carry):  # one sequence's big block b; carry [Hkv, G], [Hkv, G], [Hkv, G, D]
        pages = jax.lax.dynamic_slice_in_dim(own_table[seq], b * shared_pages_per_block, shared_pages_per_block)
        gathered = kv_pages[pages] if layer is None else kv_pages[layer, pages]
        k, v = _kv_in(gathered.reshape(shared_k, 2 * num_kv_heads, layer_shape[3]), kv_cache_dtype, q.dtype)
        k_pos = b * shared_k + jnp.arange(shared_k)
        mask = (k_pos <= q_pos[seq]) & (k_pos >= first_key[seq])  # [K]; first_key holds the window's start
        s = jnp.einsum("hgd,khd->hgk", qg[seq], k, preferred_element_type=jnp.float32) * sm_scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        s = jnp.where(mask, s, MASK_VALUE)
        v = jnp.where(mask[:, None, None], v, 0)
        return _accumulate(carry, s, mask, v, "hgk,khd->hgd")

    def own_sequences(carry):
        def one_sequence(seq, carry):
            start, stop = own_block_range(first_key[seq], kv_lens[seq], shared_k)
            own = jax.lax.fori_loop(start, stop, functools.partial(own_visit, seq), tuple(c[seq] for c in carry))
            return tuple(c.at[seq].set(o) for c, o in zip(carry, own))
        return jax.lax.fori_loop(0, num_seqs, one_sequence, carry)

    def lockstep(carry):
        return jax.lax.fori_loop(lo, hi, visit, carry)

    # The own path costs a second loop body to compile (~0.12 s a layer): only where a sequence can hold more
    # keys than one big block, which is where it pays.
    if own_blocks and pages_per_seq > shared_pages_per_block:
        cheaper = own_blocks_cheaper(first_key, kv_lens, lo, hi, block_k, shared_k)
        out, lse = _normalize(*jax.lax.cond(cheaper, own_sequences, lockstep, init))
    else:
        out, lse = _normalize(*lockstep(init))
    out, lse = out.reshape(num_seqs, num_q_heads, head_dim), lse.reshape(num_seqs, num_q_heads)
    if sinks is not None:
        out = apply_sinks(out, lse, sinks)
    out = out.astype(q.dtype)
    return (out, lse) if return_lse else out


def own_block_range(first_key, kv_len, big_k: int):
    """The big blocks (of `big_k` keys) that hold keys first_key .. kv_len - 1 of one sequence: (start, stop)."""
    return first_key // big_k, jnp.where(kv_len > first_key, (kv_len + big_k - 1) // big_k, first_key // big_k)


def own_blocks_cheaper(first_key, kv_lens, lo, hi, block_k: int, big_k: int):
    """Whether the step's live sequences (kv_lens > 0), each from its first_key in its own big blocks, cost less
    than the lockstep loop's every slot over blocks lo .. hi - 1 of block_k keys, a key of their own blocks
    counted as OWN_KEY_COST slot-keys. i32[S] -> bool."""
    start, stop = own_block_range(first_key, kv_lens, big_k)
    own_keys = jnp.sum(jnp.where(kv_lens > 0, stop - start, 0)) * big_k
    return own_keys * OWN_KEY_COST < kv_lens.shape[0] * (hi - lo) * block_k
