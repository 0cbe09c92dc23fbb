"""Llama-family decoder (Llama, Mistral, Qwen2) in Flax linen: one set of layers, two attention paths.

The paged path (`Llama.__call__`) reads and writes the engine's KV cache through the kernels layer; the dense
path (`Llama.dense`, `forward_dense`) is plain causal attention for training and tests. Both run the same
`DecoderLayer` code on the same params.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxserve.config import ModelConfig
from jaxserve.kernels import dispatch, reference
from jaxserve.model.batch import AttentionBatch

_f32_accumulating_dot = functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32)


# --------------------------------------------------------------------------------------------------------- rope
@functools.lru_cache(maxsize=32)
def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies f32[head_dim // 2], computed in float32 the way transformers does so the two
    implementations round alike (including `_compute_llama3_parameters` when rope_scaling is set)."""
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
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


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """positions i32[...] -> cos, sin f32[..., head_dim] (each frequency repeated over both halves)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [..., heads, head_dim] with cos/sin [..., head_dim]; HF's rotate_half pairing (i with i + D/2)."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[..., None, :] + rotated * sin[..., None, :]).astype(x.dtype)


# ------------------------------------------------------------------------------------------------------ modules
class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # Cast before scaling, as transformers does, so bf16 models round at the same point.
        return scale * normed.astype(x.dtype)


class Embedding(nn.Module):
    """Token embedding; `attend` reuses it as a tied lm_head."""

    vocab_size: int
    hidden_size: int
    dtype: jnp.dtype
    init_std: float = 0.02

    def setup(self):
        self.embedding = self.param("embedding", nn.initializers.normal(self.init_std),
                                    (self.vocab_size, self.hidden_size), self.dtype)

    def __call__(self, token_ids):
        return jnp.take(self.embedding, token_ids, axis=0)

    def attend(self, x):
        return jnp.einsum("...h,vh->...v", x, self.embedding, preferred_element_type=jnp.float32)


def _dense(features: int, name: str, dtype, use_bias: bool = False, init_std: float = 0.02, **kw) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=dtype, name=name,
                    kernel_init=nn.initializers.normal(init_std), **kw)


class MLP(nn.Module):
    config: ModelConfig

    def setup(self):
        cfg, dtype = self.config, jnp.dtype(self.config.dtype)
        self.gate_proj = _dense(cfg.intermediate_size, "gate_proj", dtype)
        self.up_proj = _dense(cfg.intermediate_size, "up_proj", dtype)
        self.down_proj = _dense(cfg.hidden_size, "down_proj", dtype)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


def causal_attention(q, k, v, *, sm_scale: float):
    """Dense grouped-query causal attention. q [B, L, Hq, D], k/v [B, L, Hkv, D] -> [B, L, Hq, D]."""
    batch, length, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    grouped = q.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = jnp.einsum("blhgd,bmhd->bhglm", grouped, k, preferred_element_type=jnp.float32) * sm_scale
    causal = jnp.tril(jnp.ones((length, length), bool))
    scores = jnp.where(causal, scores, reference.MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhglm,bmhd->blhgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(batch, length, num_heads, head_dim).astype(q.dtype)


class Attention(nn.Module):
    config: ModelConfig
    attention_impl: str = "reference"
    # Optional replacement of the paged attention (e.g. context-parallel prefill):
    # `hook(q, k, v, kv_cache, batch, layer, sm_scale) -> (out [..., Hq, D], kv_cache)`, q/k/v after RoPE.
    attention_hook: Any = None

    def setup(self):
        cfg, dtype = self.config, jnp.dtype(self.config.dtype)
        self.q_proj = _dense(cfg.num_heads * cfg.head_dim, "q_proj", dtype, use_bias=cfg.qkv_bias)
        self.k_proj = _dense(cfg.num_kv_heads * cfg.head_dim, "k_proj", dtype, use_bias=cfg.qkv_bias)
        self.v_proj = _dense(cfg.num_kv_heads * cfg.head_dim, "v_proj", dtype, use_bias=cfg.qkv_bias)
        self.o_proj = _dense(cfg.hidden_size, "o_proj", dtype)

    def __call__(self, x, positions, kv_cache=None, batch: AttentionBatch | None = None, layer: int = 0,
                 decode_only: bool = False):
        """x [..., hidden] with positions [...]. Without a cache: dense causal over x [B, L, hidden]. With one:
        packed tokens x [T, hidden], K/V written into layer `layer` of the stacked cache, paged attention."""
        cfg = self.config
        lead = x.shape[:-1]
        q = self.q_proj(x).reshape(*lead, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(*lead, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(*lead, cfg.num_kv_heads, cfg.head_dim)
        cos, sin = rope_cos_sin(positions, rope_inv_freq(cfg))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        sm_scale = cfg.head_dim ** -0.5
        if kv_cache is None:
            out = causal_attention(q, k, v, sm_scale=sm_scale)
        elif self.attention_hook is not None:
            out, kv_cache = self.attention_hook(q, k, v, kv_cache, batch, layer, sm_scale)
        else:
            kv_cache = reference.write_kv(kv_cache, layer, k, v, batch.slot_pages, batch.slot_offsets)
            out = dispatch.paged_attention(q, kv_cache[layer], batch.kv_lens, batch.page_indices, batch.cu_q_lens,
                                           batch.num_seqs, sm_scale=sm_scale, decode_only=decode_only,
                                           impl=self.attention_impl)
        return self.o_proj(out.reshape(*lead, cfg.num_heads * cfg.head_dim)), kv_cache


class DecoderLayer(nn.Module):
    config: ModelConfig
    attention_impl: str = "reference"
    attention_hook: Any = None

    def setup(self):
        cfg, dtype = self.config, jnp.dtype(self.config.dtype)
        self.input_layernorm = RMSNorm(cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, self.attention_impl, self.attention_hook)
        self.post_attention_layernorm = RMSNorm(cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg)

    def __call__(self, x, positions, kv_cache=None, batch=None, layer=0, decode_only=False):
        attn_out, kv_cache = self.self_attn(self.input_layernorm(x), positions, kv_cache, batch, layer, decode_only)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv_cache


class Llama(nn.Module):
    """The decoder. `__call__` is the engine's paged step, `dense` the cache-free causal forward."""

    config: ModelConfig
    attention_impl: str = "reference"
    attention_hook: Any = None  # see Attention.attention_hook

    def setup(self):
        cfg, dtype = self.config, jnp.dtype(self.config.dtype)
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype)
        self.layers = [DecoderLayer(cfg, self.attention_impl, self.attention_hook) for _ in range(cfg.num_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = _dense(cfg.vocab_size, "lm_head", dtype, dot_general=_f32_accumulating_dot)

    def _logits(self, hidden):
        hidden = self.norm(hidden)
        if self.config.tie_word_embeddings:
            return self.embed_tokens.attend(hidden)
        return self.lm_head(hidden).astype(jnp.float32)

    def __call__(self, token_ids, positions, kv_cache, batch: AttentionBatch, decode_only: bool, logits_indices):
        """token_ids, positions i32[T]; kv_cache [L, P, page_size, 2*Hkv, D]; logits_indices i32[N].
        Returns (logits f32[N, vocab], new kv_cache)."""
        x = self.embed_tokens(token_ids)
        for layer_index, layer in enumerate(self.layers):
            x, kv_cache = layer(x, positions, kv_cache, batch, layer_index, decode_only)
        # Norm and lm_head are per token, so only the tokens whose logits are wanted pay for them.
        return self._logits(x[logits_indices]), kv_cache

    def dense(self, token_ids, positions=None):
        """token_ids i32[B, L] -> logits f32[B, L, vocab], plain causal attention, no cache."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(token_ids.shape[-1], dtype=jnp.int32), token_ids.shape)
        x = self.embed_tokens(token_ids)
        for layer in self.layers:
            x, _ = layer(x, positions)
        return self._logits(x)


# ---------------------------------------------------------------------------------------------- entry points
@functools.partial(jax.jit, static_argnames=("config",))
def forward_dense(params, config: ModelConfig, token_ids: jax.Array) -> jax.Array:
    """Cache-free causal forward: token_ids i32[B, L] -> logits f32[B, L, vocab]."""
    return Llama(config).apply({"params": params}, token_ids, method=Llama.dense)


def make_paged_forward(config: ModelConfig, *, attention_impl: str = "reference", decode_only: bool = False,
                       donate_cache: bool = True):
    """A jitted step `(params, token_ids, positions, kv_cache, batch, logits_indices) -> (logits, kv_cache)`,
    the cache donated so XLA updates it in place."""
    model = Llama(config, attention_impl=attention_impl)

    def step(params, token_ids, positions, kv_cache, batch, logits_indices):
        return model.apply({"params": params}, token_ids, positions, kv_cache, batch, decode_only, logits_indices)

    return jax.jit(step, donate_argnums=(3,) if donate_cache else ())


def kv_cache_shape(config: ModelConfig, num_pages: int, page_size: int) -> tuple[int, ...]:
    """Stacked cache `[num_layers, num_pages, page_size, 2 * num_kv_heads, head_dim]` (DESIGN.md §3)."""
    return (config.num_layers, num_pages, page_size, 2 * config.num_kv_heads, config.head_dim)


def init_params(config: ModelConfig, rng: jax.Array, out_shardings=None):
    """Random weights (normal std 0.02, unit norms, zero biases), for random-weight benchmark models.
    `out_shardings` (a pytree of Shardings matching the params) creates them directly on a mesh."""
    model = Llama(config)
    tokens = jnp.zeros((1, 1), jnp.int32)
    init = jax.jit(lambda key: model.init(key, tokens, method=Llama.dense)["params"], out_shardings=out_shardings)
    return init(rng)


def abstract_params(config: ModelConfig):
    """The param tree as `jax.ShapeDtypeStruct`s, without allocating anything."""
    return jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))


# Tensor parallelism over kv heads: each device holds whole heads (q/k/v columns, o_proj rows) and a slice of
# the MLP; the only collectives are the sums after o_proj and down_proj.
_TP_RULES = (
    (r"self_attn/(q_proj|k_proj|v_proj)/kernel$", lambda tp: P(None, tp)),
    (r"self_attn/(q_proj|k_proj|v_proj)/bias$", lambda tp: P(tp)),
    (r"self_attn/o_proj/kernel$", lambda tp: P(tp, None)),
    (r"mlp/(gate_proj|up_proj)/kernel$", lambda tp: P(None, tp)),
    (r"mlp/down_proj/kernel$", lambda tp: P(tp, None)),
)


def param_partition_specs(config: ModelConfig, tp_axis: str = "tp"):
    """PartitionSpecs matching the param tree; embeddings, norms and lm_head are replicated.
    Requires num_kv_heads and intermediate_size divisible by the tp degree."""

    def spec(path, _leaf):
        name = "/".join(str(getattr(key, "key", key)) for key in path)
        for pattern, rule in _TP_RULES:
            if re.search(pattern, name):
                return rule(tp_axis)
        return P()

    return jax.tree_util.tree_map_with_path(spec, abstract_params(config))


def kv_cache_partition_spec(tp_axis: str = "tp") -> P:
    """Stacked cache sharded on axis 3 (2*Hkv, K/V interleaved) so each device keeps its own heads' K and V."""
    return P(None, None, None, tp_axis, None)
