"""Rotary position embeddings: inverse frequencies per scaling rule (plain, linear, llama3, yarn), cos/sin
and the rotation, computed in float32 the way transformers does so both implementations round alike."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig, RopeScaling


def _plain_inv_freq(theta: float, dim: int) -> np.ndarray:
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)


def _llama3(inv_freq: np.ndarray, scaling: RopeScaling) -> np.ndarray:
    factor = np.float32(scaling.factor)
    low_freq_factor, high_freq_factor = scaling.low_freq_factor, scaling.high_freq_factor
    old_context_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = (np.float32(2 * math.pi) / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = ((np.float32(old_context_len) / wavelen - np.float32(low_freq_factor))
              / np.float32(high_freq_factor - low_freq_factor)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def _yarn(theta: float, dim: int, scaling: RopeScaling) -> np.ndarray:
    """YaRN (arXiv 2309.00071): interpolate low frequencies by `factor`, keep high ones, ramp between."""
    pos_freqs = (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))).astype(np.float32)
    extrapolation = (np.float32(1.0) / pos_freqs).astype(np.float32)
    interpolation = (np.float32(1.0) / (np.float32(scaling.factor) * pos_freqs)).astype(np.float32)
    original = scaling.original_max_position_embeddings

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation_weight = (1 - ramp).astype(np.float32)
    return (interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight).astype(np.float32)


@functools.lru_cache(maxsize=64)
def rope_tables(config: ModelConfig, sliding: bool = False) -> tuple[np.ndarray, float]:
    """(inverse frequencies f32[head_dim // 2], cos/sin multiplier) of full layers, or of sliding layers
    when `sliding` (Gemma 3 gives those their own unscaled base, `local_rope_theta`)."""
    dim = config.head_dim
    if sliding and config.local_rope_theta is not None:
        return _plain_inv_freq(config.local_rope_theta, dim), 1.0
    scaling = config.rope_scaling
    if scaling is None:
        return _plain_inv_freq(config.rope_theta, dim), 1.0
    if scaling.rope_type == "linear":
        return (_plain_inv_freq(config.rope_theta, dim) / np.float32(scaling.factor)).astype(np.float32), 1.0
    if scaling.rope_type == "llama3":
        return _llama3(_plain_inv_freq(config.rope_theta, dim), scaling), 1.0
    attention_factor = scaling.attention_factor
    if attention_factor is None:
        attention_factor = 0.1 * math.log(scaling.factor) + 1.0 if scaling.factor > 1 else 1.0
    return _yarn(config.rope_theta, dim, scaling), float(attention_factor)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies of full-attention layers (kept for callers that need only those)."""
    return rope_tables(config)[0]


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray, multiplier: float = 1.0
                 ) -> tuple[jax.Array, jax.Array]:
    """positions i32[...] -> cos, sin f32[..., head_dim] (each frequency repeated over both halves)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    cos, sin = jnp.cos(freqs), jnp.sin(freqs)
    if multiplier != 1.0:
        cos, sin = cos * multiplier, sin * multiplier
    # Materialised: XLA fuses elementwise producers into each consumer, so left alone every rotation (q and k of
    # every layer) evaluated cos and sin again for each element of each head (XLA:CPU: 0.31 ms of a 512-token
    # layer's query rotation, against ~0.05 reading the tables).
    return jax.lax.optimization_barrier((jnp.concatenate([cos, cos], axis=-1), jnp.concatenate([sin, sin], axis=-1)))


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [..., heads, head_dim] with cos/sin [..., head_dim]; HF's rotate_half pairing (i with i + D/2)."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[..., None, :] + rotated * sin[..., None, :]).astype(x.dtype)
