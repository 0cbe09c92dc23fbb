"""Cross-process backend, whole block: the sender gathers the pages (as chunks) and parks them on its transfer
server; the receiver pulls them into a staging layout with the sender's number of head shards (the transfer
server moves only arrays whose shard layout matches on both sides) and reshards locally with `device_put`,
or straight into the pool's sharding when the layouts already match."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxserve.mempool.transfer.crossprocess.server import TransferServer, pull_checked
from jaxserve.mempool.transfer.ops import OpCounts, _count, gather_chunks, pool_sharding, sharding_head_shards
from jaxserve.mempool.transfer.state import TransferError


def offer_block(server: TransferServer, pool, pages: Sequence[int],
                counts: OpCounts | None = None) -> tuple[int, list[jax.Array]]:
    """Sender side, any control plane (the instance gRPC API uses this): one gather of `pages` for all layers
    (as chunks, see `gather_chunks`), parked on `server` until a peer pulls it. Returns (uuid, chunks); send
    uuid, each chunk's shape and dtype and `num_head_shards(chunk)` to the receiver. The caller must own
    `pool.kv_cache` (its engine thread)."""
    chunks = gather_chunks(pool, list(pages), counts)
    uuid = server.next_uuid()
    server.offer(uuid, chunks)
    return uuid, chunks


def pull_block(server: TransferServer, pool, address: str, uuid: int, shape: Sequence[int], dtype: str,
               src_shards: int, timeout: float | None, *, chunks: int = 0, counts: OpCounts | None = None):
    """Receiver side: pulls a block offered by `offer_block` on the peer at `address` into a staging layout
    with the sender's number of head shards, waits for it (TransferError on failure or after `timeout`
    seconds) and reshards it to the pool's sharding. Touches no pool state (safe off the engine thread);
    write it with `scatter_block` on the thread that owns the pool. chunks > 0: the sender offered that many
    arrays of `shape` (`offer_block`); returns them as a list (else one array)."""
    src_shards = max(int(src_shards), 1)
    target = pool_sharding(pool)
    n = max(int(chunks), 1)
    shape = tuple(int(d) for d in shape)
    if sharding_head_shards(target) == src_shards:
        # Same shard layout on both sides: pull straight into the pool's sharding, no staging reshard.
        got = pull_checked(server, address, uuid, [jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=target)]
                            * n, timeout, counts)
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
    got = pull_checked(server, address, uuid, [spec] * n, timeout, counts)
    _count(counts, "device_put")
    got = jax.device_put(got, target)
    return got if chunks else got[0]
