"""The global scheduler's configuration (frozen, validated on construction)."""

from __future__ import annotations

import dataclasses

from jaxserve.scheduler.policies import POLICIES

MODES = ("auto", "colocated", "disaggregated")


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclasses.dataclass(frozen=True)
class GlobalSchedulerConfig:
    host: str = "127.0.0.1"
    port: int = 50050                    # 0: an ephemeral port (tests)
    policy: str = "locality"
    # auto: colocated while a colocated instance is up, else disaggregated (a prefill and a decode instance)
    mode: str = "auto"
    # Admission: requests admitted and not finished, and their prompt + max_tokens; past either limit a new
    # request gets RESOURCE_EXHAUSTED.
    max_queued_requests: int = 1024
    max_queued_tokens: int = 1 << 22
    default_max_tokens: int = 16
    max_model_len: int | None = None     # caps the model's context length
    # Load guard of the locality and session policies (see policies.LoadGuard).
    load_guard_factor: float = 1.5
    load_guard_slack: float = 2.0
    # Health: every instance is probed (grpc.health.v1 Check) each interval; after `unhealthy_after`
    # failed probes in a row it leaves routing and its running requests are sent elsewhere.
    health_interval_s: float = 1.0
    health_timeout_s: float = 1.0
    unhealthy_after: int = 2
    max_migrations: int = 2              # times one request may be sent again after an instance failure
    # A started stream silent this long counts as its instance failing (None: only health probes decide).
    stall_timeout_s: float | None = None
    # Colocated requests to an instance that serves GenerateMany share one call to it (a message per engine
    # step for all of them, jaxserve/scheduler/mux.py); False: one Generate call per request.
    generate_many: bool = True
    no_instance_wait_s: float = 5.0      # how long a request waits for an instance to come up
    report_interval_s: float = 0.5       # load reports wanted from instances
    profile_instances: bool = True       # calibrate each instance's cost model with Instance.Profile
    profile_timeout_s: float = 120.0
    shutdown_grace_s: float = 5.0
    # Peer fetch (issue 18; policy kv_pool, colocated instances started with peer fetch): a request routed
    # away from its prefix's holder has the holder push the prefix first (PushKv), at most this long; on
    # failure the instance recomputes it. The transfer model the policy weighs pulls with:
    peer_fetch: bool = False
    peer_fetch_timeout_s: float = 10.0
    kv_bytes_per_token: int = 131072     # the model's KV bytes per token (Llama-3-8B bf16)
    peer_link_bytes_s: float = 50e9
    peer_link_latency_s: float = 5e-4
    tls_cert_file: str | None = None     # server TLS (both or neither)
    tls_key_file: str | None = None
    # The CA of the cluster: with it, the links to instances are mTLS (the scheduler verifies each instance's
    # certificate and shows its own cert/key as client certificate). Clients of the scheduler need no cert.
    tls_ca_file: str | None = None
    insecure: bool = False               # allow a non-loopback bind with no API key / cluster secret
    # Tenant isolation: every request's prefix-cache salt includes a hash of the API key it presented (HTTP
    # Authorization / gRPC authorization metadata), so clients with different keys never share cached KV.
    salt_cache_by_api_key: bool = False
    # A text prompt longer than this (UTF-8 bytes) is refused before it is tokenized (INVALID_ARGUMENT).
    max_prompt_bytes: int = 4 << 20

    def __post_init__(self):
        _require(0 <= self.port < 65536, f"port must be in [0, 65536), got {self.port}")
        _require(self.policy in POLICIES, f"policy must be one of {POLICIES}, got {self.policy!r}")
        _require(self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}")
        _require(self.max_queued_requests >= 1, f"max_queued_requests must be >= 1, got {self.max_queued_requests}")
        _require(self.max_queued_tokens >= 1, f"max_queued_tokens must be >= 1, got {self.max_queued_tokens}")
        _require(self.default_max_tokens >= 1, f"default_max_tokens must be >= 1, got {self.default_max_tokens}")
        _require(self.max_model_len is None or self.max_model_len >= 2,
                 f"max_model_len must be >= 2, got {self.max_model_len}")
        _require(self.load_guard_factor >= 1, f"load_guard_factor must be >= 1, got {self.load_guard_factor}")
        _require(self.load_guard_slack >= 0, f"load_guard_slack must be >= 0, got {self.load_guard_slack}")
        for name in ("health_interval_s", "health_timeout_s", "report_interval_s", "profile_timeout_s"):
            _require(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        _require(self.unhealthy_after >= 1, f"unhealthy_after must be >= 1, got {self.unhealthy_after}")
        _require(self.max_migrations >= 0, f"max_migrations must be >= 0, got {self.max_migrations}")
        _require(self.stall_timeout_s is None or self.stall_timeout_s > 0,
                 f"stall_timeout_s must be > 0 or None, got {self.stall_timeout_s}")
        _require(self.no_instance_wait_s >= 0, f"no_instance_wait_s must be >= 0, got {self.no_instance_wait_s}")
        _require(self.max_prompt_bytes >= 1, f"max_prompt_bytes must be >= 1, got {self.max_prompt_bytes}")
        _require(self.shutdown_grace_s >= 0, f"shutdown_grace_s must be >= 0, got {self.shutdown_grace_s}")
        _require(not self.peer_fetch or self.policy == "kv_pool",
                 f"peer_fetch needs policy kv_pool, got {self.policy!r}")
        for name in ("peer_fetch_timeout_s", "kv_bytes_per_token", "peer_link_bytes_s"):
            _require(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        _require(self.peer_link_latency_s >= 0, f"peer_link_latency_s must be >= 0, got {self.peer_link_latency_s}")
        _require((self.tls_cert_file is None) == (self.tls_key_file is None),
                 "tls_cert_file and tls_key_file go together")
        _require(self.tls_ca_file is None or self.tls_cert_file is not None,
                 "tls_ca_file (mTLS to the instances) needs tls_cert_file and tls_key_file (the scheduler's own "
                 "certificate, shown to the instances)")

    @property
    def tls(self):
        """The TLS files as one `jaxserve.security.TlsFiles` (None: plaintext)."""
        from jaxserve.security import TlsFiles
        return TlsFiles.of(self.tls_cert_file, self.tls_key_file, self.tls_ca_file)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"
