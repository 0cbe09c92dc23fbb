"""Multi-controller instances: one engine whose mesh spans the devices of several processes (jax.distributed).

Every process of the instance builds the same `Engine` over the global mesh (`jax.devices()` lists the devices
of all processes), so the params and the MemPool's device tier are global `jax.Array`s sharded across hosts.
Process 0 is the leader: it alone runs the scheduler, the prompt index and the request bookkeeping. Before each
jitted step it broadcasts that step's host inputs (the padded numpy arrays `ModelRunner.prepare` builds) to the
followers, and then every process calls the same jitted step with the same inputs. Followers only loop:
receive a step, execute it, until the leader sends STOP.

Broadcast, not deterministic replay: replaying the schedule on every process would require every process to
see the same requests in the same order at the same step boundaries (arrival times, aborts, gRPC timing,
stop strings, wall-clock based policies) -- i.e. broadcasting the request stream anyway, plus keeping every
piece of scheduler state bit-identical forever. The step inputs are small (a few KB of int32 per step) and
already fully determine the device computation, so broadcasting them is simpler and cannot diverge. The
followers' MemPool host-side bookkeeping is therefore unused (only the leader's is authoritative); the
device tier is identical by construction because every process runs the same jitted programs.

Channel: one TCP connection from the leader to each follower (set up at start: the leader's address goes out
in one device broadcast; a follower connects to the coordinator's host). Not a device collective: a follower
waiting for the next op must leave its devices idle, since a pending collective blocks the device queue and
with it the process's transfer server (measured on CPU: a pull from a follower sitting in
`broadcast_one_to_all` never completes). It is also cheaper (no device work per step), and a follower sees the
leader die at once (the connection closes) instead of waiting for the jax.distributed heartbeat timeout.
Wire format per op:
1. a fixed-size int32 header [op, decode_only, T, S, P, payload_len, 0, 0];
2. for op == STEP, one int32 payload with every input array concatenated (float32 / uint32 sampling arrays
   travel as their bit patterns).

KV transfers between instances are device work outside the step, so they travel the same way, in order with
the steps (the engine thread issues them): OFFER (gather the pages, each process offers its own shards' pieces
to its own transfer server) and RECEIVE (each process pulls the pieces for its own devices, the processes
agree that all pulls succeeded, then all run the same scatter). Their arguments go as a JSON payload (header
[op, 0, 0, 0, 0, payload_len, json_bytes, 0]). See `jaxserve.mempool.transfer.offer_shards` /
`receive_shards`: no process ever holds more than its own shards of a block.

The host KV tier works the same way: the leader's MemPool sends each device<->host page copy (eviction to the
host tier, swap-in of a matched host prefix) as HOST_COPY ({kind, device pages, host pages}) before running it,
and every process copies its own shards; each process's host tier holds only its own heads.

Sequence-parallel prefill (mesh ("seq", "tp"), `jaxserve.engine.seq_parallel`) is device work outside the
step too: before the leader runs one, `SequenceParallelPrefill.before_forward` sends SEQ_PARALLEL with the host
inputs of `SequenceParallelPrefill.forward` ({tokens: the uncached suffix, start: tokens cached before it,
pages: the request's page table, logits_for, sampling: the sampler's arrays as int32 bit patterns}), in order
with the steps, and every follower calls `forward` with them: the same padding, zig-zag layout and jitted ring
program on every process (the ring's ppermutes run over `seq`, across processes when a `seq` row is one
process's devices).
"""

from __future__ import annotations

import json
import logging
import socket
import time

import numpy as np

log = logging.getLogger("jaxserve.multihost")

HEADER_LEN = 8
OP_STEP, OP_STOP, OP_OFFER, OP_RECEIVE, OP_HOST_COPY, OP_SEQ_PARALLEL = 1, 2, 3, 4, 5, 6

_SAMPLING = (("temperature", np.float32), ("top_k", np.int32), ("top_p", np.float32), ("seeds", np.uint32),
             ("output_index", np.int32))


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


class _LeaderChannel:
    """Process 0's side of the op channel: a connection to every follower (collective constructor: every
    follower builds a `_FollowerChannel` at the same time)."""

    def __init__(self, bind_host: str = "127.0.0.1", accept_timeout_s: float = 300.0):
        import jax
        # Followers on other hosts need a reachable interface: the instance's --host (0.0.0.0 or an address).
        listener = socket.create_server((bind_host, 0))
        host = routable_host(bind_host)
        _broadcast_str(f"{host}:{listener.getsockname()[1]}", True)
        self.socks: dict[int, socket.socket] = {}
        listener.settimeout(accept_timeout_s)
        try:
            while len(self.socks) < jax.process_count() - 1:
                conn, peer = listener.accept()
                conn.settimeout(30)
                try:
                    hello = _recv_exact(conn, len(_HELLO) + 4)
                except (OSError, ConnectionError):
                    hello = b""
                if not hello.startswith(_HELLO):  # not one of our followers
                    log.warning("multihost: ignoring a connection from %s that is not a follower", peer)
                    conn.close()
                    continue
                conn.settimeout(None)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.socks[int(np.frombuffer(hello[len(_HELLO):], np.int32)[0])] = conn
        finally:
            listener.close()

    def send(self, header: np.ndarray, payload: np.ndarray | None = None) -> None:
        data = np.asarray(header, np.int32).tobytes() + (b"" if payload is None else
                                                        np.asarray(payload, np.int32).tobytes())
        for i, conn in sorted(self.socks.items()):
            try:
                conn.sendall(data)
            except OSError as e:
                raise RuntimeError(f"multihost: follower process {i} is unreachable: {e}") from e

    def close(self) -> None:
        for conn in self.socks.values():
            conn.close()


class _FollowerChannel:
    def __init__(self, connect_timeout_s: float = 60.0):
        import jax
        host, port = _broadcast_str("", False).rsplit(":", 1)
        deadline = time.monotonic() + connect_timeout_s
        while True:
            try:
                self.sock = socket.create_connection((host, int(port)), timeout=10)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.sock.settimeout(None)  # an idle instance may wait for its next op forever
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(_HELLO + np.int32(jax.process_index()).tobytes())

    def recv(self) -> tuple[np.ndarray, np.ndarray]:
        header = np.frombuffer(_recv_exact(self.sock, 4 * HEADER_LEN), np.int32)
        payload = np.frombuffer(_recv_exact(self.sock, 4 * int(header[5])), np.int32)
        return header, payload

    def close(self) -> None:
        self.sock.close()


_HELLO = b"jaxserve-multihost-v1 "


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


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        got = sock.recv(n - len(buf))
        if not got:
            raise ConnectionError("multihost: the leader closed the op channel (it stopped or died)")
        buf += got
    return bytes(buf)


def _pack(inputs) -> tuple[np.ndarray, np.ndarray]:
    a = inputs.attn
    if set(inputs.sampling) != {name for name, _ in _SAMPLING}:  # keep the wire format in step with sampling.py
        raise ValueError(f"multihost: sampling inputs {sorted(inputs.sampling)} do not match the wire format "
                         f"{[name for name, _ in _SAMPLING]}")
    parts = [inputs.token_ids, inputs.prev_slots, inputs.positions, a.slot_pages, a.slot_offsets, a.kv_lens, a.page_indices,
             a.cu_q_lens, a.num_seqs, inputs.logits_indices]
    parts += [np.asarray(inputs.sampling[name], dt).view(np.int32) for name, dt in _SAMPLING]
    payload = np.concatenate([np.asarray(p).reshape(-1).astype(np.int32, copy=False) for p in parts])
    header = np.array([OP_STEP, int(inputs.decode_only), len(inputs.token_ids), len(inputs.logits_indices),
                       a.page_indices.shape[1], payload.size, 0, 0], np.int32)
    return header, payload


def _unpack(header: np.ndarray, payload: np.ndarray):
    from jaxserve.engine.model_runner import StepInputs
    from jaxserve.model.batch import AttentionBatch
    _, decode_only, T, S, P = (int(v) for v in header[:5])
    sizes = [T, T, T, T, T, S, S * P, S + 1, 1, S] + [S] * len(_SAMPLING)
    chunks, at = [], 0
    for n in sizes:
        chunks.append(payload[at:at + n])
        at += n
    tok, prev, pos, sp, so, kvl, pi, cu, ns, li = chunks[:10]
    attn = AttentionBatch(slot_pages=sp, slot_offsets=so, kv_lens=kvl, page_indices=pi.reshape(S, P),
                          cu_q_lens=cu, num_seqs=ns)
    sampling = {name: np.ascontiguousarray(c).view(dt) for (name, dt), c in zip(_SAMPLING, chunks[10:])}
    return StepInputs(bool(decode_only), tok, prev, pos, attn, li, sampling)


def make_leader(engine, bind_host: str = "127.0.0.1") -> None:
    """Process 0, while every follower enters `follower_loop`: connect the op channel (listening on
    `bind_host`) and install the hook that sends every step's inputs to the followers first."""
    check_supported(engine)
    channel = _LeaderChannel(bind_host)
    engine.multihost_channel = channel

    def before_execute(inputs):
        channel.send(*_pack(inputs))

    engine.runner.before_execute = before_execute
    engine.pool.host_copy_hook = lambda kind, pages, host: _send_json(
        engine, OP_HOST_COPY, dict(kind=kind, pages=pages, host=host))
    if getattr(engine, "sp", None) is not None:
        engine.sp.before_forward = lambda *args: _send_json(engine, OP_SEQ_PARALLEL, _sp_message(*args))


def _sp_message(token_ids, start, pages, logits_for, sampling) -> dict:
    """SEQ_PARALLEL's payload: `SequenceParallelPrefill.forward`'s arguments (sampling as int32 bit patterns)."""
    if set(sampling) != {name for name, _ in _SAMPLING}:
        raise ValueError(f"multihost: sampling inputs {sorted(sampling)} do not match the wire format "
                         f"{[name for name, _ in _SAMPLING]}")
    return dict(tokens=[int(t) for t in token_ids], start=int(start), pages=[int(p) for p in pages],
                logits_for=str(logits_for),
                sampling={name: np.asarray(sampling[name], dt).view(np.int32).reshape(-1).tolist()
                          for name, dt in _SAMPLING})


def _sp_arguments(msg: dict) -> tuple[tuple, dict]:
    """The inverse of `_sp_message`: (args, kwargs) of `SequenceParallelPrefill.forward`."""
    sampling = {name: np.asarray(msg["sampling"][name], np.int32).view(dt) for name, dt in _SAMPLING}
    return (msg["tokens"], msg["start"], msg["pages"]), dict(logits_for=msg["logits_for"], sampling=sampling)


def stop_followers(engine) -> None:
    """Leader: end the followers' loops (call once, when the instance shuts down)."""
    channel = engine.multihost_channel
    try:
        channel.send(np.array([OP_STOP] + [0] * (HEADER_LEN - 1), np.int32))
    finally:
        channel.close()


def exchange_addresses(address: str, width: int = 256) -> list[str]:
    """Every process calls this at startup with its own transfer server's address; returns all of them, by
    process index (a cross-process all-gather of fixed-size bytes)."""
    from jax.experimental import multihost_utils
    raw = address.encode()
    if len(raw) > width:
        raise ValueError(f"address {address!r} longer than {width} bytes")
    got = np.asarray(multihost_utils.process_allgather(np.frombuffer(raw.ljust(width, b"\0"), np.uint8)))
    return [bytes(row).rstrip(b"\0").decode() for row in got.reshape(-1, width)]


def _send_json(engine, op: int, msg: dict) -> None:
    data = json.dumps(msg, separators=(",", ":")).encode()
    payload = np.frombuffer(data.ljust(-(-len(data) // 4) * 4, b" "), np.int32)
    engine.multihost_channel.send(np.array([op, 0, 0, 0, 0, payload.size, len(data), 0], np.int32), payload)


def _json(header: np.ndarray, payload: np.ndarray) -> dict:
    return json.loads(payload.tobytes()[:int(header[6])])


def _layout(rows) -> list:
    from jaxserve.mempool.transfer import HeadShard
    return [HeadShard(int(p), int(a), int(b)) for p, a, b in rows]


def _sources(rows) -> list:
    from jaxserve.mempool.transfer import ShardSource
    return [ShardSource(int(p), str(addr), int(uuid), tuple(tuple(int(v) for v in x) for x in pieces))
            for p, addr, uuid, pieces in rows]


def offer(engine, server, addresses, pages, layout):
    """Leader, engine thread: every process gathers `pages` and offers its own shards' pieces for the
    receiver `layout` (`jaxserve.mempool.transfer.offer_shards`); returns what offer_shards returns here."""
    from jaxserve.mempool.transfer import offer_shards
    uuid = server.reserve_uuids(max(s.process for s in layout) + 1)
    pages = [int(p) for p in pages]
    _send_json(engine, OP_OFFER, dict(pages=pages, uuid=uuid, layout=[[s.process, s.start, s.end] for s in layout]))
    return offer_shards(server, engine.pool, pages, layout, uuid, addresses)


def receive(engine, server, sources, shape, dtype: str, num_chunks: int, pages, timeout: float | None) -> None:
    """Leader, engine thread: every process pulls the pieces for its own devices, and once all have them,
    all write them into `pages` (one scatter). TransferError on every process if any pull failed: then
    nothing is written anywhere. The pulls block this thread (and so the steps) until done or timed out."""
    msg = dict(sources=[[s.receiver_process, s.address, s.uuid, [list(x) for x in s.pieces]] for s in sources],
               shape=[int(d) for d in shape], dtype=str(dtype), chunks=int(num_chunks),
               pages=[int(p) for p in pages], timeout=timeout)
    _send_json(engine, OP_RECEIVE, msg)
    nbytes = _receive(engine, server, msg)
    log.info("KV receive: process 0 received %d bytes", nbytes)


def _receive(engine, server, msg: dict) -> int:
    from jax.experimental import multihost_utils
    from jaxserve.mempool.transfer import TransferError, receive_shards, scatter_block
    error = None
    try:
        if server is None:
            raise TransferError("this process has no transfer server")
        chunks = receive_shards(server, engine.pool, _sources(msg["sources"]), msg["shape"], msg["dtype"],
                                msg["chunks"], msg["timeout"])
    except Exception as e:  # noqa: BLE001 - every process must reach the agreement below
        error = f"{type(e).__name__}: {e}"
    ok = np.asarray(multihost_utils.process_allgather(np.array([error is None], np.int32))).reshape(-1)
    if not ok.all():
        failed = [i for i, v in enumerate(ok) if not v]
        raise TransferError(f"per-shard KV receive failed on process(es) {failed}" + (f": {error}" if error else ""))
    scatter_block(engine.pool, msg["pages"], chunks)
    return sum(int(s.data.nbytes) for c in chunks for s in c.addressable_shards)


def follower_loop(engine, transfer_server=None) -> int:
    """Followers (process_index != 0): execute the leader's steps (sequence-parallel prefills included) and
    KV-transfer ops until STOP. Returns the number of steps. `transfer_server`: this process's own (instances
    that send or receive KV)."""
    import jax
    check_supported(engine)
    channel = _FollowerChannel()
    steps = 0
    nowhere = [""] * jax.process_count()  # the leader names the sources; a follower only offers
    while True:
        header, payload = channel.recv()
        op = int(header[0])
        if op == OP_STOP:
            channel.close()
            return steps
        if op == OP_OFFER:
            msg = _json(header, payload)
            try:
                if transfer_server is None:
                    raise RuntimeError("this process has no transfer server")
                from jaxserve.mempool.transfer import offer_shards
                offer_shards(transfer_server, engine.pool, msg["pages"], _layout(msg["layout"]), msg["uuid"], nowhere)
            except Exception:  # noqa: BLE001 - the receiver's pull times out; the instance keeps serving
                log.exception("multihost follower: KV offer failed")
            continue
        if op == OP_RECEIVE:
            msg = _json(header, payload)
            try:
                nbytes = _receive(engine, transfer_server, msg)
                log.info("KV receive: process %d received %d bytes", jax.process_index(), nbytes)
            except Exception as e:  # noqa: BLE001 - the leader fails the transfer too (agreement)
                log.warning("multihost follower: KV receive failed: %s", e)
            continue
        if op == OP_HOST_COPY:  # a failure here would leave the processes out of step: let it end the loop
            msg = _json(header, payload)
            if msg["kind"] == "to_host":
                engine.pool.copy_to_host(msg["pages"], msg["host"])
            else:
                engine.pool.copy_to_device(msg["host"], msg["pages"])
            continue
        if op == OP_SEQ_PARALLEL:  # as OP_HOST_COPY: a failure here ends the loop
            if getattr(engine, "sp", None) is None:
                raise RuntimeError("multihost follower: SEQ_PARALLEL but this engine has no seq axis (seq = 1)")
            args, kwargs = _sp_arguments(_json(header, payload))
            engine.sp.forward(*args, **kwargs)
            steps += 1
            continue
        if op != OP_STEP:
            raise RuntimeError(f"multihost follower: unknown op {op} in header {header.tolist()}")
        engine.runner.execute(_unpack(header, payload))
        steps += 1
