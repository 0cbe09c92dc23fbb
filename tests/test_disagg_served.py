"""The disaggregated path served over gRPC: a scheduler plus a prefill and a decode instance, the KV moving by
`jax.experimental.transfer` with its control carried by PrepareKvTransfer / CommitKvTransfer.

- processes (jaxserve.launch.instance, demo model, caching2): greedy streams equal offline `LLM.generate` (colocated,
  uncached); a session's second turn sends only the KV the decode side lacks (stats); a reservation never
  committed is freed at its deadline; no leaked pages on either side; the decode process dying before commit
  ends the request with a clear UNAVAILABLE in bounded time and leaves the prefill side clean.
- in process (tiny random model): basic mode sends the whole context every turn and caches nothing; role
  checks."""

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.client import AsyncClient, ClientError, RetryPolicy
from jaxserve.config import ModelConfig
from jaxserve.instance import InstanceConfig, InstanceServer
from jaxserve.proto.v1 import common_pb2, instance_pb2, instance_pb2_grpc
from jaxserve.scheduler import GlobalSchedulerConfig, ModelInfo, Scheduler
from proc_utils import stop_processes
from timeouts import scaled  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PAGE = 16
FAST = dict(health_interval_s=0.2, health_timeout_s=0.5, unhealthy_after=2, no_instance_wait_s=2.0,
            shutdown_grace_s=0.0, profile_instances=False)
ENGINE_FLAGS = dict(model="demo", page_size=PAGE, num_pages=64, max_num_batched_tokens=64, max_num_seqs=8)


def run(coro, timeout):
    return asyncio.run(asyncio.wait_for(coro, scaled(timeout)))


async def eventually(predicate, timeout=10.0, what="condition"):
    end = time.monotonic() + scaled(timeout)
    while not await predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def stats(address):
    async with grpc.aio.insecure_channel(address) as channel:
        return await instance_pb2_grpc.InstanceStub(channel).GetStats(instance_pb2.InstanceStatsRequest(), timeout=5)


async def clean(address) -> bool:
    """Every page free or held by the index only; nothing running, nothing pending."""
    s = await stats(address)
    return (s.load.num_free_pages == s.load.num_total_pages and s.load.num_running_requests == 0
            and s.load.num_queued_requests == 0 and s.kv_pending == 0 and s.kv_held_pages == 0)


async def pd_turn(prefill, decode, decode_address, ref, prompt, rid, n=6, timeout=30):
    """One request through a prefill and a decode instance over the instance API (Prefill with the decode
    instance as target, then Decode on the handle); its tokens must equal `ref`'s uncached colocated run.
    Returns the PrefillResponse and the tokens."""
    req = instance_pb2.InstanceGenerateRequest(
        request_id=rid, prompt_token_ids=prompt, max_tokens=n, sampling=common_pb2.SamplingParams(ignore_eos=True))
    r = await prefill.Prefill(instance_pb2.PrefillRequest(
        request=req, decode_target=instance_pb2.KvTarget(address=decode_address)), timeout=timeout)
    req.generated_token_ids.append(r.first_token_id)
    req.max_tokens = n - 1
    tokens = [r.first_token_id]
    async for m in decode.Decode(instance_pb2.DecodeRequest(request=req, kv_handle=r.kv_handle), timeout=timeout):
        tokens += m.token_ids
    want = ref.generate([prompt], SamplingParams(max_tokens=n, ignore_eos=True))[0].token_ids
    assert tokens == list(want)
    return r, tokens


def spawn(role, scheduler, env, die_before_commit=None, **extra):
    """jaxserve.launch.instance as a process; die_before_commit=PATH: tests/kv_fault_instance.py instead, which exits
    when a CommitKvTransfer arrives once PATH exists."""
    flags = dict(ENGINE_FLAGS, role=role, scheduler=scheduler, instance_id=f"{role}-0", pd_mode="caching2",
                 shutdown_grace_s=0, kv_transfer_timeout_s=3, **extra)
    cmd = [sys.executable, "-m", "jaxserve.launch.instance"] if die_before_commit is None else \
        [sys.executable, str(ROOT / "tests" / "kv_fault_instance.py"), str(die_before_commit)]
    return subprocess.Popen(cmd + [f"--{k}={v}" for k, v in flags.items()],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_prefill_and_decode_processes_caching2(tmp_path):
    fault_file = tmp_path / "die-before-commit"

    async def body():
        scheduler = Scheduler(GlobalSchedulerConfig(port=0, **FAST), ModelInfo.byte_level(1024))
        await scheduler.start()
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
        t_start = time.monotonic()
        procs = {"prefill": spawn("prefill", scheduler.address, env),
                 "decode": spawn("decode", scheduler.address, env, die_before_commit=fault_file)}
        try:
            # The offline reference (colocated, no prefix caching) while the instances start.
            llm = LLM("demo", page_size=PAGE, num_pages=64, max_num_batched_tokens=64, max_num_seqs=8,
                      enable_prefix_caching=False)
            greedy = SamplingParams(max_tokens=12, ignore_eos=True)
            turn1 = list(b"The quick brown fox jumps over the lazy dog. ")  # 45 tokens: 2 pages + 13
            want1 = list(llm.generate([turn1], greedy)[0].token_ids)
            turn2 = turn1 + want1 + list(b" And then?")
            want2 = list(llm.generate([turn2], greedy)[0].token_ids)

            async def up():
                for name, p in procs.items():
                    assert p.poll() is None, f"{name} exited: {p.stderr.read().decode()[-3000:]}"
                return len(scheduler.router.instances) == 2
            t_ref = time.monotonic() - t_start
            await eventually(up, timeout=60, what="prefill and decode instances registered")
            print(f"reference {t_ref:.1f}s, instances up {time.monotonic() - t_start:.1f}s")
            prefill, decode = (scheduler.router.instances[f"{r}-0"].address for r in ("prefill", "decode"))

            async with AsyncClient(scheduler.address, retry=RetryPolicy(max_attempts=1)) as client:
                got1 = await client.generate(turn1, max_tokens=12, ignore_eos=True, session_id="s", timeout_s=60)
                assert list(got1.token_ids) == want1
                assert got1.usage.prefill_instance_id == "prefill-0" and got1.usage.instance_id == "decode-0"
                s1 = await stats(prefill)
                assert s1.kv_sent_tokens == len(turn1) and s1.kv_transfers == 1  # decode held nothing yet

                got2 = await client.generate(turn2, max_tokens=12, ignore_eos=True, session_id="s", timeout_s=60)
                assert list(got2.token_ids) == want2
                # caching2: the decode side indexed turn 1's prompt and its own decode KV (45 + 11 computed
                # tokens = 3 whole pages); only the rest of turn 2's context moves.
                s2 = await stats(prefill)
                decode_held = (len(turn1) + len(want1) - 1) // PAGE * PAGE
                sent2 = s2.kv_sent_tokens - s1.kv_sent_tokens
                assert sent2 == len(turn2) - decode_held, (sent2, len(turn2), decode_held)
                assert got2.usage.cached_tokens == len(turn1) // PAGE * PAGE  # the prefill side's own cache
                d2 = await stats(decode)
                assert d2.kv_received_tokens == s2.kv_sent_tokens and d2.kv_received_bytes == s2.kv_sent_bytes
                print(f"KV moved: turn 1 {len(turn1)} tokens / {s1.kv_sent_bytes} B, turn 2 {sent2} of "
                      f"{len(turn2)} tokens / {s2.kv_sent_bytes - s1.kv_sent_bytes} B")

                # A reservation the prefill side never commits is freed at its deadline.
                async with grpc.aio.insecure_channel(decode) as channel:
                    stub = instance_pb2_grpc.InstanceStub(channel)
                    prep = await stub.PrepareKvTransfer(instance_pb2.PrepareKvTransferRequest(
                        request_id="orphan", token_ids=list(range(40)), page_size=PAGE))
                    assert prep.num_pages_reserved == 3 and prep.cached_tokens == 0
                    assert (await stats(decode)).kv_held_pages == 3
                    await eventually(lambda: clean(decode), timeout=15, what="orphan reservation freed")
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await stub.CommitKvTransfer(instance_pb2.CommitKvTransferRequest(
                            transfer_id=prep.transfer_id, request_id="orphan"))
                    assert e.value.code() == grpc.StatusCode.NOT_FOUND
                await eventually(lambda: clean(prefill), what="prefill side clean")
                await eventually(lambda: clean(decode), what="decode side clean")

                # The decode process dies between prepare and commit: a clear error, in bounded time.
                fault_file.write_text("armed")
                t0 = time.monotonic()
                with pytest.raises(ClientError) as e:
                    await client.generate(list(b"Another prompt that will never be decoded."), max_tokens=8,
                                          ignore_eos=True, timeout_s=60)
                elapsed = time.monotonic() - t0
                assert e.value.code == grpc.StatusCode.UNAVAILABLE, e.value
                assert "KV transfer to decode instance decode-0 failed" in str(e.value), e.value
                assert elapsed < 20, elapsed
                assert procs["decode"].wait(10) == 17
                await eventually(lambda: clean(prefill), what="prefill side clean after the failure")
                assert (await stats(prefill)).kv_transfer_failures == 1
                print(f"decode killed before commit: failed in {elapsed:.1f}s: {e.value}")
        finally:
            stop_processes(procs.values())
            await scheduler.stop(0)
    run(body(), timeout=150)


# ------------------------------------------------------------------------------------------ in process
CFG = ModelConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=256,
                  eos_token_id=(257,))


def tiny(caching, device, tp=1):
    devices = list(range(device, device + tp))
    return LLM(model=CFG, page_size=8, num_pages=64, max_num_batched_tokens=64, max_num_seqs=8, seed=0,
               compilation_cache="off", enable_prefix_caching=caching, device_ids=devices, tp=tp)


def test_basic_mode_in_process_sends_everything_and_checks_roles():
    """Two instance servers in one process (the transfer backend allows it): PD-Basic caches nothing and
    sends the whole context each turn; tokens equal the colocated uncached run; roles are enforced."""
    async def body():
        p = await InstanceServer(tiny(False, 0).engine, InstanceConfig(role="prefill", pd_mode="basic")).start()
        d = await InstanceServer(tiny(False, 1).engine, InstanceConfig(role="decode", pd_mode="basic")).start()
        ref = tiny(False, 0)  # shares the prefill engine's device and so its compiled steps
        try:
            async with grpc.aio.insecure_channel(p.address) as pc, grpc.aio.insecure_channel(d.address) as dc:
                ps, ds = instance_pb2_grpc.InstanceStub(pc), instance_pb2_grpc.InstanceStub(dc)

                async def turn(prompt, rid):
                    r, tokens = await pd_turn(ps, ds, d.address, ref, prompt, rid)
                    assert r.transferred_tokens == len(prompt) and r.transferred_bytes > 0
                    return tokens

                prompt = list(range(1, 21))
                out = await turn(prompt, "a")
                await turn(prompt + out + [7, 8, 9], "b")  # same shape buckets as turn 1: no new compilations
                sp, sd = await stats(p.address), await stats(d.address)
                assert sp.kv_sent_tokens == sd.kv_received_tokens == 20 + 29 and sd.kv_transfers == 2
                assert sp.cached_pages == 0 and sd.cached_pages == 0  # basic: nobody caches
                assert await clean(p.address) and await clean(d.address)
                # Roles: a prefill instance does not decode, a decode instance does not prefill.
                for call in (ps.Decode(instance_pb2.DecodeRequest()).read(),
                             ds.Prefill(instance_pb2.PrefillRequest()),
                             ps.PrepareKvTransfer(instance_pb2.PrepareKvTransferRequest())):
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await call
                    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
                with pytest.raises(grpc.aio.AioRpcError) as e:  # a Decode whose KV never came
                    await ds.Decode(instance_pb2.DecodeRequest(kv_handle="nope")).read()
                assert e.value.code() == grpc.StatusCode.NOT_FOUND
        finally:
            await p.stop(0)
            await d.stop(0)
    run(body(), timeout=120)


@pytest.mark.parametrize("per_shard", [False, True])
def test_caching3_in_process_sends_decode_kv_back(per_shard, monkeypatch):
    """PD-Caching-3 over the instance API: when a request finishes, the decode instance sends its decode-phase
    KV back to the prefill instance (PrepareKvTransfer / CommitKvTransfer(cache_only) on it), so the next
    turn's prefill reports cached tokens covering the first turn's output; tokens equal the colocated uncached
    run; the second turn sends only what the decode side lacks; no leaked pages on either side.
    per_shard: the transfers a multi-process instance makes (per-device pieces, `CommitKvTransferRequest.
    sources`) between a tp=2 prefill and a tp=1 decode instance: the prefill's two shards land on the decode
    device side by side, the decode's one shard is cut in two on the way back."""
    page = 8
    received = []

    def record(server):  # what each per-shard receive pulled, read from the instance's own transport
        fetch = server.kv_transport.fetch
        server.kv_transport.fetch = lambda pool, offer, timeout=None: (
            received.append(offer.sources) if offer.sources else None) or fetch(pool, offer, timeout)

    async def body():
        p = await InstanceServer(tiny(True, 0, tp=2 if per_shard else 1).engine, InstanceConfig(
            role="prefill", pd_mode="caching3", kv_per_shard=per_shard)).start()
        d = await InstanceServer(tiny(True, 2 if per_shard else 1).engine, InstanceConfig(
            role="decode", pd_mode="caching3", kv_per_shard=per_shard)).start()
        record(p)
        record(d)
        ref = tiny(False, 0)
        try:
            async with grpc.aio.insecure_channel(p.address) as pc, grpc.aio.insecure_channel(d.address) as dc:
                ps, ds = instance_pb2_grpc.InstanceStub(pc), instance_pb2_grpc.InstanceStub(dc)

                def turn(prompt, rid):
                    return pd_turn(ps, ds, d.address, ref, prompt, rid)

                prompt = list(range(1, 20))  # 19 tokens: the prefill side indexes 2 whole pages (16)
                r1, out1 = await turn(prompt, "a")
                assert r1.transferred_tokens == len(prompt) and r1.usage.cached_tokens == 0
                # Turn 1 computed 19 + 5 tokens (the last sampled token has no KV) = 3 whole pages; the prefill
                # side held 2 of them, so one page (8 tokens) comes back, once the request has finished.
                computed = (len(prompt) + len(out1) - 1) // page * page
                assert computed > len(prompt)

                async def returned():
                    return (await stats(p.address)).kv_received_tokens == computed - len(prompt) // page * page
                await eventually(returned, what="decode-phase KV sent back to the prefill instance")
                sd = await stats(d.address)
                assert sd.kv_sent_back_tokens == computed - 16 and sd.kv_sent_back_bytes > 0
                assert sd.kv_send_back_failures == 0

                ctx2 = prompt + out1 + [7, 8, 9]
                r2, _ = await turn(ctx2, "b")
                # The second turn's prefill reuses the first turn's output KV (the prompt and 5 of its 6 output
                # tokens), and only the KV the decode side lacks moves to it.
                assert r2.usage.cached_tokens == computed, (r2.usage.cached_tokens, computed)
                assert r2.transferred_tokens == len(ctx2) - computed
                await eventually(lambda: clean(p.address), what="prefill side clean")
                await eventually(lambda: clean(d.address), what="decode side clean")
                sp = await stats(p.address)
                assert sp.cached_pages >= len(ctx2) // page and sp.kv_transfer_failures == 0
                # Per shard: P -> D (two pieces for D's one device), D -> P (a piece per P device), P -> D (turn 2;
                # its send-back may still be on its way).
                assert [[x.pieces for x in srcs] for srcs in received[:3]] == (
                    [[((0, 0, 2), (0, 2, 4))], [((0, 0, 2), (1, 2, 4))], [((0, 0, 2), (0, 2, 4))]]
                    if per_shard else [])
        finally:
            await p.stop(0)
            await d.stop(0)
    run(body(), timeout=120)
