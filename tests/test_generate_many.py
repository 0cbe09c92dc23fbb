"""The served token path's hot spots. Instance.GenerateMany (one call per instance carrying every colocated
request's tokens, a message per engine step) against the per-request Generate calls it replaces: the same
greedy tokens, text, stop strings, logprobs and n > 1 over the OpenAI API, one SSE event per token; a client
that leaves and a deadline abort the request on the instance (pages freed); the shared call survives requests
ending in every way. And the SSE token event's fast formatting is byte-identical to json.dumps."""

import asyncio
import contextlib
import json
import time

import pytest

openai = pytest.importorskip("openai")
aiohttp = pytest.importorskip("aiohttp")

from jaxserve import LLM  # noqa: E402
from jaxserve.config import ModelConfig  # noqa: E402
from jaxserve.instance import InstanceConfig, InstanceServer  # noqa: E402
from jaxserve.scheduler import GlobalSchedulerConfig, ModelInfo, Scheduler  # noqa: E402
from jaxserve.scheduler.http_front import HttpFront  # noqa: E402
from timeouts import scaled  # noqa: E402

CFG = ModelConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, max_position_embeddings=128, bos_token_id=256,
                  eos_token_id=(257,), dtype="float32")
FAST = dict(health_interval_s=0.2, health_timeout_s=2.0, unhealthy_after=3, no_instance_wait_s=30.0,
            shutdown_grace_s=0.0, profile_instances=False)
MODEL = "byte"
PROMPTS = ["def add(a, b):\n    return", "The quick brown fox", "1, 2, 3, 4,", "Once upon a time"]


def run(coro, timeout=300.0):
    return asyncio.run(asyncio.wait_for(coro, scaled(timeout)))


@pytest.fixture(scope="module")
def engine():
    # No prefix caching: the two runs compared share this engine, and the second would otherwise reuse the
    # first one's KV (other step shapes, so other rounding, and a random model's argmax can flip).
    return LLM(model=CFG, page_size=8, num_pages=128, max_num_batched_tokens=64, max_num_seqs=8, seed=0,
               compilation_cache="off", enable_prefix_caching=False).engine


@contextlib.asynccontextmanager
async def served(engine, generate_many: bool):
    scheduler = Scheduler(GlobalSchedulerConfig(port=0, generate_many=generate_many, **FAST),
                          ModelInfo.byte_level(CFG.max_position_embeddings))
    await scheduler.start()
    instance = await InstanceServer(engine, InstanceConfig(
        role="colocated", scheduler_address=scheduler.address, instance_id="i0")).start()
    http = HttpFront(scheduler, port=0)
    await http.start()
    try:
        yield scheduler, instance, http
    finally:
        await http.stop()
        await instance.stop(0)
        await scheduler.stop(0)


async def stream(http, body, headers=None) -> tuple[int, list[dict]]:
    """POST a streamed completion; (status, the SSE events' JSON)."""
    async with aiohttp.ClientSession() as session:
        async with session.post(http.url + "/v1/completions", json=dict(body, stream=True),
                                headers=headers or {}) as resp:
            events = []
            async for line in resp.content:
                line = line.strip()
                if line.startswith(b"data: ") and line != b"data: [DONE]":
                    events.append(json.loads(line[6:]))
            return resp.status, events


def _top2_gap(top) -> float:
    """The margin between the two most likely tokens (inf when fewer than two were asked for)."""
    values = sorted((top or {}).values(), reverse=True)
    return values[0] - values[1] if len(values) > 1 else float("inf")


def summary(events):
    """Per choice: (text, tokens from logprobs if any, finish_reason, stop_reason, token events)."""
    out = {}
    for e in events:
        for c in e["choices"]:
            text, toks, finish, stop, n = out.get(c["index"], ("", [], None, None, 0))
            lp = c.get("logprobs")
            if lp:
                gaps = [_top2_gap(top) for top in (lp.get("top_logprobs") or [None] * len(lp["tokens"]))]
                toks = toks + [(t, round(v, 4), g) for t, v, g in zip(lp["tokens"], lp["token_logprobs"], gaps)]
            out[c["index"]] = (text + c["text"], toks, c["finish_reason"] or finish,
                               c.get("stop_reason", stop), n + 1)
    return out


def same_stream(a, b, tie=2e-3) -> bool:
    """Two summaries of one request are the same stream: equal, or equal up to a greedy position where the
    model's top two log-probabilities are within `tie` (a random model's near-tie, which another run of the
    same step may break the other way: the CPU's float reductions are not bit-stable across runs), after
    which the rest of that choice may differ but its finish and token-event count may not."""
    if a == b:
        return True
    if a.keys() != b.keys():
        return False
    for i in a:
        (ta, la, fa, sa, na), (tb, lb, fb, sb, nb) = a[i], b[i]
        if (fa, sa, na) != (fb, sb, nb):
            return False
        if len(la) != len(lb):
            return False
        k = next((j for j, (x, y) in enumerate(zip(la, lb)) if x[0] != y[0]), None)
        if any(abs(x[1] - y[1]) > 1e-3 for x, y in zip(la[:k], lb[:k])):
            return False
        if k is None:
            if ta != tb:
                return False
        elif not (la[k][2] < tie and lb[k][2] < tie):
            return False
    return True


async def eventually(predicate, timeout=20.0, what="condition"):
    end = time.monotonic() + scaled(timeout)
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


BODIES = [dict(model=MODEL, prompt=p, max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2)
          for p in PROMPTS] + [
    dict(model=MODEL, prompt=PROMPTS[0], max_tokens=30, temperature=0.0, stop=["\n", "re"], logprobs=2),
    dict(model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=0.8, seed=7, n=3, logprobs=1),
]


def test_same_streams_as_per_request_calls(engine):
    async def body(generate_many):
        async with served(engine, generate_many) as (scheduler, instance, http):
            # One at a time: the same batch composition either way, so the same floating-point results (a
            # random model's greedy argmax can flip between batch shapes).
            results = []
            for b in BODIES:  # each after the last has left the engine (else they may share a step)
                await eventually(lambda: instance.loop_thread.num_live == 0, what="the engine idle")
                results.append(await stream(http, b))
            record = scheduler.instances.router.instances["i0"]
            assert (record.mux is not None) == generate_many
            assert all(status == 200 for status, _ in results), results
            # All at once: several streams share each message.
            together = await asyncio.gather(*(stream(http, b) for b in BODIES))
            for (status, events), b in zip(together, BODIES):
                assert status == 200
                s = summary(events)
                assert len(s) == b.get("n", 1)
                if b.get("ignore_eos"):
                    assert s[0][2] == "length" and s[0][4] == b["max_tokens"]
            await eventually(lambda: instance.loop_thread.num_live == 0, what="every request to end")
            return [summary(events) for _, events in results]

    many, per_request = run(body(True)), run(body(False))
    for a, b in zip(many, per_request):
        assert same_stream(a, b), (a, b)
    for s, b in zip(many, BODIES):
        assert len(s) == b.get("n", 1)
        for text, _, finish, _, n_events in s.values():
            assert finish in ("length", "stop")
            if b.get("ignore_eos"):
                assert finish == "length" and n_events == b["max_tokens"]  # one SSE event per token


def test_client_gone_and_deadline_abort_on_the_instance(engine):
    async def body():
        async with served(engine, True) as (scheduler, instance, http):
            long = dict(model=MODEL, prompt=PROMPTS[2], max_tokens=100, temperature=0.0, ignore_eos=True)
            async with aiohttp.ClientSession() as session:
                async with session.post(http.url + "/v1/completions", json=dict(long, stream=True)) as resp:
                    got = 0
                    async for line in resp.content:
                        got += line.startswith(b"data: ")
                        if got >= 3:
                            break  # leave mid-stream
            await eventually(lambda: instance.loop_thread.num_live == 0, what="the abandoned request's abort")
            status, _ = await stream(http, long, headers={"X-Request-Timeout": "0.001"})
            assert status == 504
            await eventually(lambda: instance.loop_thread.num_live == 0, what="the expired request's abort")
            # The shared call still serves.
            status, events = await stream(http, dict(long, max_tokens=5))
            assert status == 200 and summary(events)[0][2] == "length"
            await eventually(lambda: engine.pool.num_free_pages() + engine.pool.num_evictable_pages()
                             == engine.pool.num_pages - 1, what="every page back")
    run(body())


@pytest.mark.parametrize("usage", [False, True])
@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("text", ["", " t12", 'quote " back\\slash \n nl', "ünï 漢字 \u2028 \x01"])
def test_token_event_bytes_are_json_dumps(chat, text, usage):
    from jaxserve.scheduler.http_responses import sse_head, token_event
    rid, obj, created, model = "cmpl-ab\"c", "chat.completion.chunk" if chat else "text_completion", 17, "m/ö"
    choice = ({"index": 3, "delta": {"content": text}, "logprobs": None, "finish_reason": None} if chat else
              {"index": 3, "text": text, "logprobs": None, "finish_reason": None})
    data = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
    if usage:
        data["usage"] = None
    want = b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"
    assert token_event(sse_head(rid, obj, created, model), 3, text, chat, usage) == want


def test_a_steps_events_reach_each_loop_in_one_callback():
    from jaxserve.instance.engine_loop import Sink, deliver

    class Loop:
        def __init__(self):
            self.callbacks = []

        def call_soon_threadsafe(self, fn, *args):
            self.callbacks.append((fn, args))

    class Staged(Sink):
        def __init__(self, loop, got):
            self.loop, self.got = loop, got

        def stage(self, event):
            return self.loop, self.got.append

    class Plain(Sink):
        def __init__(self):
            self.pushed = []

        def push(self, event):
            self.pushed.append(event)

    a, b = Loop(), Loop()
    got_a1, got_a2, got_b = [], [], []
    plain = Plain()
    sinks = [Staged(a, got_a1), Staged(a, got_a2), Staged(b, got_b), plain]
    deliver([(sinks[0], ("tokens", [1], None)), (sinks[1], ("tokens", [2], None)), (sinks[3], ("tokens", [3], None)),
             (sinks[2], ("tokens", [4], None)), (sinks[0], ("finish", "length", {}, [5], {}))])
    assert len(a.callbacks) == 1 and len(b.callbacks) == 1 and plain.pushed == [("tokens", [3], None)]
    for loop in (a, b):
        for fn, args in loop.callbacks:
            fn(*args)
    assert got_a1 == [("tokens", [1], None), ("finish", "length", {}, [5], {})]
    assert got_a2 == [("tokens", [2], None)] and got_b == [("tokens", [4], None)]


def test_what_queues_during_a_write_goes_in_one_message():
    """The scheduler's mux sends a lone request as itself and what queued while its previous write was in
    flight (opens and aborts, in order) as one MuxRequest(batch=...); the end of the call still ends it."""
    from jaxserve.proto.v1 import instance_pb2
    from jaxserve.scheduler.mux import InstanceMux

    class Call:
        def __init__(self, requests):
            self.requests = requests

        async def read(self):
            await asyncio.Event().wait()  # no responses in this test

        def cancel(self):
            pass

    class Stub:
        def GenerateMany(self, requests):  # noqa: N802 - the gRPC method's name
            self.call = Call(requests)
            return self.call

    async def body():
        stub, req = Stub(), lambda i: instance_pb2.InstanceGenerateRequest(request_id=f"r{i}", max_tokens=1)
        mux = InstanceMux(stub)
        first = mux.open(req(0), None)
        lone = await stub.call.requests.__anext__()
        assert not lone.batch and lone.stream_id == first.stream_id and lone.generate.request_id == "r0"
        b, c = mux.open(req(1), None), mux.open(req(2), None)
        mux.abort(b.stream_id)
        batched = await stub.call.requests.__anext__()
        assert [(m.stream_id, m.generate.request_id, m.abort) for m in batched.batch] == [
            (b.stream_id, "r1", False), (c.stream_id, "r2", False), (b.stream_id, "", True)]
        mux.open(req(3), None)
        mux.close()
        last = await stub.call.requests.__anext__()
        assert last.generate.request_id == "r3"
        with pytest.raises(StopAsyncIteration):
            await stub.call.requests.__anext__()
    run(body())


def test_a_batched_message_starts_every_request_on_the_instance(engine):
    """Opens queued before the mux's writer runs reach the instance as one batched message, and each request
    streams to its end (its own count of tokens; not compared with a lone run: another batch shape may flip a
    random model's greedy argmax)."""
    from jaxserve.proto.v1 import common_pb2, instance_pb2

    def request(i):
        return instance_pb2.InstanceGenerateRequest(
            request_id=f"b{i}", prompt_token_ids=list(PROMPTS[i].encode()), max_tokens=6,
            sampling=common_pb2.SamplingParams(temperature=0.0, ignore_eos=True))

    async def tokens(call):
        out = []
        while True:
            item = await call.read()
            out += list(item.token_ids)
            if item.finish_reason:
                return out

    async def body():
        async with served(engine, True) as (scheduler, instance, http):
            await stream(http, dict(BODIES[0], max_tokens=2))  # opens the shared call
            mux = scheduler.instances.router.instances["i0"].mux
            calls = [mux.open(request(i), None) for i in range(3)]  # queued together: one message
            together = await asyncio.gather(*(tokens(c) for c in calls))
            assert [len(t) for t in together] == [6, 6, 6]
            await eventually(lambda: instance.loop_thread.num_live == 0, what="every request to end")
    run(body(), timeout=120)
