"""The engine's ragged paged attention under plain XLA (the CPU path), same contract as the oracle in
`reference.py`.

The general path (`sequence_blocks_attention`) walks the live sequences; each gathers its key blocks once,
up to its own length, and runs an online softmax of each block over its rows in windows of `block_q` rows,
visiting only the (block, window) pairs the rows can see (causal bound above, sliding window below; `fori_loop`s
with traced bounds), so a prefill of L tokens costs ~L^2/2 key visits, not L x (bucketed pages x page_size).
Keys that a group of the step's sequences share (a burst's cached system prompt: the same pages at the start of
their tables) are gathered once and run over all the members' rows at once before that loop (`shared_prefix`).
On CPU each op in a loop costs a dispatch and a page gather costs memory traffic, so when the step holds one
live sequence (a prompt's chunk, cached prefix or not) a path with fewer, bigger blocks is chosen at run time:
its rows run together (`lone_chunk_attention`). The per-tile loop the general path replaced (`_tiled_attention`:
every tile of `block_q` rows gathers its sequence's blocks again) stays as a second implementation to check and
time against. (Sessions 8-10 also had a slot-tile path for bursts of short suffixes; the general path matches
it there and beats it on many small sequences, so it went in session 11.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxserve.kernels import kv_quant
from jaxserve.kernels.reference import (MASK_VALUE, _split_kv, apply_sinks, masked_scores, validate_inputs,
                                       validate_sinks)


def default_block_k(context: int) -> int:
    """Keys per block: 512 once a sequence's bucketed context reaches 4096, 256 below (`jaxserve.launch.bench_cpu_ops`:
    a 4096-token prefill layer 94 vs 123 ms; a 544-token one 4.0 ms with 256, 6.0 with 512)."""
    return 512 if context >= 4096 else 256


def default_block_q(num_tokens: int, max_seqs: int) -> int:
    """Rows per tile: big tiles for long prefill chunks (fewer KV re-reads), 16 when the step is mostly
    one-token decodes (each sequence wastes up to a tile)."""
    per_seq = max(num_tokens // max(max_seqs, 1), 1)
    return max(16, min(128, 1 << (per_seq.bit_length() - 1)))


# Rows and keys per visit of the shared-prefix phase: every row of the step in windows of this many rows (those
# without a member row skipped), the prefix's keys in blocks of SHARED_BLOCK_K: few, big dots.
SHARED_BLOCK_Q, SHARED_BLOCK_K = 256, 512


def _kv_in(rows, kv_cache_dtype, dtype):
    """K, V [..., Hkv, D] of packed cache rows [..., 2*Hkv, D], dequantized (bf16 bits bitcast) or cast to the
    queries' dtype: bf16 queries make every dot bf16-in, f32-accumulate (the caller's choice for a bf16 model)."""
    return _split_kv(kv_quant.dequantize(rows, kv_cache_dtype, dtype).astype(dtype))


def _accumulate(carry, s, mask, v, pv_spec: str):
    """One key block of an online softmax: carry (running max m, normaliser l, output acc, all f32), scores
    s [..., K] (MASK_VALUE where masked), `mask` broadcastable to s, values v for `pv_spec` (an einsum of
    probabilities [..., K] and v into acc's shape) -> the new carry."""
    m, l, acc = carry
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
    alpha = jnp.exp(m - m_new)
    acc = acc * alpha[..., None] + jnp.einsum(pv_spec, p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, l * alpha + jnp.sum(p, axis=-1), acc


def _normalize(m, l, acc):
    """The online softmax's end: (out = acc / l, lse over the keys); rows that saw no key give 0 and -inf."""
    has_key = l > 0
    out = acc / jnp.where(has_key, l, 1.0)[..., None]
    return out, jnp.where(has_key, m + jnp.log(jnp.where(has_key, l, 1.0)), -jnp.inf)


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "return_lse", "block_q",
                                             "block_k", "kv_cache_dtype", "layer", "lone_chunk",
                                             "sequence_blocks", "shared_block_q", "shared_block_k"))
def ragged_paged_attention_xla(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale=1.0,
                               sliding_window=None, soft_cap=None, return_lse=False, block_q=None, block_k=None,
                               sinks=None, kv_cache_dtype="auto", layer=None, lone_chunk=None,
                               sequence_blocks=True, shared_block_q=SHARED_BLOCK_Q, shared_block_k=SHARED_BLOCK_K):
    """q [T, Hq, D]; kv_pages [P, page_size, 2*Hkv, D] (quantized: uint8 rows of D + 4, `kv_cache_dtype`); kv_lens i32[S]; page_indices i32[S, pages_per_seq];
    cu_q_lens i32[S+1]; num_seqs i32[1]; sinks f32[Hq] or None -> out [T, Hq, D] (and lse f32[T, Hq], keys
    only, with `return_lse`). Rows of no live sequence are zero (lse -inf).

    `lone_chunk` (static): take `lone_chunk_attention` instead of the general path when at run time the step
    holds one live sequence (the branch is compiled beside the general path, so steps where it gains little do
    not pay for its compile); None: for steps of LONE_MIN_TOKENS to LONE_MAX_TOKENS tokens; True: any step;
    False: never. `sequence_blocks` (static): the general path is
    `sequence_blocks_attention` (True) or the per-tile loop it replaced (False, for checks and timings);
    `shared_block_q` / `shared_block_k` (static): its shared-prefix phase's row windows and key blocks."""
    # With `layer` (static), kv_pages is the whole stacked cache [L, P, ...]: the loop gathers that layer's
    # pages from it (a layer sliced before the loop is copied into it on every step).
    validate_inputs(q, kv_pages if layer is None else kv_pages[layer], kv_lens, page_indices, cu_q_lens, num_seqs,
                    kv_cache_dtype)
    validate_sinks(sinks, q.shape[1])
    block_q = block_q or default_block_q(q.shape[0], page_indices.shape[0])
    layer_shape = kv_pages.shape if layer is None else kv_pages.shape[1:]
    kw = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, block_q=block_q, sinks=sinks,
              kv_cache_dtype=kv_cache_dtype, layer=layer)
    args = (q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    if sequence_blocks:
        general = functools.partial(sequence_blocks_attention, **kw, block_k=block_k or sequence_block_k(block_q),
                                    shared_block_q=shared_block_q, shared_block_k=shared_block_k)
    else:
        general = functools.partial(_tiled_attention, **kw,
                                    block_k=block_k or default_block_k(page_indices.shape[1] * layer_shape[1]))
    if lone_chunk is None:
        lone_chunk = LONE_MIN_TOKENS <= q.shape[0] <= LONE_MAX_TOKENS
    if lone_chunk and sliding_window is None:
        out, lse = jax.lax.cond(num_seqs[0] == 1, functools.partial(lone_chunk_attention, block_k=block_k, **kw),
                                general, *args)
    else:
        out, lse = general(*args)
    return (out, lse) if return_lse else out


# Steps (padded tokens) that compile the lone-chunk path by default. Against the per-tile loop it won from 32
# tokens (a cached suffix: 32 over 544 keys 0.74 -> 0.40 ms a layer, 64 over 832 1.70 -> 0.81; at 16 tokens the
# two were equal); against the general path that replaced the loop it still wins, by less (session 11, one layer:
# 32 over 512 keys 0.53 -> 0.49 ms, 64 over 768 0.93 -> 0.81, 512 fresh 2.5 -> 2.0, 1024 fresh 8.7 -> 6.3). At
# 2048 attention is dot-bound and the unrolled row tiles would only grow the program.
LONE_MIN_TOKENS, LONE_MAX_TOKENS = 32, 1024
# Query rows per tile of the lone-chunk path. One layer, least of 30 (probe in docs/notes-issue-14.md, session 10),
# per-tile loop vs this path at 64 / 128 / 256 rows: 256 tokens 1.2 vs 0.72 / 0.69 / 0.73 ms, 512 tokens 3.1 vs
# 1.55 / 1.58 / 1.58, 1024 tokens 9.2 vs 7.7 / 5.2 / 4.9, 2048 tokens 33 vs 34 / 33 / 31.
LONE_BLOCK_Q = 256


def lone_chunk_attention(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale, sliding_window,
                         soft_cap, block_q, sinks, kv_cache_dtype, layer, block_k=None):
    """Same contract as `ragged_paged_attention_xla` (out and lse) when the step holds one live sequence (a
    prompt's chunk, over any earlier context): every row sees the keys before the chunk, visited in blocks of
    `block_k` with all rows at once; then the chunk's own keys are gathered once, row by row, and each static
    tile of LONE_BLOCK_Q rows takes the causal triangle up to its last row in one block. A few big ops instead of
    a loop over small tiles. No sliding window (the caller keeps those on the per-tile loop)."""
    del sliding_window, block_q
    num_tokens, num_q_heads, head_dim = q.shape
    pages_per_seq = page_indices.shape[1]
    layer_shape = kv_pages.shape if layer is None else kv_pages.shape[1:]
    page_size, num_kv_heads = layer_shape[1], layer_shape[2] // 2
    group = num_q_heads // num_kv_heads
    pages_per_block = max(1, min(pages_per_seq, (block_k or default_block_k(pages_per_seq * page_size)) // page_size))
    block_k = pages_per_block * page_size
    table = jnp.pad(page_indices[0], (0, pages_per_block))  # page 0 pads; its keys sit past the chunk's start

    def rows_of(pages, offsets):
        """K, V [n, Hkv, D] of the cache rows at (pages, offsets), dequantized."""
        kv = kv_pages[pages, offsets] if layer is None else kv_pages[layer, pages, offsets]
        return _kv_in(kv, kv_cache_dtype, q.dtype)

    q_len = cu_q_lens[1] - cu_q_lens[0]
    start = kv_lens[0] - q_len                                     # keys before the chunk
    qh = jnp.transpose(q.reshape(num_tokens, num_kv_heads, group, head_dim), (1, 2, 0, 3))  # [Hkv, G, T, D]
    q_pos = start + jnp.arange(num_tokens)                         # [T]
    row_live = jnp.arange(num_tokens) < q_len

    def before(b, carry):
        pages = jax.lax.dynamic_slice_in_dim(table, b * pages_per_block, pages_per_block)
        r = jnp.arange(block_k)
        k, v = rows_of(pages[r // page_size], r % page_size)
        k_pos = b * block_k + r
        valid = k_pos < start
        s, mask = masked_scores(qh, k, q_pos, k_pos, valid, sm_scale, soft_cap, None, heads_first=True)
        return _accumulate(carry, s, mask, jnp.where(valid[:, None, None], v, 0), "hgqk,khd->hgqd")

    carry = (jnp.full((num_kv_heads, group, num_tokens), MASK_VALUE, jnp.float32),
             jnp.zeros((num_kv_heads, group, num_tokens), jnp.float32),
             jnp.zeros((num_kv_heads, group, num_tokens, head_dim), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, (start + block_k - 1) // block_k, before, carry)

    # The chunk's own keys (padding rows clamp into the table and are masked).
    pos = jnp.minimum(q_pos, pages_per_seq * page_size - 1)
    k, v = rows_of(page_indices[0][pos // page_size], pos % page_size)
    v = jnp.where(row_live[:, None, None], v, 0)  # unused pages may hold NaN
    outs, lses = [], []
    for t0 in range(0, num_tokens, LONE_BLOCK_Q):
        t1 = min(num_tokens, t0 + LONE_BLOCK_Q)
        s, mask = masked_scores(qh[:, :, t0:t1], k[:t1], q_pos[t0:t1], q_pos[:t1], row_live[:t1], sm_scale, soft_cap,
                                None, heads_first=True)
        out, lse = _normalize(*_accumulate((m[..., t0:t1], l[..., t0:t1], acc[..., t0:t1, :]), s, mask, v[:t1],
                                           "hgqk,khd->hgqd"))
        outs.append(out)
        lses.append(lse)
    out = jnp.transpose(jnp.concatenate(outs, axis=2), (2, 0, 1, 3)).reshape(num_tokens, num_q_heads, head_dim)
    lse = jnp.transpose(jnp.concatenate(lses, axis=2), (2, 0, 1)).reshape(num_tokens, num_q_heads)
    if sinks is not None:
        out = apply_sinks(out, lse, sinks)
    out = jnp.where(row_live[:, None, None], out, 0).astype(q.dtype)
    return out, jnp.where(row_live[:, None], lse, -jnp.inf)


def sequence_block_k(block_q: int) -> int:
    """Keys per block of the general path: 4 x the row window, within [128, 512]. Small windows (a mixed step of
    decodes, suffixes and a prompt chunk) lose to masked keys and wasted rows with big blocks; long chunks (128-row
    windows) lose to per-visit cost with small ones. One layer (8 query / 4 KV heads of 64), 16-row windows,
    blocks of 64 / 128 / 256 / 512 keys: 13 decodes + 3 x 64 suffixes + a 307-token chunk over ~830 keys 32 /
    29 / 31 / 48 ms (the per-tile loop: 50); a 4096-token prefill in 128-row windows, 128 / 256 / 512 keys:
    318 / 301 / 200 ms (the per-tile loop: 259). A one-off probe (docs/notes-issue-14.md, session 11);
    `bench_cpu_ops` times the default against the per-tile loop."""
    return max(128, min(512, 4 * block_q))


def shared_prefix(kv_lens, q_lens, live, page_indices, page_size: int):
    """The key prefix that a group of the step's sequences share: (reference sequence, shared keys, member
    mask bool[S]). kv_lens, q_lens i32[S], live bool[S]. The group is the largest set of live sequences whose
    first page is the same cached page (a burst over one system prompt, a cached document's questions); the
    shared keys are the pages every member has in common with the reference from the start, up to each
    member's cached pages (keys before its first row, so all of its rows see all of them). Fewer than two
    members: no group (0 keys, no member)."""
    cached_pages = jnp.where(live & (q_lens > 0), (kv_lens - q_lens) // page_size, 0)
    first = page_indices[:, 0]
    can = cached_pages > 0
    same_first = (first[:, None] == first[None, :]) & can[:, None] & can[None, :]   # [S, S]
    count = jnp.sum(same_first, axis=1)
    ref = jnp.argmax(count).astype(jnp.int32)
    enough = count[ref] >= 2
    member = same_first[ref] & enough
    common = jnp.sum(jnp.cumprod(page_indices == page_indices[ref][None, :], axis=1), axis=1)
    shared_pages = jnp.min(jnp.where(member, jnp.minimum(common, cached_pages), page_indices.shape[1]))
    return ref, jnp.where(jnp.any(member), shared_pages * page_size, 0).astype(jnp.int32), member


def sequence_blocks_attention(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale, sliding_window,
                              soft_cap, block_q, block_k, sinks, kv_cache_dtype, layer, shared_block_q=SHARED_BLOCK_Q,
                              shared_block_k=SHARED_BLOCK_K):
    """The general path, same contract as `ragged_paged_attention_xla` (out and lse). First the key prefix a
    group of sequences shares (`shared_prefix`: a burst's common cached prompt) is gathered once and run over
    the step's rows in big windows, masked to the members' rows. Then a loop over the live sequences; each
    gathers its remaining key blocks once (up to its kv_len, from the first block its sliding window reaches,
    past the shared prefix for a member) and runs each block over its rows in windows of `block_q` rows, only the
    windows whose rows see it. The per-row softmax state of the whole step is carried, so a window's rows past
    its sequence (the next sequence's, or padding) see only masked keys and keep their state."""
    num_tokens, num_q_heads, head_dim = q.shape
    pages_per_seq = page_indices.shape[1]
    layer_shape = kv_pages.shape if layer is None else kv_pages.shape[1:]
    page_size, num_kv_heads = layer_shape[1], layer_shape[2] // 2
    group = num_q_heads // num_kv_heads
    pages_per_block = max(1, min(pages_per_seq, block_k // page_size))
    block_k = pages_per_block * page_size
    num_blocks = -(-pages_per_seq // pages_per_block)
    # Page 0 pads the table to whole key blocks; those keys sit past kv_len and are masked.
    table = jnp.pad(page_indices, ((0, 0), (0, num_blocks * pages_per_block - pages_per_seq)))
    shared_q = min(shared_block_q, -(-num_tokens // 16) * 16)
    rows = num_tokens + max(block_q, shared_q)  # a window that starts at the last row stays in bounds
    q_pad = jnp.concatenate([q, jnp.zeros((rows - num_tokens, num_q_heads, head_dim), q.dtype)], axis=0)
    qh = jnp.transpose(q_pad.reshape(rows, num_kv_heads, group, head_dim), (1, 2, 0, 3))  # [Hkv, G, rows, D]
    window_rows = jnp.arange(block_q)
    ref, shared_len, member = shared_prefix(kv_lens, cu_q_lens[1:] - cu_q_lens[:-1],
                                            jnp.arange(page_indices.shape[0]) < num_seqs[0], page_indices, page_size)

    def gather(seq_table, b, pages_per_block):
        """K, V [Hkv, K, D] of key block b of a page table (keys past `valid` zeroed by the caller)."""
        pages = jax.lax.dynamic_slice_in_dim(seq_table, b * pages_per_block, pages_per_block)
        gathered = kv_pages[pages] if layer is None else kv_pages[layer, pages]
        return _kv_in(gathered.reshape(pages_per_block * page_size, 2 * num_kv_heads, layer_shape[3]),
                      kv_cache_dtype, q.dtype)

    def visit(carry, row, n, qg_pos, k, v, k_pos, mask):
        """The online softmax of rows [row, row + n) over one key block (k, v [Hkv, K, D]; mask [n, K])."""
        qg = jax.lax.dynamic_slice_in_dim(qh, row, n, axis=2)
        s = jnp.einsum("hgqd,hkd->hgqk", qg, k, preferred_element_type=jnp.float32) * sm_scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        if sliding_window is not None:
            mask &= k_pos[None, :] > qg_pos[:, None] - sliding_window
        s = jnp.where(mask[None, None], s, MASK_VALUE)
        state = tuple(jax.lax.dynamic_slice_in_dim(x, row, n, axis=2) for x in carry)
        state = _accumulate(state, s, mask, v, "hgqk,hkd->hgqd")
        return tuple(jax.lax.dynamic_update_slice_in_dim(x, u, row, axis=2) for x, u in zip(carry, state))

    def shared_phase(carry):
        shared_pages_per_block = max(1, min(pages_per_seq, shared_block_k // page_size))
        shared_k = shared_pages_per_block * page_size
        ref_table = jnp.pad(page_indices[ref], (0, shared_pages_per_block))
        row_ids = jnp.arange(rows)
        row_seq = jnp.clip(jnp.searchsorted(cu_q_lens[1:], row_ids, side="right"), 0, page_indices.shape[0] - 1)
        row_member = member[row_seq] & (row_ids < cu_q_lens[num_seqs[0]])
        row_pos = kv_lens[row_seq] - cu_q_lens[row_seq + 1] + row_ids   # start + (row - r0)

        def one_block(b, carry):
            k, v = gather(ref_table, b, shared_pages_per_block)
            k_pos = b * shared_k + jnp.arange(shared_k)
            valid = k_pos < shared_len
            v = jnp.where(valid[:, None, None], v, 0)
            k, v = jnp.transpose(k, (1, 0, 2)), jnp.transpose(v, (1, 0, 2))

            def one_window(w, carry):
                row = w * shared_q
                live = jax.lax.dynamic_slice_in_dim(row_member, row, shared_q)
                pos = jax.lax.dynamic_slice_in_dim(row_pos, row, shared_q)
                return jax.lax.cond(jnp.any(live), lambda c: visit(c, row, shared_q, pos, k, v, k_pos,
                                                                   valid[None, :] & live[:, None]),
                                    lambda c: c, carry)
            return jax.lax.fori_loop(0, -(-num_tokens // shared_q), one_window, carry)
        return jax.lax.fori_loop(0, (shared_len + shared_k - 1) // shared_k, one_block, carry)

    def one_sequence(seq, carry):
        r0, kv_len = cu_q_lens[seq], kv_lens[seq]
        q_len = cu_q_lens[seq + 1] - r0
        start = kv_len - q_len                         # position of the sequence's first row
        num_windows = (q_len + block_q - 1) // block_q
        skip = jnp.where(member[seq], shared_len, 0)  # keys the shared phase gave its rows
        lo = skip // block_k
        if sliding_window is not None:
            lo = jnp.maximum(lo, jnp.maximum(start - sliding_window + 1, 0) // block_k)
        hi = jnp.where(q_len > 0, jnp.minimum((kv_len + block_k - 1) // block_k, num_blocks), lo)

        def one_block(b, carry):
            k, v = gather(table[seq], b, pages_per_block)
            k_pos = b * block_k + jnp.arange(block_k)
            valid = (k_pos < kv_len) & (k_pos >= skip)
            # Invisible slots may hold anything, NaN included: 0 * NaN would leak into the sum.
            v = jnp.where(valid[:, None, None], v, 0)
            # Once per block, the layout every window's dots read.
            k, v = jnp.transpose(k, (1, 0, 2)), jnp.transpose(v, (1, 0, 2))    # [Hkv, K, D]
            first = jnp.maximum(b * block_k - start, 0) // block_q           # rows before it see none of it
            last = num_windows
            if sliding_window is not None:  # rows past it whose window starts after the block see none of it
                reach = (b + 1) * block_k + sliding_window - 2 - start
                last = jnp.clip(reach // block_q + 1, 0, num_windows)

            def one_window(w, carry):
                q_pos = start + w * block_q + window_rows
                live = w * block_q + window_rows < q_len
                mask = valid[None, :] & (k_pos[None, :] <= q_pos[:, None]) & live[:, None]
                return visit(carry, r0 + w * block_q, block_q, q_pos, k, v, k_pos, mask)
            return jax.lax.fori_loop(first, last, one_window, carry)
        return jax.lax.fori_loop(lo, hi, one_block, carry)

    carry = (jnp.full((num_kv_heads, group, rows), MASK_VALUE, jnp.float32),
             jnp.zeros((num_kv_heads, group, rows), jnp.float32),
             jnp.zeros((num_kv_heads, group, rows, head_dim), jnp.float32))
    carry = shared_phase(carry)
    out, lse = _normalize(*jax.lax.fori_loop(0, num_seqs[0], one_sequence, carry))
    out = jnp.transpose(out, (2, 0, 1, 3)).reshape(rows, num_q_heads, head_dim)[:num_tokens]
    lse = jnp.transpose(lse, (2, 0, 1)).reshape(rows, num_q_heads)[:num_tokens]
    if sinks is not None:
        out = apply_sinks(out, lse, sinks)
    live = jnp.arange(num_tokens) < cu_q_lens[num_seqs[0]]
    return jnp.where(live[:, None, None], out, 0).astype(q.dtype), jnp.where(live[:, None], lse, -jnp.inf)


def _scatter_rows(out, lse, dest, num_tokens):
    """Tile rows back to packed token order; dead rows (dest == num_tokens) go to a sink row past the end."""
    o = jnp.zeros((num_tokens + 1,) + out.shape[1:], out.dtype).at[dest].set(out)[:num_tokens]
    return o, jnp.full((num_tokens + 1, lse.shape[1]), -jnp.inf, jnp.float32).at[dest].set(lse)[:num_tokens]


def _tiled_attention(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale, sliding_window, soft_cap,
                     block_q, block_k, sinks, kv_cache_dtype, layer):
    """The general path before session 11 (out and lse), kept to check and time `sequence_blocks_attention`
    against: tiles of `block_q` rows that never cross a sequence, each an online softmax over the key blocks its
    rows can see, gathered again by every tile."""
    layer_shape = kv_pages.shape if layer is None else kv_pages.shape[1:]
    num_tokens, num_q_heads, head_dim = q.shape
    max_seqs, pages_per_seq = page_indices.shape
    page_size, num_kv_heads = layer_shape[1], layer_shape[2] // 2
    group = num_q_heads // num_kv_heads
    pages_per_block = max(1, min(pages_per_seq, block_k // page_size))
    block_k = pages_per_block * page_size
    num_blocks = -(-pages_per_seq // pages_per_block)
    # Page 0 pads the table to whole key blocks; those keys sit past kv_len and are masked.
    table = jnp.pad(page_indices, ((0, 0), (0, num_blocks * pages_per_block - pages_per_seq)))

    seq_ids = jnp.arange(max_seqs)
    q_lens = jnp.where(seq_ids < num_seqs[0], cu_q_lens[1:] - cu_q_lens[:-1], 0)
    tiles_per_seq = (q_lens + block_q - 1) // block_q
    tile_end = jnp.cumsum(tiles_per_seq)
    max_tiles = -(-num_tokens // block_q) + max_seqs
    tile_ids = jnp.arange(max_tiles)
    tile_seq = jnp.searchsorted(tile_end, tile_ids, side="right").astype(jnp.int32)
    tile_live = (tile_seq < max_seqs) & (tile_ids < tile_end[-1])
    tile_seq = jnp.minimum(tile_seq, max_seqs - 1)
    first_tile = tile_end[tile_seq] - tiles_per_seq[tile_seq]
    row0 = cu_q_lens[tile_seq] + (tile_ids - first_tile) * block_q
    q_pad = jnp.concatenate([q, jnp.zeros((block_q, num_q_heads, head_dim), q.dtype)], axis=0)
    q_pad = jnp.transpose(q_pad.reshape(-1, num_kv_heads, group, head_dim), (1, 2, 0, 3))  # [Hkv, G, T + bq, D]

    def live_tile(seq, r0, row_live):
        qg = jax.lax.dynamic_slice_in_dim(q_pad, jnp.minimum(r0, num_tokens), block_q, axis=2)
        kv_len = kv_lens[seq]
        q_pos = kv_len - q_lens[seq] + r0 + jnp.arange(block_q) - cu_q_lens[seq]  # [bq]
        top = jnp.max(jnp.where(row_live, q_pos, 0))
        hi = jnp.minimum(top // block_k + 1, num_blocks)
        lo = 0
        if sliding_window is not None:
            bottom = jnp.min(jnp.where(row_live, q_pos, top))
            lo = jnp.maximum(bottom - sliding_window + 1, 0) // block_k

        def visit(b, carry):
            pages = jax.lax.dynamic_slice_in_dim(table[seq], b * pages_per_block, pages_per_block)
            gathered = kv_pages[pages] if layer is None else kv_pages[layer, pages]
            rows = gathered.reshape(block_k, 2 * num_kv_heads, layer_shape[3])
            k, v = _kv_in(rows, kv_cache_dtype, q.dtype)
            k_pos = b * block_k + jnp.arange(block_k)
            valid = k_pos < kv_len
            s, mask = masked_scores(qg, k, q_pos, k_pos, valid, sm_scale, soft_cap, sliding_window, heads_first=True)
            # Invisible slots may hold anything, NaN included: 0 * NaN would leak into the sum.
            v = jnp.where(valid[:, None, None], v, 0)
            return _accumulate(carry, s, mask, v, "hgqk,khd->hgqd")

        init = (jnp.full((num_kv_heads, group, block_q), MASK_VALUE, jnp.float32),
                jnp.zeros((num_kv_heads, group, block_q), jnp.float32),
                jnp.zeros((num_kv_heads, group, block_q, head_dim), jnp.float32))
        out, lse = _normalize(*jax.lax.fori_loop(lo, hi, visit, init))
        out = jnp.transpose(out, (2, 0, 1, 3)).reshape(block_q, num_q_heads, head_dim)
        lse = jnp.transpose(lse, (2, 0, 1)).reshape(block_q, num_q_heads)
        if sinks is not None:
            out = apply_sinks(out, lse, sinks)
        out = jnp.where(row_live[:, None, None], out, 0).astype(q.dtype)
        return out, jnp.where(row_live[:, None], lse, -jnp.inf)

    def dead_tile(seq, r0, row_live):
        return (jnp.zeros((block_q, num_q_heads, head_dim), q.dtype),
                jnp.full((block_q, num_q_heads), -jnp.inf, jnp.float32))

    def tile(args):
        seq, r0, live = args
        row_live = live & (r0 + jnp.arange(block_q) < cu_q_lens[seq + 1])
        o, lse_rows = jax.lax.cond(live, live_tile, dead_tile, seq, r0, row_live)
        return o, lse_rows, row_live

    out_t, lse_t, live_t = jax.lax.map(tile, (tile_seq, row0, tile_live))
    rows = jnp.where(live_t, row0[:, None] + jnp.arange(block_q)[None, :], num_tokens).reshape(-1)
    return _scatter_rows(out_t.reshape(-1, num_q_heads, head_dim), lse_t.reshape(-1, num_q_heads), rows, num_tokens)
