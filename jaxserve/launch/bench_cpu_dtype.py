"""Compute dtype on this platform, side by side in one run: the same random Llama served with float32 params,
bfloat16 params computed in bf16, and bf16 weights under f32 arithmetic (`bf16_weights`: matmuls from bf16
inputs with f32 accumulation, the CPU default for a bf16 checkpoint, whose KV pool holds bf16 bits in uint16),
and the same over an f32 KV pool (`bf16_weights_f32_kv`, the CPU storage before session 13); decode time per
step and tok/s at batch 1-128 over `--decode_context`-token prompts, and a cold prefill.

    python -m jaxserve.launch.bench_cpu_dtype --out=out/bench_cpu_dtype.json

The default shape is the one of issue 14's report (hidden 256, 4 layers, 2 heads / 1 KV head of 128, vocab
8192). Every shape is compiled by a warm-up pass first; each figure is the least of `repeats`. Prints a table
and writes JSON (ratios within one run; the box is shared and noisy)."""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

flags.DEFINE_integer("hidden", 256, "hidden size")
flags.DEFINE_integer("layers", 4, "layers")
flags.DEFINE_integer("vocab", 8192, "vocabulary")
flags.DEFINE_list("batches", ["1", "8", "32", "128"], "decode batch sizes")
flags.DEFINE_integer("prefill_len", 544, "cold prefill prompt tokens")
flags.DEFINE_integer("decode_tokens", 32, "new tokens per sequence when timing decode")
flags.DEFINE_integer("decode_context", 32, "prompt tokens of each sequence when timing decode")
flags.DEFINE_integer("repeats", 3, "timed repeats (least kept)")
flags.DEFINE_list("dtypes", ["float32", "bfloat16", "bf16_weights"],
                  "settings compared: float32, bfloat16 (everything bf16), bf16_weights (f32 with bf16 matmuls), "
                  "bf16_weights_f32_kv (the same over an f32 KV pool)")
flags.DEFINE_string("out", "out/bench_cpu_dtype.json", "JSON output")
FLAGS = flags.FLAGS


def _measure(dtype):
    import contextlib
    from unittest import mock

    import numpy as np

    from jaxserve import LLM, SamplingParams
    from jaxserve.config import ModelConfig
    from jaxserve.engine import engine

    cfg = ModelConfig(vocab_size=FLAGS.vocab, hidden_size=FLAGS.hidden, intermediate_size=FLAGS.hidden * 4,
                      num_layers=FLAGS.layers, num_heads=2, num_kv_heads=1, head_dim=128,
                      max_position_embeddings=4096,
                      weight_dtype="bfloat16" if dtype.startswith("bf16_weights") else None)
    # The f32 pool is no user setting: the engine's storage choice is replaced for this one LLM.
    storage = mock.patch.object(engine, "kv_storage_dtype", lambda *a, **k: "float32") \
        if dtype == "bf16_weights_f32_kv" else contextlib.nullcontext()
    if dtype.startswith("bf16_weights"):
        dtype = None
    max_batch = max(map(int, FLAGS.batches))
    pages = max(1024, max_batch * (-(-(FLAGS.decode_context + FLAGS.decode_tokens) // 16) + 1))
    with storage:
        llm = LLM(cfg, dtype=dtype, num_pages=pages, max_num_batched_tokens=max(1024, 32 * max_batch),
                  max_num_seqs=max_batch, enable_prefix_caching=False, compilation_cache="off")
    rng = np.random.RandomState(0)
    result = {"kv_page_bytes": llm.engine.pool.page_bytes}
    for batch in map(int, FLAGS.batches):
        prompts = [list(rng.randint(0, FLAGS.vocab, FLAGS.decode_context)) for _ in range(batch)]
        # A decode step's time: the wall time of the batch with `decode_tokens` new tokens less that with one
        # (the same prefill steps), over the steps between. Long prompts prefill over several steps while the
        # first sequences already decode, so a sequence's own time between tokens would count prefill too.
        walls = {1: float("inf"), FLAGS.decode_tokens: float("inf")}
        for attempt in range(FLAGS.repeats + 1):  # the first pass compiles
            for n in walls:
                start = time.perf_counter()
                llm.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True))
                elapsed = time.perf_counter() - start
                walls[n] = elapsed if attempt == 0 else min(walls[n], elapsed)
        best = (walls[FLAGS.decode_tokens] - walls[1]) / (FLAGS.decode_tokens - 1)
        result[f"decode_b{batch}_ms"] = best * 1e3
        result[f"decode_b{batch}_tok_s"] = batch / best
    prompt = list(rng.randint(0, FLAGS.vocab, FLAGS.prefill_len))
    best = float("inf")
    for attempt in range(FLAGS.repeats + 1):
        start = time.perf_counter()
        llm.generate([prompt], SamplingParams(max_tokens=1))
        elapsed = time.perf_counter() - start
        best = elapsed if attempt == 0 else min(best, elapsed)
    result["prefill_ms"] = best * 1e3
    return result


def main(_):
    import jax

    rows = {dtype: _measure(dtype) for dtype in FLAGS.dtypes}
    base = FLAGS.dtypes[0]
    print(f"\nCompute dtype on {jax.default_backend()} ({os.cpu_count()} cores): Llama hidden {FLAGS.hidden}, "
          f"{FLAGS.layers} layers, vocab {FLAGS.vocab}\n")
    print("| measure | " + " | ".join(FLAGS.dtypes) + f" | ratio to {base} |")
    print("|---|" + "---|" * (len(FLAGS.dtypes) + 1))
    for key in rows[base]:
        values = [rows[d][key] for d in FLAGS.dtypes]
        print(f"| {key} | " + " | ".join(f"{v:.2f}" for v in values) + " | " +
              " / ".join(f"{v / values[0]:.2f}x" for v in values[1:]) + " |")
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump(dict(platform=jax.default_backend(), rows=rows), f, indent=1)
    print(f"\nwrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
