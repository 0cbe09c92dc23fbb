"""The OpenAI-compatible HTTP front and /metrics, end to end with the official `openai` client against a real
scheduler and fake instance servers on 127.0.0.1."""

import asyncio
import contextlib
import json
import time

import pytest

openai = pytest.importorskip("openai")
aiohttp = pytest.importorskip("aiohttp")
text_string_to_metric_families = pytest.importorskip("prometheus_client.parser").text_string_to_metric_families

from jaxserve.proto.v1 import common_pb2  # noqa: E402
from jaxserve.scheduler import GlobalSchedulerConfig, ModelInfo, Scheduler  # noqa: E402
from jaxserve.testing.fake_instance import FakeInstance, expected_tokens  # noqa: E402
from jaxserve.scheduler.http_front import HttpFront  # noqa: E402
from jaxserve.scheduler.tokenizer import ByteTokenizer  # noqa: E402
from timeouts import scaled  # noqa: E402

MAX_LEN = 256
FAST = dict(health_interval_s=0.1, health_timeout_s=0.2, unhealthy_after=2, no_instance_wait_s=0.3,
            shutdown_grace_s=0.0)
MODEL = "byte"


def run(coro, timeout=20.0):
    return asyncio.run(asyncio.wait_for(coro, scaled(timeout)))


def ids(text):
    return ByteTokenizer().encode(text)


def fake_text(context_len, n):
    return bytes(expected_tokens(context_len, n)).decode()


async def eventually(predicate, timeout=3.0, what="condition"):
    end = time.monotonic() + scaled(timeout)
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def cluster(n=1, roles=None, fake=None, api_key=None, front=None, **config):
    """Scheduler + n fake instances + the HTTP front on ephemeral ports; yields (front, fakes, openai client)."""
    scheduler = Scheduler(GlobalSchedulerConfig(port=0, **{**FAST, **config}), ModelInfo.byte_level(MAX_LEN))
    await scheduler.start()
    fakes = []
    for k, role in enumerate(roles or [common_pb2.ROLE_COLOCATED] * n):
        fakes.append(await FakeInstance(role, scheduler_address=scheduler.address, instance_id=f"fake-{k}",
                                        page_size=4, **(fake or {})).start())
    http = HttpFront(scheduler, port=0, api_key=api_key, **(front or {}))
    await http.start()
    client = openai.AsyncOpenAI(base_url=http.url + "/v1", api_key=api_key or "unused", max_retries=0,
                                timeout=10.0)
    try:
        yield http, fakes, client
    finally:
        await client.close()
        await http.stop()
        for f in fakes:
            with contextlib.suppress(Exception):
                await f.kill()
        await scheduler.stop(0)


async def raw(http, method, path, body=None, headers=None, data=None):
    """(status, parsed JSON or text) of one raw HTTP call."""
    async with aiohttp.ClientSession() as session:
        async with session.request(method, http.url + path, json=body, data=data, headers=headers) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text)
            except ValueError:
                return resp.status, text


async def metrics(http, headers=None):
    status, text = await raw(http, "GET", "/metrics", headers=headers)
    assert status == 200, text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            samples[key] = s.value
    return samples


def total(samples, name, **labels):
    return sum(v for (n, ls), v in samples.items()
               if n == name and all(dict(ls).get(k) == v2 for k, v2 in labels.items()))


# ----------------------------------------------------------------------------------------- completions
def test_completions_plain_streaming_batch_and_echo():
    async def body():
        async with cluster() as (http, fakes, client):
            prompt = "Hello there, friend"
            n_prompt = len(ids(prompt))
            r = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=6)
            assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
            assert r.choices[0].text == fake_text(n_prompt, 6) and r.choices[0].finish_reason == "length"
            u = r.usage
            assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (n_prompt, 6, n_prompt + 6)
            assert u.prompt_tokens_details.cached_tokens == 0

            # Token ids, a batch of two prompts, n=2 and echo.
            r = await client.completions.create(model=MODEL, prompt=[[256, 65, 66], [256, 67]], max_tokens=3, n=2,
                                                echo=True)
            assert [c.index for c in r.choices] == [0, 1, 2, 3]
            assert r.choices[0].text == "AB" + fake_text(3, 3) and r.choices[3].text == "C" + fake_text(2, 3)
            assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 12

            # Streaming with usage: every chunk has usage null, one more chunk with no choices carries it.
            stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, stream=True,
                                                     stream_options={"include_usage": True})
            chunks = [c async for c in stream]
            assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
            assert "".join(c.choices[0].text for c in chunks[:-1]) == fake_text(n_prompt, 5)
            assert chunks[-2].choices[0].finish_reason == "length"
            assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].usage.prompt_tokens == n_prompt

            # Without include_usage no usage chunk; the raw stream ends with data: [DONE].
            status, text = await raw(http, "POST", "/v1/completions",
                                     dict(model=MODEL, prompt=prompt, max_tokens=3, stream=True, stop=["zz"]))
            assert status == 200
            events = [line for line in text.split("\n\n") if line]
            assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
            assert all("usage" not in json.loads(e[6:]) for e in events[:-1])
            assert (await client.models.list()).data[0].id == MODEL
            assert (await raw(http, "GET", "/health"))[0] == 200
    run(body())


# ------------------------------------------------------------------------------------------------ chat
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_chat_plain_template_model_template_and_streaming(tmp_path):
    async def body():
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
        async with cluster() as (http, fakes, client):
            assert http.template.is_plain
            r = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
            rendered = "system: Be brief.\nuser: Hi!\nassistant:"
            n_prompt = len(ids(rendered))
            assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
            assert r.choices[0].message.content == fake_text(n_prompt, 4)
            assert r.usage.prompt_tokens == n_prompt and r.usage.total_tokens == n_prompt + 4
            assert fakes[0].requests[-1].prompt_token_ids == ids(rendered)

            stream = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": "Hi!"}]}],
                max_completion_tokens=5, stream=True, stream_options={"include_usage": True})
            chunks = [c async for c in stream]
            assert chunks[0].choices[0].delta.role == "assistant"
            assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == \
                fake_text(len(ids("user: Hi!\nassistant:")), 5)
            assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 5

        # A model folder whose tokenizer_config.json has a chat template.
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(
            {"chat_template": CHAT_TEMPLATE, "bos_token": "<s>", "eos_token": "</s>"}))
        async with cluster(front=dict(model_path=tmp_path)) as (http, fakes, client):
            assert not http.template.is_plain
            r = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
            rendered = "<s><|system|>Be brief.</s><|user|>Hi!</s><|assistant|>"
            assert fakes[0].requests[-1].prompt_token_ids == ids(rendered)
            assert r.usage.prompt_tokens == len(ids(rendered))
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(
            {"chat_template": "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
                              "{{ messages[0]['content'] }}"}))
        async with cluster(front=dict(model_path=tmp_path)) as (http, fakes, client):
            with pytest.raises(openai.BadRequestError) as e:
                await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
            assert "user first" in e.value.body["message"]
    run(body())


# ------------------------------------------------------------------------------------------ cached tokens
def test_cached_tokens_on_a_repeated_prefix():
    async def body():
        async with cluster(n=2) as (http, fakes, client):
            system = "You are a helpful assistant. " * 4
            first = await client.completions.create(model=MODEL, prompt=system + "Question one?", max_tokens=4)
            assert first.usage.prompt_tokens_details.cached_tokens == 0
            scheduler = http.scheduler
            await eventually(lambda: scheduler.router.trees[common_pb2.ROLE_COLOCATED].num_tokens > 0,
                             what="the INSERT event")
            again = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1)  # unrelated
            assert again.usage.prompt_tokens_details.cached_tokens == 0
            second = await client.completions.create(model=MODEL, prompt=system + "Question two?", max_tokens=4,
                                                     stream=True, stream_options={"include_usage": True})
            usage = [c async for c in second][-1].usage
            assert usage.prompt_tokens_details.cached_tokens >= len(ids(system)) // 4 * 4 - 4 > 0
    run(body())


# ------------------------------------------------------------------------------------------- bad input
BAD_COMPLETIONS = [
    (dict(prompt="a" * 300), ["maximum context length is 256 tokens", "301 tokens"], None),
    (dict(prompt="a" * 200, max_tokens=100),
     ["maximum context length is 256 tokens", "you requested 301 tokens (201 in the messages, 100 in the completion)"],
     None),
    (dict(prompt="hi", max_tokens=0), ["max_tokens must be at least 1, got 0"], "max_tokens"),
    (dict(prompt="hi", max_tokens=-3), ["max_tokens must be at least 1, got -3"], "max_tokens"),
    (dict(prompt="hi", max_tokens=2**40), ["max_tokens must be at most 2147483647"], "max_tokens"),
    (dict(prompt="hi", temperature=-0.5), ["temperature must be non-negative, got -0.5"], None),
    (dict(prompt="hi", top_p=0.0), ["top_p must be in (0, 1], got 0.0"], None),
    (dict(prompt="hi", top_p=1.5), ["top_p must be in (0, 1], got 1.5"], None),
    (dict(prompt="hi", extra_body=dict(top_k=-2)), ["top_k must be -1 (disable), or at least 1, got -2"], "top_k"),
    (dict(prompt="hi", extra_body=dict(top_k=0)), ["top_k must be -1 (disable), or at least 1, got 0"], None),
    (dict(prompt=[1, 2, 300]), ["Token id 300 is out of vocabulary", "258 tokens", "0 to 257"], None),
    (dict(prompt=[-1]), ["Token id -1 is out of vocabulary"], "prompt"),
    (dict(prompt=[2**40]), ["Token id 1099511627776 is out of vocabulary"], "prompt"),
    (dict(prompt=""), ["The prompt cannot be empty"], None),
    (dict(prompt=[]), ["The prompt cannot be empty"], None),
    (dict(prompt="hi", seed=2**32), ["seed must be in [0, 2**32), got 4294967296"], "seed"),
    (dict(prompt="hi", seed=-1), ["seed must be in [0, 2**32), got -1"], "seed"),
    (dict(prompt="hi", stop=[""]), ["stop strings must be non-empty"], None),
    (dict(prompt="hi", extra_body=dict(stop_token_ids=[999])),
     ["stop_token_ids must be in the vocabulary [0, 258), got 999"], None),
    (dict(prompt="hi", temperature="hot"), ["temperature must be a number, got 'hot'"], "temperature"),
    (dict(prompt="hi", max_tokens="5"), ["max_tokens must be an integer"], "max_tokens"),
    (dict(prompt="hi", stop=5), ["stop must be a string or a list of strings"], "stop"),
    (dict(prompt={"text": "hi"}), ["prompt must be a string, a list of strings"], "prompt"),
    (dict(prompt=["a", 1]), ["prompt must be a string, a list of strings"], "prompt"),
    (dict(prompt=None), ["The request has no prompt"], "prompt"),
    (dict(prompt="hi", n=0), ["n must be at least 1, got 0"], "n"),
    (dict(prompt="hi", logprobs=21), ["logprobs must be in [0, 20], got 21"], "logprobs"),
    (dict(prompt="hi", best_of=3), ["best_of is not supported"], "best_of"),
    (dict(prompt="hi", frequency_penalty=2.5), ["frequency_penalty must be in [-2, 2], got 2.5"], "frequency_penalty"),
    (dict(prompt="hi", logit_bias={"999": 1}), ["logit_bias token id 999 is out of vocabulary"], "logit_bias"),
    (dict(prompt="hi", suffix="x"), ["suffix is not supported"], "suffix"),
    (dict(prompt="hi", stream_options={"include_usage": True}),
     ["Stream options can only be defined when `stream=True`"], "stream_options"),
    (dict(prompt="hi", stream=True, stream_options={"include_usage": True}, max_tokens=0),
     ["max_tokens must be at least 1, got 0"], "max_tokens"),
]
BAD_CHAT = [
    (dict(messages=[]), ["messages must be a non-empty list"]),
    (dict(messages=[{"role": "wizard", "content": "x"}]), ["messages[0].role must be one of"]),
    (dict(messages=[{"role": "user", "content": 5}]), ["messages[0].content must be a string"]),
    (dict(messages=[{"role": "user"}]), ["messages[0].content is required"]),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]),
     ["content part type 'image_url' is not supported"]),
    (dict(messages=[{"role": "user", "content": "a" * 300}]), ["maximum context length is 256 tokens"]),
    (dict(messages=[{"role": "user", "content": "hi"}], max_completion_tokens=0), ["max_tokens must be at least 1"]),
    (dict(messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=21),
     ["top_logprobs must be in [0, 20], got 21"]),
    (dict(messages=[{"role": "user", "content": "hi"}],
          tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), ["tools are not supported"]),
    (dict(messages=[{"role": "user", "content": "hi"}], temperature=-1), ["temperature must be non-negative"]),
]


def test_every_bad_input_is_a_400_with_the_message():
    async def body():
        async with cluster() as (http, fakes, client):
            for kwargs, fragments, param in BAD_COMPLETIONS:
                kwargs = {"model": MODEL, **kwargs}
                with pytest.raises(openai.BadRequestError) as e:
                    r = await client.completions.create(**kwargs)
                    if kwargs.get("stream"):
                        [c async for c in r]
                err = e.value.body
                assert e.value.status_code == 400, kwargs
                assert set(err) == {"message", "type", "param", "code"} and err["code"] == 400, err
                for fragment in fragments:
                    assert fragment in err["message"], (kwargs, err["message"])
                if param is not None:
                    assert err["param"] == param, (kwargs, err)
            for kwargs, fragments in BAD_CHAT:
                with pytest.raises(openai.BadRequestError) as e:
                    await client.chat.completions.create(model=MODEL, **kwargs)
                for fragment in fragments:
                    assert fragment in e.value.body["message"], (kwargs, e.value.body)
            with pytest.raises(openai.NotFoundError) as e:
                await client.completions.create(model="gpt-4", prompt="hi")
            assert e.value.body["message"] == "The model `gpt-4` does not exist."
            # Not JSON, not an object, unknown route, wrong method: JSON errors, never a 500.
            for data, status in ((b"{not json", 400), (b"[1, 2]", 400), (b"", 400)):
                code, err = await raw(http, "POST", "/v1/completions", data=data,
                                      headers={"Content-Type": "application/json"})
                assert code == status and err["error"]["type"] == "BadRequestError", (data, err)
            code, err = await raw(http, "GET", "/v1/nothing")
            assert code == 404 and err["error"]["code"] == 404
            code, err = await raw(http, "GET", "/v1/completions")
            assert code == 405 and "error" in err
            assert http.scheduler.admission.requests == 0
            # The instance never saw any of them.
            assert fakes[0].requests == []
    run(body(), timeout=30)


# ----------------------------------------------------------------------------------------------- API key
def test_api_key_on_every_route_but_health():
    async def body():
        async with cluster(api_key="sk-secret") as (http, fakes, client):
            r = await client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
            assert r.choices[0].text == fake_text(3, 2)
            wrong = openai.AsyncOpenAI(base_url=http.url + "/v1", api_key="sk-wrong", max_retries=0)
            try:
                with pytest.raises(openai.AuthenticationError) as e:
                    await wrong.completions.create(model=MODEL, prompt="hi", max_tokens=2)
                assert e.value.status_code == 401 and e.value.body["type"] == "AuthenticationError"
                with pytest.raises(openai.AuthenticationError):
                    await wrong.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
                with pytest.raises(openai.AuthenticationError):
                    await wrong.models.list()
            finally:
                await wrong.close()
            assert (await raw(http, "GET", "/metrics"))[0] == 401
            assert (await raw(http, "GET", "/metrics", headers={"Authorization": "Basic sk-secret"}))[0] == 401
            assert (await raw(http, "GET", "/metrics", headers={"Authorization": "Bearer sk-secret"}))[0] == 200
            assert (await raw(http, "GET", "/health"))[0] == 200
            assert len(fakes[0].requests) == 1
    run(body())


# ----------------------------------------------------------------------------------------------- capacity
def test_over_capacity_is_429_and_no_instance_is_503():
    async def body():
        async with cluster(fake=dict(token_delay_s=0.05), max_queued_requests=1) as (http, fakes, client):
            first = await client.completions.create(model=MODEL, prompt="hello", max_tokens=20, stream=True)
            it = first.__aiter__()
            await it.__anext__()  # admitted and streaming
            with pytest.raises(openai.RateLimitError) as e:
                await client.completions.create(model=MODEL, prompt="again", max_tokens=2)
            assert e.value.status_code == 429 and "queue is full" in e.value.body["message"]
            with pytest.raises(openai.RateLimitError):
                await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                     stream=True)
            await first.close()  # the client leaves mid-stream: the request ends and frees its slot
            await eventually(lambda: http.scheduler.admission.requests == 0, what="the slot to be freed")
            await eventually(lambda: fakes[0].cancelled, what="the instance to see the cancel")
            r = await client.completions.create(model=MODEL, prompt="again", max_tokens=2)
            assert r.choices[0].finish_reason == "length"
        async with cluster(n=0) as (http, fakes, client):
            with pytest.raises(openai.InternalServerError) as e:
                await client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
            assert e.value.status_code == 503 and "No instance could serve" in e.value.body["message"]
            assert (await raw(http, "GET", "/health"))[0] == 503
    run(body())


# ------------------------------------------------------------------------------------------------ metrics
def test_metrics_parse_and_move_with_requests():
    async def body():
        roles = [common_pb2.ROLE_COLOCATED]
        async with cluster(roles=roles, fake=dict(token_delay_s=0.002), report_interval_s=0.05) as (http, fakes,
                                                                                                     client):
            before = await metrics(http)
            system = "Shared system prompt. " * 3
            scheduler = http.scheduler
            for k in range(3):
                await client.completions.create(model=MODEL, prompt=system + f"q{k}", max_tokens=5)
                await eventually(lambda: scheduler.router.trees[common_pb2.ROLE_COLOCATED].num_tokens > 0,
                                 what="the INSERT event")
            with contextlib.suppress(openai.BadRequestError):
                await client.completions.create(model=MODEL, prompt="hi", max_tokens=0)
            after = await metrics(http)
            lab = dict(model_name=MODEL, instance="fake-0")
            assert total(after, "vllm:request_success_total", finished_reason="length", **lab) - \
                total(before, "vllm:request_success_total", **lab) == 3
            prompt_tokens = sum(len(ids(system + f"q{k}")) for k in range(3))
            assert total(after, "vllm:prompt_tokens_total", **lab) == prompt_tokens
            assert total(after, "vllm:generation_tokens_total", **lab) == 15
            assert total(after, "vllm:prefix_cache_queries_total", **lab) == prompt_tokens
            assert total(after, "vllm:prefix_cache_hits_total", **lab) > 0
            for name in ("vllm:time_to_first_token_seconds_count", "vllm:e2e_request_latency_seconds_count",
                         "vllm:request_queue_time_seconds_count", "vllm:request_time_per_output_token_seconds_count"):
                assert total(after, name, **lab) == 3, name
            assert total(after, "vllm:inter_token_latency_seconds_count", **lab) == 12
            assert total(after, "jaxserve:routing_decisions_total", policy="locality", instance="fake-0") == 3
            assert total(after, "jaxserve:routing_decisions_total", outcome="prefix_hit") >= 1
            assert total(after, "jaxserve:requests_rejected_total", reason="invalid") == 1
            assert total(after, "jaxserve:http_requests_total", route="/v1/completions", status="200") == 3
            assert total(after, "jaxserve:http_requests_total", route="/v1/completions", status="400") == 1
            # Instance gauges come from the instances' Load reports; sampled while a request runs.
            stream = await client.completions.create(model=MODEL, prompt="long one", max_tokens=200, stream=True)
            await stream.__aiter__().__anext__()
            await eventually(lambda: fakes[0].running == 1, what="the request to run")
            await asyncio.sleep(0.15)  # a Load report or two
            during = await metrics(http)
            assert total(during, "vllm:num_requests_running", **lab) == 1
            assert total(during, "vllm:num_requests_waiting", **lab) == 0
            assert total(during, "jaxserve:instance_in_flight_requests", **lab) == 1
            assert total(during, "jaxserve:scheduler_queued_requests") == 1
            assert 0.0 <= total(during, "vllm:kv_cache_usage_perc", **lab) <= 1.0
            assert total(during, "jaxserve:instance_healthy", role="colocated", **lab) == 1
            assert total(during, "vllm:num_preemptions_total", **lab) == 0  # the fake never preempts
            # An instance's cumulative preemptions (its reported Load.num_preemptions) surface as vLLM's counter.
            report_load = fakes[0].reporter._load
            fakes[0].reporter._load = lambda: common_pb2.Load(num_total_pages=report_load().num_total_pages,
                                                              num_preemptions=7)
            await eventually(lambda: scheduler.router.instances["fake-0"].load.num_preemptions == 7,
                             what="a Load report with preemptions")
            assert total(await metrics(http), "vllm:num_preemptions_total", **lab) == 7
            await stream.close()
    run(body())


def test_metrics_count_kv_transfers_between_instances():
    async def body():
        roles = [common_pb2.ROLE_PREFILL, common_pb2.ROLE_DECODE]
        async with cluster(roles=roles) as (http, fakes, client):
            prompt = "disaggregated " * 3
            r = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=4)
            assert r.choices[0].text == fake_text(len(ids(prompt)), 4)
            m = await metrics(http)
            tokens = total(m, "jaxserve:kv_transfer_tokens_total", instance="fake-0", dst_instance="fake-1")
            assert tokens == len(ids(prompt))
            # The byte-level test model has no config: bytes are 0 per token unless the front is given one.
            assert ("jaxserve:kv_transfer_bytes_total",
                    (("dst_instance", "fake-1"), ("instance", "fake-0"), ("model_name", MODEL))) in m
            assert total(m, "jaxserve:routing_decisions_total", role="prefill", instance="fake-0") == 1
            assert total(m, "jaxserve:routing_decisions_total", role="decode", instance="fake-1") == 1
            assert total(m, "vllm:prefix_cache_queries_total", instance="fake-0") == len(ids(prompt))
    run(body())


def test_a_stream_that_fails_after_it_started_ends_with_an_error_event():
    async def body():
        async with cluster(fake=dict(token_delay_s=0.02), max_migrations=0) as (http, fakes, client):
            async with aiohttp.ClientSession() as session:
                async with session.post(http.url + "/v1/completions",
                                        json=dict(model=MODEL, prompt="hello", max_tokens=100, stream=True)) as resp:
                    assert resp.status == 200
                    first = await resp.content.readuntil(b"\n\n")
                    assert json.loads(first[6:])["choices"][0]["text"]
                    await fakes[0].kill()
                    events = [e for e in (await resp.text()).split("\n\n") if e]
            assert events[-1] == "data: [DONE]"
            error = json.loads(events[-2][6:])["error"]
            assert error["code"] == 503 and "failed after" in error["message"]
            assert http.scheduler.admission.requests == 0
    run(body())


def test_request_timeout_header_is_a_real_deadline():
    async def body():
        async with cluster(fake=dict(token_delay_s=0.02)) as (http, fakes, client):
            t0 = time.monotonic()
            status, data = await raw(http, "POST", "/v1/completions",
                                     dict(model=MODEL, prompt="slow", max_tokens=200),
                                     headers={"X-Request-Timeout": "0.3"})
            assert status == 504 and data["error"]["type"] == "GatewayTimeoutError", data
            assert "Deadline exceeded" in data["error"]["message"] and time.monotonic() - t0 < scaled(2.0)
            await eventually(lambda: http.scheduler.admission.requests == 0, what="the slot to be freed")
            await eventually(lambda: any(r.startswith("cmpl-") for r in fakes[0].cancelled),
                             what="the instance to see the deadline")
            status, data = await raw(http, "POST", "/v1/completions", dict(model=MODEL, prompt="x", max_tokens=2),
                                     headers={"X-Request-Timeout": "soon"})
            assert status == 400 and "X-Request-Timeout" in data["error"]["message"], data
            status, data = await raw(http, "POST", "/v1/completions", dict(model=MODEL, prompt="x", max_tokens=2),
                                     headers={"X-Request-Timeout": "5"})
            assert status == 200 and data["choices"][0]["finish_reason"] == "length", data
    run(body())
