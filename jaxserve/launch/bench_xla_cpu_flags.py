"""XLA:CPU's library options (oneDNN, XNNPACK, YNNPACK, vector width) side by side on the shapes this project
serves on CPU: the projection dot in f32 and bf16-in/f32-out, the gated MLP of a 768-row prefill with bf16
weights, one layer of prefill attention, and whole engine steps (a 544-token prefill and a batch-8 decode of
issue 14's model with bf16 weights under f32 arithmetic, the CPU default for a bf16 checkpoint).

    python -m jaxserve.launch.bench_xla_cpu_flags --out=out/bench_xla_cpu_flags.json

XLA_FLAGS are read once per process, so each setting runs in a child process; settings alternate over
`--rounds` (A B C ... A B C) and each figure is the least over rounds of the least of `--repeats` calls.
Prints a table (ms, and the ratio to the first setting) and writes JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import app, flags

from jaxserve.bench.timing import least_seconds

DEFAULT_SETTINGS = [
    "",
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_experimental_onednn_custom_call=true",
    "--xla_cpu_experimental_onednn_fusion_type=dot",
    "--xla_cpu_use_xnnpack=true",
    "--xla_cpu_experimental_xnn_fusion_type=dot",
    "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "--xla_cpu_experimental_ynn_fusion_type=dot",
    "--xla_cpu_prefer_vector_width=512",
]
flags.DEFINE_list("settings", None, "XLA_FLAGS values to compare, ';'-separated flags within one ('' = none); "
                  "default: none, then each library option alone")
flags.DEFINE_integer("rounds", 3, "alternations of every setting")
flags.DEFINE_integer("repeats", 10, "timed calls per figure in a child (least kept)")
flags.DEFINE_string("out", "out/bench_xla_cpu_flags.json", "JSON output")
flags.DEFINE_bool("child", False, "internal: time the shapes under this process's XLA_FLAGS, print JSON")
FLAGS = flags.FLAGS


def _ms(fn, *args) -> float:
    return least_seconds(fn, *args, repeats=FLAGS.repeats) * 1e3


def measure() -> dict[str, float]:
    """Milliseconds per shape under this process's XLA_FLAGS."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxserve.bench.models import issue14_config
    from jaxserve.engine.model_runner import standalone_step
    from jaxserve.engine.sampling import sampling_arrays
    from jaxserve.kernels import xla_attention
    from jaxserve.model import AttentionBatch, make_attention_batch
    from jaxserve.model.decoder import abstract_params, init_params, kv_cache_shape

    bf = jnp.bfloat16
    out = {}
    a, b = jnp.ones((544, 256)), jnp.full((256, 1024), 0.01)
    out["dot 544x256x1024 f32"] = _ms(jax.jit(lambda x, y: x @ y), a, b)
    out["dot 544x256x1024 bf16->f32"] = _ms(jax.jit(
        lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32)), a.astype(bf), b.astype(bf))
    x, w = jnp.ones((768, 256)), [jnp.full(s, 0.01, bf) for s in ((256, 1024), (256, 1024), (1024, 256))]

    def mlp(x, g, u, d):
        dot = lambda p, q: jnp.dot(p.astype(bf), q, preferred_element_type=jnp.float32)  # noqa: E731
        return dot(jax.nn.silu(dot(x, g)) * dot(x, u), d)
    out["MLP 768 rows, bf16 weights"] = _ms(jax.jit(mlp), x, *w)

    page = 16
    cfg = issue14_config()
    f32_cfg = dataclasses.replace(cfg, weight_dtype=None)
    params = jax.tree.map(lambda p, want: p.astype(want.dtype), init_params(f32_cfg, jax.random.PRNGKey(0)),
                          abstract_params(cfg))
    step = standalone_step(cfg, "reference")
    # The step donates its cache: each call's output cache is the next call's input.
    cache = [jnp.zeros(kv_cache_shape(cfg, 80, page), jnp.float32)]
    sampling = sampling_arrays([], [], [], 8)

    def timed_step(q_lens, kv_lens, num_tokens, decode_only):
        tables, first = [], 1
        for n in kv_lens:
            tables.append(list(range(first, first + -(-n // page))))
            first += len(tables[-1])
        batch, positions = make_attention_batch(q_lens, kv_lens, tables, page_size=page, num_tokens=num_tokens,
                                                max_seqs=8, pages_per_seq=128)
        ids = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, num_tokens), jnp.int32)
        rows = np.zeros(8, np.int32)
        rows[:len(q_lens)] = np.cumsum(q_lens) - 1
        batch = AttentionBatch(*map(jnp.asarray, batch))
        positions, rows = jnp.asarray(positions), jnp.asarray(rows)

        def run():
            sampled, cache[0] = step(params, cache[0], ids, positions, batch, rows, sampling, decode_only=decode_only)
            return sampled
        return _ms(run), batch

    out["prefill step 512 tokens"], batch = timed_step([512], [512], 512, False)
    q = jnp.ones((512, 2, 128))
    out["prefill attention, 1 layer, 512"] = _ms(jax.jit(lambda q, kv: xla_attention.ragged_paged_attention_xla(
        q, kv, batch.kv_lens, batch.page_indices, batch.cu_q_lens, batch.num_seqs, sm_scale=0.1, layer=0)),
        q, cache[0])
    out["decode step b8, context 64"], _ = timed_step([1] * 8, [64] * 8, 8, True)
    return out


def main(_):
    if FLAGS.child:
        print(json.dumps(measure()))
        return
    settings = [s.replace(";", " ") for s in (FLAGS.settings if FLAGS.settings is not None else DEFAULT_SETTINGS)]
    runs: dict[str, list[dict]] = {s: [] for s in settings}
    for r in range(FLAGS.rounds):
        for s in settings:
            env = dict(os.environ, XLA_FLAGS=s)
            proc = subprocess.run([sys.executable, "-m", "jaxserve.launch.bench_xla_cpu_flags", "--child",
                                   f"--repeats={FLAGS.repeats}"], env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"XLA_FLAGS={s!r} failed:\n{proc.stderr[-2000:]}")
            runs[s].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"round {r} {s or '(none)'}: done", flush=True)
    best = {s: {k: min(run[k] for run in rs) for k in rs[0]} for s, rs in runs.items()}
    base = best[settings[0]]
    print(f"\nXLA:CPU options, {os.cpu_count()} cores; ms (least of {FLAGS.rounds} rounds x {FLAGS.repeats} calls); "
          f"x = ratio to '{settings[0] or '(none)'}' (< 1 is faster)\n")
    print("| XLA_FLAGS | " + " | ".join(base) + " |")
    print("|---" * (len(base) + 1) + "|")
    for s in settings:
        cells = [f"{best[s][k]:.3f} ({best[s][k] / base[k]:.2f}x)" for k in base]
        print(f"| {s or '(none)'} | " + " | ".join(cells) + " |")
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump(dict(cores=os.cpu_count(), rounds=FLAGS.rounds, repeats=FLAGS.repeats, best_ms=best, runs=runs), f,
                  indent=1)
    print(f"\nwrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
