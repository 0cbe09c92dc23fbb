"""KV transfer between serving instances in different processes, its control carried by the Instance gRPC API.

The KV itself moves with `jax.experimental.transfer` (`jaxserve.mempool.transfer`: `offer_block` on the
sender, `pull_block` + `scatter_block` on the receiver); only protobuf control messages cross gRPC:

    prefill P                                         decode D
    Prefill(request, decode_target=D)
      engine: prompt with prefill_only -> first token, pages held
      PrepareKvTransfer(tokens) ------------------->  engine thread: `KvReceiver.prepare`: reference the
                                                      cached prefix (caching2/3), allocate the rest
                                <-------------------  transfer_id, cached_tokens, pages reserved
      engine thread: `offer_block(pages[start:])`
      CommitKvTransfer(uuid, shape, request) ------>  worker thread: `pull_block` (deadline)
                                                      engine thread: `KvReceiver.commit`: scatter, insert
                                                      (transfer_with_insert), admit (add_prefilled_request)
                                <-------------------  received tokens / bytes
      engine: release pages (caching1+: the index keeps the full ones)
    PrefillResponse(first token, kv_handle=transfer_id)
    Decode(kv_handle) streams the rest from D.

When either instance has several processes, the offer and the pull go per shard (PrepareKvTransfer answers
the receiver's layout, `receiver_shards`; CommitKvTransfer names one `KvSource` per sender x receiver process):
a multi-process sender's processes all gather and offer their own shards, a multi-process receiver's processes
all pull their own devices' pieces and scatter together, both as ops its leader sends in order with the steps
(jaxserve/engine/multihost.py). A multi-process receiver pulls on its engine thread, so its steps wait for
the pull.

Failure: every pending transfer on the decode side has a deadline; the reaper frees a reservation that was
never committed (the prefill side died) and aborts a committed request that no Decode call claimed. A pull that
fails or times out frees the reservation; a half-received block is never scattered nor indexed. The prefill
side always releases its pages, whatever happened.

`KvReceiver` methods other than the constructor run on the engine thread (they touch the pool)."""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from typing import Sequence

from jaxserve.mempool.transfer import TransferError, scatter_block

# Test hook (environment of a decode process): "exit_before_commit" makes the process exit abruptly when a
# CommitKvTransfer arrives, as a crash between prepare and commit would; "exit_before_commit@PATH" does so only
# once the file PATH exists (a test arms it after the requests that must succeed).
FAULT_ENV = "JAXSERVE_KV_FAULT"


def fault(name: str) -> bool:
    value = os.environ.get(FAULT_ENV, "")
    if not value:
        return False
    what, _, path = value.partition("@")
    return what == name and (not path or os.path.exists(path))


@dataclasses.dataclass
class Reservation:
    transfer_id: str
    request_id: str
    tokens: list[int]           # the context whose KV the sender holds (prompt + generated so far)
    prefix_pages: list[int]     # cached pages referenced here (not sent)
    new_pages: list[int]        # pages allocated for what is sent
    insert: bool                # index the whole pages once received (transfer_with_insert)
    deadline: float             # monotonic; past it, the reaper frees the pages
    committed: bool = False     # KV in place (admitted, or waiting for Decode to admit it)
    internal_id: str = ""       # the engine request, once admitted

    @property
    def start_page(self) -> int:
        return len(self.prefix_pages)

    @property
    def pages(self) -> list[int]:
        return self.prefix_pages + self.new_pages


class KvReceiver:
    """Decode side: reservations for incoming KV, keyed by transfer id."""

    _ids = itertools.count()

    def __init__(self, pool, instance_tag: str = ""):
        self.pool = pool
        self.tag = instance_tag or f"{os.getpid()}"
        self.pending: dict[str, Reservation] = {}
        self.counters = dict(kv_received_tokens=0, kv_received_bytes=0, kv_transfers=0, kv_transfer_failures=0)

    # ------------------------------------------------------------------------------ engine thread
    def prepare(self, request_id: str, tokens: Sequence[int], page_size: int, timeout_s: float,
                insert: bool | None = None) -> Reservation:
        """References the page-aligned prefix of `tokens` this pool already holds (only with prefix caching) and
        allocates pages for the rest. MemoryError when the pool cannot hold it now."""
        ps = self.pool.page_size
        if page_size and page_size != ps:
            raise ValueError(f"page size {page_size} differs from this instance's {ps}")
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise ValueError("no tokens to transfer")
        n_pages = -(-len(tokens) // ps)
        caching = self.pool.cache_cfg.enable_prefix_caching
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
        tid = f"kv-{self.tag}-{next(self._ids)}"
        r = Reservation(tid, request_id, tokens, prefix, new, caching if insert is None else (insert and caching),
                        time.monotonic() + timeout_s)
        self.pending[tid] = r
        return r

    def get(self, transfer_id: str) -> Reservation:
        r = self.pending.get(transfer_id)
        if r is None:
            raise KeyError(f"no pending KV transfer {transfer_id!r} on this instance (expired, aborted or "
                           "never prepared)")
        return r

    def fill(self, transfer_id: str, block, nbytes: int, write=None) -> Reservation:
        """Writes a pulled block into the reserved pages and indexes them (transfer_with_insert). The
        reservation stays pending (now committed) until `take`. `write(pages)` instead of a block: writes the
        KV itself (a multi-process instance: every process pulls and scatters its own shards)."""
        r = self.get(transfer_id)
        if r.committed:
            raise ValueError(f"KV transfer {transfer_id} was already committed")
        if r.new_pages and write is not None:
            write(r.new_pages)
        elif r.new_pages:
            if block is None:
                raise TransferError(f"{len(r.new_pages)} pages expected but no block was sent")
            scatter_block(self.pool, r.new_pages, block)
        if r.insert:
            self.pool.insert(r.tokens, r.pages)
        r.committed = True
        self.counters["kv_received_tokens"] += len(r.tokens) - r.start_page * self.pool.page_size
        self.counters["kv_received_bytes"] += nbytes
        self.counters["kv_transfers"] += 1
        return r

    def take(self, transfer_id: str) -> Reservation:
        """Hands a committed reservation's page references to the caller (the engine, via admission)."""
        r = self.get(transfer_id)
        del self.pending[transfer_id]
        return r

    def cancel(self, transfer_id: str, failed: bool = True) -> bool:
        """Frees a pending reservation's pages (never indexed unless it was committed). True if it existed."""
        r = self.pending.pop(transfer_id, None)
        if r is None:
            return False
        self.pool.free(r.pages)
        if failed:
            self.counters["kv_transfer_failures"] += 1
        return True

    def cancel_request(self, request_id: str) -> bool:
        ids = [t for t, r in self.pending.items() if r.request_id == request_id]
        for t in ids:
            self.cancel(t)
        return bool(ids)

    def expired(self, now: float | None = None) -> list[Reservation]:
        now = time.monotonic() if now is None else now
        return [r for r in self.pending.values() if r.deadline < now]

    def held_pages(self) -> int:
        return sum(len(r.pages) for r in self.pending.values())
