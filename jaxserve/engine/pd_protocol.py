"""The PD protocol, once, for every disaggregated deployment: the in-process `DisaggregatedPair`
(engine/disagg.py) and the gRPC instances (instance/pd_prefill.py, pd_send_back.py) run these steps; they
differ only in the peer (a `KvReceiver` in this process, or PrepareKvTransfer / CommitKvTransfer / Abort
over gRPC) and in how the sender's pages are offered (`InProcessTransport`, `CrossProcessTransport`).

    sender                                    receiver (peer)
    prepare(tokens) ------------------------> reference the cached prefix, reserve the rest  (PREPARED)
    offer the pages from start on
    commit(prepared, start, offer) ---------> pull, write, index, then admit (PD) or let go (send-back)
    on any failure after prepare: abort ----> free the reservation (best effort; it also has a deadline)

PD-Caching-3's send-back is the same exchange in the other direction (decode -> prefill, cache_only).
The steps are written as coroutines; an in-process peer never suspends, and `run_sync` drives them there.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

PD_MODES = ("basic", "caching1", "caching2", "caching3")


def mode_caching(mode: str) -> tuple[bool, bool]:
    """(prefill side caches, decode side caches) for a PD mode (MemServe: the prefill side from caching1 on,
    the decode side from caching2 on)."""
    if mode not in PD_MODES:
        raise ValueError(f"pd_mode must be one of {PD_MODES}, got {mode!r}")
    return mode != "basic", mode in ("caching2", "caching3")


class ProtocolError(RuntimeError):
    """The peer answered something inconsistent (a prefix that is not page aligned or longer than the
    context)."""


@dataclasses.dataclass
class Prepared:
    """The receiver's answer to prepare: its transfer id, the page-aligned prefix it already holds (not sent),
    and whatever the transport needs to know about it (the gRPC answer: its KV layout)."""
    transfer_id: str
    cached_tokens: int
    answer: Any = None


class Peer(Protocol):
    name: str

    async def prepare(self, request_id: str, tokens: Sequence[int], page_size: int) -> Prepared: ...

    async def commit(self, prepared: Prepared, start_page: int, offer: Any) -> int: ...

    async def abort(self, request_id: str) -> None: ...


@dataclasses.dataclass
class Sent:
    prepared: Prepared
    start_page: int     # pages the receiver already held (not sent)
    offer: Any          # what the sender offered (None: nothing was missing)
    received: int       # tokens whose KV the receiver got


async def send_kv(peer: Peer, request_id: str, tokens: Sequence[int], page_size: int,
                  offer_pages: Callable[[int, Prepared], Awaitable[Any]]) -> Sent:
    """The sender's side of one transfer of `tokens`' KV: prepare on the peer, `offer_pages(start_page,
    prepared)` (the sender's pages from start_page on), commit. Any failure after prepare aborts the peer's
    reservation (best effort) and re-raises."""
    n_pages = -(-len(tokens) // page_size)
    prepared = await peer.prepare(request_id, tokens, page_size)
    start = prepared.cached_tokens // page_size
    try:
        if prepared.cached_tokens % page_size or start > n_pages:
            raise ProtocolError(f"{peer.name} holds {prepared.cached_tokens} tokens of a {len(tokens)}-token "
                                f"context with pages of {page_size}")
        offer = await offer_pages(start, prepared) if start < n_pages else None
        received = await peer.commit(prepared, start, offer)
    except BaseException:
        with contextlib.suppress(Exception):
            await peer.abort(request_id)
        raise
    return Sent(prepared, start, offer, received)


def run_sync(coro):
    """Runs a coroutine whose awaits never suspend (the in-process peers) to its end."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("an in-process PD step tried to suspend")


class LocalPeer:
    """A receiving pool in this process, behind the same steps as a gRPC instance: a `KvReceiver` on it and the
    transport that moves the offered block there. `on_commit(reservation)` takes the committed reservation's
    pages (admit the request, or free them after a cache-only send-back)."""

    def __init__(self, name: str, receiver, transport, on_commit: Callable[[Any], None]):
        self.name = name
        self.receiver = receiver
        self.transport = transport
        self.on_commit = on_commit

    async def prepare(self, request_id: str, tokens: Sequence[int], page_size: int) -> Prepared:
        r = self.receiver.prepare(request_id, tokens, page_size)
        return Prepared(r.transfer_id, r.start_page * self.receiver.pool.page_size, r)

    async def commit(self, prepared: Prepared, start_page: int, offer: Any) -> int:
        tid = prepared.transfer_id
        self.receiver.begin(tid)
        block = self.transport.fetch(self.receiver.pool, offer) if offer is not None else None
        self.receiver.fill(tid, block, self.transport)
        r = self.receiver.commit(tid)
        self.on_commit(self.receiver.take(tid))
        return len(r.tokens) - start_page * self.receiver.pool.page_size

    async def abort(self, request_id: str) -> None:
        self.receiver.cancel_request(request_id)
