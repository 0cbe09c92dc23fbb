"""KV transfer between MemPools (MemServe §3, transfer API): one receiver, one state machine, two backends.

    state.py        TransferError, the transfer state machine (prepared -> pulling -> filled -> committed |
                    failed | cancelled)
    ops.py          array operations: gather (block or chunks), donated scatter, page buckets, OpCounts
    base.py         Transport: offer (sender) / fetch / write (receiver)
    receiver.py     KvReceiver: reservations and their states, the one receive path
    inprocess.py    InProcessTransport: device_put across meshes (resharding included)
    crossprocess/   CrossProcessTransport: jax.experimental.transfer, whole block (block.py) or per-shard
                    pieces (shards.py), on this process's TransferServer (server.py)
    grpc_stream/    GrpcStreamTransport: the block as raw bytes over a caller-provided fetch (the instance's
                    mTLS gRPC link, FetchKv); its sender's ParkedOffers (parked.py)

A request's KV moves as one block of its pages for all layers: one gather, one move, one scatter, whatever
the number of layers. Failure: a transfer that fails or times out raises TransferError; the receiver frees
every page it reserved, and a block is indexed only after it has fully arrived.

The names below are the package's public surface (`jaxserve.engine.multihost` imports `HeadShard`,
`ShardSource`, `offer_shards`, `receive_shards`, `scatter_block` and `TransferError` from here).
"""

from jaxserve.mempool.transfer.base import Transport
from jaxserve.mempool.transfer.crossprocess import BlockOffer, CrossProcessTransport
from jaxserve.mempool.transfer.crossprocess.block import offer_block, pull_block
from jaxserve.mempool.transfer.crossprocess.server import TransferServer
from jaxserve.mempool.transfer.crossprocess.shards import (HeadShard, ShardSource, offer_shards, plan_pieces,
                                                           pool_layout, receive_shards, shard_bytes)
from jaxserve.mempool.transfer.grpc_stream import GrpcStreamTransport, ParkedOffers, StreamOffer
from jaxserve.mempool.transfer.inprocess import InProcessTransport
from jaxserve.mempool.transfer.ops import (OpCounts, chunk_pages, gather_block, gather_chunks, num_head_shards,
                                           padded_index, pool_sharding, scatter_block)
from jaxserve.mempool.transfer.receiver import KvReceiver, Reservation
from jaxserve.mempool.transfer.state import IllegalTransition, State, TransferError, TransferState

__all__ = ["BlockOffer", "CrossProcessTransport", "GrpcStreamTransport", "HeadShard", "IllegalTransition",
           "InProcessTransport", "KvReceiver", "OpCounts", "ParkedOffers", "Reservation", "ShardSource", "State",
           "StreamOffer", "TransferError", "TransferServer", "TransferState", "Transport", "chunk_pages",
           "gather_block", "gather_chunks", "num_head_shards", "offer_block", "offer_shards", "padded_index",
           "plan_pieces", "pool_layout", "pool_sharding", "pull_block", "receive_shards", "scatter_block",
           "shard_bytes"]
