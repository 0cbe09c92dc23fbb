"""The cluster simulator's commands.

    # MemServe's table: workloads x settings x policies at 8..64 instances, H200-class preset
    python -m jaxserve.launch.sim --mode=table --instances=8,16,32,64 --sim_out=out/sim_table

    # calibrate the step model from the real engine (offline LLM API, this machine), pinned to one core as the
    # instances are; writes the JSON and its samples (.samples.json); --mode=refit fits them again (no timing)
    taskset -c 0 python -m jaxserve.launch.sim --mode=calibrate --calibration=out/sim_calib_demo.json

    # one simulated run (cost: a preset name or a calibration JSON)
    python -m jaxserve.launch.sim --mode=run --cost=h200 --workload=react --setting=pd+cache --sim_policy=locality

    # validation: the same workload, seed, rate and setting for real (jaxserve.launch.local, 2 instances each pinned to
    # its own core, after a shape-twin warm-up) and simulated; PASS when mean TTFT and JCT are within
    # --tolerance (15%). --real_records=FILE compares with an earlier real run instead (e.g. a jaxserve.launch.bench
    # run's <setting>.jsonl with the same workload, seed and rate).
    python -m jaxserve.launch.sim --mode=validate --cost=out/sim_calib_demo.json --workload=multi_turn --rate=1 \
        --setting=pd+cache --sim_out=out/sim_validate

    # Issue 18: the Mooncake trace through the cluster KV pool variants (locality with and without host tiers and
    # peer fetch, kv_pool, least_load, round_robin) vs the trace's infinite-cache ideal, colocated and pd
    python -m jaxserve.launch.sim --mode=trace --cost=h200 --instances=8,16 --pd_prefill_fraction=0.75 \
        --sim_out=out/sim_trace

    # MemServe's table where queueing matters (pd clusters split per workload)
    python -m jaxserve.launch.sim --mode=table --instances=8,16,32,64 --sessions_per_instance=24 --load=1.0 \
        --pd_prefill_fraction=sharegpt:0.125,loogle:0.5,react:0.5 --sim_out=out/sim_table

The `table` mode prints avg/p99 JCT and TTFT, hit rate and KV moved per (workload, setting, policy,
instances) and the paper-style reductions (PD+caching vs PD, caching vs none, locality vs session)."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path

from absl import app, flags

from jaxserve.bench import report, workloads
from jaxserve.sim.cluster import SETTINGS, SIM_POLICIES, SimConfig, Simulator
from jaxserve.sim.cost import ClusterCost, LinearStep, load_cost
from jaxserve.launch import bench  # noqa: F401  (its flags: --workload, --workload_args, --rate, --seed; jaxserve.launch.local's)

flags.DEFINE_enum("mode", "table", ["table", "sweep", "calibrate", "refit", "fit_overheads", "validate", "run",
                                    "trace"], "what to do")
flags.DEFINE_integer("trace_requests", 2000, "trace: requests of the Mooncake trace to replay (from the start)")
flags.DEFINE_float("trace_time_scale", 1.0, "trace: arrival speed-up (2 = twice as fast)")
flags.DEFINE_list("trace_settings", ["colocated+cache", "pd+cache"], "trace: settings")
flags.DEFINE_list("trace_variants", None, "trace: variants (labels of jaxserve.sim.replay.VARIANTS; default all)")
flags.DEFINE_bool("host_tier", False, "run: host tiers of the cost's host_kv_pages")
flags.DEFINE_bool("peer_fetch", True, "run: kv_pool pulls prefixes from peers")
flags.DEFINE_integer("node_size", None, "override the cost's instances per node (per-pair links)")
flags.DEFINE_list("miss_weights", ["0", "1", "3", "10"], "sweep: locality MISS_WEIGHT values to compare")
flags.DEFINE_string("colocated_records", None, "fit_overheads: a real colocated run's records (jaxserve.launch.bench "
                    "colocated.jsonl, same workload, seed and rate)")
flags.DEFINE_string("pd_records", None, "fit_overheads: a real pd run's records (jaxserve.launch.bench pd.jsonl)")
flags.DEFINE_string("sim_out", "out/sim", "output folder")
flags.DEFINE_string("cost", "h200", "cost model: a preset (h200) or a calibration JSON")
flags.DEFINE_string("calibration", "out/sim_calib_demo.json", "calibrate: where to write the JSON")
flags.DEFINE_string("setting", "colocated+cache", f"run/validate: one of {SETTINGS}")
flags.DEFINE_string("sim_policy", "locality", f"run/validate: one of {SIM_POLICIES}")
flags.DEFINE_list("instances", ["8", "16", "32", "64"], "table: cluster sizes")
flags.DEFINE_list("table_workloads", ["sharegpt", "loogle", "react"], "table: workloads")
flags.DEFINE_list("table_settings", list(SETTINGS), "table: settings")
flags.DEFINE_list("table_policies", ["locality", "least_load", "session", "session_ll"], "table: policies")
flags.DEFINE_float("load", 0.7, "table: offered load as a fraction of the estimated cluster capacity")
flags.DEFINE_integer("sessions_per_instance", 12, "table: sessions (LooGLE: questions) per instance")
flags.DEFINE_float("rpc_overhead_s", None, "override the cost model's client/scheduler overhead")
flags.DEFINE_float("step_overhead_s", None, "override the cost model's per-step serving overhead")
flags.DEFINE_float("tolerance", 0.15, "validate: allowed relative error of mean TTFT and JCT")
flags.DEFINE_string("real_records", None, "validate: compare with this real run's records (JSON lines, e.g. a "
                    "previous validate's real.jsonl or a jaxserve.launch.bench run of the same workload, seed, rate and "
                    "setting) instead of running the real cluster again")
flags.DEFINE_string("pd_prefill_fraction", "0.5", "table: prefill share of the pd clusters' instances (at least "
                    "one of each): a number, or workload:number pairs (sharegpt:0.125,loogle:0.5)")
FLAGS = flags.FLAGS


# --------------------------------------------------------------------------------------------- calibrate
def _chunk_features(prompt_len: int, cached: int, budget: int) -> list[float]:
    """Summed step features of prefilling one prompt alone in chunks of `budget` (sampling its first
    token included)."""
    total = [0.0] * 6
    done = cached
    while True:
        n = min(budget, prompt_len - done)
        f = LinearStep.features(n, n * (2 * done + n + 1) / 2, 0, 0, 1)
        total = [a + b for a, b in zip(total, f)]
        done += n
        if done >= prompt_len:
            return total


def calibrate(path: str, repeats: int = 3) -> ClusterCost:
    """Time the demo model's engine (offline LLM API, the instances' settings) and fit the step model."""
    import random
    from jaxserve import LLM, SamplingParams
    page, pages, budget, seqs = 16, 512, 256, 32
    llm = LLM("demo", page_size=page, num_pages=pages, max_num_batched_tokens=budget, max_num_seqs=seqs)
    rng = random.Random(0)

    def fresh(n):
        return [rng.randrange(256) for _ in range(n)]

    samples = []
    secs = []
    one = SamplingParams(max_tokens=1, ignore_eos=True)
    for n in (32, 128, 256, 512, 896):
        for frac in (0.0, 0.5, 0.875):
            c = int(n * frac) // page * page
            times = []
            for rep in range(repeats + 1):
                base = fresh(n)
                if c:
                    llm.generate([base], SamplingParams(max_tokens=2, ignore_eos=True))  # cache base
                out = llm.generate([base[:c] + fresh(n - c)], one)[0]
                if rep:  # the first is a warm-up (compilation)
                    times.append(out.ttft_s)
            cached = out.num_cached_tokens
            secs.append(statistics.median(times))
            samples.append(dict(kind="prefill", prompt_len=n, cached_len=cached, seconds=secs[-1]))
            print(f"prefill n={n} cached={cached}: {secs[-1] * 1e3:.2f} ms", flush=True)
    steps = 24
    for b in (1, 4, 8, 16, 32):
        for plen in (32, 256, 640):
            if b * (plen + steps) > (pages - 8) * page:
                continue
            vals = []
            for rep in range(repeats + 1):
                outs = llm.generate([fresh(plen) for _ in range(b)], SamplingParams(max_tokens=steps, ignore_eos=True))
                t_first = max(o.ttft_s for o in outs)  # all arrive together: after this, decode-only steps
                t_end = max(o.e2e_s for o in outs)
                if rep:
                    vals.append((t_end - t_first) / (steps - 1))
            step_s = statistics.median(vals)
            secs.append(step_s)
            samples.append(dict(kind="decode", batch=b, prompt_len=plen, step_s=step_s))
            print(f"decode b={b} prompt={plen}: {step_s * 1e3:.2f} ms/step", flush=True)
    step, err = fit_samples(samples, budget, steps)
    kv_bytes = 2 * 4 * 2 * 64 * 4  # demo: 4 layers x 2 kv heads x 64 dims x K,V x f32
    # Serving overheads the offline engine does not see, fitted on a real jaxserve.launch.bench run on this machine
    # (out/bench_pd6: colocated+cache for the per-step and per-request overheads, pd for the transfer latency):
    # 0.8 ms per engine step (streaming over gRPC from the instance's one core), 5.6 ms per request (client ->
    # scheduler -> instance and back), 10 ms per KV transfer (Prepare/Commit RPCs + the transfer backend).
    cost = ClusterCost(step=step, kv_bytes_per_token=kv_bytes, transfer_bytes_s=0.47e9, transfer_latency_s=10e-3,
                       page_size=page, kv_pages=pages - 1, max_num_batched_tokens=budget, max_num_seqs=seqs,
                       rpc_overhead_s=5.6e-3, step_overhead_s=0.8e-3, name="demo-cpu-calibrated")
    cost.save(path)
    Path(path).with_suffix(".samples.json").write_text(json.dumps(dict(samples=samples, fit_rel_err=err), indent=1))
    print(f"fit: {step}; relative error mean {statistics.mean(err):.1%}, max {max(err):.1%}; wrote {path}")
    return cost


def fit_samples(samples: list[dict], budget: int = 256, steps: int = 24, relative: bool = True):
    """The step model from calibration samples (prefill: prompt_len, cached_len, seconds; decode: batch,
    prompt_len, step_s over `steps` decode steps), fitted for relative error; returns (step, errors)."""
    rows, secs = [], []
    for smp in samples:
        if smp["kind"] == "prefill":
            rows.append(_chunk_features(smp["prompt_len"], smp["cached_len"], budget))
            secs.append(smp["seconds"])
        else:
            b = smp["batch"]
            rows.append(LinearStep.features(0, 0, b, b * (smp["prompt_len"] + steps / 2)))
            secs.append(smp["step_s"])
    step = LinearStep.fit(rows, secs, relative=relative)
    coefs = [step.fixed_s, step.per_token_s, step.attn_s, step.per_seq_s, step.ctx_s, step.chunk_s]
    err = [abs(sum(a * c for a, c in zip(r, coefs)) - t) / t for r, t in zip(rows, secs)]
    return step, err


def refit(path: str, relative: bool = True) -> ClusterCost:
    """Fit the step model again from a calibration's saved samples (no timing); rewrites the JSON."""
    cost = ClusterCost.load(path)
    data = json.loads(Path(path).with_suffix(".samples.json").read_text())
    step, err = fit_samples(data["samples"], cost.max_num_batched_tokens, relative=relative)
    import dataclasses
    cost = dataclasses.replace(cost, step=step)
    cost.save(path)
    print(f"refit ({'relative' if relative else 'absolute'} error): {step}; relative error mean "
          f"{statistics.mean(err):.1%}, max {max(err):.1%}; wrote {path}")
    return cost


# -------------------------------------------------------------------------------------------------- table
PAPER = {  # MemServe (arXiv 2406.17565) summary figures: change of the metric
    ("sharegpt", "jct", "p99", "pd+cache vs pd"): -0.29,
    ("loogle", "jct", "mean", "pd+cache vs pd"): -0.269,
    ("react", "jct", "mean", "pd+cache vs pd"): -0.267,
    ("sharegpt", "ttft", "mean", "pd+cache vs pd"): -0.58,
    ("loogle", "ttft", "mean", "pd+cache vs pd"): -0.56,
    ("react", "ttft", "mean", "pd+cache vs pd"): -0.785,
    ("loogle", "ttft", "p99", "locality vs session"): -0.59,
}

TABLE_WORKLOADS = dict(
    sharegpt=lambda n, seed: workloads.multi_turn(num_sessions=n, seed=seed),
    loogle=lambda n, seed: workloads.long_doc_qa(num_docs=max(2, n // 8), questions_per_doc=8, seed=seed),
    react=lambda n, seed: workloads.react(num_sessions=n, seed=seed),
)


def _capacity_rate(wl: workloads.Workload, cost: ClusterCost, instances: int) -> float:
    """Sessions per second that would keep `instances` colocated instances busy without caching: work per
    session = its prefills alone + its decode steps at a batch of 32."""
    work = 0.0
    for s in wl.sessions:
        for k, t in enumerate(s.turns):
            plen = sum(seg.length for seg in s.prompt_segments(k))
            work += cost.prefill_time(plen, 0)
            work += t.output_len * cost.step_time(0, 0, 32, 32 * (plen + t.output_len // 2)) / 32
    return instances * len(wl.sessions) / work


def prefill_fraction(spec: str, workload: str) -> float:
    """--pd_prefill_fraction for one workload ("0.5" or "sharegpt:0.125,loogle:0.5"; unnamed: 0.5)."""
    if ":" not in spec:
        return float(spec)
    pairs = dict(item.split(":") for item in spec.split(","))
    return float(pairs.get(workload, pairs.get("default", 0.5)))


def table(cost: ClusterCost, out: Path) -> list[dict]:
    rows = []
    for wname in FLAGS.table_workloads:
        for n in [int(x) for x in FLAGS.instances]:
            wl = TABLE_WORKLOADS[wname](FLAGS.sessions_per_instance * n, FLAGS.seed)
            rate = FLAGS.load * _capacity_rate(wl, cost, n)
            n_p = min(n - 1, max(1, round(n * prefill_fraction(FLAGS.pd_prefill_fraction, wname))))
            for setting in FLAGS.table_settings:
                for policy in FLAGS.table_policies:
                    t0 = time.time()
                    recs = Simulator(cost, SimConfig(setting=setting, policy=policy, num_instances=n, rate=rate,
                                                     seed=FLAGS.seed, num_prefill=n_p)).run(wl)
                    s = report.summarize(recs)
                    row = dict(workload=wname, instances=n, setting=setting, policy=policy, rate=rate,
                               num_prefill=n_p if setting.startswith("pd") else 0, load=FLAGS.load,
                               requests=len(recs), expected=wl.num_requests,
                               ttft_mean=s["ttft"]["mean"], ttft_p99=s["ttft"]["p99"], jct_mean=s["jct"]["mean"],
                               jct_p99=s["jct"]["p99"], hit_rate=s["hit_rate"], kv_bytes=s["kv_bytes"],
                               sim_s=time.time() - t0)
                    rows.append(row)
                    print(f"{wname:8s} n={n:2d} {setting:15s} {policy:10s} rate={rate:6.2f}/s  TTFT avg "
                          f"{row['ttft_mean'] * 1e3:8.1f} p99 {row['ttft_p99'] * 1e3:8.1f} ms  JCT avg "
                          f"{row['jct_mean']:7.3f} p99 {row['jct_p99']:7.3f} s  hit {row['hit_rate']:.2f}  "
                          f"({row['sim_s']:.1f}s)", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.json").write_text(json.dumps(rows, indent=1))
    md = _table_md(rows)
    (out / "table.md").write_text(md)
    print(md)
    return rows


def sweep(cost: ClusterCost) -> list[dict]:
    """Locality's MISS_WEIGHT against session affinity: pd+cache, each --table_workloads x --instances at --load
    (the sweep behind policies.MISS_WEIGHT; WORKSPACE_NOTES.md)."""
    rows = []
    for wname in FLAGS.table_workloads:
        for n in [int(x) for x in FLAGS.instances]:
            wl = TABLE_WORKLOADS[wname](FLAGS.sessions_per_instance * n, FLAGS.seed)
            rate = FLAGS.load * _capacity_rate(wl, cost, n)
            n_p = min(n - 1, max(1, round(n * prefill_fraction(FLAGS.pd_prefill_fraction, wname))))
            runs = [("locality", float(w)) for w in FLAGS.miss_weights] + [("session", None), ("session_ll", None)]
            for policy, w in runs:
                sim = Simulator(cost, SimConfig(setting="pd+cache", policy=policy, num_instances=n, rate=rate,
                                                seed=FLAGS.seed, num_prefill=n_p, miss_weight=w))
                s = report.summarize(sim.run(wl))
                row = dict(workload=wname, instances=n, load=FLAGS.load, policy=policy, miss_weight=w,
                           ttft_mean=s["ttft"]["mean"], ttft_p99=s["ttft"]["p99"], jct_mean=s["jct"]["mean"],
                           hit_rate=s["hit_rate"], prefill_tokens=sum(i.prefill_tokens for i in sim.instances))
                rows.append(row)
                label = policy if w is None else f"locality w={w:g}"
                print(f"{wname:8s} n={n:2d} load={FLAGS.load:g} {label:14s} TTFT avg {row['ttft_mean'] * 1e3:8.1f} "
                      f"p99 {row['ttft_p99'] * 1e3:8.1f} ms  JCT avg {row['jct_mean']:.3f} s  hit {row['hit_rate']:.2f}  "
                      f"prompt tokens computed {row['prefill_tokens']}", flush=True)
    return rows


def _get(rows, **key):
    for r in rows:
        if all(r[k] == v for k, v in key.items()):
            return r
    return None


def _table_md(rows: list[dict]) -> str:
    lines = ["| workload | inst | setting | policy | TTFT avg ms | TTFT p99 ms | JCT avg s | JCT p99 s | hit | "
             "KV moved GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kv = "n/a" if r["kv_bytes"] is None else f"{r['kv_bytes'] / 2**30:.1f}"
        lines.append(f"| {r['workload']} | {r['instances']} | {r['setting']} | {r['policy']} | "
                     f"{r['ttft_mean'] * 1e3:.1f} | {r['ttft_p99'] * 1e3:.1f} | {r['jct_mean']:.3f} | "
                     f"{r['jct_p99']:.3f} | {r['hit_rate']:.2f} | {kv} |")
    lines += ["", "Paper comparison (change of the metric; ours: locality policy unless stated):", "",
              "| workload | metric | comparison | MemServe | " +
              " | ".join(f"ours n={n}" for n in sorted({r['instances'] for r in rows})) + " |",
              "|---|---|---|---|" + "---|" * len({r['instances'] for r in rows})]
    for (w, metric, stat, comp), paper in PAPER.items():
        cells = []
        for n in sorted({r['instances'] for r in rows}):
            if comp == "pd+cache vs pd":
                a = _get(rows, workload=w, instances=n, setting="pd+cache", policy="locality")
                b = _get(rows, workload=w, instances=n, setting="pd", policy="locality")
            else:
                a = _get(rows, workload=w, instances=n, setting="pd+cache", policy="locality")
                b = _get(rows, workload=w, instances=n, setting="pd+cache", policy="session_ll")
            key = f"{metric}_{stat}"
            cells.append("n/a" if not a or not b else f"{a[key] / b[key] - 1:+.1%}")
        label = comp if comp != "locality vs session" else "locality vs session_ll (pd+cache)"
        lines.append(f"| {w} | {stat} {metric.upper()} | {label} | {paper:+.1%} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- fit overheads
def _sim_error(cost: ClusterCost, wl, setting: str, real_summary: dict) -> float:
    sim = report.summarize(Simulator(cost, SimConfig(setting=setting, policy=FLAGS.sim_policy,
                                                     num_instances=FLAGS.num_instances, rate=FLAGS.rate,
                                                     seed=FLAGS.seed)).run(wl))
    return max(abs(sim[m]["mean"] / real_summary[m]["mean"] - 1) for m in ("ttft", "jct"))


def fit_overheads(cost: ClusterCost, colocated: list[dict], pd: list[dict] | None) -> ClusterCost:
    """The serving overheads the offline calibration cannot see, by grid search on real served runs: the
    per-request RPC overhead and the per-step streaming overhead from the colocated run (mean TTFT and JCT),
    then the per-transfer latency from the pd run. The caching settings stay out of the fit, so validating
    them is a held-out test."""
    import dataclasses
    import itertools
    from jaxserve.launch.bench import make_workload
    wl = make_workload(FLAGS.workload, seed=FLAGS.seed, **json.loads(FLAGS.workload_args))
    real = report.summarize(colocated)
    grid = itertools.product([i * 0.5e-3 for i in range(31)], [i * 0.1e-3 for i in range(21)])
    err, rpc, step = min((_sim_error(dataclasses.replace(cost, rpc_overhead_s=r, step_overhead_s=t), wl,
                                     "colocated", real), r, t) for r, t in grid)
    cost = dataclasses.replace(cost, rpc_overhead_s=rpc, step_overhead_s=step)
    print(f"colocated: rpc_overhead_s={rpc * 1e3:.1f} ms, step_overhead_s={step * 1e3:.1f} ms (max error {err:.1%})")
    if pd:
        real = report.summarize(pd)
        err, lat = min((_sim_error(dataclasses.replace(cost, transfer_latency_s=x), wl, "pd", real), x)
                       for x in [i * 0.5e-3 for i in range(61)])
        cost = dataclasses.replace(cost, transfer_latency_s=lat)
        print(f"pd: transfer_latency_s={lat * 1e3:.1f} ms (max error {err:.1%})")
    return dataclasses.replace(cost, name=cost.name.split("+")[0] + "+served-overheads(fit on colocated, pd)")


# ------------------------------------------------------------------------------------------------ validate
def validate(cost: ClusterCost, out: Path) -> dict:
    """The same workload (seed, rate, warm-up) and setting for real (jaxserve.launch.local: 2 instances, each pinned to
    its own core, the cost file's engine settings) and in the simulator; compares mean TTFT and JCT."""
    from jaxserve.launch.bench import machine, make_warmup, make_workload, run_setting
    from jaxserve.bench.loadgen import LoadConfig
    wl = make_workload(FLAGS.workload, seed=FLAGS.seed, **json.loads(FLAGS.workload_args))
    if FLAGS.real_records:
        real = report.read_jsonl(FLAGS.real_records)
        where = f"real records from {FLAGS.real_records}"
    else:
        warm = make_warmup(FLAGS.warmup, FLAGS.workload, wl, False, FLAGS.seed, FLAGS.warmup_requests,
                           **json.loads(FLAGS.workload_args))
        load = LoadConfig(rate=FLAGS.rate, duration_s=1e9, grace_s=600, seed=FLAGS.seed, progress=False)
        where = f"real run on {machine()} (before)"
        real, _ = asyncio.run(run_setting(FLAGS.setting, FLAGS.sim_policy, wl, load, warm,
                                          load if FLAGS.warmup == "twin" else None,
                                          num_instances=FLAGS.num_instances, num_pages=cost.kv_pages + 1,
                                          page_size=cost.page_size, max_num_batched_tokens=cost.max_num_batched_tokens,
                                          max_num_seqs=cost.max_num_seqs, pd_cache_mode=FLAGS.pd_cache_mode))
        where += f", {machine()} (after)"
    print(where)
    sim = Simulator(cost, SimConfig(setting=FLAGS.setting, policy=FLAGS.sim_policy, num_instances=FLAGS.num_instances,
                                    rate=FLAGS.rate, seed=FLAGS.seed,
                                    send_back=FLAGS.pd_cache_mode == "caching3")).run(wl)
    return compare(real, sim, out, FLAGS.tolerance)


def compare(real: list[dict], sim: list[dict], out: Path, tolerance: float) -> dict:
    rs, ss = report.summarize(real), report.summarize(sim)
    res = {}
    for metric in ("ttft", "jct", "tpot"):
        a, b = rs[metric]["mean"], ss[metric]["mean"]
        res[metric] = dict(real=a, sim=b, rel_err=(b - a) / a)
    res["hit_rate"] = dict(real=rs["hit_rate"], sim=ss["hit_rate"])
    res["ok"] = all(abs(res[m]["rel_err"]) <= tolerance for m in ("ttft", "jct"))
    out.mkdir(parents=True, exist_ok=True)
    report.write_jsonl(out / "real.jsonl", real)
    report.write_jsonl(out / "sim.jsonl", sim)
    (out / "validate.json").write_text(json.dumps(res, indent=1))
    print(report.markdown_table({"real": rs, "sim": ss}))
    for m in ("ttft", "jct", "tpot"):
        print(f"mean {m}: real {res[m]['real'] * 1e3:.1f} ms, sim {res[m]['sim'] * 1e3:.1f} ms, "
              f"error {res[m]['rel_err']:+.1%}")
    print(f"hit rate: real {res['hit_rate']['real']:.3f}, sim {res['hit_rate']['sim']:.3f}; "
          f"{'PASS' if res['ok'] else 'FAIL'} (tolerance {tolerance:.0%})")
    return res


# ---------------------------------------------------------------------------------------------- trace replay
def trace_replay(cost: ClusterCost, out: Path) -> list[dict]:
    """The Mooncake trace (issue 18): every --trace_settings x --instances x variant side by side, with the
    trace's infinite-cache ideal; writes trace.json and trace.md under --sim_out."""
    from jaxserve.sim import replay
    wl = workloads.trace(max_requests=FLAGS.trace_requests, time_scale=FLAGS.trace_time_scale)
    variants = replay.VARIANTS
    if FLAGS.trace_variants:
        by_label = {v.label: v for v in replay.VARIANTS}
        unknown = [v for v in FLAGS.trace_variants if v not in by_label]
        if unknown:
            raise app.UsageError(f"unknown --trace_variants {unknown}; choose from {list(by_label)}")
        variants = [by_label[v] for v in FLAGS.trace_variants]
    print(f"{wl.description}; cost {cost.name}, host tier {cost.host_kv_pages} pages, PCIe "
          f"{cost.host_bytes_s / 1e9:g} GB/s, link {cost.transfer_bytes_s / 1e9:g} GB/s, node_size {cost.node_size}",
          flush=True)
    rows = replay.replay(wl, cost, [int(x) for x in FLAGS.instances], list(FLAGS.trace_settings), variants,
                         num_prefill=lambda n: min(n - 1, max(1, round(n * float(FLAGS.pd_prefill_fraction)))),
                         seed=FLAGS.seed, log=lambda line: print(line, flush=True))
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(workload=wl.description, cost=cost.to_json(), trace_requests=FLAGS.trace_requests,
                trace_time_scale=FLAGS.trace_time_scale)
    (out / "trace.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    md = replay.table_md(rows)
    (out / "trace.md").write_text(md)
    print(md)
    return rows


def main(argv):
    del argv
    out = Path(FLAGS.sim_out)
    if FLAGS.mode == "calibrate":
        calibrate(FLAGS.calibration)
        return
    if FLAGS.mode == "refit":
        refit(FLAGS.calibration)
        return
    cost = load_cost(FLAGS.cost)
    import dataclasses
    if FLAGS.rpc_overhead_s is not None:
        cost = dataclasses.replace(cost, rpc_overhead_s=FLAGS.rpc_overhead_s)
    if FLAGS.step_overhead_s is not None:
        cost = dataclasses.replace(cost, step_overhead_s=FLAGS.step_overhead_s)
    if FLAGS.node_size is not None:
        cost = dataclasses.replace(cost, node_size=FLAGS.node_size)
    if FLAGS.mode == "fit_overheads":
        if not FLAGS.colocated_records:
            raise app.UsageError("--mode=fit_overheads needs --colocated_records (and --pd_records)")
        cost = fit_overheads(cost, report.read_jsonl(FLAGS.colocated_records),
                             report.read_jsonl(FLAGS.pd_records) if FLAGS.pd_records else None)
        cost.save(FLAGS.calibration)
        print(f"wrote {FLAGS.calibration}")
    elif FLAGS.mode == "table":
        table(cost, out)
    elif FLAGS.mode == "sweep":
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep.json").write_text(json.dumps(sweep(cost), indent=1))
    elif FLAGS.mode == "validate":
        validate(cost, out)
    elif FLAGS.mode == "trace":
        trace_replay(cost, out)
    else:
        wl = workloads.make(FLAGS.workload, seed=FLAGS.seed, **json.loads(FLAGS.workload_args))
        recs = Simulator(cost, SimConfig(setting=FLAGS.setting, policy=FLAGS.sim_policy,
                                         num_instances=FLAGS.num_instances, rate=FLAGS.rate,
                                         seed=FLAGS.seed, host_tier=FLAGS.host_tier,
                                         peer_fetch=FLAGS.peer_fetch)).run(wl)
        print(report.markdown_table({f"{FLAGS.setting}/{FLAGS.sim_policy}": report.summarize(recs)}, ratios=False))


if __name__ == "__main__":
    app.run(main)
