"""Where a prefill step's time goes: the whole jitted engine step for one L-token prompt beside each of its
parts timed alone at the same shapes (projections, attention, MLP, norms + RoPE, KV write, lm_head), with
FLOP rates and the rate of a plain `jnp.dot` of the same matmul shapes on this machine.

    python -m jaxserve.launch.profile_prefill --lengths=544,4096 --out=out/profile_prefill.json

Each figure is the least of `repeats` runs after a compile. Prints a table per length and writes JSON."""

from __future__ import annotations

import dataclasses
import json
import os

from absl import app, flags

from jaxserve.bench.timing import least_seconds

flags.DEFINE_list("lengths", ["544", "4096"], "prompt lengths (one prefill step each)")
flags.DEFINE_integer("hidden", 256, "hidden size")
flags.DEFINE_integer("layers", 4, "layers")
flags.DEFINE_integer("heads", 2, "query heads")
flags.DEFINE_integer("kv_heads", 1, "KV heads")
flags.DEFINE_integer("head_dim", 128, "head dim")
flags.DEFINE_integer("intermediate", 1024, "MLP width")
flags.DEFINE_integer("vocab", 8192, "vocabulary")
flags.DEFINE_integer("repeats", 5, "timed repeats (least kept)")
flags.DEFINE_string("out", "out/profile_prefill.json", "JSON output")
FLAGS = flags.FLAGS
PAGE = 16


def _best(fn, *args):
    return least_seconds(fn, *args, repeats=FLAGS.repeats)


def _profile(length: int) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxserve.config import ModelConfig
    from jaxserve.engine.model_runner import standalone_step, token_bucket
    from jaxserve.util import next_pow2
    from jaxserve.engine.sampling import sampling_arrays
    from jaxserve.kernels import reference, xla_attention
    from jaxserve.model import AttentionBatch, make_attention_batch
    from jaxserve.model.decoder import abstract_params, init_params, kv_cache_shape

    cfg = ModelConfig(vocab_size=FLAGS.vocab, hidden_size=FLAGS.hidden, intermediate_size=FLAGS.intermediate,
                      num_layers=FLAGS.layers, num_heads=FLAGS.heads, num_kv_heads=FLAGS.kv_heads,
                      head_dim=FLAGS.head_dim, max_position_embeddings=max(8192, 2 * length))
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = token_bucket(length, 16)
    pages = -(-length // PAGE)
    table = list(range(1, pages + 1))
    batch, positions = make_attention_batch([length], [length], [table], page_size=PAGE, num_tokens=tokens,
                                            max_seqs=8, pages_per_seq=next_pow2(pages))
    batch = AttentionBatch(*map(jnp.asarray, batch))
    cache = jnp.zeros(kv_cache_shape(cfg, pages + 1, PAGE), jnp.float32)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, tokens), jnp.int32)
    logits_rows = jnp.zeros(8, jnp.int32).at[0].set(length - 1)
    sampling = sampling_arrays([], [], [], 8)
    step = standalone_step(cfg, "reference")

    def whole(params, cache):
        return step(params, cache, ids, jnp.asarray(positions), batch, logits_rows, sampling, decode_only=False)[0]

    # The step donates its cache: give it a fresh one per call.
    whole_s = _best(lambda: whole(params, jnp.zeros_like(cache)))
    # The same step with bf16 matmul weights under f32 arithmetic (the CPU default for a bf16 checkpoint).
    mixed_cfg = dataclasses.replace(cfg, weight_dtype="bfloat16")
    mixed_params = jax.tree.map(lambda x, want: x.astype(want.dtype), params, abstract_params(mixed_cfg))
    mixed_step = standalone_step(mixed_cfg, "reference")
    mixed_s = _best(lambda: mixed_step(mixed_params, jnp.zeros_like(cache), ids, jnp.asarray(positions), batch,
                                       logits_rows, sampling, decode_only=False)[0])

    h, q_dim, kv_dim, inter = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, \
        cfg.intermediate_size
    x = jnp.ones((tokens, h), jnp.float32)
    dot = jax.jit(lambda a, b: a @ b)
    matmuls = {"q/k/v projections": [(h, q_dim), (h, kv_dim), (h, kv_dim)], "o projection": [(q_dim, h)],
               "MLP": [(h, inter), (h, inter), (inter, h)]}
    mixed_dot = jax.jit(lambda a, b: jax.lax.dot(a.astype(jnp.bfloat16), b, preferred_element_type=jnp.float32))
    rows = []
    for name, shapes in matmuls.items():
        seconds = sum(_best(dot, jnp.ones((tokens, k)), jnp.ones((k, n))) for k, n in shapes) * cfg.num_layers
        flops = sum(2 * length * k * n for k, n in shapes) * cfg.num_layers
        rows.append(dict(part=name, seconds=seconds, gflops=flops / 1e9))
    bf16_matmul_s = sum(_best(mixed_dot, jnp.ones((tokens, k)), jnp.ones((k, n), jnp.bfloat16))
                        for shapes in matmuls.values() for k, n in shapes) * cfg.num_layers
    q = jnp.ones((tokens, cfg.num_heads, cfg.head_dim), jnp.float32)
    attn = jax.jit(lambda q, kv: xla_attention.ragged_paged_attention_xla(
        q, kv, batch.kv_lens, batch.page_indices, batch.cu_q_lens, batch.num_seqs, sm_scale=0.1))
    rows.append(dict(part="attention", seconds=_best(attn, q, cache[0]) * cfg.num_layers,
                     gflops=2 * 2 * length * (length + 1) / 2 * q_dim * cfg.num_layers / 1e9))
    k = jnp.ones((tokens, cfg.num_kv_heads, cfg.head_dim), jnp.float32)
    write = jax.jit(lambda c, k: reference.write_kv(c, 0, k, k, batch.slot_pages, batch.slot_offsets),
                    donate_argnums=0)
    rows.append(dict(part="KV write", seconds=_best(lambda: write(jnp.zeros_like(cache), k)) * cfg.num_layers,
                     gflops=0.0))

    def norms_rope(x, q):
        n = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-5)
        freqs = jnp.arange(tokens, dtype=jnp.float32)[:, None] * jnp.ones(cfg.head_dim // 2)
        cos = jnp.cos(jnp.concatenate([freqs, freqs], -1))[:, None]
        return n * 2, q * cos
    rows.append(dict(part="norms + RoPE", seconds=_best(jax.jit(norms_rope), x, q) * cfg.num_layers, gflops=0.0))
    rows.append(dict(part="lm_head (last token, 8 slots)",
                     seconds=_best(dot, jnp.ones((8, h)), jnp.ones((h, cfg.vocab_size))),
                     gflops=2 * h * cfg.vocab_size / 1e9))
    parts = sum(r["seconds"] for r in rows)
    total_flops = sum(r["gflops"] for r in rows)
    matmul_s = sum(r["seconds"] for r in rows[:3])
    matmul_flops = sum(r["gflops"] for r in rows[:3])
    print(f"\nprefill of {length} tokens (bucket {tokens}): whole step {whole_s * 1e3:.1f} ms = "
          f"{total_flops / whole_s:.1f} GFLOP/s achieved; parts alone sum to {parts * 1e3:.1f} ms; plain jnp.dot "
          f"of the projection + MLP shapes runs at {matmul_flops / matmul_s:.1f} GFLOP/s (bf16 inputs, f32 "
          f"accumulation: {matmul_flops / bf16_matmul_s:.1f}); the whole step with bf16 matmul weights: "
          f"{mixed_s * 1e3:.1f} ms ({whole_s / mixed_s:.2f}x)\n")
    print("| part | ms (all layers) | share of parts | GFLOP | GFLOP/s |")
    print("|---|---|---|---|---|")
    for r in rows:
        rate = f"{r['gflops'] / r['seconds']:.1f}" if r["gflops"] else "-"
        print(f"| {r['part']} | {r['seconds'] * 1e3:.2f} | {r['seconds'] / parts:.0%} | {r['gflops']:.2f} | {rate} |")
    return [dict(length=length, bucket=tokens, whole_s=whole_s, whole_bf16_weights_s=mixed_s,
                 bf16_matmul_s=bf16_matmul_s, parts=rows)]


def main(_):
    import jax
    results = [r for length in FLAGS.lengths for r in _profile(int(length))]
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump(dict(platform=jax.default_backend(), cores=os.cpu_count(), results=results), f, indent=1)
    print(f"\nwrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
