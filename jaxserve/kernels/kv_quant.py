"""Quantized KV cache rows: 8-bit K/V values with their scale inside the same row, so a page carries its own
scales wherever it goes (host tier, PD transfer, send-back, peer fetch) without any of those paths knowing.

A row is one token's K (or V) of one KV head: `head_dim` values quantized to 8 bits, then the row's f32 scale
as 4 little-endian bytes, all stored as uint8 `[..., head_dim + 4]`. The scale is per (token, KV head, K or V):
amax(|row|) / the format's largest value, so a token written alone into a half-filled page never changes the
scales of the tokens already there (a per-page scale would need either a fixed guess at the first write or
a re-quantization of the page on every write). uint8 because XLA:CPU scatters it in place, while a float8
scatter converts the whole cache through f32 (measured: docs/notes-issue-19.md).

`kv_cache_dtype`: "auto" (the model's dtype; rows are plain [..., head_dim]), "fp8_e4m3", "fp8_e5m2", "int8".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KV_CACHE_DTYPES = ("auto", "fp8_e4m3", "fp8_e5m2", "int8")
SCALE_BYTES = 4
# Storage of an unquantized bf16 cache where bf16 scatters are slow (XLA:CPU converts the whole cache through
# f32 for each write, as for float8): the same bits in uint16, which scatters in place; readers bitcast them back.
BF16_BITS = jnp.dtype(jnp.uint16)

_FORMATS = {  # name -> (jnp value dtype, largest representable magnitude used for the scale)
    "fp8_e4m3": (jnp.float8_e4m3fn, 448.0),
    "fp8_e5m2": (jnp.float8_e5m2, 57344.0),
    "int8": (jnp.int8, 127.0),
}


def check_kv_cache_dtype(name: str) -> str:
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {name!r}")
    return name


def is_quantized(kv_cache_dtype: str | None) -> bool:
    return check_kv_cache_dtype(kv_cache_dtype or "auto") != "auto"


def row_width(head_dim: int, kv_cache_dtype: str | None) -> int:
    """Last-axis length of a stored row: head_dim, plus the scale's bytes when quantized."""
    return head_dim + SCALE_BYTES if is_quantized(kv_cache_dtype) else head_dim


def head_dim_of(width: int, kv_cache_dtype: str | None) -> int:
    return width - SCALE_BYTES if is_quantized(kv_cache_dtype) else width


def quantize(x: jax.Array, kv_cache_dtype: str) -> jax.Array:
    """x [..., D] (any float dtype) -> uint8 [..., D + 4]: the 8-bit values, then the row's f32 scale."""
    value_dtype, qmax = _FORMATS[kv_cache_dtype]
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    # An all-zero row (padding, zero-init) gets scale 1 so dequantization never divides by or multiplies 0/0.
    scale = jnp.where(amax > 0, amax / qmax, 1.0)
    y = x / scale
    if kv_cache_dtype == "int8":
        values = jnp.clip(jnp.round(y), -qmax, qmax).astype(jnp.int8)
    else:  # |y| <= qmax by construction; the clip only guards the rounding of amax / scale
        values = jnp.clip(y, -qmax, qmax).astype(value_dtype)
    value_bytes = jax.lax.bitcast_convert_type(values, jnp.uint8)
    scale_bytes = jax.lax.bitcast_convert_type(scale.astype(jnp.float32), jnp.uint8)  # [..., 1, 4]
    return jnp.concatenate([value_bytes, scale_bytes.reshape(*scale.shape[:-1], SCALE_BYTES)], axis=-1)


def scale_from_bytes(b0, b1, b2, b3) -> jax.Array:
    """The four bytes of a little-endian f32 (uint8 [..., 1] each) -> f32 [..., 1], with shifts and one
    same-width bitcast: no slicing or shape-changing bitcast, so it also lowers inside Pallas kernels (Triton)."""
    word = (b0.astype(jnp.uint32) | (b1.astype(jnp.uint32) << 8) | (b2.astype(jnp.uint32) << 16)
            | (b3.astype(jnp.uint32) << 24))
    return jax.lax.bitcast_convert_type(word, jnp.float32)


def row_scale(rows: jax.Array) -> jax.Array:
    """The f32 scale [..., 1] of packed rows uint8 [..., D + 4]."""
    d = rows.shape[-1] - SCALE_BYTES
    return scale_from_bytes(*(rows[..., d + i:d + i + 1] for i in range(SCALE_BYTES)))


def dequantize_values(value_bytes: jax.Array, scale: jax.Array, kv_cache_dtype: str, dtype=jnp.float32):
    """uint8 [..., D] values of a row and its f32 scale [..., 1] -> values [..., D] in `dtype`."""
    value_dtype, _ = _FORMATS[kv_cache_dtype]
    values = jax.lax.bitcast_convert_type(value_bytes, value_dtype).astype(jnp.float32)
    return (values * scale).astype(dtype)


def dequantize(rows: jax.Array, kv_cache_dtype: str | None, dtype=jnp.float32) -> jax.Array:
    """Packed rows -> values [..., D] in `dtype`; unquantized rows ("auto") are returned as they are, except bf16
    bits (`BF16_BITS` storage), which are bitcast to bf16 and cast to `dtype`."""
    if not is_quantized(kv_cache_dtype):
        return jax.lax.bitcast_convert_type(rows, jnp.bfloat16).astype(dtype) if rows.dtype == BF16_BITS else rows
    return dequantize_values(rows[..., :-SCALE_BYTES], row_scale(rows), kv_cache_dtype, dtype)


def encode_kv(kv: jax.Array, kv_cache_dtype: str | None, storage: jnp.dtype) -> jax.Array:
    """K/V rows [..., D] as the cache stores them: quantized rows, or a cast to the storage dtype."""
    if is_quantized(kv_cache_dtype):
        return quantize(kv, kv_cache_dtype)
    if jnp.dtype(storage) == BF16_BITS:
        return jax.lax.bitcast_convert_type(kv.astype(jnp.bfloat16), BF16_BITS)
    return kv.astype(storage)
