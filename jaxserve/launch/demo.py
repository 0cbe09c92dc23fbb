"""`make demo`: a multi-turn chat-like workload through the offline API on the embedded demo model.

Prints each completion and a per-turn table of prompt tokens, cached tokens and TTFT."""

from __future__ import annotations

import time

from absl import app, flags

from jaxserve.launch.chat_script import SYSTEM, TURNS, USERS

flags.DEFINE_string("model", "demo", "model: 'demo', a Hugging Face folder or an Orbax folder")
flags.DEFINE_integer("sessions", 3, "concurrent chat sessions")
flags.DEFINE_integer("turns", 3, "turns per session")
flags.DEFINE_integer("max_tokens", 28, "new tokens per turn")
flags.DEFINE_bool("prefix_caching", True, "reuse cached prefixes across turns")
flags.DEFINE_float("temperature", 0.7, "sampling temperature (0 = greedy)")
flags.DEFINE_bool("warmup", True, "replay the script once first under other session headers (no shared "
                  "prefix) so the timed run's TTFT shows prefill, not compilation")
FLAGS = flags.FLAGS



def main(argv):
    del argv
    from jaxserve import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=FLAGS.model, enable_prefix_caching=FLAGS.prefix_caching, num_pages=256,
              max_num_batched_tokens=256)
    print(f"loaded {FLAGS.model!r} in {time.perf_counter() - t0:.1f}s")
    # Seeded sampling: reproducible, and a small byte-level model reads better sampled than greedy (greedy
    # falls into loops).
    params = [SamplingParams(max_tokens=FLAGS.max_tokens, temperature=FLAGS.temperature, top_p=0.95, seed=s,
                             stop=("\n\n\n",)) for s in range(FLAGS.sessions)]
    if FLAGS.warmup:
        t0 = time.perf_counter()
        chat(llm, params, header="# warm-up\n", show=False)
        print(f"compile warm-up (same shapes, different prefixes): {time.perf_counter() - t0:.1f}s")
    rows = chat(llm, params, header="", show=True)
    print("\nsession turn  prompt_tokens  cached_tokens  ttft_ms")
    for s, turn, n, c, ttft in rows:
        print(f"{s:7d} {turn:4d} {n:14d} {c:14d} {ttft:8.1f}")
    total = sum(r[2] for r in rows)
    cached = sum(r[3] for r in rows)
    print(f"\nprefix cache hit rate: {cached / total:.1%} of {total} prompt tokens; engine stats: "
          f"{ {k: v for k, v in llm.stats().items() if k in ('num_compilations', 'num_preemptions')} }")


def chat(llm, params, header: str, show: bool) -> list[tuple]:
    histories = [header + USERS[i % len(USERS)] + SYSTEM for i in range(FLAGS.sessions)]
    rows = []
    for turn in range(FLAGS.turns):
        prompts = [h + TURNS[turn % len(TURNS)] for h in histories]
        outs = llm.generate(prompts, params)
        for s, (prompt, out) in enumerate(zip(prompts, outs)):
            if show:
                print(f"\n=== session {s} turn {turn} ===\n{TURNS[turn % len(TURNS)]}\033[1m{out.text}\033[0m")
            histories[s] = prompt + out.text + "\n\n"
            rows.append((s, turn, out.num_prompt_tokens, out.num_cached_tokens, out.ttft_s * 1e3))
    return rows


if __name__ == "__main__":
    app.run(main)
