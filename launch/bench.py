"""Side-by-side benchmark of serving settings on this machine, through the real scheduler and instances.

    python -m launch.bench --settings=colocated,colocated+cache,pd,pd+cache --policies=locality,least_load \
        --workload=multi_turn --rate=2 --duration_s=30 --out=out/bench

Each (setting, policy) starts its own cluster with `launch.local` (scheduler + two instances, each pinned to
its own core), plays the same workload (same seed: the same sessions and arrival times) with the gRPC load
generator, and stops the cluster. Output: per-request JSON lines, summary.json, report.md (one table, ratios
to the first setting) and PNG plots (JCT / TTFT CDF per setting, hit rate over time). Workloads use the
`DEMO_PRESETS` sizes (they fit the demo model's 1,024-token context) unless --full_size."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import platform
from pathlib import Path

from absl import app, flags

from jaxserve.bench import report, workloads
from jaxserve.bench.loadgen import LoadConfig, run_load
from launch import local  # noqa: F401  (its flags: --model, --num_instances, --num_pages, --page_size, ...)

SETTINGS = ("colocated", "colocated+cache", "pd", "pd+cache")

flags.DEFINE_list("settings", ["colocated", "colocated+cache"], f"any of {', '.join(SETTINGS)}")
flags.DEFINE_list("policies", ["locality"], "routing policies (locality, least_load, round_robin, session)")
flags.DEFINE_string("workload", "multi_turn", f"one of {', '.join(sorted(workloads.WORKLOADS))}")
flags.DEFINE_string("workload_args", "{}", "JSON keyword arguments for the workload generator")
flags.DEFINE_bool("full_size", False, "use the generator's full-size defaults instead of DEMO_PRESETS")
flags.DEFINE_integer("seed", 0, "workload and arrival seed")
flags.DEFINE_float("rate", 2.0, "sessions per second (Poisson); ignored by trace replay")
flags.DEFINE_float("duration_s", 60.0, "no session starts after this")
flags.DEFINE_float("grace_s", 120.0, "time in-flight requests get after duration_s")
flags.DEFINE_integer("warmup_requests", 6, "requests (another seed) sent first to compile the engines")
flags.DEFINE_float("slo_ttft_s", 1.0, "TTFT SLO for goodput")
flags.DEFINE_float("slo_tpot_s", 0.1, "TPOT SLO for goodput")
flags.DEFINE_string("out", "out/bench", "output folder")
flags.DEFINE_bool("progress", True, "progress bar on stderr")
FLAGS = flags.FLAGS


class SettingUnavailable(RuntimeError):
    pass


def make_workload(name: str, full_size: bool = False, seed: int = 0, **kwargs) -> workloads.Workload:
    args = {} if full_size else dict(workloads.DEMO_PRESETS.get(name, {}))
    args.update(kwargs)
    return workloads.make(name, seed=seed, **args)


def cluster_for(setting: str, policy: str, *, model: str = "demo", num_instances: int = 2, num_pages: int = 512,
                page_size: int = 16, max_num_batched_tokens: int = 256, max_num_seqs: int = 32):
    """A launch.local cluster for the setting (not started)."""
    from launch.local import LocalCluster
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    cache = setting.endswith("+cache")
    instance_flags = dict(prefix_caching=cache, page_size=page_size, num_pages=num_pages,
                          max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                          profile_at_start=True)
    kwargs = dict(model=model, num_instances=num_instances, port=0, policy=policy, pin=True,
                  instance_flags=instance_flags, scheduler_config=dict(profile_instances=True), quiet=True)
    if setting.startswith("pd"):
        params = inspect.signature(LocalCluster).parameters
        if "num_prefill" in params:
            kwargs["num_prefill"] = max(1, num_instances // 2)
        elif "mode" in params:
            kwargs["mode"] = "disaggregated"
        else:
            raise SettingUnavailable(
                f"setting {setting!r} needs prefill/decode instances, which launch.local cannot start yet (the "
                "instance server's prefill/decode roles and launch.local's P/D mode are being added); run the "
                "colocated settings, or the simulator (python -m launch.sim) for P/D numbers")
    return LocalCluster(**kwargs)


async def run_setting(setting: str, policy: str, workload: workloads.Workload, load: LoadConfig,
                      warmup: workloads.Workload | None = None, **cluster_kwargs) -> tuple[list[dict], dict]:
    """Start the cluster, warm it up, play the workload; returns (records, scheduler stats)."""
    cluster = cluster_for(setting, policy, **cluster_kwargs)
    async with cluster:
        if warmup is not None and warmup.sessions:
            await run_load(cluster.address, warmup, LoadConfig(rate=0, duration_s=0, grace_s=600, progress=False))
        records = await run_load(cluster.address, workload, load)
        stats = cluster.scheduler.router and {
            iid: dict(num_requests=r.num_requests, prompt_tokens=r.prompt_tokens, cached_tokens=r.cached_tokens)
            for iid, r in cluster.scheduler.router.instances.items()}
    return records, stats


def machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{platform.node()} ({platform.machine()}, {cores} cores available, load avg {os.getloadavg()[0]:.1f})"


def main(argv):
    del argv
    out = Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    kwargs = json.loads(FLAGS.workload_args)
    wl = make_workload(FLAGS.workload, FLAGS.full_size, FLAGS.seed, **kwargs)
    warm = make_workload(FLAGS.workload, FLAGS.full_size, FLAGS.seed + 1000, **kwargs)
    warm = workloads.Workload(warm.name, warm.sessions[:FLAGS.warmup_requests], warm.seed, warm.vocab_size)
    load = LoadConfig(rate=FLAGS.rate, duration_s=FLAGS.duration_s, grace_s=FLAGS.grace_s, seed=FLAGS.seed,
                      progress=FLAGS.progress)
    cluster_kwargs = dict(model=FLAGS.model, num_instances=FLAGS.num_instances, num_pages=FLAGS.num_pages,
                          page_size=FLAGS.page_size, max_num_batched_tokens=FLAGS.max_num_batched_tokens,
                          max_num_seqs=FLAGS.max_num_seqs)
    for s in FLAGS.settings:
        if s not in SETTINGS:
            raise app.UsageError(f"unknown setting {s!r}; choose from {', '.join(SETTINGS)}")
    # Fail fast on settings this checkout cannot start, before spending time on the others.
    for s in FLAGS.settings:
        cluster_for(s, FLAGS.policies[0], **cluster_kwargs)
    print(f"workload {wl.name}: {wl.description}; {wl.summary()}")
    runs, summaries = {}, {}
    for setting in FLAGS.settings:
        for policy in FLAGS.policies:
            name = setting if len(FLAGS.policies) == 1 else f"{setting}/{policy}"
            print(f"== {name}", flush=True)
            records, stats = asyncio.run(run_setting(setting, policy, wl, load, warm, **cluster_kwargs))
            report.write_jsonl(out / f"{name.replace('/', '_')}.jsonl", records)
            runs[name] = records
            summaries[name] = report.summarize(records, FLAGS.slo_ttft_s, FLAGS.slo_tpot_s)
            summaries[name]["instances"] = stats
            print(report.markdown_table({name: summaries[name]}, ratios=False), flush=True)
    table = report.markdown_table(summaries)
    plots = report.plot(runs, out, title=wl.name)
    header = (f"# bench: {wl.name}\n\nworkload: {wl.description}\n\nmachine: {machine()}\n\nrate {FLAGS.rate:g} "
              f"sessions/s, duration {FLAGS.duration_s:g} s, {FLAGS.num_instances} instances, model "
              f"{FLAGS.model}, SLOs TTFT {FLAGS.slo_ttft_s:g} s / TPOT {FLAGS.slo_tpot_s:g} s. KV moved: n/a "
              "(instances do not report transferred bytes).\n\n")
    (out / "report.md").write_text(header + table + "\n\n" + "\n".join(f"![]({Path(p).name})" for p in plots) + "\n")
    (out / "summary.json").write_text(json.dumps(summaries, indent=1, default=str))
    print(table)
    print(f"wrote {out}/report.md, summary.json, *.jsonl, {len(plots)} plots")


if __name__ == "__main__":
    app.run(main)
