"""The real instance server (engine behind gRPC) on 127.0.0.1 with the real scheduler: streams equal the
offline engine's greedy output (resumed requests included), prefix locality across two instances with cached
tokens reported, cancellation and deadlines free pages, health and drain, profiling, an instance process
killed mid-stream (subprocess) ending in a migrated or clearly failed request, and the engine loop's step
watchdog."""

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jaxserve import LLM, SamplingParams
from jaxserve.client import AsyncClient, ClientError, RetryPolicy
from jaxserve.config import ModelConfig
from jaxserve.instance import InstanceConfig, InstanceServer
from jaxserve.proto.v1 import common_pb2, instance_pb2, instance_pb2_grpc
from jaxserve.scheduler import GlobalSchedulerConfig, ModelInfo, Scheduler
from proc_utils import stop_processes
from timeouts import scaled  # noqa: E402

CFG = ModelConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=256,
                  eos_token_id=(257,))
PAGE = 8
ROOT = Path(__file__).resolve().parent.parent
FAST = dict(health_interval_s=0.2, health_timeout_s=0.5, unhealthy_after=2, no_instance_wait_s=2.0,
            shutdown_grace_s=0.0, profile_instances=False)


def make_llm(**kw):
    opts = dict(page_size=PAGE, num_pages=128, max_num_batched_tokens=64, max_num_seqs=8, seed=0,
                compilation_cache="off")
    opts.update(kw)
    return LLM(model=CFG, **opts)


def run(coro, timeout=60.0):
    return asyncio.run(asyncio.wait_for(coro, scaled(timeout)))


async def eventually(predicate, timeout=10.0, what="condition"):
    end = time.monotonic() + scaled(timeout)
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def prompt(seed, n, prefix=()):
    import random
    rng = random.Random(seed)
    return list(prefix) + [rng.randrange(256) for _ in range(n - len(prefix))]


@contextlib.asynccontextmanager
async def cluster(n=1, **config):
    """A scheduler on an ephemeral port, n real instances (tiny random model) registered, an AsyncClient."""
    scheduler = Scheduler(GlobalSchedulerConfig(port=0, **{**FAST, **config}), ModelInfo.byte_level(512))
    await scheduler.start()
    servers = []
    try:
        for k in range(n):
            server = InstanceServer(make_llm().engine, InstanceConfig(scheduler_address=scheduler.address,
                                                                      instance_id=f"inst-{k}", shutdown_grace_s=0))
            servers.append(await server.start())
        client = AsyncClient(scheduler.address, retry=RetryPolicy(max_attempts=1))
        try:
            yield scheduler, servers, client
        finally:
            await client.close()
    finally:
        for s in servers:
            await s.stop(0)
        await scheduler.stop(0)


def pool_is_clean(server) -> bool:
    """No request holds a page: every page is free or held by the index only (read on the engine thread)."""
    def check():
        engine = server.engine
        pool = engine.pool
        pool.check_invariants()
        return (not engine.has_unfinished() and not engine.requests
                and pool.num_free_pages() + pool.num_evictable_pages() == pool.num_pages - 1)
    return server.loop_thread.submit(check).result(timeout=10)


# ------------------------------------------------------------------------------------------ streaming
def test_stream_matches_offline_engine_and_resume_continues_it():
    prompts = [prompt(1, 11), prompt(2, 14), prompt(3, 5)]
    n = 10
    offline = [o.token_ids for o in make_llm().generate(prompts, SamplingParams(max_tokens=n))]

    async def body():
        async with cluster(1) as (scheduler, servers, client):
            async def one(p):
                return [d async for d in client.stream(p, max_tokens=n)]
            streams = await asyncio.gather(*(one(p) for p in prompts))
            for p, deltas, want in zip(prompts, streams, offline):
                got = [t for d in deltas for t in d.token_ids]
                assert got == want
                last = deltas[-1]
                assert all(d.finish_reason is None for d in deltas[:-1])
                assert last.finish_reason == ("stop" if want[-1] == 257 else "length")
                assert last.usage.prompt_tokens == len(p) and last.usage.completion_tokens == len(want)
                assert last.usage.instance_id == "inst-0" and last.usage.ttft_s > 0
            # A resumed request (as after a migration) continues exactly where the tokens left off.
            async with grpc.aio.insecure_channel(servers[0].address) as channel:
                stub = instance_pb2_grpc.InstanceStub(channel)
                p, want = prompts[1], offline[1]
                k = 5
                call = stub.Generate(instance_pb2.InstanceGenerateRequest(
                    request_id="resumed", prompt_token_ids=p, generated_token_ids=want[:k], max_tokens=len(want) - k))
                msgs = [m async for m in call]
                assert [t for m in msgs for t in m.token_ids] == want[k:]
                assert msgs[-1].usage.prompt_tokens == len(p) + k
                assert msgs[-1].usage.completion_tokens == len(want) - k
                # Bad input is INVALID_ARGUMENT from the engine's validation, not a hang.
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.Generate(instance_pb2.InstanceGenerateRequest(
                        request_id="bad", prompt_token_ids=[999], max_tokens=2)).read()
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "vocabulary" in e.value.details()
            assert pool_is_clean(servers[0])
    run(body())


# ------------------------------------------------------------------------------------------ locality
def test_shared_prefix_goes_to_the_instance_holding_it():
    shared = prompt(7, 32)

    async def body():
        async with cluster(2, policy="locality") as (scheduler, servers, client):
            first = await client.generate(prompt(8, 40, shared), max_tokens=4)
            holder = first.usage.instance_id
            # The instance's index inserts reach the scheduler's prompt tree.
            tree = scheduler.router.trees[common_pb2.ROLE_COLOCATED]
            await eventually(lambda: tree.held_tokens(holder) >= 32, what="index events at the scheduler")
            second = await client.generate(prompt(9, 44, shared), max_tokens=4)
            assert second.usage.instance_id == holder
            assert second.usage.cached_tokens >= 32
            by_id = {s.instance_id: s for s in servers}
            stats = await asyncio.wrap_future(by_id[holder].loop_thread.submit(lambda: by_id[holder].engine.stats()))
            assert stats["cached_pages"] > 0
    run(body())


# ------------------------------------------------------------------------------------ cancel / deadline
def test_cancellation_and_deadline_free_pages():
    async def body():
        async with cluster(1) as (scheduler, servers, client):
            server = servers[0]
            # Client cancellation: leave the stream after two messages.
            stream = client.stream(prompt(11, 20), max_tokens=400, ignore_eos=True)
            got = 0
            async for delta in stream:
                got += 1
                if got == 2:
                    break
            await stream.aclose()
            await eventually(lambda: server.loop_thread.num_live == 0, what="abort after cancel")
            assert pool_is_clean(server)
            # Deadline: the call ends with DEADLINE_EXCEEDED and the instance frees the request.
            with pytest.raises(ClientError) as e:
                # 480 decode steps take well over 20 ms even on a fast box (the demo step is ~1 ms).
                await client.generate(prompt(12, 20), max_tokens=480, ignore_eos=True, timeout_s=0.02)
            assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            await eventually(lambda: server.loop_thread.num_live == 0, what="abort after deadline")
            assert pool_is_clean(server)
    run(body())


# ------------------------------------------------------------------------------ health, drain, profile
def test_health_drain_profile_and_unimplemented_roles():
    async def body():
        async with cluster(1) as (scheduler, servers, client):
            server = servers[0]
            async with grpc.aio.insecure_channel(server.address) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                stub = instance_pb2_grpc.InstanceStub(channel)
                assert (await health.Check(health_pb2.HealthCheckRequest())).status == \
                    health_pb2.HealthCheckResponse.SERVING
                prof = await stub.Profile(instance_pb2.ProfileRequest(points=[
                    instance_pb2.ProfileRequest.Point(prompt_len=32, cached_len=0),
                    instance_pb2.ProfileRequest.Point(prompt_len=32, cached_len=24),
                    instance_pb2.ProfileRequest.Point(prompt_len=4096, cached_len=0)], repeats=1))
                assert [(s.prompt_len, s.cached_len) for s in prof.samples] == [(32, 0), (32, 24)]  # 4096 won't fit
                assert all(s.seconds > 0 for s in prof.samples)
                assert pool_is_clean(server) and server.loop_thread.mirror.num_pages() == 0  # profile cleans up
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.Prefill(instance_pb2.PrefillRequest())
                assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
                # An engine failure ends the request with a clear error, never a hang.
                def broken_step():
                    raise RuntimeError("device lost")
                server.engine.step = broken_step
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.Generate(instance_pb2.InstanceGenerateRequest(
                        request_id="doomed", prompt_token_ids=[1, 2, 3], max_tokens=2), timeout=20).read()
                assert e.value.code() == grpc.StatusCode.INTERNAL and "device lost" in e.value.details()
                del server.engine.step
                assert server.loop_thread.num_live == 0 and not server.loop_thread.broken
                stats = await stub.GetStats(instance_pb2.InstanceStatsRequest())
                assert stats.instance_id == "inst-0" and stats.load.num_total_pages == 127 and not stats.draining
                assert (await stub.Drain(instance_pb2.DrainRequest(timeout_s=5))).num_unfinished == 0
                assert (await health.Check(health_pb2.HealthCheckRequest())).status == \
                    health_pb2.HealthCheckResponse.NOT_SERVING
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.Generate(instance_pb2.InstanceGenerateRequest(
                        request_id="late", prompt_token_ids=[1, 2, 3], max_tokens=2)).read()
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
                await eventually(lambda: "inst-0" not in scheduler.router.instances, what="deregistration")
    run(body())


# ------------------------------------------------------------------------------- instance killed mid-stream
def test_killed_instance_process_ends_in_migrated_or_failed_request():
    """Two instance processes (jaxserve.launch.instance, demo model); SIGKILL the one serving a stream: the request
    completes on the other with the same greedy tokens (migrated), or fails with UNAVAILABLE, in bounded time."""
    async def body():
        scheduler = Scheduler(GlobalSchedulerConfig(port=0, **FAST), ModelInfo.byte_level(1024))
        await scheduler.start()
        procs = {}
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
        try:
            for k in range(2):
                procs[f"proc-{k}"] = subprocess.Popen(
                    [sys.executable, "-m", "jaxserve.launch.instance", f"--scheduler={scheduler.address}",
                     f"--instance_id=proc-{k}", "--model=demo", "--page_size=16", "--num_pages=64",
                     "--max_num_batched_tokens=64", "--shutdown_grace_s=0"],
                    cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            await eventually(lambda: len(scheduler.router.instances) == 2, timeout=40, what="instances up")
            async with AsyncClient(scheduler.address, retry=RetryPolicy(max_attempts=1)) as client:
                text = "The quick brown fox jumps over the lazy dog. " * 2
                reference = await client.generate(text, max_tokens=48, ignore_eos=True, timeout_s=40)
                t0 = time.monotonic()
                tokens, victim, last = [], None, None
                try:
                    async for delta in client.stream(text, max_tokens=48, ignore_eos=True, timeout_s=40):
                        tokens += delta.token_ids
                        last = delta
                        if victim is None and len(tokens) >= 3:
                            victim = next(r.instance_id for r in scheduler.router.instances.values()
                                          if r.in_flight_requests)
                            procs[victim].kill()
                    assert last.finish_reason == "length" and last.usage.num_migrations == 1
                    assert last.usage.instance_id != victim
                    assert tokens == list(reference.token_ids)  # the stream just continued
                    print("migrated to", last.usage.instance_id, "from", victim)
                except ClientError as e:
                    assert e.code == grpc.StatusCode.UNAVAILABLE, e
                    print("failed clearly:", e)
                assert victim is not None and time.monotonic() - t0 < 30
        finally:
            stop_processes(procs.values())
            await scheduler.stop(0)
    run(body(), timeout=90)


def test_step_watchdog_fails_requests_of_a_stuck_step():
    """EngineLoop's step watchdog (multi-process instances, where a hung process leaves the engine thread stuck
    in a collective): a step that does not return ends every live request with UNAVAILABLE within the timeout,
    fires on_broken and makes commands fail at once; when the step finally returns the requests are aborted
    (pages freed) and the engine refuses new ones."""
    import threading

    from jaxserve.instance.engine_loop import EngineLoop, Sink

    class Events(Sink):
        def __init__(self):
            self.events, self.error = [], threading.Event()

        def push(self, event):
            self.events.append(event)
            if event[0] == "error":
                self.error.set()

    engine = make_llm().engine
    # A step's normal length grows with the machine's load: the watchdog's limit scales with it (it flaked at
    # a fixed 0.5 s on a loaded 2-core box).
    step_timeout_s = round(scaled(0.5), 1)
    loop = EngineLoop(engine, step_timeout_s=step_timeout_s, compile_grace_s=120)  # compiling steps are never "stuck"
    broken = []
    loop.on_broken = broken.append
    stuck, release = threading.Event(), threading.Event()
    execute = engine.runner.execute

    def maybe_hang(inputs):
        if stuck.is_set():
            release.wait(30)
        return execute(inputs)
    engine.runner.execute = maybe_hang
    loop.start()
    try:
        sink = Events()
        loop.add("a#0", "a", prompt(1, 11), [], SamplingParams(max_tokens=200, ignore_eos=True), sink, time.perf_counter())
        t0 = time.monotonic()
        while sum(len(e[1]) for e in sink.events if e[0] == "tokens") < 4:  # decode shapes compiled
            assert time.monotonic() - t0 < 60 and not sink.error.is_set(), sink.events
            time.sleep(0.01)
        stuck.set()
        t0 = time.monotonic()
        assert sink.error.wait(scaled(10)), sink.events
        elapsed = time.monotonic() - t0
        assert elapsed < step_timeout_s + scaled(1.5), elapsed
        code, message = sink.events[-1][1:]
        assert code == grpc.StatusCode.UNAVAILABLE, message
        assert f"did not finish within {step_timeout_s:g} s" in message, message
        assert len(broken) == 1 and loop.broken == broken[0]
        with pytest.raises(RuntimeError, match="broken"):
            loop.submit(lambda: None).result(timeout=1)  # no queueing behind the stuck thread
        release.set()  # the step returns: the engine thread aborts what was live
        deadline = time.monotonic() + 10
        while True:
            try:
                if not loop.submit(lambda: engine.has_unfinished()).result(timeout=10):
                    break
            except RuntimeError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.05)
        late = Events()
        loop.add("b#1", "b", prompt(2, 5), [], SamplingParams(max_tokens=2), late, time.perf_counter())
        assert late.error.wait(10) and "broken" in late.events[-1][2]
        assert loop.submit(lambda: engine.pool.num_free_pages() + engine.pool.num_evictable_pages()).result(10) \
            == engine.pool.num_pages - 1
    finally:
        release.set()
        loop.stop()


def test_engine_loop_fails_an_unschedulable_request_alone():
    """A request that can never fit the free KV pages (the rest held by a prefill-only request waiting for its
    transfer): the engine raises the typed Unschedulable, and the loop fails that request alone with
    RESOURCE_EXHAUSTED; the instance is not broken and the held request is still served."""
    import threading

    from jaxserve.instance.engine_loop import EngineLoop, Sink

    class Events(Sink):
        def __init__(self):
            self.events, self.done = [], threading.Event()

        def push(self, event):
            self.events.append(event)
            if event[0] in ("error", "prefilled", "finish"):
                self.done.set()

    engine = make_llm(num_pages=9, enable_prefix_caching=False).engine  # 8 usable pages
    loop = EngineLoop(engine)
    loop.start()
    try:
        held, big = Events(), Events()
        loop.add("held#0", "held", list(range(1, 41)), [], SamplingParams(max_tokens=4), held, time.perf_counter(),
                 prefill_only=True)
        assert held.done.wait(60) and held.events[-1][0] == "prefilled", held.events
        loop.add("big#1", "big", list(range(50, 80)), [], SamplingParams(max_tokens=2), big, time.perf_counter())
        assert big.done.wait(60), big.events
        code, message = big.events[-1][1:]
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "cannot be scheduled" in message, big.events
        assert not loop.broken
        assert loop.submit(lambda: engine.scheduler.has_work()).result(10) is False
    finally:
        loop.stop()
