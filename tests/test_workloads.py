"""Workload generators: determinism, shapes, session structure, trace replay mapping."""

import json

import pytest

from jaxserve.bench import workloads as w


@pytest.mark.parametrize("name", ["shared_prefix", "multi_turn", "react", "long_doc_qa"])
def test_deterministic_and_seeded(name):
    a, b, c = w.make(name, seed=1), w.make(name, seed=1), w.make(name, seed=2)
    assert a == b and a != c
    s = a.sessions[0]
    assert a.tokens(s.prompt_segments(0)) == b.tokens(s.prompt_segments(0))
    assert all(0 <= t < a.vocab_size for t in a.tokens(s.prompt_segments(0)))


def test_shapes():
    sp = w.shared_prefix(num_groups=3, prompts_per_group=4, system_len=100, question_len=10, output_len=7)
    assert len(sp.sessions) == 12 and {len(s.turns) for s in sp.sessions} == {1}
    assert len({s.prefix for s in sp.sessions}) == 3 and set(sp.prompt_lengths()) == {110}
    react = w.react(num_sessions=5, fewshot_len=300, min_steps=2, max_steps=4)
    assert len({s.prefix for s in react.sessions}) == 1 and all(2 <= len(s.turns) <= 4 for s in react.sessions)
    qa = w.long_doc_qa(num_docs=2, questions_per_doc=5, doc_mean=1000)
    assert len(qa.sessions) == 10 and len({s.prefix for s in qa.sessions}) == 2
    assert all(not s.carry_history or len(s.turns) == 1 for s in qa.sessions)
    chat = w.multi_turn(num_sessions=50, mean_turns=4, max_turns=8)
    turns = [len(s.turns) for s in chat.sessions]
    assert max(turns) <= 8 and 2.5 < sum(turns) / len(turns) < 5.5
    for name, preset in w.DEMO_PRESETS.items():
        if name == "trace" and not w.DEFAULT_TRACE.exists():
            continue  # CI has shared/ beside the clone; a bare clone does not
        assert w.make(name, **preset).max_context() <= 1024, name


def test_turn_prompts_carry_history():
    chat = w.multi_turn(num_sessions=3, mean_turns=4, max_turns=4, seed=5)
    s = next(s for s in chat.sessions if len(s.turns) >= 2)
    p0, p1 = s.prompt_segments(0), s.prompt_segments(1)
    assert p1[:len(p0)] == p0  # turn 1 extends turn 0's prompt ...
    assert p1[len(p0)] == w.answer_segment(s.session_id, 0, s.turns[0].output_len)  # ... with its answer
    real_answer = w.Segment(999, s.turns[0].output_len)
    assert s.prompt_segments(1, [real_answer])[len(p0)] == real_answer


def test_trace_replay_mapping(tmp_path):
    path = tmp_path / "t.jsonl"
    rows = [dict(timestamp=1000, input_length=1100, output_length=10, hash_ids=[0, 1, 2]),
            dict(timestamp=1500, input_length=700, output_length=4, hash_ids=[0, 1]),
            dict(timestamp=3000, input_length=600, output_length=4, hash_ids=[7, 8])]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    tr = w.trace(path)
    assert [s.arrival_s for s in tr.sessions] == [0.0, 0.5, 2.0]
    toks = [tr.tokens(s.prompt_segments(0)) for s in tr.sessions]
    assert [len(t) for t in toks] == [1100, 700, 600]
    assert toks[0][:700] == toks[1]             # shared hash ids -> shared tokens (partial last block too)
    assert toks[0][:512] != toks[2][:512]
    assert toks[0][:512] == w.trace(path, seed=9).tokens(w.trace(path, seed=9).sessions[0].prompt_segments(0))[:512]
    half = w.trace(path, length_scale=0.5, time_scale=2.0)
    assert [sum(g.length for g in s.prompt_segments(0)) for s in half.sessions] == [550, 350, 300]
    assert half.sessions[2].arrival_s == 1.0 and half.sessions[0].turns[0].output_len == 5
    assert half.sessions[0].prompt_segments(0)[0].length == 256


@pytest.mark.skipif(not w.DEFAULT_TRACE.exists(), reason=f"the shared trace is not beside this clone ({w.DEFAULT_TRACE})")
def test_real_trace_loads():
    tr = w.trace(max_requests=50, length_scale=1 / 16)
    assert len(tr.sessions) == 50 and tr.sessions[0].arrival_s == 0.0
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(tr.sessions, tr.sessions[1:]))


def test_poisson_arrivals():
    wl = w.multi_turn(num_sessions=400)
    a = w.poisson_arrivals(wl, 10.0, seed=1)
    assert a == w.poisson_arrivals(wl, 10.0, seed=1) and a[0] == 0.0
    assert 30 < a[-1] < 50  # 399 gaps of mean 0.1 s
    assert set(w.poisson_arrivals(wl, 0)) == {0.0}
