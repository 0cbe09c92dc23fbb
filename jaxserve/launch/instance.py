"""Run one serving instance (an engine behind the Instance gRPC service) as a process.

    python -m jaxserve.launch.instance --role=colocated --scheduler=127.0.0.1:50050 --port=0 --model=demo
    python -m jaxserve.launch.instance --role=prefill --pd_mode=caching2 --scheduler=127.0.0.1:50050 --model=demo
    python -m jaxserve.launch.instance --role=decode --pd_mode=caching2 --scheduler=127.0.0.1:50050 --model=demo

Roles prefill and decode serve the disaggregated path (the scheduler pairs them); every instance of a
disaggregated cluster should use the same --pd_mode, which sets their prefix caching (prefill: caching1+,
decode: caching2+); --prefix_caching applies to role colocated only.

Multi-process instances (--num_processes / --coordinator_address / --distributed_auto, see WORKSPACE_NOTES.md)
serve every role: process 0 serves gRPC and leads, the others follow its steps and KV transfer ops.

Registers with the scheduler and reports its index events and load; prints `instance ready on HOST:PORT`
once registered. Stops cleanly on SIGINT / SIGTERM (NOT_SERVING, deregister, running requests get
`--shutdown_grace_s` to finish)."""

from __future__ import annotations

import asyncio
import signal
import sys
import time

from absl import app, flags, logging

from jaxserve.engine.step_trace import StepTrace
from jaxserve.instance.server import PD_MODES, ROLES, InstanceConfig, InstanceServer, build_engine, pd_mode_caching
from jaxserve.security import Secrets, TlsFiles, check_bind
from jaxserve.util import pin_threads, run_async

flags.DEFINE_enum("role", "colocated", sorted(ROLES), "what the instance does")
flags.DEFINE_enum("pd_mode", "caching2", list(PD_MODES),
                  "disaggregated roles: MemServe PD mode (what the prefill and decode sides cache)")
flags.DEFINE_float("kv_transfer_timeout_s", 30.0, "deadline of each KV transfer step (prepare->commit, pull, "
                   "commit->decode); past it the pages are freed and the request fails")
flags.DEFINE_string("scheduler", None, "host:port of the global scheduler (unset: serve unregistered)")
flags.DEFINE_string("host", "127.0.0.1", "address to bind")
flags.DEFINE_integer("port", 0, "port to bind (0: any free port)")
flags.DEFINE_string("instance_id", "", "id to register under ('': the scheduler assigns one)")
flags.DEFINE_string("model", "demo", "model: 'demo', a Hugging Face folder or an Orbax folder")
flags.DEFINE_integer("page_size", 16, "tokens per KV page")
flags.DEFINE_integer("num_pages", 512, "device KV pages")
flags.DEFINE_integer("num_host_pages", 0, "host-tier KV pages")
flags.DEFINE_bool("peer_fetch", False, "colocated, or prefill in a caching pd_mode: serve PushKv and take prefixes "
                  "other instances push (the scheduler's kv_pool policy with --peer_fetch; issue 18)")
flags.DEFINE_enum("kv_transport", "auto", ["auto", "jax", "grpc"],
                  "how this instance sends KV (PD, send-back, peer fetch): jax (jax.experimental.transfer: fast, "
                  "plaintext TCP, for trusted networks), grpc (raw bytes over the instance's own mTLS gRPC link: "
                  "encrypted; single-process instances only) or auto (grpc when --tls_* files are given, else "
                  "jax). Receivers pull either kind")
flags.DEFINE_float("host_kv_gib", None, "host-tier KV size in GiB (sets num_host_pages from the pool's page size "
                   "at --kv_cache_dtype, scales included; not with --num_host_pages)")
flags.DEFINE_enum("kv_cache_dtype", "auto", ["auto", "fp8_e4m3", "fp8_e5m2", "int8"],
                  "KV storage: auto (the model's dtype) or 8 bits with per-token, per-KV-head scales; prefill and "
                  "decode instances must agree")
flags.DEFINE_float("kv_cache_memory_gib", None, "device KV budget in GiB (scales included): sets the page count "
                   "from the page size at --kv_cache_dtype, instead of --num_pages")
flags.DEFINE_bool("prefix_caching", True, "reuse cached prefixes")
flags.DEFINE_integer("max_num_batched_tokens", 256, "token budget per engine step")
flags.DEFINE_integer("max_num_seqs", 32, "requests per engine step")
flags.DEFINE_bool("chunked_prefill", True, "split long prefills across steps")
flags.DEFINE_bool("cut_padding", True, "with chunked prefill: end a step's last prefill chunk at a smaller token "
                  "bucket when the step would pad far past its tokens (544 tokens: 512 + 32, not one 768-row step)")
flags.DEFINE_integer("tp", 1, "tensor-parallel degree")
flags.DEFINE_integer("ep", 1, "expert-parallel degree (MoE models): experts split over ep x tp devices")
flags.DEFINE_list("device_ids", None, "devices of the mesh (default: the first tp)")
flags.DEFINE_string("attention_impl", "auto", "attention implementation")
flags.DEFINE_integer("max_model_len", None, "cap on the context length")
flags.DEFINE_string("dtype", None, "compute dtype (float32 | bfloat16); default: float32 on CPU, else the "
                    "checkpoint's")
flags.DEFINE_integer("seed", 0, "engine seed (random weights, unseeded sampling)")
flags.DEFINE_bool("async_scheduling", True, "dispatch step N+1 before step N's tokens reach the host (overlap)")
flags.DEFINE_string("step_trace", None, "append a JSON-lines trace of every step and each request's milestones "
                    "(arrival, dispatch, first token, hand-over) to this file; summarise it with "
                    "`python -m jaxserve.launch.step_trace_summary FILE` (single-process instances)")
flags.DEFINE_string("compilation_cache", None, "persistent XLA cache folder ('off' to disable)")
flags.DEFINE_bool("profile_at_start", False, "time the cost-model points before registering")
flags.DEFINE_float("shutdown_grace_s", 5.0, "seconds running requests get at shutdown")
flags.DEFINE_string("coordinator_address", None, "multi-process instance: host:port of process 0's coordinator "
                    "(jax.distributed); with --num_processes and --process_id")
flags.DEFINE_integer("num_processes", None, "multi-process instance: number of processes (hosts) of the instance")
flags.DEFINE_integer("process_id", None, "multi-process instance: this process's index (0 is the leader)")
flags.DEFINE_bool("distributed_auto", False, "multi-process instance: jax.distributed.initialize() with "
                  "auto-detected settings (TPU pods, SLURM, ...)")
flags.DEFINE_integer("local_cpu_devices", None, "CPU only (tests): CPU devices per process")
flags.DEFINE_float("step_timeout_s", 60.0, "multi-process instance: a step (or KV transfer op) unfinished after this "
                   "many seconds means a process hangs: requests fail, health NOT_SERVING (0: no watchdog)")
flags.DEFINE_float("compile_grace_s", 600.0, "multi-process instance: extra seconds for a step that compiles first")
flags.DEFINE_bool("precompile", False, "compile every step shape (and, for roles prefill / decode and "
                  "--peer_fetch instances, every KV transfer shape) before registering, so no request waits on a "
                  "compilation (vLLM does this on TPU)")
flags.DEFINE_string("cluster_secret", None, "secret every caller must present (scheduler, peers) and that this "
                    "instance sends; default $JAXSERVE_CLUSTER_SECRET, then $JAXSERVE_API_KEY; unset: none")
flags.DEFINE_string("tls_cert_file", None, "mTLS: this instance's certificate (PEM; its server and client identity)")
flags.DEFINE_string("tls_key_file", None, "mTLS: the private key of --tls_cert_file")
flags.DEFINE_string("tls_ca_file", None, "mTLS: the cluster's CA (PEM); verifies the scheduler, peers and callers")
flags.DEFINE_bool("insecure", False, "allow binding a non-loopback --host with no cluster secret")
flags.DEFINE_list("cpu_cores", [], "after start-up compilation (which uses every core), pin this process's threads "
                  "to these CPU cores (Linux), so serving keeps to its share of the machine; empty: no pinning")
FLAGS = flags.FLAGS


def engine_kwargs_from_flags() -> dict:
    return dict(page_size=FLAGS.page_size, num_pages=FLAGS.num_pages, num_host_pages=FLAGS.num_host_pages,
                host_kv_gib=FLAGS.host_kv_gib,
                enable_prefix_caching=pd_mode_caching(FLAGS.role, FLAGS.pd_mode, FLAGS.prefix_caching), max_num_batched_tokens=FLAGS.max_num_batched_tokens,
                max_num_seqs=FLAGS.max_num_seqs, enable_chunked_prefill=FLAGS.chunked_prefill,
                cut_padding=FLAGS.cut_padding, tp=FLAGS.tp,
                ep=FLAGS.ep,
                device_ids=[int(i) for i in FLAGS.device_ids] if FLAGS.device_ids else None,
                attention_impl=FLAGS.attention_impl, max_model_len=FLAGS.max_model_len, dtype=FLAGS.dtype,
                seed=FLAGS.seed, compilation_cache=FLAGS.compilation_cache, async_scheduling=FLAGS.async_scheduling,
                kv_cache_dtype=FLAGS.kv_cache_dtype, kv_cache_memory_bytes=_gib(FLAGS.kv_cache_memory_gib))


def _gib(value: float | None) -> int | None:
    return None if value is None else int(value * 2**30)


def config_from_flags() -> InstanceConfig:
    return InstanceConfig(role=FLAGS.role, host=FLAGS.host, port=FLAGS.port, scheduler_address=FLAGS.scheduler,
                          instance_id=FLAGS.instance_id, model_name=FLAGS.model,
                          profile_at_start=FLAGS.profile_at_start, shutdown_grace_s=FLAGS.shutdown_grace_s,
                          pd_mode=FLAGS.pd_mode, kv_transfer_timeout_s=FLAGS.kv_transfer_timeout_s,
                          peer_fetch=FLAGS.peer_fetch, kv_transport=FLAGS.kv_transport,
                          step_timeout_s=FLAGS.step_timeout_s if multiprocess_flags() else 0.0,
                          compile_grace_s=FLAGS.compile_grace_s, tls_cert_file=FLAGS.tls_cert_file,
                          tls_key_file=FLAGS.tls_key_file, tls_ca_file=FLAGS.tls_ca_file, insecure=FLAGS.insecure)


def secrets_from_flags() -> Secrets:
    return Secrets.resolve(cluster_secret=FLAGS.cluster_secret)


def multiprocess_flags() -> bool:
    return bool(FLAGS.distributed_auto or FLAGS.num_processes is not None or FLAGS.coordinator_address)


def precompile_with_progress(engine, transfers: bool = False) -> dict:
    """`precompile.precompile` with a progress bar (counts, rate and ETA) on stderr."""
    from tqdm import tqdm

    from jaxserve.engine.precompile import precompile
    name = FLAGS.instance_id or "instance"
    with tqdm(desc=f"{name}: compiling step shapes", unit="shape", file=sys.stderr, mininterval=1.0,
              dynamic_ncols=True) as bar:
        def progress(done, total):
            bar.total = total
            bar.update(done - bar.n)
        result = precompile(engine, transfers=transfers, progress=progress)
    logging.info("%s: precompiled %s", name, result)
    return result


async def serve(server: InstanceServer) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    print(f"instance ready on {server.address} as {server.instance_id or '-'}", flush=True)
    await stop.wait()
    logging.info("shutting down")
    await server.stop()


def main(argv):
    del argv
    try:  # before anything listens (the multi-process op channel binds --host too); a message, not a traceback
        config_from_flags()
        TlsFiles.of(FLAGS.tls_cert_file, FLAGS.tls_key_file, FLAGS.tls_ca_file)  # the files exist
        check_bind(FLAGS.host, secrets_from_flags().cluster_secret, FLAGS.insecure, "instance",
                   flag="--cluster_secret")
        if multiprocess_flags():  # refuse --kv_transport=grpc before the processes connect
            from jaxserve.instance.pd_common import resolve_kv_transport
            resolve_kv_transport(FLAGS.kv_transport, tls=FLAGS.tls_cert_file is not None, num_processes=2)
    except ValueError as e:
        raise SystemExit(f"jaxserve.launch.instance: {e}") from None
    multiprocess = multiprocess_flags()
    if multiprocess:  # before anything touches jax's backends (jaxserve/engine/multihost.py)
        from jaxserve.engine import multihost
        if FLAGS.distributed_auto:
            multihost.initialize(local_device_count=FLAGS.local_cpu_devices)
        else:
            multihost.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                 local_device_count=FLAGS.local_cpu_devices)
    elif FLAGS.local_cpu_devices:
        import jax
        jax.config.update("jax_num_cpu_devices", FLAGS.local_cpu_devices)
    if not multiprocess:
        t0 = time.perf_counter()
        engine = build_engine(FLAGS.model, **engine_kwargs_from_flags())
        logging.info("%s: model loaded in %.1f s", FLAGS.instance_id or "instance", time.perf_counter() - t0)
        if FLAGS.precompile:
            # KV gather/scatter shapes: PD roles move KV on every request, colocated peer-fetch instances on
            # every pull (uncompiled, a served run's first pulls stalled 0.7-0.9 s each).
            precompile_with_progress(engine, transfers=FLAGS.role != "colocated" or FLAGS.peer_fetch)
        if FLAGS.step_trace:  # after precompile: its warm-up runs are not served requests
            engine.step_trace = StepTrace(FLAGS.step_trace)
        if FLAGS.cpu_cores:
            logging.info("pinned %d threads to CPU cores %s", pin_threads(FLAGS.cpu_cores), ",".join(FLAGS.cpu_cores))
        run_async(serve(InstanceServer(engine, config_from_flags(), secrets=secrets_from_flags())))
        return
    import jax
    # The device-op channel first (collective): every process's engine runs its device work through it.
    tls = TlsFiles.of(FLAGS.tls_cert_file, FLAGS.tls_key_file, FLAGS.tls_ca_file)
    ops = multihost.connect(bind_host=FLAGS.host, secret=secrets_from_flags().cluster_secret,
                            tls=tls.op_channel_contexts() if tls is not None else None)
    engine = build_engine(FLAGS.model, ops=ops, **engine_kwargs_from_flags())
    multihost.check_supported(engine)
    server, addresses = None, None
    if FLAGS.role != "colocated":  # KV transfers: every process moves its own shards with its own server
        from jaxserve.mempool.transfer import TransferServer
        server = TransferServer(address=f"{FLAGS.host}:0")
        port = server.address.rsplit(":", 1)[1]  # a wildcard bind is advertised as a reachable address
        addresses = multihost.exchange_addresses(f"{multihost.routable_host(FLAGS.host)}:{port}")
        logging.info("process %d: transfer server %s (all: %s)", jax.process_index(), server.address, addresses)
        multihost.KvShardOps(engine, server, addresses)  # binds the kv_offer / kv_receive ops
    if jax.process_index() != 0:  # a follower: no gRPC, only the leader's device ops
        logging.info("follower %d of %d: running the leader's steps", jax.process_index(), jax.process_count())
        steps = multihost.follower_loop(engine)
        logging.info("follower stopped after %d steps", steps)
        return
    if FLAGS.precompile:  # the steps only: the followers compile them too, from the broadcast
        precompile_with_progress(engine)
    try:
        run_async(serve(InstanceServer(engine, config_from_flags(), transfer_server=server,
                                         transfer_addresses=addresses, secrets=secrets_from_flags())))
    finally:
        try:
            multihost.stop_followers(engine)
        except Exception as e:  # noqa: BLE001 - a follower is already gone (the instance broke)
            logging.warning("could not stop the followers: %s", e)


if __name__ == "__main__":
    app.run(main)
