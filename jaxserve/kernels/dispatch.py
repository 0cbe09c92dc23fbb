"""The single attention dispatch point: picks a paged-attention implementation per platform.

`impl`: "reference" (pure jnp under XLA: the CPU path), "pallas" (the compiled kernel for the
platform; interpret mode on CPU), or "auto" (pallas on GPU/TPU, reference on CPU).
"""

from __future__ import annotations

import jax

from jaxserve.kernels import xla_attention, xla_decode_attention


def resolve_impl(impl: str, platform: str | None = None) -> str:
    platform = platform or jax.default_backend()
    if impl == "auto":
        return "pallas" if platform in ("gpu", "cuda", "rocm", "tpu") else "reference"
    if impl not in ("reference", "pallas"):
        raise ValueError(f"attention impl must be 'auto', 'reference' or 'pallas', got {impl!r}")
    return impl


def paged_attention(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale: float,
                    decode_only: bool, impl: str = "reference", layer: int | None = None, soft_cap=None,
                    sliding_window=None, sinks=None, kv_cache_dtype: str = "auto"):
    """q [T, Hq, D] packed queries; kv_pages one layer `[P, page_size, 2*Hkv, D]`, or with `layer` (static)
    the whole stacked cache `[L, P, page_size, 2*Hkv, D]` (the CPU decode path then gathers that layer's pages
    from it inside its key-block loop: a layer sliced first is copied into the loop on every step); `sinks` f32[Hq]
    optional per-head attention-sink logits (gpt-oss; see reference.py); `kv_cache_dtype` says how the
    pages are stored (quantized rows are dequantized inside attention, kernels/kv_quant.py).

    `decode_only` (static) promises every live sequence has exactly one query and T == S; the decode
    path is then used."""
    if layer is not None and impl == "pallas":
        kv_pages, layer = kv_pages[layer], None
    if impl == "pallas":
        from jaxserve.kernels import pallas_dispatch  # imported lazily: Pallas pulls in backend code
        return pallas_dispatch.paged_attention(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                                               sm_scale=sm_scale, decode_only=decode_only,
                                               soft_cap=soft_cap, sliding_window=sliding_window, sinks=sinks,
                                               kv_cache_dtype=kv_cache_dtype)
    if decode_only:
        return xla_decode_attention.decode_paged_attention_blocked(q, kv_pages, kv_lens, page_indices, sm_scale=sm_scale,
                                                            soft_cap=soft_cap, sliding_window=sliding_window,
                                                            sinks=sinks, kv_cache_dtype=kv_cache_dtype, layer=layer)
    return xla_attention.ragged_paged_attention_xla(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                                                sm_scale=sm_scale, soft_cap=soft_cap,
                                                sliding_window=sliding_window, sinks=sinks,
                                                kv_cache_dtype=kv_cache_dtype, layer=layer)
