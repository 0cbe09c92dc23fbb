"""The step trace (`--step_trace`): a served request's milestones as the engine loop records them (arrival, each
step that holds it, first token, hand-over) and as the scheduler records them (HTTP request in, routed, first
tokens back, first token written), and the spans computed from one trace or both."""

from __future__ import annotations

import io
import json
import threading
import time

import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.config import ModelConfig
from jaxserve.engine import step_trace
from jaxserve.engine.step_trace import StepTrace

CFG = ModelConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, max_position_embeddings=256)
PAGE = 8


def test_spans_from_a_trace_are_the_milestones_differences():
    """Independent arithmetic: one request through two chunks, another that never got its first token."""
    events = [dict(t=10.000, event="arrive", request_id="a", prompt_tokens=40),
              dict(t=10.004, event="dispatch", t0=10.003, entries=[["a", 32, 0]]),
              dict(t=10.009, event="arrive", request_id="b", prompt_tokens=8),
              dict(t=10.011, event="dispatch", t0=10.010, entries=[["a", 8, 32]]),
              dict(t=10.030, event="first_token", request_ids=["a"]),
              dict(t=10.0325, event="handed_over", request_ids=["a"])]
    (span,) = step_trace.request_spans(events)
    assert span["request_id"] == "a" and span["prompt_tokens"] == 40 and span["cached_tokens"] == 0
    assert span["queued_ms"] == pytest.approx(3.0)
    assert span["compute_ms"] == pytest.approx(27.0)  # from the first chunk's dispatch, not the last one's
    assert span["handover_ms"] == pytest.approx(2.5)
    table = step_trace.summary([span])
    assert "| 40 | 0 | 1 | 3.00 (3.00) | 27.00 (27.00) | 2.50 (2.50) |" in table


def test_the_engine_loop_records_each_requests_milestones_in_order():
    from jaxserve.instance.engine_loop import EngineLoop, Sink

    class Done(Sink):
        def __init__(self):
            self.events, self.done = [], threading.Event()

        def push(self, event):
            self.events.append(event)
            if event[0] in ("error", "finish"):
                self.done.set()

    engine = LLM(model=CFG, page_size=PAGE, num_pages=64, max_num_batched_tokens=32, max_num_seqs=4, seed=0).engine
    out = io.StringIO()
    engine.step_trace = StepTrace(out)
    loop = EngineLoop(engine)
    loop.start()
    prompts = {"long#0": list(range(1, 41)), "short#1": list(range(50, 62))}  # 40 tokens: two chunks of 32 + 8
    max_tokens = 3
    sinks = {}
    try:
        for rid, prompt in prompts.items():
            sinks[rid] = Done()
            loop.add(rid, rid, prompt, [], SamplingParams(max_tokens=max_tokens, ignore_eos=True), sinks[rid],
                     time.perf_counter())
        for rid, sink in sinks.items():
            assert sink.done.wait(120), (rid, sink.events)
            assert sink.events[-1][0] == "finish", sink.events
        # A prompt sharing the long one's first 4 pages: its first step starts after them.
        rid = "again#2"
        prompts[rid] = prompts["long#0"][:32] + list(range(100, 108))
        sinks[rid] = Done()
        loop.add(rid, rid, prompts[rid], [], SamplingParams(max_tokens=max_tokens, ignore_eos=True), sinks[rid],
                 time.perf_counter())
        assert sinks[rid].done.wait(120) and sinks[rid].events[-1][0] == "finish", sinks[rid].events
    finally:
        loop.stop()
    cached = {"long#0": 0, "short#1": 0, "again#2": 32}
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    for rid, prompt in prompts.items():
        arrive = [e for e in events if e["event"] == "arrive" and e["request_id"] == rid]
        assert [e["prompt_tokens"] for e in arrive] == [len(prompt)]
        steps = [(e, n, start) for e in events if e["event"] == "dispatch" for r, n, start in e["entries"]
                 if r == rid]
        # Every token the request computed was in a dispatched step, each step starting where the one before
        # ended: its uncached prompt, then one per later output.
        starts = [start for _, _, start in steps]
        assert starts[0] == cached[rid] and all(a + n == b for (_, n, a), b in zip(steps, starts[1:])), steps
        assert sum(n for _, n, _ in steps) == len(prompt) - cached[rid] + max_tokens - 1, steps
        firsts = [e for e in events if e["event"] == "first_token" and rid in e["request_ids"]]
        handed = [e for e in events if e["event"] == "handed_over" and rid in e["request_ids"]]
        assert len(firsts) == 1 and len(handed) == 1, (firsts, handed)
        assert arrive[0]["t"] <= steps[0][0]["t0"] <= steps[0][0]["t"] <= firsts[0]["t"] <= handed[0]["t"]
        # The first token is handed over in the loop step that completed it: no later step of the request is
        # dispatched in between (async scheduling dispatches the next step before completing this one).
        between = events[events.index(firsts[0]):events.index(handed[0])]
        assert not [e for e in between if e["event"] == "dispatch" and rid in [r for r, _, _ in e["entries"]]]
    spans = {s["request_id"]: s for s in step_trace.request_spans(events)}
    assert set(spans) == {rid.split("#")[0] for rid in prompts}  # keyed by the scheduler's id
    assert {rid: s["cached_tokens"] for rid, s in spans.items()} == {r.split("#")[0]: c for r, c in cached.items()}
    assert all(s["queued_ms"] >= 0 and s["compute_ms"] > 0 and s["handover_ms"] >= 0 for s in spans.values())


def test_a_scheduler_trace_joins_the_instance_trace_by_request_id():
    """Independent arithmetic over both processes' events, in file order (scheduler file, then instance file)."""
    scheduler = [dict(t=5.0015, event="http_in", t0=5.000, request_ids=["cmpl-x-0"], stream=True),
                 dict(t=5.002, event="routed", request_id="cmpl-x-0", instance_id="i-0"),
                 dict(t=5.031, event="first_response", request_id="cmpl-x-0"),
                 dict(t=5.0325, event="first_write", request_id="cmpl-x-0"),
                 dict(t=6.000, event="http_in", t0=5.999, request_ids=["cmpl-y-0"], stream=True),
                 dict(t=6.001, event="routed", request_id="cmpl-y-0", instance_id="i-0")]  # never answered
    instance = [dict(t=5.003, event="arrive", request_id="cmpl-x-0#7", prompt_tokens=40),
                dict(t=5.005, event="dispatch", t0=5.004, entries=[["cmpl-x-0#7", 8, 32]]),
                dict(t=5.029, event="first_token", request_ids=["cmpl-x-0#7"]),
                dict(t=5.030, event="handed_over", request_ids=["cmpl-x-0#7"])]
    (span,) = step_trace.request_spans(scheduler + instance)
    assert span["request_id"] == "cmpl-x-0" and span["prompt_tokens"] == 40 and span["cached_tokens"] == 32
    want = dict(front_ms=2.0, to_engine_ms=1.0, queued_ms=1.0, compute_ms=25.0, handover_ms=1.0, back_ms=1.0,
                write_ms=1.5, total_ms=32.5)
    assert {k: span[k] for k in want} == pytest.approx(want)
    table = step_trace.summary([span])
    assert "| 40 | 32 | 1 | 2.00 (2.00) | 1.00 (1.00) | 1.00 (1.00) | 25.00 (25.00) | 1.00 (1.00) | 1.00 (1.00) " \
           "| 1.50 (1.50) | 32.50 (32.50) |" in table
    # The scheduler's trace alone: no lengths, only the spans between its own milestones.
    (alone,) = step_trace.request_spans(scheduler)
    assert set(k for k in alone if k.endswith("_ms")) == {"front_ms", "write_ms", "total_ms"}
    assert "| - | - | 1 |" in step_trace.summary([alone])


def test_a_served_request_leaves_every_milestone_once_in_path_order():
    """A real stack in process (scheduler + HTTP front + an instance with a tiny engine), one trace for both: a
    streamed request's milestones are all there once, in the order the path takes them; a second request whose
    prefix is cached starts its first step after it; a non-streamed one has no first write."""
    aiohttp = pytest.importorskip("aiohttp")
    from jaxserve.instance import InstanceConfig, InstanceServer
    from jaxserve.scheduler import GlobalSchedulerConfig, ModelInfo, Scheduler
    from jaxserve.scheduler.http_front import HttpFront
    from jaxserve.util import run_async

    out = io.StringIO()
    trace = StepTrace(out)
    engine = LLM(model=CFG, page_size=PAGE, num_pages=64, max_num_batched_tokens=32, max_num_seqs=4, seed=0,
                 compilation_cache="off").engine
    engine.step_trace = trace
    prompt = list(range(1, 41))

    async def body():
        scheduler = Scheduler(GlobalSchedulerConfig(port=0, profile_instances=False, shutdown_grace_s=0.0,
                                                    no_instance_wait_s=60.0), ModelInfo.byte_level(256))
        scheduler.core.step_trace = trace
        await scheduler.start()
        server = await InstanceServer(engine, InstanceConfig(role="colocated", scheduler_address=scheduler.address,
                                                             instance_id="i-0", shutdown_grace_s=0)).start()
        http = HttpFront(scheduler, port=0)
        await http.start()
        try:
            async with aiohttp.ClientSession() as session:
                for tokens, stream in ((prompt, True), (prompt[:32] + [7, 8, 9], True), ([5] * 12, False)):
                    body = {"prompt": tokens, "max_tokens": 3, "temperature": 0, "ignore_eos": True,
                            "stream": stream}
                    async with session.post(http.url + "/v1/completions", json=body) as resp:
                        assert resp.status == 200, await resp.text()
                        await resp.read()
        finally:
            await http.stop()
            await server.stop(0)
            await scheduler.stop(0)

    run_async(body())
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    requests = [e for e in events if e["event"] == "http_in"]
    assert [len(e["request_ids"]) for e in requests] == [1, 1, 1]
    ids = [e["request_ids"][0] for e in requests]
    order = ("http_in", "routed", "arrive", "dispatch", "first_token", "handed_over", "first_response",
             "first_write")
    for rid, streamed in zip(ids, (True, True, False)):
        def mine(e):
            names = e.get("request_ids", []) + [e.get("request_id", "")] + [r for r, _, _ in e.get("entries", [])]
            return rid in (n.split("#")[0] for n in names)
        seen = [e for e in events if mine(e)]
        kinds = [e["event"] for e in seen]
        for kind in order:
            want = 0 if kind == "first_write" and not streamed else 1
            if kind != "dispatch":  # one per step: at least one
                assert kinds.count(kind) == want, (rid, kind, kinds)
        times = {}
        for e in seen:
            times.setdefault(e["event"], e["t0"] if e["event"] in ("http_in", "dispatch") else e["t"])
        path = [times[k] for k in order if k in times]
        assert path == sorted(path), (rid, times)
    spans = {s["request_id"]: s for s in step_trace.request_spans(events)}
    assert [spans[r]["cached_tokens"] for r in ids] == [0, 32, 0]
    assert all(spans[r]["front_ms"] >= 0 and spans[r]["back_ms"] >= 0 for r in ids)
    assert "total_ms" in spans[ids[0]] and "total_ms" not in spans[ids[2]]
