"""Side-by-side benchmark of serving settings on this machine, through the real scheduler and instances.

    python -m jaxserve.launch.bench --settings=colocated,colocated+cache,pd,pd+cache --workload=multi_turn --rate=1 \
        --duration_s=60 --grace_s=90 --out=out/bench

Each (setting, policy) starts its own cluster with `jaxserve.launch.local` (scheduler + two instances, each pinned to
its own core: colocated x2, or pd = 1 prefill + 1 decode instance, pd_mode basic; pd+cache = --pd_cache_mode,
caching2 by default), warms it up with the workload's shape twin (same sessions, lengths and arrivals, other
tokens: the jit buckets get compiled and no prefix is shared), plays the workload (same seed: the same sessions
and arrival times) with the gRPC load generator, reads every instance's stats (KV moved = the prefill
instances' kv_sent_bytes, warm-up excluded) and stops the cluster. Output: per-request JSON lines,
summary.json, report.md (one table, ratios to the first setting) and PNG plots (JCT / TTFT CDF per setting,
hit rate over time). Workloads use the `DEMO_PRESETS` sizes (they fit the demo model's 1,024-token context)
unless --full_size."""

from __future__ import annotations

import os

# jaxserve.launch.local forks its instance processes (subprocess with a preexec_fn) from a process whose gRPC threads are
# live; gRPC's fork handlers then sometimes abort the child before it execs ("epoll_wait error: Bad file
# descriptor", exit -6). The children exec at once and need nothing from gRPC's fork support: turn it off
# before grpc is imported.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import asyncio  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
from pathlib import Path  # noqa: E402

from absl import app, flags  # noqa: E402

from jaxserve.bench import report, workloads
from jaxserve.bench.loadgen import LoadConfig, run_load
from jaxserve.launch import local  # noqa: F401  (its flags: --model, --num_instances, --num_pages, --page_size, ...)

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
flags.DEFINE_enum("warmup", "twin", ["twin", "sessions", "none"],
                  "before measuring: 'twin' plays the same sessions (same lengths, arrivals and rate) with other "
                  "tokens, so the engines compile the jit buckets the run will use and no prefix is shared; "
                  "'sessions' sends the first --warmup_requests sessions of another seed at once")
flags.DEFINE_integer("warmup_requests", 6, "--warmup=sessions: sessions (another seed) sent first")
flags.DEFINE_float("slo_ttft_s", 1.0, "TTFT SLO for goodput")
flags.DEFINE_float("slo_tpot_s", 0.1, "TPOT SLO for goodput")
flags.DEFINE_string("out", "out/bench", "output folder")
flags.DEFINE_bool("progress", True, "progress bar on stderr")
flags.DEFINE_bool("instance_logs", False, "let the instances log to this process's stdout/stderr")
flags.DEFINE_enum("pd_cache_mode", "caching2", ["caching1", "caching2", "caching3"],
                  "PD mode of the pd+cache setting (pd is always basic). caching3's decode->prefill send-back is "
                  "not implemented by the instance server yet (it then behaves as caching2)")
FLAGS = flags.FLAGS
# Served benchmarks measure serving, not compilation: instances compile every shape before registering.
FLAGS.set_default("precompile", True)
FLAGS.set_default("ready_timeout_s", 900.0)


def make_workload(name: str, full_size: bool = False, seed: int = 0, **kwargs) -> workloads.Workload:
    args = {} if full_size else dict(workloads.DEMO_PRESETS.get(name, {}))
    args.update(kwargs)
    return workloads.make(name, seed=seed, **args)


def shape_twin(wl: workloads.Workload, offset: int = 1000) -> workloads.Workload:
    """The same sessions (lengths, turns, arrivals) with other tokens: a workload's token blocks come from its
    seed, so no prompt of the twin shares a page with the original."""
    return workloads.Workload(wl.name + "-twin", wl.sessions, wl.seed + offset, wl.vocab_size, wl.description)


def make_warmup(kind: str, name: str, wl: workloads.Workload, full_size: bool, seed: int, n_sessions: int,
                **kwargs) -> workloads.Workload | None:
    if kind == "twin":
        return shape_twin(wl)
    if kind == "sessions":
        warm = make_workload(name, full_size, seed + 1000, **kwargs)
        return workloads.Workload(warm.name, warm.sessions[:n_sessions], warm.seed, warm.vocab_size)
    return None


def cluster_for(setting: str, policy: str, *, model: str = "demo", num_instances: int = 2, num_pages: int = 512,
                page_size: int = 16, max_num_batched_tokens: int = 256, max_num_seqs: int = 32,
                pd_cache_mode: str = "caching2", kv_transfer_timeout_s: float = 30.0, quiet: bool = True,
                precompile: bool = True, ready_timeout_s: float = 900.0):
    """A jaxserve.launch.local cluster for the setting (not started)."""
    from jaxserve.launch.local import LocalCluster
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    cache = setting.endswith("+cache")
    instance_flags = dict(prefix_caching=cache, page_size=page_size, num_pages=num_pages,
                          max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                          profile_at_start=True, precompile=precompile)
    kwargs = dict(model=model, num_instances=num_instances, port=0, policy=policy, pin=True,
                  instance_flags=instance_flags, scheduler_config=dict(profile_instances=True), quiet=quiet,
                  ready_timeout_s=ready_timeout_s)
    if setting.startswith("pd"):
        # 1 prefill + 1 decode instance for the 2-instance default (half and half in general), each pinned to
        # its own core by jaxserve.launch.local. pd: MemServe's PD-Basic; pd+cache: `pd_cache_mode` (caching2 by
        # default: both sides cache, the decode side indexes the KV it receives and only the KV it lacks is
        # sent; caching3 also sends the decode-phase KV back, once the instance server implements it).
        n_p = max(1, num_instances // 2)
        kwargs.update(prefill_instances=n_p, decode_instances=max(1, num_instances - n_p),
                      pd_mode=pd_cache_mode if cache else "basic")
        instance_flags["kv_transfer_timeout_s"] = kv_transfer_timeout_s
    return LocalCluster(**kwargs)


async def run_setting(setting: str, policy: str, workload: workloads.Workload, load: LoadConfig,
                      warmup: workloads.Workload | None = None, warmup_load: LoadConfig | None = None,
                      **cluster_kwargs) -> tuple[list[dict], dict]:
    """Start the cluster, warm it up, play the workload; returns (records, scheduler stats)."""
    cluster = cluster_for(setting, policy, **cluster_kwargs)
    async with cluster:
        before = None
        if warmup is not None and warmup.sessions:
            await run_load(cluster.address, warmup,
                           warmup_load or LoadConfig(rate=0, duration_s=0, grace_s=600, progress=False))
            before = await instance_stats(cluster)
        records = await run_load(cluster.address, workload, load)
        stats = await instance_stats(cluster)
        stats["_kv_bytes"] = kv_moved(stats, before)
    return records, stats


KV_FIELDS = ("kv_sent_tokens", "kv_sent_bytes", "kv_received_tokens", "kv_received_bytes", "kv_transfers",
             "kv_transfer_failures")


async def instance_stats(cluster) -> dict:
    """Per instance: the scheduler's routing counters plus the instance's own GetStats counters (requests,
    prompt / cached tokens, KV transfer counters). Counters include the warm-up requests."""
    from jaxserve.proto.v1 import instance_pb2
    out = {}
    for iid, r in cluster.scheduler.router.instances.items():
        d = dict(num_requests=r.num_requests, prompt_tokens=r.prompt_tokens, cached_tokens=r.cached_tokens)
        try:
            st = await r.stub.GetStats(instance_pb2.InstanceStatsRequest(), timeout=10)
            d.update(instance_prompt_tokens=st.prompt_tokens, instance_cached_tokens=st.cached_tokens,
                     **{f: getattr(st, f) for f in KV_FIELDS})
        except Exception as e:  # noqa: BLE001 - stats are a report extra, not the measurement
            d["stats_error"] = f"{type(e).__name__}: {e}"
        out[iid] = d
    return out


def kv_moved(stats: dict, before: dict | None = None) -> int | None:
    """KV bytes prefill instances sent (their kv_sent_bytes = the PrefillResponse.transferred_bytes summed),
    minus the `before` snapshot (the warm-up); 0 for colocated clusters; None if not reported."""
    if not stats or any("stats_error" in d for d in stats.values()):
        return None
    total = sum(d.get("kv_sent_bytes", 0) for d in stats.values())
    if before:
        total -= sum(d.get("kv_sent_bytes", 0) for d in before.values())
    return total


def machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{platform.node()} ({platform.machine()}, {cores} cores available, load avg {os.getloadavg()[0]:.1f})"


def main(argv):
    del argv
    out = Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    kwargs = json.loads(FLAGS.workload_args)
    wl = make_workload(FLAGS.workload, FLAGS.full_size, FLAGS.seed, **kwargs)
    warm = make_warmup(FLAGS.warmup, FLAGS.workload, wl, FLAGS.full_size, FLAGS.seed, FLAGS.warmup_requests, **kwargs)
    load = LoadConfig(rate=FLAGS.rate, duration_s=FLAGS.duration_s, grace_s=FLAGS.grace_s, seed=FLAGS.seed,
                      progress=FLAGS.progress)
    warm_load = dataclasses.replace(load, progress=False) if FLAGS.warmup == "twin" else None
    cluster_kwargs = dict(model=FLAGS.model, num_instances=FLAGS.num_instances, num_pages=FLAGS.num_pages,
                          page_size=FLAGS.page_size, max_num_batched_tokens=FLAGS.max_num_batched_tokens,
                          max_num_seqs=FLAGS.max_num_seqs, pd_cache_mode=FLAGS.pd_cache_mode,
                          kv_transfer_timeout_s=FLAGS.kv_transfer_timeout_s, quiet=not FLAGS.instance_logs,
                          precompile=FLAGS.precompile, ready_timeout_s=FLAGS.ready_timeout_s)
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
            records, stats = asyncio.run(run_setting(setting, policy, wl, load, warm, warm_load, **cluster_kwargs))
            report.write_jsonl(out / f"{name.replace('/', '_')}.jsonl", records)
            runs[name] = records
            summaries[name] = report.summarize(records, FLAGS.slo_ttft_s, FLAGS.slo_tpot_s)
            kv = stats.pop("_kv_bytes")
            if summaries[name]["kv_bytes"] is None:
                summaries[name]["kv_bytes"] = kv
            summaries[name]["instances"] = stats
            print(report.markdown_table({name: summaries[name]}, ratios=False), flush=True)
    table = report.markdown_table(summaries)
    plots = report.plot(runs, out, title=wl.name)
    header = (f"# bench: {wl.name}\n\nworkload: {wl.description}\n\nmachine: {machine()}\n\nrate {FLAGS.rate:g} "
              f"sessions/s, duration {FLAGS.duration_s:g} s, {FLAGS.num_instances} instances, model "
              f"{FLAGS.model}, SLOs TTFT {FLAGS.slo_ttft_s:g} s / TPOT {FLAGS.slo_tpot_s:g} s; pd = "
              f"{FLAGS.num_instances // 2 or 1} prefill + {max(1, FLAGS.num_instances - (FLAGS.num_instances // 2 or 1))} "
              f"decode, pd_mode basic; pd+cache pd_mode {FLAGS.pd_cache_mode}. KV moved = the prefill instances' "
              "kv_sent_bytes (PrefillResponse.transferred_bytes summed), warm-up excluded.\n\n")
    (out / "report.md").write_text(header + table + "\n\n" + "\n".join(f"![]({Path(p).name})" for p in plots) + "\n")
    (out / "summary.json").write_text(json.dumps(summaries, indent=1, default=str))
    print(table)
    print(f"wrote {out}/report.md, summary.json, *.jsonl" + (f", {len(plots)} plots" if plots else
                                                                 " (no plots: pip install -e '.[bench]')"))


if __name__ == "__main__":
    app.run(main)
