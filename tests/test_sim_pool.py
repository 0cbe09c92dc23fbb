"""The simulator's cluster KV pool (issue 18): host tiers (evicted prefixes swapped back in over PCIe), peer
pulls chosen by kv_pool, per-pair links, the prompt trees' tiers following the instances' caches, and the
trace's infinite-cache ideal against an independent computation from its hash ids."""

import dataclasses
import json

import pytest

from jaxserve.bench import report, workloads as w
from jaxserve.mempool.prompt_index import HOST
from jaxserve.scheduler.router import COLOCATED
from jaxserve.sim.cluster import SimConfig, Simulator
from jaxserve.sim.cost import h200_llama8b
from jaxserve.sim.replay import ideal_hit_rate, replay, table_md


def docs():
    # 6 documents of ~6k tokens, 8 questions each, in random order: more than a 400-page (6,400-token) device
    # cache holds, so documents leave the device between their questions.
    return w.long_doc_qa(num_docs=6, questions_per_doc=8, doc_mean=6000, question_len=64, output_mean=16, seed=0)


def run(cost, wl, **config):
    sim = Simulator(cost, SimConfig(**config))
    return sim, sim.run(wl)


def test_host_tier_keeps_evicted_prefixes_and_charges_the_swap_in():
    wl = docs()
    small = h200_llama8b(kv_pages=400, host_kv_pages=4000)
    _, none = run(small, wl, setting="colocated+cache", num_instances=1, rate=2)
    sim, host = run(small, wl, setting="colocated+cache", num_instances=1, rate=2, host_tier=True)
    assert report.summarize(host)["hit_rate"] > report.summarize(none)["hit_rate"] + 0.1
    moved = [r for r in host if r["host_tokens"]]
    assert moved and all(r["host_bytes"] == r["host_tokens"] * small.kv_bytes_per_token for r in moved)
    assert all(r["peer_tokens"] == 0 for r in host)  # one instance: nothing to pull
    # The same run over a PCIe link 1000x slower: the same swap-ins, each costing its bytes / bandwidth.
    slow = dataclasses.replace(small, host_bytes_s=small.host_bytes_s / 1000)
    _, crawl = run(slow, wl, setting="colocated+cache", num_instances=1, rate=2, host_tier=True)
    assert report.summarize(crawl)["ttft"]["mean"] > report.summarize(host)["ttft"]["mean"]
    # The prompt tree knows which of the instance's pages are in its host tier (page units: one tree token
    # per page in the simulator).
    inst = sim.instances[0]
    tree = sim.router.trees[COLOCATED]
    book = inst.cache.book
    assert book.index.num_pages[HOST] > 0
    assert tree.host_tokens(inst.iid) == book.index.num_pages[HOST]
    assert tree.held_tokens(inst.iid) == book.index.num_pages[HOST] + len(inst.cache)
    tree.check_invariants()


def test_kv_pool_pulls_from_a_busy_holder_instead_of_recomputing(tmp_path):
    # An 8k-token prefix computed on one instance, then 16 requests extending it at once: its holder cannot
    # take them all quickly. Pulling 1 GiB at 50 GB/s (~21 ms) beats recomputing it (~0.2 s).
    lines = [dict(timestamp=0, input_length=8192, output_length=8, hash_ids=list(range(16)))]
    lines += [dict(timestamp=2000, input_length=8192 + 256, output_length=32, hash_ids=list(range(16)) + [100 + i])
              for i in range(16)]
    path = tmp_path / "burst.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    wl = w.trace(path)
    cost = h200_llama8b()
    out = {}
    for policy in ("locality", "kv_pool"):
        sim, recs = run(cost, wl, setting="colocated+cache", policy=policy, num_instances=4)
        out[policy] = (sim, recs, report.summarize(recs))
    sim, recs, s = out["kv_pool"]
    pulled = [r for r in recs if r["peer_tokens"]]
    assert pulled and all(r["peer_bytes"] == r["peer_tokens"] * cost.kv_bytes_per_token for r in pulled)
    assert all(r["kv_bytes"] >= r["peer_bytes"] for r in recs)
    assert len({r["instance_id"] for r in pulled}) >= 2  # several instances got the prefix by pulling it
    computed = {p: sum(i.prefill_tokens for i in out[p][0].instances) for p in out}
    assert computed["kv_pool"] < computed["locality"] or s["ttft"]["mean"] < out["locality"][2]["ttft"]["mean"]
    assert s["ttft"]["mean"] < out["locality"][2]["ttft"]["mean"]
    assert s["hit_rate"] >= out["locality"][2]["hit_rate"]
    assert all(r["peer_tokens"] == 0 for r in out["locality"][1])  # locality never pulls


def test_per_pair_links():
    cost = h200_llama8b(node_size=2, node_link_bytes_s=4e11, node_link_latency_s=0.0, transfer_bytes_s=1e9,
                        transfer_latency_s=0.0, transfer_contention=False)
    assert cost.link(0, 1) == (4e11, 0.0) and cost.link(1, 2) == (1e9, 0.0) and cost.link(2, 3) == (4e11, 0.0)
    sim = Simulator(cost, SimConfig(setting="colocated+cache", policy="kv_pool", num_instances=4))
    a, b, c, _ = sim.instances
    assert sim._link(a, b, 0.0, 4e11) == pytest.approx(1.0) and sim._link(a, c, 0.0, 1e9) == pytest.approx(1.0)
    tm = sim.router._policies[COLOCATED].transfer
    assert tm.link(a.iid, b.iid) == (4e11, 0.0) and tm.link(a.iid, c.iid) == (1e9, 0.0)
    assert tm.kv_bytes_per_token == cost.kv_bytes_per_token * cost.page_size  # a tree token is a page


def _trace_file(tmp_path):
    lines = [dict(timestamp=0, input_length=1000, output_length=4, hash_ids=[1, 2]),
             dict(timestamp=10, input_length=1500, output_length=4, hash_ids=[1, 2, 3]),   # reuses 1000
             dict(timestamp=20, input_length=700, output_length=4, hash_ids=[1, 9]),       # reuses 512
             dict(timestamp=30, input_length=1024, output_length=4, hash_ids=[1, 2])]      # all but the last page
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    return path


def test_ideal_hit_rate_of_a_small_trace(tmp_path):
    wl = w.trace(_trace_file(tmp_path))
    # Request 2 shares request 1's blocks 1 and 2 (the 488 tokens of block 2 that request 1 had, at page
    # granularity: 1000 // 16 pages); request 3 block 1; request 4 both blocks, less its last page.
    expect = (1000 // 16 * 16 + 512 + 1008) / (1000 + 1500 + 700 + 1024)
    assert ideal_hit_rate(wl, 16) == pytest.approx(expect)


def test_replay_rows_split_hits_and_stay_below_the_ideal(tmp_path):
    wl = w.trace(_trace_file(tmp_path))
    rows = replay(wl, h200_llama8b(), [2], ["colocated+cache"], log=lambda *_: None)
    for r in rows:
        assert r["requests"] == 4
        assert r["hit_rate"] <= r["ideal_hit_rate"] + 1e-9
        assert r["hit_local_device"] + r["hit_local_host"] + r["hit_peer"] == pytest.approx(r["hit_rate"])
    assert "of ideal" in table_md(rows)


def test_launch_sim_trace_mode_writes_table_and_json(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    from jaxserve.bench.workloads import DEFAULT_TRACE
    if not DEFAULT_TRACE.exists():
        pytest.skip(f"no shared trace at {DEFAULT_TRACE}")
    out = tmp_path / "trace"
    cmd = [sys.executable, "-m", "jaxserve.launch.sim", "--mode=trace", "--cost=h200", "--instances=2",
           "--trace_requests=30", "--trace_settings=colocated+cache", "--trace_variants=locality,kv_pool peer+host",
           f"--sim_out={out}"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads((out / "trace.json").read_text())
    assert [r["variant"] for r in data["rows"]] == ["locality", "kv_pool peer+host"]
    assert all(r["requests"] == 30 and 0 <= r["hit_rate"] <= r["ideal_hit_rate"] + 1e-9 for r in data["rows"])
    assert "of ideal" in (out / "trace.md").read_text()
    bad = subprocess.run(cmd[:-2] + ["--trace_variants=nope", f"--sim_out={out}"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=600)
    assert bad.returncode != 0 and "unknown --trace_variants" in bad.stderr
