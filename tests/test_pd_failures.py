"""Disaggregated failure handling (issue 16 items 5, 6, 12), real engines (tiny random model) in process:

- a decode instance that dies is charged for its failure (not the prefill instance, which stays routable) and
  the request is served by the other decode instance, tokens equal to the plain uncached run;
- a decode instance restarted at the same address is reachable at once (the prefill side replaces a peer
  channel stuck in reconnect back-off);
- a client that leaves right after its first token has its request cancelled on the decode side within about a
  second (not at the 30 s transfer timeout)."""

import asyncio
import contextlib

import grpc

from jaxserve import LLM, SamplingParams
from jaxserve.client import AsyncClient, RetryPolicy
from jaxserve.config import ModelConfig
from jaxserve.instance import InstanceConfig, InstanceServer
from jaxserve.proto.v1 import common_pb2, instance_pb2, instance_pb2_grpc
from jaxserve.scheduler import GlobalSchedulerConfig, ModelInfo, Scheduler
from jaxserve.scheduler.router import HEALTHY
from test_disagg_served import clean, eventually, run, stats
from timeouts import scaled

CFG = ModelConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=256,
                  eos_token_id=(257,))
N_OUT = 6


def tiny(device, caching=True):
    return LLM(model=CFG, page_size=8, num_pages=128, max_num_batched_tokens=64, max_num_seqs=8, seed=0,
               compilation_cache="off", enable_prefix_caching=caching, device_ids=[device])


def instance(role, device, scheduler=None, port=0, **config):
    return InstanceServer(tiny(device).engine, InstanceConfig(
        role=role, pd_mode="caching2", port=port, scheduler_address=scheduler, instance_id=f"{role}-{device}",
        shutdown_grace_s=0, **config))


async def die(server: InstanceServer) -> None:
    """The instance's gRPC server goes away without deregistering (a crash, as the scheduler sees it)."""
    await server._server.stop(0)


def reference():
    ref = tiny(3, caching=False)
    return lambda prompt: list(ref.generate([prompt], SamplingParams(max_tokens=N_OUT, ignore_eos=True))[0].token_ids)


def test_a_dying_decode_instance_is_blamed_and_the_request_retries_on_the_other():
    want = reference()

    async def body():
        # Health probes far apart: the failure is found by the request, as in the hostile probe.
        scheduler = Scheduler(GlobalSchedulerConfig(port=0, policy="round_robin", health_interval_s=60,
                                                    no_instance_wait_s=1.0, shutdown_grace_s=0,
                                                    profile_instances=False), ModelInfo.byte_level(512))
        await scheduler.start()
        servers = [await instance(role, dev, scheduler.address).start()
                   for role, dev in (("prefill", 0), ("decode", 1), ("decode", 2))]
        try:
            async with AsyncClient(scheduler.address, retry=RetryPolicy(max_attempts=1)) as client:
                prompt = list(range(1, 30))
                c = await client.generate(prompt, max_tokens=N_OUT, ignore_eos=True)
                assert list(c.token_ids) == want(prompt)
                await die(servers[1])
                for k in range(4):  # round robin: at least two of them are sent to the dead decode instance
                    p = [k + 1] + prompt
                    c = await client.generate(p, max_tokens=N_OUT, ignore_eos=True)
                    assert list(c.token_ids) == want(p), k
                    assert c.usage.instance_id == "decode-2" and c.usage.prefill_instance_id == "prefill-0"
            records = scheduler.router.instances
            assert records["prefill-0"].state == HEALTHY  # not blamed
            assert records.get("decode-1") is None or records["decode-1"].state != HEALTHY
            assert scheduler.core.stats["num_migrations"] >= 1
            assert await clean(servers[0].address) and await clean(servers[2].address)
        finally:
            for s in servers:
                with contextlib.suppress(Exception):
                    await s.stop(0)
            await scheduler.stop(0)
    run(body(), timeout=300)


def test_a_decode_instance_restarted_at_the_same_address_is_reachable_at_once():
    want = reference()

    async def body():
        p = await instance("prefill", 0).start()
        d = await instance("decode", 1).start()
        port = d.port
        try:
            async with grpc.aio.insecure_channel(p.address) as pc:
                ps = instance_pb2_grpc.InstanceStub(pc)

                def prefill(prompt, rid):
                    req = instance_pb2.InstanceGenerateRequest(
                        request_id=rid, prompt_token_ids=prompt, max_tokens=N_OUT,
                        sampling=common_pb2.SamplingParams(ignore_eos=True))
                    return ps.Prefill(instance_pb2.PrefillRequest(
                        request=req, decode_target=instance_pb2.KvTarget(address=f"127.0.0.1:{port}")),
                        timeout=scaled(30)), req

                async def turn(prompt, rid, decode):
                    call, req = prefill(prompt, rid)
                    r = await call
                    req.generated_token_ids.append(r.first_token_id)
                    req.max_tokens = N_OUT - 1
                    tokens = [r.first_token_id]
                    async with grpc.aio.insecure_channel(decode.address) as dc:
                        async for m in instance_pb2_grpc.InstanceStub(dc).Decode(
                                instance_pb2.DecodeRequest(request=req, kv_handle=r.kv_handle), timeout=scaled(30)):
                            tokens += m.token_ids
                    assert tokens == want(prompt)

                prompt = list(range(1, 30))
                await turn(prompt, "a", d)
                await d.stop(0)
                # While it is down, transfers fail and the prefill side's channel backs off further each time.
                for k in range(6):
                    call, _ = prefill(prompt, f"down-{k}")
                    try:
                        await call
                        raise AssertionError("a transfer to a stopped instance succeeded")
                    except grpc.aio.AioRpcError as e:
                        assert e.code() == grpc.StatusCode.UNAVAILABLE, e
                    await asyncio.sleep(0.5)
                d = await instance("decode", 1, port=port).start()
                assert d.port == port
                await turn([9] + prompt, "b", d)  # at once: no wait for a back-off to expire
            assert await clean(p.address) and await clean(d.address)
        finally:
            await p.stop(0)
            await d.stop(0)
    run(body(), timeout=300)


class SlowToAnswer(InstanceServer):
    """A prefill instance whose answer takes a while after its KV went to the decode side (a slow link): the
    window in which a client that leaves strands a request the decode instance already runs."""

    async def Prefill(self, request, context):
        response = await super().Prefill(request, context)
        await asyncio.sleep(scaled(5))
        return response


def test_a_client_leaving_is_cancelled_on_both_sides_within_a_second():
    async def body():
        scheduler = Scheduler(GlobalSchedulerConfig(port=0, health_interval_s=1.0, shutdown_grace_s=0,
                                                    profile_instances=False), ModelInfo.byte_level(512))
        await scheduler.start()
        config = dict(pd_mode="caching2", scheduler_address=scheduler.address, shutdown_grace_s=0,
                      kv_transfer_timeout_s=30)
        servers = [await SlowToAnswer(tiny(0).engine, InstanceConfig(role="prefill", instance_id="prefill-0",
                                                                     **config)).start(),
                   await InstanceServer(tiny(1).engine, InstanceConfig(role="decode", instance_id="decode-1",
                                                                       **config)).start()]
        try:
            async with AsyncClient(scheduler.address, retry=RetryPolicy(max_attempts=1)) as client:
                await client.generate(list(range(1, 30)), max_tokens=N_OUT, ignore_eos=True)  # compile first

                async def leaving():
                    async for _ in client.stream(list(range(2, 31)), max_tokens=400, ignore_eos=True):
                        pass
                task = asyncio.get_running_loop().create_task(leaving())

                async def decoding():
                    return (await stats(servers[1].address)).load.num_running_requests > 0
                await eventually(decoding, timeout=30, what="the decode side running the request")
                task.cancel()  # the client leaves while the prefill side's answer is on its way
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            for s in servers:
                await eventually(lambda: clean(s.address), timeout=1.5, what=f"{s.instance_id} cancelled")
            decode = await stats(servers[1].address)
            assert decode.generated_tokens < N_OUT + 400, decode  # stopped, not run to its end
            print(f"both sides clean {loop.time() - t0:.2f} s after the client left")
        finally:
            for s in servers:
                await s.stop(0)
            await scheduler.stop(0)
    run(body(), timeout=300)
