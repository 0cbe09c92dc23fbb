"""Run the global scheduler as a process.

    python -m jaxserve.launch.scheduler --model=demo --port=50050 --policy=locality --http_port=8000

Instances register themselves with it (Scheduler.Register); clients use `jaxserve.client`. Stops cleanly on
SIGINT / SIGTERM (health goes NOT_SERVING, running requests get `--shutdown_grace_s` to finish).

With `--http_port` the same process also serves the OpenAI-compatible HTTP API and Prometheus `/metrics`
(`jaxserve.scheduler.http_front`); `--api_key` (or $JAXSERVE_API_KEY) guards every HTTP route but /health and
the client RPCs of the gRPC API; `--cluster_secret` (default: the API key) the instances' and operators' RPCs
(`jaxserve.security.ACCESS`). With neither, the scheduler binds loopback only unless `--insecure`."""

from __future__ import annotations

import asyncio
import signal

from absl import app, flags, logging

from jaxserve.scheduler import POLICIES, GlobalSchedulerConfig, Scheduler, load_model_info
from jaxserve.scheduler.config import MODES
from jaxserve.security import Secrets, TlsFiles, check_bind
from jaxserve.util import run_async

flags.DEFINE_string("model", "demo", "model folder (or a bundled name) for the tokenizer and context length")
flags.DEFINE_integer("max_model_len", None, "cap on the model's context length")
flags.DEFINE_string("host", "127.0.0.1", "address to bind (0.0.0.0 to accept remote clients)")
flags.DEFINE_integer("port", 50050, "port to bind (0: any free port)")
flags.DEFINE_enum("policy", "locality", POLICIES, "routing policy")
flags.DEFINE_enum("mode", "auto", MODES, "deployment mode (auto: colocated if any colocated instance)")
flags.DEFINE_integer("max_queued_requests", 1024, "admission limit in requests")
flags.DEFINE_integer("max_queued_tokens", 1 << 22, "admission limit in tokens (prompt + max_tokens)")
flags.DEFINE_integer("default_max_tokens", 16, "max_tokens when a request leaves it out")
flags.DEFINE_float("load_guard_factor", 1.5, "locality/session: skip instances above factor x mean load + slack")
flags.DEFINE_float("load_guard_slack", 2.0, "locality/session: load guard slack, in requests")
flags.DEFINE_float("health_interval_s", 1.0, "seconds between health probes of each instance")
flags.DEFINE_float("health_timeout_s", 1.0, "health probe timeout")
flags.DEFINE_integer("unhealthy_after", 2, "failed probes in a row before an instance is taken out")
flags.DEFINE_integer("max_migrations", 2, "times a request may move after instance failures")
flags.DEFINE_float("stall_timeout_s", None, "a started stream silent this long counts as a failure")
flags.DEFINE_bool("generate_many", True, "colocated requests to an instance share one GenerateMany call (a message "
                  "per engine step); false: a Generate call per request")
flags.DEFINE_float("no_instance_wait_s", 5.0, "how long a request waits for an instance to come up")
flags.DEFINE_bool("profile_instances", True, "calibrate each instance's cost model with Instance.Profile")
flags.DEFINE_float("shutdown_grace_s", 5.0, "seconds running requests get at shutdown")
flags.DEFINE_bool("peer_fetch", False, "policy kv_pool: a request routed away from its prefix's holder has the holder "
                  "push the prefix first (instances need --peer_fetch; issue 18)")
flags.DEFINE_float("peer_fetch_timeout_s", 10.0, "peer fetch: longest wait for a push before recomputing")
flags.DEFINE_integer("kv_bytes_per_token", 131072, "peer fetch: the model's KV bytes per token (transfer model)")
flags.DEFINE_float("peer_link_bytes_s", 50e9, "peer fetch: instance-to-instance KV bandwidth (transfer model)")
flags.DEFINE_float("peer_link_latency_s", 5e-4, "peer fetch: per-pull latency (transfer model)")
flags.DEFINE_string("tls_cert_file", None, "server certificate chain (PEM) for TLS")
flags.DEFINE_string("tls_key_file", None, "server private key (PEM) for TLS")
flags.DEFINE_integer("http_port", None, "port of the OpenAI-compatible HTTP API and /metrics (unset: no HTTP; "
                     "0: any free port)")
flags.DEFINE_string("http_host", None, "address the HTTP API binds (default: --host)")
flags.DEFINE_string("api_key", None, "client API key of HTTP and gRPC (Authorization: Bearer); default "
                    "$JAXSERVE_API_KEY, unset: none")
flags.DEFINE_string("cluster_secret", None, "secret of instance registration, DrainInstance and the scheduler's calls to "
                    "instances; default $JAXSERVE_CLUSTER_SECRET, then the API key")
flags.DEFINE_string("tls_ca_file", None, "the cluster's CA (PEM): with it the links to instances are mTLS (needs "
                    "--tls_cert_file / --tls_key_file, shown to the instances as client certificate)")
flags.DEFINE_bool("insecure", False, "allow binding a non-loopback address with no API key / cluster secret")
flags.DEFINE_string("http_tls_cert_file", None, "HTTPS certificate (PEM; default --tls_cert_file)")
flags.DEFINE_string("http_tls_key_file", None, "HTTPS private key (PEM; default --tls_key_file)")
flags.DEFINE_list("served_model_name", None, "model names the HTTP API answers to (default: --model)")
flags.DEFINE_string("chat_template", None, "chat template (a file or the template text) instead of the model's")
flags.DEFINE_integer("http_max_json_depth", 64, "HTTP bodies: JSON arrays and objects nest at most this deep")
flags.DEFINE_integer("http_max_completions_per_request", 256, "HTTP: at most this many prompts x n per request")
flags.DEFINE_integer("http_max_prompt_bytes", 4 << 20, "HTTP: prompt bytes per request (UTF-8 text, 4 per token "
                     "id), checked before tokenizing")
flags.DEFINE_float("http_header_timeout_s", 10.0, "HTTP: a connection that has not sent a whole request line and "
                   "headers this long after it opened (or after its last response) is closed")
flags.DEFINE_float("http_body_timeout_s", 30.0, "HTTP: a request body not fully received this long after its "
                   "headers is answered 408 and its connection closed")
flags.DEFINE_integer("http_max_connections", 1024, "HTTP: beyond this many open connections requests get 503 "
                     "(and their connection is closed); /health still answers")
flags.DEFINE_integer("max_prompt_bytes", 4 << 20, "gRPC: a text prompt longer than this (UTF-8 bytes) is refused "
                     "before it is tokenized")
flags.DEFINE_bool("salt_cache_by_api_key", False, "tenant isolation: every request's prefix-cache salt includes "
                  "a hash of the API key it presented, so clients with different keys never share cached KV "
                  "(--api_key may list several keys, comma-separated)")
flags.DEFINE_string("step_trace", None, "append a JSON-lines trace of each served request's milestones here (HTTP "
                    "request in, routed, first tokens back from the instance, first token written to the client); "
                    "`python -m jaxserve.launch.step_trace_summary FILE [INSTANCE_FILE]` joins it with an "
                    "instance's --step_trace")
FLAGS = flags.FLAGS


def config_from_flags() -> GlobalSchedulerConfig:
    names = ("host", "port", "policy", "mode", "max_queued_requests", "max_queued_tokens", "default_max_tokens",
             "max_model_len", "load_guard_factor", "load_guard_slack", "health_interval_s", "health_timeout_s",
             "unhealthy_after", "max_migrations", "stall_timeout_s", "generate_many", "no_instance_wait_s", "profile_instances",
             "shutdown_grace_s", "tls_cert_file", "tls_key_file", "tls_ca_file", "insecure", "peer_fetch",
             "peer_fetch_timeout_s", "kv_bytes_per_token", "peer_link_bytes_s", "peer_link_latency_s",
             "salt_cache_by_api_key", "max_prompt_bytes")
    return GlobalSchedulerConfig(**{name: FLAGS[name].value for name in names})


async def serve(config: GlobalSchedulerConfig, secrets: Secrets) -> None:
    scheduler = Scheduler(config, load_model_info(FLAGS.model, FLAGS.max_model_len), secrets=secrets)
    if FLAGS.step_trace:
        from jaxserve.engine.step_trace import StepTrace  # no jax: the trace writer only
        scheduler.core.step_trace = StepTrace(FLAGS.step_trace)
    await scheduler.start()
    front = None
    if FLAGS.http_port is not None:
        from jaxserve.scheduler.http_front import HttpFront  # aiohttp and prometheus-client only when asked

        front = HttpFront(scheduler, host=FLAGS.http_host or config.host, port=FLAGS.http_port,
                          api_key=secrets.api_key, insecure=config.insecure,
                          tls=TlsFiles.of(FLAGS.http_tls_cert_file or config.tls_cert_file,
                                          FLAGS.http_tls_key_file or config.tls_key_file),
                          served_model_names=FLAGS.served_model_name, chat_template=FLAGS.chat_template,
                          shutdown_grace_s=config.shutdown_grace_s, max_json_depth=FLAGS.http_max_json_depth,
                          max_completions_per_request=FLAGS.http_max_completions_per_request,
                          max_prompt_bytes=FLAGS.http_max_prompt_bytes,
                          header_timeout_s=FLAGS.http_header_timeout_s, body_timeout_s=FLAGS.http_body_timeout_s,
                          max_connections=FLAGS.http_max_connections)
        await front.start()
        logging.info("OpenAI HTTP API and /metrics on %s", front.url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    logging.info("scheduler ready on %s", scheduler.address)
    await stop.wait()
    logging.info("shutting down")
    if front is not None:
        await front.stop()
    await scheduler.stop()


def main(argv):
    del argv
    try:  # a bad setting is the user's to fix: the message, not a traceback
        config = config_from_flags()
        config.tls  # noqa: B018 - checks the files exist
        TlsFiles.of(FLAGS.http_tls_cert_file, FLAGS.http_tls_key_file)
        secrets = Secrets.resolve(FLAGS.api_key, FLAGS.cluster_secret)
        check_bind(config.host, secrets.api_key or secrets.cluster_secret, config.insecure, "scheduler")
        if FLAGS.http_port is not None:
            check_bind(FLAGS.http_host or config.host, secrets.api_key, config.insecure, "HTTP front")
    except ValueError as e:
        raise SystemExit(f"jaxserve.launch.scheduler: {e}") from None
    run_async(serve(config, secrets))


if __name__ == "__main__":
    app.run(main)
