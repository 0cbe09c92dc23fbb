"""KV transfer between MemPools (MemServe §3, transfer API), two backends behind one interface.

A request's KV moves as one block holding its pages for every layer (MemServe's huge-page aggregation): one
gather `kv_cache[:, pages]`, one move, one donated in-place scatter into the destination pool, whatever the
number of layers. Page counts are padded to powers of two (padding reads/writes page 0, the pool's reserved
sink) so the number of compilations stays O(log num_pages).

Backends (both reached through `MemPool.transfer(dst, ...)` / `MemPool.transfer_with_insert(dst, ...)`):

- local: `dst` is a MemPool in this process, usually on another mesh. The block goes through
  `jax.device_put` to the destination pool's sharding, which also reshards between tensor-parallel degrees.
- remote: `dst` is a `RemotePool`, a handle on a pool in another process served by a `KVReceiver`. The sender
  parks the gathered block in its `jax.experimental.transfer` server (`await_pull`); a small JSON control
  message (request id, transfer id, shape, dtype, server address, destination pages or tokens) goes over a
  loopback TCP socket; the receiver `pull`s the block straight into its own devices, scatters it and answers.
  The KV itself never crosses the control socket, and nothing is pickled. The transfer server only moves
  arrays whose shard layout matches on both sides, so the receiver pulls into a staging layout with the
  sender's number of shards and reshards locally with `device_put`.

The served disaggregated path (`jaxserve.instance`) uses the same backend with its control message carried
as protobuf by the instance gRPC API (`PrepareKvTransfer` / `CommitKvTransfer`): `offer_block` on the sender,
`pull_block` + `scatter_block` on the receiver. The JSON socket above remains for `RemotePool` users.
When either instance spans several processes, the block moves per shard instead (`offer_shards` /
`receive_shards`): every sender process offers single-device pieces of its own shards, cut at the receiver's
shard boundaries, and every receiver process pulls only the pieces for its own devices; no host ever holds
more than its own shards.

Failure: a transfer that fails or times out raises `TransferError`; receive-side helpers free every page they
allocated before re-raising, and a block is indexed only after it has fully arrived.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import itertools
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import NamedSharding, PartitionSpec

from jaxserve.util import next_pow2

log = logging.getLogger("jaxserve.transfer")

class TransferError(RuntimeError):
    """A KV transfer failed or timed out; whatever it allocated has been freed."""


# Array operations issued by transfers, for tests and benchmarks (aggregation: a constant per request).
OP_COUNTS = dict(gather=0, device_put=0, scatter=0, pull=0)

_FAULT: dict[str, str | None] = dict(stage=None)


@contextlib.contextmanager
def inject_failure(stage: str):
    """Test hook: the next transfer that reaches `stage` ("send", "receive" or "insert") raises TransferError."""
    _FAULT["stage"] = stage
    try:
        yield
    finally:
        _FAULT["stage"] = None


def _maybe_fail(stage: str) -> None:
    if _FAULT["stage"] == stage:
        _FAULT["stage"] = None
        raise TransferError(f"injected failure at stage {stage!r}")


def insert_fill(fill: Callable[[list[int]], None]) -> Callable[[list[int]], None]:
    """`fill` for `MemPool.receive_with_insert`, then the "insert" stage of `inject_failure` (the pages have
    arrived and the receiver is about to index them): the pool itself has no test hook."""
    def run(pages: list[int]) -> None:
        fill(pages)
        _maybe_fail("insert")
    return run


def padded_index(pages: Sequence[int], size: int | None = None) -> np.ndarray:
    idx = np.zeros(next_pow2(len(pages)) if size is None else size, np.int32)  # padding names page 0 (the sink)
    idx[:len(pages)] = pages
    return idx


# Cross-process blocks travel as several arrays ("chunks") of equal page count: the transfer server moves a
# list of arrays much faster than one array of the same bytes (measured on this box, 8 MiB: 1 array ~17-23 ms,
# 4-8 arrays ~9-16 ms; see WORKSPACE_NOTES.md). Still one gather and one scatter executable per request.
MAX_CHUNKS = 8
MIN_CHUNK_BYTES = 512 * 1024


def chunk_pages(n_pages: int, page_bytes: int) -> int:
    """Pages per chunk for a transfer of n_pages: a power of two dividing next_pow2(n_pages), so that at most
    MAX_CHUNKS chunks of at least MIN_CHUNK_BYTES (or one chunk) cover the pages."""
    padded = next_pow2(n_pages)
    k = 1
    while k < MAX_CHUNKS and padded // (2 * k) >= 1 and padded // (2 * k) * page_bytes >= MIN_CHUNK_BYTES:
        k *= 2
    return padded // k


# ------------------------------------------------------------------------------------------- array operations
@jax.jit
def _gather(kv: jax.Array, idx: jax.Array) -> jax.Array:
    return kv[:, idx]  # [layers, pages, page_size, 2*Hkv, D], still sharded on the head axis


@functools.lru_cache(maxsize=None)
def _scatter_fn(sharding):
    # One donated in-place write per real page (`n` of them; the padding rows are never written), each a
    # dynamic_update_slice of [layers, 1, page_size, 2*Hkv, D]: on XLA:CPU this runs near memory-copy speed,
    # while the equivalent `kv.at[:, idx].set(block)` scatter was 2-6x slower (see WORKSPACE_NOTES.md).
    def scatter(kv, idx, n, block):
        block = block.astype(kv.dtype)

        def body(j, kv):
            page = jax.lax.dynamic_slice_in_dim(block, j, 1, axis=1)
            return jax.lax.dynamic_update_slice_in_dim(kv, page, idx[j], axis=1)
        return jax.lax.fori_loop(0, n, body, kv)
    if sharding is None:
        return jax.jit(scatter, donate_argnums=0)
    return jax.jit(scatter, donate_argnums=0, out_shardings=sharding)


@functools.lru_cache(maxsize=None)
def _gather_chunks_fn(k: int):
    def gather(kv, idx):
        c = idx.shape[0] // k
        return tuple(kv[:, idx[i * c:(i + 1) * c]] for i in range(k))
    return jax.jit(gather)


@functools.lru_cache(maxsize=None)
def _scatter_chunks_fn(sharding, k: int):
    # As `_scatter_fn`, for k chunks of equal page count in one executable (chunk i holds padded rows
    # [i*c, (i+1)*c)); only the first n rows overall are written.
    def scatter(kv, idx, n, *chunks):
        c = chunks[0].shape[1]
        for i, chunk in enumerate(chunks):
            chunk = chunk.astype(kv.dtype)

            def body(j, kv, chunk=chunk, i=i):
                page = jax.lax.dynamic_slice_in_dim(chunk, j, 1, axis=1)
                return jax.lax.dynamic_update_slice_in_dim(kv, page, idx[i * c + j], axis=1)
            kv = jax.lax.fori_loop(0, jnp.clip(n - i * c, 0, c), body, kv)
        return kv
    if sharding is None:
        return jax.jit(scatter, donate_argnums=0)
    return jax.jit(scatter, donate_argnums=0, out_shardings=sharding)


@jax.jit
def _gather_layer(kv: jax.Array, layer: jax.Array, idx: jax.Array, kv_half: jax.Array) -> jax.Array:
    # Layer-by-layer baseline: one layer's K (kv_half=0) or V (kv_half=1) of the pages, heads interleaved.
    x = jax.lax.dynamic_index_in_dim(kv, layer, 0, keepdims=False)[idx]
    return jax.lax.dynamic_slice_in_dim(x.reshape(x.shape[:2] + (-1, 2, x.shape[-1])), kv_half, 1, axis=3)


@functools.lru_cache(maxsize=None)
def _scatter_layer_fn(sharding):
    def scatter(kv, layer, idx, kv_half, part):
        shape = kv.shape
        x = kv.reshape(shape[:3] + (-1, 2, shape[-1]))
        cur = x[layer, idx]
        cur = jax.lax.dynamic_update_slice_in_dim(cur, part.astype(kv.dtype), kv_half, axis=3)
        return x.at[layer, idx].set(cur).reshape(shape)
    if sharding is None:
        return jax.jit(scatter, donate_argnums=0)
    return jax.jit(scatter, donate_argnums=0, out_shardings=sharding)


def pool_sharding(pool) -> jax.sharding.Sharding:
    return pool.sharding if pool.sharding is not None else pool.kv_cache.sharding


def gather_block(pool, pages: Sequence[int]) -> jax.Array:
    """One gather of `pages` for all layers: [layers, next_pow2(n), page_size, 2*Hkv, D] on the pool's devices."""
    OP_COUNTS["gather"] += 1
    return _gather(pool.kv_cache, padded_index(pages))


def gather_chunks(pool, pages: Sequence[int]) -> list[jax.Array]:
    """One gather of `pages` for all layers, returned as chunks of `chunk_pages` pages each (one executable;
    the chunks together cover the pages, the last one padded with page 0)."""
    OP_COUNTS["gather"] += 1
    page_bytes = int(np.prod(pool.page_shape)) * jnp.dtype(pool.dtype).itemsize
    c = chunk_pages(len(pages), page_bytes)
    k = -(-len(pages) // c)
    return list(_gather_chunks_fn(k)(pool.kv_cache, padded_index(pages, k * c)))


def scatter_block(pool, pages: Sequence[int], block) -> None:
    """One donated in-place scatter of a gathered block (a single array of next_pow2(len(pages)) pages), or of
    its chunks (a list of equal-size arrays covering the pages, as `gather_chunks` makes them)."""
    if isinstance(block, (list, tuple)):
        chunks = list(block)
        c = chunks[0].shape[1] if chunks else 0
        if not chunks or any(x.shape[1] != c for x in chunks) or len(chunks) != -(-len(pages) // c):
            raise TransferError(f"chunks of {[x.shape[1] for x in chunks]} pages do not cover {len(pages)} pages")
        OP_COUNTS["scatter"] += 1
        pool.kv_cache = _scatter_chunks_fn(pool.sharding, len(chunks))(
            pool.kv_cache, padded_index(pages, len(chunks) * c), np.int32(len(pages)), *chunks)
        return
    OP_COUNTS["scatter"] += 1
    idx = padded_index(pages)
    if block.shape[1] != idx.size:
        raise TransferError(f"block holds {block.shape[1]} pages, expected bucket {idx.size} for {len(pages)}")
    pool.kv_cache = _scatter_fn(pool.sharding)(pool.kv_cache, idx, np.int32(len(pages)), block)


def local_transfer(src, dst, src_pages: Sequence[int], dst_pages: Sequence[int]) -> None:
    """Aggregated same-process transfer: gather, device_put (reshards), scatter: three array operations."""
    if len(src_pages) != len(dst_pages):
        raise ValueError(f"{len(src_pages)} source pages but {len(dst_pages)} destination pages")
    if not src_pages:
        return
    _check_compatible(src, dst)
    block = gather_block(src, src_pages)
    _maybe_fail("send")
    OP_COUNTS["device_put"] += 1
    block = jax.device_put(block, pool_sharding(dst))
    _maybe_fail("receive")
    scatter_block(dst, dst_pages, block)


def local_transfer_layerwise(src, dst, src_pages: Sequence[int], dst_pages: Sequence[int]) -> None:
    """Baseline without aggregation: K and V of each layer move separately (2 x layers gathers, device_puts
    and scatters), as a system whose cache is one array per layer and per K/V would do."""
    if len(src_pages) != len(dst_pages):
        raise ValueError(f"{len(src_pages)} source pages but {len(dst_pages)} destination pages")
    if not src_pages:
        return
    _check_compatible(src, dst)
    sidx, didx = padded_index(src_pages), padded_index(dst_pages)
    scatter = _scatter_layer_fn(dst.sharding)
    target = pool_sharding(dst)
    if isinstance(target, NamedSharding):  # a part is [pages, page_size, Hkv, 1, D]: heads on axis 2
        target = NamedSharding(target.mesh, PartitionSpec(None, None, target.spec[3], None, None))
    for layer in range(src.kv_cache.shape[0]):
        for half in (0, 1):
            OP_COUNTS["gather"] += 1
            part = _gather_layer(src.kv_cache, np.int32(layer), sidx, np.int32(half))
            OP_COUNTS["device_put"] += 1
            part = jax.device_put(part, target)
            OP_COUNTS["scatter"] += 1
            dst.kv_cache = scatter(dst.kv_cache, np.int32(layer), didx, np.int32(half), part)


def _check_compatible(src, dst) -> None:
    if src.page_shape != dst.page_shape:
        raise ValueError(f"page shapes differ: {src.page_shape} vs {dst.page_shape}")


# ------------------------------------------------------------------------------------------- cross-process
def _send_msg(sock: socket.socket, msg: dict) -> None:
    sock.sendall(json.dumps(msg, separators=(",", ":")).encode() + b"\n")


def _recv_msg(reader) -> dict:
    line = reader.readline()
    if not line:
        raise TransferError("control connection closed by peer")
    return json.loads(line)


class TransferServer:
    """This process's `jax.experimental.transfer` server plus a cache of connections to peers."""

    _uuids = itertools.count(int(time.time() * 1000) % 10**9 * 1000)
    _uuid_lock = threading.Lock()

    def __init__(self, client=None, address: str = "127.0.0.1:0"):
        from jax.experimental import transfer as jtransfer
        client = client if client is not None else jax.local_devices()[0].client
        host = address.rsplit(":", 1)[0]
        self._server = jtransfer.start_transfer_server(client, address, [f"{host}:0"])
        self._conns: dict[str, object] = {}
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        return self._server.address()

    def next_uuid(self) -> int:
        with self._uuid_lock:
            return next(self._uuids)

    def reserve_uuids(self, n: int) -> int:
        """The first of n consecutive fresh uuids (one per receiver process of a per-shard transfer)."""
        with self._uuid_lock:
            first = next(self._uuids)
            for _ in range(max(int(n), 1) - 1):
                next(self._uuids)
        return first

    def offer(self, uuid: int, arrays: list[jax.Array]) -> None:
        self._server.await_pull(uuid, arrays)

    def pull(self, address: str, uuid: int, specs: list[jax.ShapeDtypeStruct],
             timeout: float | None = None) -> list[jax.Array]:
        with self._lock:
            conn = self._conns.get(address)
            if conn is None:
                conn = self._conns[address] = self._server.connect(address)
        OP_COUNTS["pull"] += 1
        if timeout is None:
            return conn.pull(uuid, specs)
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
        return conn.pull(uuid, specs, timeout=deadline)


class RemotePool:
    """Sender-side handle on a MemPool in another process, served there by `KVReceiver.serve`.

    `MemPool.transfer(remote, ...)` and `MemPool.transfer_with_insert(remote, ...)` land in `push`.
    """

    def __init__(self, host: str, port: int, server: TransferServer, *, timeout: float = 30.0):
        self.server = server
        self.timeout = timeout
        self._sock = socket.create_connection((host, port), timeout=timeout)
        self._reader = self._sock.makefile("rb")
        self._lock = threading.Lock()
        info = self.call(dict(op="hello"))
        self.page_shape = tuple(info["page_shape"])
        self.dtype = info["dtype"]
        self.tp = int(info["tp"])

    def call(self, msg: dict, timeout: float | None = None) -> dict:
        with self._lock:
            self._sock.settimeout(timeout if timeout is not None else self.timeout)
            try:
                _send_msg(self._sock, msg)
                reply = _recv_msg(self._reader)
            except (OSError, ValueError) as e:  # socket.timeout is an OSError
                raise TransferError(f"control message {msg.get('op')!r} failed: {e}") from e
        if not reply.get("ok"):
            raise TransferError(f"remote {msg.get('op')!r} failed: {reply.get('error')}")
        return reply

    def cached_prefix_pages(self, tokens: Sequence[int]) -> int:
        return int(self.call(dict(op="lookup", tokens=[int(t) for t in tokens]))["pages"])

    def alloc(self, n: int, request_id: str = "") -> list[int]:
        return self.call(dict(op="alloc", n=int(n), request_id=request_id))["pages"]

    def release(self, request_id: str) -> None:
        self.call(dict(op="release", request_id=request_id))

    def push(self, src, src_pages: Sequence[int], *, dst_pages: Sequence[int] | None = None,
             tokens: Sequence[int] | None = None, start_page: int = 0, request_id: str = "",
             timeout: float | None = None) -> list[int]:
        """Parks the gathered block on the transfer server and asks the receiver to pull it. With `tokens`,
        the receiver allocates, receives and indexes (transfer_with_insert) and returns all pages holding
        `tokens`; else it writes into `dst_pages`."""
        if tuple(src.page_shape) != self.page_shape:
            raise ValueError(f"page shapes differ: {src.page_shape} vs remote {self.page_shape}")
        chunks = gather_chunks(src, list(src_pages))
        _maybe_fail("send")
        uuid = self.server.next_uuid()
        self.server.offer(uuid, chunks)
        msg = dict(op="receive", request_id=request_id, uuid=uuid, address=self.server.address,
                   shape=list(chunks[0].shape), chunks=len(chunks), dtype=str(chunks[0].dtype),
                   n_pages=len(src_pages), src_shards=_num_head_shards(chunks[0]), timeout=timeout or self.timeout)
        if tokens is not None:
            msg.update(tokens=[int(t) for t in tokens], start_page=int(start_page))
        else:
            msg.update(dst_pages=[int(p) for p in dst_pages])
        return self.call(msg, timeout=(timeout or self.timeout) + 5.0)["pages"]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()


def _num_head_shards(block: jax.Array) -> int:
    s = block.sharding
    if isinstance(s, NamedSharding):
        ax = s.spec[3] if len(s.spec) > 3 else None
        if ax is None:
            return 1
        names = ax if isinstance(ax, tuple) else (ax,)
        return int(np.prod([s.mesh.shape[n] for n in names]))
    return 1


def _wait_ready(x, timeout: float | None) -> None:
    """`block_until_ready` with a deadline. On CPU with jax 0.10.2 the pull's own `timeout` does not fire when
    the sender never offers the transfer id (the array just never becomes ready), so the wait happens on a
    helper thread; after a timeout that thread and the unfilled buffer are abandoned (never scattered)."""
    if timeout is None:
        jax.block_until_ready(x)
        return
    err: list[BaseException] = []
    done = threading.Event()

    def wait():
        try:
            jax.block_until_ready(x)
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            err.append(e)
        done.set()

    threading.Thread(target=wait, daemon=True).start()
    if not done.wait(timeout):
        raise TransferError(f"pull did not complete within {timeout:.1f}s")
    if err:
        raise TransferError(f"pull failed: {err[0]}") from err[0]


class KVReceiver:
    """Receive side of the cross-process backend: serves one MemPool to `RemotePool` peers.

    Pages it allocates for a request are held under the request id until `take(request_id)` hands them to
    the local engine or the peer `release`s them; a failed receive frees them before answering."""

    def __init__(self, pool, server: TransferServer):
        self.pool = pool
        self.server = server
        self.held: dict[str, list[int]] = {}
        self.handlers: dict[str, Callable[[dict], dict]] = dict(
            hello=self._hello, lookup=self._lookup, alloc=self._alloc, release=self._release,
            receive=self._receive)
        self._lock = threading.Lock()

    def take(self, request_id: str) -> list[int]:
        return self.held.pop(request_id)

    def handle(self, msg: dict) -> dict:
        fn = self.handlers.get(msg.get("op"))
        if fn is None:
            return dict(ok=False, error=f"unknown op {msg.get('op')!r}")
        try:
            with self._lock:
                return dict(ok=True, **fn(msg))
        except Exception as e:  # surfaced to the peer; local state was cleaned up by the handler
            return dict(ok=False, error=f"{type(e).__name__}: {e}")

    def serve(self, listener: socket.socket, stop: threading.Event | None = None) -> None:
        """Answers control messages from each accepted connection until the peer closes it."""
        while stop is None or not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve_conn, args=(conn,), daemon=True).start()

    def _serve_conn(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        with conn:
            while True:
                line = reader.readline()
                if not line:
                    return
                try:
                    msg = json.loads(line)
                except ValueError as e:
                    _send_msg(conn, dict(ok=False, error=f"bad control message: {e}"))
                    continue
                _send_msg(conn, self.handle(msg))

    # -- handlers
    def _hello(self, msg):
        return dict(page_shape=list(self.pool.page_shape), dtype=str(self.pool.dtype),
                    tp=_num_head_shards(self.pool.kv_cache))

    def _lookup(self, msg):
        return dict(pages=self.pool.cached_prefix_pages(msg["tokens"]))

    def _alloc(self, msg):
        pages = self.pool.alloc(int(msg["n"]))
        if pages is None:
            raise MemoryError(f"cannot allocate {msg['n']} pages")
        self.held.setdefault(msg.get("request_id", ""), []).extend(pages)
        return dict(pages=pages)

    def _release(self, msg):
        self.pool.free(self.held.pop(msg["request_id"], []))
        return {}

    def _pull(self, msg) -> jax.Array:
        return pull_block(self.server, self.pool, msg["address"], int(msg["uuid"]), msg["shape"], msg["dtype"],
                          int(msg["src_shards"]), msg.get("timeout"), chunks=int(msg.get("chunks", 0)))

    def _receive(self, msg):
        n = int(msg["n_pages"])
        rid = msg.get("request_id", "")
        pulled = []

        def fill(pages):
            pulled.append(True)
            scatter_block(self.pool, pages, self._pull(msg))

        try:
            if "tokens" in msg:
                pages = self.pool.receive_with_insert(msg["tokens"], int(msg.get("start_page", 0)), n,
                                                     insert_fill(fill))
                self.held.setdefault(rid, []).extend(pages)
                return dict(pages=pages)
            pages = [int(p) for p in msg["dst_pages"]]
            if len(pages) != n:
                raise ValueError(f"{n} pages sent but {len(pages)} destination pages named")
            fill(pages)
            return dict(pages=pages)
        except Exception:
            if not pulled:  # failed before pulling: drain the block so the sender's server lets go of it
                with contextlib.suppress(Exception):
                    got = self._pull(msg)
                    for x in (got if isinstance(got, list) else [got]):
                        x.delete()
            raise


# ----------------------------------------------------------------------------- building blocks for other control planes
def offer_block(server: TransferServer, pool, pages: Sequence[int]) -> tuple[int, list[jax.Array]]:
    """Sender side, any control plane (the instance gRPC API uses this): one gather of `pages` for all layers
    (as chunks, see `gather_chunks`), parked on `server` until a peer pulls it. Returns (uuid, chunks); send
    uuid, each chunk's shape and dtype and `num_head_shards(chunk)` to the receiver. The caller must own
    `pool.kv_cache` (its engine thread)."""
    chunks = gather_chunks(pool, list(pages))
    _maybe_fail("send")
    uuid = server.next_uuid()
    server.offer(uuid, chunks)
    return uuid, chunks


def num_head_shards(block: jax.Array) -> int:
    return _num_head_shards(block)


def pull_block(server: TransferServer, pool, address: str, uuid: int, shape: Sequence[int], dtype: str,
               src_shards: int, timeout: float | None, *, chunks: int = 0):
    """Receiver side: pulls a block offered by `offer_block` on the peer at `address` into a staging layout
    with the sender's number of head shards, waits for it (TransferError on failure or after `timeout`
    seconds) and reshards it to the pool's sharding. Touches no pool state (safe off the engine thread);
    write it with `scatter_block` on the thread that owns the pool. chunks > 0: the sender offered that many
    arrays of `shape` (`offer_block`); returns them as a list (else one array)."""
    src_shards = max(int(src_shards), 1)
    target = pool_sharding(pool)
    n = max(int(chunks), 1)
    shape = tuple(int(d) for d in shape)
    if _sharding_head_shards(target) == src_shards:
        # Same shard layout on both sides: pull straight into the pool's sharding, no staging reshard.
        got = _pull_checked(server, address, uuid, [jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=target)]
                            * n, timeout)
        return got if chunks else got[0]
    mine = list(target.device_set)
    devices = sorted(mine, key=lambda d: d.id)
    if len(devices) < src_shards:
        devices = [d for d in jax.local_devices() if d in mine] + \
                  [d for d in jax.local_devices() if d not in mine]
    if len(devices) < src_shards:
        raise TransferError(f"sender has {src_shards} shards but this process has {len(devices)} devices")
    staging = NamedSharding(jax.sharding.Mesh(np.asarray(devices[:src_shards]), ("tp",)),
                            PartitionSpec(None, None, None, "tp", None))
    spec = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=staging)
    got = _pull_checked(server, address, uuid, [spec] * n, timeout)
    OP_COUNTS["device_put"] += 1
    got = jax.device_put(got, target)
    return got if chunks else got[0]


def _sharding_head_shards(sharding) -> int:
    """Shards along the KV-head axis (axis 3) of a pool sharding; 1 for an unsharded or single device one."""
    if isinstance(sharding, NamedSharding):
        ax = sharding.spec[3] if len(sharding.spec) > 3 else None
        if ax is None:
            return 1 if len(sharding.device_set) == 1 else 0  # replicated over several devices: not a match
        names = ax if isinstance(ax, tuple) else (ax,)
        if int(np.prod([sharding.mesh.shape[n] for n in names])) != len(sharding.device_set):
            return 0  # also sharded or replicated along another axis: not the sender's layout
        return int(np.prod([sharding.mesh.shape[n] for n in names]))
    return 1 if len(sharding.device_set) == 1 else 0


def _pull_checked(server: TransferServer, address: str, uuid: int, specs: list[jax.ShapeDtypeStruct],
                  timeout: float | None) -> list[jax.Array]:
    try:
        block = list(server.pull(address, int(uuid), specs, timeout=timeout))
    except TransferError:
        raise
    except Exception as e:  # noqa: BLE001 - connection refused, bad id...: one error type for callers
        raise TransferError(f"pull from {address} failed: {type(e).__name__}: {e}") from e
    _wait_ready(block, timeout)  # raises on failure or timeout, before anything is written
    _maybe_fail("receive")
    return block


# ---------------------------------------------------------------------------------- per-shard transfers
# When either side is a multi-process instance, no single process holds (or may gather) the whole block: each
# sender process offers only slices of its own devices' shards, each receiver process pulls only what its own
# devices hold, and the block is reassembled on the receiver's devices without a copy. A layout is the list
# of a pool's devices with their range on the KV-head axis (axis 3 of [layers, pages, page_size, 2*Hkv, D]);
# the sender cuts its shards at the receiver's boundaries into pieces, one single-device array per piece (the
# transfer server then needs no matching shard layout on both sides).


@dataclasses.dataclass(frozen=True)
class HeadShard:
    """One device of a pool: its process and its range [start, end) on the KV-head axis."""
    process: int
    start: int
    end: int


@dataclasses.dataclass(frozen=True)
class ShardSource:
    """What one sender process offers one receiver process, under `uuid` on the transfer server at `address`:
    for each chunk of the block in turn, one array per piece; a piece (receiver shard index, start, end) is
    that range of the KV-head axis, destined for that device of the receiver's layout."""
    receiver_process: int
    address: str
    uuid: int
    pieces: tuple[tuple[int, int, int], ...]


def _device_head_ranges(sharding, shape: Sequence[int]) -> list[tuple[object, int, int]]:
    """(device, start, end) on axis 3 for every device of `sharding` (all processes), sorted by process,
    start, device id: the same order on every process. Only axis 3 may be sharded."""
    shape = tuple(int(d) for d in shape)
    out = []
    for device, index in sharding.devices_indices_map(shape).items():
        for axis, sl in enumerate(index):
            if axis != 3 and sl.indices(shape[axis])[:2] != (0, shape[axis]):
                raise TransferError(f"per-shard transfer needs a pool sharded on the KV-head axis only, got "
                                    f"{sharding} (axis {axis} split)")
        start, end, _ = index[3].indices(shape[3])
        out.append((device, start, end))
    out.sort(key=lambda t: (t[0].process_index, t[1], t[0].id))
    return out


def pool_layout(pool) -> list[HeadShard]:
    """The receiver side's description of its pool for a per-shard transfer (sent in PrepareKvTransfer)."""
    return [HeadShard(d.process_index, a, b) for d, a, b in _device_head_ranges(pool_sharding(pool),
                                                                                  pool.kv_cache.shape)]


def plan_pieces(src: list[tuple[object, int, int]], dst: Sequence[HeadShard]) -> list[tuple[int, int, int, int]]:
    """Cut the sender's device ranges at the receiver's: (receiver shard, sender entry, start, end) pieces
    covering every receiver shard. A range held by several sender devices (replicas) comes from the first."""
    pieces = []
    for j, shard in enumerate(dst):
        pos = shard.start
        while pos < shard.end:
            i = next((i for i, (_, a, b) in enumerate(src) if a <= pos < b), None)
            if i is None:
                raise TransferError(f"the sender holds no shard covering KV-head entry {pos}")
            end = min(shard.end, src[i][2])
            pieces.append((j, i, pos, end))
            pos = end
    return pieces


def offer_shards(server: TransferServer, pool, pages: Sequence[int], dst: Sequence[HeadShard], uuid: int,
                 addresses: Sequence[str]) -> tuple[list[ShardSource], list[jax.Array], int, int]:
    """Sender side of a per-shard transfer; every process of the sending instance calls it with the same
    arguments (a multi-process instance's leader broadcasts them): one gather of `pages` (as chunks), then
    this process offers, for each receiver process p, the pieces its own devices hold under uuid + p.
    `addresses[q]` is process q's transfer server. Returns (the sources of every sender process, the chunks,
    bytes this process offered, bytes of all pieces)."""
    chunks = gather_chunks(pool, list(pages))
    _maybe_fail("send")
    src = _device_head_ranges(chunks[0].sharding, chunks[0].shape)
    plan = plan_pieces(src, dst)
    me = jax.process_index()
    groups: dict[tuple[int, int], list[tuple[int, int, int, int]]] = {}
    for piece in plan:
        groups.setdefault((src[piece[1]][0].process_index, dst[piece[0]].process), []).append(piece)
    per_entry = int(np.prod(chunks[0].shape)) // chunks[0].shape[3] * chunks[0].dtype.itemsize
    sources, mine, total = [], 0, 0
    for (q, p), group in sorted(groups.items()):
        nbytes = sum(hi - lo for _, _, lo, hi in group) * per_entry * len(chunks)
        total += nbytes
        sources.append(ShardSource(p, addresses[q], uuid + p, tuple((j, lo, hi) for j, _, lo, hi in group)))
        if q != me:
            continue
        arrays = []
        for chunk in chunks:
            held = {s.device: s.data for s in chunk.addressable_shards}
            for _, i, lo, hi in group:
                device, a, b = src[i]
                x = held[device]
                arrays.append(x if (lo, hi) == (a, b) else x[:, :, :, lo - a:hi - a])
        server.offer(uuid + p, arrays)
        mine += nbytes
        log.info("KV offer: process %d offered %d bytes in %d pieces for receiver process %d (uuid %d)", me,
                 nbytes, len(arrays), p, uuid + p)
    return sources, chunks, mine, total


def shard_bytes(sources: Sequence[ShardSource], shape: Sequence[int], dtype: str, num_chunks: int) -> int:
    """Bytes a per-shard transfer moves (every piece of every chunk)."""
    per_entry = int(np.prod(shape)) // int(shape[3]) * jnp.dtype(dtype).itemsize
    return sum(hi - lo for s in sources for _, lo, hi in s.pieces) * per_entry * int(num_chunks)


def receive_shards(server: TransferServer, pool, sources: Sequence[ShardSource], shape: Sequence[int],
                   dtype: str, num_chunks: int, timeout: float | None) -> list[jax.Array]:
    """Receiver side of a per-shard transfer, on every process of the receiving instance: pulls the pieces
    destined for this process's devices (each straight onto its device), waits for them (TransferError on
    failure or after `timeout` s), concatenates each device's pieces and assembles the `num_chunks` chunks of
    `shape` as arrays in the pool's sharding (global arrays on a multi-process instance). Touches no pool
    state; write the result with `scatter_block`."""
    shape = tuple(int(d) for d in shape)
    target = pool_sharding(pool)
    layout = _device_head_ranges(target, pool.kv_cache.shape)
    me = jax.process_index()
    mine = [s for s in sources if s.receiver_process == me]
    # Check the pieces tile every device of this process before pulling anything.
    cover: dict[int, list[tuple[int, int]]] = {j: [] for j, (d, _, _) in enumerate(layout) if d.process_index == me}
    for s in mine:
        for j, lo, hi in s.pieces:
            if j not in cover:
                raise TransferError(f"piece for receiver shard {j}, which is not on process {me}")
            cover[j].append((lo, hi))
    for j, ranges in cover.items():
        pos = layout[j][1]
        for lo, hi in sorted(ranges):
            if lo != pos:
                break
            pos = hi
        if pos != layout[j][2] or sum(hi - lo for lo, hi in ranges) != layout[j][2] - layout[j][1]:
            raise TransferError(f"the pieces {sorted(ranges)} do not tile receiver shard {j} "
                                f"[{layout[j][1]}, {layout[j][2]})")
    pulled: list[tuple[ShardSource, list[jax.Array]]] = []
    for s in mine:  # every pull is issued before waiting for any: the sender processes serve in parallel
        specs = [jax.ShapeDtypeStruct(shape[:3] + (hi - lo,) + shape[4:], jnp.dtype(dtype),
                                      sharding=jax.sharding.SingleDeviceSharding(layout[j][0]))
                 for _ in range(num_chunks) for j, lo, hi in s.pieces]
        try:
            pulled.append((s, list(server.pull(s.address, int(s.uuid), specs, timeout=timeout))))
        except Exception as e:  # noqa: BLE001 - connection refused, bad id...: one error type for callers
            raise TransferError(f"pull from {s.address} failed: {type(e).__name__}: {e}") from e
    _wait_ready([x for _, xs in pulled for x in xs], timeout)
    _maybe_fail("receive")
    chunks = []
    for c in range(num_chunks):
        parts: dict[int, list[tuple[int, jax.Array]]] = {j: [] for j in cover}
        for s, arrays in pulled:
            n = len(s.pieces)
            for (j, lo, _), x in zip(s.pieces, arrays[c * n:(c + 1) * n]):
                parts[j].append((lo, x))
        local = []
        for j in sorted(parts):
            xs = [x for _, x in sorted(parts[j], key=lambda t: t[0])]
            local.append(xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=3))
        chunks.append(jax.make_array_from_single_device_arrays(shape, target, local))
    return chunks
