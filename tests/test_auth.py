"""Authentication on every gRPC service (issue 16 item 1): the attacks of the hostile probe, each refused with
UNAUTHENTICATED, and the authenticated paths (client API key, cluster secret on registration, reports,
scheduler -> instance and instance -> instance calls) still serving. Fake instances, except the direct Prefill
on a real prefill instance (tiny random model, in process)."""

import asyncio
import time

import grpc
import pytest

from jaxserve.client import AsyncClient, Client, ClientError, RetryPolicy
from jaxserve.proto.v1 import common_pb2, instance_pb2, instance_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from jaxserve.scheduler import GlobalSchedulerConfig, ModelInfo, Scheduler
from jaxserve.security import ACCESS, CLIENT, CLUSTER, OPEN, LinkSecurity, Secrets, check_bind
from jaxserve.testing.fake_instance import FakeInstance, expected_tokens

MAX_LEN = 256
FAST = dict(health_interval_s=0.1, health_timeout_s=0.5, unhealthy_after=2, no_instance_wait_s=0.5,
            shutdown_grace_s=0.0, profile_instances=False)
API_KEY, SECRET = "sk-client-key", "cluster-secret-123"
SECRETS = Secrets(api_key=API_KEY, cluster_secret=SECRET)
ONE_TRY = RetryPolicy(max_attempts=1)


def run(coro, timeout=60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def eventually(predicate, timeout=10.0, what="condition"):
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def start_scheduler(secrets=SECRETS, **config):
    scheduler = Scheduler(GlobalSchedulerConfig(port=0, **{**FAST, **config}), ModelInfo.byte_level(MAX_LEN),
                          secrets=secrets)
    await scheduler.start()
    return scheduler


def fake(scheduler, role=common_pb2.ROLE_COLOCATED, secret=SECRET, **kw):
    return FakeInstance(role, scheduler_address=scheduler.address, page_size=4,
                        link=LinkSecurity(Secrets(cluster_secret=secret)), **kw)


def test_access_table_names_every_rpc_of_every_service():
    from jaxserve.proto.v1 import instance_pb2 as ipb, scheduler_pb2 as spb
    methods = {f"/{s.full_name}/{m.name}" for pb, name in ((spb, "Scheduler"), (ipb, "Instance"))
               for s in [pb.DESCRIPTOR.services_by_name[name]] for m in s.methods}
    assert methods <= set(ACCESS), methods - set(ACCESS)
    assert {m for m, a in ACCESS.items() if a == OPEN} == {"/grpc.health.v1.Health/Check",
                                                           "/grpc.health.v1.Health/Watch"}
    assert all(a == CLUSTER for m, a in ACCESS.items() if m.startswith("/jaxserve.v1.Instance/"))
    assert ACCESS["/jaxserve.v1.Scheduler/Generate"] == CLIENT
    for rpc in ("DrainInstance", "Register", "ReportEvents", "Deregister"):
        assert ACCESS[f"/jaxserve.v1.Scheduler/{rpc}"] == CLUSTER


def test_secrets_defaults_and_checks():
    assert Secrets(api_key="k").cluster_secret == "k"  # the cluster secret defaults to the API key
    assert "k" not in repr(Secrets(api_key="k", cluster_secret="c"))
    with pytest.raises(ValueError, match="printable ASCII"):
        Secrets(api_key="two words")
    s = Secrets(api_key="k", cluster_secret="c")
    assert s.allows(CLIENT, "k") and s.allows(CLIENT, "c") and not s.allows(CLIENT, "x")
    assert s.allows(CLUSTER, "c") and not s.allows(CLUSTER, "k") and not s.allows(CLUSTER, None)
    assert Secrets().allows(CLUSTER, None)  # nothing configured: the old open behaviour (loopback only)


def test_generate_needs_the_api_key_and_the_client_sends_it():
    async def body():
        scheduler = await start_scheduler()
        inst = await fake(scheduler).start()
        try:
            for key, why in ((None, "no 'authorization: Bearer' metadata"), ("wrong-key", "a wrong key")):
                async with AsyncClient(scheduler.address, api_key=key, retry=ONE_TRY) as client:
                    with pytest.raises(ClientError) as e:
                        await client.generate("hello", max_tokens=3, timeout_s=10)
                    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
                    assert "needs the API key" in e.value.details and why in e.value.details
                    with pytest.raises(ClientError) as e:
                        await client.tokenize("hello", timeout_s=10)
                    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert inst.requests == []  # nothing reached the instance
            assert await AsyncClient(scheduler.address).health(timeout_s=10) == "SERVING"  # probes stay open
            async with AsyncClient(scheduler.address, api_key=API_KEY) as client:
                got = await client.generate("hello", max_tokens=3, timeout_s=10)
                assert list(got.token_ids) == expected_tokens(len(b"hello") + 1, 3)  # BOS + 5 bytes
            async with AsyncClient(scheduler.address, api_key=SECRET) as admin:  # the cluster secret opens all
                assert len((await admin.generate("hello", max_tokens=2, timeout_s=10)).token_ids) == 2
        finally:
            await inst.stop()
            await scheduler.stop(0)
    run(body())


def test_blocking_client_api_key():
    async def start():
        scheduler = await start_scheduler()
        return scheduler, await fake(scheduler).start()

    loop = asyncio.new_event_loop()
    scheduler, inst = loop.run_until_complete(start())
    import threading
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        with Client(scheduler.address, retry=ONE_TRY) as client:
            with pytest.raises(ClientError) as e:
                client.generate("hi", max_tokens=2, timeout_s=10)
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        with Client(scheduler.address, api_key=API_KEY) as client:
            assert len(client.generate("hi", max_tokens=2, timeout_s=10).token_ids) == 2
            assert client.stats(timeout_s=10).num_requests >= 1
    finally:
        asyncio.run_coroutine_threadsafe(inst.stop(), loop).result(30)
        asyncio.run_coroutine_threadsafe(scheduler.stop(0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_unauthenticated_fake_instance_cannot_register_and_sees_no_prompt():
    """The "HIJACKED" attack: an instance without the cluster secret (or with the API key, which clients
    hold) registers to receive other users' prompts. Refused at once; prompts go to the real instance."""
    async def body():
        scheduler = await start_scheduler()
        real = await fake(scheduler, instance_id="real").start()
        try:
            for secret in (None, "guess", API_KEY):
                hijacker = fake(scheduler, secret=secret, instance_id="hijacker")
                with pytest.raises(PermissionError, match="UNAUTHENTICATED"):
                    await hijacker.start()
                await hijacker.kill()
                assert set(scheduler.router.instances) == {"real"}
            # A raw Register and ReportEvents with the API key (a client's credential) are refused too.
            async with grpc.aio.insecure_channel(scheduler.address) as channel:
                stub = scheduler_pb2_grpc.SchedulerStub(channel)
                md = (("authorization", f"Bearer {API_KEY}"),)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.Register(scheduler_pb2.RegisterRequest(
                        instance_id="real", address="127.0.0.1:1", role=common_pb2.ROLE_COLOCATED, page_size=4),
                        metadata=md, timeout=10)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.Deregister(scheduler_pb2.DeregisterRequest(instance_id="real"), metadata=md, timeout=10)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED

                async def reports():
                    yield scheduler_pb2.InstanceReport(instance_id="real", events=[common_pb2.IndexEvent(
                        kind=common_pb2.IndexEvent.CLEAR)])
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.ReportEvents(reports(), timeout=10)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert set(scheduler.router.instances) == {"real"}
            async with AsyncClient(scheduler.address, api_key=API_KEY) as client:
                got = await client.generate("secret prompt", max_tokens=3, timeout_s=10)
            assert got.usage.instance_id == "real" and len(real.requests) == 1
        finally:
            await real.stop()
            await scheduler.stop(0)
    run(body())


def test_drain_instance_needs_the_cluster_secret():
    async def body():
        scheduler = await start_scheduler()
        inst = await fake(scheduler, instance_id="victim").start()
        try:
            for key in (None, API_KEY, "nope"):
                async with AsyncClient(scheduler.address, api_key=key, retry=ONE_TRY) as client:
                    with pytest.raises(ClientError) as e:
                        await client.drain_instance("victim", timeout_s=10)
                    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
                    assert "needs the cluster secret" in e.value.details
            assert "victim" in scheduler.router.instances and not inst.draining
            async with AsyncClient(scheduler.address, api_key=SECRET) as admin:
                assert await admin.drain_instance("victim", timeout_s=10) == 0
            await eventually(lambda: "victim" not in scheduler.router.instances, what="victim drained")
        finally:
            await inst.stop()
            await scheduler.stop(0)
    run(body())


def test_instance_rpcs_need_the_cluster_secret_and_peers_send_it():
    """Every Instance RPC is refused without the cluster secret (a direct Prefill cannot make the instance
    dial an address); a fake PD pair whose peer calls carry the secret serves through the scheduler."""
    async def body():
        scheduler = await start_scheduler()
        p = await fake(scheduler, role=common_pb2.ROLE_PREFILL, instance_id="p").start()
        d = await fake(scheduler, role=common_pb2.ROLE_DECODE, instance_id="d").start()
        try:
            async with AsyncClient(scheduler.address, api_key=API_KEY) as client:
                got = await client.generate("disaggregated", max_tokens=4, timeout_s=10)
            assert got.usage.prefill_instance_id == "p" and got.usage.instance_id == "d"
            assert list(got.token_ids) == expected_tokens(len(b"disaggregated") + 1, 4)
            n_p, n_d = len(p.requests), len(d.requests)
            for key in (None, API_KEY):
                md = (("authorization", f"Bearer {key}"),) if key else None
                async with grpc.aio.insecure_channel(p.address) as pc, grpc.aio.insecure_channel(d.address) as dc:
                    ps, ds = instance_pb2_grpc.InstanceStub(pc), instance_pb2_grpc.InstanceStub(dc)
                    req = instance_pb2.InstanceGenerateRequest(request_id="x", prompt_token_ids=[1, 2, 3],
                                                               max_tokens=2)
                    for call in (ps.Prefill(instance_pb2.PrefillRequest(request=req, decode_target=instance_pb2.
                                                                        KvTarget(address=d.address)), metadata=md),
                                 ds.PrepareKvTransfer(instance_pb2.PrepareKvTransferRequest(
                                     request_id="x", token_ids=[1, 2, 3], page_size=4), metadata=md),
                                 ds.Decode(instance_pb2.DecodeRequest(request=req), metadata=md).read(),
                                 ps.GetStats(instance_pb2.InstanceStatsRequest(), metadata=md),
                                 ds.Drain(instance_pb2.DrainRequest(), metadata=md)):
                        with pytest.raises(grpc.aio.AioRpcError) as e:
                            await call
                        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, e.value
                        assert "needs the cluster secret" in e.value.details()
            assert (len(p.requests), len(d.requests)) == (n_p, n_d) and not d.draining
        finally:
            await p.stop()
            await d.stop()
            await scheduler.stop(0)
    run(body())


def test_no_secret_means_loopback_only_unless_insecure():
    with pytest.raises(ValueError, match="--insecure") as e:
        check_bind("0.0.0.0", None, False, "scheduler")
    assert "0.0.0.0" in str(e.value) and "--api_key" in str(e.value)
    check_bind("0.0.0.0", None, True, "scheduler")
    check_bind("0.0.0.0", "k", False, "scheduler")
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_bind(host, None, False, "scheduler")

    async def body():
        with pytest.raises(ValueError, match="--insecure"):
            await start_scheduler(secrets=Secrets(), host="0.0.0.0")
        for secrets, insecure in ((Secrets(), True), (SECRETS, False)):
            s = await start_scheduler(secrets=secrets, host="0.0.0.0", insecure=insecure)
            await s.stop(0)
        from jaxserve.scheduler.http_front import HttpFront
        s = await start_scheduler(secrets=Secrets())
        try:
            with pytest.raises(ValueError, match="HTTP front.*--insecure"):
                await HttpFront(s, host="0.0.0.0", port=0).start()
            front = HttpFront(s, host="0.0.0.0", port=0, api_key=API_KEY)
            await front.start()
            await front.stop()
        finally:
            await s.stop(0)
    run(body())


def test_real_prefill_instance_refuses_a_direct_prefill_and_a_wildcard_bind():
    """The open proxy: an unauthenticated Prefill naming any decode target. The instance refuses it before
    dialling anything (a listening socket as target sees no connection); with the secret it is served."""
    from jaxserve import LLM
    from jaxserve.config import ModelConfig
    from jaxserve.instance import InstanceConfig, InstanceServer

    cfg = ModelConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=256,
                      eos_token_id=(257,))
    engine = LLM(model=cfg, page_size=8, num_pages=64, max_num_batched_tokens=64, max_num_seqs=8, seed=0,
                 compilation_cache="off", enable_prefix_caching=False).engine

    async def body():
        with pytest.raises(ValueError, match="instance.*--cluster_secret.*--insecure"):
            await InstanceServer(engine, InstanceConfig(role="prefill", host="0.0.0.0")).start()
        server = await InstanceServer(engine, InstanceConfig(role="prefill"), secrets=Secrets(cluster_secret=SECRET)
                                      ).start()
        connections = []
        bait = await asyncio.start_server(lambda r, w: connections.append(w), "127.0.0.1", 0)
        target = f"127.0.0.1:{bait.sockets[0].getsockname()[1]}"
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = instance_pb2_grpc.InstanceStub(channel)
                req = instance_pb2.PrefillRequest(
                    request=instance_pb2.InstanceGenerateRequest(request_id="r", prompt_token_ids=[1, 2, 3],
                                                                 max_tokens=2),
                    decode_target=instance_pb2.KvTarget(address=target))
                for md in (None, (("authorization", "Bearer wrong"),)):
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await stub.Prefill(req, metadata=md, timeout=30)
                    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                await asyncio.sleep(0.2)
                assert connections == []
                # With the secret the instance does dial the target (which is no instance: the call fails).
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.Prefill(req, metadata=(("authorization", f"Bearer {SECRET}"),), timeout=60)
                assert e.value.code() != grpc.StatusCode.UNAUTHENTICATED
                assert connections, "an authenticated Prefill should have contacted its decode target"
        finally:
            bait.close()
            for w in connections:
                w.close()
            await server.stop(0)
    run(body(), timeout=180)


def test_multihost_op_channel_handshake_needs_the_cluster_secret():
    """The leader/follower device-op channel of a multi-process instance: with a secret both sides prove they
    know it (HMAC challenge-response); a stranger, a wrong secret or a follower without one is refused."""
    import socket
    import threading

    from jaxserve.engine.multihost import handshake_follower, handshake_leader

    def pair(leader_secret, follower_secret, index=3):
        a, b = socket.socketpair()
        a.settimeout(10)
        b.settimeout(10)
        out = {}

        def follower():
            try:
                handshake_follower(b, index, follower_secret)
                out["follower"] = "ok"
            except Exception as e:  # noqa: BLE001 - reported to the test
                out["follower"] = e
            finally:
                b.close()  # a refused follower hangs up; so does one that finished (the leader read all)
        t = threading.Thread(target=follower)
        t.start()
        try:
            out["leader"] = handshake_leader(a, leader_secret)
        except Exception as e:  # noqa: BLE001
            out["leader"] = e
        finally:
            a.close()
        t.join(10)
        return out

    assert pair(None, None) == {"leader": 3, "follower": "ok"}  # the unauthenticated protocol is unchanged
    assert pair(SECRET, SECRET) == {"leader": 3, "follower": "ok"}
    wrong = pair(SECRET, "another-secret")
    assert isinstance(wrong["follower"], PermissionError) and "leader does not know" in str(wrong["follower"])
    assert isinstance(wrong["leader"], (PermissionError, ConnectionError))
    unauth = pair(SECRET, None)  # a follower (or anyone) without the secret
    assert isinstance(unauth["leader"], PermissionError) and "cluster secrets" in str(unauth["leader"])
    # A stranger posing as the leader cannot feed a follower ops: it cannot answer the challenge.
    assert isinstance(pair(None, SECRET)["follower"], (PermissionError, ConnectionError))


def test_two_process_instance_with_cluster_secret_serves(tmp_path, monkeypatch):
    """End to end: `jaxserve.launch.instance --num_processes=2` with $JAXSERVE_CLUSTER_SECRET: the op channel's
    authenticated handshake, registration and the scheduler's calls all carry the secret; it serves."""
    from test_multihost import (_launch_two_process_instance, _save_tiny_model, _skip_without_cpu_collectives,
                                _wait_registered)

    from proc_utils import stop_processes

    _skip_without_cpu_collectives()
    folder = _save_tiny_model(tmp_path)
    monkeypatch.setenv("JAXSERVE_CLUSTER_SECRET", SECRET)  # the processes' environment (test_multihost._env)

    async def body():
        sch = await start_scheduler(secrets=Secrets(cluster_secret=SECRET), profile_instances=False)
        procs, read = _launch_two_process_instance(sch.address, folder, tmp_path)
        try:
            await _wait_registered(sch, procs, read, timeout_s=240)
            async with AsyncClient(sch.address, retry=ONE_TRY) as client:  # no API key: client RPCs open
                r = await client.generate("Hello", max_tokens=4, ignore_eos=True, timeout_s=120)
            assert len(r.token_ids) == 4
            procs[0].terminate()
            loop = asyncio.get_running_loop()
            rcs = [await loop.run_in_executor(None, p.wait, 60) for p in procs]
            assert rcs == [0, 0], [read(i)[-3000:] for i in range(2)]
            assert "follower stopped after" in read(1), read(1)[-3000:]
        finally:
            stop_processes(procs, grace_s=0)
            await sch.stop(0)
    run(body(), timeout=600)


def test_instance_refusing_the_schedulers_secret_is_taken_out_and_the_request_moves():
    """Misconfiguration (the instance has a secret the scheduler lacks): not the client's fault, so no
    UNAUTHENTICATED reaches it; the instance leaves routing and the request is served elsewhere."""
    async def body():
        scheduler = await start_scheduler(secrets=Secrets(), policy="round_robin")  # "bad" gets a turn
        bad = await fake(scheduler, secret="only-the-instance-has-it", instance_id="bad").start()
        good = await fake(scheduler, secret=None, instance_id="good").start()
        try:
            async with AsyncClient(scheduler.address, retry=ONE_TRY) as client:
                served = [await client.generate(f"prompt {i}", max_tokens=2, timeout_s=10) for i in range(4)]
            assert {r.usage.instance_id for r in served} == {"good"}
            assert all(len(r.token_ids) == 2 for r in served)
            assert sum(r.usage.num_migrations for r in served) >= 1  # one went to "bad" first
            assert bad.requests == []  # refused before the servicer
        finally:
            await bad.stop()
            await good.stop()
            await scheduler.stop(0)
    run(body())
