"""Helpers of jaxserve/launch/bench_serve.py (jaxserve/bench/openai_client.py): event-stream parsing, token chunks, decode statistics, the table."""

import math

import numpy as np
import pytest

from jaxserve.bench import openai_client as bs


def test_parse_sse_line():
    assert bs.parse_sse_line(b'data: {"choices": []}\n') == {"choices": []}
    assert bs.parse_sse_line("data:[DONE]") == "[DONE]"
    assert bs.parse_sse_line(b"\n") is None
    assert bs.parse_sse_line(b": keep-alive\n") is None
    assert bs.parse_sse_line(b"event: x\n") is None
    with pytest.raises(ValueError):
        bs.parse_sse_line(b"data: {broken")


def test_chunk_tokens():
    assert bs.chunk_tokens({"choices": [{"index": 0, "text": " t5", "finish_reason": None}]})
    assert bs.chunk_tokens({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
    assert bs.chunk_tokens({"choices": [{"index": 0, "text": "", "token_ids": [7]}]})
    assert bs.chunk_tokens({"choices": [{"index": 0, "delta": {"content": "x"}}]})
    assert not bs.chunk_tokens({"choices": [{"index": 0, "text": "", "finish_reason": None}]})
    assert not bs.chunk_tokens({"choices": [], "usage": {"completion_tokens": 3}})
    assert not bs.chunk_tokens({"choices": None})


def test_random_prompt_avoids_special_ids():
    p = bs.random_prompt(np.random.default_rng(0), 1000, 8192)
    assert len(p) == 1000 and min(p) >= 3 and max(p) < 8192 and all(type(x) is int for x in p)


def _result(start, times, n=None):
    return bs.RequestResult(start=start, token_times=times, completion_tokens=n, cached_tokens=None,
                            end=times[-1])


def test_request_result_and_decode_stats():
    a = _result(0.0, [1.0, 2.0, 3.0])            # 3 tokens, TPOT 1
    b = _result(0.5, [2.0, 3.0, 4.0, 5.0], n=4)  # 4 tokens, TPOT 1
    assert a.ttft_s == 1.0 and a.num_tokens == 3 and a.tpot_s == 1.0
    assert _result(0.0, [1.0], n=1).tpot_s is None
    assert _result(0.0, [1.0, 3.0], n=5).tpot_s == 0.5  # usage beats the chunk count (several tokens per chunk)
    s = bs.decode_stats([a, b])
    assert s["tok_s"] == pytest.approx((2 + 3) / (5.0 - 1.0))
    assert s["tpot_p50_s"] == 1.0 and s["ttft_p50_s"] == 1.25 and s["total_tokens"] == 7


def test_format_table_and_ratios():
    metrics = [("cold_ttft_s", "cold (ms)", 1e3, False), ("decode_b8_tok_s", "b8 (tok/s)", 1.0, True)]
    rows = {"jaxserve": {"cold_ttft_s": [0.1, 0.3], "decode_b8_tok_s": [100.0, 300.0]},
            "vllm": {"cold_ttft_s": [0.4], "decode_b8_tok_s": [400.0]}}
    table = bs.format_table(rows, metrics, base="jaxserve").splitlines()
    assert table[0] == "| engine | cold (ms) | b8 (tok/s) |"
    assert table[2] == "| jaxserve | 200.0 | 200.0 |"
    assert table[3] == "| vllm | 400.0 | 400.0 |"
    assert table[4] == "| jaxserve / vllm | 0.50x | 0.50x |"
    only = bs.format_table({"jaxserve": {"cold_ttft_s": [0.1]}}, metrics).splitlines()
    assert len(only) == 3 and only[2] == "| jaxserve | 100.0 | - |"
    assert math.isnan(bs.median_or_nan([]))


def test_metric_list_names_every_decode_batch():
    keys = [k for k, _, _, _ in bs.metric_list(["8", "32"])]
    assert keys[-4:] == ["decode_b8_tok_s", "decode_b32_tok_s", "decode_b8_tpot_p50_s", "decode_b32_tpot_p50_s"]
