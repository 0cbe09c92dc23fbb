"""Multi-controller instances: one engine whose mesh spans the devices of several processes (jax.distributed).

Every process of the instance builds the same `Engine` over the global mesh (`jax.devices()` lists the devices
of all processes), so the params and the MemPool's device tier are global `jax.Array`s sharded across hosts.
Process 0 is the leader: it alone runs the scheduler, the prompt index and the request bookkeeping. Every piece
of device work goes through the instance's device-op channel (jaxserve/engine/device_ops.py: step,
sequence-parallel forward, host-tier copies, KV offer and receive): the leader's `LeaderOps` sends each op's
arguments to the followers and then runs it; each follower's `FollowerOps.serve` runs the same ops in the same
order on its own engine, until the leader stops it.

Set-up (`connect`, collective, before the engine is built): the leader listens and broadcasts its address in
one device broadcast; each follower connects. The returned channel goes to the Engine's constructor
(`Engine(..., ops=...)`, `LLM(..., ops=...)`), which hands it to every part that runs device work.

Broadcast, not deterministic replay: replaying the schedule on every process would require every process to
see the same requests in the same order at the same step boundaries (arrival times, aborts, gRPC timing,
stop strings, wall-clock based policies) -- i.e. broadcasting the request stream anyway, plus keeping every
piece of scheduler state bit-identical forever. The op arguments are small (a few KB of int32 per step) and
already fully determine the device computation, so broadcasting them is simpler and cannot diverge. The
followers' MemPool host-side bookkeeping is therefore unused (only the leader's is authoritative); the
device tier is identical by construction because every process runs the same jitted programs.

Channel: one TCP connection from the leader to each follower. Not a device collective: a follower waiting for
the next op must leave its devices idle, since a pending collective blocks the device queue and with it the
process's transfer server (measured on CPU: a pull from a follower sitting in `broadcast_one_to_all` never
completes). It is also cheaper (no device work per step), and a follower sees the leader die at once (the
connection closes) instead of waiting for the jax.distributed heartbeat timeout. Wire format: see
device_ops.py (int32 header, int32 arrays, JSON for the small arguments). Security: with the cluster secret,
an HMAC challenge-response on connect; with TLS files (`tls`: `TlsFiles.op_channel_contexts()`), the
connection is mTLS first (both sides present a certificate from the cluster's CA), so every op after the
handshake is encrypted and integrity-protected too. jax.distributed's own coordinator (`initialize`) has no
authentication or encryption: keep its port on a private network.

KV transfers between instances (`KvShardOps`, bound on every process by the launcher): kv_offer gathers the
pages and every process offers its own shards' pieces to its own transfer server; kv_receive makes every
process pull the pieces for its own devices, the processes agree that all pulls succeeded, then all run the
same scatter (`jaxserve.mempool.transfer.offer_shards` / `receive_shards`): no process ever holds more than
its own shards of a block. Host-tier copies: every process copies its own shards; each process's host tier
holds only its own heads.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import socket
import time

import numpy as np

from jaxserve.engine.device_ops import (DeviceOps, FollowerOps, LeaderOps, LocalOps, SocketReceiver,
                                        SocketSender)

log = logging.getLogger("jaxserve.multihost")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_count: int | None = None,
               cpu_collectives: str = "gloo") -> None:
    """`jax.distributed.initialize` for an instance; call before anything else touches jax's backends.

    All three of coordinator_address / num_processes / process_id None: JAX auto-detects them (TPU pods,
    SLURM, ...). `local_device_count` (CPU only, tests): that many CPU devices in this process.
    """
    global _coordinator_host
    import jax
    if local_device_count:
        jax.config.update("jax_num_cpu_devices", int(local_device_count))
    if cpu_collectives:  # only used by the CPU backend; GPU uses NCCL and TPU ICI/DCN
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if coordinator_address is None and num_processes is None and process_id is None:
        jax.distributed.initialize()
        from jax._src import distributed  # the auto-detected coordinator (process 0's host); best effort
        coordinator_address = getattr(distributed.global_state, "coordinator_address", None)
    else:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    if coordinator_address:
        _coordinator_host = coordinator_address.rsplit(":", 1)[0]


_coordinator_host: str | None = None  # process 0's host, reachable from every process (jax.distributed's)


def is_multiprocess() -> bool:
    import jax
    return jax.process_count() > 1


def check_supported(engine) -> None:
    """Raise if the engine uses features that run device-tier work outside the steps and ops sent to followers."""
    import jax
    mesh = getattr(engine, "mesh", None)
    if mesh is not None and jax.process_count() > 1:
        have = {d.process_index for d in mesh.devices.flat}
        if have != set(range(jax.process_count())):
            missing = sorted(set(range(jax.process_count())) - have)
            raise ValueError(f"the instance mesh ({mesh.devices.size} devices) has no device of process(es) "
                             f"{missing}: use seq x tp = all {len(jax.devices())} devices (or device_ids spanning "
                             f"every process)")


def _broadcast_str(text: str, is_leader: bool, width: int = 256) -> str:
    from jax.experimental import multihost_utils
    raw = np.frombuffer(text.encode().ljust(width, b"\0")[:width], np.uint8)
    got = np.asarray(multihost_utils.broadcast_one_to_all(raw, is_source=is_leader))
    return bytes(got.astype(np.uint8)).rstrip(b"\0").decode()


def connect(bind_host: str = "127.0.0.1", accept_timeout_s: float = 300.0,
            connect_timeout_s: float = 60.0, secret: str | None = None, tls=None) -> DeviceOps:
    """Collective (every process calls it, after `initialize`): the instance's device-op channel, a
    `LeaderOps` on process 0 (listening on `bind_host`: followers on other hosts need a reachable interface,
    the instance's --host) and a `FollowerOps` elsewhere; `LocalOps` on a single-process instance.
    secret (the cluster secret; every process must have the same or none): leader and followers prove they
    know it on connect (HMAC challenge-response, `handshake_leader` / `handshake_follower`), so no stranger can
    feed a follower device ops or pose as a follower. tls: (leader, follower) ssl contexts
    (`TlsFiles.op_channel_contexts`): the connection is mTLS before the handshake (every process must have
    them, or none)."""
    import jax
    if jax.process_count() == 1:
        return LocalOps()
    leader_tls, follower_tls = tls if tls is not None else (None, None)
    how = ("mTLS" if tls is not None else "plain TCP") + (" + HMAC handshake" if secret is not None else "")
    if jax.process_index() == 0:
        socks = _accept_followers(bind_host, accept_timeout_s, secret, leader_tls)
        log.info("multihost: op channel to %d followers over %s", len(socks), how)
        return LeaderOps(SocketSender(socks))
    sock = _connect_to_leader(connect_timeout_s, secret, follower_tls)
    log.info("multihost: op channel to the leader over %s", how)
    return FollowerOps(SocketReceiver(sock))


def secure_leader(conn: socket.socket, context) -> socket.socket:
    """The leader's end of an accepted connection, wrapped in TLS when `context` is given (ssl.SSLError, an
    OSError, for a peer without a certificate from the cluster's CA, or one speaking plaintext)."""
    return conn if context is None else context.wrap_socket(conn, server_side=True)


def secure_follower(sock: socket.socket, context) -> socket.socket:
    return sock if context is None else context.wrap_socket(sock)


def _accept_followers(bind_host: str, accept_timeout_s: float, secret: str | None = None,
                      tls=None) -> dict[int, socket.socket]:
    import jax
    listener = socket.create_server((bind_host, 0))
    _broadcast_str(f"{routable_host(bind_host)}:{listener.getsockname()[1]}", True)
    socks: dict[int, socket.socket] = {}
    listener.settimeout(accept_timeout_s)
    try:
        while len(socks) < jax.process_count() - 1:
            conn, peer = listener.accept()
            conn.settimeout(30)
            try:
                conn = secure_leader(conn, tls)
                index = handshake_leader(conn, secret)
            except (OSError, ConnectionError, PermissionError) as e:
                # not one of our followers
                log.warning("multihost: ignoring a connection from %s that is not a follower (%s)", peer, e)
                conn.close()
                continue
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            socks[index] = conn
    finally:
        listener.close()
    return socks


def _connect_to_leader(connect_timeout_s: float, secret: str | None = None, tls=None) -> socket.socket:
    import jax
    host, port = _broadcast_str("", False).rsplit(":", 1)
    deadline = time.monotonic() + connect_timeout_s
    while True:
        try:
            sock = socket.create_connection((host, int(port)), timeout=10)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    sock.settimeout(30)
    sock = secure_follower(sock, tls)
    handshake_follower(sock, jax.process_index(), secret)
    sock.settimeout(None)  # an idle instance may wait for its next op forever
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


_HELLO = b"jaxserve-multihost-v2 "
_HELLO_AUTH = b"jaxserve-multihost-v3 "  # v2 plus the HMAC challenge-response below
_NONCE = 32


def _mac(secret: str, who: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret.encode(), b"jaxserve-multihost|" + who + b"|" + b"|".join(parts), hashlib.sha256).digest()


def handshake_follower(sock: socket.socket, index: int, secret: str | None) -> None:
    """The follower's side of connecting to the leader: hello + process index; with a secret, a challenge
    the leader must answer (proving it knows the secret) and our answer to the leader's challenge."""
    idx = np.int32(index).tobytes()
    if secret is None:
        sock.sendall(_HELLO + idx)
        return
    nonce_f = secrets.token_bytes(_NONCE)
    sock.sendall(_HELLO_AUTH + idx + nonce_f)
    got = SocketReceiver(sock).recv_exact(_NONCE + 32)
    nonce_l, mac_l = got[:_NONCE], got[_NONCE:]
    if not hmac.compare_digest(mac_l, _mac(secret, b"leader", idx, nonce_f, nonce_l)):
        raise PermissionError("multihost: the leader does not know the cluster secret (or has another one)")
    sock.sendall(_mac(secret, b"follower", idx, nonce_f, nonce_l))


def handshake_leader(conn: socket.socket, secret: str | None) -> int:
    """The leader's side: returns the follower's process index; PermissionError for a caller that does not
    speak the protocol or does not know the secret."""
    receiver = SocketReceiver(conn)
    hello = receiver.recv_exact(len(_HELLO) + 4)
    want = _HELLO if secret is None else _HELLO_AUTH
    if not hello.startswith(want):
        raise PermissionError("not the multihost hello" + (" with authentication (are the cluster secrets the "
                                                             "same on every process?)" if secret else ""))
    idx = hello[len(want):]
    if secret is not None:
        nonce_f = receiver.recv_exact(_NONCE)
        nonce_l = secrets.token_bytes(_NONCE)
        conn.sendall(nonce_l + _mac(secret, b"leader", idx, nonce_f, nonce_l))
        if not hmac.compare_digest(receiver.recv_exact(32), _mac(secret, b"follower", idx, nonce_f, nonce_l)):
            raise PermissionError("the follower does not know the cluster secret")
    return int(np.frombuffer(idx, np.int32)[0])


def routable_host(bind_host: str) -> str:
    """The address other processes reach a server bound to `bind_host` at: itself, or for a wildcard bind the
    coordinator's host (process 0) or this host's name resolved."""
    if bind_host not in ("", "0.0.0.0", "::"):
        return bind_host
    import jax
    if jax.process_index() == 0 and _coordinator_host:
        return _coordinator_host
    return _own_host()


def _own_host() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def exchange_addresses(address: str, width: int = 256) -> list[str]:
    """Every process calls this at startup with its own transfer server's address; returns all of them, by
    process index (a cross-process all-gather of fixed-size bytes)."""
    from jax.experimental import multihost_utils
    raw = address.encode()
    if len(raw) > width:
        raise ValueError(f"address {address!r} longer than {width} bytes")
    got = np.asarray(multihost_utils.process_allgather(np.frombuffer(raw.ljust(width, b"\0"), np.uint8)))
    return [bytes(row).rstrip(b"\0").decode() for row in got.reshape(-1, width)]




class KvShardOps:
    """The local functions of the per-shard KV transfer ops on one process: every process of an instance
    builds one (with its own transfer server and every process's address, by process index), which binds
    kv_offer and kv_receive on the engine's channel. The leader runs them with `offer` / `receive` below;
    followers from their `serve` loop."""

    def __init__(self, engine, server, addresses):
        self.pool, self.server, self.addresses = engine.pool, server, list(addresses or [])
        engine.ops.bind("kv_offer", self._offer)
        engine.ops.bind("kv_receive", self._receive)

    def _offer(self, pages, uuid, layout):
        from jaxserve.mempool.transfer import offer_shards
        if self.server is None:
            raise RuntimeError("this process has no transfer server")
        return offer_shards(self.server, self.pool, pages, layout, uuid, self.addresses)

    def _receive(self, sources, shape, dtype, num_chunks, pages, timeout) -> int:
        import jax
        from jax.experimental import multihost_utils
        from jaxserve.mempool.transfer import TransferError, receive_shards, scatter_block
        error = None
        try:
            if self.server is None:
                raise TransferError("this process has no transfer server")
            chunks = receive_shards(self.server, self.pool, sources, shape, dtype, num_chunks, timeout)
        except Exception as e:  # noqa: BLE001 - every process must reach the agreement below
            error = f"{type(e).__name__}: {e}"
        ok = np.asarray(multihost_utils.process_allgather(np.array([error is None], np.int32))).reshape(-1)
        if not ok.all():
            failed = [i for i, v in enumerate(ok) if not v]
            raise TransferError(f"per-shard KV receive failed on process(es) {failed}" + (f": {error}" if error else ""))
        scatter_block(self.pool, pages, chunks)
        nbytes = sum(int(s.data.nbytes) for c in chunks for s in c.addressable_shards)
        log.info("KV receive: process %d received %d bytes", jax.process_index(), nbytes)
        return nbytes


def offer(engine, server, addresses, pages, layout):
    """Leader, engine thread: the kv_offer op. Every process gathers `pages` and offers its own shards'
    pieces for the receiver `layout` (`jaxserve.mempool.transfer.offer_shards`, with the server and addresses
    its KvShardOps holds: `server` / `addresses` here must be the leader's same ones); returns what
    offer_shards returns here."""
    del addresses  # the KvShardOps' (the same list on every process)
    uuid = server.reserve_uuids(max(s.process for s in layout) + 1)
    return engine.ops.call("kv_offer", [int(p) for p in pages], uuid, list(layout))


def receive(engine, server, sources, shape, dtype: str, num_chunks: int, pages, timeout: float | None) -> None:
    """Leader, engine thread: the kv_receive op. Every process pulls the pieces for its own devices, and once
    all have them, all write them into `pages` (one scatter). TransferError on every process if any pull
    failed: then nothing is written anywhere. The pulls block this thread (and so the steps) until done or
    timed out. `server`: the leader's, the one its KvShardOps holds."""
    del server
    engine.ops.call("kv_receive", list(sources), [int(d) for d in shape], str(dtype), int(num_chunks),
                    [int(p) for p in pages], timeout)


def follower_loop(engine) -> int:
    """Followers (process_index != 0): run the leader's ops on `engine` (built with the `FollowerOps` of
    `connect`) until STOP. Returns the number of steps (sequence-parallel prefills included)."""
    if not isinstance(engine.ops, FollowerOps):
        raise TypeError(f"follower_loop needs an engine built with a FollowerOps channel, not {type(engine.ops).__name__}")
    check_supported(engine)
    counts = engine.ops.serve()
    return counts["step"] + counts["sp_forward"]


def stop_followers(engine) -> None:
    """Leader: end the followers' loops (call once, when the instance shuts down)."""
    engine.ops.stop_followers()
