"""A pool in another process, for the transfer benchmark (jaxserve/launch/bench_disagg.py) and tests: `KvPeerServer`
serves one MemPool to `KvPeer` clients with the serving code's receive path (`transfer.KvReceiver` +
`CrossProcessTransport`); a tiny control channel (newline-delimited JSON over loopback TCP, never pickle)
stands in for the instance gRPC API. Not used for serving."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import threading
from collections.abc import Callable, Sequence

from jaxserve.mempool.transfer import (BlockOffer, CrossProcessTransport, KvReceiver, ShardSource, TransferError,
                                       num_head_shards)


def _offer_from(msg: dict) -> BlockOffer:
    o = dict(msg["offer"])
    o["shape"] = tuple(o["shape"])
    o["sources"] = [ShardSource(s["receiver_process"], s["address"], s["uuid"], tuple(tuple(x) for x in s["pieces"]))
                    for s in o["sources"]]
    return BlockOffer(**o)


class KvPeerServer:
    """Receive side: pages it allocates for a request are held under the request id until `release`."""

    def __init__(self, pool, transport: CrossProcessTransport):
        self.pool = pool
        self.transport = transport
        self.receiver = KvReceiver(pool)
        self.held: dict[str, list[int]] = {}
        self.handlers: dict[str, Callable[[dict], dict]] = dict(
            hello=self._hello, lookup=self._lookup, alloc=self._alloc, release=self._release, receive=self._receive)
        self._lock = threading.Lock()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)

    @property
    def port(self) -> int:
        return self.listener.getsockname()[1]

    def handle(self, msg: dict) -> dict:
        fn = self.handlers.get(msg.get("op"))
        if fn is None:
            return dict(ok=False, error=f"unknown op {msg.get('op')!r}")
        try:
            with self._lock:
                return dict(ok=True, **fn(msg))
        except Exception as e:  # surfaced to the peer; local state was cleaned up by the handler
            return dict(ok=False, error=f"{type(e).__name__}: {e}")

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
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
                    reply = self.handle(json.loads(line))
                except ValueError as e:
                    reply = dict(ok=False, error=f"bad control message: {e}")
                conn.sendall(json.dumps(reply, separators=(",", ":")).encode() + b"\n")

    def _hello(self, msg):
        return dict(page_shape=list(self.pool.page_shape), dtype=str(self.pool.dtype),
                    tp=num_head_shards(self.pool.kv_cache))

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

    def _receive(self, msg):
        offer, rid, timeout = _offer_from(msg), msg.get("request_id", ""), msg.get("timeout")
        pulled = False
        try:
            if "tokens" in msg:
                r = self.receiver.prepare(rid, msg["tokens"], start_page=int(msg.get("start_page", 0)),
                                          n_pages=int(msg["n_pages"]), insert=True)
                try:
                    self.receiver.begin(r.transfer_id)
                    pulled = True
                    self.receiver.fill(r.transfer_id, self.transport.fetch(self.pool, offer, timeout), self.transport)
                    self.receiver.commit(r.transfer_id, offer.nbytes)
                except BaseException:
                    self.receiver.cancel(r.transfer_id)
                    raise
                pages = self.receiver.take(r.transfer_id).pages
                self.held.setdefault(rid, []).extend(pages)
                return dict(pages=pages)
            pages = [int(p) for p in msg["dst_pages"]]
            if len(pages) != int(msg["n_pages"]):
                raise ValueError(f"{msg['n_pages']} pages sent but {len(pages)} destination pages named")
            pulled = True
            self.transport.write(self.pool, pages, self.transport.fetch(self.pool, offer, timeout))
            return dict(pages=pages)
        except Exception:
            if not pulled:  # failed before pulling: drain the block so the sender's server lets go of it
                with contextlib.suppress(Exception):
                    for x in self.transport.fetch(self.pool, offer, timeout):
                        x.delete()
            raise


class KvPeer:
    """Sender side: a handle on a `KvPeerServer` in another process."""

    def __init__(self, port: int, transport: CrossProcessTransport, *, timeout: float = 30.0):
        self.transport = transport
        self.timeout = timeout
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
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
                self._sock.sendall(json.dumps(msg, separators=(",", ":")).encode() + b"\n")
                line = self._reader.readline()
                if not line:
                    raise OSError("control connection closed by peer")
                reply = json.loads(line)
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
        """One gather of `src_pages` parked on the transfer server; the peer pulls it. With `tokens` the peer
        reserves, receives and indexes (transfer_with_insert) and returns all pages holding `tokens`; else it
        writes into `dst_pages`."""
        if tuple(src.page_shape) != self.page_shape:
            raise ValueError(f"page shapes differ: {src.page_shape} vs remote {self.page_shape}")
        offer = dataclasses.asdict(self.transport.offer(src, [int(p) for p in src_pages]))
        msg = dict(op="receive", request_id=request_id, offer=offer, n_pages=len(src_pages),
                   timeout=timeout or self.timeout)
        if tokens is not None:
            msg.update(tokens=[int(t) for t in tokens], start_page=int(start_page))
        else:
            msg.update(dst_pages=[int(p) for p in dst_pages])
        return self.call(msg, timeout=(timeout or self.timeout) + 5.0)["pages"]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()
