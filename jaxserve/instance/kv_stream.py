"""The RPC glue of the byte-stream KV backend (`jaxserve.mempool.transfer.grpc_stream`, kv_transport "grpc"):
the sender's FetchKv handler, which streams a parked block in pieces, and the receiver's `fetch_bytes` seam,
which calls FetchKv on the sender over the instance's peer channel (the cluster secret on every call, mTLS
when configured: the KV is as protected as the prompts). The mempool layer imports no grpc, so this lives here.

Pieces are PIECE_BYTES: under gRPC's default 4 MiB message limit (a piece plus its framing must fit the
receiver's limit) and large enough that per-message costs stay small (see docs/drafts/kv-transport-grpc.md)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging

import grpc
import numpy as np

from jaxserve.mempool.transfer import ParkedOffers, StreamOffer, TransferError
from jaxserve.mempool.transfer.grpc_stream import host_buffer, pieces
from jaxserve.proto.v1 import instance_pb2

log = logging.getLogger("jaxserve.instance")

PIECE_BYTES = 2 << 20


async def serve_fetch_kv(parked: ParkedOffers | None, request: instance_pb2.FetchKvRequest, context, me: str):
    """FetchKv: stream the block parked under request.pull_uuid (taken: served once) or end NOT_FOUND."""
    p = parked.take(request.pull_uuid) if parked is not None else None
    if p is None:
        await context.abort(grpc.StatusCode.NOT_FOUND, f"{me}: no KV offer {request.pull_uuid} (never made, "
                                                       "already fetched or expired)")
    for data in pieces(p, PIECE_BYTES):
        yield instance_pb2.KvChunk(data=data)


class StreamFetch:
    """The receiver's `fetch_bytes` seam: called on a pull worker thread, it runs FetchKv on the instance's event
    loop (where its channels live) and waits for the whole block."""

    def __init__(self, peer, loop: asyncio.AbstractEventLoop):
        """peer(address) -> an InstanceStub on the cached channel to that address (`KvPath.peer`)."""
        self.peer, self.loop = peer, loop

    def __call__(self, offer: StreamOffer, timeout: float | None) -> np.ndarray:
        future = asyncio.run_coroutine_threadsafe(self.fetch(offer, timeout), self.loop)
        try:
            # The RPC's deadline ends the call; the margin covers a loop too busy (or stopped) to say so.
            return future.result(None if timeout is None else timeout + 5.0)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TransferError(f"FetchKv from {offer.address} did not finish within {timeout:.1f}s") from None

    async def fetch(self, offer: StreamOffer, timeout: float | None) -> np.ndarray:
        want = offer.nbytes
        buf = host_buffer(want)  # aligned: on CPU the device_put that follows aliases it, no second copy
        pos = 0
        try:
            call = self.peer(offer.address).FetchKv(instance_pb2.FetchKvRequest(pull_uuid=offer.uuid),
                                                    timeout=timeout)
            async for chunk in call:
                n = len(chunk.data)
                if pos + n > want:
                    call.cancel()
                    raise TransferError(f"KV offer from {offer.address} is longer than the {want} bytes offered")
                buf[pos:pos + n] = np.frombuffer(chunk.data, np.uint8)
                pos += n
        except grpc.aio.AioRpcError as e:
            raise TransferError(f"FetchKv from {offer.address} failed: {e.code().name}: {e.details()}") from None
        if pos != want:
            raise TransferError(f"KV offer from {offer.address} ended after {pos} of {want} bytes")
        return buf
