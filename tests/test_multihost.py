"""Two processes x 4 CPU devices (jax.distributed + gloo CPU collectives) form one 8-device instance whose
greedy output must equal a single-process 8-device instance's on the same random model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from proc_utils import stop_processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")
TIMEOUT_S = 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the worker sets its own device count
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def _save_tiny_model(tmp_path):
    """An Orbax folder of a random model with 8 KV heads (tp=8 over two processes x 4 devices)."""
    import shutil

    import jax
    from jaxserve.config import ModelConfig
    from jaxserve.model import init_params, save_model
    cfg = ModelConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
                      num_kv_heads=8, head_dim=16, max_position_embeddings=512, bos_token_id=256,
                      eos_token_id=(257,))
    folder = tmp_path / "model"
    save_model(folder, cfg, init_params(cfg, jax.random.PRNGKey(0)))
    shutil.copy(os.path.join(ROOT, "jaxserve", "assets", "demo_model", "byte_tokenizer.json"), folder)
    return folder


def _launch_two_process_instance(scheduler_address, folder, tmp_path):
    """`launch.instance --num_processes=2` (process 0 leads); returns the processes and a log reader."""
    cmd = [sys.executable, "-m", "launch.instance", f"--scheduler={scheduler_address}", f"--model={folder}",
           "--tp=8", "--page_size=8", "--num_pages=64", "--max_num_batched_tokens=64", "--shutdown_grace_s=0",
           "--compilation_cache=off", "--local_cpu_devices=4", f"--coordinator_address=127.0.0.1:{_free_port()}",
           "--num_processes=2"]
    logs = [open(tmp_path / f"proc{i}.log", "w+") for i in range(2)]  # files: a full pipe would block
    procs = [subprocess.Popen(cmd + [f"--process_id={i}"], cwd=ROOT, env=_env(), stdout=logs[i],
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    return procs, lambda i: (tmp_path / f"proc{i}.log").read_text()


async def _wait_registered(sch, procs, read, timeout_s: float = 90) -> None:
    import asyncio
    import time
    t0 = time.monotonic()
    while not sch.router.instances:
        assert all(p.poll() is None for p in procs), [read(i)[-3000:] for i in range(2)]
        assert time.monotonic() - t0 < timeout_s, "instance did not register"
        await asyncio.sleep(0.3)


def _result(out: str) -> dict:
    lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
    assert lines, out[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_two_process_instance_matches_single_process():
    import jax
    if not hasattr(jax.distributed, "initialize") or "jax_cpu_collectives_implementation" not in jax.config.values:
        pytest.skip("this jax has no CPU cross-process collectives (jax_cpu_collectives_implementation)")
    port = _free_port()
    base = [sys.executable, WORKER, f"--coordinator=127.0.0.1:{port}", "--num_processes=2", "--local_devices=4"]
    procs = [subprocess.Popen(base + [f"--process_id={i}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=_env()) for i in range(2)]
    try:
        outs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    finally:
        stop_processes(procs, grace_s=0)
    assert procs[0].returncode == 0, outs[0][-3000:]
    assert procs[1].returncode == 0, outs[1][-3000:]
    assert "FOLLOWER steps=" in outs[1], outs[1][-3000:]
    multi = _result(outs[0])
    assert multi["processes"] == 2 and multi["devices"] == 8

    single = subprocess.run([sys.executable, WORKER, "--num_processes=1", "--local_devices=8"], capture_output=True,
                            text=True, timeout=TIMEOUT_S, env=_env())
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    ref = _result(single.stdout)
    assert ref["processes"] == 1 and ref["devices"] == 8
    assert multi["tokens"] == ref["tokens"]
    assert multi["cached"] == ref["cached"]
    assert multi["cached"][3] > 0  # the shared prefix really hit the cache


def test_multiprocess_rejects_host_tier():
    from types import SimpleNamespace
    from jaxserve.engine import multihost
    eng = SimpleNamespace(config=SimpleNamespace(cache=SimpleNamespace(num_host_pages=4),
                                                 mesh=SimpleNamespace(seq=1)))
    with pytest.raises(ValueError, match="host KV tier"):
        multihost.check_supported(eng)
    eng.config.cache.num_host_pages = 0
    eng.config.mesh.seq = 2
    with pytest.raises(ValueError, match="sequence-parallel"):
        multihost.check_supported(eng)


def test_pack_unpack_roundtrip():
    import numpy as np
    from jaxserve.engine import multihost
    from jaxserve.engine.model_runner import StepInputs
    from jaxserve.model.batch import AttentionBatch
    T, S, P = 16, 8, 4
    r = np.random.default_rng(0)
    i = lambda *s: r.integers(0, 100, s).astype(np.int32)
    inp = StepInputs(False, i(T), i(T), AttentionBatch(i(T), i(T), i(S), i(S, P), i(S + 1), i(1)), i(S),
                     dict(temperature=r.random(S).astype(np.float32), top_k=i(S), top_p=r.random(S).astype(np.float32),
                          seeds=r.integers(0, 2**32, S, dtype=np.uint64).astype(np.uint32), output_index=i(S)))
    header, payload = multihost._pack(inp)
    out = multihost._unpack(header, payload)
    assert out.decode_only is False
    for a, b in zip(list(inp[1:3]) + list(inp.attn) + [inp.logits_indices], list(out[1:3]) + list(out.attn) + [out.logits_indices]):
        np.testing.assert_array_equal(a, b)
    for k, v in inp.sampling.items():
        assert out.sampling[k].dtype == v.dtype
        np.testing.assert_array_equal(out.sampling[k], v)


def test_served_two_process_instance_matches_offline(tmp_path):
    """launch.instance with --num_processes=2 (process 0 serves gRPC, process 1 follows) behind the global
    scheduler: greedy streams equal the offline single-process 8-device engine's on the same checkpoint."""
    import asyncio

    from jaxserve import LLM, SamplingParams
    from jaxserve.client import AsyncClient, RetryPolicy
    from jaxserve.scheduler import GlobalSchedulerConfig, ModelInfo, Scheduler

    folder = _save_tiny_model(tmp_path)
    kw = dict(tp=8, page_size=8, num_pages=64, max_num_batched_tokens=64, compilation_cache="off")
    llm = LLM(str(folder), **kw)
    system = "You are a helpful assistant. " * 2
    questions = ["Hi there", "What is JAX?"]
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    ref = [o.token_ids for o in llm.generate([system + q for q in questions], sp)]

    async def body():
        sch = Scheduler(GlobalSchedulerConfig(port=0), ModelInfo.byte_level(512))
        await sch.start()
        procs, read = _launch_two_process_instance(sch.address, folder, tmp_path)
        try:
            await _wait_registered(sch, procs, read)
            got = []
            async with AsyncClient(sch.address, retry=RetryPolicy(max_attempts=1)) as client:
                for q in questions:
                    r = await client.generate(system + q, max_tokens=8, ignore_eos=True, timeout_s=60)
                    got.append(list(r.token_ids))
            procs[0].terminate()  # the leader stops its followers on the way out
            loop = asyncio.get_running_loop()
            rcs = [await loop.run_in_executor(None, p.wait, 30) for p in procs]
            assert rcs == [0, 0], [read(i)[-3000:] for i in range(2)]
            assert "follower stopped after" in read(1), read(1)[-3000:]
            return got
        finally:
            stop_processes(procs, grace_s=0)
            await sch.stop(0)

    got = asyncio.run(asyncio.wait_for(body(), 150))
    assert got == ref


def test_killed_follower_fails_requests_and_health(tmp_path):
    """SIGKILL the follower of a served two-process instance mid-stream: the leader's next collective fails,
    the request ends with a clear error in bounded time and the leader's health turns NOT_SERVING."""
    import asyncio
    import time

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from jaxserve.client import AsyncClient, ClientError, RetryPolicy
    from jaxserve.scheduler import GlobalSchedulerConfig, ModelInfo, Scheduler

    folder = _save_tiny_model(tmp_path)

    async def body():
        sch = Scheduler(GlobalSchedulerConfig(port=0, health_interval_s=0.2, health_timeout_s=0.5,
                                              unhealthy_after=2, no_instance_wait_s=2.0), ModelInfo.byte_level(512))
        await sch.start()
        procs, read = _launch_two_process_instance(sch.address, folder, tmp_path)
        try:
            await _wait_registered(sch, procs, read)
            address = next(iter(sch.router.instances.values())).address
            n, killed_at, error = 0, None, None
            async with AsyncClient(sch.address, retry=RetryPolicy(max_attempts=1)) as client:
                try:
                    async for delta in client.stream("hello " * 5, max_tokens=200, ignore_eos=True, timeout_s=60):
                        n += len(delta.token_ids)
                        if n >= 3 and killed_at is None:
                            procs[1].kill()
                            killed_at = time.monotonic()
                except ClientError as e:
                    error = e
            assert killed_at is not None and error is not None, "the stream finished despite the dead follower"
            assert time.monotonic() - killed_at < 30
            assert error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL), error
            assert "failed or is unreachable" in str(error) or "Gloo" in str(error), error
            async with grpc.aio.insecure_channel(address) as ch:
                status = (await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                                     timeout=5)).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        finally:
            stop_processes(procs, grace_s=0)
            await sch.stop(0)

    asyncio.run(asyncio.wait_for(body(), 150))
