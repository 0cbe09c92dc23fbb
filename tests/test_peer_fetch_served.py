"""Peer fetch served (issue 18): three colocated instance servers (one process, a tiny random model, each on its
own CPU device) behind the scheduler with policy kv_pool and peer fetch. A prefix computed on A; A made busy
(the scheduler's pending-work estimate for it); a request for it routed elsewhere has A push its pages first
(PushKv: PrepareKvTransfer / CommitKvTransfer(cache_only) on the target, which pulls and indexes them), so the
target computes only the rest; greedy tokens equal the plain uncached run; bytes moved show in InstanceStats
and /metrics. The holder killed mid-transfer: the target recomputes, same tokens, nothing half-received
indexed, no leaked pages."""

import asyncio
import contextlib
import time

import grpc
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.client import AsyncClient, RetryPolicy
from jaxserve.config import ModelConfig
from jaxserve.instance import InstanceConfig, InstanceServer
from jaxserve.mempool.transfer import TransferError
from jaxserve.proto.v1 import common_pb2, instance_pb2, instance_pb2_grpc
from jaxserve.scheduler import GlobalSchedulerConfig, ModelInfo, Scheduler
from jaxserve.scheduler.metrics import SchedulerMetrics
from jaxserve.scheduler.router import COLOCATED
from timeouts import scaled

CFG = ModelConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, max_position_embeddings=512)
PAGE = 8
# Health probes that time out on a loaded box would take the holder out of routing (then nothing is pulled):
# their limits scale with the load.
FAST = dict(health_interval_s=0.2, health_timeout_s=scaled(2.0), unhealthy_after=3, no_instance_wait_s=2.0,
            shutdown_grace_s=0.0, profile_instances=False, report_interval_s=0.1)


def tiny(caching, device):
    return LLM(model=CFG, page_size=PAGE, num_pages=64, max_num_batched_tokens=64, max_num_seqs=8, seed=0,
               compilation_cache="off", enable_prefix_caching=caching, device_ids=[device])


async def eventually(predicate, timeout=20.0, what="condition"):
    end = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def stats(address):
    async with grpc.aio.insecure_channel(address) as channel:
        return await instance_pb2_grpc.InstanceStub(channel).GetStats(instance_pb2.InstanceStatsRequest(),
                                                                       timeout=scaled(5))


async def clean(address) -> bool:
    s = await stats(address)
    return (s.load.num_free_pages == s.load.num_total_pages and s.load.num_running_requests == 0
            and s.kv_pending == 0 and s.kv_held_pages == 0)


@contextlib.asynccontextmanager
async def kv_pool_cluster(instances, metrics=None, make_llm=None):
    """A kv_pool + peer-fetch scheduler and one InstanceServer per (name, InstanceConfig keywords), instance
    k on CPU device k (`make_llm(caching, device)`, default `tiny`); yields (scheduler, {name: server},
    client)."""
    make_llm = make_llm or tiny
    scheduler = Scheduler(GlobalSchedulerConfig(port=0, policy="kv_pool", peer_fetch=True, kv_bytes_per_token=256,
                                                peer_link_bytes_s=1e9, **FAST), ModelInfo.byte_level(512))
    if metrics is not None:
        scheduler.observer = metrics(scheduler)
    await scheduler.start()
    servers = {}
    client = AsyncClient(scheduler.address, retry=RetryPolicy(max_attempts=1))
    try:
        for k, (name, config) in enumerate(instances):
            servers[name] = await InstanceServer(make_llm(True, k).engine, InstanceConfig(
                scheduler_address=scheduler.address, instance_id=name, shutdown_grace_s=0, **config)).start()
        yield scheduler, servers, client
    finally:
        await client.close()
        for s in servers.values():
            with contextlib.suppress(Exception):
                await s.stop(0)
        await scheduler.stop(0)


@contextlib.asynccontextmanager
async def cluster():
    colocated = dict(role="colocated", peer_fetch=True, kv_transfer_timeout_s=3)
    async with kv_pool_cluster([(name, colocated) for name in "abc"],
                               metrics=lambda s: SchedulerMetrics(s, "tiny", kv_bytes_per_token=256)) as (
            scheduler, servers, client):
        yield scheduler, scheduler.observer, servers, client


async def put_prefix_on(server, scheduler, prefix):
    """Run a request for `prefix` on `server` directly; wait until the scheduler's tree shows it there."""
    async with grpc.aio.insecure_channel(server.address) as ch:
        req = instance_pb2.InstanceGenerateRequest(request_id="warm", prompt_token_ids=prefix, max_tokens=2,
                                                   sampling=common_pb2.SamplingParams(ignore_eos=True))
        async for _ in instance_pb2_grpc.InstanceStub(ch).Generate(req, timeout=scaled(60)):
            pass
    want = len(prefix) // PAGE * PAGE

    async def indexed():
        tree = scheduler.router.trees.get(COLOCATED)
        return tree is not None and tree.match(tuple(prefix)).get(server.instance_id, 0) >= want
    await eventually(indexed, scaled(20), "the prefix in the scheduler's prompt tree")


def busy(scheduler, instance_id):
    scheduler.router.instances[instance_id].pending_prefill_s = 1e3  # its queue, as the scheduler sees it


def test_routed_instance_pulls_the_busy_holders_prefix():
    prefix = [(7 * i + 3) % 251 + 1 for i in range(64)]   # 8 pages
    prompt = prefix + [9, 8, 7, 6, 5]
    ref = tiny(False, 3).generate([prompt], SamplingParams(max_tokens=6, ignore_eos=True))[0].token_ids

    async def body():
        async with cluster() as (scheduler, metrics, servers, client):
            await put_prefix_on(servers["a"], scheduler, prefix)
            busy(scheduler, "a")
            out = await client.generate(prompt, max_tokens=6, ignore_eos=True, timeout_s=60)
            assert list(out.token_ids) == list(ref)
            assert out.usage.instance_id in ("b", "c")
            # The routed instance computed only the rest: the pulled prefix was a hit in its own index.
            assert out.usage.cached_tokens == 64
            sa, sb = await stats(servers["a"].address), await stats(servers[out.usage.instance_id].address)
            assert sa.kv_peer_sent_tokens == 64 and sa.kv_peer_sent_bytes > 0 and sa.kv_peer_push_failures == 0
            assert sb.kv_received_tokens == 64 and sb.kv_received_bytes == sa.kv_peer_sent_bytes
            text = metrics.exposition().decode()
            assert f'jaxserve:kv_peer_fetch_bytes_total{{dst_instance="{out.usage.instance_id}",instance="a"' in text
            # The holder's pages were referenced only for the transfer; the target holds them in its index only.
            for s in servers.values():
                await eventually(lambda: clean(s.address), what=f"{s.instance_id} clean")
                s.engine.pool.check_invariants()
            assert scheduler.core.peer_fetch == dict(tokens=64, bytes=sa.kv_peer_sent_bytes, failures=0)
            # Bad PushKv calls are refused naming what is missing.
            async with grpc.aio.insecure_channel(servers["a"].address) as ch:
                stub = instance_pb2_grpc.InstanceStub(ch)
                for req, what in ((instance_pb2.PushKvRequest(token_ids=prefix), "target.address"),
                                  (instance_pb2.PushKvRequest(target=instance_pb2.KvTarget(address="x:1")),
                                   "token_ids")):
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await stub.PushKv(req, timeout=10)
                    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and what in e.value.details()
    asyncio.run(asyncio.wait_for(body(), 240))


def test_holder_killed_mid_transfer_means_recompute():
    prefix = [(5 * i + 1) % 251 + 1 for i in range(64)]
    prompt = prefix + [1, 2, 3]
    ref = tiny(False, 3).generate([prompt], SamplingParams(max_tokens=6, ignore_eos=True))[0].token_ids

    async def body():
        async with cluster() as (scheduler, metrics, servers, client):
            await put_prefix_on(servers["a"], scheduler, prefix)
            busy(scheduler, "a")
            loop = asyncio.get_running_loop()
            for name in "bc":  # whichever is routed to: its pull from A finds A gone
                server = servers[name]

                def dying_fetch(pool, offer, timeout=None):  # pull thread of the receiver: A dies meanwhile
                    loop.call_soon_threadsafe(lambda: asyncio.ensure_future(servers["a"].stop(0)))
                    raise TransferError("the holder went away mid-transfer")
                server.kv_transport.fetch = dying_fetch
            out = await client.generate(prompt, max_tokens=6, ignore_eos=True, timeout_s=60)
            assert list(out.token_ids) == list(ref)
            assert out.usage.instance_id in ("b", "c") and out.usage.cached_tokens == 0  # recomputed
            target = servers[out.usage.instance_id]
            st = await stats(target.address)
            assert st.kv_received_tokens == 0 and st.kv_received_bytes == 0
            await eventually(lambda: clean(target.address), what="target clean")
            target.engine.pool.check_invariants()
            servers["a"].engine.pool.check_invariants()
            assert scheduler.core.peer_fetch["failures"] == 1 and scheduler.core.peer_fetch["tokens"] == 0
    asyncio.run(asyncio.wait_for(body(), 240))
