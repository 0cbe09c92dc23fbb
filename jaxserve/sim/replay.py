"""Trace replay through the simulator (issue 18): one workload under several cluster configurations side by
side, hit rates split by where the reused KV came from (local device, local host tier, a peer), KV bytes moved,
and the infinite-cache ideal of the trace (every prefix seen before is reusable, nothing evicted, nothing
busy) to measure them against."""

from __future__ import annotations

import dataclasses
import time

from jaxserve.bench import report
from jaxserve.bench.workloads import Workload, poisson_arrivals
from jaxserve.sim.cluster import SimConfig, Simulator
from jaxserve.sim.pages import PageHasher


def ideal_hit_rate(workload: Workload, page_size: int, rate: float = 1.0, seed: int = 0) -> float:
    """Prompt tokens an infinite cache shared by the whole cluster would serve, over all prompt tokens: in
    arrival order, each prompt reuses its longest whole-page prefix seen in any earlier prompt (pages named as
    the simulator names them; the last prompt token is always computed, as in the engine). For single-turn
    sessions (a trace's requests); ValueError otherwise."""
    if any(len(s.turns) != 1 for s in workload.sessions):
        raise ValueError("ideal_hit_rate needs single-turn sessions (trace replay)")
    hasher = PageHasher(page_size)
    order = sorted(zip(poisson_arrivals(workload, rate, seed), range(len(workload.sessions))))
    seen: set = set()
    hits = total = 0
    for _, i in order:
        s = workload.sessions[i]
        pages = hasher.extend_all(hasher.empty(), list(s.prefix) + list(s.turns[0].user))[0]
        plen = sum(seg.length for seg in s.prompt_segments(0))
        n = 0
        for p in pages[:(plen - 1) // page_size]:
            if p not in seen:
                break
            n += 1
        hits += n * page_size
        total += plen
        seen.update(pages)
    return hits / total if total else 0.0


@dataclasses.dataclass(frozen=True)
class Variant:
    label: str
    policy: str
    host_tier: bool = False
    peer_fetch: bool = False


VARIANTS = (
    Variant("locality", "locality"),
    Variant("locality+host", "locality", host_tier=True),
    Variant("kv_pool host only", "kv_pool", host_tier=True, peer_fetch=False),
    Variant("kv_pool peer only", "kv_pool", host_tier=False, peer_fetch=True),
    Variant("kv_pool peer+host", "kv_pool", host_tier=True, peer_fetch=True),
    Variant("least_load", "least_load"),
    Variant("round_robin", "round_robin"),
)


def summarize(records: list[dict], sim: Simulator) -> dict:
    s = report.summarize(records)
    prompt = sum(r["prompt_tokens"] for r in records) or 1
    peer = host = local = 0
    for r in records:  # moves can be lost again before admission: count only what was reused
        c = r["cached_tokens"]
        p = min(r["peer_tokens"], c)
        h = min(r["host_tokens"], c - p)
        peer, host, local = peer + p, host + h, local + c - p - h
    busy = [i.busy_s / sim.now for i in sim.instances] if sim.now else [0.0]
    return dict(requests=len(records), ttft_mean=s["ttft"]["mean"], ttft_p99=s["ttft"]["p99"],
                jct_mean=s["jct"]["mean"], jct_p99=s["jct"]["p99"], hit_rate=s["hit_rate"],
                hit_local_device=local / prompt, hit_local_host=host / prompt, hit_peer=peer / prompt,
                peer_bytes=sum(r["peer_bytes"] for r in records), host_bytes=sum(r["host_bytes"] for r in records),
                kv_bytes=sum(r["kv_bytes"] for r in records), busy_min=min(busy), busy_max=max(busy),
                busy_mean=sum(busy) / len(busy),
                max_share=max(_shares(records).values()) if records else 0.0)


def _shares(records):
    out: dict = {}
    for r in records:
        key = r["prefill_instance_id"] or r["instance_id"]
        out[key] = out.get(key, 0) + 1
    return {k: v / len(records) for k, v in out.items()}


def replay(workload: Workload, cost, instances: list[int], settings: list[str], variants=VARIANTS,
           num_prefill=None, seed: int = 0, log=print) -> list[dict]:
    """Every (instances, setting, variant) on the workload; rows of `summarize` plus their configuration."""
    ideal = ideal_hit_rate(workload, cost.page_size, seed=seed)
    log(f"infinite-cache ideal hit rate: {ideal:.3f}")
    rows = []
    for n in instances:
        for setting in settings:
            n_p = None
            if setting.startswith("pd"):
                n_p = num_prefill(n) if callable(num_prefill) else (num_prefill or max(1, n // 2))
            for v in variants:
                t0 = time.time()
                sim = Simulator(cost, SimConfig(setting=setting, policy=v.policy, num_instances=n, seed=seed,
                                                num_prefill=n_p, host_tier=v.host_tier, peer_fetch=v.peer_fetch))
                row = dict(instances=n, setting=setting, variant=v.label, policy=v.policy, host_tier=v.host_tier,
                           peer_fetch=v.peer_fetch, num_prefill=n_p or 0, ideal_hit_rate=ideal,
                           **summarize(sim.run(workload), sim))
                row["of_ideal"] = row["hit_rate"] / ideal if ideal else 0.0
                row["sim_s"] = time.time() - t0
                rows.append(row)
                log(f"n={n:2d} {setting:15s} {v.label:18s} hit {row['hit_rate']:.3f} ({row['of_ideal']:.0%} of ideal; "
                    f"device {row['hit_local_device']:.3f} host {row['hit_local_host']:.3f} peer {row['hit_peer']:.3f})"
                    f"  TTFT mean {row['ttft_mean'] * 1e3:7.0f} p99 {row['ttft_p99'] * 1e3:7.0f} ms  busy "
                    f"{row['busy_mean']:.2f}  moved peer {row['peer_bytes'] / 2**30:7.1f} GiB host "
                    f"{row['host_bytes'] / 2**30:7.1f} GiB  ({row['sim_s']:.0f}s)")
    return rows


def table_md(rows: list[dict]) -> str:
    lines = ["| inst | setting | variant | hit | of ideal | local device | local host | peer | TTFT mean ms | "
             "TTFT p99 ms | JCT mean s | busy | max share | peer GiB | host GiB | all KV moved GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['instances']} | {r['setting']} | {r['variant']} | {r['hit_rate']:.3f} | "
                     f"{r['of_ideal']:.0%} | {r['hit_local_device']:.3f} | {r['hit_local_host']:.3f} | "
                     f"{r['hit_peer']:.3f} | {r['ttft_mean'] * 1e3:.0f} | {r['ttft_p99'] * 1e3:.0f} | "
                     f"{r['jct_mean']:.2f} | {r['busy_mean']:.2f} | {r['max_share']:.0%} | "
                     f"{r['peer_bytes'] / 2**30:.1f} | {r['host_bytes'] / 2**30:.1f} | {r['kv_bytes'] / 2**30:.1f} |")
    if rows:
        lines.append(f"\nInfinite-cache ideal hit rate of the trace: {rows[0]['ideal_hit_rate']:.3f}")
    return "\n".join(lines) + "\n"
