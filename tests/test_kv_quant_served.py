"""An 8-bit KV cache over the instance API (issue 19): a prefill and a decode instance in one process, both
fp8, PD-Caching-3 with per-shard transfers (tp=2 prefill, tp=1 decode) both ways, greedy tokens equal to the
fp8 colocated uncached run; the pool's format and page bytes in InstanceStats; a PrepareKvTransfer from a
sender with another kv_cache_dtype refused with INVALID_ARGUMENT; the scheduler refusing to register a decode
instance whose kv_cache_dtype differs from the prefill instances'."""

import grpc
import jax
import pytest

from jaxserve import LLM
from jaxserve.instance import InstanceConfig, InstanceServer
from jaxserve.proto.v1 import instance_pb2, instance_pb2_grpc
from jaxserve.scheduler.router import DECODE, PREFILL, InstanceRecord, Router
from test_disagg_served import CFG, eventually, pd_turn, run, stats

FP8 = "fp8_e4m3"


def tiny(caching, device, tp=1, kv_cache_dtype=FP8):
    return LLM(model=CFG, page_size=8, num_pages=64, max_num_batched_tokens=64, max_num_seqs=8, seed=0,
               compilation_cache="off", enable_prefix_caching=caching, device_ids=list(range(device, device + tp)),
               tp=tp, kv_cache_dtype=kv_cache_dtype)


def test_fp8_caching3_per_shard_over_grpc():
    if len(jax.devices()) < 3:
        pytest.skip("needs 3 devices")
    page = 8

    async def body():
        p = await InstanceServer(tiny(True, 0, tp=2).engine, InstanceConfig(
            role="prefill", pd_mode="caching3", kv_per_shard=True)).start()
        d = await InstanceServer(tiny(True, 2).engine, InstanceConfig(
            role="decode", pd_mode="caching3", kv_per_shard=True)).start()
        ref = tiny(False, 0)
        try:
            async with grpc.aio.insecure_channel(p.address) as pc, grpc.aio.insecure_channel(d.address) as dc:
                ps, ds = instance_pb2_grpc.InstanceStub(pc), instance_pb2_grpc.InstanceStub(dc)

                def turn(prompt, rid):
                    return pd_turn(ps, ds, d.address, ref, prompt, rid, timeout=60)

                prompt = list(range(1, 20))
                r1, out1 = await turn(prompt, "a")
                computed = (len(prompt) + len(out1) - 1) // page * page

                async def returned():
                    return (await stats(p.address)).kv_received_tokens == computed - len(prompt) // page * page
                await eventually(returned, timeout=60, what="decode-phase KV sent back to the prefill instance")
                r2, _ = await turn(prompt + out1 + [7, 8, 9], "b")
                assert r2.usage.cached_tokens == computed  # the sent-back fp8 pages were reused
                sp, sd = await stats(p.address), await stats(d.address)
                for s in (sp, sd):
                    assert s.kv_cache_dtype == FP8 and s.kv_page_bytes == 2 * 8 * 2 * 2 * (16 + 4)
                    assert s.kv_num_pages == 64
                # A sender storing another format is refused before anything moves.
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await ds.PrepareKvTransfer(instance_pb2.PrepareKvTransferRequest(
                        request_id="x", token_ids=prompt, page_size=page, kv_cache_dtype="int8"), timeout=10)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "kv_cache_dtype differs: the sender stores 'int8', this instance 'fp8_e4m3'" in e.value.details()
                with pytest.raises(grpc.aio.AioRpcError) as e:  # an older / unquantized sender ("" = auto)
                    await ds.PrepareKvTransfer(instance_pb2.PrepareKvTransferRequest(
                        request_id="y", token_ids=prompt, page_size=page), timeout=10)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            await p.stop(0)
            await d.stop(0)
    run(body(), timeout=300)


def test_scheduler_refuses_mismatched_pd_registration():
    router = Router()
    router.add(InstanceRecord("p0", "a:1", PREFILL, 16, kv_cache_dtype=FP8))
    router.add(InstanceRecord("d0", "a:2", DECODE, 16, kv_cache_dtype=FP8))
    with pytest.raises(ValueError, match="kv_cache_dtype 'int8' differs from the 'fp8_e4m3' of prefill instance p0"):
        router.add(InstanceRecord("d1", "a:3", DECODE, 16, kv_cache_dtype="int8"))
    router.add(InstanceRecord("p0", "a:1", PREFILL, 16, kv_cache_dtype=FP8))  # re-registering is fine


def test_scheduler_metrics_report_kv_format():
    from types import SimpleNamespace

    from jaxserve.scheduler.metrics import _LiveCollector
    router = Router()
    router.add(InstanceRecord("p0", "a:1", PREFILL, 16, num_pages=4000, kv_cache_dtype=FP8, kv_page_bytes=16896))
    scheduler = SimpleNamespace(router=router, admission=SimpleNamespace(requests=0, tokens=0))
    families = {f.name: f for f in _LiveCollector(scheduler, "m").collect()}
    (pages,) = families["jaxserve:kv_cache_pages"].samples
    (page_bytes,) = families["jaxserve:kv_cache_page_bytes"].samples
    assert pages.labels == dict(model_name="m", instance="p0", kv_cache_dtype=FP8) and pages.value == 4000
    assert page_bytes.value == 16896
