"""`jaxserve serve demo` as a subprocess, driven with the official `openai` client through vLLM's extras
(issue 17's done-when): logprobs (also streamed, one event per token), penalties, n > 1, json_schema output
that parses and validates against its schema, /tokenize. References: the offline `LLM` on the same model and
settings (greedy), and `jsonschema`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

from test_serve_cli import SMALL, Output  # noqa: E402

SCHEMA = {"type": "object", "properties": {"name": {"enum": ["fib", "fact"]}, "args": {"type": "integer",
                                                                                      "maximum": 9}},
          "required": ["name", "args"], "additionalProperties": False}


@pytest.fixture(scope="module")
def url():
    cmd = [sys.executable, "-m", "jaxserve.cli", "serve", "demo", "--port", "0", "--no-profile", *SMALL]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    output = Output(proc)
    try:
        yield output.wait_for(r"ready in [\d.]+ s: OpenAI API at (http://\S+)/v1").group(1)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def llm():
    from jaxserve import LLM
    return LLM("demo", max_model_len=256, num_pages=128, max_num_seqs=4, max_num_batched_tokens=64,
               compilation_cache="off")


def test_serve_extras_match_the_offline_llm(url, llm):
    from jaxserve import SamplingParams
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    prompt = "def fibonacci(n):"
    want = llm.generate([prompt], SamplingParams(max_tokens=10, logprobs=2, frequency_penalty=0.8))[0].outputs[0]
    r = client.completions.create(model="demo", prompt=prompt, max_tokens=10, temperature=0, logprobs=2,
                                  frequency_penalty=0.8)
    assert r.choices[0].text == want.text
    assert r.choices[0].logprobs.token_logprobs == pytest.approx(
        [d[t].logprob for t, d in zip(want.token_ids, want.logprobs)], abs=1e-3)
    events = list(client.completions.create(model="demo", prompt=prompt, max_tokens=10, temperature=0, logprobs=1,
                                            frequency_penalty=0.8, stream=True,
                                            stream_options={"include_usage": True}))
    assert len([e for e in events if e.choices]) == events[-1].usage.completion_tokens == len(want.token_ids)
    assert "".join(e.choices[0].text for e in events if e.choices) == want.text

    r = client.completions.create(model="demo", prompt=prompt, max_tokens=8, temperature=1.0, seed=5, n=3)
    assert len(r.choices) == 3 and r.usage.completion_tokens == sum(
        len(llm.generate([prompt], SamplingParams(max_tokens=8, temperature=1.0, seed=5 + j))[0].token_ids)
        for j in range(3))

    chat = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "describe fib as JSON"}], max_tokens=60, temperature=0,
        logprobs=True, top_logprobs=3,
        response_format={"type": "json_schema", "json_schema": {"name": "call", "schema": SCHEMA}})
    jsonschema.validate(json.loads(chat.choices[0].message.content), SCHEMA)
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens

    req = urllib.request.Request(url + "/tokenize", data=json.dumps({"prompt": prompt}).encode(),
                                 headers={"Content-Type": "application/json"})
    tok = json.loads(urllib.request.urlopen(req).read())
    assert tok["tokens"] == llm.tokenizer.encode(prompt) and tok["count"] == len(tok["tokens"])
