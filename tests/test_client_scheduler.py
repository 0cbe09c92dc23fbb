"""The scheduler end to end over real gRPC on 127.0.0.1, with fake instance servers: validation, admission,
cancellation and deadlines, instance failure and migration, health, disaggregation, and both clients."""

import asyncio
import contextlib
import json
import shutil
import subprocess
import threading
import time

import grpc
import pytest

from jaxserve.client import AsyncClient, Client, ClientError, RetryPolicy, tls_credentials
from jaxserve.proto.v1 import common_pb2, scheduler_pb2
from jaxserve.scheduler import GlobalSchedulerConfig, ModelInfo, Scheduler, load_model_info
from jaxserve.testing.fake_instance import EOS, FakeInstance, expected_tokens
from jaxserve.scheduler.tokenizer import ByteTokenizer, IncrementalDetokenizer, TextStream
from timeouts import scaled  # noqa: E402

MAX_LEN = 256
FAST = dict(health_interval_s=0.1, health_timeout_s=0.2, unhealthy_after=2, no_instance_wait_s=0.5,
            shutdown_grace_s=0.0)


def run(coro, timeout=20.0):
    return asyncio.run(asyncio.wait_for(coro, scaled(timeout)))


def ids(text):
    return ByteTokenizer().encode(text)


async def eventually(predicate, timeout=3.0, what="condition"):
    end = time.monotonic() + scaled(timeout)
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def cluster(n=2, roles=None, model=None, fake=None, **config):
    """A scheduler on an ephemeral port, n fake instances registered with it, and an AsyncClient."""
    scheduler = Scheduler(GlobalSchedulerConfig(port=0, **{**FAST, **config}), model or ModelInfo.byte_level(MAX_LEN))
    await scheduler.start()
    roles = roles or [common_pb2.ROLE_COLOCATED] * n
    fakes = []
    for k, role in enumerate(roles):
        fakes.append(await FakeInstance(role, scheduler_address=scheduler.address, instance_id=f"fake-{k}",
                                        page_size=4, **(fake or {})).start())
    client = AsyncClient(scheduler.address, retry=RetryPolicy(max_attempts=1))
    try:
        yield scheduler, fakes, client
    finally:
        await client.close()
        for f in fakes:
            with contextlib.suppress(Exception):
                await f.kill()
        await scheduler.stop(0)


def serving(fakes):
    return [f for f in fakes if f.running]


# ------------------------------------------------------------------------------------------ generation
def test_generate_streams_tokens_text_and_usage():
    async def body():
        async with cluster(n=1) as (scheduler, fakes, client):
            deltas = [d async for d in client.stream("Hello!", max_tokens=12, request_id="r1")]
            prompt = ids("Hello!")
            tokens = [t for d in deltas for t in d.token_ids]
            assert tokens == expected_tokens(len(prompt), 12)
            assert "".join(d.text for d in deltas) == bytes(tokens).decode()
            last = deltas[-1]
            assert last.finish_reason == "length" and last.request_id == "r1"
            assert last.usage.prompt_tokens == len(prompt) and last.usage.completion_tokens == 12
            assert last.usage.instance_id == "fake-0" and last.usage.ttft_s > 0 and last.usage.e2e_s >= last.usage.ttft_s
            assert all(d.finish_reason is None for d in deltas[:-1])
            # Token-id prompts are used as given; the fake's EOS ends a request with "stop".
            fakes[0].eos_after = 3
            done = await client.generate([256, 65, 66], max_tokens=10)
            assert done.token_ids == (*expected_tokens(3, 2), EOS) and done.finish_reason == "stop"
            assert done.text == bytes(expected_tokens(3, 2)).decode()  # EOS decodes to nothing
            assert await client.tokenize("hi") == ids("hi")
    run(body())


def test_second_request_sharing_a_prefix_goes_where_it_is_cached():
    async def body():
        async with cluster(n=3) as (scheduler, fakes, client):
            system = "You are a helpful assistant. " * 4
            first = await client.generate(system + "Question one?", max_tokens=4)
            await eventually(lambda: scheduler.router.trees[common_pb2.ROLE_COLOCATED].num_tokens > 0,
                             what="the INSERT event")
            for k in range(3):
                again = await client.generate(system + f"Another question {k}?", max_tokens=4)
                assert again.usage.instance_id == first.usage.instance_id
                assert again.usage.cached_tokens >= len(ids(system)) // 4 * 4 - 4
            stats = await client.stats()
            assert stats.hit_rate > 0 and stats.predicted_cached_tokens > 0
            infos = {i.instance_id: i for i in await client.list_instances()}
            assert infos[first.usage.instance_id].indexed_tokens > 0
            assert infos[first.usage.instance_id].cost_model_calibrated  # profiled at registration
    run(body())


def test_stop_strings_truncate_text_and_end_the_request():
    async def body():
        async with cluster(n=1, fake=dict(token_delay_s=0.001)) as (scheduler, fakes, client):
            prompt = ids("xyz")
            full = bytes(expected_tokens(len(prompt), 40)).decode()
            stop = full[10:13]
            done = await client.generate("xyz", max_tokens=40, stop=[stop, "not-there"], request_id="stop-1")
            assert done.finish_reason == "stop"
            assert done.text == full[:full.index(stop)]
            assert len(done.token_ids) < 40
            await eventually(lambda: "stop-1" in fakes[0].cancelled, what="the instance to see the end")
    run(body())


# ---------------------------------------------------------------------------------------- validation
BAD_REQUESTS = [
    (dict(prompt="a" * 300), ["maximum context length is 256 tokens", "301 tokens"]),
    (dict(prompt="a" * 200, max_tokens=100),
     ["maximum context length is 256 tokens", "you requested 301 tokens (201 in the messages, 100 in the completion)"]),
    (dict(prompt="hi", max_tokens=0), ["max_tokens must be at least 1, got 0"]),
    (dict(prompt="hi", max_tokens=-3), ["max_tokens must be at least 1, got -3"]),
    (dict(prompt="hi", temperature=-0.5), ["temperature must be non-negative, got -0.5"]),
    (dict(prompt="hi", top_p=0.0), ["top_p must be in (0, 1], got 0.0"]),
    (dict(prompt="hi", top_p=1.5), ["top_p must be in (0, 1], got 1.5"]),
    (dict(prompt="hi", top_k=-2), ["top_k must be -1 (disable), or at least 1, got -2"]),
    (dict(prompt="hi", top_k=0), ["top_k must be -1 (disable), or at least 1, got 0"]),
    (dict(prompt=[1, 2, 300]), ["Token id 300 is out of vocabulary", "258 tokens", "0 to 257"]),
    (dict(prompt=[-1]), ["Token id -1 is out of vocabulary"]),
    (dict(prompt=""), ["The prompt cannot be empty"]),
    (dict(prompt=[]), ["The prompt cannot be empty"]),
    (dict(prompt="hi", seed=2**32), ["seed must be in [0, 2**32), got 4294967296"]),
    (dict(prompt="hi", stop=[""]), ["stop strings must be non-empty"]),
    (dict(prompt="hi", stop_token_ids=[999]), ["stop_token_ids must be in the vocabulary [0, 258), got 999"]),
]


def test_every_bad_input_is_invalid_argument_naming_the_limit():
    async def body():
        async with cluster(n=1) as (scheduler, fakes, client):
            for kwargs, needles in BAD_REQUESTS:
                kwargs = dict(kwargs)
                with pytest.raises(ClientError) as err:
                    await client.generate(kwargs.pop("prompt"), **kwargs)
                assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT, (kwargs, err.value)
                for needle in needles:
                    assert needle in err.value.details, (needle, err.value.details)
            # No prompt at all.
            stub_request = scheduler_pb2.GenerateRequest(max_tokens=1)
            async with grpc.aio.insecure_channel(scheduler.address) as channel:
                from jaxserve.proto.v1 import scheduler_pb2_grpc
                call = scheduler_pb2_grpc.SchedulerStub(channel).Generate(stub_request)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call.read()
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "no prompt" in err.value.details()
            assert fakes[0].requests == []  # nothing reached the instance
            assert (await client.stats()).num_rejected == len(BAD_REQUESTS) + 1
            # Exactly at the limit is fine, and max_tokens defaults to what is left of the context.
            ok = await client.generate("a" * 200, max_tokens=55)
            assert len(ok.token_ids) == 55
            ok = await client.generate([5] * 250)
            assert len(ok.token_ids) == 6
    run(body())


def test_instance_reported_context_limit_applies():
    async def body():
        async with cluster(n=1, fake=dict(max_model_len=64)) as (scheduler, fakes, client):
            with pytest.raises(ClientError, match="maximum context length is 64 tokens"):
                await client.generate("a" * 60, max_tokens=10)
    run(body())


# ----------------------------------------------------------------------------------------- admission
def test_admission_queue_overflow_is_resource_exhausted():
    async def body():
        async with cluster(n=1, max_queued_requests=2, max_queued_tokens=200,
                           fake=dict(token_delay_s=0.02)) as (scheduler, fakes, client):
            streams = [client.stream("hold", max_tokens=30) for _ in range(2)]
            for s in streams:
                await s.__anext__()  # admitted and running
            with pytest.raises(ClientError) as err:
                await client.generate("one more", max_tokens=4)
            assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "2 requests" in err.value.details and "limits: 2 requests, 200 tokens" in err.value.details
            for s in streams:
                await s.aclose()
            await eventually(lambda: scheduler.admission.requests == 0, what="the queue to empty")
            with pytest.raises(ClientError) as err:
                await client.generate("a" * 100, max_tokens=150)
            assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "limit of 200 tokens" in err.value.details
            assert len((await client.generate("fits", max_tokens=4)).token_ids) == 4
    run(body())


# ------------------------------------------------------------------------------ cancellation, deadline
def test_client_cancellation_reaches_the_instance():
    async def body():
        async with cluster(n=1, fake=dict(token_delay_s=0.02)) as (scheduler, fakes, client):
            stream = client.stream("cancel me", max_tokens=200, request_id="c-1")
            await stream.__anext__()
            await stream.aclose()
            await eventually(lambda: "c-1" in fakes[0].cancelled, what="the instance to see the cancel")
            await eventually(lambda: fakes[0].running == 0 and scheduler.admission.requests == 0)
            assert "c-1" not in fakes[0].finished
            assert scheduler.router.instances["fake-0"].in_flight_requests == 0
    run(body())


def test_client_deadline_reaches_the_instance():
    async def body():
        async with cluster(n=1, fake=dict(token_delay_s=0.02)) as (scheduler, fakes, client):
            t0 = time.monotonic()
            with pytest.raises(ClientError) as err:
                await client.generate("slow", max_tokens=200, timeout_s=0.3, request_id="d-1")
            assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - t0 < 2.0
            await eventually(lambda: "d-1" in fakes[0].cancelled, what="the instance to see the deadline")
            await eventually(lambda: scheduler.admission.requests == 0)
    run(body())


# -------------------------------------------------------------------------------------------- failures
def test_killed_instance_mid_stream_request_migrates_and_completes():
    async def body():
        async with cluster(n=2, fake=dict(token_delay_s=0.01)) as (scheduler, fakes, client):
            prompt = "migrate me please"
            tokens, text, last = [], [], None
            killed = None
            t0 = time.monotonic()
            async for d in client.stream(prompt, max_tokens=60, seed=5, request_id="m-1"):
                tokens += d.token_ids
                text.append(d.text)
                last = d
                if killed is None and len(tokens) >= 10:
                    killed = serving(fakes)[0]
                    await killed.kill()
            assert time.monotonic() - t0 < 5.0
            assert tokens == expected_tokens(len(ids(prompt)), 60, seed=5)  # the stream just continued
            assert "".join(text) == bytes(tokens).decode()
            assert last.finish_reason == "length" and last.usage.num_migrations == 1
            survivor = next(f for f in fakes if f is not killed)
            assert last.usage.instance_id == survivor.instance_id
            resumed = survivor.requests[-1]
            assert len(resumed.generated_token_ids) >= 10
            assert resumed.max_tokens == 60 - len(resumed.generated_token_ids)
            # The dead instance leaves routing (and the prompt tree).
            await eventually(lambda: killed.instance_id not in scheduler.router.instances, what="removal")
            assert killed.instance_id not in scheduler.router.trees[common_pb2.ROLE_COLOCATED].instances()
    run(body())


def test_killed_only_instance_ends_unavailable_without_hanging():
    async def body():
        async with cluster(n=1, fake=dict(token_delay_s=0.01), no_instance_wait_s=0.3) as (scheduler, fakes, client):
            t0 = time.monotonic()
            got = []
            with pytest.raises(ClientError) as err:
                async for d in client.stream("doomed", max_tokens=200):
                    got += d.token_ids
                    if len(got) >= 5 and fakes[0].running:
                        await fakes[0].kill()
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
            assert "fake-0" in err.value.details
            assert time.monotonic() - t0 < 5.0
            assert (await client.health()) == "NOT_SERVING"
            assert scheduler.admission.requests == 0
    run(body())


def test_hung_instance_is_taken_out_and_its_requests_move():
    async def body():
        async with cluster(n=2, fake=dict(token_delay_s=0.01)) as (scheduler, fakes, client):
            tokens, last, frozen = [], None, None
            t0 = time.monotonic()
            async for d in client.stream("freeze", max_tokens=40, request_id="h-1"):
                tokens += d.token_ids
                last = d
                if frozen is None and len(tokens) >= 5:
                    frozen = serving(fakes)[0]
                    frozen.freeze()
            assert time.monotonic() - t0 < 5.0
            assert tokens == expected_tokens(len(ids("freeze")), 40)
            assert last.usage.num_migrations == 1 and last.usage.instance_id != frozen.instance_id
            assert frozen.instance_id not in scheduler.router.instances
            assert "h-1" in frozen.cancelled  # the hung call was cut
            # A new request goes to the healthy one at once.
            assert (await client.generate("next", max_tokens=3)).usage.instance_id != frozen.instance_id
            frozen.unfreeze()
    run(body())


def test_stalled_stream_behind_a_healthy_server_moves_with_stall_timeout():
    async def body():
        async with cluster(n=2, fake=dict(token_delay_s=0.01), stall_timeout_s=0.3) as (scheduler, fakes, client):
            tokens, stalled = [], None
            async for d in client.stream("stall", max_tokens=30):
                tokens += d.token_ids
                if stalled is None and len(tokens) >= 5:
                    stalled = serving(fakes)[0]
                    stalled.freeze(streams_only=True)
            assert tokens == expected_tokens(len(ids("stall")), 30)
            assert d.usage.num_migrations == 1 and d.usage.instance_id != stalled.instance_id
            stalled.unfreeze()
    run(body())


def test_health_service_serving_and_not_serving():
    async def body():
        scheduler = Scheduler(GlobalSchedulerConfig(port=0, **FAST), ModelInfo.byte_level(MAX_LEN))
        await scheduler.start()
        client = AsyncClient(scheduler.address)
        fake = None
        try:
            assert await client.health() == "NOT_SERVING"  # nothing to route to
            assert await client.health("jaxserve.v1.Scheduler") == "NOT_SERVING"
            fake = await FakeInstance(scheduler_address=scheduler.address, page_size=4).start()
            assert await client.health() == "SERVING"
            assert await client.health("jaxserve.v1.Scheduler") == "SERVING"
            # The instance says NOT_SERVING: out of routing, and the scheduler with it.
            fake.set_serving(False)
            await eventually(lambda: not scheduler.router.instances[fake.instance_id].routable)
            assert await client.health() == "NOT_SERVING"
            fake.set_serving(True)
            await eventually(lambda: scheduler.router.instances[fake.instance_id].routable)
            assert await client.health() == "SERVING"
            # Draining: not routed, and the instance is asked to drain.
            assert await client.drain_instance(fake.instance_id, drain_timeout_s=1.0, wait=True) == 0
            assert fake.draining and await client.health() == "NOT_SERVING"
            await scheduler.stop(0)
            with pytest.raises(ClientError):
                await client.health(timeout_s=1.0)
        finally:
            await client.close()
            if fake is not None:
                await fake.kill()
            await scheduler.stop(0)
    run(body())


def test_drain_instance_returns_once_out_of_routing_and_waits_on_request():
    async def body():
        async with cluster(n=2, fake=dict(token_delay_s=0.01)) as (scheduler, fakes, client):
            # Without wait: returns at once (the instance deregistering must not leave the call hanging).
            assert await client.drain_instance("fake-0", timeout_s=15.0) == 0
            info = {i.instance_id: i for i in await client.list_instances()}
            assert "fake-0" not in info or info["fake-0"].state == scheduler_pb2.INSTANCE_STATE_DRAINING
            await eventually(lambda: fakes[0].draining and "fake-0" not in scheduler.router.instances,
                             what="fake-0 drained and deregistered")
            d = [d async for d in client.stream("after drain", max_tokens=4)][-1]
            assert d.usage.instance_id == "fake-1"
            # With wait: returns once the running request finished, with nothing left.
            stream = client.stream("long one", max_tokens=60)
            first = await stream.__anext__()
            assert first.token_ids
            drain = asyncio.ensure_future(client.drain_instance("fake-1", wait=True, timeout_s=15.0))
            rest = [d async for d in stream]
            assert rest[-1].usage.instance_id == "fake-1"
            assert await drain == 0
            assert fakes[1].running == 0 and fakes[1].draining
            await eventually(lambda: "fake-1" not in scheduler.router.instances, what="fake-1 deregistered")
    run(body(), timeout=30.0)


def test_instance_reregisters_after_scheduler_forgets_it():
    async def body():
        async with cluster(n=1) as (scheduler, fakes, client):
            await client.generate("warm the cache", max_tokens=4)
            await eventually(lambda: scheduler.router.trees[common_pb2.ROLE_COLOCATED].num_tokens > 0)
            record = scheduler.router.instances["fake-0"]
            scheduler.instances.retire(record, "test", lost=False)  # as if the scheduler had declared it dead
            await eventually(lambda: "fake-0" in scheduler.router.instances, what="re-registration")
            # It came back with a CLEAR + snapshot: the tree knows its cache again.
            await eventually(lambda: scheduler.router.trees[common_pb2.ROLE_COLOCATED].held_tokens("fake-0") > 0)
    run(body())


def test_retry_before_first_token_on_unavailable():
    async def body():
        scheduler = Scheduler(GlobalSchedulerConfig(port=0, **{**FAST, "no_instance_wait_s": 0.1}),
                              ModelInfo.byte_level(MAX_LEN))
        await scheduler.start()
        fake = FakeInstance(scheduler_address=scheduler.address, page_size=4)
        client = AsyncClient(scheduler.address, retry=RetryPolicy(max_attempts=20, initial_backoff_s=0.05,
                                                                  max_backoff_s=0.1))
        try:
            async def late_start():
                await asyncio.sleep(0.4)
                await fake.start()
            starter = asyncio.create_task(late_start())
            done = await client.generate("patience", max_tokens=3, timeout_s=5.0)
            assert len(done.token_ids) == 3
            await starter
            no_retry = AsyncClient(scheduler.address, retry=RetryPolicy(max_attempts=1))
            await fake.kill()
            await eventually(lambda: not scheduler.router.instances)
            with pytest.raises(ClientError) as err:
                await no_retry.generate("nobody", max_tokens=3)
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
            await no_retry.close()
        finally:
            await client.close()
            await fake.kill()
            await scheduler.stop(0)
    run(body())


# ------------------------------------------------------------------------------------- disaggregated
def test_disaggregated_prefill_then_decode_and_decode_failure_migrates():
    async def body():
        roles = [common_pb2.ROLE_PREFILL, common_pb2.ROLE_DECODE, common_pb2.ROLE_DECODE]
        async with cluster(roles=roles, fake=dict(token_delay_s=0.01)) as (scheduler, fakes, client):
            prefill = fakes[0]
            prompt = "disaggregated " * 3
            done = await client.generate(prompt, max_tokens=8, session_id="s")
            assert done.token_ids == tuple(expected_tokens(len(ids(prompt)), 8))
            assert done.usage.prefill_instance_id == prefill.instance_id
            decode = next(f for f in fakes[1:] if f.instance_id == done.usage.instance_id)
            # The prefill sent the KV (transfer_with_insert): the decode side indexed it and told the scheduler.
            await eventually(lambda: scheduler.router.trees[common_pb2.ROLE_DECODE].held_tokens(decode.instance_id) > 0)
            # Next turn: same decode instance (it holds the session's KV), prefill hits its own cache.
            turn2 = prompt + done.text + " more"
            again = await client.generate(turn2, max_tokens=4, session_id="s")
            assert again.usage.instance_id == decode.instance_id and again.usage.cached_tokens > 0
            # Kill the decode instance mid-stream: prefill again elsewhere with the streamed tokens, continue.
            tokens = []
            async for d in client.stream(turn2, max_tokens=40, session_id="s"):
                tokens += d.token_ids
                if len(tokens) >= 5 and decode.running:
                    await decode.kill()
            assert tokens == expected_tokens(len(ids(turn2)), 40)
            assert d.usage.num_migrations == 1 and d.usage.instance_id != decode.instance_id
    run(body())


# ------------------------------------------------------------------------------------------ sync client
class LoopThread:
    """An event loop in a thread, for serving while the blocking client runs in the test's thread."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout=10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def test_sync_client():
    lt = LoopThread()

    async def setup():
        scheduler = Scheduler(GlobalSchedulerConfig(port=0, **FAST), ModelInfo.byte_level(MAX_LEN))
        await scheduler.start()
        fake = await FakeInstance(scheduler_address=scheduler.address, page_size=4, token_delay_s=0.01).start()
        return scheduler, fake

    scheduler, fake = lt.run(setup())
    try:
        with Client(scheduler.address, timeout_s=10) as client:
            done = client.generate("sync", max_tokens=5, request_id="s-1")
            assert done.token_ids == tuple(expected_tokens(len(ids("sync")), 5)) and done.finish_reason == "length"
            assert done.text == bytes(done.token_ids).decode() and done.request_id == "s-1"
            stream = client.stream("sync stream", max_tokens=200, request_id="s-2")
            first = next(stream)
            assert first.token_ids and first.finish_reason is None
            stream.close()  # leaving early cancels the request on the instance
            deadline = time.monotonic() + 3
            while "s-2" not in fake.cancelled and time.monotonic() < deadline:
                time.sleep(0.01)
            assert "s-2" in fake.cancelled
            with pytest.raises(ClientError) as err:
                client.generate("x", max_tokens=0)
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(ClientError) as err:
                client.generate("slow", max_tokens=200, timeout_s=0.2)
            assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert client.health() == "SERVING"
            assert client.tokenize("ab") == ids("ab")
            assert [i.instance_id for i in client.list_instances()] == [fake.instance_id]
            assert client.stats().num_requests >= 3
    finally:
        lt.run(fake.kill())
        lt.run(scheduler.stop(0))
        lt.close()


def test_tls(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)
    credentials = tls_credentials(root_certificates=cert.read_bytes())

    async def body():
        scheduler = Scheduler(GlobalSchedulerConfig(port=0, tls_cert_file=str(cert), tls_key_file=str(key), **FAST),
                              ModelInfo.byte_level(MAX_LEN))
        await scheduler.start()
        fake = await FakeInstance(scheduler_address=scheduler.address, page_size=4,
                                  scheduler_credentials=credentials).start()
        try:
            async with AsyncClient(scheduler.address, credentials=credentials) as client:
                assert len((await client.generate("secure", max_tokens=3)).token_ids) == 3
            async with AsyncClient(scheduler.address, retry=RetryPolicy(max_attempts=1)) as plaintext:
                with pytest.raises(ClientError) as err:
                    await plaintext.generate("insecure", max_tokens=3, timeout_s=2.0)
                assert err.value.code == grpc.StatusCode.UNAVAILABLE
        finally:
            await fake.kill()
            await scheduler.stop(0)
    run(body())


# ------------------------------------------------------------------------------- tokenizer, detokenizer
def test_model_info_from_folders(tmp_path):
    byte_dir = tmp_path / "byte"
    byte_dir.mkdir()
    (byte_dir / "byte_tokenizer.json").write_text(json.dumps({"type": "byte", "vocab_size": 258, "add_bos": True}))
    (byte_dir / "model_config.json").write_text(json.dumps({"vocab_size": 320, "max_position_embeddings": 512}))
    info = load_model_info(byte_dir)
    assert info.max_model_len == 512 and info.vocab_size == 258  # padded embedding rows are not tokens
    assert info.tokenizer.encode("A") == [256, 65]
    assert load_model_info(byte_dir, max_model_len=128).max_model_len == 128
    with pytest.raises(ValueError, match="exceeds"):
        load_model_info(byte_dir, max_model_len=1024)

    tokenizers = pytest.importorskip("tokenizers")
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(hf_dir / "tokenizer.json"))
    (hf_dir / "config.json").write_text(json.dumps({"vocab_size": 5, "max_position_embeddings": 64,
                                                    "eos_token_id": 2, "bos_token_id": 1}))
    info = load_model_info(hf_dir)
    assert info.tokenizer.encode("hello world") == [3, 4]
    assert info.tokenizer.eos_token_ids == (2,) and info.tokenizer.bos_token_id == 1
    assert info.max_model_len == 64 and info.vocab_size == 5


def test_incremental_detokenizer_waits_for_whole_characters():
    tok = ByteTokenizer()
    text = "héllo → wörld ✓"
    detok = IncrementalDetokenizer(tok, ids("prompt"))
    pieces = [detok.add([b]) for b in text.encode()]
    assert "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces)


def test_text_stream_is_the_same_however_the_tokens_are_grouped():
    """Tokens reach the scheduler one per message or several (a lagging stream, GenerateMany): the final text
    is the whole sequence's decode either way, an unfinished character at the end included (as U+FFFD)."""
    tok = ByteTokenizer()
    data = list("pM".encode()) + [0xDB, 0xB1, 0xE2, 0x82]  # "pM", a whole 2-byte character, half of a 3-byte one
    want = tok.decode(data)
    assert want.endswith("\ufffd")
    for groups in ([[b] for b in data], [data], [data[:3], data[3:]], [data[:5], data[5:]]):
        stream = TextStream(tok, ids("prompt"))
        assert "".join(stream.push(g) for g in groups) + stream.flush() == want, groups


def test_text_stream_holds_back_a_possible_stop_string():
    tok = ByteTokenizer()
    stream = TextStream(tok, (), stop=["END"])
    out = "".join(stream.push([b]) for b in b"abcEN")
    assert out == "abc" and not stream.stopped  # "EN" might start "END"
    out += stream.push(list(b"Dxyz"))
    assert stream.stopped and out == "abc" and stream.text == "abc"
    stream = TextStream(tok, (), stop=["END"])
    out = "".join(stream.push([b]) for b in b"abcEN") + stream.flush()
    assert out == "abcEN"


def test_fake_instance_cache_reports_inserts_and_evicts_leaves_first():
    """The fake instance caches with the real prompt index and eviction (a PageBook without KV data)."""
    fake = FakeInstance(page_size=2, cache_pages=3)
    events = []
    fake.cache.book.set_event_listener(lambda kind, tokens: events.append((kind, tuple(tokens))))
    cache = fake.cache
    cache.insert([1, 2, 3, 4, 5])
    assert events == [("insert", (1, 2, 3, 4))]
    assert fake._match([1, 2, 3, 4, 9]) == 4 and fake._match([1, 2]) == 0  # one token is always computed
    cache.insert([1, 2, 7, 8])
    cache.insert([9, 9])  # over capacity: the least recently used leaf goes (for room, before the insert)
    assert events[-2:] == [("evict", (1, 2, 3, 4)), ("insert", (9, 9))] and len(cache) == 3
    assert sorted(cache.snapshot()) == [(1, 2, 7, 8), (9, 9)]
    cache.book.check_invariants()
