"""This process's `jax.experimental.transfer` server, and pulls with a deadline.

The sender parks arrays on its server (`offer`, i.e. `await_pull`) under a fresh uuid; the receiver, told the
uuid, the sender's address and the arrays' shapes over some control plane (protobuf in the instance gRPC API),
`pull`s them straight into its own devices. The KV never crosses the control plane, and nothing is pickled.
"""

from __future__ import annotations

import datetime
import secrets
import threading
import time

import jax

from jaxserve.mempool.transfer.ops import OpCounts, _count
from jaxserve.mempool.transfer.state import TransferError


class TransferServer:
    """This process's `jax.experimental.transfer` server plus a cache of connections to peers."""


    def __init__(self, client=None, address: str = "127.0.0.1:0"):
        from jax.experimental import transfer as jtransfer
        client = client if client is not None else jax.local_devices()[0].client
        host = address.rsplit(":", 1)[0]
        self._server = jtransfer.start_transfer_server(client, address, [f"{host}:0"])
        self._conns: dict[str, object] = {}
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        return self._server.address()

    def next_uuid(self) -> int:
        return self.reserve_uuids(1)

    def reserve_uuids(self, n: int) -> int:
        """The first of n consecutive fresh uuids (one per receiver process of a per-shard transfer). Random
        (62 bits): the transfer server has no authentication of its own, so a parked offer can be pulled only
        by whoever was told its uuid, over the authenticated (and with TLS, encrypted) gRPC control plane."""
        return secrets.randbits(62)

    def offer(self, uuid: int, arrays: list[jax.Array]) -> None:
        self._server.await_pull(uuid, arrays)

    def pull(self, address: str, uuid: int, specs: list[jax.ShapeDtypeStruct],
             timeout: float | None = None, counts: OpCounts | None = None) -> list[jax.Array]:
        with self._lock:
            conn = self._conns.get(address)
            if conn is None:
                conn = self._conns[address] = self._server.connect(address)
        _count(counts, "pull")
        if timeout is None:
            return conn.pull(uuid, specs)
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
        return conn.pull(uuid, specs, timeout=deadline)


def wait_ready(x, timeout: float | None) -> None:
    """`block_until_ready` with a deadline. On CPU with jax 0.10.2 the pull's own `timeout` does not fire when
    the sender never offers the transfer id or dies before sending (the array just never becomes ready), so
    this polls `is_ready` on the caller's thread; after a timeout the unfilled buffer is abandoned (never
    scattered). No helper thread: one left blocked in `block_until_ready` on a dead sender's array woke up
    during interpreter shutdown and aborted the process ("FATAL: exception not rethrown", exit 134)."""
    if timeout is None:
        jax.block_until_ready(x)
        return
    leaves = jax.tree_util.tree_leaves(x)
    deadline = time.monotonic() + timeout
    pause = 5e-5
    while not all(a.is_ready() for a in leaves):
        if time.monotonic() >= deadline:
            raise TransferError(f"pull did not complete within {timeout:.1f}s")
        time.sleep(pause)
        pause = min(2 * pause, 1e-3)
    try:
        jax.block_until_ready(x)  # ready or failed: raises a failure here
    except Exception as e:  # noqa: BLE001 - one error type for callers
        raise TransferError(f"pull failed: {e}") from e


def pull_checked(server: TransferServer, address: str, uuid: int, specs: list[jax.ShapeDtypeStruct],
                 timeout: float | None, counts: OpCounts | None = None) -> list[jax.Array]:
    """Pulls and waits for the arrays (TransferError on any failure or after `timeout` seconds): nothing
    reaches the caller half received."""
    try:
        block = list(server.pull(address, int(uuid), specs, timeout=timeout, counts=counts))
    except TransferError:
        raise
    except Exception as e:  # noqa: BLE001 - connection refused, bad id...: one error type for callers
        raise TransferError(f"pull from {address} failed: {type(e).__name__}: {e}") from e
    wait_ready(block, timeout)  # raises on failure or timeout, before anything is written
    return block
