"""The "grpc" KV transport (issue 16's last gap: KV bytes encrypted in transit): the block moves as raw bytes
over FetchKv on the instance's own mTLS gRPC link (`jaxserve.mempool.transfer.grpc_stream`,
`jaxserve.instance.kv_stream`). Unit: round trip across meshes, offers served once, expiry and the byte
bound. Served: a PD pair over TLS with kv_transport auto (= grpc) gives the offline greedy tokens, PD-Caching-3's
send-back rides it too, no jax transfer server is started, FetchKv needs the cluster secret and an unknown uuid
is NOT_FOUND; peer fetch (issue 18) over grpc gives the same tokens, and an expired offer means the target
recomputes; no page leaks anywhere."""

from __future__ import annotations

import asyncio
import contextlib
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
from jaxserve.proto.v1 import common_pb2, instance_pb2, instance_pb2_grpc  # noqa: E402
from jaxserve.scheduler import GlobalSchedulerConfig, ModelInfo, Scheduler  # noqa: E402
from jaxserve.scheduler.router import COLOCATED  # noqa: E402
from jaxserve.security import Secrets, TlsFiles  # noqa: E402
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
