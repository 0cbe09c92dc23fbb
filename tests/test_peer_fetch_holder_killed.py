"""Peer fetch served (issue 18), the holder a real instance process killed (SIGKILL) during a peer fetch.

The holder A is `jaxserve.launch.instance --peer_fetch` in its own process (demo model); B and C are instance
servers in this process (demo model, CPU devices 1 and 2), all behind the scheduler with policy kv_pool and peer
fetch. A computes a prefix, the scheduler sees A busy, so a request for it goes to B or C, which A is asked to
push the prefix to. A prepares the transfer on the target and offers its pages; when the target starts its pull
(its transport's `fetch`, the seam this test controls: no hook in the serving code), the test SIGKILLs A and
waits until it is gone, then lets the real pull run against the dead process. Killing A at an exact point
*inside* the byte transfer is not deterministic on a loaded box, hence "after the offer, before the pull".

Checked: the pull fails and the target recomputes (0 cached tokens), greedy tokens equal the uncached run's,
nothing was received or indexed on the target and its pool ends with every page free and nothing reserved, the
scheduler counts the failed fetch and drops A from its instances."""

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from jaxserve import LLM, SamplingParams
from jaxserve.client import AsyncClient, RetryPolicy
from jaxserve.instance import InstanceConfig, InstanceServer
from jaxserve.proto.v1 import common_pb2, instance_pb2, instance_pb2_grpc
from jaxserve.scheduler import GlobalSchedulerConfig, Scheduler, load_model_info
from jaxserve.scheduler.router import COLOCATED
from test_peer_fetch_served import clean, stats
from timeouts import scaled

ROOT = Path(__file__).resolve().parents[1]
PAGE = 16
ENGINE = dict(page_size=PAGE, num_pages=64, max_num_batched_tokens=64, max_num_seqs=8)
FAST = dict(health_interval_s=0.2, health_timeout_s=scaled(2.0), unhealthy_after=3, no_instance_wait_s=2.0,
            shutdown_grace_s=0.0, profile_instances=False, report_interval_s=0.1)


async def eventually(predicate, timeout, what):
    end = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out ({timeout:.0f} s) waiting for {what}")
        await asyncio.sleep(0.05)


def holder_process(scheduler_address: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jaxserve.launch.instance", "--model=demo", "--role=colocated", "--instance_id=a",
           f"--scheduler={scheduler_address}", "--port=0", "--peer_fetch", "--kv_transfer_timeout_s=5",
           "--shutdown_grace_s=0"] + [f"--{k}={v}" for k, v in ENGINE.items()]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def test_holder_process_killed_after_offer_means_recompute():
    prefix = [(11 * i + 5) % 250 + 1 for i in range(96)]   # 6 pages
    prompt = prefix + [4, 3, 2, 1]
    ref = LLM("demo", enable_prefix_caching=False, device_ids=[3], **ENGINE).generate(
        [prompt], SamplingParams(max_tokens=6, ignore_eos=True))[0].token_ids
    killed = []

    async def body():
        scheduler = Scheduler(GlobalSchedulerConfig(port=0, policy="kv_pool", peer_fetch=True,
                                                    peer_fetch_timeout_s=scaled(30), kv_bytes_per_token=2048,
                                                    peer_link_bytes_s=1e9, **FAST), load_model_info("demo"))
        await scheduler.start()
        holder = holder_process(scheduler.address)
        servers = {}
        client = AsyncClient(scheduler.address, retry=RetryPolicy(max_attempts=1))
        try:
            for k, name in ((1, "b"), (2, "c")):
                llm = LLM("demo", device_ids=[k], **ENGINE)
                servers[name] = await InstanceServer(llm.engine, InstanceConfig(
                    role="colocated", scheduler_address=scheduler.address, instance_id=name, peer_fetch=True,
                    kv_transfer_timeout_s=5, shutdown_grace_s=0)).start()

            async def registered():
                assert holder.poll() is None, f"holder exited with {holder.returncode} before registering"
                return "a" in scheduler.router.instances
            await eventually(registered, scaled(300), "the holder process to register")
            a_address = scheduler.router.instances["a"].address
            async with grpc.aio.insecure_channel(a_address) as ch:  # the prefix on A
                req = instance_pb2.InstanceGenerateRequest(request_id="warm", prompt_token_ids=prefix, max_tokens=2,
                                                           sampling=common_pb2.SamplingParams(ignore_eos=True))
                async for _ in instance_pb2_grpc.InstanceStub(ch).Generate(req, timeout=scaled(120)):
                    pass

            async def indexed():
                tree = scheduler.router.trees.get(COLOCATED)
                return tree is not None and tree.match(tuple(prefix)).get("a", 0) >= len(prefix)
            await eventually(indexed, scaled(30), "A's prefix in the scheduler's prompt tree")
            scheduler.router.instances["a"].pending_prefill_s = 1e3  # A busy, as the scheduler sees it

            for server in servers.values():  # whichever is routed to: A dies when its pull starts
                real_fetch = server.kv_transport.fetch

                def kill_then_fetch(pool, offer, *args, _real=real_fetch, **kwargs):
                    if holder.poll() is None:
                        os.killpg(holder.pid, signal.SIGKILL)
                        holder.wait()
                        killed.append(time.monotonic())
                    return _real(pool, offer, *args, **kwargs)
                server.kv_transport.fetch = kill_then_fetch

            out = await client.generate(prompt, max_tokens=6, ignore_eos=True, timeout_s=scaled(120))
            assert killed, "no pull started: the request was not routed for a peer fetch"
            assert holder.returncode == -signal.SIGKILL
            assert list(out.token_ids) == list(ref)
            assert out.usage.instance_id in ("b", "c") and out.usage.cached_tokens == 0  # recomputed
            target = servers[out.usage.instance_id]
            st = await stats(target.address)
            assert st.kv_received_tokens == 0 and st.kv_received_bytes == 0
            assert scheduler.core.peer_fetch["failures"] == 1 and scheduler.core.peer_fetch["tokens"] == 0
            for s in servers.values():  # nothing leaked on the survivors (reservations end by their deadline)
                await eventually(lambda: clean(s.address), scaled(60), f"{s.instance_id} clean")
                s.engine.pool.check_invariants()

            async def dropped():
                return "a" not in scheduler.router.instances
            await eventually(dropped, scaled(30), "the scheduler to drop the killed holder")
            # The survivors still serve, and still share cached prefixes between themselves.
            again = await client.generate(prompt, max_tokens=6, ignore_eos=True, timeout_s=scaled(120))
            assert list(again.token_ids) == list(ref)
        finally:
            await client.close()
            if holder.poll() is None:
                os.killpg(holder.pid, signal.SIGKILL)
                holder.wait()
            for s in servers.values():
                with contextlib.suppress(Exception):
                    await s.stop(0)
            await scheduler.stop(0)
    asyncio.run(asyncio.wait_for(body(), scaled(600)))
