"""Pure-jnp paged attention: the oracle every kernel is tested against, and the engine's CPU path.

KV layout (DESIGN.md §3): kv_pages `[num_pages, page_size, 2 * num_kv_heads, head_dim]`, K of kv head h at
index 2h and V at 2h + 1 of axis 2. Query i of a sequence with `kv_len` keys and `q_len` queries sits at
position `kv_len - q_len + i` and sees keys 0..that position (semantics of JAX's
`ref_ragged_paged_attention`).

Three functions share that contract (the first two here):
- `ref_ragged_paged_attention`: per-token gather; obviously correct, memory-hungry; tests only.
- `xla_attention.ragged_paged_attention_xla` (its own module): the same result with an online softmax over
  the key blocks each query tile can see; the engine's path for mixed prefill/decode steps on CPU.
- `decode_paged_attention_xla`: one query per sequence, batched; the engine's path for decode-only steps.

Attention sinks (gpt-oss): `sinks` f32[Hq], one learned logit per query head, joins every row's softmax as
an extra column with no value vector: out = sum_k e^(s_k - m) v_k / (sum_k e^(s_k - m) + e^(sink - m)).
Here that column is concatenated into the softmax explicitly (the oracle stays independent of the
kernels, which use `apply_sinks`). With `return_lse` the lse is that of the keys only, sink excluded, so
`merge_attention` of disjoint KV ranges stays exact: merge without sinks, then apply the sink once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxserve.kernels import kv_quant

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def masked_scores(qg, k, q_pos, k_pos, k_valid, sm_scale: float, soft_cap, sliding_window, heads_first=False):
    """Attention scores f32[Hkv, group, Q, K] of grouped queries qg [Q, Hkv, group, D] (with `heads_first`:
    [Hkv, group, Q, D], the dot's own layout, which saves XLA:CPU a transpose per call) against keys k [K, Hkv, D]:
    scaled, soft-capped (soft_cap), and MASK_VALUE where a key is invalid (k_valid), after its query (causal by
    position) or outside the sliding window; and that mask bool[Q, K]."""
    spec = "hgqd,khd->hgqk" if heads_first else "qhgd,khd->hgqk"
    s = jnp.einsum(spec, qg, k, preferred_element_type=jnp.float32) * sm_scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    mask = k_valid[None, :] & (k_pos[None, :] <= q_pos[:, None])
    if sliding_window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - sliding_window
    return jnp.where(mask[None, None], s, MASK_VALUE), mask


def _split_kv(kv: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[..., 2*Hkv, D] -> K [..., Hkv, D], V [..., Hkv, D]."""
    return kv[..., 0::2, :], kv[..., 1::2, :]


def _scores_to_output(q, k, v, q_pos, k_pos, k_valid, *, sm_scale, sliding_window, soft_cap, sinks=None):
    """q [Q, Hq, D]; k, v [K, Hkv, D]; q_pos [Q]; k_pos [K]; k_valid [K]; sinks f32[Hq] or None
    -> (out [Q, Hq, D], lse [Q, Hq]; lse over the keys only)."""
    num_q, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads
    qg = q.reshape(num_q, num_kv_heads, group, head_dim)
    s, mask = masked_scores(qg, k, q_pos, k_pos, k_valid, sm_scale, soft_cap, sliding_window)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    p = jnp.where(mask[None, None], p, 0.0)
    # Invisible slots (unused pages, page tails) may hold anything, NaN included: 0 * NaN would leak.
    v = jnp.where(k_valid[:, None, None], v, 0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    has_key = denom > 0
    if sinks is None:
        probs = p / jnp.where(has_key, denom, 1.0)
    else:  # softmax over [masked scores..., sink], sink column dropped
        sink = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(num_kv_heads, group, 1, 1), m.shape)
        logits = jnp.concatenate([s, sink], axis=-1)
        m_all = jnp.max(logits, axis=-1, keepdims=True)
        p_all = jnp.exp(logits - m_all)
        p_all = p_all.at[..., :-1].set(jnp.where(mask[None, None], p_all[..., :-1], 0.0))
        tot = jnp.sum(p_all, axis=-1, keepdims=True)  # 0 only for a -inf sink and no visible key
        probs = p_all[..., :-1] / jnp.where(tot > 0, tot, 1.0)
    out = jnp.einsum("hgqk,khd->qhgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    lse = jnp.where(has_key, m + jnp.log(jnp.where(has_key, denom, 1.0)), -jnp.inf)[..., 0]  # [Hkv, G, Q]
    out = out.reshape(num_q, num_q_heads, head_dim).astype(q.dtype)
    return out, lse.reshape(num_q_heads, num_q).T


def _seq_of_token(cu_q_lens, num_seqs, num_tokens):
    """Sequence index of each packed query token, and whether the token belongs to a live sequence."""
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.searchsorted(cu_q_lens[1:], t, side="right").astype(jnp.int32)
    live = (seq < num_seqs[0]) & (t < cu_q_lens[jnp.minimum(num_seqs[0], cu_q_lens.shape[0] - 1)])
    return jnp.minimum(seq, cu_q_lens.shape[0] - 2), live


def validate_inputs(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, kv_cache_dtype="auto"):
    """Shape checks shared by the reference and every kernel, with messages that say what is expected.
    Quantized pages (`kv_cache_dtype`, see kv_quant.py) are uint8 rows of head_dim + 4 bytes."""
    if q.ndim != 3 or kv_pages.ndim != 4:
        raise ValueError(f"q must be [T, Hq, D] and kv_pages [P, page_size, 2*Hkv, D]; got {q.shape}, "
                         f"{kv_pages.shape}")
    if kv_pages.shape[2] % 2 or q.shape[1] % (kv_pages.shape[2] // 2):
        raise ValueError(f"kv_pages axis 2 ({kv_pages.shape[2]}) must be 2*Hkv with Hq ({q.shape[1]}) a "
                         "multiple of Hkv")
    if kv_quant.is_quantized(kv_cache_dtype) and kv_pages.dtype != jnp.uint8:
        raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} needs uint8 kv_pages, got {kv_pages.dtype}")
    if q.shape[2] != kv_quant.head_dim_of(kv_pages.shape[3], kv_cache_dtype):
        raise ValueError(f"head_dim mismatch: q {q.shape[2]} vs kv_pages {kv_pages.shape[3]} "
                         f"(kv_cache_dtype {kv_cache_dtype!r}: rows of "
                         f"{kv_quant.row_width(q.shape[2], kv_cache_dtype)})")
    num_seqs_max = page_indices.shape[0]
    if kv_lens.shape != (num_seqs_max,) or cu_q_lens.shape != (num_seqs_max + 1,) or num_seqs.shape != (1,):
        raise ValueError(f"kv_lens must be [S], cu_q_lens [S+1], num_seqs [1] with S={num_seqs_max}; got "
                         f"{kv_lens.shape}, {cu_q_lens.shape}, {num_seqs.shape}")


def validate_sinks(sinks, num_q_heads):
    if sinks is not None and tuple(sinks.shape) != (num_q_heads,):
        raise ValueError(f"sinks must be [Hq] = [{num_q_heads}], one logit per query head; got "
                         f"{sinks.shape}")


def apply_sinks(out, lse, sinks):
    """The kernels' sink step: attention without sinks `out` [..., Hq, D] with its keys-only lse [..., Hq]
    -> attention with sinks [..., Hq, D] in f32, = out * sigmoid(lse - sinks) since the normaliser gains
    e^sink: l / (l + e^sink) = sigmoid(lse - sink). Rows with no visible key (lse -inf) give 0."""
    lse = lse.astype(jnp.float32)
    scale = jnp.where(jnp.isneginf(lse), 0.0, jax.nn.sigmoid(lse - sinks.astype(jnp.float32)))
    return out.astype(jnp.float32) * scale[..., None]


def ref_ragged_paged_attention(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale=1.0,
                               sliding_window=None, soft_cap=None, return_lse=False, sinks=None,
                               kv_cache_dtype="auto"):
    """Oracle. q [T, Hq, D] -> out [T, Hq, D] (and lse [T, Hq] when `return_lse`); rows of no live
    sequence are zero (lse -inf). `sinks` f32[Hq]: per-head sink logits (module docstring). Quantized pages
    (`kv_cache_dtype`) are dequantized to f32 after the gather."""
    validate_inputs(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, kv_cache_dtype)
    validate_sinks(sinks, q.shape[1])
    num_tokens = q.shape[0]
    page_size = kv_pages.shape[1]
    seq, live = _seq_of_token(cu_q_lens, num_seqs, num_tokens)
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    kv_len = kv_lens[seq]
    q_pos = kv_len - q_len + (jnp.arange(num_tokens) - cu_q_lens[seq])
    kv_tok = kv_pages[page_indices[seq]]  # [T, P, ps, 2Hkv, D]
    kv_tok = kv_quant.dequantize(kv_tok.reshape(num_tokens, -1, *kv_pages.shape[2:]), kv_cache_dtype)
    k_pos = jnp.arange(kv_tok.shape[1])

    def one(qt, kvt, qp, kl, lv):
        k, v = _split_kv(kvt)
        o, l = _scores_to_output(qt[None], k, v, qp[None], k_pos, (k_pos < kl) & lv, sm_scale=sm_scale,
                                 sliding_window=sliding_window, soft_cap=soft_cap, sinks=sinks)
        return o[0], l[0]

    out, lse = jax.vmap(one)(q, kv_tok, q_pos, kv_len, live)
    out = jnp.where(live[:, None, None], out, 0).astype(q.dtype)
    del page_size
    return (out, lse) if return_lse else out


def ref_decode_paged_attention(q, kv_pages, kv_lens, page_indices, *, sm_scale=1.0, sliding_window=None,
                               soft_cap=None, return_lse=False, sinks=None, kv_cache_dtype="auto"):
    """One query per sequence (position kv_len - 1). q [S, Hq, D] -> out [S, Hq, D]; sequences with
    kv_len 0 give zeros. `sinks` f32[Hq] as in the oracle; quantized pages dequantized to q's dtype."""
    validate_sinks(sinks, q.shape[1])
    max_seqs, pages_per_seq = page_indices.shape
    kv = kv_pages[page_indices].reshape(max_seqs, pages_per_seq * kv_pages.shape[1], *kv_pages.shape[2:])
    kv = kv_quant.dequantize(kv, kv_cache_dtype, q.dtype)
    k_pos = jnp.arange(kv.shape[1])

    def one(qs, kvs, kl):
        k, v = _split_kv(kvs)
        o, l = _scores_to_output(qs[None], k, v, (kl - 1)[None], k_pos, k_pos < kl, sm_scale=sm_scale,
                                 sliding_window=sliding_window, soft_cap=soft_cap, sinks=sinks)
        return o[0], l[0]

    out, lse = jax.vmap(one)(q, kv, kv_lens)
    return (out, lse) if return_lse else out


decode_paged_attention_xla = jax.jit(
    ref_decode_paged_attention,
    static_argnames=("sm_scale", "sliding_window", "soft_cap", "return_lse", "kv_cache_dtype"))


def write_kv(kv_cache: jax.Array, layer: int, k: jax.Array, v: jax.Array, slot_pages: jax.Array,
             slot_offsets: jax.Array, kv_cache_dtype: str = "auto") -> jax.Array:
    """Scatter new tokens' K, V ([T, Hkv, D] each) into layer `layer` of the stacked cache
    `[L, P, page_size, 2*Hkv, D]` at (slot_pages[t], slot_offsets[t]), quantized to rows of D + 4 bytes
    when `kv_cache_dtype` says so (kv_quant.py). Under a jit that donates the cache, XLA updates it in
    place. Padding tokens must point at reserved page 0."""
    kv = jnp.stack([k, v], axis=2).reshape(k.shape[0], 2 * k.shape[1], k.shape[2])
    kv = kv_quant.encode_kv(kv, kv_cache_dtype, kv_cache.dtype)
    return kv_cache.at[layer, slot_pages, slot_offsets].set(kv, mode="promise_in_bounds")
