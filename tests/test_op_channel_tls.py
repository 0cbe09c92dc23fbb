"""The multi-process op channel (jaxserve/engine/multihost.py) under TLS: with the instance's TLS files the
leader<->follower connection is mTLS (certificates from the cluster's CA) before the HMAC handshake, so the
device ops after it are encrypted; a follower with a certificate from another CA, or one speaking plaintext,
is refused. Over socket pairs, no jax.distributed."""

import socket
import threading

import pytest

pytest.importorskip("cryptography")

from jaxserve.engine.device_ops import SocketReceiver, SocketSender  # noqa: E402
from jaxserve.engine.multihost import handshake_follower, handshake_leader, secure_follower, secure_leader  # noqa: E402
from jaxserve.security import TlsFiles  # noqa: E402
from jaxserve.testing.certs import CertificateAuthority  # noqa: E402
from timeouts import scaled  # noqa: E402

SECRET = "op-channel-secret"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(folder)
    other = CertificateAuthority(folder / "other", name="not the cluster's CA")
    files = {n: ca.issue(n) for n in ("leader", "follower")}
    stranger = other.issue("stranger")
    tls = {n: TlsFiles(p.cert_file, p.key_file, ca.ca_file) for n, p in files.items()}
    tls["stranger"] = TlsFiles(stranger.cert_file, stranger.key_file, other.ca_file)
    return tls


def connect(leader_tls, follower_tls, secret=SECRET, payload=b"", follower_secret=SECRET):
    """Leader and follower ends over a socket pair, each side wrapped as multihost does, then the handshake
    and one payload from the leader to the follower. Returns what each side got (or its exception)."""
    a, b = socket.socketpair()
    for s in (a, b):
        s.settimeout(scaled(10))
    out = {}

    def follower():
        sock = b
        try:
            sock = secure_follower(b, follower_tls and follower_tls.op_channel_contexts()[1])
            handshake_follower(sock, 2, follower_secret)
            out["follower"] = SocketReceiver(sock).recv_exact(len(payload)) if payload else "ok"
        except Exception as e:  # noqa: BLE001 - reported to the test
            out["follower"] = e
        finally:
            sock.close()
    t = threading.Thread(target=follower)
    t.start()
    conn = a
    try:
        conn = secure_leader(a, leader_tls and leader_tls.op_channel_contexts()[0])
        out["leader"] = handshake_leader(conn, secret)
        out["encrypted"] = conn is not a
        if payload:
            SocketSender({2: conn}).send(payload)
    except Exception as e:  # noqa: BLE001
        out["leader"] = e
    t.join(scaled(10))
    conn.close()
    return out


def test_op_channel_is_mtls_with_the_handshake_inside(pki):
    payload = bytes(range(256)) * 1000
    got = connect(pki["leader"], pki["follower"], payload=payload)
    assert got == {"leader": 2, "follower": payload, "encrypted": True}
    assert connect(None, None) == {"leader": 2, "follower": "ok", "encrypted": False}  # no TLS files: as before


def test_op_channel_refuses_strangers_and_plaintext(pki):
    stranger = connect(pki["leader"], pki["stranger"])  # a certificate from another CA
    assert isinstance(stranger["leader"], OSError) and isinstance(stranger["follower"], OSError)
    plaintext = connect(pki["leader"], None)  # a follower without TLS: the leader's TLS handshake fails
    assert isinstance(plaintext["leader"], OSError)
    # A cluster certificate is not enough: the HMAC handshake inside still needs the cluster secret.
    wrong = connect(pki["leader"], pki["follower"], follower_secret="another-secret")
    assert isinstance(wrong["follower"], PermissionError) and isinstance(wrong["leader"], (PermissionError, OSError))
    with pytest.raises(ValueError, match="mTLS"):
        TlsFiles(pki["leader"].cert_file, pki["leader"].key_file).op_channel_contexts()


def test_served_two_process_instance_over_tls_matches_offline(pki, tmp_path):
    """jaxserve.launch.instance --num_processes=2 with TLS files and the cluster secret: the op channel comes up
    as mTLS + HMAC (the leader says so), the instance registers with a TLS scheduler over mTLS, and greedy
    tokens equal the offline single-process engine's. Its KV transport resolves to jax (per shard)."""
    import asyncio

    from test_multihost import (_launch_two_process_instance, _save_tiny_model, _skip_without_cpu_collectives,
                                _wait_registered, stop_processes)

    from jaxserve import LLM, SamplingParams
    from jaxserve.client import AsyncClient, RetryPolicy, tls_credentials
    from jaxserve.scheduler import GlobalSchedulerConfig, ModelInfo, Scheduler
    from jaxserve.security import Secrets

    _skip_without_cpu_collectives()
    folder = _save_tiny_model(tmp_path)
    prompt = "You are a helpful assistant. What is JAX?"
    ref = LLM(str(folder), tp=8, page_size=8, num_pages=64, max_num_batched_tokens=64, compilation_cache="off"
              ).generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0].token_ids
    t = pki["leader"]

    async def body():
        sch = Scheduler(GlobalSchedulerConfig(port=0, tls_cert_file=t.cert_file, tls_key_file=t.key_file,
                                              tls_ca_file=t.ca_file), ModelInfo.byte_level(512),
                        secrets=Secrets(cluster_secret=SECRET))
        await sch.start()
        f = pki["follower"]
        procs, read = _launch_two_process_instance(
            sch.address, folder, tmp_path, f"--tls_cert_file={f.cert_file}", f"--tls_key_file={f.key_file}",
            f"--tls_ca_file={f.ca_file}", f"--cluster_secret={SECRET}")
        try:
            await _wait_registered(sch, procs, read)
            with open(t.ca_file, "rb") as ca:
                credentials = tls_credentials(ca.read())
            async with AsyncClient(sch.address, credentials=credentials, api_key=SECRET,
                                   retry=RetryPolicy(max_attempts=1)) as client:
                got = await client.generate(prompt, max_tokens=8, ignore_eos=True, timeout_s=scaled(60))
            assert "op channel to 1 followers over mTLS + HMAC handshake" in read(0), read(0)[-3000:]
            assert "op channel to the leader over mTLS + HMAC handshake" in read(1), read(1)[-3000:]
            return list(got.token_ids)
        finally:
            stop_processes(procs, grace_s=0)
            await sch.stop(0)

    assert asyncio.run(asyncio.wait_for(body(), scaled(180))) == list(ref)
