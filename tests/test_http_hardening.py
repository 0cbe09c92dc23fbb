"""Issue 16 ("Lock the doors"): hostile or malformed client input is a 400 (gRPC: INVALID_ARGUMENT) naming the
field and what is allowed, never a 500, and one request cannot fan out or grow without bound."""

import asyncio
import json

import pytest

pytest.importorskip("openai")
pytest.importorskip("aiohttp")
grpc = pytest.importorskip("grpc")

from jaxserve.client import AsyncClient, Client  # noqa: E402
from jaxserve.proto.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc  # noqa: E402
from test_http_front import MODEL, cluster, fake_text, ids, raw, run  # noqa: E402

JSON = {"Content-Type": "application/json"}


async def post(http, path, body):
    """A raw POST; json.dumps escapes a lone surrogate as \\ud800, as any JSON client would send it."""
    return await raw(http, "POST", path, data=json.dumps(body).encode(), headers=JSON)


def assert_400(code, err, param, *fragments):
    assert code == 400, (code, err)
    e = err["error"]
    assert e["type"] == "BadRequestError" and e["code"] == 400, e
    assert e["param"] == param, e
    for fragment in fragments:
        assert fragment in e["message"], (fragment, e["message"])


def test_lone_surrogates_are_400_naming_the_field():
    chat = [{"role": "user", "content": "hi"}]
    cases = [
        ("/v1/completions", {"prompt": "a\ud800b"}, "prompt", "prompt contains a lone surrogate"),
        ("/v1/completions", {"prompt": ["ok", "\ud800"]}, "prompt", "prompt[1] contains a lone surrogate"),
        ("/v1/completions", {"prompt": "hi", "stop": ["\udfff"]}, "stop", "stop[0]"),
        ("/v1/completions", {"prompt": "hi", "session_id": "s\ud800"}, "session_id", "session_id"),
        ("/v1/completions", {"prompt": "hi", "\ud800": 1}, None, "lone surrogate"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages",
         "messages[0].content contains a lone surrogate"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
         "messages", "messages[0].content[0].text"),
        ("/v1/chat/completions", {"messages": chat, "session_id": "\ud800"}, "session_id", "session_id"),
    ]

    async def body():
        async with cluster() as (http, fakes, client):
            for path, b, param, fragment in cases:
                code, err = await post(http, path, {"model": MODEL, "max_tokens": 2, **b})
                if param is None:
                    param = err["error"]["param"]  # the key itself is the field
                assert_400(code, err, param, fragment, "valid Unicode")
            assert fakes[0].requests == []
    run(body(), timeout=30)


def test_deep_json_is_400_naming_the_limit():
    async def body():
        async with cluster() as (http, fakes, client):
            for depth in (100_000, 1_000, 100):
                data = b'{"model": "byte", "prompt": ' + b"[" * depth + b"]" * depth + b"}"
                code, err = await raw(http, "POST", "/v1/completions", data=data, headers=JSON)
                assert code == 400, (depth, code, err)
                assert "nested too deeply" in err["error"]["message"] and "at most 64 deep" in err["error"]["message"]
            # Within the limit the ordinary checks answer.
            code, err = await post(http, "/v1/completions", {"model": MODEL, "prompt": [[[1]]]})
            assert_400(code, err, "prompt", "prompt must be a string")
        async with cluster(front=dict(max_json_depth=3)) as (http, fakes, client):
            code, err = await post(http, "/v1/completions", {"model": MODEL, "prompt": [[[1]]]})
            assert_400(code, err, "prompt", "nested too deeply at prompt[0][0]", "at most 3 deep")
    run(body(), timeout=30)


def test_chat_template_kwargs_cannot_override_the_render_arguments():
    msgs = [{"role": "user", "content": "hi"}]

    async def body():
        async with cluster() as (http, fakes, client):
            for kwargs in ({"messages": []}, {"add_generation_prompt": False}, {"bos_token": "x"}):
                code, err = await post(http, "/v1/chat/completions",
                                       {"model": MODEL, "messages": msgs, "chat_template_kwargs": kwargs})
                assert_400(code, err, "chat_template_kwargs", f"may not set {next(iter(kwargs))}",
                           "messages, add_generation_prompt, bos_token, eos_token")
            code, err = await post(http, "/v1/chat/completions",
                                   {"model": MODEL, "messages": msgs, "chat_template_kwargs": [1]})
            assert_400(code, err, "chat_template_kwargs", "must be an object")
            # Other names still reach the template.
            code, ok = await post(http, "/v1/chat/completions", {"model": MODEL, "messages": msgs, "max_tokens": 2,
                                                                 "chat_template_kwargs": {"enable_thinking": False}})
            assert code == 200, ok
    run(body(), timeout=30)


def test_prompts_times_n_is_capped():
    async def body():
        async with cluster() as (http, fakes, client):
            code, err = await post(http, "/v1/completions", {"model": MODEL, "prompt": ["a"] * 3, "n": 100})
            assert_400(code, err, "n", "3 prompt(s) x n=100 = 300", "prompts x n <= 256")
            code, err = await post(http, "/v1/completions", {"model": MODEL, "prompt": ["a"] * 300})
            assert_400(code, err, "n", "prompts x n <= 256")
            assert fakes[0].requests == []
        async with cluster(front=dict(max_completions_per_request=4)) as (http, fakes, client):
            code, err = await post(http, "/v1/completions", {"model": MODEL, "prompt": ["a", "b"], "n": 3})
            assert_400(code, err, "n", "prompts x n <= 4")
            code, err = await post(http, "/v1/chat/completions",
                                   {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 5})
            assert_400(code, err, "n", "prompts x n <= 4")
            code, ok = await post(http, "/v1/completions", {"model": MODEL, "prompt": ["a", "b"], "n": 2,
                                                            "max_tokens": 1})
            assert code == 200 and len(ok["choices"]) == 4, ok
    run(body(), timeout=30)


def test_prompt_bytes_are_capped_before_tokenizing():
    async def body():
        async with cluster() as (http, fakes, client):
            tok = http.scheduler.model.tokenizer
            calls = []
            encode = tok.encode
            tok.encode = lambda text, *a, **k: (calls.append(len(text)), encode(text, *a, **k))[1]
            code, err = await post(http, "/v1/completions", {"model": MODEL, "prompt": "a" * (5 << 20)})
            assert_400(code, err, "prompt", f"{5 << 20} bytes", f"at most {4 << 20} bytes")
            code, err = await post(http, "/v1/completions", {"model": MODEL, "prompt": ["a" * (3 << 20)] * 2})
            assert_400(code, err, "prompt", f"at most {4 << 20} bytes")
            code, err = await post(http, "/v1/chat/completions",
                                   {"model": MODEL, "messages": [{"role": "user", "content": "é" * (3 << 20)}]})
            assert_400(code, err, "messages", f"{6 << 20} bytes", f"at most {4 << 20} bytes")
            assert calls == []  # nothing was tokenized
        async with cluster(front=dict(max_prompt_bytes=100)) as (http, fakes, client):
            code, err = await post(http, "/v1/completions", {"model": MODEL, "prompt": [[1] * 26]})
            assert_400(code, err, "prompt", "104 bytes", "at most 100 bytes")
            code, ok = await post(http, "/v1/completions", {"model": MODEL, "prompt": "a" * 100, "max_tokens": 1})
            assert code == 200, ok
    run(body(), timeout=60)


def test_request_id_length_and_charset_over_grpc():
    async def generate(address, request_id):
        request = scheduler_pb2.GenerateRequest(text="hi", max_tokens=1, request_id=request_id)
        async with grpc.aio.insecure_channel(address) as channel:
            return [r async for r in scheduler_pb2_grpc.SchedulerStub(channel).Generate(request)]

    async def body():
        async with cluster() as (http, fakes, client):
            address = http.scheduler.address
            for rid, fragment in (("x" * 129, "request_id must be at most 128 characters, got 129"),
                                  ("a b", "printable ASCII characters without spaces"),
                                  ("é", "printable ASCII"), ("a\nb", "printable ASCII")):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await generate(address, rid)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, rid
                assert fragment in e.value.details(), (rid, e.value.details())
            assert fakes[0].requests == []
            out = await generate(address, "r" * 128)
            assert out and out[0].request_id == "r" * 128
    run(body(), timeout=30)


def test_request_id_is_sent_once_per_stream_and_the_client_remembers_it():
    async def body():
        async with cluster() as (http, fakes, client):
            address = http.scheduler.address
            request = scheduler_pb2.GenerateRequest(text="hi", max_tokens=32, request_id="r" * 128)
            request.sampling.ignore_eos = True
            async with grpc.aio.insecure_channel(address) as channel:
                out = [r async for r in scheduler_pb2_grpc.SchedulerStub(channel).Generate(request)]
            assert len(out) == 32 and sum(len(r.token_ids) for r in out) == 32
            assert out[0].request_id == "r" * 128 and all(r.request_id == "" for r in out[1:])
            assert sum(r.ByteSize() for r in out) < 32 * 64  # was 32 x (128 + tokens + text)
            async with AsyncClient(address) as c:
                deltas = [d async for d in c.stream("hi", max_tokens=5, request_id="mine", ignore_eos=True)]
                assert len(deltas) == 5 and all(d.request_id == "mine" for d in deltas)
                done = await c.generate("hi", max_tokens=5, ignore_eos=True)
                assert len(done.request_id) == 32  # assigned by the scheduler, remembered from the first message

            def sync():  # the blocking client, off the event loop the scheduler runs on
                with Client(address) as c:
                    return [d.request_id for d in c.stream("hi", max_tokens=4, request_id="sync")]
            assert await asyncio.to_thread(sync) == ["sync"] * 4
    run(body(), timeout=60)


def test_grpc_prompt_size_is_capped_before_tokenizing():
    async def body():
        async with cluster(max_prompt_bytes=1000) as (http, fakes, client):
            address = http.scheduler.address
            async with grpc.aio.insecure_channel(address) as channel:
                stub = scheduler_pb2_grpc.SchedulerStub(channel)
                cases = [(scheduler_pb2.GenerateRequest(text="x" * 1001, max_tokens=1),
                          "1001 bytes; this server takes at most 1000 bytes", "max_prompt_bytes"),
                         (scheduler_pb2.GenerateRequest(text="é" * 501, max_tokens=1), "1002 bytes", "at most 1000"),
                         (scheduler_pb2.GenerateRequest(token_ids=common_pb2.TokenIds(ids=[1] * 5000), max_tokens=1),
                          "maximum context length is 256 tokens", "requested 5000 tokens")]
                for request, *fragments in cases:
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await stub.Generate(request).read()
                    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    for fragment in fragments:
                        assert fragment in e.value.details(), e.value.details()
                assert fakes[0].requests == []
                ok = [r async for r in stub.Generate(scheduler_pb2.GenerateRequest(text="x" * 200, max_tokens=2))]
                assert ok[-1].usage.completion_tokens == 2
    run(body(), timeout=60)


# ------------------------------------------------------------------------- slowloris and the connection cap
async def _closed_within(reader, seconds):
    """Everything the server sent before closing the connection; AssertionError if it stays open."""
    try:
        return await asyncio.wait_for(reader.read(), seconds)
    except asyncio.TimeoutError:
        raise AssertionError(f"the connection was still open after {seconds} s") from None


def test_half_sent_headers_and_bodies_are_closed_after_the_timeouts():
    async def body():
        async with cluster(front=dict(header_timeout_s=0.5, body_timeout_s=0.5)) as (http, fakes, client):
            host, port = http.host, http.port
            # Half-sent headers: closed without an answer.
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: appl")
            await writer.drain()
            assert await _closed_within(reader, 30) == b""
            writer.close()
            # Nothing sent at all: closed too.
            reader, writer = await asyncio.open_connection(host, port)
            assert await _closed_within(reader, 30) == b""
            writer.close()
            # Half-sent body: 408 naming the limit, then closed.
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"prompt\": ")
            await writer.drain()
            answer = await _closed_within(reader, 30)
            assert answer.startswith(b"HTTP/1.1 408"), answer
            assert b"did not arrive within 0.5 s" in answer and b"body_timeout_s" in answer
            writer.close()
            # The server still answers.
            r = await client.completions.create(model=MODEL, prompt="abc", max_tokens=2)
            assert r.choices[0].text == fake_text(len(ids("abc")), 2)
    run(body(), timeout=120)


def test_beyond_the_connection_cap_requests_get_503_and_health_answers():
    async def body():
        async with cluster(front=dict(max_connections=3, header_timeout_s=60)) as (http, fakes, client):
            idle = [await asyncio.open_connection(http.host, http.port) for _ in range(3)]
            await asyncio.sleep(0.2)
            code, err = await post(http, "/v1/completions", {"model": MODEL, "prompt": "abc", "max_tokens": 2})
            assert code == 503 and "at most 3" in err["error"]["message"], (code, err)
            code, ok = await raw(http, "GET", "/health")
            assert code == 200 and ok == {"status": "ok"}
            for _, w in idle:
                w.close()
            await asyncio.sleep(0.2)
            r = await client.completions.create(model=MODEL, prompt="abc", max_tokens=2)
            assert r.choices[0].text == fake_text(len(ids("abc")), 2)
    run(body(), timeout=120)


def test_cache_salt_routes_and_caches_per_tenant_with_fake_instances():
    """The scheduler's prompt trees hold salted keys: a tenant's cached prefix attracts only its own requests."""
    prompt = "A long shared system prompt, and then a question?"

    async def usage(http, salt=None):
        b = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
        if salt is not None:
            b["cache_salt"] = salt
        code, r = await post(http, "/v1/completions", b)
        assert code == 200, r
        return r["usage"]["prompt_tokens_details"]["cached_tokens"], r["choices"][0]["text"]

    async def body():
        async with cluster(n=2) as (http, fakes, client):
            want = fake_text(len(ids(prompt)), 2)
            assert await usage(http, "alice") == (0, want)
            assert await usage(http, "mallory") == (0, want)
            assert await usage(http) == (0, want)
            cached, text = await usage(http, "alice")
            assert cached > 0 and text == want
            trees = http.scheduler.router.trees
            assert sum(len(f.requests) for f in fakes) == 4 and trees
    run(body(), timeout=60)


def test_salt_cache_by_api_key_over_grpc_metadata():
    prompt = "A long shared system prompt, and then a question?"

    async def cached(stub, key, salt=""):
        request = scheduler_pb2.GenerateRequest(text=prompt, max_tokens=2, cache_salt=salt)
        out = [r async for r in stub.Generate(request, metadata=(("authorization", f"Bearer {key}"),))]
        return out[-1].usage.cached_tokens

    async def body():
        async with cluster(salt_cache_by_api_key=True) as (http, fakes, client):
            async with grpc.aio.insecure_channel(http.scheduler.address) as channel:
                stub = scheduler_pb2_grpc.SchedulerStub(channel)
                assert await cached(stub, "key-a") == 0
                assert await cached(stub, "key-b") == 0       # another tenant: nothing shared
                assert await cached(stub, "key-b", "x") == 0  # its own salt does not reach A's either
                assert await cached(stub, "key-a") > 0        # A's own cache still hits
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await cached(stub, "key-a", "s" * 2000)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cache_salt" in e.value.details()
    run(body(), timeout=60)
