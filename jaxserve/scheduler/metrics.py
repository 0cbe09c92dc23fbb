"""Prometheus metrics of the scheduler process (`GET /metrics` on the HTTP front).

Names follow vLLM's where the meaning is the same, so existing dashboards work; ours carry the `jaxserve:`
prefix. Every per-request series has the labels `model_name` and `instance` (the instance that served the
request: the decode instance when disaggregated; prefix-cache counters name the instance whose cache was
used, the prefill instance when disaggregated).

vLLM-named (counters are exposed with the `_total` suffix, as vLLM's are):
  vllm:time_to_first_token_seconds            histogram  arrival at the scheduler -> first token
  vllm:inter_token_latency_seconds            histogram  gap between token messages / tokens in the message
  vllm:request_time_per_output_token_seconds  histogram  (e2e - ttft) / (completion_tokens - 1)
  vllm:e2e_request_latency_seconds            histogram  arrival -> last token
  vllm:request_queue_time_seconds             histogram  waiting in the scheduler + in the instance's queue
  vllm:request_success                        counter    finished requests, label finished_reason
  vllm:prompt_tokens / vllm:generation_tokens counter    tokens of finished requests
  vllm:prefix_cache_queries / _hits           counter    prompt tokens looked up / served from cache
  vllm:num_requests_running / _waiting        gauge      as each instance last reported (`Load`)
  vllm:kv_cache_usage_perc                    gauge      1 - free-or-evictable pages / pages (`Load`), 0-1
  vllm:num_preemptions                        counter    running requests the instance preempted for lack of
                                                         KV pages, cumulative since it started (`Load`)
Ours:
  jaxserve:routing_decisions                  counter    policy, role, instance, outcome (prefix_hit: the
                                                         prompt tree predicted cached tokens there;
                                                         prefix_miss; no_instance: nothing could take it)
  jaxserve:kv_transfer_tokens / _bytes        counter    KV sent prefill -> decode (instance, dst_instance);
                                                         bytes as the prefill instance reports them
                                                         (PrefillResponse.transferred_bytes), else tokens x
                                                         KV bytes per token of the model config (estimate)
  jaxserve:kv_peer_fetch_tokens / _bytes      counter    KV a prefix's holder pushed to the instance a request
                                                         went to (peer fetch; instance, dst_instance), as the
                                                         holder reports it (PushKvResponse)
  jaxserve:kv_peer_fetch_failures             counter    peer fetches that failed (the prefix was recomputed)
  jaxserve:request_migrations                 counter    requests moved off `instance` after it failed
  jaxserve:requests_rejected                  counter    reason = invalid | over_capacity
  jaxserve:requests_failed                    counter    code = the gRPC status the request ended with
  jaxserve:instance_in_flight_requests        gauge      the scheduler's own count per instance
  jaxserve:instance_healthy                   gauge      1 when routable
  jaxserve:prompt_tree_tokens                 gauge      tokens the global prompt tree says it holds
  jaxserve:scheduler_queued_requests / _tokens gauge     admitted and not finished (admission queue)

Not available (instances do not report it yet): KV sent decode -> prefill (PD-Caching-3; the decode instance
counts it in its InstanceStats.kv_sent_back_*)."""

from __future__ import annotations

import json
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from jaxserve.proto.enums import FINISH_REASON_NAMES
from jaxserve.scheduler.router import HEALTHY, ROLE_NAMES

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets for these histograms.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)

_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "float8_e4m3fn": 1,
                "float8_e5m2": 1, "int8": 1}


def kv_bytes_per_token(model_folder) -> int:
    """KV cache bytes of one token (K and V, all layers) from the model's config (our model_config.json or
    a Hugging Face config.json); 0 when it cannot be told."""
    folder = Path(model_folder)
    for name in ("model_config.json", "config.json"):
        path = folder / name
        if path.exists():
            c = json.loads(path.read_text())
            break
    else:
        return 0
    layers = c.get("num_layers") or c.get("num_hidden_layers")
    heads = c.get("num_heads") or c.get("num_attention_heads")
    kv_heads = c.get("num_kv_heads") or c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or (c["hidden_size"] // heads if heads and c.get("hidden_size") else None)
    dtype = _DTYPE_BYTES.get(str(c.get("dtype") or c.get("torch_dtype") or "bfloat16"), 2)
    if not (layers and kv_heads and head_dim):
        return 0
    return int(2 * layers * kv_heads * head_dim * dtype)


class _LiveCollector:
    """Gauges read from the scheduler's state at scrape time (no stale series for instances that left)."""

    def __init__(self, scheduler, model_name: str):
        self.s = scheduler
        self.model_name = model_name

    def describe(self):
        return []

    def collect(self):
        s, m = self.s, self.model_name
        labels = ["model_name", "instance"]
        running = GaugeMetricFamily("vllm:num_requests_running", "Requests running on the instance (its last "
                                    "Load report).", labels=labels)
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting in the instance's queue "
                                    "(its last Load report).", labels=labels)
        kv = GaugeMetricFamily("vllm:kv_cache_usage_perc", "Fraction of the instance's device KV pages in use "
                               "(not free or evictable), 0-1 (its last Load report).", labels=labels)
        in_flight = GaugeMetricFamily("jaxserve:instance_in_flight_requests", "Requests the scheduler has on "
                                      "the instance now.", labels=labels)
        healthy = GaugeMetricFamily("jaxserve:instance_healthy", "1 when the instance is routable.",
                                    labels=labels + ["role"])
        preemptions = CounterMetricFamily("vllm:num_preemptions", "Cumulative number of preemptions on the "
                                          "instance (its last Load report).", labels=labels)
        tree = GaugeMetricFamily("jaxserve:prompt_tree_tokens", "Tokens the scheduler's global prompt tree says "
                                 "the instance holds.", labels=labels)
        for r in list(s.router.instances.values()):
            v = [m, r.instance_id]
            load = r.load
            running.add_metric(v, load.num_running_requests)
            waiting.add_metric(v, load.num_queued_requests)
            total = load.num_total_pages
            kv.add_metric(v, (1.0 - load.num_free_pages / total) if total else 0.0)
            preemptions.add_metric(v, load.num_preemptions)
            in_flight.add_metric(v, r.in_flight_requests)
            healthy.add_metric(v + [ROLE_NAMES.get(r.role, str(r.role))], 1.0 if r.state == HEALTHY else 0.0)
            t = s.router.trees.get(r.role)
            tree.add_metric(v, t.held_tokens(r.instance_id) if t is not None else 0)
        queued = GaugeMetricFamily("jaxserve:scheduler_queued_requests", "Requests admitted by the scheduler "
                                   "and not finished.", labels=["model_name"])
        queued.add_metric([m], s.admission.requests)
        queued_tokens = GaugeMetricFamily("jaxserve:scheduler_queued_tokens", "Prompt + max_tokens of the "
                                          "requests admitted and not finished.", labels=["model_name"])
        queued_tokens.add_metric([m], s.admission.tokens)
        return [running, waiting, kv, preemptions, in_flight, healthy, tree, queued, queued_tokens]


class SchedulerMetrics:
    """The scheduler's observer (see `Scheduler.observer`) and its Prometheus registry."""

    def __init__(self, scheduler, model_name: str | None = None, kv_bytes_per_token: int = 0):
        self.scheduler = scheduler
        self.model_name = model_name or scheduler.model.name
        self.policy = scheduler.config.policy
        self.kv_bytes_per_token = kv_bytes_per_token
        self.registry = CollectorRegistry(auto_describe=True)
        reg, lab = self.registry, ["model_name", "instance"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              lab, registry=reg, buckets=TTFT_BUCKETS)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             lab, registry=reg, buckets=ITL_BUCKETS)
        self.tpot = Histogram("vllm:request_time_per_output_token_seconds", "Histogram of time per output token "
                              "in seconds: (e2e - ttft) / (output tokens - 1).", lab, registry=reg,
                              buckets=ITL_BUCKETS)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of end-to-end request latency in "
                             "seconds.", lab, registry=reg, buckets=LATENCY_BUCKETS)
        self.queue = Histogram("vllm:request_queue_time_seconds", "Histogram of time spent waiting (scheduler "
                               "and instance queues) in seconds.", lab, registry=reg, buckets=LATENCY_BUCKETS)
        self.success = Counter("vllm:request_success", "Count of successfully processed requests.",
                               lab + ["finished_reason"], registry=reg)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", lab,
                                     registry=reg)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.", lab,
                                         registry=reg)
        self.cache_queries = Counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of "
                                     "queried tokens.", lab, registry=reg)
        self.cache_hits = Counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached "
                                  "tokens.", lab, registry=reg)
        self.routing = Counter("jaxserve:routing_decisions", "Routing decisions by policy, role, instance and "
                               "outcome (prefix_hit, prefix_miss, no_instance).",
                               ["model_name", "policy", "role", "instance", "outcome"], registry=reg)
        self.kv_tokens = Counter("jaxserve:kv_transfer_tokens", "Tokens whose KV moved from a prefill instance "
                                 "to a decode instance.", lab + ["dst_instance"], registry=reg)
        self.kv_bytes = Counter("jaxserve:kv_transfer_bytes", "KV bytes moved from a prefill instance to a decode "
                                "instance (tokens x KV bytes per token of the model config).",
                                lab + ["dst_instance"], registry=reg)
        self.peer_tokens = Counter("jaxserve:kv_peer_fetch_tokens", "Tokens whose KV a holder pushed to the "
                                   "instance a request was routed to (peer fetch).", lab + ["dst_instance"],
                                   registry=reg)
        self.peer_bytes = Counter("jaxserve:kv_peer_fetch_bytes", "KV bytes a holder pushed to the instance a "
                                  "request was routed to (peer fetch).", lab + ["dst_instance"], registry=reg)
        self.peer_failures = Counter("jaxserve:kv_peer_fetch_failures", "Peer fetches that failed (the instance "
                                     "recomputed the prefix).", lab + ["dst_instance"], registry=reg)
        self.migrations = Counter("jaxserve:request_migrations", "Requests moved off an instance after it failed.",
                                  lab, registry=reg)
        self.rejected = Counter("jaxserve:requests_rejected", "Requests refused before routing, by reason "
                                "(invalid, over_capacity).", ["model_name", "reason"], registry=reg)
        self.failed = Counter("jaxserve:requests_failed", "Admitted requests that ended with an error, by gRPC "
                              "status code.", ["model_name", "code"], registry=reg)
        self.http = Counter("jaxserve:http_requests", "HTTP requests by route and status.",
                            ["route", "method", "status"], registry=reg)
        self.registry.register(_LiveCollector(scheduler, self.model_name))

    # ---------------------------------------------------------------------------------- observer hooks
    def on_rejected(self, reason: str) -> None:
        self.rejected.labels(self.model_name, reason).inc()

    def on_failed(self, code: str) -> None:
        self.failed.labels(self.model_name, code).inc()

    def on_migration(self, instance_id: str) -> None:
        self.migrations.labels(self.model_name, instance_id).inc()

    def on_route(self, decision) -> None:
        if decision is None:
            self.routing.labels(self.model_name, self.policy, "", "", "no_instance").inc()
            return
        picks = [(decision.instance, decision.cached_tokens)]
        if decision.prefill is not None:
            picks.append((decision.prefill, decision.prefill_cached_tokens))
        for record, cached in picks:
            outcome = "prefix_hit" if cached > 0 else "prefix_miss"
            self.routing.labels(self.model_name, self.policy, ROLE_NAMES.get(record.role, str(record.role)),
                                record.instance_id, outcome).inc()

    def on_kv_transfer(self, src: str, dst: str, tokens: int, nbytes: int = 0) -> None:
        """nbytes: what the prefill instance reports it moved (PrefillResponse.transferred_bytes); when it
        reports nothing, tokens x the model config's KV bytes per token."""
        self.kv_tokens.labels(self.model_name, src, dst).inc(tokens)
        self.kv_bytes.labels(self.model_name, src, dst).inc(nbytes or tokens * self.kv_bytes_per_token)

    def on_peer_fetch(self, src: str, dst: str, tokens: int, nbytes: int, ok: bool) -> None:
        if ok:
            self.peer_tokens.labels(self.model_name, src, dst).inc(tokens)
            self.peer_bytes.labels(self.model_name, src, dst).inc(nbytes)
        else:
            self.peer_failures.labels(self.model_name, src, dst).inc()

    def on_finished(self, decision, usage, finish_reason: int, gaps) -> None:
        m, inst = self.model_name, usage.instance_id
        cache_inst = decision.prefill.instance_id if decision.prefill is not None else inst
        self.ttft.labels(m, inst).observe(usage.ttft_s)
        self.e2e.labels(m, inst).observe(usage.e2e_s)
        self.queue.labels(m, inst).observe(usage.queue_time_s)
        if usage.completion_tokens > 1:
            self.tpot.labels(m, inst).observe((usage.e2e_s - usage.ttft_s) / (usage.completion_tokens - 1))
        if gaps:
            itl = self.itl.labels(m, inst)
            for gap in gaps:
                itl.observe(gap)
        self.success.labels(m, inst, FINISH_REASON_NAMES.get(finish_reason, "unknown")).inc()
        self.prompt_tokens.labels(m, inst).inc(usage.prompt_tokens)
        self.generation_tokens.labels(m, inst).inc(usage.completion_tokens)
        self.cache_queries.labels(m, cache_inst).inc(usage.prompt_tokens)
        self.cache_hits.labels(m, cache_inst).inc(usage.cached_tokens)

    def on_http(self, route: str, method: str, status: int) -> None:
        self.http.labels(route, method, str(status)).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
