"""MemPool transfer API: same-process transfer between meshes (resharding included), aggregation (a constant
number of array operations per request whatever the number of layers), transfer_with_insert, failure
cleanup (faults injected by a failing transport), the transfer state machine, and the cross-process backend
(jax.experimental.transfer; the benchmark's KvPeer stands in for the gRPC control plane) between two
processes."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxserve.config import CacheConfig, ModelConfig
from jaxserve.mempool import MemPool
from jaxserve.mempool import transfer as tr
from jaxserve.mempool.transfer import ops
from kv_faults import FailingTransport

PAGE = 4


def cfg(layers=2):
    return ModelConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_layers=layers, num_heads=4,
                       num_kv_heads=2, head_dim=8, max_position_embeddings=512, bos_token_id=256,
                       eos_token_id=(257,))


def make_pool(device_ids, *, layers=2, num_pages=32, caching=True):
    from jaxserve.model.decoder import kv_cache_partition_spec
    by_id = {d.id: d for d in jax.devices()}
    mesh = jax.sharding.Mesh(np.asarray([by_id[i] for i in device_ids]), ("tp",))
    sharding = jax.sharding.NamedSharding(mesh, kv_cache_partition_spec())
    return MemPool(cfg(layers), CacheConfig(page_size=PAGE, num_pages=num_pages, enable_prefix_caching=caching),
                   sharding=sharding, dtype="float32")


def fill_random(pool, pages, seed=0) -> np.ndarray:
    data = np.random.default_rng(seed).standard_normal(
        (pool.page_shape[0], len(pages)) + pool.page_shape[1:]).astype(np.float32)
    idx = tr.padded_index(pages)
    block = np.zeros((data.shape[0], idx.size) + data.shape[2:], np.float32)
    block[:, :len(pages)] = data
    tr.scatter_block(pool, pages, jax.device_put(block, pool.sharding))
    return data


def read(pool, pages) -> np.ndarray:
    return np.asarray(pool.kv_cache)[:, list(pages)]


def assert_clean(pool, outside=0):
    pool.check_invariants()
    assert pool.num_free_pages() + pool.num_evictable_pages() == pool.num_pages - 1 - outside


def need_devices(n):
    if len(jax.devices()) < n:
        pytest.skip(f"needs {n} devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")


@pytest.mark.parametrize("src_devs,dst_devs", [((0, 1), (4, 5)), ((0, 1), (4,)), ((0,), (4, 5, 6, 7)),
                                               ((0, 1, 2, 3), (6, 7))])
def test_same_process_transfer_reshards(src_devs, dst_devs):
    need_devices(8)
    src, dst = make_pool(src_devs), make_pool(dst_devs)
    sp, dp = src.alloc(5), dst.alloc(5)
    data = fill_random(src, sp)
    src.transfer(dst, sp, dp)
    np.testing.assert_array_equal(read(dst, dp), data)
    assert dst.kv_cache.sharding == dst.sharding  # stays where the engine's step expects it
    assert {d.id for d in dst.kv_cache.sharding.device_set} == set(dst_devs)
    src.free(sp)
    dst.free(dp)
    assert_clean(src)
    assert_clean(dst)


def test_aggregated_transfer_uses_constant_array_ops():
    need_devices(8)
    counts = {}
    for layers in (2, 6):
        src, dst = make_pool((0, 1), layers=layers), make_pool((4, 5), layers=layers)
        sp, dp = src.alloc(7), dst.alloc(7)
        data = fill_random(src, sp, seed=layers)
        before = src.transport.counts.snapshot()
        src.transfer(dst, sp, dp)
        counts[layers] = src.transport.counts.since(before)
        np.testing.assert_array_equal(read(dst, dp), data)
        # The layer-by-layer baseline moves the same bytes with 2 x layers of each operation.
        from jaxserve.bench.layerwise import local_transfer_layerwise
        dp2 = dst.alloc(7)
        baseline = tr.OpCounts()
        local_transfer_layerwise(src, dst, sp, dp2, baseline)
        per_layer = baseline.snapshot()
        np.testing.assert_array_equal(read(dst, dp2), data)
        assert per_layer == dict(gather=2 * layers, device_put=2 * layers, scatter=2 * layers, pull=0)
    assert counts[2] == counts[6] == dict(gather=1, device_put=1, scatter=1, pull=0)


def test_transfer_with_insert_indexes_and_skips_what_the_receiver_holds():
    need_devices(8)
    src, dst = make_pool((0, 1)), make_pool((4, 5, 6, 7))
    tokens = list(range(1, 23))                       # 5 whole pages + 2 tokens
    sp = src.alloc(6)
    data = fill_random(src, sp)
    # First 3 pages only.
    got = src.transfer_with_insert(dst, tokens[:12], sp[:3])
    assert dst.cached_prefix_pages(tokens) == 3 and len(got) == 3
    dst.free(got)
    # The rest: the sender asks what the receiver holds and sends only pages 3..5.
    start = dst.cached_prefix_pages(tokens)
    before = src.transport.counts.scatter
    got = src.transfer_with_insert(dst, tokens, sp[start:], start_page=start)
    assert src.transport.counts.scatter == before + 1
    assert len(got) == 6 and dst.cached_prefix_pages(tokens) == 5  # the partial last page is not indexed
    np.testing.assert_array_equal(read(dst, got), data)
    n, pages = dst.match(tokens)
    assert n == 20 and pages == got[:5]
    dst.free(pages + got)
    src.free(sp)
    assert_clean(src)
    assert_clean(dst)


@pytest.mark.parametrize("stage", ["send", "receive", "insert"])
def test_failed_transfer_frees_and_never_indexes(stage):
    need_devices(8)
    src, dst = make_pool((0, 1)), make_pool((4,))
    tokens = list(range(1, 17))
    sp = src.alloc(4)
    fill_random(src, sp)
    free_before = dst.num_free_pages()
    with pytest.raises(tr.TransferError, match="injected"):
        src.transfer_with_insert(dst, tokens, sp, transport=FailingTransport(stage))
    assert dst.num_free_pages() == free_before
    assert dst.cached_prefix_pages(tokens) == 0 and dst.match(tokens) == (0, [])
    assert_clean(dst)
    # Skipping pages the receiver does not hold fails cleanly too.
    with pytest.raises(tr.TransferError, match="receiver holds 0 of the 2 pages"):
        src.transfer_with_insert(dst, tokens, sp[2:], start_page=2)
    assert_clean(dst)
    # A receiver without room fails before anything moves.
    small = make_pool((5,), num_pages=3)
    with pytest.raises(tr.TransferError, match="cannot allocate"):
        src.transfer_with_insert(small, tokens, sp)
    assert_clean(small)
    src.free(sp)
    assert_clean(src)


# ---------------------------------------------------------------------------------------------- two processes
def _child(port_file: str) -> None:
    """Receiver process: a MemPool on 2 devices behind a KvPeerServer; extra ops let the test inspect it."""
    from jaxserve.bench.kv_peer import KvPeerServer
    pool = make_pool((0, 1))
    peer = KvPeerServer(pool, tr.CrossProcessTransport(tr.TransferServer()))

    def digest(msg):
        return dict(data=read(pool, msg["pages"]).tolist())

    def check(msg):
        pool.check_invariants()
        return dict(free=pool.num_free_pages(), evictable=pool.num_evictable_pages(),
                    cached=pool.cached_prefix_pages(msg["tokens"]), held=sum(map(len, peer.held.values())),
                    pending=len(peer.receiver.pending))

    peer.handlers.update(digest=digest, check=check)
    with open(port_file + ".tmp", "w") as f:
        f.write(str(peer.port))
    os.rename(port_file + ".tmp", port_file)
    peer.serve()


def test_transfer_state_machine():
    s = tr.TransferState("t")
    for state in (tr.State.PULLING, tr.State.FILLED, tr.State.COMMITTED):
        s.to(state)
    assert s.terminal and s.history == [tr.State.PREPARED, tr.State.PULLING, tr.State.FILLED, tr.State.COMMITTED]
    with pytest.raises(tr.IllegalTransition):
        s.to(tr.State.FAILED)
    for bad in (tr.State.FILLED, tr.State.COMMITTED):  # nothing skips the pull, nothing commits unfilled
        with pytest.raises(tr.IllegalTransition):
            tr.TransferState().to(bad)
    s = tr.TransferState()
    s.to(tr.State.PULLING)
    s.to(tr.State.CANCELLED)
    with pytest.raises(tr.IllegalTransition):
        s.to(tr.State.PULLING)


def test_receiver_reservations_follow_the_state_machine():
    need_devices(8)
    src, dst = make_pool((0, 1)), make_pool((4,))
    tokens = list(range(1, 11))  # 2 whole pages + 2 tokens
    sp = src.alloc(3)
    data = fill_random(src, sp)
    receiver = tr.KvReceiver(dst)
    r = receiver.prepare("a", tokens, PAGE, 30.0)
    assert r.state.state is tr.State.PREPARED and len(r.new_pages) == 3
    with pytest.raises(ValueError, match="not committed"):
        receiver.take(r.transfer_id)
    with pytest.raises(tr.IllegalTransition):
        receiver.commit(r.transfer_id)       # not filled
    receiver.begin(r.transfer_id)
    t = src.transport
    receiver.fill(r.transfer_id, t.fetch(dst, t.offer(src, sp)), t)
    receiver.commit(r.transfer_id, 123)
    assert receiver.take(r.transfer_id).pages == r.new_pages and not receiver.pending
    np.testing.assert_array_equal(read(dst, r.new_pages), data)
    assert dst.cached_prefix_pages(tokens) == 2 and receiver.counters["kv_received_bytes"] == 123
    dst.free(r.pages)
    # A cancelled reservation frees its pages and ends in its terminal state.
    r2 = receiver.prepare("b", list(range(50, 60)), PAGE, 30.0)
    receiver.begin(r2.transfer_id)
    assert receiver.cancel_request("b") and r2.state.state is tr.State.FAILED
    with pytest.raises(KeyError):
        receiver.begin(r2.transfer_id)
    # Handed over (an instance's decode side): the pages go to the engine, the entry stays until claimed.
    r3 = receiver.prepare("c", list(range(100, 110)), PAGE, 30.0)
    assert receiver.claim(r3.transfer_id) is None            # not committed: nothing to claim
    with pytest.raises(ValueError, match="not committed"):
        receiver.hand_over(r3.transfer_id, "c#0", "sink")
    receiver.fill(r3.transfer_id, t.fetch(dst, t.offer(src, sp)), t)
    receiver.commit(r3.transfer_id)
    receiver.hand_over(r3.transfer_id, "c#0", "sink")
    assert receiver.held_pages() == 0 and len(receiver.pending) == 1
    with pytest.raises(tr.IllegalTransition):
        receiver.begin(r3.transfer_id)                         # committed is terminal
    with pytest.raises(ValueError, match="handed over"):
        receiver.take(r3.transfer_id)
    got = receiver.claim(r3.transfer_id)
    assert (got.internal_id, got.waiter) == ("c#0", "sink") and not receiver.pending
    assert receiver.claim(r3.transfer_id) is None
    dst.free(r3.pages)                                         # the engine's, in an instance
    src.free(sp)
    assert_clean(src)
    assert_clean(dst)


def test_chunked_gather_and_scatter_round_trip(monkeypatch):
    """A block split in chunks (what the cross-process backend sends) lands exactly where one block would, in
    one gather and one scatter executable; padding rows are never written."""
    need_devices(8)
    # 32 pages of 256 KiB: 8 chunks of 4; 3 pages (padded 4): 2 chunks of 2 (chunks are >= 512 KiB).
    assert tr.chunk_pages(32, 256 * 1024) == 4 and tr.chunk_pages(3, 256 * 1024) == 2
    monkeypatch.setattr(ops, "MIN_CHUNK_BYTES", 1)
    src, dst = make_pool((0, 1)), make_pool((4, 5))
    sp, dp = src.alloc(5), dst.alloc(5)
    data = fill_random(src, sp, seed=5)
    counts = tr.OpCounts()
    chunks = tr.gather_chunks(src, sp, counts)
    assert len(chunks) == 5 and all(x.shape[1] == 1 for x in chunks)  # bucket 8 -> 8 chunks of 1; 5 needed
    sentinel = np.asarray(dst.kv_cache)[:, 0].copy()
    tr.scatter_block(dst, dp, [jax.device_put(x, dst.sharding) for x in chunks], counts)
    assert counts.gather == 1 and counts.scatter == 1
    np.testing.assert_array_equal(read(dst, dp), data)
    np.testing.assert_array_equal(np.asarray(dst.kv_cache)[:, 0], sentinel)
    with pytest.raises(tr.TransferError, match="do not cover"):
        tr.scatter_block(dst, dp, chunks[:3])
    src.free(sp)
    dst.free(dp)


@pytest.mark.parametrize("src_devs,dst_devs", [((0, 1), (4, 5, 6, 7)), ((0, 1, 2, 3), (6,)), ((0,), (4, 5)),
                                               ((0, 1), (2, 3))])
def test_per_shard_transfer_between_layouts(src_devs, dst_devs, monkeypatch):
    """The per-shard backend (what multi-process instances use): the sender cuts its device shards at the
    receiver's boundaries into single-device pieces, the receiver pulls each piece straight onto its device,
    joins them and assembles the block without a copy; the pages land as one block would, in several chunks."""
    need_devices(8)
    monkeypatch.setattr(ops, "MIN_CHUNK_BYTES", 1)  # several chunks
    src, dst = make_pool(src_devs), make_pool(dst_devs)
    sp, dp = src.alloc(5), dst.alloc(5)
    data = fill_random(src, sp, seed=7)
    layout = tr.pool_layout(dst)
    assert [(x.start, x.end) for x in layout] == [(i * 4 // len(dst_devs), (i + 1) * 4 // len(dst_devs))
                                                   for i in range(len(dst_devs))]
    server = tr.TransferServer()
    sources, chunks, mine, total = tr.offer_shards(server, src, sp, layout, server.reserve_uuids(1), [server.address])
    assert len(chunks) == 5 and mine == total == sum(int(x.nbytes) for x in chunks)
    assert total == tr.shard_bytes(sources, chunks[0].shape, str(chunks[0].dtype), len(chunks))
    # One piece per (receiver device, sender device) overlap.
    assert len(sources) == 1 and len(sources[0].pieces) == max(len(src_devs), len(dst_devs))
    got = tr.receive_shards(server, dst, sources, chunks[0].shape, str(chunks[0].dtype), len(chunks), 10)
    assert all(x.sharding == dst.sharding for x in got)
    tr.scatter_block(dst, dp, got)
    np.testing.assert_array_equal(read(dst, dp), data)
    bad = [tr.ShardSource(0, server.address, 1, ((0, 0, 1),))]  # does not tile the receiver's first device
    with pytest.raises(tr.TransferError, match="do not tile"):
        tr.receive_shards(server, dst, bad, chunks[0].shape, str(chunks[0].dtype), 1, 1)
    src.free(sp)
    dst.free(dp)


def test_cross_process_transfer(tmp_path, monkeypatch):
    need_devices(4)
    monkeypatch.setattr(ops, "MIN_CHUNK_BYTES", 1)  # the sender splits blocks in chunks of one page
    port_file = str(tmp_path / "port")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen([sys.executable, __file__, "child", port_file], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        import time
        deadline = time.time() + 60
        while not os.path.exists(port_file):
            assert child.poll() is None, child.stdout.read().decode()[-3000:]
            assert time.time() < deadline, "receiver did not start"
            time.sleep(0.1)
        port = int(open(port_file).read())
        src = make_pool((0, 1, 2, 3))  # sender tp=4, receiver tp=2: the receiver reshards after the pull
        from jaxserve.bench.kv_peer import KvPeer
        transport = tr.CrossProcessTransport(tr.TransferServer())
        remote = KvPeer(port, transport, timeout=30)
        assert remote.page_shape == src.page_shape and remote.tp == 2
        tokens = list(range(1, 27))    # 6 whole pages + 2 tokens
        sp = src.alloc(7)
        data = fill_random(src, sp, seed=3)

        # transfer into pages the sender reserved on the receiver
        dp = remote.alloc(3, request_id="a")
        remote.push(src, sp[:3], dst_pages=dp, request_id="a")
        assert transport.counts.gather == 1 and transport.counts.pull == 0  # the receiver pulls
        got = np.asarray(remote.call(dict(op="digest", pages=dp))["data"], np.float32)
        np.testing.assert_array_equal(got, data[:, :3])
        remote.release("a")

        # transfer_with_insert in two parts: the second sends only what the receiver lacks
        first = remote.push(src, sp[:2], tokens=tokens[:8], request_id="b")
        assert remote.cached_prefix_pages(tokens) == 2 and len(first) == 2
        start = remote.cached_prefix_pages(tokens)
        pages = remote.push(src, sp[start:], tokens=tokens, start_page=start, request_id="c")
        assert len(pages) == 7 and pages[:2] == first
        got = np.asarray(remote.call(dict(op="digest", pages=pages))["data"], np.float32)
        np.testing.assert_array_equal(got, data)
        remote.release("b")
        remote.release("c")

        # a failing receive (prefix not held) frees what it took; nothing is indexed
        other = list(range(100, 126))
        with pytest.raises(tr.TransferError, match="receiver holds 0 of the 3 pages"):
            remote.push(src, sp[3:], tokens=other, start_page=3, request_id="d")
        # a pull that never gets its data (unknown transfer id) times out and surfaces as an error
        with pytest.raises(tr.TransferError):
            remote.call(dict(op="receive", request_id="e", offer=dict(
                address=transport.server.address, uuid=123456789, shape=[2, 4, PAGE, 4, 8], dtype="float32",
                num_shards=4, num_chunks=1, sources=[], nbytes=0), n_pages=3, timeout=2,
                tokens=other[:12], start_page=0), timeout=20)
        st = remote.call(dict(op="check", tokens=other))
        assert st["cached"] == 0 and st["held"] == 0 and st["pending"] == 0
        assert st["free"] + st["evictable"] == 31  # every page free or held by the index only
        assert remote.call(dict(op="check", tokens=tokens))["cached"] == 6
        remote.close()
        src.free(sp)
        assert_clean(src)
    finally:
        child.kill()
        child.wait()


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "child":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _child(sys.argv[2])
