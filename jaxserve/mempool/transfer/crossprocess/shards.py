"""Cross-process backend, per shard: when either side is a multi-process instance, no single process holds (or
may gather) the whole block. Each sender process offers only slices of its own devices' shards, each receiver
process pulls only what its own devices hold, and the block is reassembled on the receiver's devices without a
copy. A layout is the list of a pool's devices with their range on the KV-head axis (axis 3 of [layers, pages,
page_size, 2*Hkv, D]); the sender cuts its shards at the receiver's boundaries into pieces, one single-device
array per piece (the transfer server then needs no matching shard layout on both sides)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.mempool.transfer.crossprocess.server import TransferServer, wait_ready
from jaxserve.mempool.transfer.ops import OpCounts, gather_chunks, pool_sharding
from jaxserve.mempool.transfer.state import TransferError

log = logging.getLogger("jaxserve.transfer")


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
                 addresses: Sequence[str], *, counts: OpCounts | None = None) -> tuple[list[ShardSource], list[jax.Array], int, int]:
    """Sender side of a per-shard transfer; every process of the sending instance calls it with the same
    arguments (a multi-process instance's leader broadcasts them): one gather of `pages` (as chunks), then
    this process offers, for each receiver process p, the pieces its own devices hold under uuid + p.
    `addresses[q]` is process q's transfer server. Returns (the sources of every sender process, the chunks,
    bytes this process offered, bytes of all pieces)."""
    chunks = gather_chunks(pool, list(pages), counts)
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
                   dtype: str, num_chunks: int, timeout: float | None, *,
                   counts: OpCounts | None = None) -> list[jax.Array]:
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
            pulled.append((s, list(server.pull(s.address, int(s.uuid), specs, timeout=timeout, counts=counts))))
        except Exception as e:  # noqa: BLE001 - connection refused, bad id...: one error type for callers
            raise TransferError(f"pull from {s.address} failed: {type(e).__name__}: {e}") from e
    wait_ready([x for _, xs in pulled for x in xs], timeout)
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
