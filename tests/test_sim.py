"""Simulator sanity: conservation, caching lowers TTFT, locality hits more than least-load on multi-turn,
PD moves KV, calibration fit, and the real scheduler code is what routes."""

import dataclasses

import pytest

from jaxserve.bench import report, workloads as w
from jaxserve.sim.cluster import SETTINGS, PageHasher, SimConfig, Simulator, simulate
from jaxserve.sim.cost import ClusterCost, LinearStep, RooflineStep, h200_llama8b, load_cost


def chat():
    return w.multi_turn(num_sessions=48, mean_turns=4, max_turns=8, seed=0)


@pytest.mark.parametrize("setting", SETTINGS)
def test_conservation_every_request_completes(setting):
    wl = w.react(num_sessions=20, seed=1)
    recs = simulate(wl, h200_llama8b(), setting=setting, policy="locality", num_instances=4, rate=5)
    assert len(recs) == wl.num_requests and len({r["request_id"] for r in recs}) == len(recs)
    for r in recs:
        assert 0 < r["ttft_s"] <= r["jct_s"] and r["cached_tokens"] < r["prompt_tokens"]
    # session order: turn k+1 arrives after turn k's answer
    by = {(r["session_id"], r["turn"]): r for r in recs}
    for (sid, k), r in by.items():
        if k:
            prev = by[(sid, k - 1)]
            assert r["arrival_s"] >= prev["arrival_s"] + prev["jct_s"] - 1e-9
    if setting.startswith("pd"):
        assert all(r["prefill_instance_id"].startswith("p") and r["instance_id"].startswith("d") for r in recs)
        assert sum(r["kv_bytes"] for r in recs) > 0


def test_more_cache_lower_ttft():
    wl = chat()
    cost = h200_llama8b()
    ttft = {}
    for setting in ("colocated", "colocated+cache"):
        ttft[setting] = report.summarize(simulate(wl, cost, setting=setting, num_instances=4, rate=4))["ttft"]["mean"]
    small = dataclasses.replace(cost, kv_pages=600)  # a KV pool too small to keep the sessions cached
    for setting in ("colocated", "colocated+cache"):
        ttft["small " + setting] = report.summarize(simulate(wl, small, setting=setting, num_instances=4,
                                                             rate=4))["ttft"]["mean"]
    assert ttft["colocated+cache"] < ttft["small colocated+cache"] < ttft["small colocated"]
    assert ttft["colocated+cache"] < 0.5 * ttft["colocated"]


def test_locality_hits_more_than_least_load_on_multi_turn():
    wl = chat()
    hit = {p: report.summarize(simulate(wl, h200_llama8b(), setting="colocated+cache", policy=p, num_instances=4,
                                        rate=4))["hit_rate"] for p in ("locality", "least_load", "session")}
    assert hit["locality"] >= hit["least_load"] + 0.1 and hit["session"] >= hit["least_load"]


def test_pd_caching_moves_less_kv():
    wl = chat()
    kv = {s: report.summarize(simulate(wl, h200_llama8b(), setting=s, num_instances=4, rate=4))["kv_bytes"]
          for s in ("pd", "pd+cache")}
    assert 0 < kv["pd+cache"] < kv["pd"]


def test_prompt_trees_follow_the_caches():
    sim = Simulator(h200_llama8b(kv_pages=300), SimConfig(setting="colocated+cache", num_instances=3, rate=4))
    sim.run(chat())
    tree = sim.router.trees[sim.instances[0].role]
    tree.check_invariants()
    for inst in sim.instances:
        assert tree.held_tokens(inst.iid) == len(inst.cache)  # tree "tokens" are pages here
        assert len(inst.cache) <= 300


def test_page_hasher_shares_exactly_common_pages():
    h = PageHasher(16)
    a = h.extend_all(h.empty(), [w.Segment(1, 40), w.Segment(2, 30)])
    b = h.extend_all(h.empty(), [w.Segment(1, 40), w.Segment(3, 30)])
    assert a[0][:2] == b[0][:2] and a[0][2:] != b[0][2:] and len(a[0]) == 4
    assert h.extend(h.extend(h.empty(), w.Segment(1, 20)), w.Segment(2, 5)) != h.extend(h.empty(), w.Segment(1, 25))
    # a segment cut short shares the pages of the full block it is a prefix of
    c = h.extend(h.empty(), w.Segment(5, 100, full=512))
    d = h.extend(h.empty(), w.Segment(5, 512))
    assert d[0][:6] == c[0][:6]


def test_cost_models():
    cost = h200_llama8b()
    assert cost.prefill_time(8192) > 10 * cost.prefill_time(512) / 2
    assert cost.prefill_time(4096, 3584) < cost.prefill_time(4096) / 4
    roof = cost.step
    assert isinstance(roof, RooflineStep) and roof.kv_bytes_per_token == 131072
    # decode of a small batch is bound by reading the weights: ~16 GB / (4.8 TB/s x 0.8)
    assert 3e-3 < roof.step(0, 0, 1, 512) < 6e-3
    # the NNLS fit recovers a linear step model
    true = LinearStep(1e-3, 2e-5, 1e-9, 5e-5, 1e-8)
    rows, secs = [], []
    for p, pairs, b, ctx in [(256, 3e4, 0, 0), (16, 100, 0, 0), (0, 0, 8, 4000), (0, 0, 32, 9000), (128, 9e4, 4, 800),
                             (64, 5e3, 0, 0), (0, 0, 1, 100)]:
        rows.append(LinearStep.features(p, pairs, b, ctx))
        secs.append(true.step(p, pairs, b, ctx))
    fit = LinearStep.fit(rows, secs)
    assert fit.step(200, 5e4, 3, 900) == pytest.approx(true.step(200, 5e4, 3, 900), rel=1e-6)


def test_cost_json_roundtrip(tmp_path):
    for cost in (h200_llama8b(), ClusterCost(step=LinearStep(1e-3, 1e-5, 0, 1e-4, 0), name="x")):
        cost.save(tmp_path / "c.json")
        assert load_cost(str(tmp_path / "c.json")) == cost


def test_pd_caching2_sends_nothing_back():
    wl = chat()
    kv = {b: report.summarize(simulate(wl, h200_llama8b(), setting="pd+cache", num_instances=4, rate=4,
                                       send_back=b))["kv_bytes"] for b in (True, False)}
    assert 0 < kv[False] < kv[True]


def test_table_prefill_fraction_and_validate_compare(tmp_path):
    from jaxserve.launch.sim import compare, prefill_fraction
    assert prefill_fraction("0.25", "loogle") == 0.25
    assert prefill_fraction("sharegpt:0.125,loogle:0.5", "sharegpt") == 0.125
    assert prefill_fraction("sharegpt:0.125", "react") == 0.5
    real = [dict(ok=True, arrival_s=0.0, ttft_s=1.0, jct_s=2.0, prompt_tokens=10, cached_tokens=0, output_tokens=5)]
    sim = [dict(real[0], ttft_s=1.1, jct_s=2.5)]
    res = compare(real, sim, tmp_path, 0.15)
    assert res["ttft"]["rel_err"] == pytest.approx(0.1) and res["jct"]["rel_err"] == pytest.approx(0.25)
    assert not res["ok"] and (tmp_path / "validate.json").exists()


def test_calibration_fit_recovers_a_per_chunk_cost():
    """fit_samples (jaxserve.launch.sim calibrate / refit): prefill samples whose time has a per-chunk overhead and
    decode samples are fitted back exactly by the 6-term step model."""
    from jaxserve.launch.sim import fit_samples
    true = LinearStep(6e-4, 4e-5, 1.3e-7, 7e-5, 1.3e-6, 3.6e-3)
    samples = []
    for n in (32, 128, 256, 512, 896):
        for c in (0, n // 2 // 16 * 16, n * 7 // 8 // 16 * 16):
            done, secs = c, 0.0
            while done < n:
                k = min(256, n - done)
                secs += true.step(k, k * (2 * done + k + 1) / 2, 0, 0, 1)
                done += k
            samples.append(dict(kind="prefill", prompt_len=n, cached_len=c, seconds=secs))
    for b in (1, 4, 16):
        for plen in (32, 256):
            samples.append(dict(kind="decode", batch=b, prompt_len=plen, step_s=true.step(0, 0, b, b * (plen + 12))))
    step, err = fit_samples(samples)
    assert max(err) < 1e-6 and step.chunk_s == pytest.approx(true.chunk_s, rel=1e-4)


def _one_instance(cost, **config):
    return Simulator(cost, SimConfig(num_instances=1, **config))


def test_preemption_when_the_pool_runs_out_and_every_request_completes():
    wl = w.multi_turn(num_sessions=24, mean_turns=1, max_turns=1, seed=3)
    # ~24 concurrent sessions of a few hundred tokens each: 120 pages cannot hold them all while they decode.
    small, big = (_one_instance(h200_llama8b(kv_pages=n), setting="colocated+cache", rate=1000) for n in (120, 100000))
    recs = {n: sim.run(wl) for n, sim in (("small", small), ("big", big))}
    assert small.instances[0].preemptions > 0 and big.instances[0].preemptions == 0
    for rs in recs.values():
        assert sorted(r["request_id"] for r in rs) == sorted(f"{s.session_id}-t0" for s in wl.sessions)
        assert all(r["output_tokens"] > 0 and r["jct_s"] >= r["ttft_s"] > 0 for r in rs)
    # Recompute costs prefill work: the small pool computes more prompt tokens than there are.
    assert small.instances[0].prefill_tokens > big.instances[0].prefill_tokens
    assert small.instances[0].used_pages == big.instances[0].used_pages == 0  # everything released


def test_concurrent_shared_prefix_is_computed_once():
    wl = w.shared_prefix(num_groups=1, prompts_per_group=8, system_len=2048, question_len=64, seed=0)
    runs = {}
    for setting in ("colocated", "colocated+cache"):
        # All 8 arrive at once; the first prefill takes two steps, the second with room to spare.
        sim = _one_instance(h200_llama8b(max_num_batched_tokens=1500), setting=setting, rate=1e6)
        sim.run(wl)
        runs[setting] = sim.instances[0]
    prompt = sum(sum(seg.length for seg in s.prompt_segments(0)) for s in wl.sessions)
    assert runs["colocated"].prefill_tokens == prompt
    # The 2048-token prefix is computed by the first request; the other 7 wait for its pages, then reuse them.
    assert runs["colocated+cache"].deferrals > 0
    assert runs["colocated+cache"].prefill_tokens <= 2048 + 8 * (64 + 16)


def test_transfers_share_each_instance_link():
    cost = h200_llama8b(transfer_bytes_s=1e9, transfer_latency_s=0.0)
    sim = Simulator(cost, SimConfig(setting="pd", num_instances=4))
    p0, p1, d0, d1 = sim.instances
    assert sim._link(p0, d0, 0.0, 1e9) == pytest.approx(1.0)
    assert sim._link(p0, d1, 0.0, 1e9) == pytest.approx(2.0)   # same sender: queued behind the first
    assert sim._link(p1, d0, 0.5, 1e9) == pytest.approx(2.0)   # same receiver as the first
    assert sim._link(p1, d1, 2.5, 1e9) == pytest.approx(3.5)   # links free again
    free = Simulator(dataclasses.replace(cost, transfer_contention=False), SimConfig(setting="pd", num_instances=4))
    q0, _, e0, e1 = free.instances
    assert free._link(q0, e0, 0.0, 1e9) == free._link(q0, e1, 0.0, 1e9) == pytest.approx(1.0)


def test_miss_weight_reaches_locality_and_sessions_fallback():
    for policy in ("locality", "session"):
        sim = Simulator(h200_llama8b(), SimConfig(setting="pd+cache", policy=policy, num_instances=4, miss_weight=0.5))
        for p in sim.router._policies.values():
            loc = p if policy == "locality" else p._fallback
            assert loc.miss_weight == 0.5


def test_a_deferred_follower_keeps_its_place_in_line():
    # Group 0's three prompts arrive before group 1's. The followers wait for their leader's 768-token prefix
    # (deferred while it is computed), then run before group 1's leader computes its next chunk.
    wl = w.shared_prefix(num_groups=2, prompts_per_group=3, system_len=768, question_len=64, seed=0)
    order = sorted(wl.sessions, key=lambda s: s.session_id)
    wl = dataclasses.replace(wl, sessions=[dataclasses.replace(s, arrival_s=i * 1e-9) for i, s in enumerate(order)])
    sim = _one_instance(h200_llama8b(max_num_batched_tokens=512), setting="colocated+cache")
    first = {r["session_id"]: r["arrival_s"] + r["ttft_s"] for r in sim.run(wl)}
    leader0, *followers0 = [s.session_id for s in order[:3]]
    leader1 = order[3].session_id
    assert sim.instances[0].deferrals > 0
    assert first[leader0] < max(first[f] for f in followers0) < first[leader1]
