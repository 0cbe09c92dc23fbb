"""vLLM's OpenAI extras end to end: the official `openai` client against a scheduler, a real instance server
(tiny random model, byte-level vocabulary) and the HTTP front, all in process on 127.0.0.1. References are
the offline `LLM` with the same weights (greedy, token-identical; logprobs to f32 rounding), and the request
shapes OpenAI documents: logprobs (also streamed), penalties, logit_bias, min_tokens, stop_reason, n > 1,
structured output (json_schema / guided_json validated with `jsonschema`, json_object),
one SSE event per token, continuous usage, chat echo, /tokenize, /detokenize, /version, and a 400 naming every
parameter this server does not implement."""

import asyncio
import contextlib
import json

import pytest

openai = pytest.importorskip("openai")
aiohttp = pytest.importorskip("aiohttp")
jsonschema = pytest.importorskip("jsonschema")

from jaxserve import LLM, SamplingParams  # noqa: E402
from jaxserve.config import ModelConfig  # noqa: E402
from jaxserve.instance import InstanceConfig, InstanceServer  # noqa: E402
from jaxserve.scheduler import GlobalSchedulerConfig, ModelInfo, Scheduler  # noqa: E402
from jaxserve.scheduler.http_front import HttpFront  # noqa: E402

CFG = ModelConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, max_position_embeddings=96, bos_token_id=256,
                  eos_token_id=(257,), dtype="float32")
FAST = dict(health_interval_s=0.2, health_timeout_s=2.0, unhealthy_after=3, no_instance_wait_s=30.0,
            shutdown_grace_s=0.0, profile_instances=False)
MODEL = "byte"
SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green"]}, "n": {"type": "integer",
                                                                                     "maximum": 9}},
          "required": ["color", "n"], "additionalProperties": False}
PROMPT = "def add(a, b):\n    return"


def make_llm():
    return LLM(model=CFG, page_size=8, num_pages=128, max_num_batched_tokens=64, max_num_seqs=8, seed=0,
               compilation_cache="off")


@pytest.fixture(scope="module")
def ref():
    return make_llm()


@contextlib.asynccontextmanager
async def served():
    scheduler = Scheduler(GlobalSchedulerConfig(port=0, **FAST), ModelInfo.byte_level(CFG.max_position_embeddings))
    await scheduler.start()
    instance = await InstanceServer(make_llm().engine, InstanceConfig(
        role="colocated", scheduler_address=scheduler.address, instance_id="i0")).start()
    http = HttpFront(scheduler, port=0)
    await http.start()
    client = openai.AsyncOpenAI(base_url=http.url + "/v1", api_key="unused", max_retries=0, timeout=600.0)
    try:
        yield http, client
    finally:
        await client.close()
        await http.stop()
        await instance.stop(0)
        await scheduler.stop(0)


async def raw(http, method, path, body=None):
    async with aiohttp.ClientSession() as session:
        async with session.request(method, http.url + path, json=body) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text)
            except ValueError:
                return resp.status, text


def offline(ref, prompt, **kw):
    return ref.generate([prompt], SamplingParams(**kw))[0].outputs[0]


def assert_same_tokens(ref, logprobs, want):
    """The served completion's tokens (from its logprobs: token text and logprob) are the offline ones. The
    random model emits bytes that are not valid UTF-8, whose text the streaming detokenizer may render
    differently at the end, so tokens are compared, not text."""
    assert logprobs.tokens == [ref.tokenizer.decode([t]) for t in want.token_ids]
    assert logprobs.token_logprobs == pytest.approx([e[t].logprob for t, e in zip(want.token_ids, want.logprobs)],
                                                    abs=1e-4)


def test_openai_extras_end_to_end(ref):
    async def body():
        async with served() as (http, client):
            # Greedy text and tokens equal the offline LLM's; logprobs equal its logprobs.
            want = offline(ref, PROMPT, max_tokens=8, ignore_eos=True, logprobs=3)
            r = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                                logprobs=3, extra_body={"ignore_eos": True})
            c = r.choices[0]
            assert r.usage.completion_tokens == 8 and c.logprobs.text_offset[0] == 0
            assert_same_tokens(ref, c.logprobs, want)
            assert all(len(t) >= 3 for t in c.logprobs.top_logprobs)
            plain = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                                    extra_body={"ignore_eos": True})
            assert plain.choices[0].text == c.text  # logprobs do not change what is sampled

            # Streaming: one event per generated token (empty text included), logprobs in each.
            stream = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                                     logprobs=2, stream=True, stream_options={"include_usage": True},
                                                     extra_body={"ignore_eos": True})
            chunks = [x async for x in stream]
            token_events = [x for x in chunks if x.choices]
            assert len(token_events) == chunks[-1].usage.completion_tokens == 8
            assert "".join(x.choices[0].text for x in token_events) == c.text
            assert [x.choices[0].logprobs.token_logprobs[0] for x in token_events] == \
                pytest.approx([e[t].logprob for t, e in zip(want.token_ids, want.logprobs)], abs=1e-4)

            # continuous_usage_stats: every chunk counts the tokens so far.
            stream = await client.completions.create(
                model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, stream=True,
                stream_options={"include_usage": True, "continuous_usage_stats": True},
                extra_body={"ignore_eos": True})
            counts = [x.usage.completion_tokens for x in [x async for x in stream] if x.choices]
            assert counts == [1, 2, 3, 4]

            # Penalties and logit_bias: the same tokens as offline.
            for kw in (dict(frequency_penalty=1.5, presence_penalty=0.5), dict(repetition_penalty=1.7),
                       dict(logit_bias={"65": 5.0, "66": -100})):
                want_p = offline(ref, PROMPT, max_tokens=10, ignore_eos=True, logprobs=0,
                                 **{k: ({int(t): b for t, b in v.items()} if k == "logit_bias" else v)
                                    for k, v in kw.items()})
                assert want_p.token_ids != want.token_ids[:10] or kw.get("logit_bias"), kw
                extra = {"ignore_eos": True, **{k: v for k, v in kw.items() if k == "repetition_penalty"}}
                r = await client.completions.create(
                    model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, extra_body=extra, logprobs=0,
                    **{k: v for k, v in kw.items() if k != "repetition_penalty"})
                assert_same_tokens(ref, r.choices[0].logprobs, want_p)

            # min_tokens, stop_token_ids and stop_reason ("!" is token 33, forced by a bias).
            r = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                                logit_bias={"33": 100},
                                                extra_body={"stop_token_ids": [33], "min_tokens": 3})
            c = r.choices[0]
            assert r.usage.completion_tokens == 4 and c.finish_reason == "stop" and c.model_extra["stop_reason"] == 33
            assert "!" not in c.text
            r = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                                logit_bias={"33": 100}, stop=["!"],
                                                extra_body={"include_stop_str_in_output": True})
            assert r.choices[0].text == "!" and r.choices[0].model_extra["stop_reason"] == "!"

            # Chat: logprobs + top_logprobs (also streamed); without max_tokens it runs to the context end.
            msgs = [{"role": "user", "content": "hi"}]
            r = await client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=5, temperature=0,
                                                     logprobs=True, top_logprobs=4, extra_body={"ignore_eos": True})
            content = r.choices[0].logprobs.content
            assert len(content) == 5 and all(len(x.top_logprobs) == 4 for x in content)
            assert all(x.top_logprobs[0].logprob >= x.logprob - 1e-6 for x in content)
            want_chat = ref.chat(msgs, SamplingParams(max_tokens=5, ignore_eos=True, logprobs=0))[0].outputs[0]
            assert [x.logprob for x in content] == pytest.approx(
                [e[t].logprob for t, e in zip(want_chat.token_ids, want_chat.logprobs)], abs=1e-4)
            stream = await client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=5, temperature=0,
                                                          logprobs=True, top_logprobs=1, stream=True,
                                                          extra_body={"ignore_eos": True})
            events = [x async for x in stream]
            with_tokens = [x for x in events if x.choices and x.choices[0].logprobs]
            assert len(with_tokens) == 5
            r = await client.chat.completions.create(model=MODEL, messages=msgs, temperature=0,
                                                     extra_body={"ignore_eos": True})
            prompt_len = r.usage.prompt_tokens
            assert r.choices[0].finish_reason == "length"
            assert r.usage.completion_tokens == CFG.max_position_embeddings - prompt_len
            # Chat echo: the assistant's last message starts the answer.
            r = await client.chat.completions.create(
                model=MODEL, messages=msgs + [{"role": "assistant", "content": "Sure:"}], max_tokens=3,
                temperature=0, extra_body={"echo": True, "add_generation_prompt": False, "ignore_eos": True})
            assert r.choices[0].message.content.startswith("Sure:")

            # n > 1 with a seed: choice j samples as seed + j, like offline n.
            want_n = ref.generate([PROMPT], SamplingParams(max_tokens=6, temperature=1.0, seed=11, n=2,
                                                           ignore_eos=True, logprobs=0))[0]
            r = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=1.0,
                                                seed=11, n=2, logprobs=0, extra_body={"ignore_eos": True})
            for c, o in zip(r.choices, want_n.outputs):
                assert_same_tokens(ref, c.logprobs, o)
            assert r.choices[0].logprobs.token_logprobs != r.choices[1].logprobs.token_logprobs

            # Structured output: json_schema (chat) and guided_json (completions) parse and validate;
            # json_object is an object; a schema the instance cannot compile is a 400.
            r = await client.chat.completions.create(
                model=MODEL, messages=msgs, max_tokens=60, temperature=0,
                response_format={"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}})
            assert r.choices[0].finish_reason == "stop"
            jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
            r = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=60, temperature=0.9, seed=2,
                                                extra_body={"guided_json": SCHEMA})
            jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)
            # json_object: any object. A random model may stay inside a key string until max_tokens, so the
            # text must be an object's start, and a whole object when the model ended it.
            r = await client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=60, temperature=0,
                                                     response_format={"type": "json_object"})
            text = r.choices[0].message.content
            assert text.startswith("{")
            if r.choices[0].finish_reason == "stop":
                assert isinstance(json.loads(text), dict)
            status, err = await raw(http, "POST", "/v1/completions", {
                "model": MODEL, "prompt": PROMPT, "max_tokens": 4,
                "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}})
            assert status == 400 and "json_schema" in err["error"]["message"], err

            # /tokenize, /detokenize, /version.
            status, tok = await raw(http, "POST", "/tokenize", {"prompt": "abc"})
            assert status == 200 and tok["tokens"] == [256, 97, 98, 99] and tok["count"] == 4
            assert tok["max_model_len"] == CFG.max_position_embeddings
            status, tok = await raw(http, "POST", "/tokenize", {"messages": msgs})
            assert status == 200 and tok["tokens"] == [256] + list(b"user: hi\nassistant:")  # the plain template
            status, detok = await raw(http, "POST", "/detokenize", {"tokens": [97, 98, 99]})
            assert status == 200 and detok["prompt"] == "abc"
            status, version = await raw(http, "GET", "/version")
            assert status == 200 and isinstance(version["version"], str)
            status, err = await raw(http, "POST", "/detokenize", {"tokens": [999]})
            assert status == 400 and err["error"]["param"] == "tokens"

            # Every unimplemented parameter is a 400 that names it.
            base = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
            for extra, param in [({"suffix": "x"}, "suffix"), ({"prompt_logprobs": 1}, "prompt_logprobs"),
                                 ({"guided_regex": "a+"}, "guided_regex"),
                                 ({"response_format": {"type": "xml"}}, "response_format"),
                                 ({"guided_json": [1]}, "guided_json"),
                                 ({"logprobs": 21}, "logprobs"), ({"echo": True, "logprobs": 1}, "echo"),
                                 ({"best_of": 3}, "best_of"), ({"min_p": 2}, "min_p"),
                                 ({"presence_penalty": 3}, "presence_penalty"),
                                 ({"logit_bias": {"999": 1}}, "logit_bias"),
                                 ({"repetition_penalty": 0}, "repetition_penalty")]:
                status, err = await raw(http, "POST", "/v1/completions", {**base, **extra})
                assert status == 400 and err["error"]["param"] == param, (extra, status, err)
            status, err = await raw(http, "POST", "/v1/chat/completions",
                                    {"model": MODEL, "messages": msgs, "top_logprobs": 2})
            assert status == 400 and err["error"]["param"] == "top_logprobs"
    asyncio.run(body())


def test_disaggregated_serving_carries_logprobs_and_stop_reason(ref):
    """Prefill and decode instance servers (devices 0 and 1): the first token's logprobs come from the prefill
    side, the rest from the decode side; a request the first token ends reports its stop_reason."""
    async def body():
        scheduler = Scheduler(GlobalSchedulerConfig(port=0, **FAST), ModelInfo.byte_level(CFG.max_position_embeddings))
        await scheduler.start()
        servers = []
        for role, device in (("prefill", 0), ("decode", 1)):
            llm = LLM(model=CFG, page_size=8, num_pages=128, max_num_batched_tokens=64, max_num_seqs=8, seed=0,
                      compilation_cache="off", device_ids=[device], enable_prefix_caching=False)
            servers.append(await InstanceServer(llm.engine, InstanceConfig(
                role=role, pd_mode="basic", scheduler_address=scheduler.address, instance_id=role)).start())
        http = HttpFront(scheduler, port=0)
        await http.start()
        client = openai.AsyncOpenAI(base_url=http.url + "/v1", api_key="unused", max_retries=0, timeout=600.0)
        try:
            want = offline(ref, PROMPT, max_tokens=6, ignore_eos=True, logprobs=2, presence_penalty=1.0)
            stream = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0,
                                                     logprobs=2, presence_penalty=1.0, stream=True,
                                                     extra_body={"ignore_eos": True})
            events = [x async for x in stream]
            assert len(events) == 6
            assert [e.choices[0].logprobs.token_logprobs[0] for e in events] == pytest.approx(
                [d[t].logprob for t, d in zip(want.token_ids, want.logprobs)], abs=1e-4)
            r = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0,
                                                logit_bias={"33": 100}, extra_body={"stop_token_ids": [33]})
            c = r.choices[0]
            assert c.finish_reason == "stop" and c.model_extra["stop_reason"] == 33 and r.usage.completion_tokens == 1
        finally:
            await client.close()
            await http.stop()
            for s in servers:
                await s.stop(0)
            await scheduler.stop(0)
    asyncio.run(body())
