"""Cross-process backend: `jax.experimental.transfer` between processes (whole block, `block.py`, or per-shard
pieces for multi-process instances, `shards.py`); a control plane (the instance gRPC API) carries only the
`BlockOffer` description, never the KV."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax

from jaxserve.mempool.transfer.base import Transport
from jaxserve.mempool.transfer.crossprocess.block import offer_block, pull_block
from jaxserve.mempool.transfer.crossprocess.server import TransferServer
from jaxserve.mempool.transfer.crossprocess.shards import HeadShard, ShardSource, offer_shards, receive_shards
from jaxserve.mempool.transfer.ops import num_head_shards


@dataclasses.dataclass
class BlockOffer:
    """What a sender offered, as the receiver needs it: every chunk's shape and dtype and the sender's number of
    head shards; one (address, uuid) for a whole block, or one `ShardSource` per sender x receiver process."""
    address: str
    uuid: int = 0
    shape: tuple[int, ...] = ()
    dtype: str = ""
    num_shards: int = 1
    num_chunks: int = 0
    sources: list[ShardSource] = dataclasses.field(default_factory=list)
    nbytes: int = 0


class CrossProcessTransport(Transport):
    """This process's side of cross-process transfers: its transfer server, and every process's server address
    (a multi-process instance's, by process index)."""

    def __init__(self, server: TransferServer, addresses: Sequence[str] | None = None, counts=None):
        super().__init__(counts)
        self.server = server
        self.addresses = list(addresses) if addresses else [server.address]

    @staticmethod
    def describe(chunks: list[jax.Array], address: str, uuid: int = 0, sources=(), nbytes: int | None = None
                 ) -> BlockOffer:
        x = chunks[0]
        return BlockOffer(address, uuid, tuple(int(d) for d in x.shape), str(x.dtype), num_head_shards(x),
                          len(chunks), list(sources), sum(int(c.nbytes) for c in chunks) if nbytes is None else nbytes)

    def offer(self, pool, pages: Sequence[int], layout: Sequence[HeadShard] | None = None) -> BlockOffer:
        """Sender (single-process pool): gather `pages` and park them, as one block, or per shard for the
        receiver's `layout`."""
        if layout is None:
            uuid, chunks = offer_block(self.server, pool, pages, self.counts)
            return self.describe(chunks, self.server.address, uuid)
        uuid = self.server.reserve_uuids(max(x.process for x in layout) + 1)
        sources, chunks, _, total = offer_shards(self.server, pool, pages, layout, uuid, self.addresses,
                                                 counts=self.counts)
        return self.describe(chunks, self.server.address, sources=sources, nbytes=total)

    def fetch(self, pool, offer: BlockOffer, timeout: float | None = None) -> list[jax.Array]:
        """Receiver: pull the offered chunks onto this pool's devices, in its sharding (TransferError on failure
        or after `timeout` seconds). Touches no pool state."""
        if offer.sources:
            return receive_shards(self.server, pool, offer.sources, offer.shape, offer.dtype, offer.num_chunks,
                                  timeout, counts=self.counts)
        return pull_block(self.server, pool, offer.address, offer.uuid, offer.shape, offer.dtype, offer.num_shards,
                          timeout, chunks=offer.num_chunks, counts=self.counts)
