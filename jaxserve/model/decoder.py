"""The decoder every supported family runs (Llama, Mistral, Qwen2/3, Qwen3-MoE, Mixtral, Gemma 2/3, gpt-oss),
in Flax linen: one set of layers, two attention paths; each family's features are ModelConfig switches.

The paged path (`Decoder.__call__`) reads and writes the engine's KV cache through the kernels layer; the
dense path (`Decoder.dense`, `forward_dense`) is plain causal attention for training and tests. Both run the
same `DecoderLayer` code on the same params.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxserve.config import ModelConfig, kv_row_width
from jaxserve.kernels import dispatch, reference
from jaxserve.model.batch import AttentionBatch
from jaxserve.model.layers import MLP, Embedding, RMSNorm, causal_attention, dense
from jaxserve.model.moe import MoEBlock, expert_partition_specs
from jaxserve.model.rope import apply_rope, rope_cos_sin, rope_tables


class Attention(nn.Module):
    config: ModelConfig
    layer: int = 0
    attention_impl: str = "reference"
    # Optional replacement of the paged attention (e.g. context-parallel prefill):
    # `hook(q, k, v, kv_cache, batch, layer, sm_scale) -> (out [..., Hq, D], kv_cache)`, q/k/v after RoPE.
    attention_hook: Any = None

    def setup(self):
        cfg, dtype = self.config, jnp.dtype(self.config.dtype)
        linear = functools.partial(dense, dtype=dtype, param_dtype=cfg.matmul_dtype)
        self.q_proj = linear(cfg.num_heads * cfg.head_dim, "q_proj", use_bias=cfg.qkv_bias)
        self.k_proj = linear(cfg.num_kv_heads * cfg.head_dim, "k_proj", use_bias=cfg.qkv_bias)
        self.v_proj = linear(cfg.num_kv_heads * cfg.head_dim, "v_proj", use_bias=cfg.qkv_bias)
        self.o_proj = linear(cfg.hidden_size, "o_proj", use_bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.rms_norm_eps, dtype, cfg.norm_style)
            self.k_norm = RMSNorm(cfg.rms_norm_eps, dtype, cfg.norm_style)
        if cfg.attention_sinks:
            self.sinks = self.param("sinks", nn.initializers.zeros, (cfg.num_heads,), dtype)

    def attention_dot_dtype(self):
        """The dtype paged attention's dots read. A bf16 checkpoint served under f32 arithmetic (the CPU default,
        `serving_dtypes`) feeds them bf16 as it does every matmul: the XLA paths then cast each gathered key block
        and accumulate in f32, as transformers and GPU kernels do for a bf16 model (one layer, 512-token chunk
        1.6-1.7 -> 1.1-1.4 ms; decode 32 x 600 3.9 -> 3.1-3.4; docs/notes-issue-14.md, session 11)."""
        cfg = self.config
        if cfg.matmul_dtype == "bfloat16" and cfg.dtype == "float32" and self.attention_impl != "pallas":
            return jnp.bfloat16
        return jnp.dtype(cfg.dtype)

    def __call__(self, x, positions, kv_cache=None, batch: AttentionBatch | None = None, decode_only: bool = False):
        """x [..., hidden] with positions [...]. Without a cache: dense causal over x [B, L, hidden]. With one:
        packed tokens x [T, hidden], K/V written into layer `self.layer` of the stacked cache, paged attention."""
        cfg, layer = self.config, self.layer
        lead = x.shape[:-1]
        q = self.q_proj(x).reshape(*lead, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(*lead, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(*lead, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq, multiplier = rope_tables(cfg, cfg.is_sliding(layer))
        cos, sin = rope_cos_sin(positions, inv_freq, multiplier)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        window, soft_cap = cfg.layer_window(layer), cfg.attn_logit_softcap
        sinks = self.sinks.astype(jnp.float32) if cfg.attention_sinks else None
        if kv_cache is None:
            out = causal_attention(q, k, v, sm_scale=cfg.sm_scale, sliding_window=window, soft_cap=soft_cap,
                                   sinks=sinks)
        elif self.attention_hook is not None:
            out, kv_cache = self.attention_hook(q, k, v, kv_cache, batch, layer, cfg.sm_scale)
        else:
            kv_cache = reference.write_kv(kv_cache, layer, k, v, batch.slot_pages, batch.slot_offsets,
                                          cfg.kv_cache_dtype)
            out = dispatch.paged_attention(q.astype(self.attention_dot_dtype()), kv_cache, batch.kv_lens,
                                           batch.page_indices, batch.cu_q_lens, batch.num_seqs, sm_scale=cfg.sm_scale,
                                           decode_only=decode_only, impl=self.attention_impl, layer=layer,
                                           soft_cap=soft_cap, sliding_window=window, sinks=sinks,
                                           kv_cache_dtype=cfg.kv_cache_dtype).astype(q.dtype)
        return self.o_proj(out.reshape(*lead, cfg.num_heads * cfg.head_dim)), kv_cache


class DecoderLayer(nn.Module):
    config: ModelConfig
    layer: int = 0
    attention_impl: str = "reference"
    attention_hook: Any = None
    mesh: Any = None
    moe_impl: str = "grouped"

    def setup(self):
        cfg, dtype = self.config, jnp.dtype(self.config.dtype)

        def norm():
            return RMSNorm(cfg.rms_norm_eps, dtype, cfg.norm_style)

        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, self.layer, self.attention_impl, self.attention_hook)
        self.post_attention_layernorm = norm()
        if cfg.sandwich_norms:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        if cfg.is_moe_layer(self.layer):
            self.moe = MoEBlock(cfg, self.mesh, self.moe_impl)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, dtype, cfg.hidden_act, cfg.matmul_dtype)

    def __call__(self, x, positions, kv_cache=None, batch=None, decode_only=False):
        cfg = self.config
        attn_out, kv_cache = self.self_attn(self.input_layernorm(x), positions, kv_cache, batch, decode_only)
        ffn = self.moe if cfg.is_moe_layer(self.layer) else self.mlp
        if cfg.sandwich_norms:  # Gemma: post_attention_layernorm normalises the attention output
            x = x + self.post_attention_layernorm(attn_out)
            return x + self.post_feedforward_layernorm(ffn(self.pre_feedforward_layernorm(x))), kv_cache
        x = x + attn_out
        return x + ffn(self.post_attention_layernorm(x)), kv_cache


class Decoder(nn.Module):
    """The decoder. `__call__` is the engine's paged step, `dense` the cache-free causal forward."""

    config: ModelConfig
    attention_impl: str = "reference"
    attention_hook: Any = None  # see Attention.attention_hook
    mesh: Any = None            # the instance mesh; MoE layers shard their experts over its `ep` axis
    moe_impl: str = "grouped"   # "dense": the per-expert loop baseline (benchmarks)

    def setup(self):
        cfg, dtype = self.config, jnp.dtype(self.config.dtype)
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype, param_dtype=cfg.matmul_dtype)
        self.layers = [DecoderLayer(cfg, i, self.attention_impl, self.attention_hook, self.mesh, self.moe_impl)
                       for i in range(cfg.num_layers)]
        self.norm = RMSNorm(cfg.rms_norm_eps, dtype, cfg.norm_style)
        if not cfg.tie_word_embeddings:
            self.lm_head = dense(cfg.vocab_size, "lm_head", dtype, param_dtype=cfg.matmul_dtype, f32_accumulation=True)

    def _embed(self, token_ids):
        x = self.embed_tokens(token_ids)
        if self.config.embed_scale:  # Gemma rounds sqrt(hidden) to the weights' dtype first
            x = x * jnp.asarray(self.config.hidden_size ** 0.5, x.dtype)
        return x

    def _logits(self, hidden):
        hidden = self.norm(hidden)
        if self.config.tie_word_embeddings:
            logits = self.embed_tokens.attend(hidden)
        else:
            logits = self.lm_head(hidden).astype(jnp.float32)
        cap = self.config.final_logit_softcap
        return logits if cap is None else cap * jnp.tanh(logits / cap)

    def __call__(self, token_ids, positions, kv_cache, batch: AttentionBatch, decode_only: bool, logits_indices):
        """token_ids, positions i32[T]; kv_cache [L, P, page_size, 2*Hkv, D]; logits_indices i32[N].
        Returns (logits f32[N, vocab], new kv_cache)."""
        x = self._embed(token_ids)
        for layer in self.layers:
            x, kv_cache = layer(x, positions, kv_cache, batch, decode_only)
        # Norm and lm_head are per token, so only the tokens whose logits are wanted pay for them.
        return self._logits(x[logits_indices]), kv_cache

    def dense(self, token_ids, positions=None):
        """token_ids i32[B, L] -> logits f32[B, L, vocab], plain causal attention, no cache."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(token_ids.shape[-1], dtype=jnp.int32), token_ids.shape)
        x = self._embed(token_ids)
        for layer in self.layers:
            x, _ = layer(x, positions)
        return self._logits(x)


# ---------------------------------------------------------------------------------------------- entry points
@functools.partial(jax.jit, static_argnames=("config",))
def forward_dense(params, config: ModelConfig, token_ids: jax.Array) -> jax.Array:
    """Cache-free causal forward: token_ids i32[B, L] -> logits f32[B, L, vocab]."""
    return Decoder(config).apply({"params": params}, token_ids, method=Decoder.dense)


def make_paged_forward(config: ModelConfig, *, attention_impl: str = "reference", decode_only: bool = False,
                       donate_cache: bool = True, mesh=None, moe_impl: str = "grouped"):
    """A jitted step `(params, token_ids, positions, kv_cache, batch, logits_indices) -> (logits, kv_cache)`,
    the cache donated so XLA updates it in place."""
    model = Decoder(config, attention_impl=attention_impl, mesh=mesh, moe_impl=moe_impl)

    def step(params, token_ids, positions, kv_cache, batch, logits_indices):
        return model.apply({"params": params}, token_ids, positions, kv_cache, batch, decode_only, logits_indices)

    return jax.jit(step, donate_argnums=(3,) if donate_cache else ())


def kv_cache_shape(config: ModelConfig, num_pages: int, page_size: int) -> tuple[int, ...]:
    """Stacked cache `[num_layers, num_pages, page_size, 2 * num_kv_heads, head_dim]` (DESIGN.md §3); the last
    axis is head_dim + 4 (uint8) with a quantized `kv_cache_dtype`."""
    return (config.num_layers, num_pages, page_size, 2 * config.num_kv_heads,
            kv_row_width(config.head_dim, config.kv_cache_dtype))


def init_params(config: ModelConfig, rng: jax.Array, out_shardings=None):
    """Random weights (normal std 0.02, unit norms, zero biases), for random-weight benchmark models.
    `out_shardings` (a pytree of Shardings matching the params) creates them directly on a mesh."""
    model = Decoder(config)
    tokens = jnp.zeros((1, 1), jnp.int32)
    init = jax.jit(lambda key: model.init(key, tokens, method=Decoder.dense)["params"], out_shardings=out_shardings)
    return init(rng)


def abstract_params(config: ModelConfig):
    """The param tree as `jax.ShapeDtypeStruct`s, without allocating anything."""
    return jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))


# Tensor parallelism over kv heads: each device holds whole heads (q/k/v columns, o_proj rows, their sinks)
# and a slice of the MLP; the only collectives are the sums after o_proj and down_proj. MoE experts split over
# `ep` (when the mesh has that axis) with their intermediate width over tp.
_TP_RULES = (
    (r"self_attn/(q_proj|k_proj|v_proj)/kernel$", lambda tp: P(None, tp)),
    (r"self_attn/(q_proj|k_proj|v_proj)/bias$", lambda tp: P(tp)),
    (r"self_attn/o_proj/kernel$", lambda tp: P(tp, None)),
    (r"self_attn/sinks$", lambda tp: P(tp)),
    (r"mlp/(gate_proj|up_proj)/kernel$", lambda tp: P(None, tp)),
    (r"mlp/down_proj/kernel$", lambda tp: P(tp, None)),
)


def param_partition_specs(config: ModelConfig, tp_axis: str = "tp", ep_axis: str | None = None):
    """PartitionSpecs matching the param tree; embeddings, norms, routers and lm_head are replicated.
    Requires num_kv_heads and (moe_)intermediate_size divisible by the tp degree, num_experts by ep."""
    experts = expert_partition_specs(ep_axis, tp_axis)

    def spec(path, _leaf):
        name = "/".join(str(getattr(key, "key", key)) for key in path)
        for pattern, rule in _TP_RULES:
            if re.search(pattern, name):
                return rule(tp_axis)
        match = re.search(r"moe/(\w+)$", name)
        if match and match.group(1) in experts:
            return experts[match.group(1)]
        return P()

    return jax.tree_util.tree_map_with_path(spec, abstract_params(config))


def kv_cache_partition_spec(tp_axis: str = "tp") -> P:
    """Stacked cache sharded on axis 3 (2*Hkv, K/V interleaved) so each device keeps its own heads' K and V."""
    return P(None, None, None, tp_axis, None)
