"""TLS on every link (issue 16 item 11) with certificates made at test time (`jaxserve.testing.certs`, the
`cryptography` package): HTTPS on the HTTP front, TLS on the scheduler's gRPC, mTLS between the scheduler and
the instances and between a prefill and a decode instance, plus the cluster secret on every internal call.
Greedy tokens equal the offline uncached run; a caller without a certificate signed by the cluster's CA is
refused by an instance. In process (tiny random model) and as processes (`LocalCluster`, demo model)."""

import asyncio
import json
import os
import ssl

# LocalCluster forks instance processes from this one; gRPC's fork handlers can abort such a child (the
# launchers set this too, before grpc loads).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import grpc
import pytest

pytest.importorskip("cryptography")
aiohttp = pytest.importorskip("aiohttp")

from jaxserve import LLM, SamplingParams  # noqa: E402
from jaxserve.client import AsyncClient, ClientError, RetryPolicy, tls_credentials  # noqa: E402
from jaxserve.config import ModelConfig  # noqa: E402
from jaxserve.instance import InstanceConfig, InstanceServer  # noqa: E402
from jaxserve.proto.v1 import instance_pb2, instance_pb2_grpc  # noqa: E402
from jaxserve.scheduler import GlobalSchedulerConfig, ModelInfo, Scheduler  # noqa: E402
from jaxserve.scheduler.http_front import HttpFront  # noqa: E402
from jaxserve.security import Secrets, TlsFiles  # noqa: E402
from jaxserve.testing.certs import CertificateAuthority  # noqa: E402

API_KEY, SECRET = "sk-tls-client", "tls-cluster-secret"
FAST = dict(health_interval_s=0.2, health_timeout_s=1.0, unhealthy_after=3, no_instance_wait_s=2.0,
            shutdown_grace_s=0.0, profile_instances=False)
CFG = ModelConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=256, eos_token_id=(257,))
ONE_TRY = RetryPolicy(max_attempts=1)


def run(coro, timeout):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def tiny(device, caching=False):
    return LLM(model=CFG, page_size=8, num_pages=64, max_num_batched_tokens=64, max_num_seqs=8, seed=0,
               compilation_cache="off", enable_prefix_caching=caching, device_ids=[device])


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(folder)
    files = {name: ca.issue(name) for name in ("scheduler", "instance-0", "instance-1", "user")}
    stranger = CertificateAuthority(folder / "other", name="not the cluster's CA").issue("intruder")
    tls = {name: TlsFiles(p.cert_file, p.key_file, ca.ca_file) for name, p in files.items()}
    return dict(ca=ca, tls=tls, stranger=stranger)


def ca_bytes(pki) -> bytes:
    with open(pki["ca"].ca_file, "rb") as f:
        return f.read()


def instance_config(pki, name, **kw) -> InstanceConfig:
    t = pki["tls"][name]
    return InstanceConfig(tls_cert_file=t.cert_file, tls_key_file=t.key_file, tls_ca_file=t.ca_file, **kw)


async def start_scheduler(pki, **config):
    t = pki["tls"]["scheduler"]
    scheduler = Scheduler(GlobalSchedulerConfig(port=0, tls_cert_file=t.cert_file, tls_key_file=t.key_file,
                                                tls_ca_file=t.ca_file, **{**FAST, **config}),
                          ModelInfo.byte_level(512), secrets=Secrets(api_key=API_KEY, cluster_secret=SECRET))
    await scheduler.start()
    return scheduler


async def refused_without_a_cluster_certificate(pki, address):
    """An instance under mTLS refuses callers without a certificate from the cluster's CA, even with the
    secret; plaintext fails too. The cluster's own certificate gets through to the auth check."""
    md = (("authorization", f"Bearer {SECRET}"),)
    stranger = pki["stranger"]
    with open(stranger.key_file, "rb") as k, open(stranger.cert_file, "rb") as c:
        intruder = tls_credentials(ca_bytes(pki), k.read(), c.read())
    for channel in (grpc.aio.secure_channel(address, tls_credentials(ca_bytes(pki))),
                    grpc.aio.secure_channel(address, intruder), grpc.aio.insecure_channel(address)):
        async with channel:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await instance_pb2_grpc.InstanceStub(channel).GetStats(instance_pb2.InstanceStatsRequest(),
                                                                       metadata=md, timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value
    async with grpc.aio.secure_channel(address, pki["tls"]["user"].channel_credentials()) as channel:
        stub = instance_pb2_grpc.InstanceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as e:  # a cluster certificate without the secret
            await stub.GetStats(instance_pb2.InstanceStatsRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert (await stub.GetStats(instance_pb2.InstanceStatsRequest(), metadata=md, timeout=10)).instance_id


async def https_completion(front, pki, prompt, n):
    context = ssl.create_default_context(cafile=pki["ca"].ca_file)
    async with aiohttp.ClientSession() as session:
        body = dict(model=front.names[0], prompt=prompt, max_tokens=n, temperature=0, ignore_eos=True)
        async with session.post(front.url + "/v1/completions", json=body, ssl=context) as r:
            assert r.status == 401  # HTTPS works, and the API key is still needed
        async with session.post(front.url + "/v1/completions", json=body, ssl=context,
                                headers={"Authorization": f"Bearer {API_KEY}"}) as r:
            assert r.status == 200, await r.text()
            return json.loads(await r.text())


def test_colocated_cluster_over_tls_and_mtls_matches_offline_greedy(pki):
    async def body():
        scheduler = await start_scheduler(pki)
        instances = [await InstanceServer(tiny(k).engine, instance_config(
            pki, f"instance-{k}", scheduler_address=scheduler.address, instance_id=f"colocated-{k}"),
            secrets=Secrets(cluster_secret=SECRET)).start() for k in range(2)]
        front = HttpFront(scheduler, port=0, api_key=API_KEY, tls=TlsFiles.of(
            pki["tls"]["scheduler"].cert_file, pki["tls"]["scheduler"].key_file))
        await front.start()
        try:
            assert front.url.startswith("https://") and len(scheduler.router.instances) == 2
            ref = tiny(0)
            prompts = [list(range(1, 20)), list(range(40, 70))]
            want = [list(o.token_ids) for o in ref.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True))]
            credentials = tls_credentials(ca_bytes(pki))  # a user verifies the scheduler; no client cert
            async with AsyncClient(scheduler.address, credentials=credentials, api_key=API_KEY) as client:
                got = [await client.generate(p, max_tokens=6, ignore_eos=True, timeout_s=60) for p in prompts]
                assert [list(g.token_ids) for g in got] == want
                text = "Hello over TLS"
                grpc_text = await client.generate(text, max_tokens=5, ignore_eos=True, timeout_s=60)
            served = {g.usage.instance_id for g in got} | {grpc_text.usage.instance_id}
            assert served <= {"colocated-0", "colocated-1"}
            http = await https_completion(front, pki, text, 5)
            assert http["choices"][0]["text"] == grpc_text.text and http["usage"]["completion_tokens"] == 5
            async with AsyncClient(scheduler.address, retry=ONE_TRY) as plaintext:  # the scheduler is TLS only
                with pytest.raises(ClientError) as e:
                    await plaintext.generate("x", max_tokens=2, timeout_s=5)
                assert e.value.code == grpc.StatusCode.UNAVAILABLE
            await refused_without_a_cluster_certificate(pki, instances[0].address)
        finally:
            await front.stop()
            for inst in instances:
                await inst.stop(0)
            await scheduler.stop(0)
    run(body(), timeout=300)


def test_pd_pair_over_mtls_matches_offline_greedy(pki):
    """Prefill -> decode control (PrepareKvTransfer / CommitKvTransfer) and, in PD-Caching-3, the decode
    side's send-back to the prefill side, over mTLS with the cluster secret."""
    async def body():
        scheduler = await start_scheduler(pki)
        servers = [await InstanceServer(tiny(k, caching=True).engine, instance_config(
            pki, f"instance-{k}", role=role, pd_mode="caching3", scheduler_address=scheduler.address,
            instance_id=role), secrets=Secrets(cluster_secret=SECRET)).start()
            for k, role in enumerate(("prefill", "decode"))]
        try:
            ref = tiny(0)
            prompt = list(range(3, 30))
            want = list(ref.generate([prompt], SamplingParams(max_tokens=6, ignore_eos=True))[0].token_ids)
            async with AsyncClient(scheduler.address, credentials=tls_credentials(ca_bytes(pki)),
                                   api_key=API_KEY) as client:
                got = await client.generate(prompt, max_tokens=6, ignore_eos=True, timeout_s=120)
            assert list(got.token_ids) == want
            assert got.usage.prefill_instance_id == "prefill" and got.usage.instance_id == "decode"
            async with grpc.aio.secure_channel(servers[1].address, pki["tls"]["user"].channel_credentials()) as ch:
                stub = instance_pb2_grpc.InstanceStub(ch)
                md = (("authorization", f"Bearer {SECRET}"),)
                for _ in range(200):  # the send-back runs after the request finished
                    sd = await stub.GetStats(instance_pb2.InstanceStatsRequest(), metadata=md, timeout=10)
                    if sd.kv_sent_back_tokens or sd.kv_send_back_failures:
                        break
                    await asyncio.sleep(0.05)
            assert sd.kv_sent_back_tokens > 0 and sd.kv_send_back_failures == 0
            await refused_without_a_cluster_certificate(pki, servers[1].address)
        finally:
            for s in servers:
                await s.stop(0)
            await scheduler.stop(0)
    run(body(), timeout=300)


def test_local_cluster_processes_with_tls_flags_and_secret_env(pki):
    """jaxserve.launch.instance processes get --tls_* flags and the cluster secret in their environment
    (LocalCluster); two colocated instances register over mTLS and serve the offline greedy tokens."""
    from jaxserve.launch.local import LocalCluster

    t = pki["tls"]["instance-0"]

    async def body():
        env = dict(XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
        cluster = LocalCluster("demo", 2, pin=False, quiet=True, ready_timeout_s=240, shutdown_timeout_s=20,
                               instance_flags=dict(page_size=16, num_pages=64, max_num_batched_tokens=64,
                                                   max_num_seqs=8),
                               scheduler_config=dict(FAST), env=env,
                               secrets=Secrets(api_key=API_KEY, cluster_secret=SECRET), tls=t)
        async with cluster:
            ref = LLM("demo", page_size=16, num_pages=64, max_num_batched_tokens=64, max_num_seqs=8,
                      enable_prefix_caching=False)
            prompt = list(b"Locked doors, open answers. ")
            want = list(ref.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0].token_ids)
            async with AsyncClient(cluster.address, credentials=tls_credentials(ca_bytes(pki)),
                                   api_key=API_KEY) as client:
                got = await client.generate(prompt, max_tokens=8, ignore_eos=True, timeout_s=120)
            assert list(got.token_ids) == want
            for record in cluster.scheduler.router.instances.values():
                await refused_without_a_cluster_certificate(pki, record.address)
            assert all(SECRET not in " ".join(p.args) for p in cluster.procs)  # not on the command line
        assert os.environ.get("JAXSERVE_CLUSTER_SECRET") != SECRET
    run(body(), timeout=600)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_scheduler_launcher_flags_tls_https_and_keys(pki):
    """`jaxserve.launch.scheduler` with --api_key / --cluster_secret (environment) / --tls_* / --http_port:
    gRPC over TLS needs the key, HTTPS serves with it; without a secret it refuses a wildcard bind."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    refused = subprocess.run([sys.executable, "-m", "jaxserve.launch.scheduler", "--host=0.0.0.0", "--port=0"],
                             cwd=root, capture_output=True, text=True, timeout=120,
                             env={k: v for k, v in os.environ.items() if not k.startswith("JAXSERVE_")})
    assert refused.returncode != 0 and "--insecure" in refused.stderr and "Traceback" not in refused.stderr

    t = pki["tls"]["scheduler"]
    port, http_port = _free_port(), _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "jaxserve.launch.scheduler", f"--port={port}",
                             f"--http_port={http_port}", f"--tls_cert_file={t.cert_file}",
                             f"--tls_key_file={t.key_file}", f"--tls_ca_file={t.ca_file}", "--model=demo"],
                            cwd=root, env=dict(os.environ, JAXSERVE_API_KEY=API_KEY, JAXSERVE_CLUSTER_SECRET=SECRET),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    async def body():
        address = f"127.0.0.1:{port}"
        credentials = tls_credentials(ca_bytes(pki))
        async with AsyncClient(address, credentials=credentials, api_key=API_KEY) as client:
            for _ in range(600):
                assert proc.poll() is None, proc.stderr.read()[-3000:]
                try:
                    assert await client.tokenize("ab", timeout_s=5) == [256, 97, 98]  # BOS + bytes
                    break
                except ClientError as e:
                    if e.code != grpc.StatusCode.UNAVAILABLE:
                        raise
                    await asyncio.sleep(0.1)
            else:
                raise AssertionError("the scheduler did not come up")
            with pytest.raises(ClientError) as e:  # the client's key does not drain
                await client.drain_instance("colocated-0", timeout_s=5)
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        async with AsyncClient(address, credentials=credentials, api_key=SECRET) as admin:
            with pytest.raises(ClientError) as e:  # the cluster secret gets past auth: no such instance
                await admin.drain_instance("colocated-0", timeout_s=5)
            assert e.value.code == grpc.StatusCode.NOT_FOUND
        async with AsyncClient(address, credentials=credentials, retry=ONE_TRY) as anonymous:
            with pytest.raises(ClientError) as e:
                await anonymous.tokenize("ab", timeout_s=5)
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        context = ssl.create_default_context(cafile=pki["ca"].ca_file)
        async with aiohttp.ClientSession() as session:
            url = f"https://127.0.0.1:{http_port}/v1/models"
            async with session.get(url, ssl=context) as r:
                assert r.status == 401
            async with session.get(url, ssl=context, headers={"Authorization": f"Bearer {API_KEY}"}) as r:
                assert r.status == 200 and (await r.json())["data"][0]["id"] == "demo"

    try:
        run(body(), timeout=180)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
