"""Disaggregation benchmark: KV transfer throughput per backend against a same-size memory copy, aggregated vs
layer-by-layer transfer, KV moved per turn in each PD mode on a multi-turn workload, and JCT / TTFT / TPOT of
colocated vs disaggregated serving with and without caching, all in one run.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m jaxserve.launch.bench_disagg --out=out/bench_disagg.json

Prints tables and writes JSON. On CPU the 8 fake devices share the machine's cores (2 here), so the
"prefill mesh" and the "decode mesh" compete for the same cores: compare ratios, not absolute numbers.
For the cross-process rows each process is pinned to its own core.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS


def _define(kind: str, name: str, default, help_: str) -> None:
    # `jaxserve.launch.bench_offline --disaggregated` imports this module: flags it defines itself (layers, output_len,
    # out) keep its definition.
    if name not in FLAGS:
        getattr(flags, f"DEFINE_{kind}")(name, default, help_)


def use_fake_devices() -> None:
    """8 fake CPU devices (prefill and decode meshes); must run before jax is imported."""
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")


_define("integer", "layers", 8, "model layers")
_define("integer", "kv_heads", 4, "KV heads")
_define("integer", "head_dim", 64, "head dim")
_define("integer", "page_size", 16, "tokens per page")
_define("integer", "transfer_pages", 64, "pages per transfer in the throughput rows")
_define("integer", "repeats", 5, "timed repetitions per transfer row (after one warm-up)")
_define("integer", "sessions", 2, "multi-turn sessions")
_define("integer", "turns", 3, "turns per session")
_define("integer", "first_len", 40, "first prompt tokens")
_define("integer", "turn_len", 20, "user tokens added per turn")
_define("integer", "output_len", 12, "new tokens per turn")
_define("bool", "cross_process", True, "also measure the cross-process backend (spawns a receiver)")
_define("bool", "profile_transfer", False, "only profile the cross-process transfer: time each stage (gather, "
                  "pull, reshard, scatter, control) with a sync after each, and the end-to-end path")
_define("bool", "serving", True, "also run the multi-turn serving rows")
_define("string", "role", "bench", "internal: 'receiver' runs the cross-process receiver")
_define("string", "port_file", "", "internal: where the receiver writes its port")
_define("string", "out", "out/bench_disagg.json", "JSON output")
MACHINE_NOTE = (f"CPU, {os.cpu_count()} cores; the 8 fake XLA devices share them, so prefill and decode meshes "
                "compete for the same cores")


def model_config(layers=None):
    from jaxserve.config import ModelConfig
    return ModelConfig(vocab_size=258, hidden_size=64 * FLAGS.kv_heads, intermediate_size=128 * FLAGS.kv_heads,
                       num_layers=layers or FLAGS.layers, num_heads=FLAGS.kv_heads, num_kv_heads=FLAGS.kv_heads,
                       head_dim=FLAGS.head_dim, max_position_embeddings=2048, bos_token_id=256,
                       eos_token_id=(257,), dtype="float32")


def make_pool(device_ids, num_pages):
    import jax
    import numpy as np
    from jaxserve.config import CacheConfig
    from jaxserve.mempool import MemPool
    from jaxserve.model.decoder import kv_cache_partition_spec
    by_id = {d.id: d for d in jax.devices()}
    mesh = jax.sharding.Mesh(np.asarray([by_id[i] for i in device_ids]), ("tp",))
    return MemPool(model_config(), CacheConfig(page_size=FLAGS.page_size, num_pages=num_pages),
                   sharding=jax.sharding.NamedSharding(mesh, kv_cache_partition_spec()), dtype="float32")


def timed(fn, repeats):
    fn()  # warm-up (compilation)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


# ------------------------------------------------------------------------------------------ receiver process
def run_receiver():
    import jax
    from jaxserve.bench.kv_peer import KvPeerServer
    from jaxserve.mempool import transfer as tr
    os.sched_setaffinity(0, {1 % os.cpu_count()})
    pool = make_pool((0, 1), FLAGS.transfer_pages + 2)
    recv = KvPeerServer(pool, tr.CrossProcessTransport(tr.TransferServer()))

    def raw(msg):  # the raw transfer server: pull only, no scatter, no resharding
        import jax.numpy as jnp
        devs = sorted(pool.sharding.device_set, key=lambda d: d.id)
        sh = jax.sharding.NamedSharding(jax.sharding.Mesh(devs, ("tp",)),
                                        jax.sharding.PartitionSpec(None, None, None, "tp", None))
        spec = jax.ShapeDtypeStruct(tuple(msg["shape"]), jnp.dtype(msg["dtype"]), sharding=sh)
        t = time.perf_counter()
        xs = recv.transport.server.pull(msg["address"], int(msg["uuid"]), [spec] * int(msg.get("chunks", 1)))
        jax.block_until_ready(xs)
        return dict(seconds=time.perf_counter() - t)

    def stages(msg):  # the receive path with a sync after each stage (profiling)
        import jax.numpy as jnp
        t0 = time.perf_counter()
        devs = sorted(pool.sharding.device_set, key=lambda d: d.id)[:int(msg["src_shards"])]
        sh = jax.sharding.NamedSharding(jax.sharding.Mesh(devs, ("tp",)),
                                        jax.sharding.PartitionSpec(None, None, None, "tp", None))
        spec = jax.ShapeDtypeStruct(tuple(msg["shape"]), jnp.dtype(msg["dtype"]), sharding=sh)
        x = recv.transport.server.pull(msg["address"], int(msg["uuid"]), [spec])[0]
        x.block_until_ready()
        t1 = time.perf_counter()
        y = jax.device_put(x, tr.pool_sharding(pool))
        y.block_until_ready()
        t2 = time.perf_counter()
        tr.scatter_block(pool, msg["dst_pages"], y)
        pool.kv_cache.block_until_ready()
        t3 = time.perf_counter()
        return dict(pull=t1 - t0, reshard=t2 - t1, scatter=t3 - t2)

    recv.handlers["raw"] = raw
    recv.handlers["stages"] = stages
    with open(FLAGS.port_file + ".tmp", "w") as f:
        f.write(str(recv.port))
    os.rename(FLAGS.port_file + ".tmp", FLAGS.port_file)
    recv.serve()


# ------------------------------------------------------------------------------------------ transfer rows
def bench_transfers():
    import jax
    import numpy as np
    from jaxserve.mempool import transfer as tr
    n = FLAGS.transfer_pages
    src, dst = make_pool((0, 1), n + 2), make_pool((4, 5), n + 2)
    sp, dp = src.alloc(n), dst.alloc(n)
    nbytes = int(np.prod(src.page_shape)) * 4 * n
    rows = []

    a = np.random.default_rng(0).standard_normal(nbytes // 4).astype(np.float32)
    b = np.empty_like(a)
    t = timed(lambda: np.copyto(b, a), FLAGS.repeats)
    rows.append(("memory copy (numpy, same size)", nbytes, t, 0))

    def agg():
        src.transfer(dst, sp, dp)
        dst.kv_cache.block_until_ready()

    from jaxserve.bench.layerwise import local_transfer_layerwise
    baseline = tr.OpCounts()

    def layerwise():
        local_transfer_layerwise(src, dst, sp, dp, baseline)
        dst.kv_cache.block_until_ready()

    for name, fn, counts in (("same process, aggregated (tp2 -> tp2)", agg, src.transport.counts),
                             ("same process, layer-by-layer (tp2 -> tp2)", layerwise, baseline)):
        before = counts.total()
        fn()
        ops = counts.total() - before
        rows.append((name, nbytes, timed(fn, FLAGS.repeats), ops))
    dst4 = make_pool((4, 5, 6, 7), n + 2)
    dp4 = dst4.alloc(n)

    def reshard():
        src.transfer(dst4, sp, dp4)
        dst4.kv_cache.block_until_ready()
    rows.append(("same process, aggregated, reshard tp2 -> tp4", nbytes, timed(reshard, FLAGS.repeats), 3))

    if FLAGS.cross_process:
        rows.extend(bench_cross_process(src, sp, nbytes))
    return rows


def bench_cross_process(src, sp, nbytes):
    import tempfile
    from jaxserve.bench.kv_peer import KvPeer
    from jaxserve.mempool import transfer as tr
    port_file = os.path.join(tempfile.mkdtemp(), "port")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    args = [sys.executable, "-m", "jaxserve.launch.bench_disagg", "--role=receiver", f"--port_file={port_file}"] + \
        [f"--{k}={getattr(FLAGS, k)}" for k in ("layers", "kv_heads", "head_dim", "page_size", "transfer_pages")]
    child = subprocess.Popen(args, env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.sched_setaffinity(0, {0})
    try:
        deadline = time.time() + 120
        while not os.path.exists(port_file):
            if child.poll() is not None or time.time() > deadline:
                raise RuntimeError("receiver did not start")
            time.sleep(0.1)
        server = tr.TransferServer()
        remote = KvPeer(int(open(port_file).read()), tr.CrossProcessTransport(server), timeout=60)
        n = len(sp)
        dp = remote.alloc(n, request_id="bench")
        block = tr.gather_block(src, sp)
        block.block_until_ready()

        def raw():
            uuid = server.next_uuid()
            server.offer(uuid, [block])
            return remote.call(dict(op="raw", uuid=uuid, address=server.address, shape=list(block.shape),
                                    dtype=str(block.dtype)))["seconds"]
        raw()
        t_raw = statistics.median(raw() for _ in range(FLAGS.repeats))
        if FLAGS.profile_transfer:
            profile_stages(src, sp, dp, server, remote, nbytes, t_raw)
        t_ours = timed(lambda: remote.push(src, sp, dst_pages=dp, request_id="bench"), FLAGS.repeats)
        remote.release("bench")
        remote.close()
        return [("cross process, raw transfer server pull (tp2 -> tp2)", nbytes, t_raw, 1),
                ("cross process, transfer end to end (tp2 -> tp2)", nbytes, t_ours, 4)]
    finally:
        os.sched_setaffinity(0, set(range(os.cpu_count())))
        child.kill()
        child.wait()


def profile_stages(src, sp, dp, server, remote, nbytes, t_raw):
    """Where the cross-process transfer's time goes: each stage synced on its own. The raw pull, the staged
    receive and the end-to-end transfer run interleaved (one of each per round), so load swings on a shared
    machine hit all of them alike; medians over rounds, plus the median of per-round end-to-end / raw."""
    import jax
    from jaxserve.mempool import transfer as tr
    reps = max(FLAGS.repeats, 5)

    def raw():
        block = tr.gather_block(src, sp)
        block.block_until_ready()
        uuid = server.next_uuid()
        server.offer(uuid, [block])
        return remote.call(dict(op="raw", uuid=uuid, address=server.address, shape=list(block.shape),
                                dtype=str(block.dtype)))["seconds"]

    def raw_chunks():  # the raw pull of the same chunks our transfer sends (one pull of several arrays)
        chunks = tr.gather_chunks(src, sp)
        jax.block_until_ready(chunks)
        uuid = server.next_uuid()
        server.offer(uuid, chunks)
        return remote.call(dict(op="raw", uuid=uuid, address=server.address, shape=list(chunks[0].shape),
                                dtype=str(chunks[0].dtype), chunks=len(chunks)))["seconds"]

    def stages():
        t = time.perf_counter()
        block = tr.gather_block(src, sp)
        block.block_until_ready()
        gather = time.perf_counter() - t
        uuid = server.next_uuid()
        server.offer(uuid, [block])
        t = time.perf_counter()
        got = remote.call(dict(op="stages", uuid=uuid, address=server.address, shape=list(block.shape),
                               dtype=str(block.dtype), src_shards=tr.num_head_shards(block),
                               dst_pages=[int(p) for p in dp]))
        got.update(round_trip=time.perf_counter() - t, gather=gather)
        return got

    def e2e():
        t = time.perf_counter()
        remote.push(src, sp, dst_pages=dp, request_id="bench")
        return time.perf_counter() - t

    def control():
        t = time.perf_counter()
        remote.call(dict(op="lookup", tokens=[]))
        return time.perf_counter() - t

    raw(), raw_chunks(), stages(), e2e()  # warm-up
    rounds = [dict(raw=raw(), raw_chunks=raw_chunks(), e2e=e2e(), control=control(), **stages())
              for _ in range(reps)]
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0] if k != "ok"}
    ratio = statistics.median(r["e2e"] / r["raw"] for r in rounds)
    ratio_chunks = statistics.median(r["e2e"] / r["raw_chunks"] for r in rounds)
    n_chunks = len(tr.gather_chunks(src, sp))
    print(f"\nprofile of the cross-process transfer ({nbytes / 2**20:.1f} MiB, medians of {reps} interleaved rounds; "
          f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; sender on core 0, receiver on core 1)")
    rows = [("raw pull, one array (receiver side)", "raw"),
            (f"raw pull, same {n_chunks} chunks as ours", "raw_chunks"), ("gather (sender, synced)", "gather"),
            ("control round trip (empty message)", "control"), ("pull into staging layout (synced)", "pull"),
            ("staging -> pool device_put (synced)", "reshard"), ("scatter (synced)", "scatter"),
            ("pull+reshard+scatter round trip (sender)", "round_trip"), ("end to end, offer + pull + scatter", "e2e")]
    for name, k in rows:
        print(f"  {name:42s} {1e3 * med[k]:8.2f} ms {nbytes / med[k] / 1e9:7.2f} GB/s")
    print(f"  end to end / raw one-array pull = {ratio:.3f}, / raw pull of the same chunks = {ratio_chunks:.3f} "
          f"(medians of per-round ratios; target <= 1.11: lose <= 10% of throughput)")
    return dict(stages_ms={k: 1e3 * v for k, v in med.items()}, e2e_over_raw=ratio,
                e2e_over_raw_chunks=ratio_chunks, load=os.getloadavg()[0])


# ------------------------------------------------------------------------------------------ serving rows
def make_llm(**kw):
    from jaxserve import LLM
    opts = dict(page_size=FLAGS.page_size, num_pages=256, max_num_batched_tokens=256, max_num_seqs=8, seed=0,
                compilation_cache="off")
    opts.update(kw)
    return LLM(model=model_config(layers=2), **opts)


def bench_serving():
    import numpy as np
    from jaxserve import SamplingParams
    sp = SamplingParams(max_tokens=FLAGS.output_len, ignore_eos=True)
    rng = np.random.default_rng(0)
    firsts = [list(rng.integers(0, 256, FLAGS.first_len)) for _ in range(FLAGS.sessions)]
    extra = [[list(rng.integers(0, 256, FLAGS.turn_len)) for _ in range(FLAGS.sessions)] for _ in range(FLAGS.turns)]
    settings = [("colocated, no caching", dict(enable_prefix_caching=False)),
                ("colocated, caching", dict(enable_prefix_caching=True))]
    settings += [(f"disaggregated {m}", dict(disaggregated=True, pd_mode=m, prefill_devices=[0, 1, 2, 3],
                                             decode_devices=[4, 5, 6, 7]))
                 for m in ("basic", "caching1", "caching2", "caching3")]
    cfg = model_config(layers=2)
    bytes_per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4
    results = []
    def workload(llm, record):
        turns = [list(f) for f in firsts]
        for t in range(FLAGS.turns):
            outs = llm.generate(turns, sp)
            record(t, turns, outs)
            turns = [p + o.token_ids + e for p, o, e in zip(turns, outs, extra[t])]

    for name, kw in settings:
        workload(make_llm(**kw), lambda *a: None)  # warm-up: every shape of the workload compiles here
        llm = make_llm(**kw)                       # fresh caches, same compiled executables
        turns, per_turn, outs_all = [list(f) for f in firsts], [], []
        for t in range(FLAGS.turns):
            outs = llm.generate(turns, sp)
            outs_all += outs
            per_turn.append(dict(turn=t, prompt_tokens=sum(len(p) for p in turns),
                                 transferred_tokens=sum(o.transferred_tokens for o in outs),
                                 returned_tokens=sum(o.returned_tokens for o in outs),
                                 cached_tokens=sum(o.num_cached_tokens for o in outs)))
            turns = [p + o.token_ids + e for p, o, e in zip(turns, outs, extra[t])]
        ttft = [o.ttft_s for o in outs_all]
        tpot = [(o.e2e_s - o.ttft_s) / (len(o.token_ids) - 1) for o in outs_all if len(o.token_ids) > 1]
        jct = [o.e2e_s for o in outs_all]
        results.append(dict(setting=name, ttft_ms=1e3 * statistics.mean(ttft), tpot_ms=1e3 * statistics.mean(tpot),
                            jct_ms=1e3 * statistics.mean(jct), per_turn=per_turn, bytes_per_token=bytes_per_token))
    return results


def main(argv):
    del argv
    if FLAGS.role == "receiver":
        run_receiver()
        return
    use_fake_devices()
    import jax
    print(f"machine: {MACHINE_NOTE}; jax {jax.__version__}, {len(jax.devices())} devices")
    if FLAGS.profile_transfer:
        import numpy as np
        n = FLAGS.transfer_pages
        src = make_pool((0, 1), n + 2)
        sp = src.alloc(n)
        bench_cross_process(src, sp, int(np.prod(src.page_shape)) * 4 * n)
        return
    rows = bench_transfers()
    print(f"\nKV transfer, {FLAGS.transfer_pages} pages x {FLAGS.layers} layers "
          f"({rows[0][1] / 2**20:.1f} MiB); fake CPU devices share {os.cpu_count()} cores")
    print(f"{'path':58s} {'MiB':>7s} {'ms':>8s} {'GB/s':>7s} {'array ops':>9s}")
    for name, nbytes, t, ops in rows:
        print(f"{name:58s} {nbytes / 2**20:7.1f} {1e3 * t:8.2f} {nbytes / t / 1e9:7.2f} {ops:9d}")
    serving = bench_serving() if FLAGS.serving else []
    print(f"\nmulti-turn: {FLAGS.sessions} sessions x {FLAGS.turns} turns, first prompt {FLAGS.first_len}, "
          f"+{FLAGS.turn_len} user tokens/turn, {FLAGS.output_len} output tokens; KV moved per turn "
          f"(prefill->decode / decode->prefill, KiB)")
    print(f"{'setting':32s} " + " ".join(f"{'turn ' + str(t):>15s}" for t in range(FLAGS.turns)))
    for r in serving:
        if not r["setting"].startswith("disagg"):
            continue
        cells = [f"{p['transferred_tokens'] * r['bytes_per_token'] / 1024:7.0f}/"
                 f"{p['returned_tokens'] * r['bytes_per_token'] / 1024:<7.0f}" for p in r["per_turn"]]
        print(f"{r['setting']:32s} " + " ".join(f"{c:>15s}" for c in cells))
    print(f"\nlatency (mean over all turns; {MACHINE_NOTE})")
    print(f"{'setting':32s} {'TTFT ms':>9s} {'TPOT ms':>9s} {'JCT ms':>9s} {'cached tok':>10s}")
    for r in serving:
        print(f"{r['setting']:32s} {r['ttft_ms']:9.1f} {r['tpot_ms']:9.1f} {r['jct_ms']:9.1f} "
              f"{sum(p['cached_tokens'] for p in r['per_turn']):10d}")
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump(dict(machine=MACHINE_NOTE, flags={k: getattr(FLAGS, k) for k in (
            "layers", "kv_heads", "head_dim", "page_size", "transfer_pages", "sessions", "turns", "first_len",
            "turn_len", "output_len")},
            transfers=[dict(path=n, bytes=b, seconds=t, gb_per_s=b / t / 1e9, array_ops=o) for n, b, t, o in rows],
            serving=serving), f, indent=1)
    print(f"\nwrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
