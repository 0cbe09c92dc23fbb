"""The step trace (`--step_trace`): a served request's milestones (arrival, each step that holds it, first
token, hand-over) as the engine loop records them, and the spans computed from a trace."""

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
    assert set(spans) == set(prompts)
    assert {rid: s["cached_tokens"] for rid, s in spans.items()} == cached
    assert all(s["queued_ms"] >= 0 and s["compute_ms"] > 0 and s["handover_ms"] >= 0 for s in spans.values())
