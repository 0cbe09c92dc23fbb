"""Mixture-of-experts step time, side by side in one run: expert parallelism (ep=1 vs ep=N) and the grouped
expert matmul vs a dense loop over every expert, for a prefill step and decode steps of a small random MoE.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m jaxserve.launch.bench_moe --out=out/bench_moe.json

Each setting compiles once, then takes the least of `repeats` timed steps (ratios within one run; the box
is shared and noisy). Prints a table and writes JSON."""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

flags.DEFINE_integer("layers", 2, "decoder layers (all MoE)")
flags.DEFINE_integer("hidden", 256, "hidden size")
flags.DEFINE_integer("experts", 8, "experts per layer")
flags.DEFINE_integer("top_k", 2, "experts per token")
flags.DEFINE_integer("moe_intermediate", 512, "expert intermediate size")
flags.DEFINE_integer("ep", 4, "expert-parallel degree compared with ep=1")
flags.DEFINE_integer("prefill_tokens", 256, "tokens of the prefill step")
flags.DEFINE_list("decode_batches", ["8", "32"], "decode step batch sizes")
flags.DEFINE_integer("context", 128, "tokens already cached per decoding sequence")
flags.DEFINE_integer("repeats", 5, "timed repeats per setting (least is kept)")
flags.DEFINE_string("out", "out/bench_moe.json", "JSON output")
FLAGS = flags.FLAGS

PAGE = 16


def _setting(cfg, ep, moe_impl):
    import jax

    from jaxserve.engine.engine import make_mesh
    from jaxserve.model.decoder import init_params, kv_cache_partition_spec, make_paged_forward, param_partition_specs

    mesh = make_mesh(1, None, 1, ep)
    specs = param_partition_specs(cfg, ep_axis="ep" if ep > 1 else None)
    params = jax.tree.map(lambda x, s: jax.device_put(x, jax.sharding.NamedSharding(mesh, s)),
                          init_params(cfg, jax.random.PRNGKey(0)), specs)
    kv_sharding = jax.sharding.NamedSharding(mesh, kv_cache_partition_spec())
    return mesh, params, kv_sharding, {
        decode: make_paged_forward(cfg, decode_only=decode, mesh=mesh if ep > 1 else None, moe_impl=moe_impl)
        for decode in (False, True)}


def _time_step(fn, params, cache, inputs, repeats):
    import jax
    out, cache = fn(params, *inputs[:2], cache, *inputs[2:])  # compile
    jax.block_until_ready(out)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out, cache = fn(params, *inputs[:2], cache, *inputs[2:])
        jax.block_until_ready(out)
        best = min(best, time.perf_counter() - start)
    return best, cache


def _inputs(num_seqs, q_len, context):
    import jax.numpy as jnp
    import numpy as np

    from jaxserve.model import AttentionBatch, make_attention_batch

    kv_len = context + q_len
    pages = -(-kv_len // PAGE)
    tables = [list(range(1 + s * pages, 1 + (s + 1) * pages)) for s in range(num_seqs)]
    batch, positions = make_attention_batch([q_len] * num_seqs, [kv_len] * num_seqs, tables, page_size=PAGE)
    tokens = np.random.RandomState(0).randint(0, 1000, num_seqs * q_len).astype(np.int32)
    logits_rows = np.cumsum([q_len] * num_seqs) - 1
    return (jnp.asarray(tokens), jnp.asarray(positions), AttentionBatch(*map(jnp.asarray, batch)),
            jnp.asarray(logits_rows, jnp.int32)), 1 + num_seqs * pages


def main(_):
    import jax
    import jax.numpy as jnp

    from jaxserve.config import ModelConfig
    from jaxserve.model.decoder import kv_cache_shape

    cfg = ModelConfig(vocab_size=1024, hidden_size=FLAGS.hidden, intermediate_size=FLAGS.moe_intermediate,
                      num_layers=FLAGS.layers, num_heads=FLAGS.hidden // 64, num_kv_heads=max(FLAGS.hidden // 128, 1),
                      head_dim=64, max_position_embeddings=4096, architecture="MixtralForCausalLM",
                      num_experts=FLAGS.experts, num_experts_per_tok=FLAGS.top_k,
                      moe_intermediate_size=FLAGS.moe_intermediate, moe_layers=tuple(range(FLAGS.layers)))
    steps = [("prefill", 1, FLAGS.prefill_tokens, 0)] + [
        (f"decode b={b}", int(b), 1, FLAGS.context) for b in FLAGS.decode_batches]
    settings = [("grouped", 1), ("dense", 1), ("grouped", FLAGS.ep), ("dense", FLAGS.ep)]
    rows = []
    for impl, ep in settings:
        mesh, params, kv_sharding, fns = _setting(cfg, ep, impl)
        for name, seqs, q_len, context in steps:
            inputs, num_pages = _inputs(seqs, q_len, context)
            cache = jax.device_put(jnp.zeros(kv_cache_shape(cfg, num_pages, PAGE), jnp.float32), kv_sharding)
            seconds, _ = _time_step(fns[q_len == 1], params, cache, inputs, FLAGS.repeats)
            rows.append(dict(step=name, impl=impl, ep=ep, ms=seconds * 1e3, tokens=seqs * q_len))
            print(f"  {impl:7s} ep={ep} {name:12s} {seconds * 1e3:9.2f} ms", flush=True)
    base = {r["step"]: r["ms"] for r in rows if r["impl"] == "grouped" and r["ep"] == 1}
    dense1 = {r["step"]: r["ms"] for r in rows if r["impl"] == "dense" and r["ep"] == 1}
    print(f"\nMoE step time: {FLAGS.layers} layers, hidden {FLAGS.hidden}, {FLAGS.experts} experts top-{FLAGS.top_k}, "
          f"expert width {FLAGS.moe_intermediate}; {jax.device_count()} {jax.default_backend()} devices\n")
    print("| step | impl | ep | ms | vs grouped ep=1 | dense / grouped (same ep) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        same = {x["impl"]: x["ms"] for x in rows if x["step"] == r["step"] and x["ep"] == r["ep"]}
        print(f"| {r['step']} | {r['impl']} | {r['ep']} | {r['ms']:.2f} | {r['ms'] / base[r['step']]:.2f}x | "
              f"{same['dense'] / same['grouped']:.2f}x |")
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump(dict(config=dict(layers=FLAGS.layers, hidden=FLAGS.hidden, experts=FLAGS.experts,
                                   top_k=FLAGS.top_k, moe_intermediate=FLAGS.moe_intermediate),
                       platform=jax.default_backend(), devices=jax.device_count(), rows=rows,
                       grouped_vs_dense_ep1={k: dense1[k] / base[k] for k in base}), f, indent=1)
    print(f"\nwrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
