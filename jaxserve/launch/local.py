"""A whole cluster on one machine: the global scheduler (in this process) plus N colocated instances, or P
prefill and D decode instances (disaggregated), each its own process (`jaxserve.launch.instance`), pinned to its
share of the cores when there are two or more instances.

    python -m jaxserve.launch.local --model=demo --num_instances=2 --port=50050
    python -m jaxserve.launch.local --model=demo --prefill_instances=1 --decode_instances=1 --pd_mode=caching2

Prints `cluster ready: scheduler at HOST:PORT` once every instance has registered. Ctrl-C / SIGTERM stops the
instances (SIGTERM, then SIGKILL after --shutdown_timeout_s) and the scheduler; instances also die with this
process if it is killed outright (PR_SET_PDEATHSIG), so nothing is left behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# gRPC's fork handlers can abort a child forked while this process's gRPC threads run (instances are
# started with fork + exec); the children exec at once, so they need no fork support. Set before grpc loads.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

from absl import app, flags, logging  # noqa: E402

from jaxserve.scheduler import POLICIES, GlobalSchedulerConfig, Scheduler, load_model_info  # noqa: E402
from jaxserve.security import API_KEY_ENV, CLUSTER_SECRET_ENV, Secrets, TlsFiles  # noqa: E402
from jaxserve.util import die_with_parent  # noqa: E402

flags.DEFINE_string("model", "demo", "model: 'demo', a Hugging Face folder or an Orbax folder")
flags.DEFINE_integer("num_instances", 2, "colocated instances (ignored when --prefill_instances/--decode_instances "
                     "are set)")
flags.DEFINE_integer("prefill_instances", 0, "disaggregated: prefill instances (needs --decode_instances too)")
flags.DEFINE_integer("decode_instances", 0, "disaggregated: decode instances (needs --prefill_instances too)")
flags.DEFINE_enum("pd_mode", "caching2", ["basic", "caching1", "caching2", "caching3"],
                  "disaggregated: MemServe PD mode of every instance")
flags.DEFINE_float("kv_transfer_timeout_s", 30.0, "disaggregated: deadline of each KV transfer step")
flags.DEFINE_string("host", "127.0.0.1", "scheduler address to bind")
flags.DEFINE_integer("port", 50050, "scheduler port (0: any free port)")
flags.DEFINE_enum("policy", "locality", POLICIES, "routing policy")
flags.DEFINE_bool("pin", True, "pin each instance to its share of the cores (fewer instances than cores: a slice "
                  "each; more: core k mod the cores); a single instance keeps every core")
flags.DEFINE_integer("page_size", 16, "tokens per KV page")
flags.DEFINE_integer("num_pages", 512, "device KV pages per instance")
flags.DEFINE_enum("kv_cache_dtype", "auto", ["auto", "fp8_e4m3", "fp8_e5m2", "int8"],
                  "KV storage of every instance (see jaxserve.launch.instance)")
flags.DEFINE_integer("max_num_batched_tokens", 256, "token budget per engine step")
flags.DEFINE_integer("max_num_seqs", 32, "requests per engine step")
flags.DEFINE_integer("max_model_len", None, "cap on the context length")
flags.DEFINE_bool("profile_instances", True, "instances time the cost-model points before registering")
flags.DEFINE_float("ready_timeout_s", 300.0, "how long instances get to start and register")
flags.DEFINE_bool("precompile", False, "instances compile every step / KV transfer shape before registering "
                  "(jaxserve.launch.instance --precompile): no request waits on a compilation; slower start")
flags.DEFINE_float("shutdown_timeout_s", 10.0, "how long instances get to exit before SIGKILL")
flags.DEFINE_string("api_key", None, "client API key of the scheduler's gRPC (default $JAXSERVE_API_KEY; unset: none)")
flags.DEFINE_string("cluster_secret", None, "secret of the internal links (default $JAXSERVE_CLUSTER_SECRET, then the "
                    "API key); handed to the instances in their environment, not on their command line")
flags.DEFINE_string("tls_cert_file", None, "certificate (PEM) of every process: the scheduler's TLS, and with "
                    "--tls_ca_file mTLS between the scheduler and the instances and between instances")
flags.DEFINE_string("tls_key_file", None, "private key (PEM) of --tls_cert_file")
flags.DEFINE_string("tls_ca_file", None, "CA (PEM) that signed the certificates: turns on mTLS on the internal links")
flags.DEFINE_bool("insecure", False, "allow binding a non-loopback address with no API key / cluster secret")
FLAGS = flags.FLAGS

ROOT = Path(__file__).resolve().parents[2]  # the repository (jaxserve/launch/ -> ../..)


class LocalCluster:
    """Scheduler in this process, instances as child processes. `async with LocalCluster(...) as c:` starts
    everything and waits until every instance has registered; `c.address` is the scheduler's address."""

    def __init__(self, model: str = "demo", num_instances: int = 2, *, host: str = "127.0.0.1", port: int = 0,
                 policy: str = "locality", pin: bool = True, instance_flags: dict | None = None,
                 scheduler_config: dict | None = None, max_model_len: int | None = None,
                 ready_timeout_s: float = 300.0, shutdown_timeout_s: float = 10.0, quiet: bool = False,
                 prefill_instances: int = 0, decode_instances: int = 0, pd_mode: str = "caching2",
                 env: dict | None = None, secrets: Secrets = Secrets(), tls: TlsFiles | None = None):
        """secrets: the scheduler's API key and the cluster secret (the instances get the latter in their
        environment); tls: every process's certificate, key and CA (with a CA: mTLS between the processes)."""
        if bool(prefill_instances) != bool(decode_instances):
            raise ValueError(f"a disaggregated cluster needs prefill and decode instances, got "
                             f"{prefill_instances} prefill and {decode_instances} decode")
        self.model = model
        # One role per instance process: colocated-k, or prefill-k then decode-k.
        if prefill_instances:
            self.roles = [("prefill", k) for k in range(prefill_instances)] + \
                         [("decode", k) for k in range(decode_instances)]
        else:
            self.roles = [("colocated", k) for k in range(num_instances)]
        self.num_instances = len(self.roles)
        self.pd_mode = pd_mode
        self.env = env
        self.secrets = secrets
        self.tls = tls
        tls_config = {} if tls is None else dict(tls_cert_file=tls.cert_file, tls_key_file=tls.key_file,
                                                 tls_ca_file=tls.ca_file)
        self.config = GlobalSchedulerConfig(host=host, port=port, policy=policy,
                                            **{**tls_config, **(scheduler_config or {})})
        self.max_model_len = max_model_len
        self.pin = pin
        self.instance_flags = dict(instance_flags or {})
        self.ready_timeout_s = ready_timeout_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self.quiet = quiet
        self.scheduler: Scheduler | None = None
        self.procs: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        return self.scheduler.address

    def _cores(self, k: int) -> list[int]:
        """Instance k's share of this process's cores: a slice each when there are fewer instances than cores,
        core k mod the cores when there are more; none (no pinning) for a single instance, or without `pin`.
        (One instance pinned to one core of two was slower on every served row: its prefill lost half its
        dot rate and its two XLA threads shared a core; docs/notes-issue-14.md.)"""
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        n = len(self.roles)
        if not self.pin or len(cores) < 2 or n < 2:
            return []
        if n >= len(cores):
            return [cores[k % len(cores)]]
        return cores[k * len(cores) // n:(k + 1) * len(cores) // n]

    def _spawn(self, k: int) -> subprocess.Popen:
        role, index = self.roles[k]
        flags_ = {"role": role, "scheduler": self.address, "host": "127.0.0.1", "port": 0,
                  "instance_id": f"{role}-{index}", "model": self.model, **self.instance_flags}
        if role != "colocated":
            flags_.setdefault("pd_mode", self.pd_mode)
        if role == "decode":
            flags_.pop("peer_fetch", None)  # prefixes are pulled by the instance that computes the prompt
        if self.max_model_len:
            flags_.setdefault("max_model_len", self.max_model_len)
        if self.tls is not None:
            flags_.update(tls_cert_file=self.tls.cert_file, tls_key_file=self.tls.key_file,
                          tls_ca_file=self.tls.ca_file)
        cores = self._cores(k)
        if cores:  # after its start-up compilation, which may use every core
            flags_.setdefault("cpu_cores", ",".join(map(str, cores)))
        cmd = [sys.executable, "-m", "jaxserve.launch.instance"] + [f"--{name}={value}" for name, value in flags_.items()]
        out = subprocess.DEVNULL if self.quiet else None
        # The secret goes in the environment, not argv (ps shows argv to everyone); without one, the children
        # must not pick one up from ours either, or they would refuse this scheduler.
        env = {k: v for k, v in dict(os.environ, **(self.env or {})).items()
               if k not in (API_KEY_ENV, CLUSTER_SECRET_ENV)}
        if self.secrets.cluster_secret is not None:
            env[CLUSTER_SECRET_ENV] = self.secrets.cluster_secret
        return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=out, preexec_fn=die_with_parent, env=env)

    async def start(self) -> "LocalCluster":
        self.scheduler = Scheduler(self.config, load_model_info(self.model, self.max_model_len), secrets=self.secrets)
        await self.scheduler.start()
        try:
            self.procs = [self._spawn(k) for k in range(self.num_instances)]
            deadline = time.monotonic() + self.ready_timeout_s
            while len(self.scheduler.router.instances) < self.num_instances:
                dead = [p for p in self.procs if p.poll() is not None]
                if dead:
                    raise RuntimeError(f"instance process {dead[0].args[-1] if dead[0].args else ''} exited with "
                                       f"code {dead[0].returncode} before registering")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(self.scheduler.router.instances)} of {self.num_instances} instances "
                                       f"registered within {self.ready_timeout_s:g} s")
                await asyncio.sleep(0.1)
        except BaseException:
            await self.stop()
            raise
        return self

    async def stop(self) -> None:
        """SIGTERM every instance, SIGKILL the ones still there after shutdown_timeout_s, stop the scheduler."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.shutdown_timeout_s
        while any(p.poll() is None for p in self.procs) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for p in self.procs:
            if p.poll() is None:
                logging.warning("instance pid %d did not exit in %.0f s: killing it", p.pid, self.shutdown_timeout_s)
                p.kill()
                p.wait()
        if self.scheduler is not None:
            await self.scheduler.stop(0)

    async def __aenter__(self) -> "LocalCluster":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()


def cluster_from_flags(**overrides) -> LocalCluster:
    kw = dict(model=FLAGS.model, num_instances=FLAGS.num_instances, host=FLAGS.host, port=FLAGS.port,
              policy=FLAGS.policy, pin=FLAGS.pin, max_model_len=FLAGS.max_model_len,
              instance_flags=dict(page_size=FLAGS.page_size, num_pages=FLAGS.num_pages,
                                  max_num_batched_tokens=FLAGS.max_num_batched_tokens,
                                  max_num_seqs=FLAGS.max_num_seqs,
                                  # Profiling before registering keeps it from delaying the first requests
                                  # (the scheduler then takes the profile from the registration).
                                  profile_at_start=FLAGS.profile_instances, precompile=FLAGS.precompile,
                                  kv_cache_dtype=FLAGS.kv_cache_dtype),
              scheduler_config=dict(profile_instances=FLAGS.profile_instances),
              ready_timeout_s=FLAGS.ready_timeout_s, shutdown_timeout_s=FLAGS.shutdown_timeout_s,
              prefill_instances=FLAGS.prefill_instances, decode_instances=FLAGS.decode_instances,
              pd_mode=FLAGS.pd_mode, secrets=Secrets.resolve(FLAGS.api_key, FLAGS.cluster_secret),
              tls=TlsFiles.of(FLAGS.tls_cert_file, FLAGS.tls_key_file, FLAGS.tls_ca_file))
    kw["scheduler_config"]["insecure"] = FLAGS.insecure
    if FLAGS.prefill_instances:
        kw["instance_flags"]["kv_transfer_timeout_s"] = FLAGS.kv_transfer_timeout_s
    kw.update(overrides)
    return LocalCluster(**kw)


async def serve(cluster: LocalCluster) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # A signal while instances are still starting cancels the start, which stops what did start.
    starting = asyncio.ensure_future(cluster.start())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait([starting, stopping], return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        return
    starting.result()
    try:
        counts: dict[str, int] = {}
        for role, _ in cluster.roles:
            counts[role] = counts.get(role, 0) + 1
        what = ", ".join(f"{n} {role}" for role, n in counts.items())
        mode = "" if list(counts) == ["colocated"] else f", pd_mode {cluster.pd_mode}"
        print(f"cluster ready: scheduler at {cluster.address} ({cluster.num_instances} instances: {what}, model "
              f"{cluster.model}{mode})", flush=True)
        await stopping
        logging.info("shutting down")
    finally:
        await cluster.stop()


def main(argv):
    del argv
    asyncio.run(serve(cluster_from_flags()))


if __name__ == "__main__":
    app.run(main)
