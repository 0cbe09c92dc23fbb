"""Pallas side of the attention dispatch point (`dispatch.paged_attention(..., impl="pallas")`).

Per platform:
  gpu  decode_only -> flash-decoding kernel (decode_attention.py), Triton lowering;
       otherwise   -> ragged kernel, GPU variant, Triton lowering.
  tpu  both        -> ragged kernel, Mosaic TPU variant (decode = one query per sequence); an 8-bit KV
                     cache takes the XLA path (the Mosaic variant does not read quantized pages yet).
  cpu  same kernels as gpu, in Pallas interpret mode (slow; for tests).

`decode_only` promises every live sequence has exactly one query and T == S; as in the reference path
(`reference.decode_paged_attention_xla`), the decode path then computes every row s from kv_lens[s] and
ignores cu_q_lens / num_seqs.
"""

from __future__ import annotations

import jax

from jaxserve.kernels import kv_quant
from jaxserve.kernels.decode_attention import decode_paged_attention
from jaxserve.kernels.ragged_paged_attention import ragged_paged_attention


def platform_backend(platform: str | None = None) -> tuple[str, bool]:
    """-> (kernel variant, interpret) for a platform name (default: jax's default backend)."""
    platform = platform or jax.default_backend()
    if platform == "tpu":
        return "tpu", False
    if platform in ("gpu", "cuda", "rocm"):
        return "gpu", False
    return "gpu", True


def paged_attention(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale, decode_only,
                    soft_cap=None, sliding_window=None, sinks=None, kv_cache_dtype="auto"):
    backend, interpret = platform_backend()
    if backend == "tpu" and kv_quant.is_quantized(kv_cache_dtype):
        # The Mosaic variant does not read 8-bit pages yet; the XLA path does (correct, not tuned for TPU).
        from jaxserve.kernels import dispatch
        return dispatch.paged_attention(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=sm_scale,
                                        decode_only=decode_only, impl="reference", soft_cap=soft_cap,
                                        sliding_window=sliding_window, sinks=sinks, kv_cache_dtype=kv_cache_dtype)
    if decode_only:
        return decode_paged_attention(q, kv_pages, kv_lens, page_indices, sm_scale=sm_scale,
                                      soft_cap=soft_cap, sliding_window=sliding_window, interpret=interpret,
                                      backend=backend, sinks=sinks, kv_cache_dtype=kv_cache_dtype)
    return ragged_paged_attention(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=sm_scale,
                                  soft_cap=soft_cap, sliding_window=sliding_window, interpret=interpret,
                                  backend=backend, sinks=sinks, kv_cache_dtype=kv_cache_dtype)
