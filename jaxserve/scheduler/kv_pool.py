"""Cluster-wide KV pool routing (issue 18): for each candidate instance, the cheapest way to get the prompt's
cached prefix there — reuse its own copy (swapping in any host-tier part over PCIe), pull a longer copy from
a peer over the instance link, or recompute — weighed against its queued work, with the load guard of
`locality`. Pure Python: the simulator runs the same code."""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

from jaxserve.scheduler.policies import MISS_WEIGHT, TIE_TOLERANCE, InstanceLoad, LoadGuard, Locality, RouteRequest


@dataclasses.dataclass(frozen=True)
class TransferModel:
    """Seconds to move KV: pulls from a peer over the pair's link, swap-ins from an instance's own host tier.
    `links` overrides the bandwidth and latency of given (source id, destination id) pairs."""

    kv_bytes_per_token: float = 131072.0  # Llama-3-8B, bf16
    link_bytes_s: float = 50e9            # instance to instance, per direction
    link_latency_s: float = 5e-4          # per pull: offer/pull control round trip + first byte
    host_bytes_s: float = 50e9            # host tier -> device (PCIe), per instance
    host_latency_s: float = 0.0
    links: tuple[tuple[str, str, float, float], ...] = ()  # (src, dst, bytes_s, latency_s)

    def __post_init__(self):
        for name in ("kv_bytes_per_token", "link_bytes_s", "host_bytes_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TransferModel.{name} must be > 0, got {getattr(self, name)}")
        for name in ("link_latency_s", "host_latency_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"TransferModel.{name} must be >= 0, got {getattr(self, name)}")
        for link in self.links:
            if len(link) != 4 or not link[2] > 0 or not link[3] >= 0:
                raise ValueError(f"TransferModel.links entries are (src, dst, bytes_s > 0, latency_s >= 0), "
                                 f"got {link!r}")
        object.__setattr__(self, "_pairs", {(s, d): (b, l) for s, d, b, l in self.links})

    def link(self, src: str, dst: str) -> tuple[float, float]:
        return self._pairs.get((src, dst), (self.link_bytes_s, self.link_latency_s))

    def pull_s(self, src: str, dst: str, tokens: int, src_host_tokens: int = 0) -> float:
        """Pulling `tokens` tokens' KV from src to dst, `src_host_tokens` of them read from src's host tier
        (that read overlaps the wire)."""
        if tokens <= 0:
            return 0.0
        bw, lat = self.link(src, dst)
        wire = tokens * self.kv_bytes_per_token / bw
        return lat + max(wire, src_host_tokens * self.kv_bytes_per_token / self.host_bytes_s)

    def swap_in_s(self, tokens: int) -> float:
        if tokens <= 0:
            return 0.0
        return self.host_latency_s + tokens * self.kv_bytes_per_token / self.host_bytes_s


class MeasuredLinks:
    """The served scheduler's peer-link model, fitted to the pulls it has timed (PushKv round trips: the
    holder's match and gather, the offer, the target's pull, scatter and index): seconds = latency +
    bytes / bandwidth by Theil-Sen (median of pairwise slopes), robust to a pull that stalled behind a busy
    holder's step; bytes per token from what the holders report. Until `min_samples` pulls, or while the
    pulls' sizes are too alike to tell a slope, the configured bandwidth stays and only the latency is
    measured (the median)."""

    def __init__(self, configured: TransferModel, window: int = 64, min_samples: int = 3):
        self.configured = configured
        self.window, self.min_samples = window, min_samples
        self.samples: list[tuple[int, int, float]] = []  # (tokens, bytes, seconds), newest last

    def observe(self, tokens: int, nbytes: int, seconds: float) -> TransferModel:
        """Record one successful pull; returns the model to route with from now on."""
        if tokens > 0 and nbytes > 0 and seconds > 0:
            self.samples = (self.samples + [(tokens, nbytes, seconds)])[-self.window:]
        return self.model()

    def model(self) -> TransferModel:
        base = self.configured
        if len(self.samples) < self.min_samples:
            return base
        per_token = _median([b / t for t, b, _ in self.samples])
        sizes = [b for _, b, _ in self.samples]
        slope = None
        if max(sizes) >= 1.5 * min(sizes):
            slopes = [(s2 - s1) / (b2 - b1) for i, (_, b1, s1) in enumerate(self.samples)
                      for _, b2, s2 in self.samples[i + 1:] if b2 != b1]
            slope = _median(slopes) if slopes else None
        if slope is not None and slope > 0:
            bandwidth = 1.0 / slope
            latency = max(0.0, _median([s - b * slope for _, b, s in self.samples]))
        else:
            bandwidth = base.link_bytes_s
            latency = max(0.0, _median([s - b / bandwidth for _, b, s in self.samples]))
        return dataclasses.replace(base, kv_bytes_per_token=per_token, link_bytes_s=bandwidth,
                                   link_latency_s=latency)


def _median(xs: Sequence[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


@dataclasses.dataclass(frozen=True)
class RoutePlan:
    """Where a request runs and how its cached prefix gets there."""

    instance: InstanceLoad
    cached_tokens: int               # prefix it will not recompute (own copy + pulled)
    source: InstanceLoad | None = None  # the peer to pull from (None: own copy or recompute)
    pull_tokens: int = 0             # tokens pulled from `source` (after the instance's own prefix)
    host_tokens: int = 0             # of its own copy, tokens swapped in from its host tier
    transfer_s: float = 0.0          # estimated seconds of those moves


class KVPool(Locality):
    """`locality` over the cluster's KV pool. Per candidate, the best of: its own copy (device part free, host
    part at the swap-in cost), the longest copy on any healthy peer (pulled at the pair's link cost), or
    recomputing; scored by queued prefill work + exec + transfer + miss_weight x the compute it adds over the
    best-cached option. Holders the load guard removes still serve as sources: that is the point — a busy
    holder no longer forces a choice between its queue and a recompute."""

    name = "kv_pool"
    uses_tiers = True

    def __init__(self, guard: LoadGuard = LoadGuard(), miss_weight: float = MISS_WEIGHT,
                 transfer: TransferModel = TransferModel(), peer_fetch: bool = True):
        super().__init__(guard, miss_weight)
        self.transfer = transfer
        self.peer_fetch = peer_fetch

    def choose(self, request, candidates, matched, tiers=None):
        return self.plan(request, candidates, matched, tiers).instance

    def plan(self, request: RouteRequest, candidates: Sequence[InstanceLoad], matched: Mapping[str, int],
             tiers: Mapping[str, tuple[int, int]] | None = None) -> RoutePlan:
        """tiers: instance id -> (cached tokens on either tier, on device); None: all on device."""
        if tiers is None:
            tiers = {i: (n, n) for i, n in matched.items()}
        prompt_len = request.prompt_len
        cap = prompt_len - 1  # the last token is always computed (its logits)
        limit = self.guard.limit(candidates)
        eligible = [c for c in candidates if c.in_flight_requests <= limit] or list(candidates)
        # Sources: every healthy candidate with a copy, longest first.
        sources = sorted(((min(tiers[c.instance_id][0], cap), c) for c in candidates if c.instance_id in tiers),
                         key=lambda x: (-x[0], -tiers[x[1].instance_id][1])) if self.peer_fetch else []
        most = max([n for n, _ in sources] + [min(tiers.get(c.instance_id, (0, 0))[0], cap) for c in eligible])
        tm = self.transfer
        memo: dict[tuple, float] = {}

        def exec_s(c, n):
            key = (id(c.cost_model), n)
            if key not in memo:
                memo[key] = c.cost_model.exec(prompt_len, n)
            return memo[key]

        scored = []
        for c in eligible:
            total, device = tiers.get(c.instance_id, (0, 0))
            total, device = min(total, cap), min(device, cap)
            host = total - device
            options = [(exec_s(c, device), RoutePlan(c, device))]  # own device copy; recompute the rest
            if host > 0:
                t = tm.swap_in_s(host)
                options.append((exec_s(c, total) + t, RoutePlan(c, total, host_tokens=host, transfer_s=t)))
            for n, src in sources:
                if n <= total:
                    break
                if src is c:
                    continue
                s_device = tiers[src.instance_id][1]
                src_host = max(0, n - max(min(s_device, cap), total))
                # The own host part (if any) swaps in while the rest arrives from the peer.
                t = max(tm.pull_s(src.instance_id, c.instance_id, n - total, src_host), tm.swap_in_s(host))
                options.append((exec_s(c, n) + t, RoutePlan(c, n, src, n - total, host, t)))
                break  # the longest copy; equally long ones differ only by link (not modelled apart here)
            cost, plan = min(options, key=lambda o: o[0])
            # As in locality: compute this instance adds beyond the best-cached option delays later requests.
            extra = exec_s(c, plan.cached_tokens) - exec_s(c, most) if plan.cached_tokens < most else 0.0
            scored.append((c.pending_prefill_s + cost + self.miss_weight * extra, plan))
        best = min(score for score, _ in scored)
        near = [p for score, p in scored if score <= best * (1 + TIE_TOLERANCE) + 1e-9]
        fewest = min(p.instance.in_flight_requests for p in near)
        tied = [p for p in near if p.instance.in_flight_requests == fewest]
        self._turn += 1
        return tied[self._turn % len(tied)]
