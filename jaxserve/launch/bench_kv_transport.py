"""KV transport benchmark (issue 16): the same KV push between two instances with each transport side by side in
one run -- "jax" (jax.experimental.transfer, plaintext TCP), "grpc" over plaintext gRPC and "grpc" over mTLS
(the encrypted path TLS deployments get with --kv_transport=auto) -- at several sizes. Prints a table and
writes JSON.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m jaxserve.launch.bench_kv_transport \
        --out=out/bench_kv_transport.json

What is timed: PushKv on the holder (peer fetch, issue 18), which is the whole serving path of one transfer --
match + one gather + offer on the holder, PrepareKvTransfer / CommitKvTransfer on the target, which pulls,
device_puts, scatters and indexes, then the answer. Each rep pushes a fresh prefix (the target holds none of
it). All pairs run in this process (holder on CPU device 0, target on device 1; the gRPC servers and clients
share its interpreter) and their pushes interleave: compare the backends with each other, not with a network.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("layers", 8, "model layers")
flags.DEFINE_integer("kv_heads", 4, "KV heads")
flags.DEFINE_integer("head_dim", 64, "head dim")
flags.DEFINE_integer("page_size", 16, "tokens per page")
flags.DEFINE_list("tokens", ["256", "1024", "4096"], "prefix sizes to push, in tokens (whole pages)")
flags.DEFINE_integer("reps", 3, "timed pushes per size and transport (after one warm-up push)")
flags.DEFINE_list("transports", ["jax", "grpc", "grpc+tls"], "what to compare")
flags.DEFINE_string("out", "out/bench_kv_transport.json", "JSON output")

SECRET = "bench-kv-transport"


def model_config():
    from jaxserve.config import ModelConfig
    return ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=FLAGS.layers,
                       num_heads=FLAGS.kv_heads, num_kv_heads=FLAGS.kv_heads, head_dim=FLAGS.head_dim,
                       max_position_embeddings=max(int(t) for t in FLAGS.tokens) + 64)


def engine(device: int):
    from jaxserve import LLM
    longest = max(int(t) for t in FLAGS.tokens)
    return LLM(model=model_config(), page_size=FLAGS.page_size, num_pages=2 * longest // FLAGS.page_size + 16,
               max_num_batched_tokens=512, max_num_seqs=4, seed=0, enable_prefix_caching=True,
               device_ids=[device]).engine


def tls_files(folder: str) -> dict:
    from jaxserve.security import TlsFiles
    from jaxserve.testing.certs import CertificateAuthority
    ca = CertificateAuthority(folder)
    return {n: TlsFiles(p.cert_file, p.key_file, ca.ca_file) for n, p in ((n, ca.issue(n)) for n in ("a", "b", "me"))}


async def start_pair(transport: str, pki: dict) -> tuple:
    """Holder and target instances sending with `transport`, and a stub on the holder."""
    from jaxserve.instance import InstanceConfig, InstanceServer
    from jaxserve.proto.v1 import instance_pb2_grpc
    from jaxserve.security import Secrets, aio_channel
    backend, tls = transport.split("+")[0], transport.endswith("+tls")
    servers = []
    for device, name in enumerate("ab"):
        files = dict(tls_cert_file=pki[name].cert_file, tls_key_file=pki[name].key_file,
                     tls_ca_file=pki[name].ca_file) if tls else {}
        servers.append(await InstanceServer(engine(device), InstanceConfig(
            instance_id=f"{transport}-{name}", peer_fetch=True, kv_transport=backend, shutdown_grace_s=0, **files),
            secrets=Secrets(cluster_secret=SECRET)).start())
    assert servers[0].kv_path.kv_transport == backend
    channel = aio_channel(servers[0].address, secret=SECRET, tls=pki["me"] if tls else None)
    return servers, channel, instance_pb2_grpc.InstanceStub(channel)


async def push_once(stub, target, size: int, tag: str, rng) -> tuple[float, int]:
    """Prefill a fresh prefix of `size` tokens on the holder, then time its PushKv to `target`."""
    from jaxserve.proto.v1 import common_pb2, instance_pb2
    prefix = [int(x) for x in rng.integers(1, 500, size)]
    async for _ in stub.Generate(instance_pb2.InstanceGenerateRequest(
            request_id=f"warm-{tag}", prompt_token_ids=prefix, max_tokens=1,
            sampling=common_pb2.SamplingParams(ignore_eos=True)), timeout=600):
        pass
    t0 = time.perf_counter()
    got = await stub.PushKv(instance_pb2.PushKvRequest(request_id=f"push-{tag}", token_ids=prefix,
                                                       target=instance_pb2.KvTarget(address=target.address)),
                            timeout=600)
    dt = time.perf_counter() - t0
    if got.sent_tokens != size:
        raise RuntimeError(f"{tag}: pushed {got.sent_tokens} of {size} tokens")
    return dt, got.sent_bytes


async def measure(pki: dict) -> list[dict]:
    """Every transport's pair is up at once and the pushes interleave (size by size, rep by rep, transport by
    transport), so a burst of load on a shared box hits every column alike."""
    import numpy as np
    pairs = {t: await start_pair(t, pki) for t in FLAGS.transports}
    rng = np.random.default_rng(0)
    rows = []
    try:
        for size in (int(t) for t in FLAGS.tokens):
            times: dict[str, list[float]] = {t: [] for t in FLAGS.transports}
            nbytes = {}
            for rep in range(FLAGS.reps + 1):
                for transport, (servers, _, stub) in pairs.items():
                    dt, nbytes[transport] = await push_once(stub, servers[1], size, f"{transport}-{size}-{rep}", rng)
                    if rep:  # the first push of a size compiles its gather / scatter bucket
                        times[transport].append(dt)
            for transport in FLAGS.transports:
                med = statistics.median(times[transport])
                rows.append(dict(transport=transport, tokens=size, bytes=nbytes[transport], median_s=med,
                                 min_s=min(times[transport]), gb_s=nbytes[transport] / med / 1e9,
                                 reps=len(times[transport])))
                print(f"  {transport:10s} {size:6d} tok {nbytes[transport] / 2**20:8.1f} MiB {1e3 * med:9.1f} ms "
                      f"{nbytes[transport] / med / 1e9:7.3f} GB/s", flush=True)
    finally:
        for servers, channel, _ in pairs.values():
            await channel.close()
            for s in servers:
                await s.stop(0)
    return rows


def _cell(row: dict) -> str:
    ms = f"{1e3 * row['median_s']:.1f} / {1e3 * row['min_s']:.1f}"
    return f"{ms:>17s} {row['gb_s']:6.3f}"


def main(argv):
    del argv
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    import jax
    kv_per_token = 2 * FLAGS.layers * FLAGS.kv_heads * FLAGS.head_dim * 4
    print(f"jax {jax.__version__}, {len(jax.devices())} devices, {os.cpu_count()} cores; KV {kv_per_token} B/token "
          f"(float32, {FLAGS.layers} layers x {FLAGS.kv_heads} KV heads x {FLAGS.head_dim})")
    with tempfile.TemporaryDirectory() as folder:
        pki = tls_files(folder) if any(t.endswith("+tls") for t in FLAGS.transports) else {}
        rows = asyncio.run(measure(pki))
    print(f"\nKV push (PushKv: gather, offer, prepare, pull, scatter, index), ms median / min of {FLAGS.reps}, "
          "GB/s at the median")
    print(f"{'tokens':>7s} {'MiB':>8s} " + " ".join(f"{t + ' ms':>17s} {'GB/s':>6s}" for t in FLAGS.transports))
    for size in (int(t) for t in FLAGS.tokens):
        cells = [r for t in FLAGS.transports for r in rows if r["transport"] == t and r["tokens"] == size]
        print(f"{size:7d} {cells[0]['bytes'] / 2**20:8.1f} " + " ".join(_cell(r) for r in cells))
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump(dict(flags={k: getattr(FLAGS, k) for k in ("layers", "kv_heads", "head_dim", "page_size", "tokens",
                                                             "reps", "transports")},
                       jax=jax.__version__, cores=os.cpu_count(), rows=rows), f, indent=1)
    print(f"\nwrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
