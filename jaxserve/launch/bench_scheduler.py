"""Scheduler benchmark: routing decision latency with big prompt trees, requests per second through the
scheduler, and the prefix-cache hit rate of each policy on a multi-turn workload.

    python -m jaxserve.launch.bench_scheduler --out=out/bench_scheduler.json

1. Routing: prompt trees holding --tree_tokens+ tokens across --instances instances (shared system prompts,
   conversations); p50/p99 of one routing decision (tree match + policy) per policy, no I/O.
2. Throughput: a real scheduler (gRPC, in this process) in front of fake instances that answer at once;
   clients in a separate process (so they do not share the scheduler's core) keep --rps_concurrency
   requests in flight.
3. Hit rate: --hit_instances fake instances, each with an LRU cache of --hit_cache_pages pages that reports
   its inserts and evictions; multi-turn sessions (shared system prompts, growing history); hit rate in
   tokens = cached prompt tokens / prompt tokens, as the instances measured them. With
   --hit_simulate_prefill the fakes sleep their cost model's prefill time, so TTFT shows the effect too.

Prints tables and writes JSON. Everything runs on this machine's CPUs; numbers are for comparison within a
run (the machine is shared and noisy)."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

from absl import app, flags

from jaxserve.scheduler import POLICIES, GlobalSchedulerConfig, ModelInfo, Scheduler
from jaxserve.scheduler.cost_model import CostModel
from jaxserve.testing.fake_instance import FakeInstance
from jaxserve.scheduler.policies import LoadGuard
from jaxserve.scheduler.prompt_tree import PromptTree
from jaxserve.scheduler.router import COLOCATED, InstanceRecord, Router

flags.DEFINE_list("policies", list(POLICIES), "policies to compare")
flags.DEFINE_integer("page_size", 16, "tokens per KV page")
flags.DEFINE_integer("seed", 0, "workload seed")
# 1. routing latency
flags.DEFINE_integer("instances", 64, "instances in the routing benchmark")
flags.DEFINE_integer("tree_tokens", 1_000_000, "distinct tokens the prompt tree must hold at least")
flags.DEFINE_integer("system_prompts", 32, "shared system prompts in the routing workload")
flags.DEFINE_integer("system_len", 512, "tokens of each system prompt")
flags.DEFINE_integer("conversation_len", 2048, "tokens of each cached conversation")
flags.DEFINE_integer("decisions", 2000, "routing decisions timed per policy")
# 2. throughput
flags.DEFINE_integer("rps_instances", 4, "fake instances behind the scheduler")
flags.DEFINE_integer("rps_requests", 2000, "requests sent")
flags.DEFINE_integer("rps_concurrency", 32, "requests in flight")
flags.DEFINE_integer("rps_prompt_len", 128, "prompt tokens per request")
flags.DEFINE_integer("rps_max_tokens", 8, "tokens per request (one message)")
flags.DEFINE_enum("rps_client", "process", ["process", "inline"], "clients in another process or this loop")
# 3. hit rate
flags.DEFINE_integer("hit_instances", 4, "fake instances in the hit-rate benchmark")
flags.DEFINE_integer("hit_cache_pages", 512, "LRU cache pages per fake instance")
flags.DEFINE_integer("sessions", 48, "multi-turn sessions")
flags.DEFINE_integer("turns", 6, "turns per session")
flags.DEFINE_integer("hit_system_prompts", 4, "system prompts shared by the sessions")
flags.DEFINE_integer("hit_system_len", 384, "tokens of each system prompt")
flags.DEFINE_integer("user_len", 48, "new user tokens per turn")
flags.DEFINE_integer("output_len", 32, "output tokens per turn")
flags.DEFINE_integer("hit_concurrency", 12, "sessions running at once")
flags.DEFINE_bool("hit_simulate_prefill", True, "fakes sleep their cost model's prefill time")
flags.DEFINE_string("out", "out/bench_scheduler.json", "JSON output")
flags.DEFINE_string("client_only", None, "internal: only run the throughput clients against this address")
FLAGS = flags.FLAGS

MAX_MODEL_LEN = 1 << 15
VOCAB = 32000
# The simulated prefill cost: ~0.05 ms per token, so a 2k-token uncached prompt costs ~0.1 s.
SIM_COST = CostModel(fixed_s=2e-3, per_token_s=5e-5, attention_s=2e-9)


def percentile(values, q):
    values = sorted(values)
    return values[min(int(q / 100 * len(values)), len(values) - 1)]


def print_table(title, header, rows):
    print(f"\n{title}")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))


# ------------------------------------------------------------------------------------- 1. routing
def build_tree(rng):
    tree = PromptTree(FLAGS.page_size)
    systems = [[rng.randrange(VOCAB) for _ in range(FLAGS.system_len)] for _ in range(FLAGS.system_prompts)]
    conversations = []
    k = 0
    while tree.num_tokens < FLAGS.tree_tokens:
        conv = systems[k % len(systems)] + [rng.randrange(VOCAB)
                                            for _ in range(FLAGS.conversation_len - FLAGS.system_len)]
        holders = rng.sample(range(FLAGS.instances), 2)  # each conversation cached on two instances
        for h in holders:
            tree.insert(f"i{h}", conv)
        conversations.append(conv)
        k += 1
    return tree, systems, conversations


def bench_routing(rng):
    t = time.perf_counter()
    tree, systems, conversations = build_tree(rng)
    build_s = time.perf_counter() - t
    prompts = []
    for _ in range(FLAGS.decisions):
        if rng.random() < 0.7:  # the next turn of a cached conversation
            base = rng.choice(conversations)
        else:  # a new conversation on a shared system prompt
            base = rng.choice(systems)
        prompts.append(tuple(base + [rng.randrange(VOCAB) for _ in range(64)]))
    results = {"tree_tokens": tree.num_tokens, "tree_nodes": tree.num_nodes, "instances": FLAGS.instances,
               "build_s": build_s, "policies": {}}
    # The tree match alone.
    lat = []
    for p in prompts:
        t = time.perf_counter()
        tree.match(p)
        lat.append(time.perf_counter() - t)
    results["match_only"] = {"p50_us": percentile(lat, 50) * 1e6, "p99_us": percentile(lat, 99) * 1e6}
    for policy in FLAGS.policies:
        router = Router(policy, LoadGuard())
        for i in range(FLAGS.instances):
            rec = InstanceRecord(f"i{i}", f"127.0.0.1:{i}", COLOCATED, FLAGS.page_size)
            rec.in_flight_requests = rng.randrange(8)
            router.add(rec)
        router.trees[COLOCATED] = tree  # one shared tree: the same state for every policy
        lat, cpu = [], []
        for k, p in enumerate(prompts):
            t, c = time.perf_counter(), time.thread_time()
            router.route(p, session_id=f"s{k % 200}")
            cpu.append(time.thread_time() - c)
            lat.append(time.perf_counter() - t)
        # Wall time includes the other processes preempting us on a shared machine; CPU time does not.
        results["policies"][policy] = {"p50_us": percentile(lat, 50) * 1e6, "p99_us": percentile(lat, 99) * 1e6,
                                       "mean_us": statistics.fmean(lat) * 1e6,
                                       "cpu_p50_us": percentile(cpu, 50) * 1e6, "cpu_p99_us": percentile(cpu, 99) * 1e6}
    return results


# ----------------------------------------------------------------------------------- 2. throughput
async def _client_load(address, requests, concurrency, prompt_len, max_tokens, seed):
    from jaxserve.client import AsyncClient

    rng = random.Random(seed)
    client = AsyncClient(address)
    latencies, errors = [], 0
    queue = list(range(requests))

    async def worker():
        nonlocal errors
        while queue:
            queue.pop()
            prompt = [rng.randrange(258) for _ in range(prompt_len)]
            t = time.perf_counter()
            try:
                await client.generate(prompt, max_tokens=max_tokens)
                latencies.append(time.perf_counter() - t)
            except Exception:  # noqa: BLE001 - counted, reported
                errors += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    await client.close()
    return {"requests": len(latencies), "errors": errors, "wall_s": wall, "rps": len(latencies) / wall,
            "p50_ms": percentile(latencies, 50) * 1e3 if latencies else None,
            "p99_ms": percentile(latencies, 99) * 1e3 if latencies else None}


async def bench_throughput():
    scheduler = Scheduler(GlobalSchedulerConfig(port=0, policy="least_load", profile_instances=False,
                                                max_queued_requests=4096),
                          ModelInfo.byte_level(MAX_MODEL_LEN))
    await scheduler.start()
    fakes = [await FakeInstance(scheduler_address=scheduler.address, page_size=FLAGS.page_size,
                                tokens_per_message=FLAGS.rps_max_tokens).start()
             for _ in range(FLAGS.rps_instances)]
    args = (scheduler.address, FLAGS.rps_requests, FLAGS.rps_concurrency, FLAGS.rps_prompt_len,
            FLAGS.rps_max_tokens, FLAGS.seed)
    try:
        # Warm up the channels and code paths.
        await _client_load(scheduler.address, 50, 8, FLAGS.rps_prompt_len, FLAGS.rps_max_tokens, 1)
        cpu0 = time.process_time()
        if FLAGS.rps_client == "inline":
            result = await _client_load(*args)
        else:
            # The same module in client-only mode; the result comes back as JSON on stdout.
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "jaxserve.launch.bench_scheduler", f"--client_only={scheduler.address}",
                f"--rps_requests={FLAGS.rps_requests}", f"--rps_concurrency={FLAGS.rps_concurrency}",
                f"--rps_prompt_len={FLAGS.rps_prompt_len}", f"--rps_max_tokens={FLAGS.rps_max_tokens}",
                f"--seed={FLAGS.seed}", stdout=asyncio.subprocess.PIPE)
            stdout, _ = await proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"the client process failed ({proc.returncode})")
            result = json.loads(stdout.decode().strip().splitlines()[-1])
        # CPU of this process (scheduler + fake instances, + clients when inline) per request.
        result["server_cpu_ms_per_request"] = (time.process_time() - cpu0) / max(result["requests"], 1) * 1e3
    finally:
        for f in fakes:
            await f.stop()
        await scheduler.stop(0)
    result.update(instances=FLAGS.rps_instances, concurrency=FLAGS.rps_concurrency, client=FLAGS.rps_client,
                  prompt_len=FLAGS.rps_prompt_len, max_tokens=FLAGS.rps_max_tokens)
    return result


# ------------------------------------------------------------------------------------- 3. hit rate
def multi_turn_sessions(rng):
    systems = [[rng.randrange(256) for _ in range(FLAGS.hit_system_len)] for _ in range(FLAGS.hit_system_prompts)]
    return [(f"session-{s}", [256] + systems[s % len(systems)],
             [[rng.randrange(256) for _ in range(FLAGS.user_len)] for _ in range(FLAGS.turns)])
            for s in range(FLAGS.sessions)]


async def bench_hit_rate(policy, sessions):
    scheduler = Scheduler(GlobalSchedulerConfig(port=0, policy=policy, max_queued_requests=4096),
                          ModelInfo.byte_level(MAX_MODEL_LEN))
    await scheduler.start()
    fakes = [await FakeInstance(scheduler_address=scheduler.address, page_size=FLAGS.page_size,
                                cache_pages=FLAGS.hit_cache_pages, cost_model=SIM_COST,
                                simulate_prefill=FLAGS.hit_simulate_prefill, tokens_per_message=8).start()
             for _ in range(FLAGS.hit_instances)]
    from jaxserve.client import AsyncClient
    client = AsyncClient(scheduler.address)
    usages = []
    pending = list(sessions)

    async def run_session():
        while pending:
            sid, history, turns = pending.pop(0)
            history = list(history)
            for user in turns:
                history += user
                done = await client.generate(history, max_tokens=FLAGS.output_len, session_id=sid)
                usages.append(done.usage)
                history += list(done.token_ids)

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(run_session() for _ in range(FLAGS.hit_concurrency)))
        wall = time.perf_counter() - t0
        stats = await client.stats()
        per_instance = [f.num_prompt_tokens for f in fakes]
    finally:
        await client.close()
        for f in fakes:
            await f.stop()
        await scheduler.stop(0)
    prompt = sum(u.prompt_tokens for u in usages)
    cached = sum(u.cached_tokens for u in usages)
    return {"requests": len(usages), "prompt_tokens": prompt, "cached_tokens": cached,
            "hit_rate": cached / prompt, "predicted_hit_rate": stats.predicted_cached_tokens / prompt,
            "ttft_mean_ms": statistics.fmean(u.ttft_s for u in usages) * 1e3,
            "ttft_p99_ms": percentile([u.ttft_s for u in usages], 99) * 1e3,
            "jct_mean_ms": statistics.fmean(u.e2e_s for u in usages) * 1e3, "wall_s": wall,
            "prompt_tokens_per_instance": per_instance}


# ------------------------------------------------------------------------------------------- main
def main(argv):
    del argv
    if FLAGS.client_only:
        print(json.dumps(asyncio.run(_client_load(FLAGS.client_only, FLAGS.rps_requests, FLAGS.rps_concurrency,
                                                  FLAGS.rps_prompt_len, FLAGS.rps_max_tokens, FLAGS.seed))))
        return
    for p in FLAGS.policies:
        if p not in POLICIES:
            raise app.UsageError(f"unknown policy {p!r}; choose from {POLICIES}")
    rng = random.Random(FLAGS.seed)
    report = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "cpus": os.cpu_count()}, "flags": {f: FLAGS[f].value for f in (
                              "page_size", "instances", "tree_tokens", "decisions", "rps_instances",
                              "rps_requests", "rps_concurrency", "hit_instances", "hit_cache_pages", "sessions",
                              "turns")}}

    routing = bench_routing(rng)
    report["routing"] = routing
    print_table(f"Routing decision latency: {routing['tree_tokens']:,} tokens in {routing['tree_nodes']:,} tree "
                f"nodes, {routing['instances']} instances (tree built in {routing['build_s']:.1f} s)",
                ["policy", "p50 us", "p99 us", "mean us", "CPU p50 us", "CPU p99 us"],
                [["(tree match only)", f"{routing['match_only']['p50_us']:.1f}",
                  f"{routing['match_only']['p99_us']:.1f}", "", "", ""]] +
                [[p, f"{r['p50_us']:.1f}", f"{r['p99_us']:.1f}", f"{r['mean_us']:.1f}", f"{r['cpu_p50_us']:.1f}",
                  f"{r['cpu_p99_us']:.1f}"] for p, r in routing["policies"].items()])

    rps = asyncio.run(bench_throughput())
    report["throughput"] = rps
    print_table(f"Throughput through the scheduler: {rps['instances']} instant fake instances, "
                f"{rps['concurrency']} in flight, clients: {rps['client']}",
                ["requests", "errors", "req/s", "p50 ms", "p99 ms", "server CPU ms/request"],
                [[rps["requests"], rps["errors"], f"{rps['rps']:.0f}", f"{rps['p50_ms']:.2f}",
                  f"{rps['p99_ms']:.2f}", f"{rps['server_cpu_ms_per_request']:.2f}"]])

    sessions = multi_turn_sessions(random.Random(FLAGS.seed + 1))
    hits = {}
    for policy in FLAGS.policies:
        hits[policy] = asyncio.run(bench_hit_rate(policy, sessions))
    report["hit_rate"] = hits
    print_table(f"Multi-turn hit rate: {FLAGS.hit_instances} instances x {FLAGS.hit_cache_pages} pages of "
                f"{FLAGS.page_size}, {FLAGS.sessions} sessions x {FLAGS.turns} turns",
                ["policy", "hit rate", "predicted", "TTFT mean ms", "TTFT p99 ms", "JCT mean ms",
                 "prompt tokens per instance"],
                [[p, f"{h['hit_rate']:.3f}", f"{h['predicted_hit_rate']:.3f}", f"{h['ttft_mean_ms']:.1f}",
                  f"{h['ttft_p99_ms']:.1f}", f"{h['jct_mean_ms']:.1f}", h["prompt_tokens_per_instance"]]
                 for p, h in hits.items()])

    out = Path(FLAGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    app.run(main)
