"""The sender's store of parked KV blocks for the byte-stream backend: host bytes under random uuids, each
served once, with an expiry and a bound on the bytes held. No grpc here (mempool layer): the instance's
FetchKv RPC takes a block with `take` and streams the pieces of `pieces`."""

from __future__ import annotations

import dataclasses
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from jaxserve.mempool.transfer.state import TransferError


@dataclasses.dataclass
class Parked:
    arrays: list[np.ndarray]    # the block's chunks, on the host, C-contiguous
    nbytes: int
    expires: float              # monotonic


class ParkedOffers:
    """uuid -> parked block. Thread-safe: offers are parked on the engine thread, taken on the event loop."""

    def __init__(self, ttl_s: float = 60.0, max_bytes: int = 8 << 30, clock: Callable[[], float] = time.monotonic):
        """ttl_s: an offer nobody fetched within this is dropped (the receiver gave up or died); max_bytes: the
        most host memory parked offers may hold (a new offer past it fails with TransferError: the transfer
        falls back, rather than the sender's host running out of memory)."""
        self.ttl_s, self.max_bytes, self.clock = ttl_s, max_bytes, clock
        self._parked: dict[int, Parked] = {}
        self._lock = threading.Lock()
        self.counters = dict(parked=0, fetched=0, expired=0)

    def park(self, arrays: Sequence[np.ndarray]) -> int:
        """Parks a block's host chunks; returns its uuid. 62 random bits: the FetchKv caller also needs the cluster
        secret, but the uuid alone should not be guessable either (defence in depth, as the jax backend's)."""
        arrays = [np.ascontiguousarray(a) for a in arrays]
        nbytes = sum(int(a.nbytes) for a in arrays)
        with self._lock:
            self._reap_locked()
            held = sum(p.nbytes for p in self._parked.values())
            if held + nbytes > self.max_bytes:
                raise TransferError(f"cannot park {nbytes} bytes of KV: {held} of {self.max_bytes} are held by "
                                    "offers not yet fetched")
            uuid = secrets.randbits(62)
            while uuid in self._parked:
                uuid = secrets.randbits(62)
            self._parked[uuid] = Parked(arrays, nbytes, self.clock() + self.ttl_s)
            self.counters["parked"] += 1
        return uuid

    def take(self, uuid: int) -> Parked | None:
        """Removes and returns a parked block (None: unknown, already fetched or expired). One fetch per offer:
        a failed stream is not resumed, the receiver falls back instead."""
        with self._lock:
            self._reap_locked()
            p = self._parked.pop(int(uuid), None)
            if p is not None:
                self.counters["fetched"] += 1
            return p

    def reap(self) -> int:
        with self._lock:
            return self._reap_locked()

    def _reap_locked(self) -> int:
        now = self.clock()
        gone = [u for u, p in self._parked.items() if p.expires < now]
        for u in gone:
            del self._parked[u]
        self.counters["expired"] += len(gone)
        return len(gone)

    def __len__(self) -> int:
        with self._lock:
            return len(self._parked)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(p.nbytes for p in self._parked.values())


def pieces(parked: Parked, size: int) -> Iterator[bytes]:
    """The block's bytes in order (chunk after chunk, each in C order), in pieces of at most `size` bytes."""
    for a in parked.arrays:
        flat = a.reshape(-1).view(np.uint8)
        for start in range(0, flat.size, size):
            yield flat[start:start + size].tobytes()
