"""What every transport (backend) of the KV path provides. A transfer is, whatever the backend:

    sender    offer(pool, pages)        one gather of the pages for all layers, made available to the receiver
    receiver  fetch(pool, offer)        the block, moved onto the receiving pool's devices and sharding (touches
                                        no pool state: may run off the pool's thread)
    receiver  write(pool, pages, block) one donated in-place scatter into the reserved pages

with `KvReceiver` (receiver.py) keeping the transfer's state around fetch and write. A transport owns the
`OpCounts` of the array operations it issues. Tests inject faults by passing a transport whose methods raise
(a wrapper), never through switches in this package.
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxserve.mempool.transfer.ops import OpCounts, scatter_block


class Transport:
    """Base of the in-process and cross-process backends."""

    def __init__(self, counts: OpCounts | None = None):
        self.counts = counts if counts is not None else OpCounts()

    def offer(self, pool, pages: Sequence[int], *args, **kwargs):
        raise NotImplementedError

    def fetch(self, pool, offer, *args, **kwargs):
        raise NotImplementedError

    def write(self, pool, pages: Sequence[int], block) -> None:
        scatter_block(pool, pages, block, self.counts)
