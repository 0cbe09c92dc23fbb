"""Two processes x 4 CPU devices (jax.distributed + gloo CPU collectives) form one 8-device instance whose
greedy output must equal a single-process 8-device instance's on the same random model; served, colocated or
as the prefill side of a disaggregated pair (per-shard KV transfers both ways); a killed or stopped
follower takes the instance out of service in bounded time."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
from proc_utils import stop_processes
from timeouts import scaled

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")
TIMEOUT_S = 150  # scaled to the machine's load where used (tests/timeouts.py)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the worker sets its own device count
    env.setdefault("JAX_PLATFORMS", "cpu")
    # This checkout's jaxserve, not whichever one the interpreter has installed (the worker runs as a script).
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
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


def _instance_cmd(scheduler_address, folder, *extra):
    return [sys.executable, "-m", "jaxserve.launch.instance", f"--scheduler={scheduler_address}", f"--model={folder}",
            "--page_size=8", "--num_pages=64", "--max_num_batched_tokens=64", "--shutdown_grace_s=0",
            *extra]


def _launch_two_process_instance(scheduler_address, folder, tmp_path, *extra, name="proc"):
    """`jaxserve.launch.instance --num_processes=2` (process 0 leads); returns the processes and a log reader."""
    cmd = _instance_cmd(scheduler_address, folder, "--tp=8", "--local_cpu_devices=4",
                        f"--coordinator_address=127.0.0.1:{_free_port()}", "--num_processes=2", *extra)
    logs = [open(tmp_path / f"{name}{i}.log", "w+") for i in range(2)]  # files: a full pipe would block
    procs = [subprocess.Popen(cmd + [f"--process_id={i}"], cwd=ROOT, env=_env(), stdout=logs[i],
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    return procs, lambda i: (tmp_path / f"{name}{i}.log").read_text()


async def _wait_registered(sch, procs, read, timeout_s: float = 90, n: int = 1) -> None:
    import asyncio
    import time
    t0 = time.monotonic()
    while len(sch.router.instances) < n:
        assert all(p.poll() is None for p in procs), [read(i)[-3000:] for i in range(len(procs))]
        assert time.monotonic() - t0 < scaled(timeout_s), "instance did not register"
        await asyncio.sleep(0.3)


def _result(out: str) -> dict:
    lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
    assert lines, out[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def _skip_without_cpu_collectives() -> None:
    import jax
    if not hasattr(jax.distributed, "initialize") or "jax_cpu_collectives_implementation" not in jax.config.values:
        pytest.skip("this jax has no CPU cross-process collectives (jax_cpu_collectives_implementation)")


def _two_process_and_single_process(*worker_args) -> tuple[dict, dict, str]:
    """tests/multihost_worker.py as a two-process instance (2 x 4 CPU devices) and, at the same time, as the
    single-process 8-device reference, with the same `worker_args`: (the leader's RESULT, the reference's
    RESULT, the follower's output)."""
    _skip_without_cpu_collectives()
    base = [sys.executable, WORKER, f"--coordinator=127.0.0.1:{_free_port()}", "--num_processes=2",
            "--local_devices=4", *worker_args]
    cmds = [base + [f"--process_id={i}"] for i in range(2)]
    cmds.append([sys.executable, WORKER, "--num_processes=1", "--local_devices=8", *worker_args])
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
             for cmd in cmds]
    try:
        outs = [p.communicate(timeout=scaled(TIMEOUT_S))[0] for p in procs]
    finally:
        stop_processes(procs, grace_s=0)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "FOLLOWER steps=" in outs[1], outs[1][-3000:]
    multi, ref = _result(outs[0]), _result(outs[2])
    assert multi["processes"] == 2 and multi["devices"] == 8
    assert ref["processes"] == 1 and ref["devices"] == 8
    return multi, ref, outs[1]


def test_two_process_instance_matches_single_process():
    multi, ref, _ = _two_process_and_single_process()
    assert multi["tokens"] == ref["tokens"]
    assert multi["cached"] == ref["cached"]
    assert multi["cached"][3] > 0  # the shared prefix really hit the cache
    # ... and the host tier: evicted there (every process keeps its own shards) and swapped back in
    assert multi["swapped"] == ref["swapped"] and min(ref["swapped"]) > 0, (multi["swapped"], ref["swapped"])
    assert multi["cached"][6] >= 40
    assert multi["host_heads"] * 2 == ref["host_heads"]  # the leader's host tier holds its own shards only


def test_two_process_sequence_parallel_prefill_matches_single_process():
    """Mesh seq=2 x tp=4 over the two processes (one `seq` row each: the ring's ppermutes cross processes, the
    pool is replicated over `seq`): prompts of >= 16 uncached tokens take the sequence-parallel prefill, which
    the leader sends to the follower as SEQ_PARALLEL ops. Greedy tokens, cached-token counts and host-tier
    traffic equal a single-process seq=2 x tp=4 instance's."""
    multi, ref, follower = _two_process_and_single_process("--seq=2", "--tp=4", "--sp_threshold=16")
    assert multi["tokens"] == ref["tokens"]
    assert multi["cached"] == ref["cached"]
    # 43 and 2 x 80 uncached tokens, and 20 after the 40 cached ones (the ring reads that prefix from the pool)
    assert multi["sp_prefills"] == ref["sp_prefills"] == 4, (multi["sp_prefills"], ref["sp_prefills"])
    assert "sp_prefills=4" in follower, follower[-3000:]  # the follower ran every one of them too
    assert multi["cached"][3] > 0 and multi["cached"][7] == 40
    assert multi["swapped"] == ref["swapped"] and min(ref["swapped"]) > 0, (multi["swapped"], ref["swapped"])
    assert multi["host_heads"] == ref["host_heads"]  # each process's `seq` row holds every KV head


def test_check_supported_needs_every_process_in_the_mesh():
    from types import SimpleNamespace
    from unittest import mock

    import numpy as np
    from jaxserve.engine import multihost
    dev = lambda p: SimpleNamespace(process_index=p)  # noqa: E731
    config = SimpleNamespace(mesh=SimpleNamespace(seq=2, tp=2))
    with mock.patch("jax.process_count", return_value=2), mock.patch("jax.devices", return_value=[dev(0)] * 4):
        multihost.check_supported(SimpleNamespace(config=config,
                                                  mesh=SimpleNamespace(devices=np.array([[dev(0), dev(0)],
                                                                                         [dev(1), dev(1)]]))))
        with pytest.raises(ValueError, match="no device of process"):
            multihost.check_supported(SimpleNamespace(config=config,
                                                      mesh=SimpleNamespace(devices=np.array([[dev(0), dev(0)]]))))


def test_sequence_parallel_message_roundtrip():
    import numpy as np
    from jaxserve.engine import device_ops
    from jaxserve.engine.sampling import SamplingParams, sampling_arrays
    sampling = sampling_arrays([SamplingParams(temperature=0.7, top_k=5, top_p=0.9)], [2**32 - 3], [4], 1)
    frame = device_ops.encode_frame("sp_forward", np.arange(5, 25), 40, [3, 4, 5, 6, 7, 8, 9, 10], "last", sampling)
    name, (tokens, start, pages, logits_for, got) = device_ops.decode_frame(frame)
    assert name == "sp_forward" and start == 40 and logits_for == "last"
    assert list(tokens) == list(range(5, 25)) and list(pages) == [3, 4, 5, 6, 7, 8, 9, 10]
    for k, v in sampling.items():
        assert got[k].dtype == v.dtype
        np.testing.assert_array_equal(got[k], v)


def test_pack_unpack_roundtrip():
    import numpy as np
    from jaxserve.engine import device_ops
    from jaxserve.engine.model_runner import StepInputs
    from jaxserve.model.batch import AttentionBatch
    T, S, P = 16, 8, 4
    r = np.random.default_rng(0)
    i = lambda *s: r.integers(0, 100, s).astype(np.int32)
    inp = StepInputs(False, i(T), i(T) - 50, i(T), AttentionBatch(i(T), i(T), i(S), i(S, P), i(S + 1), i(1)), i(S),
                     dict(temperature=r.random(S).astype(np.float32), top_k=i(S), top_p=r.random(S).astype(np.float32),
                          seeds=r.integers(0, 2**32, S, dtype=np.uint64).astype(np.uint32), output_index=i(S)))
    name, (out,) = device_ops.decode_frame(device_ops.encode_frame("step", inp))
    assert name == "step" and out.decode_only is False
    for a, b in zip(list(inp[1:4]) + list(inp.attn) + [inp.logits_indices], list(out[1:4]) + list(out.attn) + [out.logits_indices]):
        assert a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    for k, v in inp.sampling.items():
        assert out.sampling[k].dtype == v.dtype
        np.testing.assert_array_equal(out.sampling[k], v)


def test_kv_op_messages_roundtrip():
    from jaxserve.engine import device_ops
    from jaxserve.mempool.transfer import HeadShard, ShardSource
    layout = [HeadShard(0, 0, 4), HeadShard(1, 4, 8)]
    assert device_ops.decode_frame(device_ops.encode_frame("kv_offer", [3, 4, 9], 17, layout)) == \
        ("kv_offer", ([3, 4, 9], 17, layout))
    sources = [ShardSource(0, "127.0.0.1:5", 40, ((0, 0, 2), (1, 2, 4))), ShardSource(1, "h:6", 41, ((2, 4, 8),))]
    args = (sources, [2, 3, 8, 16, 8], "float32", 2, [5, 6, 7], 2.5)
    assert device_ops.decode_frame(device_ops.encode_frame("kv_receive", *args)) == ("kv_receive", args)
    assert device_ops.decode_frame(device_ops.encode_frame("copy_to_host", [1, 2], [7, 8])) == \
        ("copy_to_host", ([1, 2], [7, 8]))
    assert device_ops.decode_frame(device_ops.stop_frame()) == (None, ())


def test_undeclared_op_cannot_be_bound_called_or_sent():
    """A device op must be declared in the table (with its codec) before any channel runs it: a leader
    refuses to send an undeclared one (nothing reaches the followers), a follower refuses to originate any."""
    import pytest
    from jaxserve.engine import device_ops
    leader, follower = device_ops.local_pair()
    local = device_ops.LocalOps()
    for ops in (leader, follower, local):
        with pytest.raises(device_ops.UndeclaredOp):
            ops.bind("swap_everything", lambda: None)
    for ops in (leader, local):
        with pytest.raises(device_ops.UndeclaredOp):
            ops.call("swap_everything")
    with pytest.raises(RuntimeError, match="followers run the leader's ops"):
        follower.call("copy_to_host", [1], [1])
    with pytest.raises(ValueError, match="already declared"):
        device_ops.declare(99, "step", None, None)
    ran = []
    follower.bind("copy_to_host", lambda pages, host: ran.append(("to_host", pages, host)))
    leader.bind("copy_to_host", lambda pages, host: ran.append(("leader", pages, host)))
    leader.call("copy_to_host", [3], [4])
    leader.stop_followers()
    assert follower.serve() == {"copy_to_host": 1}  # only the declared op crossed, then STOP
    assert ran == [("leader", [3], [4]), ("to_host", [3], [4])]


def test_leader_and_follower_run_the_same_device_ops():
    """Two engines in this process, one the other's follower over an in-memory op channel, on a workload
    with plain steps, a host-tier eviction and swap-in, and sequence-parallel prefills (mesh seq=2 x tp=4):
    every op the leader ran goes through the channel (the follower runs the same sequence, recorded where both
    dispatch), and replaying it leaves the follower's device and host KV tiers bit-identical to the leader's."""
    import jax
    import numpy as np
    from jaxserve.config import ModelConfig
    from jaxserve.engine import device_ops
    from jaxserve.engine.llm import LLM
    from jaxserve.engine.sampling import SamplingParams
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")

    def recording(cls):
        class Recording(cls):
            def __init__(self, transport):
                super().__init__(transport)
                self.seen = []

            def _run(self, name, args):
                self.seen.append(name)
                return super()._run(name, args)
        return Recording

    leader_ops, follower_ops = device_ops.local_pair(recording(device_ops.LeaderOps), recording(device_ops.FollowerOps))
    cfg = ModelConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
                      num_kv_heads=8, head_dim=16, max_position_embeddings=512)
    kw = dict(tp=4, sequence_parallel=2, sp_threshold=16, page_size=8, num_pages=24, num_host_pages=32,
              max_num_batched_tokens=64, max_num_seqs=8, seed=0, compilation_cache="off")
    leader = LLM(cfg, ops=leader_ops, **kw)
    follower = LLM(cfg, ops=follower_ops, **kw)
    system = list(range(1, 41))
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    for batch in ([system + [50, 51, 52], list(range(100, 113))], [list(range(120, 200)), list(range(130, 210))],
                  [system + [90, 91]]):
        leader.generate(batch, sp)
    stats = leader.engine.pool.stats()
    assert min(stats["swapped_out_pages"], stats["swapped_in_pages"]) > 0, stats
    leader_ops.stop_followers()
    counts = follower_ops.serve()
    assert follower_ops.seen == leader_ops.seen
    assert {"step", "sp_forward", "copy_to_host", "copy_to_device"} <= set(counts), counts
    assert counts["sp_forward"] == leader.stats()["num_sequence_parallel_prefills"] > 0
    np.testing.assert_array_equal(np.asarray(follower.engine.pool.kv_cache), np.asarray(leader.engine.pool.kv_cache))
    np.testing.assert_array_equal(follower.engine.pool.host_cache, leader.engine.pool.host_cache)


def test_served_two_process_instance_matches_offline(tmp_path):
    """jaxserve.launch.instance with --num_processes=2 (process 0 serves gRPC, process 1 follows) behind the global
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
                    async for delta in client.stream("hello " * 5, max_tokens=200, ignore_eos=True, timeout_s=240):
                        n += len(delta.token_ids)
                        if n >= 3 and killed_at is None:
                            procs[1].kill()
                            killed_at = time.monotonic()
                except ClientError as e:
                    error = e
            assert killed_at is not None and error is not None, "the stream finished despite the dead follower"
            # Bounded by the failure, not by a deadline: the error names the dead peer, and it is not the
            # request's own timeout (a fixed bound in seconds would trip on a loaded box).
            assert error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL), error
            assert "failed or is unreachable" in str(error) or "Gloo" in str(error), error
            async with grpc.aio.insecure_channel(address) as ch:
                status = (await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                                     timeout=5)).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        finally:
            stop_processes(procs, grace_s=0)
            await sch.stop(0)

    asyncio.run(asyncio.wait_for(body(), 400))


def _logged_bytes(log: str, what: str) -> dict[int, int]:
    """Bytes per process from the `KV offer: process P offered N bytes` / `KV receive: process P received N
    bytes` lines that every process of a multi-process instance logs (jaxserve.mempool.transfer / multihost)."""
    out: dict[int, int] = {}
    for p, n in re.findall(rf"KV {what}: process (\d+) {what}\w* (\d+) bytes", log):
        out[int(p)] = out.get(int(p), 0) + int(n)
    return out


def test_disaggregated_pair_with_two_process_prefill(tmp_path):
    """A served PD-Caching-3 pair behind the global scheduler: the prefill instance is two processes x 4 CPU
    devices (tp=8), the decode instance one process with 4 devices (tp=4). KV goes per shard both ways: each
    prefill process offers only its own shards (half the bytes each; the decode side joins two pieces per
    device), and each prefill process pulls only its own devices' part of the decode-phase KV sent back.
    Greedy tokens equal an offline single-process colocated uncached run; a shared prefix and the sent-back
    KV are reused; no pages leak on either side. Then the prefill follower is SIGSTOPped (it hangs without
    disconnecting): the leader's step watchdog fails the next request within bounded time and its health
    turns NOT_SERVING."""
    _disaggregated_pair(tmp_path, "prefill")


def test_disaggregated_pair_with_two_process_decode(tmp_path):
    """As above with the roles swapped: a one-process tp=4 prefill instance and a two-process tp=8 decode
    instance, which receives per shard (every process pulls its own devices' pieces, then all scatter),
    decodes, and sends its decode-phase KV back per shard (every process offers its own shards)."""
    _disaggregated_pair(tmp_path, "decode")


def _disaggregated_pair(tmp_path, two_process_role: str):
    import asyncio
    import time

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from jaxserve import LLM, SamplingParams
    from jaxserve.client import AsyncClient, ClientError, RetryPolicy
    from jaxserve.proto.v1 import instance_pb2, instance_pb2_grpc
    from jaxserve.scheduler import GlobalSchedulerConfig, ModelInfo, Scheduler

    folder = _save_tiny_model(tmp_path)
    page, n_out = 8, 8
    system = list(b"You are a helpful assistant. Answer briefly. ")  # 45 tokens: 5 whole pages shared
    prompts = [system + list(b"Hi there"), system + list(b"What is JAX?")]
    llm = LLM(str(folder), tp=8, page_size=page, num_pages=64, max_num_batched_tokens=64, compilation_cache="off",
              enable_prefix_caching=False)
    greedy = SamplingParams(max_tokens=n_out, temperature=0.0, ignore_eos=True)
    ref = [list(o.token_ids) for o in llm.generate(prompts, greedy)]
    turn2 = prompts[0] + ref[0] + list(b" More?")
    ref.append(list(llm.generate([turn2], greedy)[0].token_ids))
    one_process_role = "decode" if two_process_role == "prefill" else "prefill"
    watchdog = two_process_role == "prefill"

    async def stats(address):
        async with grpc.aio.insecure_channel(address) as ch:
            return await instance_pb2_grpc.InstanceStub(ch).GetStats(instance_pb2.InstanceStatsRequest(), timeout=5)

    async def eventually(predicate, what, timeout=20.0):
        end = time.monotonic() + timeout
        while not await predicate():
            assert time.monotonic() < end, f"timed out waiting for {what}"
            await asyncio.sleep(0.1)

    async def transfers(address, n):
        return (await stats(address)).kv_transfers == n

    async def clean(address):
        s = await stats(address)
        return (s.load.num_free_pages == s.load.num_total_pages and s.load.num_running_requests == 0
                and s.load.num_queued_requests == 0 and s.kv_pending == 0 and s.kv_held_pages == 0)

    async def body():
        sch = Scheduler(GlobalSchedulerConfig(port=0, health_interval_s=0.2, health_timeout_s=0.5, unhealthy_after=2,
                                              no_instance_wait_s=2.0, profile_instances=False),
                        ModelInfo.byte_level(512))
        await sch.start()
        common = ["--pd_mode=caching3", "--kv_transfer_timeout_s=20"]
        procs, read = _launch_two_process_instance(
            sch.address, folder, tmp_path, f"--role={two_process_role}", *common,
            f"--instance_id={two_process_role}-0", "--step_timeout_s=5", "--compile_grace_s=20", name="multi")
        with open(tmp_path / "single.log", "w+") as single_log:
            procs.append(subprocess.Popen(
                _instance_cmd(sch.address, folder, f"--role={one_process_role}", *common,
                              f"--instance_id={one_process_role}-0", "--tp=4", "--local_cpu_devices=4"),
                cwd=ROOT, env=_env(), stdout=single_log, stderr=subprocess.STDOUT, text=True))
        logs = lambda i: read(i) if i < 2 else (tmp_path / "single.log").read_text()  # noqa: E731
        try:
            await _wait_registered(sch, procs, logs, n=2)
            prefill, decode = (sch.router.instances[f"{r}-0"].address for r in ("prefill", "decode"))
            got, usage = [], []
            async with AsyncClient(sch.address, retry=RetryPolicy(max_attempts=1)) as client:
                for prompt in prompts:
                    r = await client.generate(prompt, max_tokens=n_out, ignore_eos=True, timeout_s=60)
                    got.append(list(r.token_ids))
                    usage.append(r.usage)
                # PD-Caching-3: each finished request's decode-phase KV comes back to the prefill instance
                # (its kv_transfers count the sends and the send-backs received).
                await eventually(lambda: transfers(prefill, 2 + 2), "decode-phase KV sent back")
                r = await client.generate(turn2, max_tokens=n_out, ignore_eos=True, session_id="s", timeout_s=60)
                got.append(list(r.token_ids))
                usage.append(r.usage)
            assert got == ref
            assert usage[0].prefill_instance_id == "prefill-0" and usage[0].instance_id == "decode-0"
            assert usage[1].cached_tokens == len(system) // page * page  # the shared prefix, on the prefill side
            computed = (len(prompts[0]) + n_out - 1) // page * page   # turn 1's KV: prompt + 7 decoded tokens
            assert usage[2].cached_tokens == computed                # ... all of it back on the prefill side
            await eventually(lambda: clean(prefill), "prefill side clean")
            await eventually(lambda: clean(decode), "decode side clean")
            await eventually(lambda: transfers(prefill, 3 + 3), "the last send-back")
            sp, sd = await stats(prefill), await stats(decode)
            assert sd.kv_transfers == 3 and sp.kv_transfer_failures == 0 and sd.kv_send_back_failures == 0
            assert sd.kv_received_bytes == sp.kv_sent_bytes and sp.kv_received_bytes == sd.kv_sent_back_bytes

            # Each process of the two-process instance offered only its own shards (half of every block it
            # sent) and pulled only its own devices' half of every block it received.
            sent, received = (sp.kv_sent_bytes, sp.kv_received_bytes) if watchdog else \
                (sd.kv_sent_back_bytes, sd.kv_received_bytes)
            assert sent > 0 and received > 0

            async def halves(what, total):
                return {i: _logged_bytes(read(i), what).get(i, 0) for i in range(2)} == {0: total // 2, 1: total // 2}
            await eventually(lambda: halves("offer", sent), "per-process offers logged")
            await eventually(lambda: halves("receive", received), "per-process receives logged")
            print(f"two-process {two_process_role}: sent {sent} B, received {received} B, each process half of both")
            if not watchdog:
                return

            # A follower that hangs without disconnecting: the watchdog breaks the instance.
            os.kill(procs[1].pid, signal.SIGSTOP)
            t0 = time.monotonic()
            async with AsyncClient(sch.address, retry=RetryPolicy(max_attempts=1)) as client:
                with pytest.raises(ClientError) as e:
                    # (shaped like turn 2's prefill, so no compilation: the watchdog allows the step 5 s)
                    await client.generate(turn2 + list(b" Hm"), max_tokens=n_out, ignore_eos=True, timeout_s=60)
            elapsed = time.monotonic() - t0
            assert e.value.code == grpc.StatusCode.UNAVAILABLE, e.value
            assert "did not finish within 5 s" in str(e.value), e.value
            assert elapsed < scaled(5 + 20 + 10), elapsed  # step timeout + compile grace (if it compiled) + margin
            async with grpc.aio.insecure_channel(prefill) as ch:
                status = (await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                                     timeout=5)).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            print(f"stopped follower: request failed after {elapsed:.1f}s: {e.value}")
        finally:
            if procs[1].poll() is None:
                os.kill(procs[1].pid, signal.SIGCONT)
            stop_processes(procs, grace_s=0)
            await sch.stop(0)

    asyncio.run(asyncio.wait_for(body(), 240))
