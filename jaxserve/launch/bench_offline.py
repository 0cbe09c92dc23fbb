"""Offline engine benchmark: shared-prefix workload with prefix caching off vs on, and decode throughput
at several batch sizes beside Hugging Face transformers' `generate` on the same weights.

    python -m jaxserve.launch.bench_offline --out=out/bench_offline.json

With --disaggregated it runs the disaggregation benchmark instead (issue 4 §4; one implementation, in
`jaxserve/launch/bench_disagg.py`, whose flags it accepts): KV transfer throughput of each backend against a same-size
memory copy, KV moved per turn in each PD mode, and JCT / TTFT / TPOT of colocated vs disaggregated serving with
and without caching, in one run:

    python -m jaxserve.launch.bench_offline --disaggregated --transfer_pages=32 --repeats=3 --out=out/bench_disagg.json

Prints tables and writes JSON. Timings are ratios within one run; the machine is shared and noisy."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

from absl import app, flags

flags.DEFINE_integer("groups", 4, "shared-prefix groups")
flags.DEFINE_integer("prompts_per_group", 4, "prompts per group")
flags.DEFINE_integer("system_len", 768, "shared system-prompt tokens")
flags.DEFINE_integer("question_len", 32, "per-prompt question tokens")
flags.DEFINE_integer("repeats", 1, "measured rounds of the shared-prefix workload: each round runs caching off and on "
                     "back to back per mode (the order flipped every round), and the summary is the median of the "
                     "rounds' ratios, so load that drifts between settings cancels")
flags.DEFINE_integer("output_len", 8, "new tokens per request in the shared-prefix workload")
flags.DEFINE_integer("layers", 8, "random model layers")
flags.DEFINE_integer("hidden", 512, "random model hidden size")
flags.DEFINE_list("decode_batches", ["1", "8", "32"], "decode throughput batch sizes")
flags.DEFINE_integer("decode_prompt_len", 64, "prompt tokens for the decode benchmark")
flags.DEFINE_integer("decode_tokens", 32, "new tokens per sequence in the decode benchmark")
flags.DEFINE_bool("hf", True, "also time transformers' generate when it is installed")
flags.DEFINE_bool("precompile", True, "compile every step shape before timing (otherwise shapes the warm-up "
                  "did not hit compile inside the timed runs)")
flags.DEFINE_string("out", "out/bench_offline.json", "JSON output")
flags.DEFINE_bool("disaggregated", False, "run the disaggregation benchmark (jaxserve/launch/bench_disagg.py) instead")
FLAGS = flags.FLAGS

from jaxserve.launch import bench_disagg  # noqa: E402  (defines the disaggregation benchmark's own flags)


def make_hf_model(folder, layers, hidden):
    """A random-weight Llama saved as a Hugging Face checkpoint, so both engines load the same weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                      max_position_embeddings=4096, tie_word_embeddings=False, torch_dtype="float32")
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder, safe_serialization=True)
    from jaxserve.tokenizer import ByteTokenizer
    ByteTokenizer(vocab_size=cfg.vocab_size).save(folder)  # prompts are token ids; text only for display
    return model


def workload(rng, groups, per_group, system_len, question_len, vocab):
    prompts = []
    for _ in range(groups):
        system = list(rng.integers(0, vocab, system_len))
        prompts += [system + list(rng.integers(0, vocab, question_len)) for _ in range(per_group)]
    return prompts


def record_steps(llm) -> list[list[int]]:
    """Tokens per entry of every step `llm` schedules from now on (the step log the notes quote)."""
    steps, schedule = [], llm.engine.scheduler.schedule

    def logged():
        batch = schedule()
        if batch.entries:
            steps.append([n for _, n in batch.entries])
        return batch

    llm.engine.scheduler.schedule = logged
    return steps


def run_setting(llm, prompts, params, sequential):
    """sequential: one request at a time (TTFT = its own prefill); else all submitted at once."""
    computed0 = llm.stats()["num_prefill_tokens_computed"]
    t0 = time.perf_counter()
    outs = [llm.generate([p], params)[0] for p in prompts] if sequential else llm.generate(prompts, params)
    wall = time.perf_counter() - t0
    return dict(
        prefill_tokens_computed=llm.stats()["num_prefill_tokens_computed"] - computed0,
        ttft_mean_s=statistics.mean(o.ttft_s for o in outs),
        ttft_p50_s=statistics.median(o.ttft_s for o in outs),
        jct_mean_s=statistics.mean(o.e2e_s for o in outs),
        throughput_tok_s=sum(o.num_prompt_tokens + len(o.token_ids) for o in outs) / wall,
        hit_rate=sum(o.num_cached_tokens for o in outs) / sum(o.num_prompt_tokens for o in outs),
        wall_s=wall), [o.token_ids for o in outs]


def main(argv):
    if FLAGS.disaggregated:
        bench_disagg.main(argv)
        return
    del argv
    import numpy as np
    from jaxserve import LLM, SamplingParams

    results = dict(machine=os.uname().nodename, cpus=os.cpu_count())
    with tempfile.TemporaryDirectory() as folder:
        hf_model = make_hf_model(folder, FLAGS.layers, FLAGS.hidden)
        rng = np.random.default_rng(0)
        prompts = workload(rng, FLAGS.groups, FLAGS.prompts_per_group, FLAGS.system_len, FLAGS.question_len, 32000)
        warm = workload(np.random.default_rng(1), 1, 2, FLAGS.system_len, FLAGS.question_len, 32000)
        params = SamplingParams(max_tokens=FLAGS.output_len)
        rounds, tokens = [], {}
        for r in range(FLAGS.repeats):
            rows = {}
            for sequential in (True, False):
                for caching in ((False, True) if r % 2 == 0 else (True, False)):
                    # A fresh engine per setting (so no setting sees another's cache); the jitted step is shared
                    # per model, so only the first one compiles.
                    llm = LLM(model=folder, enable_prefix_caching=caching, num_pages=1024,
                              max_num_batched_tokens=512, max_num_seqs=32, page_size=16)
                    if FLAGS.precompile:  # every bucket, once per model (later engines share the jitted step)
                        from jaxserve.engine.precompile import precompile
                        precompile(llm.engine)
                    run_setting(llm, warm, params, sequential)  # compile the shapes this mode uses
                    name = f"{'on' if caching else 'off'}/{'sequential' if sequential else 'batched'}"
                    steps = record_steps(llm)
                    rows[name], out = run_setting(llm, prompts, params, sequential)
                    rows[name]["steps"] = len(steps)
                    if name == "on/batched":
                        step_log = steps
                    assert tokens.setdefault(sequential, out) == out, "caching changed greedy output"
                    del llm
            rounds.append(rows)
        # Ideal TTFT ratio: prefill tokens the engine computed without vs with caching in the same mode.
        summary = {}
        for mode in ("sequential", "batched"):
            per_round = [dict(ideal=rows[f"off/{mode}"]["prefill_tokens_computed"]
                              / rows[f"on/{mode}"]["prefill_tokens_computed"],
                              ttft=rows[f"off/{mode}"]["ttft_mean_s"] / rows[f"on/{mode}"]["ttft_mean_s"],
                              jct=rows[f"off/{mode}"]["jct_mean_s"] / rows[f"on/{mode}"]["jct_mean_s"],
                              tput=rows[f"on/{mode}"]["throughput_tok_s"] / rows[f"off/{mode}"]["throughput_tok_s"])
                         for rows in rounds]
            ideal = per_round[0]["ideal"]
            measured = statistics.median(x["ttft"] for x in per_round)
            summary[mode] = dict(ttft_ratio_off_on=measured, ideal_ratio=ideal, fraction_of_ideal=measured / ideal,
                                 fraction_of_ideal_per_round=[x["ttft"] / x["ideal"] for x in per_round],
                                 jct_ratio_off_on=statistics.median(x["jct"] for x in per_round),
                                 throughput_ratio_on_off=statistics.median(x["tput"] for x in per_round))
        rows = {name: {k: statistics.median(rows[name][k] for rows in rounds) for k in rounds[0][name]}
                for name in sorted(rounds[0], key=lambda n: (n.startswith("on"), n))}
        results["on_batched_step_log"] = step_log  # the last round's: tokens per entry of each step
        results["shared_prefix"] = dict(rows=rows, rounds=rounds, summary=summary, config=dict(
            groups=FLAGS.groups, prompts_per_group=FLAGS.prompts_per_group, system_len=FLAGS.system_len,
            question_len=FLAGS.question_len, output_len=FLAGS.output_len, layers=FLAGS.layers,
            hidden=FLAGS.hidden, repeats=FLAGS.repeats))
        print(f"\nShared-prefix workload ({FLAGS.groups} groups x {FLAGS.prompts_per_group}, system "
              f"{FLAGS.system_len} + question {FLAGS.question_len} tokens; Llama {FLAGS.layers}L/{FLAGS.hidden}H "
              f"random weights, f32; median of {FLAGS.repeats} round(s))")
        print(f"{'setting':22s} {'TTFT mean ms':>13s} {'TTFT p50 ms':>12s} {'JCT mean ms':>12s} "
              f"{'tok/s':>8s} {'hit rate':>9s} {'prefill computed':>17s}")
        for name, r in rows.items():
            print(f"{name:22s} {r['ttft_mean_s'] * 1e3:13.1f} {r['ttft_p50_s'] * 1e3:12.1f} "
                  f"{r['jct_mean_s'] * 1e3:12.1f} {r['throughput_tok_s']:8.0f} {r['hit_rate']:9.1%} "
                  f"{int(r['prefill_tokens_computed']):17d}")
        print("on/batched, the last round's first steps (tokens per entry; decodes are 1s):")
        for step in step_log[:8]:
            print("  ", step)
        for mode, s in summary.items():
            print(f"{mode}: TTFT off/on {s['ttft_ratio_off_on']:.2f}x, ideal {s['ideal_ratio']:.2f}x "
                  f"({s['fraction_of_ideal']:.0%} of ideal; rounds "
                  f"{', '.join(f'{x:.0%}' for x in s['fraction_of_ideal_per_round'])}); "
                  f"JCT off/on {s['jct_ratio_off_on']:.2f}x; "
                  f"throughput on/off {s['throughput_ratio_on_off']:.2f}x")

        results["decode"] = decode_bench(folder, hf_model)
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {FLAGS.out}")


def decode_bench(folder, hf_model):
    import numpy as np
    from jaxserve import LLM, SamplingParams
    batches = [int(b) for b in FLAGS.decode_batches]
    llm = LLM(model=folder, enable_prefix_caching=False, num_pages=1024, max_num_seqs=max(batches),
              max_num_batched_tokens=max(512, max(batches)), page_size=16)
    rng = np.random.default_rng(2)
    params = SamplingParams(max_tokens=FLAGS.decode_tokens, ignore_eos=True)
    rows = []
    print(f"\nDecode throughput (prompt {FLAGS.decode_prompt_len}, {FLAGS.decode_tokens} new tokens, greedy)")
    print(f"{'batch':>5s} {'jaxserve tok/s':>15s} {'transformers tok/s':>19s} {'ratio':>6s}")
    for b in batches:
        prompts = [list(rng.integers(0, 32000, FLAGS.decode_prompt_len)) for _ in range(b)]
        llm.generate(prompts, params)  # compile
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        dt = time.perf_counter() - t0
        ours = b * FLAGS.decode_tokens / dt
        theirs = hf_generate(hf_model, prompts, FLAGS.decode_tokens) if FLAGS.hf else None
        same = None
        if theirs is not None:
            theirs, hf_tokens = theirs
            same = sum(o.token_ids == h for o, h in zip(outs, hf_tokens)) / b
        rows.append(dict(batch=b, jaxserve_tok_s=ours, transformers_tok_s=theirs, greedy_agreement=same))
        ratio = f"{ours / theirs:6.2f}" if theirs else "   n/a"
        print(f"{b:5d} {ours:15.1f} {theirs or float('nan'):19.1f} {ratio}  (same greedy tokens: {same})")
    return rows


def hf_generate(model, prompts, n):
    try:
        import torch
    except ImportError:
        return None
    x = torch.tensor(prompts)
    with torch.no_grad():
        model.generate(x[:, :8], max_new_tokens=2, do_sample=False)
        t0 = time.perf_counter()
        y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False)
        dt = time.perf_counter() - t0
    return len(prompts) * n / dt, [row[len(prompts[0]):].tolist() for row in y]


if __name__ == "__main__":
    app.run(main)
