"""Building blocks shared by every decoder family: RMSNorm (three rounding styles), embeddings, linear
layers, the gated MLP and dense causal attention (the cache-free path for training and tests)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxserve.kernels import reference

f32_accumulating_dot = functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32)


class RMSNorm(nn.Module):
    """`style` says where each family rounds, so bf16 models match transformers:
    llama: normalise in f32, cast, then times scale; gemma: f32 times (1 + scale), then cast (scale starts
    at 0); f32: f32 times scale, then cast (gpt-oss)."""

    eps: float
    dtype: jnp.dtype
    style: str = "llama"

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.style == "gemma" else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), self.dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.style == "gemma":
            return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
        if self.style == "f32":
            return (normed * scale.astype(jnp.float32)).astype(x.dtype)
        return scale * normed.astype(x.dtype)


class Embedding(nn.Module):
    """Token embedding; `attend` reuses it as a tied lm_head."""

    vocab_size: int
    hidden_size: int
    dtype: jnp.dtype
    init_std: float = 0.02
    param_dtype: jnp.dtype | None = None  # the table's dtype; None: dtype

    def setup(self):
        self.embedding = self.param("embedding", nn.initializers.normal(self.init_std),
                                    (self.vocab_size, self.hidden_size), self.param_dtype or self.dtype)

    def __call__(self, token_ids):
        return jnp.take(self.embedding, token_ids, axis=0).astype(self.dtype)

    def attend(self, x):
        return jnp.einsum("...h,vh->...v", x.astype(self.embedding.dtype), self.embedding,
                          preferred_element_type=jnp.float32)


class Linear(nn.Module):
    """x @ kernel (+ bias), params "kernel" [in, out] and "bias" [out] in `param_dtype`, result in `dtype`.
    When the two differ (bf16 weights under f32 activations) the inputs are rounded to the weights' dtype and
    the dot accumulates in f32: XLA:CPU's fastest dot. Written out rather than `nn.Dense` so the dot is fed
    the bf16 weights directly instead of relying on XLA to fold flax's f32 promotion of them."""

    features: int
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    use_bias: bool = False
    init_std: float = 0.02
    f32_accumulation: bool = False  # accumulate (and return) in f32 even with one dtype (lm_head)

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(self.init_std), (x.shape[-1], self.features),
                            self.param_dtype)
        dims = (((x.ndim - 1,), (0,)), ((), ()))
        if jnp.dtype(self.param_dtype) != jnp.dtype(self.dtype) or self.f32_accumulation:
            y = jax.lax.dot_general(x.astype(self.param_dtype), kernel, dims, preferred_element_type=jnp.float32)
            y = y if self.f32_accumulation else y.astype(self.dtype)
        else:
            y = jax.lax.dot_general(x.astype(self.dtype), kernel, dims)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(y.dtype)
        return y


def dense(features: int, name: str, dtype, use_bias: bool = False, init_std: float = 0.02, param_dtype=None,
          f32_accumulation: bool = False) -> Linear:
    """A linear layer computing in `dtype` with weights in `param_dtype` (default: `dtype`)."""
    return Linear(features, jnp.dtype(dtype), jnp.dtype(param_dtype or dtype), use_bias, init_std, f32_accumulation,
                  name=name)


def activation(name: str):
    """The MLP's gate activation: silu (SwiGLU) or tanh-approximated gelu (GeGLU, Gemma)."""
    return jax.nn.silu if name == "silu" else functools.partial(jax.nn.gelu, approximate=True)


class MLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x))."""

    hidden_size: int
    intermediate_size: int
    dtype: jnp.dtype
    hidden_act: str = "silu"
    param_dtype: jnp.dtype | None = None

    def setup(self):
        self.gate_proj = dense(self.intermediate_size, "gate_proj", self.dtype, param_dtype=self.param_dtype)
        self.up_proj = dense(self.intermediate_size, "up_proj", self.dtype, param_dtype=self.param_dtype)
        self.down_proj = dense(self.hidden_size, "down_proj", self.dtype, param_dtype=self.param_dtype)

    def __call__(self, x):
        return self.down_proj(activation(self.hidden_act)(self.gate_proj(x)) * self.up_proj(x))


def causal_attention(q, k, v, *, sm_scale: float, sliding_window=None, soft_cap=None, sinks=None):
    """Dense grouped-query causal attention. q [B, L, Hq, D], k/v [B, L, Hkv, D], sinks f32[Hq] or None
    -> [B, L, Hq, D]."""
    batch, length, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    grouped = q.reshape(batch, length, num_kv_heads, group, head_dim)
    scores = jnp.einsum("blhgd,bmhd->bhglm", grouped, k, preferred_element_type=jnp.float32) * sm_scale
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    pos = jnp.arange(length)
    visible = pos[None, :] <= pos[:, None]
    if sliding_window is not None:
        visible &= pos[None, :] > pos[:, None] - sliding_window
    scores = jnp.where(visible, scores, reference.MASK_VALUE)
    if sinks is not None:  # one extra logit per head joins the softmax and is then dropped
        sink = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(num_kv_heads, group, 1, 1),
                                (batch, num_kv_heads, group, length, 1))
        probs = jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1]
    else:
        probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhglm,bmhd->blhgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(batch, length, num_heads, head_dim).astype(q.dtype)
