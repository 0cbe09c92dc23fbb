"""Routing policies: given a request, the candidate instances (one role) with their load, and the prefix
each holds (from the prompt tree), pick one. Pure and synchronous, so the simulator runs the same code.

- `locality`: the shortest estimated time to first token: queued prefill work on the instance plus the
  cost model's exec(prompt_len, cached_len) there; a load guard first removes instances with far more
  requests than the average, so one hot prefix cannot pile every request onto the instance holding it.
- `least_load`: fewest requests in flight, then least queued prefill work; ties rotate.
- `round_robin`: each candidate in turn.
- `session`: the instance that served the session before, while the load guard allows; new sessions
  (and requests without a session id) go by locality."""

from __future__ import annotations

import collections
import dataclasses
from typing import Mapping, Protocol, Sequence

from jaxserve.scheduler.cost_model import CostModel

POLICIES = ("locality", "least_load", "round_robin", "session", "kv_pool")


class InstanceLoad(Protocol):
    """What a policy reads about an instance (the scheduler's InstanceRecord, or a simulator's)."""

    instance_id: str
    in_flight_requests: int   # routed here and not finished
    pending_prefill_s: float  # estimated prefill work routed here that has not produced its first token
    cost_model: CostModel


@dataclasses.dataclass(frozen=True)
class RouteRequest:
    prompt_len: int
    session_id: str = ""


@dataclasses.dataclass(frozen=True)
class LoadGuard:
    """An instance is overloaded when its requests in flight exceed factor x the candidates' mean + slack."""

    factor: float = 1.5
    slack: float = 2.0

    def __post_init__(self):
        if self.factor < 1.0:
            raise ValueError(f"load guard factor must be >= 1, got {self.factor}")
        if self.slack < 0:
            raise ValueError(f"load guard slack must be >= 0, got {self.slack}")

    def limit(self, candidates: Sequence[InstanceLoad]) -> float:
        mean = sum(c.in_flight_requests for c in candidates) / len(candidates)
        return self.factor * mean + self.slack

    def allows(self, candidate: InstanceLoad, candidates: Sequence[InstanceLoad]) -> bool:
        return candidate.in_flight_requests <= self.limit(candidates)


class Policy:
    name = ""

    def choose(self, request: RouteRequest, candidates: Sequence[InstanceLoad],
               matched: Mapping[str, int]) -> InstanceLoad:
        """candidates: non-empty, in a stable order; matched: instance id -> cached prefix tokens."""
        raise NotImplementedError

    def forget(self, instance_id: str) -> None:
        """The instance left."""


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self):
        self._next = 0

    def choose(self, request, candidates, matched):
        pick = candidates[self._next % len(candidates)]
        self._next += 1
        return pick


class LeastLoad(Policy):
    name = "least_load"

    def __init__(self):
        self._turn = 0

    def choose(self, request, candidates, matched):
        best = min((c.in_flight_requests, c.pending_prefill_s) for c in candidates)
        tied = [c for c in candidates if (c.in_flight_requests, c.pending_prefill_s) == best]
        self._turn += 1
        return tied[self._turn % len(tied)]


# Locality scores an instance by its queued prefill work + this request's exec time there + MISS_WEIGHT x the
# exec time it adds over the best-cached instance. Pure greedy TTFT (weight 0) moves a request off its cache
# holder whenever the holder's queue is a little longer; the recomputed prefix lengthens every later queue and
# the duplicate copies crowd the caches. Simulator sweep (`jaxserve.launch.sim --mode=sweep`, H200 preset, pd+cache;
# WORKSPACE_NOTES.md): ShareGPT-like chat at 32 instances and twice the uncached capacity, mean TTFT 292 / 124 /
# 18 / 16 ms at weights 0 / 1 / 3 / 10 (session affinity 15 ms); LooGLE-like at 16 instances 437 / 220 / 212 /
# 166 ms; ReAct flat.
MISS_WEIGHT = 10.0
# Relative score difference below which locality treats instances as equal. Instances of one model on like
# devices profile a few percent apart; without this, the one that happened to profile fastest took all 32
# requests of a served run on this machine while its twin idled.
TIE_TOLERANCE = 0.1


class Locality(Policy):
    name = "locality"

    def __init__(self, guard: LoadGuard = LoadGuard(), miss_weight: float = MISS_WEIGHT):
        if miss_weight < 0:
            raise ValueError(f"miss_weight must be >= 0, got {miss_weight}")
        self.guard = guard
        self.miss_weight = miss_weight
        self._turn = 0

    def choose(self, request, candidates, matched):
        limit = self.guard.limit(candidates)
        prompt_len = request.prompt_len
        eligible = [c for c in candidates if c.in_flight_requests <= limit] or list(candidates)
        cached = {c.instance_id: min(matched.get(c.instance_id, 0), prompt_len - 1) for c in eligible}
        most = max(cached.values())
        memo: dict[tuple, float] = {}  # exec per (cost model, cached): instances often share both

        def exec_s(c, n):
            key = (id(c.cost_model), n)
            if key not in memo:
                memo[key] = c.cost_model.exec(prompt_len, n)
            return memo[key]

        scores = []
        for c in eligible:
            cost = exec_s(c, cached[c.instance_id])
            # Recomputing what the best-cached instance holds delays every later request here too: weigh that
            # extra work beyond this request's own wait (see MISS_WEIGHT). Measured with this instance's own
            # model, so instances differing only in their fitted models pay nothing.
            extra = cost - exec_s(c, most) if cached[c.instance_id] < most else 0.0
            scores.append((c.pending_prefill_s + cost + self.miss_weight * extra, c))
        best = min(score for score, _ in scores)
        # Scores within TIE_TOLERANCE are a tie (each instance's cost model is fitted from its own noisy
        # profile): the one with fewest requests in flight wins, ties rotate.
        near = [c for score, c in scores if score <= best * (1 + TIE_TOLERANCE) + 1e-9]
        fewest = min(c.in_flight_requests for c in near)
        tied = [c for c in near if c.in_flight_requests == fewest]
        self._turn += 1
        return tied[self._turn % len(tied)]


class Session(Policy):
    name = "session"

    def __init__(self, guard: LoadGuard = LoadGuard(), max_sessions: int = 1 << 20):
        self.guard = guard
        self._fallback = Locality(guard)
        self._sessions: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._max_sessions = max_sessions

    def choose(self, request, candidates, matched):
        sid = request.session_id
        if sid:
            owner = self._sessions.get(sid)
            if owner is not None:
                for c in candidates:
                    if c.instance_id == owner and self.guard.allows(c, candidates):
                        self._sessions.move_to_end(sid)
                        return c
        pick = self._fallback.choose(request, candidates, matched)
        if sid:
            self._sessions[sid] = pick.instance_id
            self._sessions.move_to_end(sid)
            while len(self._sessions) > self._max_sessions:
                self._sessions.popitem(last=False)
        return pick

    def forget(self, instance_id):
        for sid in [s for s, owner in self._sessions.items() if owner == instance_id]:
            del self._sessions[sid]


def make_policy(name: str, guard: LoadGuard = LoadGuard()) -> Policy:
    if name == "locality":
        return Locality(guard)
    if name == "least_load":
        return LeastLoad()
    if name == "round_robin":
        return RoundRobin()
    if name == "session":
        return Session(guard)
    if name == "kv_pool":  # jaxserve/scheduler/kv_pool.py (it builds on Locality, so imported here)
        from jaxserve.scheduler.kv_pool import KVPool
        # Host tiers only: pulls need instances that serve PushKv, so GlobalSchedulerConfig.peer_fetch (and the
        # simulator) set up their own KVPool with peer fetch and a transfer model.
        return KVPool(guard, peer_fetch=False)
    raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
