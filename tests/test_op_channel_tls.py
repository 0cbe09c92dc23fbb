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
