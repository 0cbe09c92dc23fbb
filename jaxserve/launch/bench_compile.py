"""Compile cost per step shape and the steps' run time, at `jaxserve serve`'s defaults, for comparing XLA:CPU
options (pass them in XLA_FLAGS) and step-program layouts side by side.

    XLA_FLAGS=--xla_llvm_disable_expensive_passes=true python -m jaxserve.launch.bench_compile \
        --model=/tmp/ckpt_issue14 --out=out/bench_compile.json

Per shape: JAX's own trace, lowering and backend-compile durations (its monitoring events) and the least run
time of `repeats` steps of that shape on dummy inputs (every token writes the sink page; attention over an
empty table, so the run time is the projections, MLP, lm_head and sampler). The persistent cache is off.
"""

from __future__ import annotations

import collections
import json
import os
import time

from absl import app, flags

flags.DEFINE_string("model", "/tmp/ckpt_issue14", "model folder (or 'demo')")
flags.DEFINE_list("shapes", ["d1", "d8", "d32", "m16x8", "m256x32", "d8e", "m256x32e"],
                  "shapes: dS = decode with S slots; mTxS = mixed with T tokens and S slots; suffix e = extended "
                  "sampler")
flags.DEFINE_integer("repeats", 10, "timed runs per shape (least kept)")
flags.DEFINE_integer("max_num_seqs", 32, "as `jaxserve serve`")
flags.DEFINE_integer("max_num_batched_tokens", 256, "as `jaxserve serve`")
flags.DEFINE_integer("max_model_len", 2048, "as `jaxserve serve`")
flags.DEFINE_integer("layers", 0, "> 0: a random-weight model of issue 14's shape with this many layers instead "
                     "of --model (compile cost against depth)")
flags.DEFINE_string("label", "", "a name for this run in the JSON")
flags.DEFINE_string("out", "out/bench_compile.json", "JSON output (appended to a list)")
FLAGS = flags.FLAGS


def parse_shape(text: str, pages: int) -> tuple:
    extended = text.endswith("e")
    text = text.rstrip("e")
    if text[0] == "d":
        s = int(text[1:])
        shape = (True, s, s, pages)
    else:
        t, s = map(int, text[1:].split("x"))
        shape = (False, t, s, pages)
    return shape + (("extended",) if extended else ())


def main(argv):
    del argv
    import jax
    import numpy as np
    from jax._src import monitoring

    from jaxserve.engine.llm import LLM
    from jaxserve.engine.precompile import dummy_inputs

    events: dict[str, float] = collections.defaultdict(float)

    def on_event(name, secs, **kw):
        events[name] += secs

    monitoring.register_event_duration_secs_listener(on_event)
    t0 = time.perf_counter()
    model = FLAGS.model
    if FLAGS.layers:
        from jaxserve.bench.models import issue14_config
        model = issue14_config(num_layers=FLAGS.layers, max_position_embeddings=4096)
    llm = LLM(model=model, max_num_seqs=FLAGS.max_num_seqs, max_num_batched_tokens=FLAGS.max_num_batched_tokens,
              max_model_len=FLAGS.max_model_len, num_pages=512, compilation_cache="off")
    runner = llm.engine.runner
    load_s = time.perf_counter() - t0
    pages = runner.page_buckets()[-1]
    vocab = runner.model_config.vocab_size
    rows = {}
    for name in FLAGS.shapes:
        inputs = dummy_inputs(*parse_shape(name, pages), vocab_size=vocab)
        events.clear()
        t1, c1 = time.perf_counter(), time.process_time()
        jax.block_until_ready(runner.submit(inputs))
        first, first_cpu = time.perf_counter() - t1, time.process_time() - c1
        got = dict(events)
        runs = []
        for _ in range(FLAGS.repeats):
            t1 = time.perf_counter()
            jax.block_until_ready(runner.submit(inputs))
            runs.append(time.perf_counter() - t1)
        rows[name] = dict(first_s=round(first, 3), first_cpu_s=round(first_cpu, 3),
                          trace_s=round(got.get("/jax/core/compile/jaxpr_trace_duration", 0.0), 3),
                          lower_s=round(got.get("/jax/core/compile/jaxpr_to_mlir_module_duration", 0.0), 3),
                          compile_s=round(got.get("/jax/core/compile/backend_compile_duration", 0.0), 3),
                          run_ms=round(1e3 * float(np.min(runs)), 3),
                          run_median_ms=round(1e3 * float(np.median(runs)), 3))
        print(f"{name:10s} " + " ".join(f"{k}={v}" for k, v in rows[name].items()), flush=True)
    result = dict(label=FLAGS.label, xla_flags=os.environ.get("XLA_FLAGS", ""), load=os.getloadavg(),
                  load_s=round(load_s, 2), rows=rows,
                  total_compile_s=round(sum(r["compile_s"] for r in rows.values()), 2),
                  total_first_cpu_s=round(sum(r["first_cpu_s"] for r in rows.values()), 2))
    print(f"total backend compile {result['total_compile_s']} s, first calls {result['total_first_cpu_s']} "
          f"CPU s; load {result['load']}")
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    previous = []
    if os.path.exists(FLAGS.out):
        with open(FLAGS.out) as f:
            previous = json.load(f)
    with open(FLAGS.out, "w") as f:
        json.dump(previous + [result], f, indent=1)


if __name__ == "__main__":
    app.run(main)
