"""Mixture-of-experts block: top-k routing, expert MLPs as grouped matmuls, expert parallelism.

Tokens are routed (`route`), their (token, choice) rows sorted by expert, and each expert's projections run as
one grouped matmul over its contiguous rows (`grouped_matmul`): `jax.lax.ragged_dot` on GPU/TPU, where it
lowers to grouped GEMM kernels; on CPU, where ragged_dot lowers to a dense masked product over every group,
a blocked loop that pads each group to whole blocks and runs only the live blocks. `moe_impl="dense"` is the
baseline the benchmark compares against: every expert over every token, weighted.

Expert parallelism: given a mesh with an `ep` axis, each `ep` shard holds num_experts / ep experts (and a
`tp` slice of their intermediate width); activations and routing are replicated, every shard computes its own
experts' rows and one psum over (ep, tp) combines them — attention stays replicated over `ep`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxserve.config import ModelConfig
from jaxserve.util import next_pow2
from jaxserve.model.layers import activation, dense, f32_accumulating_dot

MOE_IMPLS = ("grouped", "dense")


def route(logits: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """Router logits [T, E] -> (weights f32[T, k], expert ids i32[T, k])."""
    k = config.num_experts_per_tok
    if config.router == "topk_softmax":  # gpt-oss: choose on logits, softmax over the chosen
        top, experts = jax.lax.top_k(logits, k)
        return jax.nn.softmax(top.astype(jnp.float32), axis=-1), experts
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if config.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts


def _blocked_grouped_matmul(x, w, group_sizes):
    """CPU grouped matmul: rows of each group padded to whole blocks; one dot per live block."""
    rows, k_dim = x.shape
    groups, _, n = w.shape
    block = min(128, max(8, next_pow2(-(-rows // groups)) // 2))  # measured: 1/2 of the mean group beats 1/4
    num_blocks = -(-rows // block) + groups  # each group wastes less than one block
    padded = (group_sizes + block - 1) // block * block
    pad_end = jnp.cumsum(padded)
    pad_start = pad_end - padded
    group_end = jnp.cumsum(group_sizes)
    row = jnp.arange(rows)
    row_group = jnp.minimum(jnp.searchsorted(group_end, row, side="right"), groups - 1)
    covered = row < group_end[-1]
    sink = num_blocks * block
    dest = jnp.where(covered, pad_start[row_group] + row - (group_end - group_sizes)[row_group], sink)
    xp = jnp.zeros((sink + 1, k_dim), x.dtype).at[dest].set(x)[:sink].reshape(num_blocks, block, k_dim)
    first = jnp.arange(num_blocks) * block
    block_group = jnp.minimum(jnp.searchsorted(pad_end, first, side="right"), groups - 1)

    def one(args):
        xb, g, live = args
        return jax.lax.cond(live, lambda: f32_accumulating_dot(xb, w[g], (((1,), (0,)), ((), ()))).astype(x.dtype),
                            lambda: jnp.zeros((block, n), x.dtype))

    out = jax.lax.map(one, (xp, block_group, first < pad_end[-1])).reshape(sink, n)
    return jnp.where(covered[:, None], out[jnp.minimum(dest, sink - 1)], 0)


def grouped_matmul(x, w, group_sizes, platform: str | None = None):
    """x [R, K] with rows sorted by group, w [G, K, N], group_sizes i32[G] -> [R, N]; row r is multiplied by
    the weight of its group; rows past sum(group_sizes) give zeros (ragged_dot's contract)."""
    platform = platform or jax.default_backend()
    inputs = x.astype(w.dtype)  # bf16 experts under f32 activations: bf16 inputs, f32 accumulation
    if platform == "cpu":
        return _blocked_grouped_matmul(inputs, w, group_sizes).astype(x.dtype)
    return jax.lax.ragged_dot(inputs, w, group_sizes, preferred_element_type=jnp.float32).astype(x.dtype)


def _expert_glu(g, u, rows_expert, p, config: ModelConfig):
    if config.expert_act == "clamped_swiglu":  # gpt-oss
        g = jnp.minimum(g + p["gate_bias"][rows_expert], config.swiglu_limit)
        u = jnp.clip(u + p["up_bias"][rows_expert], -config.swiglu_limit, config.swiglu_limit)
        return (u + 1) * (g * jax.nn.sigmoid(g * config.swiglu_alpha))
    return activation(config.hidden_act)(g) * u


def experts_grouped(x, weights, experts, p, config: ModelConfig, first_expert, bias_share):
    """The experts held in `p` (ids first_expert .. first_expert + len) over their routed rows.
    x [T, H]; weights f32[T, k]; experts i32[T, k]; p: gate_proj/up_proj [E_l, H, I_l], down_proj
    [E_l, I_l, H] (+ biases) -> f32[T, H], this shard's partial sum."""
    num_tokens, k = experts.shape
    num_local = p["gate_proj"].shape[0]
    local_id = experts.reshape(-1) - first_expert
    is_local = (local_id >= 0) & (local_id < num_local)
    key = jnp.where(is_local, local_id, num_local)  # other shards' rows sort last and are not computed
    order = jnp.argsort(key, stable=True)
    rows_expert = jnp.minimum(key[order], num_local - 1)
    rows_token = order // k
    group_sizes = jnp.bincount(key, length=num_local + 1)[:num_local].astype(jnp.int32)
    xs = x[rows_token]
    h = _expert_glu(grouped_matmul(xs, p["gate_proj"], group_sizes), grouped_matmul(xs, p["up_proj"], group_sizes),
                    rows_expert, p, config)
    y = grouped_matmul(h.astype(x.dtype), p["down_proj"], group_sizes).astype(jnp.float32)
    if "down_bias" in p:
        y = y + bias_share * p["down_bias"][rows_expert].astype(jnp.float32)
    row_weight = jnp.where(is_local[order], weights.reshape(-1)[order], 0.0)
    return jnp.zeros((num_tokens, x.shape[1]), jnp.float32).at[rows_token].add(y * row_weight[:, None])


def experts_dense(x, weights, experts, p, config: ModelConfig, first_expert, bias_share):
    """Baseline with `experts_grouped`'s contract: every local expert over every token, then weighted."""
    out = jnp.zeros((x.shape[0], x.shape[1]), jnp.float32)
    for e in range(p["gate_proj"].shape[0]):
        token_weight = jnp.sum(jnp.where(experts == first_expert + e, weights, 0.0), axis=-1)
        ids = jnp.full((x.shape[0],), e)
        h = _expert_glu(x @ p["gate_proj"][e], x @ p["up_proj"][e], ids, p, config)
        y = f32_accumulating_dot(h.astype(x.dtype), p["down_proj"][e], (((1,), (0,)), ((), ())))
        if "down_bias" in p:
            y = y + bias_share * p["down_bias"][e].astype(jnp.float32)
        out = out + y * token_weight[:, None]
    return out


class MoEBlock(nn.Module):
    """Router + experts. Params: router (Dense H -> E), gate_proj/up_proj [E, H, I], down_proj [E, I, H],
    and for gpt-oss gate_bias/up_bias [E, I], down_bias [E, H]."""

    config: ModelConfig
    mesh: jax.sharding.Mesh | None = None  # set: experts over its `ep` axis, intermediate over `tp`
    impl: str = "grouped"

    @nn.compact
    def __call__(self, x):
        cfg, dtype = self.config, jnp.dtype(self.config.dtype)
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        num_e, hidden, inter = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        init = nn.initializers.normal(0.02)
        weight_dtype = jnp.dtype(cfg.matmul_dtype)
        p = {"gate_proj": self.param("gate_proj", init, (num_e, hidden, inter), weight_dtype),
             "up_proj": self.param("up_proj", init, (num_e, hidden, inter), weight_dtype),
             "down_proj": self.param("down_proj", init, (num_e, inter, hidden), weight_dtype)}
        if cfg.expert_act == "clamped_swiglu":
            p.update(gate_bias=self.param("gate_bias", nn.initializers.zeros, (num_e, inter), dtype),
                     up_bias=self.param("up_bias", nn.initializers.zeros, (num_e, inter), dtype),
                     down_bias=self.param("down_bias", nn.initializers.zeros, (num_e, hidden), dtype))
        logits = dense(num_e, "router", dtype, use_bias=cfg.router_bias)(x)
        weights, experts = route(logits, cfg)
        compute = experts_grouped if self.impl == "grouped" else experts_dense
        if self.mesh is None or self.mesh.size == 1:
            out = compute(x, weights, experts, p, cfg, 0, 1.0)
        else:
            out = _sharded(compute, self.mesh, cfg)(x, weights, experts, p)
        return out.astype(x.dtype).reshape(*lead, hidden)


def expert_partition_specs(ep_axis: str | None, tp_axis: str | None) -> dict[str, P]:
    """Param name -> PartitionSpec of the expert weights (experts over ep, intermediate over tp)."""
    return {"gate_proj": P(ep_axis, None, tp_axis), "up_proj": P(ep_axis, None, tp_axis),
            "down_proj": P(ep_axis, tp_axis, None), "gate_bias": P(ep_axis, tp_axis),
            "up_bias": P(ep_axis, tp_axis), "down_bias": P(ep_axis, None)}


def _sharded(compute, mesh, cfg: ModelConfig):
    ep_axis = "ep" if "ep" in mesh.axis_names else None
    tp_axis = "tp" if "tp" in mesh.axis_names else None
    specs = expert_partition_specs(ep_axis, tp_axis)
    axes = tuple(a for a in (ep_axis, tp_axis) if a is not None)

    def shard(x, weights, experts, p):
        num_local = p["gate_proj"].shape[0]
        first = jax.lax.axis_index(ep_axis) * num_local if ep_axis else 0
        # A down-projection bias is added once, not once per tp slice.
        share = (jax.lax.axis_index(tp_axis) == 0).astype(jnp.float32) if tp_axis else 1.0
        return jax.lax.psum(compute(x, weights, experts, p, cfg, first, share), axes)

    def run(x, weights, experts, p):
        p_specs = {name: specs[name] for name in p}
        return jax.shard_map(shard, mesh=mesh, in_specs=(P(), P(), P(), p_specs), out_specs=P(),
                             check_vma=False)(x, weights, experts, p)

    return run


__all__ = ["MOE_IMPLS", "MoEBlock", "expert_partition_specs", "experts_dense", "experts_grouped",
           "grouped_matmul", "route"]
