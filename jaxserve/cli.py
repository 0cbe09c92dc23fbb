"""The `jaxserve` command: `jaxserve serve MODEL` (the OpenAI API in one command, like `vllm serve`), and
`jaxserve bench ...` / `jaxserve sim ...` in front of the absl launchers.

    jaxserve serve demo                                   # http://127.0.0.1:8000/v1
    jaxserve serve /path/to/hf_model --num-instances 2 --api-key sk-local
    jaxserve serve /path/to/hf_model --prefill-instances 1 --decode-instances 1 --pd-mode caching2
    jaxserve bench --settings=colocated,colocated+cache      # = python -m jaxserve.launch.bench ...
    jaxserve sim --mode=table                                # = python -m jaxserve.launch.sim ...

`serve` starts the global scheduler (in this process, with the HTTP front) and the instances (child
processes, `jaxserve.launch.instance`). Each instance loads the model, compiles every step shape it can run
(a progress bar per instance; `--no-precompile` skips it and lets first requests compile), times its cost
model and registers; the server prints `ready` once all have registered, so no request waits on a compile.
Options use vLLM's names where vLLM has one."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time

from jaxserve.scheduler.policies import POLICIES
from jaxserve.util import run_async

ABSL_VERBOSITY = {"debug": 1, "info": 0, "warning": -1, "error": -2}
DEFAULT_MAX_MODEL_LEN = 2048  # a checkpoint's own context can be 32k+: pages and shapes grow with it


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxserve serve", description="Serve a model over the OpenAI HTTP API.")
    p.add_argument("model", nargs="?", default="demo",
                   help="'demo' (bundled), a Hugging Face model folder, or an Orbax folder")
    p.add_argument("--host", default="127.0.0.1", help="HTTP address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000; 0: any free port)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: "
                   "$JAXSERVE_API_KEY; unset: no key, allowed on loopback only unless --insecure)")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key")
    p.add_argument("--cluster-secret", default=None, help="secret of the internal gRPC links (default: "
                   "$JAXSERVE_CLUSTER_SECRET, else the API key)")
    p.add_argument("--ssl-certfile", default=None, help="serve HTTPS (and TLS on the internal links) with this "
                   "certificate chain (PEM)")
    p.add_argument("--ssl-keyfile", default=None, help="the key of --ssl-certfile (PEM)")
    p.add_argument("--ssl-ca-certs", default=None, help="CA of the internal links' certificates: with it, the "
                   "scheduler and instances use mutual TLS")
    p.add_argument("--served-model-name", nargs="+", default=None, help="model names the API answers to "
                   "(default: MODEL)")
    p.add_argument("--grpc-port", type=int, default=0, help="the scheduler's gRPC port (default: any free port)")
    p.add_argument("--num-instances", type=int, default=1, help="colocated instances (default 1)")
    p.add_argument("--prefill-instances", type=int, default=0, help="disaggregated: prefill instances")
    p.add_argument("--decode-instances", type=int, default=0, help="disaggregated: decode instances")
    p.add_argument("--pd-mode", default="caching2", choices=["basic", "caching1", "caching2", "caching3"],
                   help="disaggregated: MemServe PD mode (default caching2)")
    p.add_argument("--policy", default="locality", choices=POLICIES, help="routing policy (default locality)")
    p.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=1, help="tensor-parallel degree")
    p.add_argument("--max-model-len", type=int, default=None,
                   help=f"context length (default: the model's, at most {DEFAULT_MAX_MODEL_LEN})")
    p.add_argument("--max-num-seqs", type=int, default=32, help="requests per engine step (default 32)")
    p.add_argument("--max-num-batched-tokens", type=int, default=256, help="tokens per engine step (default 256)")
    p.add_argument("--num-pages", type=int, default=512, help="device KV pages per instance (default 512)")
    p.add_argument("--num-host-pages", type=int, default=0, help="host-tier KV pages per instance (default 0)")
    p.add_argument("--host-kv-gib", type=float, default=None, help="host-tier KV per instance in GiB (instead of "
                   "--num-host-pages)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8_e4m3", "fp8_e5m2", "int8"],
                   help="KV storage: the model's dtype, or 8 bits with per-token scales (about 2x the cached tokens)")
    p.add_argument("--kv-cache-memory-gib", type=float, default=None, help="device KV per instance in GiB "
                   "(instead of --num-pages)")
    p.add_argument("--peer-fetch", action="store_true", help="colocated (or prefill) instances pull a cached prefix "
                   "from another instance instead of recomputing it (the kv_pool routing policy)")
    p.add_argument("--kv-transport", default="auto", choices=["auto", "jax", "grpc"],
                   help="how instances move KV (PD, peer fetch): jax (jax.experimental.transfer, plaintext, for "
                   "trusted networks), grpc (over the instances' own mTLS gRPC links: encrypted) or auto (grpc "
                   "when --ssl-ca-certs turns on mTLS, else jax)")
    p.add_argument("--page-size", "--block-size", dest="page_size", type=int, default=16,
                   help="tokens per KV page (default 16)")
    p.add_argument("--dtype", default=None, help="compute dtype: float32 | bfloat16 (default: float32 on CPU, "
                   "the checkpoint's on GPU/TPU)")
    p.add_argument("--no-prefix-caching", action="store_true", help="do not reuse cached prefixes")
    p.add_argument("--no-precompile", action="store_true", help="start serving before compiling every shape "
                   "(faster start; the first requests of each shape wait on a compile)")
    p.add_argument("--no-profile", action="store_true", help="skip timing the cost model at start-up "
                   "(routing then uses a default cost model)")
    p.add_argument("--compilation-cache", default=None, help="persistent XLA cache folder ('off' to disable; "
                   "default ~/.cache/jaxserve/xla or $JAXSERVE_COMPILATION_CACHE)")
    p.add_argument("--seed", type=int, default=0, help="engine seed")
    p.add_argument("--ready-timeout", type=float, default=1800.0, help="seconds instances get to register")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def instance_flags(args) -> dict:
    flags = dict(page_size=args.page_size, num_pages=args.num_pages, num_host_pages=args.num_host_pages,
                 max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
                 tp=args.tp, seed=args.seed, prefix_caching=not args.no_prefix_caching,
                 precompile=not args.no_precompile, profile_at_start=not args.no_profile,
                 kv_cache_dtype=args.kv_cache_dtype,
                 verbosity=ABSL_VERBOSITY[args.log_level])
    if args.dtype:
        flags["dtype"] = args.dtype
    if args.host_kv_gib is not None:
        flags.pop("num_host_pages")
        flags["host_kv_gib"] = args.host_kv_gib
    if args.kv_cache_memory_gib is not None:
        flags["kv_cache_memory_gib"] = args.kv_cache_memory_gib
    if args.peer_fetch:
        flags["peer_fetch"] = True
    if args.kv_transport != "auto":
        flags["kv_transport"] = args.kv_transport
    if args.compilation_cache:
        flags["compilation_cache"] = args.compilation_cache
    return flags


def max_model_len_for(model: str, requested: int | None) -> int | None:
    if requested is not None:
        return requested
    from jaxserve.scheduler import load_model_info
    return min(load_model_info(model).max_model_len, DEFAULT_MAX_MODEL_LEN)


async def serve(args) -> int:
    from jaxserve.launch.local import LocalCluster
    from jaxserve.scheduler.http_front import HttpFront

    from jaxserve.security import Secrets, TlsFiles, check_bind
    try:
        secrets = Secrets.resolve(args.api_key, args.cluster_secret)
        check_bind(args.host, secrets.api_key, args.insecure, "jaxserve serve", flag="--api-key")
        tls = TlsFiles.of(args.ssl_certfile, args.ssl_keyfile, args.ssl_ca_certs)
    except ValueError as e:
        print(f"jaxserve serve: {e}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    try:
        max_model_len = max_model_len_for(args.model, args.max_model_len)
    except (OSError, ValueError) as e:
        print(f"jaxserve serve: cannot serve {args.model!r}: {e}", file=sys.stderr)
        return 2
    scheduler_config = dict(profile_instances=not args.no_profile)
    if args.peer_fetch:
        scheduler_config["peer_fetch"] = True
    cluster = LocalCluster(model=args.model, num_instances=args.num_instances, port=args.grpc_port,
                           policy="kv_pool" if args.peer_fetch else args.policy, instance_flags=instance_flags(args),
                           scheduler_config=scheduler_config,
                           max_model_len=max_model_len, ready_timeout_s=args.ready_timeout,
                           prefill_instances=args.prefill_instances, decode_instances=args.decode_instances,
                           pd_mode=args.pd_mode, secrets=secrets, tls=tls)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"jaxserve: starting {cluster.num_instances} instance(s) of {args.model} (max_model_len "
          f"{max_model_len}); each loads, compiles its step shapes and registers", flush=True)
    starting = asyncio.ensure_future(cluster.start())
    waiting = asyncio.ensure_future(stop.wait())
    await asyncio.wait([starting, waiting], return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():  # a signal while starting: stop what did start
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        return 0
    try:
        starting.result()
    except (RuntimeError, TimeoutError) as e:
        print(f"jaxserve serve: {e}", file=sys.stderr)
        return 1
    front = HttpFront(cluster.scheduler, host=args.host, port=args.port, api_key=secrets.api_key,
                      served_model_names=args.served_model_name, tls=tls, insecure=args.insecure)
    try:
        await front.start()
        print(f"jaxserve: ready in {time.monotonic() - t0:.1f} s: OpenAI API at {front.url}/v1 (model "
              f"{', '.join(front.names)}), scheduler gRPC at {cluster.address}", flush=True)
        await waiting
        print("jaxserve: shutting down", flush=True)
    finally:
        await front.stop()
        await cluster.stop()
    return 0


def _run_launcher(module: str, argv: list[str]) -> int:
    """An absl launcher as if run with `python -m module argv...`."""
    import runpy
    sys.argv = [module] + argv
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


COMMANDS = {
    "bench": "jaxserve.launch.bench",
    "sim": "jaxserve.launch.sim",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = ("usage: jaxserve serve [MODEL] [options]   (jaxserve serve --help)\n"
             "       jaxserve bench [absl flags]         (the served benchmark: jaxserve bench --helpfull)\n"
             "       jaxserve sim [absl flags]           (the cluster simulator)\n")
    if not argv or argv[0] in ("-h", "--help"):
        print(usage, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        args = serve_parser().parse_args(rest)
        logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
        return run_async(serve(args))
    if command in COMMANDS:
        return _run_launcher(COMMANDS[command], rest)
    print(f"jaxserve: unknown command {command!r}\n{usage}", file=sys.stderr, end="")
    return 2


if __name__ == "__main__":
    sys.exit(main())
