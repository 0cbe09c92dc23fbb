"""The receive side of every KV transfer (in process, across processes, PD prefill -> decode and the
PD-Caching-3 send-back): reservations keyed by transfer id, each moving through the state machine of
`state.py`.

    prepare   reference the page-aligned prefix this pool already holds, allocate pages for the rest  PREPARED
    begin     the block is on its way                                                                PULLING
    fill      write the arrived block into the reserved pages (one scatter)                          FILLED
    commit    index the whole pages (transfer_with_insert) and count the transfer                    COMMITTED
    take      hand the pages (one reference each) to the caller: the engine, or whoever frees them
    hand_over hand the pages to the engine (an admitted request) but keep the entry, with what waits for it,
              until `claim` (an instance's Decode call) takes it or its deadline passes
    cancel    free every page of a pending transfer, never indexed                                   FAILED | CANCELLED

This table is the one record of a transfer on its receiver, from prepare until its Decode call claims it.
Every method but `claim` touches the pool: call them on the thread that owns it (an instance's engine thread).
`claim` is called from an instance's event loop (a Decode call must not wait for an engine step), so the table
itself is guarded by one small lock, held only around its own reads and writes, never around pool work. The
pull itself (`CrossProcessTransport.fetch`) touches no pool state and may run elsewhere.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import threading
import time
from collections.abc import Callable, Sequence

from jaxserve.mempool.transfer.state import State, TransferError, TransferState


@dataclasses.dataclass
class Reservation:
    transfer_id: str
    request_id: str
    tokens: list[int]           # the context whose KV the sender holds (prompt + generated so far)
    prefix_pages: list[int]     # cached pages referenced here (not sent)
    new_pages: list[int]        # pages allocated for what is sent
    insert: bool                # index the whole pages once received (transfer_with_insert)
    deadline: float             # monotonic; past it, the reaper frees the pages
    state: TransferState = dataclasses.field(default_factory=TransferState)
    internal_id: str = ""       # the engine request, once admitted
    waiter: object = None       # once handed over: what the claim returns (an instance's sink)

    @property
    def start_page(self) -> int:
        return len(self.prefix_pages)

    @property
    def pages(self) -> list[int]:
        return self.prefix_pages + self.new_pages

    @property
    def committed(self) -> bool:
        return self.state.state is State.COMMITTED

    @property
    def handed_over(self) -> bool:
        """Committed and its pages given to the engine: only its claim is left."""
        return self.waiter is not None


class KvReceiver:
    """Reservations for incoming KV on one pool, keyed by transfer id."""

    _ids = itertools.count()

    def __init__(self, pool, instance_tag: str = ""):
        self.pool = pool
        self.tag = instance_tag or f"{os.getpid()}"
        self.pending: dict[str, Reservation] = {}
        self._lock = threading.Lock()  # guards `pending` only (see the module docstring)
        self.counters = dict(kv_received_tokens=0, kv_received_bytes=0, kv_transfers=0, kv_transfer_failures=0)

    def prepare(self, request_id: str, tokens: Sequence[int], page_size: int = 0, timeout_s: float = float("inf"),
                insert: bool | None = None, *, start_page: int | None = None,
                n_pages: int | None = None) -> Reservation:
        """References the page-aligned prefix of `tokens` this pool already holds (only with prefix caching)
        and allocates pages for the rest. MemoryError when the pool cannot hold it now.

        start_page / n_pages (the sender already asked what this pool holds, `cached_prefix_pages`): the pool
        must hold exactly the first `start_page` pages and `n_pages` more are allocated; TransferError when it
        holds fewer or has no room."""
        ps = self.pool.page_size
        if page_size and page_size != ps:
            raise ValueError(f"page size {page_size} differs from this instance's {ps}")
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise ValueError("no tokens to transfer")
        caching = self.pool.cache_cfg.enable_prefix_caching
        if start_page is not None:
            prefix, new = self._reserve_exact(tokens, start_page, n_pages)
        else:
            prefix, new = self._reserve(tokens, caching)
        tid = f"kv-{self.tag}-{next(self._ids)}"
        r = Reservation(tid, request_id, tokens, prefix, new, caching if insert is None else (insert and caching),
                        time.monotonic() + timeout_s, TransferState(tid))
        with self._lock:
            self.pending[tid] = r
        return r

    def _reserve(self, tokens: list[int], caching: bool) -> tuple[list[int], list[int]]:
        ps = self.pool.page_size
        n_pages = -(-len(tokens) // ps)
        prefix: list[int] = []
        start = min(self.pool.cached_prefix_pages(tokens), n_pages) if caching else 0
        if start:
            got, prefix = self.pool.match(tokens[:start * ps])
            if got < start * ps:  # host-tier pages that could not come back: send those too
                keep = got // ps
                self.pool.free(prefix[keep:])
                prefix = prefix[:keep]
        new = self.pool.alloc(n_pages - len(prefix)) if n_pages > len(prefix) else []
        if new is None:
            self.pool.free(prefix)
            raise MemoryError(f"decode pool cannot reserve {n_pages - len(prefix)} pages "
                              f"({self.pool.num_free_pages()} free, {self.pool.num_evictable_pages()} evictable)")
        return prefix, new

    def _reserve_exact(self, tokens: list[int], start_page: int, n_pages: int) -> tuple[list[int], list[int]]:
        ps = self.pool.page_size
        if not (start_page + n_pages - 1) * ps < len(tokens) <= (start_page + n_pages) * ps:
            raise ValueError(f"{len(tokens)} tokens do not fill pages {start_page}..{start_page + n_pages - 1}")
        prefix: list[int] = []
        if start_page:
            got, prefix = self.pool.match(tokens[:start_page * ps])
            if got < start_page * ps:
                self.pool.free(prefix)
                raise TransferError(f"receiver holds {got // ps} of the {start_page} pages the sender skipped")
        new = self.pool.alloc(n_pages)
        if new is None:
            self.pool.free(prefix)
            raise TransferError(f"receiver cannot allocate {n_pages} pages ({self.pool.num_free_pages()} free)")
        return prefix, new

    def get(self, transfer_id: str) -> Reservation:
        r = self.pending.get(transfer_id)
        if r is None:
            raise KeyError(f"no pending KV transfer {transfer_id!r} on this instance (expired, aborted or "
                           "never prepared)")
        return r

    def begin(self, transfer_id: str) -> Reservation:
        """The block is on its way (prepared -> pulling)."""
        r = self.get(transfer_id)
        r.state.to(State.PULLING)
        return r

    def fill(self, transfer_id: str, block, transport=None, write: Callable[[list[int]], None] | None = None
             ) -> Reservation:
        """Writes an arrived block into the reserved pages with `transport.write` (pulling -> filled).
        `write(pages)` instead of a block: writes the KV itself (a multi-process instance: every process pulls
        and scatters its own shards)."""
        r = self.get(transfer_id)
        if r.state.state is State.PREPARED:
            r.state.to(State.PULLING)
        if r.new_pages and write is not None:
            write(r.new_pages)
        elif r.new_pages:
            if block is None:
                raise TransferError(f"{len(r.new_pages)} pages expected but no block was sent")
            if transport is None:
                from jaxserve.mempool.transfer.ops import scatter_block
                scatter_block(self.pool, r.new_pages, block)
            else:
                transport.write(self.pool, r.new_pages, block)
        r.state.to(State.FILLED)
        return r

    def commit(self, transfer_id: str, nbytes: int = 0) -> Reservation:
        """Indexes a filled reservation (transfer_with_insert) and counts it (filled -> committed). It stays
        pending until `take`."""
        r = self.get(transfer_id)
        if r.state.state is State.COMMITTED:
            raise ValueError(f"KV transfer {transfer_id} was already committed")
        r.state.to(State.COMMITTED)
        if r.insert:
            self.pool.insert(r.tokens, r.pages)
        self.counters["kv_received_tokens"] += len(r.tokens) - r.start_page * self.pool.page_size
        self.counters["kv_received_bytes"] += nbytes
        self.counters["kv_transfers"] += 1
        return r

    def take(self, transfer_id: str) -> Reservation:
        """Hands a committed reservation's page references to the caller (the engine, via admission)."""
        r = self._committed(transfer_id)
        with self._lock:
            del self.pending[transfer_id]
        return r

    def _committed(self, transfer_id: str) -> Reservation:
        r = self.get(transfer_id)
        if not r.committed or r.handed_over:
            raise ValueError(f"KV transfer {transfer_id} is {r.state.state.value}"
                             f"{' and handed over' if r.handed_over else ''}, not committed")
        return r

    def hand_over(self, transfer_id: str, internal_id: str, waiter, timeout_s: float = float("inf")
                  ) -> Reservation:
        """A committed reservation's pages go to the engine request `internal_id`; the entry stays, holding
        `waiter`, until `claim` takes it or `timeout_s` passes (`expired`)."""
        r = self._committed(transfer_id)
        r.internal_id, r.waiter, r.deadline = internal_id, waiter, time.monotonic() + timeout_s
        return r

    def claim(self, transfer_id: str) -> Reservation | None:
        """Any thread: removes and returns a handed-over reservation (None if there is none: never committed,
        aborted, expired or claimed already)."""
        with self._lock:
            r = self.pending.get(transfer_id)
            if r is None or not r.handed_over:
                return None
            del self.pending[transfer_id]
        return r

    def cancel(self, transfer_id: str, failed: bool = True) -> bool:
        """Frees a pending reservation's pages (never indexed unless it was committed; a handed-over one's
        pages are the engine's: only the entry goes). True if it existed."""
        with self._lock:
            r = self.pending.pop(transfer_id, None)
        if r is None:
            return False
        if not r.state.terminal:
            r.state.to(State.FAILED if failed else State.CANCELLED)
        if not r.handed_over:
            self.pool.free(r.pages)
        if failed:
            self.counters["kv_transfer_failures"] += 1
        return True

    def cancel_request(self, request_id: str) -> bool:
        """Cancels every reservation of `request_id` (a handed-over one is dropped without counting a failure:
        its request is aborted in the engine by whoever asks)."""
        with self._lock:
            found = [r for r in self.pending.values() if r.request_id == request_id]
        for r in found:
            self.cancel(r.transfer_id, failed=not r.handed_over)
        return bool(found)

    def expired(self, now: float | None = None) -> list[Reservation]:
        now = time.monotonic() if now is None else now
        with self._lock:
            return [r for r in self.pending.values() if r.deadline < now]

    def held_pages(self) -> int:
        """Pages the reservations hold (not those handed over to the engine)."""
        with self._lock:
            return sum(len(r.pages) for r in self.pending.values() if not r.handed_over)
