"""`jaxserve serve` (issue 17): one command, driven as a subprocess with the official `openai` client; the
greedy answer equals the offline `LLM`'s, also through vLLM's extras (logprobs, also streamed with one event
per token; penalties; n > 1; json_schema output that parses and validates against its schema with
`jsonschema`; /tokenize); a scheduler refuses an instance that serves another model; SIGTERM stops every
process without an error line. One server for the module."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading

import json
import urllib.request

import grpc
import pytest

from jaxserve.proto.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from jaxserve.scheduler import GlobalSchedulerConfig, Scheduler, load_model_info
from jaxserve.scheduler.tokenizer import model_architecture, tokenizer_fingerprint
from jaxserve.util import resolve_model_path

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

SMALL = ["--max-num-seqs", "4", "--max-num-batched-tokens", "64", "--num-pages", "128", "--max-model-len", "256",
         "--compilation-cache", "off"]


class Output:
    """Collects a process's output lines on a thread; `wait_for(pattern)` blocks until a line matches (no
    wall-clock limit: start-up time varies with load) or the process exits."""

    def __init__(self, proc):
        self.proc, self.lines, self.cond = proc, [], threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()
        with self.cond:
            self.lines.append(None)
            self.cond.notify_all()

    def wait_for(self, pattern: str) -> re.Match:
        seen = 0
        with self.cond:
            while True:
                for line in self.lines[seen:]:
                    if line is None:
                        raise AssertionError("jaxserve serve exited:\n" + self.text()[-3000:])
                    m = re.search(pattern, line)
                    if m:
                        return m
                seen = len(self.lines)
                self.cond.wait(5.0)

    def rest(self) -> str:
        """Everything, once the process has closed its output."""
        with self.cond:
            while not self.lines or self.lines[-1] is not None:
                self.cond.wait(5.0)
        return self.text()

    def text(self) -> str:
        return "".join(line for line in self.lines if line)


@pytest.fixture(scope="module")
def server():
    cmd = [sys.executable, "-m", "jaxserve.cli", "serve", "demo", "--port", "0", "--no-profile", *SMALL]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    output = Output(proc)
    try:
        m = output.wait_for(r"ready in [\d.]+ s: OpenAI API at (http://\S+)/v1")
        yield proc, m.group(1), output
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def llm():
    from jaxserve import LLM
    return LLM("demo", max_model_len=256, num_pages=128, max_num_seqs=4, max_num_batched_tokens=64,
               compilation_cache="off")


def test_serve_answers_like_the_offline_llm(server, llm):
    proc, url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    prompt = "def fibonacci(n):"
    out = client.completions.create(model="demo", prompt=prompt, max_tokens=12, temperature=0)
    from jaxserve import SamplingParams
    want = llm.generate([prompt], SamplingParams(max_tokens=12))[0].text
    assert out.choices[0].text == want
    chat = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=5, temperature=0)
    assert chat.choices[0].message.content is not None and chat.usage.completion_tokens >= 1
    models = client.models.list()
    assert [m.id for m in models.data] == ["demo"]


SCHEMA = {"type": "object", "properties": {"name": {"enum": ["fib", "fact"]}, "args": {"type": "integer",
                                                                                      "maximum": 9}},
          "required": ["name", "args"], "additionalProperties": False}


@pytest.fixture(scope="module")
def url(server):
    return server[1]


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


# Last: it stops the module's server.
def test_sigterm_stops_every_process_cleanly(server):
    proc, url, output = server
    proc.send_signal(signal.SIGTERM)
    proc.wait()
    text = output.rest()
    assert proc.returncode == 0, text[-3000:]
    assert "shutting down" in text
    assert "Traceback" not in text and "CancelledError" not in text, text[-3000:]
    assert not re.search(r"^(E|W)\d{4} |\bERROR\b|\bWARNING\b", text, re.M), text[-3000:]


def test_registration_refuses_another_model():
    """An instance of another model (architecture or tokenizer differ) is refused with both named; the same
    model registers."""
    async def run():
        scheduler = Scheduler(GlobalSchedulerConfig(port=0, profile_instances=False), load_model_info("demo"))
        await scheduler.start()
        try:
            async with grpc.aio.insecure_channel(scheduler.address) as channel:
                stub = scheduler_pb2_grpc.SchedulerStub(channel)
                folder = resolve_model_path("demo")
                same = dict(architecture=model_architecture(folder), tokenizer_fingerprint=tokenizer_fingerprint(folder))
                base = dict(address="127.0.0.1:1", role=common_pb2.ROLE_COLOCATED, page_size=16, vocab_size=258,
                            max_model_len=1024)
                for wrong in (dict(same, architecture="Qwen3ForCausalLM"), dict(same, tokenizer_fingerprint="0" * 16)):
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await stub.Register(scheduler_pb2.RegisterRequest(model="other", **base, **wrong))
                    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                    assert "'other'" in e.value.details() and "'demo'" in e.value.details(), e.value.details()
                ok = await stub.Register(scheduler_pb2.RegisterRequest(model="demo", **base, **same))
                assert ok.instance_id
        finally:
            await scheduler.stop(0)
    asyncio.run(run())
