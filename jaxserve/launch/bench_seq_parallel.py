"""Sequence-parallel prefill benchmark: prefill time of one long prompt on 1, 2, 4, 8 devices of the `seq`
axis, with 0 / 50 / 90% of it cached in the pool (the cached part is prefilled untimed first; the timed run
computes only the suffix, attending to the prefix pages), plus ring-attention overlap and zig-zag balance.

    python -m jaxserve.launch.bench_seq_parallel [--prompt_len=2048] [--devices=1,2,4,8] [--json_out=...]

Method: per (devices, cached fraction): one warm-up call (compiles), then `--repeats` timed calls, median
reported (block_until_ready on the logits). Scaling efficiency = T(1) / (N x T(N)) at the same cached fraction.
Overlap (kernel level, one layer's ring attention, no prefix): t_full (ppermute + compute), t_comp (same
compute, ppermute replaced by reusing the local block) and t_comm (the same N-1 ppermutes of the same block
sizes, no compute); hidden fraction of communication = (t_comp + t_comm - t_full) / t_comm, clipped to [0, 1].
Balance: the zig-zag schedule (each ring step C x 2C scores) vs attending every block in full (2C x 2C).

On CPU the N devices are fake (`--xla_force_host_platform_device_count`) and share this machine's cores;
the output says so. Scaling on CPU is bounded by cores, not devices.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import json
import platform
import statistics
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("prompt_len", 2048, "prompt tokens")
flags.DEFINE_string("devices", "1,2,4,8", "seq-axis sizes")
flags.DEFINE_string("cached", "0,0.5,0.9", "cached fractions of the prompt")
flags.DEFINE_integer("repeats", 3, "timed calls per point (median)")
flags.DEFINE_integer("page_size", 16, "page size")
flags.DEFINE_integer("hidden", 256, "model hidden size")
flags.DEFINE_integer("layers", 4, "model layers")
flags.DEFINE_string("json_out", "", "write the results here as JSON")


def _time(fn, repeats):
    import jax
    jax.block_until_ready(fn())  # warm-up / compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxserve.config import CacheConfig, ModelConfig
    from jaxserve.engine.seq_parallel import SequenceParallelPrefill
    from jaxserve.kernels import ring_attention as ra
    from jaxserve.mempool import MemPool
    from jaxserve.model.decoder import init_params, kv_cache_partition_spec, param_partition_specs

    platform_name = jax.default_backend()
    ndev = [int(x) for x in FLAGS.devices.split(",")]
    fractions = [float(x) for x in FLAGS.cached.split(",")]
    heads, kv_heads, head_dim = 8, 2, FLAGS.hidden // 8
    cfg = ModelConfig(vocab_size=1024, hidden_size=FLAGS.hidden, intermediate_size=4 * FLAGS.hidden,
                      num_layers=FLAGS.layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                      max_position_embeddings=max(4096, 2 * FLAGS.prompt_len))
    host_params = init_params(cfg, jax.random.PRNGKey(0))
    L, ps = FLAGS.prompt_len, FLAGS.page_size
    tokens = list(np.random.default_rng(0).integers(0, cfg.vocab_size, L))
    machine = (f"{platform_name}: {len(jax.devices())} {'fake CPU devices sharing ' + str(os.cpu_count()) + ' cores' if platform_name == 'cpu' else 'devices'}"
               f", {platform.processor() or platform.machine()}, jax {jax.__version__}")
    if platform_name == "cpu":
        print(f"NOTE: {machine}. CPU 'devices' share the same cores: scaling beyond the core count is not "
              "expected; numbers show overheads and correctness of the schedule, not accelerator speedups.")
    results = dict(machine=machine, model=dict(hidden=cfg.hidden_size, layers=cfg.num_layers, heads=heads,
                                               kv_heads=kv_heads, head_dim=head_dim),
                   prompt_len=L, page_size=ps, repeats=FLAGS.repeats, prefill=[], overlap=[])

    # ---- baseline: the engine's normal single-device step (ragged jnp attention), suffix as one chunk
    from jaxserve.engine.model_runner import standalone_step
    from jaxserve.util import next_pow2
    from jaxserve.engine.sampling import sampling_arrays
    from jaxserve.model.batch import make_attention_batch
    dev0 = jax.devices()[0]
    pool = MemPool(cfg, CacheConfig(page_size=ps, num_pages=L // ps + 8))
    pages = pool.alloc(-(-L // ps))
    step = standalone_step(cfg, "reference")
    params0 = jax.device_put(host_params, dev0)
    for f in fractions:
        cached = int(L * f) // ps * ps
        n = L - cached
        batch, positions = make_attention_batch([n], [L], [pages], page_size=ps, num_tokens=next_pow2(n, 16),
                                                pages_per_seq=next_pow2(len(pages)))
        toks = np.zeros(next_pow2(n, 16), np.int32)
        toks[:n] = tokens[cached:]
        samp = sampling_arrays([None], [0], [0], 1)

        def run_normal():
            out, pool.kv_cache = step(params0, pool.kv_cache, toks, positions, batch, np.array([n - 1], np.int32),
                                      samp, decode_only=False)
            return out

        t = _time(run_normal, FLAGS.repeats)
        row = dict(devices=1, path="normal engine step (ragged jnp, 16-row query tiles)", cached_fraction=f,
                   computed_tokens=n, prefill_ms=round(t * 1e3, 2))
        results["baseline_normal_step"] = results.get("baseline_normal_step", []) + [row]
        print(row, flush=True)
    pool = None  # free the baseline's cache before the meshes' pools

    # ---- end-to-end prefill
    base = {}
    for n in ndev:
        mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:n]).reshape(n, 1), ("seq", "tp"))
        pool = MemPool(cfg, CacheConfig(page_size=ps, num_pages=L // ps + 8),
                       sharding=NamedSharding(mesh, kv_cache_partition_spec()))
        params = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), host_params,
                              param_partition_specs(cfg))
        sp = SequenceParallelPrefill(cfg, params, pool, mesh)
        pages = pool.alloc(-(-L // ps))
        for f in fractions:
            cached = int(L * f) // ps * ps
            if cached:
                sp.forward(tokens[:cached], 0, pages)  # fill the prefix pages (untimed)
            t = _time(lambda: sp.forward(tokens[cached:], cached, pages)[1], FLAGS.repeats)
            if n == ndev[0]:
                base[f] = t * n
            speedup = base[f] / t  # vs the 1-device time (the first size's time x its size if it is not 1)
            row = dict(devices=n, cached_fraction=f, cached_tokens=cached, computed_tokens=L - cached,
                       prefill_ms=round(t * 1e3, 2), speedup=round(speedup, 3), efficiency=round(speedup / n, 3))
            results["prefill"].append(row)
            print(row, flush=True)
        pool = params = sp = None

    # ---- ring-attention overlap and balance (one layer, no prefix)
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((L, heads, head_dim)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((L, kv_heads, head_dim)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((L, kv_heads, head_dim)), jnp.float32)
    pos = jnp.arange(L, dtype=jnp.int32)
    pkv = jnp.zeros((ps, 2 * kv_heads, head_dim), jnp.float32)
    for n in [x for x in ndev if x > 1]:
        mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:n]), ("seq",))
        rows = NamedSharding(mesh, P("seq"))
        args = [jax.device_put(x, rows) for x in (q, k, v, pos)] + [pkv, 0]

        def variant(**kw):
            fn = jax.jit(lambda *a: ra.ring_attention(*a, mesh=mesh, sm_scale=head_dim ** -0.5, **kw))
            return _time(lambda: fn(*args), FLAGS.repeats)

        t_full = variant()
        t_comp = variant(communicate=False)
        t_unbal = variant(balanced=False)

        def comm_only(k, v, p):
            perm = [(d, (d + 1) % n) for d in range(n)]
            blk = (k, v, p)
            for _ in range(n - 1):
                blk = jax.lax.ppermute(blk, "seq", perm)
            return blk[0]

        comm = jax.jit(ra.shard_map(comm_only, mesh=mesh, in_specs=(P("seq"),) * 3, out_specs=P("seq")))
        t_comm = _time(lambda: comm(*args[1:4]), FLAGS.repeats)
        hidden = min(max((t_comp + t_comm - t_full) / t_comm, 0.0), 1.0) if t_comm > 0 else float("nan")
        row = dict(devices=n, ring_ms=round(t_full * 1e3, 3), compute_only_ms=round(t_comp * 1e3, 3),
                   comm_only_ms=round(t_comm * 1e3, 3), comm_hidden_fraction=round(hidden, 3),
                   unbalanced_ms=round(t_unbal * 1e3, 3), zigzag_saving=round(1 - t_full / t_unbal, 3))
        results["overlap"].append(row)
        print(row, flush=True)

    # ---- table
    print(f"\nSequence-parallel prefill, prompt {L} tokens, {cfg.num_layers} layers x hidden {cfg.hidden_size}, "
          f"median of {FLAGS.repeats} ({machine})")
    print(f"{'devices':>7} | " + " | ".join(f"{int(f * 100):>3}% cached: ms (eff)" for f in fractions))
    for n in ndev:
        cells = []
        for f in fractions:
            r = next(r for r in results["prefill"] if r["devices"] == n and r["cached_fraction"] == f)
            cells.append(f"{r['prefill_ms']:>12.1f} ({r['efficiency']:.2f})")
        print(f"{n:>7} | " + " | ".join(f"{c:>22}" for c in cells))
    if results.get("baseline_normal_step"):
        print("  normal | " + " | ".join(f"{r['prefill_ms']:>22.1f}" for r in results["baseline_normal_step"])
              + "   (1 device, the engine's normal step; not the efficiency baseline)")
    if results["overlap"]:
        print("\nRing attention, one layer, no prefix: full / compute-only / comm-only ms, hidden comm fraction, "
              "unbalanced ms, zig-zag saving")
        for r in results["overlap"]:
            print(f"{r['devices']:>7} | {r['ring_ms']:8.2f} {r['compute_only_ms']:8.2f} {r['comm_only_ms']:8.2f} | "
                  f"{r['comm_hidden_fraction']:.2f} | {r['unbalanced_ms']:8.2f} {r['zigzag_saving']:+.2f}")
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as fh:
            json.dump(results, fh, indent=1)
        print(f"wrote {FLAGS.json_out}")


if __name__ == "__main__":
    app.run(main)
