"""Offline time to first token of one request, with the padding cut on and off and with the machine idle or
busy just before: a fresh prompt (544 tokens: one 768-row step uncut, 512 + 32 cut) and a cached one (512
cached + 32 new) and a burst of them (`--burst` prompts sharing one cached prefix, submitted together: one
step), `LLM.generate(max_tokens=1)` on issue 14's model shape (random weights, bf16 matmul weights
under f32 arithmetic: the CPU default for a bf16 checkpoint), every step shape compiled first.

    python -m jaxserve.launch.bench_prefill_ttft --model=/tmp/ckpt_issue14 --out=out/bench_prefill_ttft.json

`--gaps_s` are idle seconds before each timed request (0: right after the previous one); `--idle_work` is what
runs during a gap, every 10 ms: nothing (`sleep`), a 3-token request (`decode`), a jitted sum over every
parameter (`weights`), a 1024x1024 f32 matmul (`matmul`). On this project's CPU boxes a 544-token prefill after
1 s idle takes ~1.5x its back-to-back time, and none of those restores it (docs/notes-issue-14.md, session 15):

    python -m jaxserve.launch.bench_prefill_ttft --model=/tmp/ckpt_issue14 --kinds=fresh --cut=on \
        --gaps_s=0,1 --idle_work=sleep,decode,weights,matmul --repeats=12

Settings alternate within each repeat. Prints a table (median and least ms) and writes JSON."""

from __future__ import annotations

import json
import os
import statistics
import time

from absl import app, flags

flags.DEFINE_string("model", None, "Hugging Face folder to load (e.g. bench_serve --make_checkpoint's); default: "
                    "random weights of issue 14's shape")
flags.DEFINE_integer("fresh_len", 544, "tokens of the fresh prompt")
flags.DEFINE_integer("prefix_len", 512, "cached tokens of the cached prompt")
flags.DEFINE_integer("suffix_len", 32, "new tokens of the cached prompt")
flags.DEFINE_integer("burst", 8, "prompts of the burst (each prefix_len cached + suffix_len new)")
flags.DEFINE_list("kinds", ["fresh", "cached", "burst"], "which prompts to time")
flags.DEFINE_list("gaps_s", ["0", "0.5"], "idle seconds before each timed request")
flags.DEFINE_list("idle_work", ["sleep"], "what runs every 10 ms during a gap: sleep | decode | weights | matmul")
flags.DEFINE_list("cut", ["on", "off"], "padding cut settings to time: on | off")
flags.DEFINE_integer("repeats", 10, "timed requests per setting")
flags.DEFINE_integer("max_num_batched_tokens", 1024, "token budget per step")
flags.DEFINE_string("out", "out/bench_prefill_ttft.json", "JSON output")
FLAGS = flags.FLAGS


def _prompts(rng, kind: str, vocab: int) -> tuple[list[list[int]], list[list[int]]]:
    """(untimed, timed) prompts of one measurement. The untimed request is of the same kind (for a cached
    prompt or a burst: one that caches their prefix), so "gap 0" is back to back with the same work."""
    def tokens(n):
        return rng.randint(3, vocab, n).tolist()
    if kind == "fresh":
        return [tokens(FLAGS.fresh_len)], [tokens(FLAGS.fresh_len)]
    prefix = tokens(FLAGS.prefix_len)
    timed = [prefix + tokens(FLAGS.suffix_len) for _ in range(FLAGS.burst if kind == "burst" else 1)]
    return [prefix + tokens(FLAGS.suffix_len)], timed


IDLE_WORK = ("sleep", "decode", "weights", "matmul")
TICK_S = 0.01


def _idle_ticks(llm) -> dict:
    """What `--idle_work` runs during a gap, one call per tick (None: sleep through the gap)."""
    import jax
    import jax.numpy as jnp

    from jaxserve.engine.sampling import SamplingParams
    params = llm.engine.runner.params
    weights = jax.jit(lambda p: sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree_util.tree_leaves(p)))
    x = jnp.ones((1024, 1024), jnp.float32)
    matmul = jax.jit(lambda a: (a @ a).sum())
    one = SamplingParams(max_tokens=1)
    ticks = {"sleep": None, "decode": lambda: llm.generate([[5, 6, 7]], one),
             "weights": lambda: weights(params).block_until_ready(),
             "matmul": lambda: matmul(x).block_until_ready()}
    for tick in ticks.values():  # compiled outside the timed gaps
        if tick is not None:
            tick()
    return ticks


def _idle(gap: float, tick) -> None:
    end = time.perf_counter() + gap
    if tick is None:
        time.sleep(gap)
        return
    while time.perf_counter() < end:
        tick()
        time.sleep(TICK_S)


def main(_):
    import numpy as np

    from jaxserve.bench.models import issue14_config
    from jaxserve.engine.llm import LLM
    from jaxserve.engine.precompile import precompile
    from jaxserve.engine.sampling import SamplingParams

    cfg = issue14_config()
    model = FLAGS.model or cfg
    for name, allowed, given in (("idle_work", IDLE_WORK, FLAGS.idle_work), ("cut", ("on", "off"), FLAGS.cut)):
        if not given or set(given) - set(allowed):
            raise app.UsageError(f"--{name} takes some of {', '.join(allowed)}; got {','.join(given)!r}")
    llms = {cut: LLM(model=model, max_num_batched_tokens=FLAGS.max_num_batched_tokens,
                     num_pages=1024, max_model_len=2048, cut_padding=cut == "on") for cut in FLAGS.cut}
    for llm in llms.values():
        precompile(llm.engine)
    ticks = {cut: _idle_ticks(llm) for cut, llm in llms.items()}
    rng = np.random.RandomState(0)
    one = SamplingParams(max_tokens=1)
    gaps = [float(g) for g in FLAGS.gaps_s]
    times: dict[str, list[float]] = {}
    for _ in range(FLAGS.repeats):
        for gap in gaps:
            for work in (FLAGS.idle_work if gap else FLAGS.idle_work[:1]):  # no gap: nothing runs in it
                for cut, llm in llms.items():
                    for kind in FLAGS.kinds:
                        untimed, prompts = _prompts(rng, kind, cfg.vocab_size)
                        llm.generate(untimed, one)
                        _idle(gap, ticks[cut][work])
                        start = time.perf_counter()
                        llm.generate(prompts, one)
                        key = f"{kind} | gap {gap:g} s, {work if gap else 'none'} | cut {cut}"
                        times.setdefault(key, []).append((time.perf_counter() - start) * 1e3)
    print(f"\nOffline TTFT (max_tokens=1), issue 14's shape, {os.cpu_count()} cores, {FLAGS.repeats} requests each\n")
    print("| prompt | idle before, work in it | padding cut | median ms | least ms |")
    print("|---|---|---|---|---|")
    for key, ms in times.items():
        print(f"| {key} | {statistics.median(ms):.1f} | {min(ms):.1f} |")
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump(dict(cores=os.cpu_count(), fresh_len=FLAGS.fresh_len, prefix_len=FLAGS.prefix_len,
                       suffix_len=FLAGS.suffix_len, burst=FLAGS.burst, ms=times), f, indent=1)
    print(f"\nwrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
