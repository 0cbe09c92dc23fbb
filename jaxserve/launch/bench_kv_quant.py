"""Quantized KV cache side by side (issue 19), one row per `kv_cache_dtype` in one run: page bytes and pages held
per GiB, bytes of one PD transfer of a prompt's KV, decode step time, and the prefix-cache hit rate of the
shared Mooncake trace in the cluster simulator at the same memory budget; plus greedy agreement with the
unquantized run (jaxserve/bench/kv_quant_eval.py) when --agreement_prompts > 0.

    python -m jaxserve.launch.bench_kv_quant --out=out/bench_kv_quant.json

The engine shape is bench_cpu_dtype's (hidden 256, 4 layers, 2 heads / 1 KV head of 128, vocab 8192), random
weights. "auto" is the model's dtype as this platform stores it (see engine.kv_storage_dtype); the
bf16 row of the page table is what a GPU/TPU stores. Timings are the least of `repeats`; the box is shared, so
compare within one run. Prints a table and writes JSON."""

from __future__ import annotations

import dataclasses
import json
import os
import time

from absl import app, flags

flags.DEFINE_list("kv_cache_dtypes", ["auto", "fp8_e4m3", "fp8_e5m2", "int8"], "formats compared")
flags.DEFINE_integer("hidden", 256, "hidden size")
flags.DEFINE_integer("layers", 4, "layers")
flags.DEFINE_integer("vocab", 8192, "vocabulary")
flags.DEFINE_list("batches", ["1", "8", "32"], "decode batch sizes")
flags.DEFINE_integer("context", 512, "prompt tokens of each decoding sequence")
flags.DEFINE_integer("decode_tokens", 16, "new tokens per sequence when timing decode")
flags.DEFINE_integer("transfer_tokens", 1024, "prompt tokens whose KV one PD transfer moves")
flags.DEFINE_integer("repeats", 3, "timed repeats (least kept)")
flags.DEFINE_float("sim_kv_gib", 24.0, "simulator: KV memory per instance (GiB) every format gets")
flags.DEFINE_integer("sim_instances", 8, "simulator: colocated instances")
flags.DEFINE_integer("sim_requests", 2000, "simulator: trace requests replayed (0: none, skip the simulation)")
flags.DEFINE_integer("agreement_prompts", 0, "greedy agreement: prompts on the demo model (0: skip)")
flags.DEFINE_integer("agreement_tokens", 64, "greedy agreement: generated tokens per prompt")
flags.DEFINE_bool("probes", True, "also time the in-place KV write per storage dtype and compare scale schemes on "
                  "the demo model's K/V (why uint8 rows with a per-token scale)")
flags.DEFINE_string("out", "out/bench_kv_quant.json", "JSON output")
FLAGS = flags.FLAGS


def _model_config():
    from jaxserve.config import ModelConfig
    return ModelConfig(vocab_size=FLAGS.vocab, hidden_size=FLAGS.hidden, intermediate_size=FLAGS.hidden * 4,
                       num_layers=FLAGS.layers, num_heads=2, num_kv_heads=1, head_dim=128,
                       max_position_embeddings=4096)


def pages_per_gib(cfg, kvd: str) -> dict:
    from jaxserve.config import CacheConfig
    from jaxserve.engine.engine import kv_storage_dtype
    from jaxserve.mempool.kv_store import page_bytes
    cache = CacheConfig(page_size=16, kv_cache_dtype=kvd)
    here = page_bytes(cfg, cache, kv_storage_dtype(cfg))
    bf16 = page_bytes(cfg, cache, "bfloat16")
    return dict(page_bytes=here, pages_per_gib=2**30 // here, page_bytes_bf16_model=bf16,
                pages_per_gib_bf16_model=2**30 // bf16)


def transfer_bytes(cfg, kvd: str) -> dict:
    """One PD transfer of `transfer_tokens` tokens' KV between two pools in this process (one gather, one move,
    one scatter): the bytes of the gathered block (page count padded to a power of two) and its time."""
    import jax
    import numpy as np

    from jaxserve.config import CacheConfig
    from jaxserve.engine.engine import kv_storage_dtype
    from jaxserve.mempool import MemPool
    from jaxserve.mempool import transfer as tr
    n = -(-FLAGS.transfer_tokens // 16)
    devices = jax.devices()
    pools = []
    for dev in (devices[0], devices[-1]):
        mesh = jax.sharding.Mesh(np.asarray([dev]), ("tp",))
        from jaxserve.model.decoder import kv_cache_partition_spec
        pools.append(MemPool(cfg, CacheConfig(page_size=16, num_pages=2 * n + 2, kv_cache_dtype=kvd),
                             sharding=jax.sharding.NamedSharding(mesh, kv_cache_partition_spec()),
                             dtype=kv_storage_dtype(cfg)))
    src, dst = pools
    sp, dp = src.alloc(n), dst.alloc(n)
    block = tr.gather_block(src, sp)
    best = float("inf")
    for _ in range(FLAGS.repeats + 1):
        t = time.perf_counter()
        src.transfer(dst, sp, dp)
        jax.block_until_ready(dst.kv_cache)
        best = min(best, time.perf_counter() - t)
    return dict(transfer_pages=n, transfer_page_bytes=n * src.page_bytes, transfer_block_bytes=int(block.nbytes),
                transfer_ms=best * 1e3)


def decode_times(cfg, kvd: str) -> dict:
    """Engine step time with every sequence decoding (prefill finished first, so no step mixes in a prefill
    chunk), `batch` sequences of `context` tokens: the least over `repeats` runs of `decode_tokens` steps."""
    import numpy as np

    from jaxserve import LLM, SamplingParams
    max_batch = max(map(int, FLAGS.batches))
    steps = FLAGS.decode_tokens
    budget = steps * (FLAGS.repeats + 1) + 8
    pages = max_batch * (-(-(FLAGS.context + budget) // 16)) + 16
    llm = LLM(cfg, num_pages=pages, max_num_batched_tokens=max(1024, FLAGS.context), max_num_seqs=max_batch,
              enable_prefix_caching=False, compilation_cache="off", kv_cache_dtype=kvd)
    eng = llm.engine
    rng = np.random.RandomState(0)
    out = {}
    for batch in map(int, FLAGS.batches):
        params = SamplingParams(max_tokens=budget, ignore_eos=True)
        reqs = [eng.add_request(list(rng.randint(0, FLAGS.vocab, FLAGS.context)), params) for _ in range(batch)]
        while any(r.is_prefilling for r in reqs):
            eng.step()
        for _ in range(2):  # the decode shape compiles here
            eng.step()
        eng.sync()
        best = float("inf")
        for _ in range(FLAGS.repeats + 1):
            start = time.perf_counter()
            for _ in range(steps):
                eng.step()
            eng.sync()
            best = min(best, (time.perf_counter() - start) / steps)
        out[f"decode_b{batch}_ms"] = best * 1e3
        for r in reqs:
            eng.abort(r.request_id)
        while eng.has_unfinished():
            eng.step()
    return out


def sim_hit_rate(kvd: str) -> dict:
    """The shared trace on `sim_instances` colocated instances (locality routing, H200 / Llama-3-8B cost model)
    whose KV memory is `sim_kv_gib` each, pages sized by this format: an 8-bit page of Llama-3-8B (8 KV heads
    of 128, 32 layers) is 132/256 of a bf16 one."""
    from jaxserve.bench import workloads
    from jaxserve.sim.cluster import simulate
    from jaxserve.sim.cost import h200_llama8b
    base = h200_llama8b()
    row = 128 + 4 if kvd != "auto" else 2 * 128
    per_token = base.kv_bytes_per_token * row // 256
    pages = int(FLAGS.sim_kv_gib * 2**30 // (per_token * base.page_size))
    cost = dataclasses.replace(base, kv_bytes_per_token=per_token, kv_pages=pages)
    wl = workloads.trace(max_requests=FLAGS.sim_requests)
    records = simulate(wl, cost, setting="colocated+cache", policy="locality", num_instances=FLAGS.sim_instances)
    prompt = sum(r["prompt_tokens"] for r in records)
    cached = sum(r["cached_tokens"] for r in records)
    ttft = sorted(r["ttft_s"] for r in records)
    return dict(sim_pages_per_instance=pages, sim_hit_rate=cached / prompt if prompt else 0.0,
                sim_mean_ttft_s=sum(ttft) / len(ttft), sim_requests=len(records))


def scatter_probe() -> dict:
    """ms of one donated 8-token KV write (`cache.at[layer, pages, offsets].set`) into a 4 x 512-page cache, per
    storage dtype: XLA:CPU keeps f32 and uint8 writes in place but converts a bf16 or float8 cache whole."""
    import jax
    import jax.numpy as jnp
    out = {}
    for name, dtype, width in (("float32", jnp.float32, 128), ("bfloat16", jnp.bfloat16, 128),
                               ("float8_e4m3fn", jnp.float8_e4m3fn, 132), ("uint8", jnp.uint8, 132)):
        cache = jnp.zeros((4, 512, 16, 4, width), dtype)
        write = jax.jit(lambda c, p, o, x: c.at[1, p, o].set(x, mode="promise_in_bounds"), donate_argnums=0)
        pages, offsets, rows = jnp.arange(8, dtype=jnp.int32) + 3, jnp.zeros(8, jnp.int32), jnp.ones((8, 4, width), dtype)
        cache = write(cache, pages, offsets, rows).block_until_ready()
        best = float("inf")
        for _ in range(10):
            t = time.perf_counter()
            cache = write(cache, pages, offsets, rows).block_until_ready()
            best = min(best, time.perf_counter() - t)
        out[name] = best * 1e3
    return out


def agreement_rows() -> dict:
    import numpy as np

    from jaxserve import model as model_lib
    from jaxserve.bench import kv_quant_eval as ev
    from jaxserve.engine.llm import LLM
    cfg, params, _ = model_lib.load("demo")
    prompts = ev.random_prompts(np.random.default_rng(0), FLAGS.agreement_prompts, cfg.vocab_size)
    quant = [k for k in FLAGS.kv_cache_dtypes if k != "auto"]
    _, results = ev.agreement(lambda k: LLM("demo", kv_cache_dtype=k, num_pages=256), cfg, params, prompts,
                              FLAGS.agreement_tokens, dtypes=quant)
    return {r.kv_cache_dtype: dataclasses.asdict(r) for r in results}


def main(_):
    import jax

    cfg = _model_config()
    rows = {}
    for kvd in FLAGS.kv_cache_dtypes:
        row = dict(pages_per_gib(cfg, kvd))
        row.update(transfer_bytes(cfg, kvd))
        row.update(decode_times(cfg, kvd))
        if FLAGS.sim_requests:
            row.update(sim_hit_rate(kvd))
        rows[kvd] = row
        print(kvd, row, flush=True)
    agreement = agreement_rows() if FLAGS.agreement_prompts else {}
    probes = {}
    if FLAGS.probes:
        from jaxserve.bench import kv_quant_eval as ev
        probes = dict(kv_write_ms=scatter_probe(), scale_scheme_rel_rms=ev.scale_scheme_errors(ev.demo_kv_rows()))
    base = FLAGS.kv_cache_dtypes[0]
    print(f"\nKV cache formats on {jax.default_backend()} ({os.cpu_count()} cores): Llama hidden {FLAGS.hidden}, "
          f"{FLAGS.layers} layers, 1 KV head of 128; transfer of {FLAGS.transfer_tokens} tokens; decode at "
          f"context {FLAGS.context}; simulator: {FLAGS.sim_requests} trace requests on {FLAGS.sim_instances} "
          f"instances with {FLAGS.sim_kv_gib} GiB KV each (H200 / Llama-3-8B costs)\n")
    print("| measure | " + " | ".join(FLAGS.kv_cache_dtypes) + f" | ratio to {base} |")
    print("|---|" + "---|" * (len(FLAGS.kv_cache_dtypes) + 1))
    for key in rows[base]:
        values = [rows[k][key] for k in FLAGS.kv_cache_dtypes]
        fmt = (lambda v: f"{v:.3f}") if isinstance(values[0], float) else (lambda v: f"{v}")
        ratio = " / ".join(f"{v / values[0]:.2f}x" if values[0] else "-" for v in values[1:])
        print(f"| {key} | " + " | ".join(fmt(v) for v in values) + f" | {ratio} |")
    if agreement:
        print(f"\nGreedy agreement with the unquantized run (demo model, {FLAGS.agreement_prompts} prompts x "
              f"{FLAGS.agreement_tokens} tokens)\n")
        keys = ["prefix_agreement", "token_agreement", "identical_prompts", "forced_agreement",
                "mean_abs_logprob_diff"]
        print("| kv_cache_dtype | " + " | ".join(keys) + " |")
        print("|---|" + "---|" * len(keys))
        for kvd, a in agreement.items():
            print(f"| {kvd} | " + " | ".join(f"{a[k]:.4f}" if isinstance(a[k], float) else str(a[k])
                                             for k in keys) + " |")
    if probes:
        print("\nOne 8-token KV write into a 4 x 512-page cache, ms: " +
              ", ".join(f"{k} {v:.3f}" for k, v in probes["kv_write_ms"].items()))
        print("\nRelative RMS error of the demo model's K/V rows per scale scheme\n")
        schemes = ["per_token", "per_tensor_1", "page_first_token", "page_whole"]
        print("| format | " + " | ".join(schemes) + " |")
        print("|---|" + "---|" * len(schemes))
        for fmt, e in probes["scale_scheme_rel_rms"].items():
            print(f"| {fmt} | " + " | ".join(f"{e[k]:.4f}" for k in schemes) + " |")
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump(dict(platform=jax.default_backend(), flags={k: FLAGS[k].value for k in (
            "hidden", "layers", "context", "transfer_tokens", "sim_kv_gib", "sim_instances", "sim_requests")},
            rows=rows, agreement=agreement, probes=probes), f, indent=1)
    print(f"\nwrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
