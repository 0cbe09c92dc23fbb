"""The load generator end to end: a real scheduler on 127.0.0.1 with fake instances."""

import asyncio
import contextlib
import json
import subprocess
import sys

from jaxserve.bench import report, workloads
from jaxserve.bench.loadgen import LoadConfig, run_load
from jaxserve.proto.v1 import common_pb2
from jaxserve.scheduler import GlobalSchedulerConfig, ModelInfo, Scheduler
from jaxserve.testing.fake_instance import FakeInstance, expected_tokens

FAST = dict(health_interval_s=0.1, health_timeout_s=0.2, no_instance_wait_s=0.5, shutdown_grace_s=0.0)


@contextlib.asynccontextmanager
async def cluster(n=2, policy="locality"):
    scheduler = Scheduler(GlobalSchedulerConfig(port=0, policy=policy, **FAST), ModelInfo.byte_level(1024))
    await scheduler.start()
    fakes = [await FakeInstance(common_pb2.ROLE_COLOCATED, scheduler_address=scheduler.address,
                                instance_id=f"fake-{k}", page_size=16, token_delay_s=0.001).start()
             for k in range(n)]
    try:
        yield scheduler, fakes
    finally:
        for f in fakes:
            await f.kill()
        await scheduler.stop(0)


def test_load_generator_keeps_session_order_and_reports(tmp_path):
    wl = workloads.multi_turn(num_sessions=4, mean_turns=3, max_turns=3, user_mean=20, output_mean=6, max_len=40,
                              seed=3)

    async def body():
        async with cluster() as (scheduler, fakes):
            return await run_load(scheduler.address, wl, LoadConfig(rate=50, duration_s=5, grace_s=10,
                                                                     progress=False))

    records = asyncio.run(asyncio.wait_for(body(), 30))
    assert len(records) == wl.num_requests and all(r["ok"] for r in records)
    by_session = {}
    for r in records:
        by_session.setdefault(r["session_id"], []).append(r)
    for sid, recs in by_session.items():
        recs.sort(key=lambda r: r["turn"])
        session = next(s for s in wl.sessions if s.session_id == sid)
        for k, r in enumerate(recs):
            assert r["output_tokens"] == session.turns[k].output_len
            if k:
                prev = recs[k - 1]
                # turn k is sent after turn k-1 finished, and its prompt holds the previous prompt + answer
                assert r["arrival_s"] >= prev["arrival_s"] + prev["jct_s"] - 1e-6
                assert r["prompt_tokens"] == prev["prompt_tokens"] + prev["output_tokens"] + sum(
                    seg.length for seg in session.turns[k].user)
                # fake instances answer as a function of position; the history makes later turns hit cache
                assert r["cached_tokens"] >= (prev["prompt_tokens"] + prev["output_tokens"]) // 16 * 16 - 16
    summary = report.summarize(records, slo_ttft_s=5.0, slo_tpot_s=1.0)
    assert summary["completed"] == len(records) and summary["rejected"] == 0
    assert 0 < summary["hit_rate"] < 1 and summary["goodput_rps"] > 0
    assert summary["ttft"]["p50"] <= summary["jct"]["p50"]
    table = report.markdown_table({"a": summary, "b": summary})
    assert "1.00x" in table and "| a |" in table
    report.write_jsonl(tmp_path / "r.jsonl", records)
    assert report.read_jsonl(tmp_path / "r.jsonl") == json.loads(json.dumps(records))
    paths = report.plot({"a": records}, tmp_path)
    assert all((tmp_path / p).exists() for p in paths)


def test_load_generator_bounded_run_and_rejections():
    wl = workloads.shared_prefix(num_groups=2, prompts_per_group=3, system_len=64, question_len=8, output_len=4)

    async def body():
        async with cluster(n=1) as (scheduler, fakes):
            # every session starts at once; a 0 s duration still runs those starting at t=0
            wl_big = workloads.shared_prefix(num_groups=1, prompts_per_group=1, system_len=2000, question_len=8,
                                             output_len=4)  # longer than the 1024-token model: rejected
            bad = await run_load(scheduler.address, wl_big, LoadConfig(rate=0, duration_s=0, progress=False))
            good = await run_load(scheduler.address, wl, LoadConfig(rate=0, duration_s=0, progress=False))
            return bad, good

    bad, good = asyncio.run(asyncio.wait_for(body(), 30))
    assert [r["error"] for r in bad] == ["INVALID_ARGUMENT"]
    assert report.summarize(bad)["rejected"] == 1
    assert len(good) == 6 and all(r["ok"] for r in good)


def test_bench_has_no_jax():
    code = ("import sys, jaxserve.bench.loadgen, jaxserve.bench.report, jaxserve.bench.workloads, "
            "jaxserve.sim.cluster, jaxserve.sim.cost; assert 'jax' not in sys.modules, 'jax imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bench_settings_build_their_clusters():
    """Every setting builds a jaxserve.launch.local cluster (not started): pd = 1 prefill + 1 decode, basic; pd+cache =
    the chosen caching mode; colocated = 2 colocated instances with or without prefix caching."""
    from jaxserve.launch.bench import SETTINGS, cluster_for, kv_moved
    roles = {}
    for s in SETTINGS:
        c = cluster_for(s, "locality", pd_cache_mode="caching2")
        roles[s] = ([r for r, _ in c.roles], c.pd_mode if s.startswith("pd") else None,
                    c.instance_flags["prefix_caching"])
        assert c.instance_flags["precompile"] is True  # measured runs never wait on a compilation
    assert roles["colocated"] == (["colocated", "colocated"], None, False)
    assert roles["colocated+cache"] == (["colocated", "colocated"], None, True)
    assert roles["pd"] == (["prefill", "decode"], "basic", False)
    assert roles["pd+cache"] == (["prefill", "decode"], "caching2", True)
    before = {"p": dict(kv_sent_bytes=10), "d": dict(kv_received_bytes=10)}
    after = {"p": dict(kv_sent_bytes=110), "d": dict(kv_received_bytes=110)}
    assert kv_moved(after, before) == 100 and kv_moved({"p": dict(stats_error="x")}) is None


def test_shape_twin_warmup_has_the_shapes_and_none_of_the_tokens():
    from jaxserve.launch.bench import make_workload, shape_twin
    wl = make_workload("multi_turn", seed=0)
    twin = shape_twin(wl)
    assert twin.prompt_lengths() == wl.prompt_lengths() and twin.sessions == wl.sessions
    a = wl.tokens(wl.sessions[0].turns[0].user)
    b = twin.tokens(twin.sessions[0].turns[0].user)
    assert len(a) == len(b) and a != b
