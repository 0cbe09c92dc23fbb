"""The "grpc" KV transport (issue 16's last gap: KV bytes encrypted in transit): the block moves as raw bytes
over FetchKv on the instance's own mTLS gRPC link (`jaxserve.mempool.transfer.grpc_stream`,
`jaxserve.instance.kv_stream`). Unit: round trip across meshes, offers served once, expiry and the byte
bound. Served: a PD pair over TLS with kv_transport auto (= grpc) gives the offline greedy tokens, PD-Caching-3's
send-back rides it too, no jax transfer server is started, FetchKv needs the cluster secret and an unknown uuid
is NOT_FOUND; peer fetch (issue 18) over grpc gives the same tokens, and an expired offer means the target
recomputes; no page leaks anywhere."""

from __future__ import annotations

import asyncio
import os
import time

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import grpc  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxserve import LLM, SamplingParams  # noqa: E402
from jaxserve.client import AsyncClient, RetryPolicy, tls_credentials  # noqa: E402
from jaxserve.config import CacheConfig, ModelConfig  # noqa: E402
from jaxserve.instance import InstanceConfig, InstanceServer  # noqa: E402
from jaxserve.instance.pd_common import resolve_kv_transport  # noqa: E402
from jaxserve.mempool import MemPool  # noqa: E402
from jaxserve.mempool import transfer as tr  # noqa: E402
from jaxserve.mempool.transfer.grpc_stream import pieces  # noqa: E402
from jaxserve.proto.v1 import instance_pb2, instance_pb2_grpc  # noqa: E402
from jaxserve.scheduler import GlobalSchedulerConfig, ModelInfo, Scheduler  # noqa: E402
from jaxserve.security import Secrets, TlsFiles  # noqa: E402
from test_peer_fetch_served import busy, kv_pool_cluster, put_prefix_on  # noqa: E402
from timeouts import scaled  # noqa: E402

PAGE = 8
CFG = ModelConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, max_position_embeddings=512, bos_token_id=256, eos_token_id=(257,))
API_KEY, SECRET = "sk-kvgrpc", "kvgrpc-cluster-secret"
FAST = dict(health_interval_s=0.2, health_timeout_s=scaled(2.0), unhealthy_after=3, no_instance_wait_s=2.0,
            shutdown_grace_s=0.0, profile_instances=False, report_interval_s=0.1)
MD = (("authorization", f"Bearer {SECRET}"),)


def tiny(caching, device):
    return LLM(model=CFG, page_size=PAGE, num_pages=64, max_num_batched_tokens=64, max_num_seqs=8, seed=0,
               compilation_cache="off", enable_prefix_caching=caching, device_ids=[device])


def greedy(prompt, n=6):
    return list(tiny(False, 3).generate([prompt], SamplingParams(max_tokens=n, ignore_eos=True))[0].token_ids)


async def eventually(predicate, timeout, what):
    end = time.monotonic() + scaled(timeout)
    while not await predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def run(coro, seconds):
    return asyncio.run(asyncio.wait_for(coro, scaled(seconds)))


# ------------------------------------------------------------------------------------------------- unit
def make_pool(device_ids, num_pages=32):
    from jaxserve.model.decoder import kv_cache_partition_spec
    by_id = {d.id: d for d in jax.devices()}
    mesh = jax.sharding.Mesh(np.asarray([by_id[i] for i in device_ids]), ("tp",))
    return MemPool(CFG, CacheConfig(page_size=4, num_pages=num_pages, enable_prefix_caching=True),
                   sharding=jax.sharding.NamedSharding(mesh, kv_cache_partition_spec()), dtype="float32")


def local_fetch(sender: tr.GrpcStreamTransport):
    """The fetch seam without gRPC: take the sender's parked block and join its pieces (as FetchKv streams them)."""
    def fetch(offer, timeout):
        p = sender.parked.take(offer.uuid)
        if p is None:
            raise LookupError(f"NOT_FOUND: no offer {offer.uuid}")
        return b"".join(pieces(p, 1000))  # odd piece size: pieces cross chunk boundaries never, sizes vary
    return fetch


@pytest.mark.parametrize("src_devs,dst_devs", [((0, 1), (4,)), ((0,), (4, 5))])
def test_stream_round_trip_across_meshes_served_once(src_devs, dst_devs):
    if len(jax.devices()) < 6:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
    src, dst = make_pool(src_devs), make_pool(dst_devs)
    sender = tr.GrpcStreamTransport(address="sender:1")
    receiver = tr.GrpcStreamTransport(local_fetch(sender))
    sp, dp = src.alloc(5), dst.alloc(5)
    data = np.random.default_rng(0).standard_normal((src.page_shape[0], 8) + src.page_shape[1:]).astype(np.float32)
    tr.scatter_block(src, sp, jax.device_put(data, src.sharding))
    offer = sender.offer(src, sp)
    assert offer.address == "sender:1" and len(sender.parked) == 1 and sender.parked.nbytes == offer.nbytes
    block = receiver.fetch(dst, offer, timeout=5)
    receiver.write(dst, dp, block)
    np.testing.assert_array_equal(np.asarray(dst.kv_cache)[:, dp], data[:, :5])
    assert dst.kv_cache.sharding == dst.sharding
    assert len(sender.parked) == 0  # served once: freed when fetched
    with pytest.raises(tr.TransferError, match="NOT_FOUND"):
        receiver.fetch(dst, offer, timeout=5)
    short = tr.GrpcStreamTransport(lambda offer, timeout: b"\0" * (offer.nbytes - 1))
    with pytest.raises(tr.TransferError, match="expected"):  # nothing half-received reaches the scatter
        short.fetch(dst, sender.offer(src, sp), timeout=5)
    assert (receiver.counts.device_put, sender.counts.gather) == (1, 2)
    src.free(sp)
    dst.free(dp)
    src.check_invariants()
    dst.check_invariants()


def test_parked_offers_expire_and_are_bounded():
    now = [0.0]
    parked = tr.ParkedOffers(ttl_s=10, max_bytes=1000, clock=lambda: now[0])
    a = parked.park([np.zeros(100, np.float32)])  # 400 bytes
    b = parked.park([np.zeros(100, np.float32)])
    assert a != b and a < 2 ** 62 and parked.nbytes == 800
    with pytest.raises(tr.TransferError, match="cannot park"):
        parked.park([np.zeros(100, np.float32)])
    now[0] = 11.0
    assert parked.take(a) is None and len(parked) == 0 and parked.counters["expired"] == 2
    c = parked.park([np.arange(10, dtype=np.float32)])
    got = parked.take(c)
    assert b"".join(pieces(got, 7)) == np.arange(10, dtype=np.float32).tobytes() and parked.take(c) is None
    from jaxserve.mempool.transfer.grpc_stream import host_buffer
    assert all(host_buffer(n).ctypes.data % 64 == 0 and host_buffer(n).nbytes == n for n in (1, 1000, 4 << 20))


def test_selection():
    assert resolve_kv_transport("auto", tls=True) == "grpc"
    assert resolve_kv_transport("auto", tls=False) == "jax"
    assert resolve_kv_transport("jax", tls=True) == "jax"
    assert resolve_kv_transport("auto", tls=True, num_processes=2) == "jax"  # per shard: jax only, warned
    with pytest.raises(ValueError, match="single-process only"):
        resolve_kv_transport("grpc", tls=True, num_processes=2)
    with pytest.raises(ValueError, match="single-process only"):
        resolve_kv_transport("grpc", tls=False, per_shard=True)
    with pytest.raises(ValueError, match="kv_transport"):
        InstanceConfig(kv_transport="tcp")
    with pytest.raises(ValueError, match="single-process only"):  # refused when the instance is made
        InstanceServer(tiny(False, 0).engine, InstanceConfig(role="prefill", kv_transport="grpc", kv_per_shard=True))
    from jaxserve.cli import instance_flags, serve_parser
    assert "kv_transport" not in instance_flags(serve_parser().parse_args(["demo"]))  # auto: the launcher's default
    assert instance_flags(serve_parser().parse_args(["demo", "--kv-transport", "grpc"]))["kv_transport"] == "grpc"


# ---------------------------------------------------------------------------------------------- served
async def stats(address, tls: TlsFiles | None = None):
    channel = (grpc.aio.secure_channel(address, tls.channel_credentials()) if tls is not None
               else grpc.aio.insecure_channel(address))
    async with channel:
        return await instance_pb2_grpc.InstanceStub(channel).GetStats(instance_pb2.InstanceStatsRequest(),
                                                                      metadata=MD, timeout=scaled(10))


async def clean(address, tls=None) -> bool:
    s = await stats(address, tls)
    return (s.load.num_free_pages == s.load.num_total_pages and s.load.num_running_requests == 0
            and s.kv_pending == 0 and s.kv_held_pages == 0)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    pytest.importorskip("cryptography")
    from jaxserve.testing.certs import CertificateAuthority
    ca = CertificateAuthority(tmp_path_factory.mktemp("pki"))
    return {name: TlsFiles(p.cert_file, p.key_file, ca.ca_file)
            for name, p in ((n, ca.issue(n)) for n in ("scheduler", "prefill", "decode", "user"))}


def test_pd_over_tls_moves_kv_over_grpc_and_matches_offline_greedy(pki):
    """kv_transport auto with TLS files = grpc: PD-Caching-3 (prefill -> decode, and the decode-phase KV sent
    back) moves every byte over FetchKv on the mTLS link; no jax transfer server is ever started."""
    prompt = list(range(3, 40))
    want = greedy(prompt)

    async def body():
        t = pki["scheduler"]
        scheduler = Scheduler(GlobalSchedulerConfig(port=0, tls_cert_file=t.cert_file, tls_key_file=t.key_file,
                                                    tls_ca_file=t.ca_file, **FAST),
                              ModelInfo.byte_level(512), secrets=Secrets(api_key=API_KEY, cluster_secret=SECRET))
        await scheduler.start()
        servers = []
        try:
            for k, role in enumerate(("prefill", "decode")):
                t = pki[role]
                servers.append(await InstanceServer(tiny(True, k).engine, InstanceConfig(
                    role=role, pd_mode="caching3", scheduler_address=scheduler.address, instance_id=role,
                    tls_cert_file=t.cert_file, tls_key_file=t.key_file, tls_ca_file=t.ca_file,
                    kv_transfer_timeout_s=scaled(10), shutdown_grace_s=0),
                    secrets=Secrets(cluster_secret=SECRET)).start())
            p, d = servers
            for s in servers:
                assert isinstance(s.kv_transport, tr.GrpcStreamTransport) and s.transfer_server is None
            with open(t.ca_file, "rb") as f:
                user = tls_credentials(f.read())
            async with AsyncClient(scheduler.address, credentials=user, api_key=API_KEY,
                                   retry=RetryPolicy(max_attempts=1)) as client:
                got = await client.generate(prompt, max_tokens=6, ignore_eos=True, timeout_s=scaled(60))
            assert list(got.token_ids) == want
            assert got.usage.prefill_instance_id == "prefill" and got.usage.instance_id == "decode"
            user_tls = pki["user"]

            async def sent_back():
                s = await stats(d.address, user_tls)
                return s.kv_sent_back_tokens > 0 or s.kv_send_back_failures > 0
            await eventually(sent_back, 20, "the caching3 send-back")
            sp, sd = await stats(p.address, user_tls), await stats(d.address, user_tls)
            assert sd.kv_send_back_failures == 0 and sp.kv_transfer_failures == 0
            assert sp.kv_sent_bytes > 0 and sd.kv_received_bytes == sp.kv_sent_bytes
            assert sp.kv_received_bytes == sd.kv_sent_back_bytes > 0  # the send-back rode FetchKv too
            assert p.kv_transport.parked.counters["fetched"] == 1 and len(p.kv_transport.parked) == 0
            assert d.kv_transport.parked.counters["fetched"] == 1 and len(d.kv_transport.parked) == 0
            assert p.kv_transport.counts.device_put == 1 and d.kv_transport.counts.device_put == 1
            assert p.transfer_server is None and d.transfer_server is None  # no plaintext KV port, ever

            # FetchKv needs the cluster secret (on top of the mTLS certificate); an unknown uuid is NOT_FOUND.
            async with grpc.aio.secure_channel(p.address, user_tls.channel_credentials()) as ch:
                stub = instance_pb2_grpc.InstanceStub(ch)
                request = instance_pb2.FetchKvRequest(pull_uuid=12345)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    async for _ in stub.FetchKv(request, timeout=scaled(10)):
                        pass
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    async for _ in stub.FetchKv(request, metadata=MD, timeout=scaled(10)):
                        pass
                assert e.value.code() == grpc.StatusCode.NOT_FOUND
            for s in servers:
                await eventually(lambda: clean(s.address, user_tls), 20, f"{s.instance_id} clean")
                s.engine.pool.check_invariants()
        finally:
            for s in servers:
                await s.stop(0)
            await scheduler.stop(0)
    run(body(), 300)


def peer_cluster():
    return kv_pool_cluster([(name, dict(role="colocated", peer_fetch=True, kv_transport="grpc",
                                        kv_transfer_timeout_s=scaled(5))) for name in "abc"], make_llm=tiny)


def test_peer_fetch_over_grpc_and_an_expired_offer_means_recompute():
    """Peer fetch (issue 18) with kv_transport grpc: the routed instance pulls the busy holder's prefix over
    FetchKv, same greedy tokens. Then the holder's offers expire before anyone fetches them: the target's
    FetchKv is NOT_FOUND, it recomputes (same tokens, nothing received or indexed half-way), no page leaks."""
    first = [(7 * i + 3) % 251 + 1 for i in range(64)]
    second = [(5 * i + 1) % 251 + 1 for i in range(64)]
    prompts = [first + [9, 8, 7, 6, 5], second + [1, 2, 3]]
    want = [greedy(p) for p in prompts]

    async def body():
        async with peer_cluster() as (scheduler, servers, client):
            a = servers["a"]
            await put_prefix_on(a, scheduler, first)
            busy(scheduler, "a")
            out = await client.generate(prompts[0], max_tokens=6, ignore_eos=True, timeout_s=scaled(60))
            assert list(out.token_ids) == want[0]
            assert out.usage.instance_id in ("b", "c") and out.usage.cached_tokens == 64
            sa, sb = await stats(a.address), await stats(servers[out.usage.instance_id].address)
            assert sa.kv_peer_sent_tokens == 64 and sb.kv_received_bytes == sa.kv_peer_sent_bytes > 0
            assert a.kv_transport.parked.counters["fetched"] == 1 and a.transfer_server is None

            before = {n: (await stats(s.address)).kv_received_bytes for n, s in servers.items()}
            await put_prefix_on(a, scheduler, second)
            busy(scheduler, "a")
            a.kv_transport.parked.ttl_s = -1.0  # every offer is already expired when its receiver asks
            out = await client.generate(prompts[1], max_tokens=6, ignore_eos=True, timeout_s=scaled(60))
            assert list(out.token_ids) == want[1]
            assert out.usage.instance_id in ("b", "c") and out.usage.cached_tokens == 0  # recomputed
            target = servers[out.usage.instance_id]
            st = await stats(target.address)
            assert st.kv_received_bytes == before[target.instance_id]
            assert (await stats(a.address)).kv_peer_push_failures == 1 and len(a.kv_transport.parked) == 0
            assert scheduler.core.peer_fetch["failures"] == 1
            for s in servers.values():
                await eventually(lambda: clean(s.address), 20, f"{s.instance_id} clean")
                s.engine.pool.check_invariants()
    run(body(), 300)


def test_mixed_pair_each_side_pulls_what_the_other_offers():
    """The commit names the backend, so the sides need not agree: prefill sends with grpc, decode with jax
    (PD-Caching-3). The decode side pulls the prompt KV over FetchKv; the prefill side, which runs no transfer
    server of its own, starts one on first use to pull the decode-phase KV sent back with jax."""
    prompt = list(range(5, 44))
    want = greedy(prompt)

    async def body():
        scheduler = Scheduler(GlobalSchedulerConfig(port=0, **FAST), ModelInfo.byte_level(512))
        await scheduler.start()
        servers = []
        try:
            for k, (role, backend) in enumerate((("prefill", "grpc"), ("decode", "jax"))):
                servers.append(await InstanceServer(tiny(True, k).engine, InstanceConfig(
                    role=role, pd_mode="caching3", scheduler_address=scheduler.address, instance_id=role,
                    kv_transport=backend, kv_transfer_timeout_s=scaled(10), shutdown_grace_s=0)).start())
            p, d = servers
            assert p.transfer_server is None and d.transfer_server is not None
            async with AsyncClient(scheduler.address, retry=RetryPolicy(max_attempts=1)) as client:
                got = await client.generate(prompt, max_tokens=6, ignore_eos=True, timeout_s=scaled(60))
            assert list(got.token_ids) == want and got.usage.instance_id == "decode"

            async def sent_back():
                s = await stats(d.address)
                return s.kv_sent_back_tokens > 0 or s.kv_send_back_failures > 0
            await eventually(sent_back, 20, "the caching3 send-back")
            sp, sd = await stats(p.address), await stats(d.address)
            assert sd.kv_send_back_failures == 0 and sd.kv_received_bytes == sp.kv_sent_bytes > 0
            assert sp.kv_received_bytes == sd.kv_sent_back_bytes > 0
            assert p.kv_transport.parked.counters["fetched"] == 1  # prompt KV: grpc
            assert p.transfer_server is not None and p.kv_path.jax.counts.pull == 1  # send-back: jax, pulled by p
            for s in servers:
                await eventually(lambda: clean(s.address), 20, f"{s.instance_id} clean")
                s.engine.pool.check_invariants()
        finally:
            for s in servers:
                await s.stop(0)
            await scheduler.stop(0)
    run(body(), 300)
