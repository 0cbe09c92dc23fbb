"""The scheduler's routing state: registered instances, one prompt tree per instance role, and the routing
decision (which instance, or which prefill + decode pair). No I/O here: the gRPC layer feeds it events and
asks it for decisions, and the benchmark times it directly."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Iterable

from jaxserve.proto.v1 import common_pb2, scheduler_pb2
from jaxserve.scheduler.cost_model import CostModel
from jaxserve.scheduler.policies import LoadGuard, RouteRequest, make_policy
from jaxserve.scheduler.prompt_tree import PromptTree

COLOCATED = common_pb2.ROLE_COLOCATED
PREFILL = common_pb2.ROLE_PREFILL
DECODE = common_pb2.ROLE_DECODE
ROLES = (COLOCATED, PREFILL, DECODE)
ROLE_NAMES = {COLOCATED: "colocated", PREFILL: "prefill", DECODE: "decode"}
PD_ROLES = (PREFILL, DECODE)

HEALTHY = scheduler_pb2.INSTANCE_STATE_HEALTHY
SUSPECT = scheduler_pb2.INSTANCE_STATE_SUSPECT
DRAINING = scheduler_pb2.INSTANCE_STATE_DRAINING

_INSERT = common_pb2.IndexEvent.INSERT
_EVICT = common_pb2.IndexEvent.EVICT
_CLEAR = common_pb2.IndexEvent.CLEAR
_OFFLOAD = common_pb2.IndexEvent.OFFLOAD


@dataclasses.dataclass(eq=False)
class InstanceRecord:
    """One registered instance as the scheduler sees it."""

    instance_id: str
    address: str
    role: int
    page_size: int
    max_model_len: int = 0
    vocab_size: int = 0
    num_pages: int = 0
    model: str = ""
    kv_cache_dtype: str = "auto"   # how it stores KV; prefill and decode instances must agree
    kv_page_bytes: int = 0
    state: int = HEALTHY
    load: common_pb2.Load = dataclasses.field(default_factory=common_pb2.Load)
    # The scheduler's own accounting, updated at once on dispatch (reported load lags).
    in_flight_requests: int = 0
    pending_prefill_s: float = 0.0
    cost_model: CostModel = CostModel()
    calibrated: bool = False
    num_requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    last_report: float = dataclasses.field(default_factory=time.monotonic)
    probe_failures: int = 0
    probing: bool = False
    removed: bool = False
    attempts: set = dataclasses.field(default_factory=set)  # calls in flight on it (gRPC layer)
    pins: int = 0  # other calls on its channel (Drain) that must outlive its retirement
    channel: Any = None
    stub: Any = None
    generate_many: bool = False  # serves Instance.GenerateMany
    mux: Any = None              # its `InstanceMux`, once a request used it
    health_stub: Any = None

    @property
    def routable(self) -> bool:
        return self.state == HEALTHY and not self.removed


@dataclasses.dataclass(frozen=True)
class RouteDecision:
    mode: str                           # "colocated" or "disaggregated"
    instance: InstanceRecord            # the colocated instance, or the decode instance
    cached_tokens: int                  # the prompt tree's prediction for `instance`
    estimate_s: float                   # estimated prefill seconds (on the prefill instance if disaggregated)
    prefill: InstanceRecord | None = None
    prefill_cached_tokens: int = 0
    # kv_pool policy (issue 18): the instance that computes the prompt first pulls `pull_tokens` of its
    # prefix from `pull_from` and swaps `host_tokens` in from its host tier; `cached_tokens` (colocated) or
    # `prefill_cached_tokens` count them.
    pull_from: InstanceRecord | None = None
    pull_tokens: int = 0
    host_tokens: int = 0
    transfer_s: float = 0.0


class Router:
    def __init__(self, policy: str = "locality", guard: LoadGuard = LoadGuard(), mode: str = "auto"):
        self.policy_name = policy
        self.mode = mode
        self.instances: dict[str, InstanceRecord] = {}
        self._by_role: dict[int, list[InstanceRecord]] = {role: [] for role in ROLES}
        self.trees: dict[int, PromptTree] = {}
        # One policy object per role: round-robin counters and session maps are per role.
        self._policies = {role: make_policy(policy, guard) for role in ROLES}

    def set_policy(self, role: int, policy) -> None:
        """Route `role` with this policy object (the simulator's configured policies; tests)."""
        self._policies[role] = policy

    # ------------------------------------------------------------------------------------ membership
    def add(self, record: InstanceRecord) -> InstanceRecord | None:
        """Register (or replace, same id); returns the replaced record. ValueError on a page size that
        disagrees with the other instances of its role (they share one prompt tree)."""
        if record.role not in ROLES:
            raise ValueError(f"role must be colocated, prefill or decode, got {record.role}")
        if record.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {record.page_size}")
        tree = self.trees.get(record.role)
        if tree is not None and tree.page_size != record.page_size and any(
                r.role == record.role and r.instance_id != record.instance_id for r in self.instances.values()):
            raise ValueError(f"page_size {record.page_size} differs from the {tree.page_size} of the other "
                             f"{ROLE_NAMES[record.role]} instances (they share one prompt tree)")
        if record.role in PD_ROLES:
            other = next((r for r in self.instances.values() if r.role in PD_ROLES and r.instance_id !=
                          record.instance_id and r.kv_cache_dtype != record.kv_cache_dtype), None)
            if other is not None:
                raise ValueError(f"kv_cache_dtype {record.kv_cache_dtype!r} differs from the {other.kv_cache_dtype!r} "
                                 f"of {ROLE_NAMES[other.role]} instance {other.instance_id}: prefill and decode "
                                 "instances exchange KV, so they must store it alike")
        old = self.remove(record.instance_id)
        if tree is None or tree.page_size != record.page_size:
            self.trees[record.role] = PromptTree(record.page_size)
        self.instances[record.instance_id] = record
        self._by_role[record.role].append(record)
        return old

    def remove(self, instance_id: str) -> InstanceRecord | None:
        """Take the instance out of routing and its entries out of the prompt tree."""
        record = self.instances.pop(instance_id, None)
        if record is None:
            return None
        record.removed = True
        self._by_role[record.role].remove(record)
        self.trees[record.role].remove_instance(instance_id)
        self._policies[record.role].forget(instance_id)
        return record

    def apply_event(self, record: InstanceRecord, event: common_pb2.IndexEvent) -> None:
        tree = self.trees[record.role]
        if event.kind == _CLEAR:
            tree.remove_instance(record.instance_id)
            return
        if event.page_size and event.page_size != tree.page_size:
            raise ValueError(f"event page_size {event.page_size} != the instance's {tree.page_size}")
        if event.kind == _INSERT:
            tree.insert(record.instance_id, event.token_ids)
        elif event.kind == _EVICT:
            tree.evict(record.instance_id, event.token_ids)
        elif event.kind == _OFFLOAD:
            tree.offload(record.instance_id, event.token_ids)
        else:
            raise ValueError(f"unknown index event kind {event.kind}")

    def candidates(self, role: int, exclude: frozenset = frozenset()) -> list[InstanceRecord]:
        return [r for r in self._by_role[role] if r.state == HEALTHY and r.instance_id not in exclude]

    def effective_mode(self, exclude: frozenset = frozenset()) -> str | None:
        """The deployment mode a request would use now, or None when no instance can take it."""
        have = {role: any(r.state == HEALTHY and r.instance_id not in exclude for r in self._by_role[role])
                for role in ROLES}
        disagg = have[PREFILL] and have[DECODE]
        if self.mode == "colocated":
            return "colocated" if have[COLOCATED] else None
        if self.mode == "disaggregated":
            return "disaggregated" if disagg else None
        return "colocated" if have[COLOCATED] else ("disaggregated" if disagg else None)

    # --------------------------------------------------------------------------------------- routing
    def _pick(self, role: int, candidates: list[InstanceRecord], prompt: tuple,
              request: RouteRequest) -> tuple[InstanceRecord, int]:
        matched = self.trees[role].match(prompt)
        pick = self._policies[role].choose(request, candidates, matched)
        return pick, min(matched.get(pick.instance_id, 0), len(prompt) - 1)

    def _plan(self, role: int, candidates: list[InstanceRecord], prompt: tuple, request: RouteRequest):
        """A kv_pool RoutePlan (where, and how the cached prefix gets there); None for other policies."""
        policy = self._policies[role]
        if not getattr(policy, "uses_tiers", False):
            return None
        tiers = self.trees[role].match_tiers(prompt)
        return policy.plan(request, candidates, {i: n for i, (n, _) in tiers.items()}, tiers)

    def route(self, prompt: tuple, session_id: str = "", exclude: Iterable[str] = ()) -> RouteDecision | None:
        """Pick instance(s) for a prompt (token ids as a tuple); None when no instance can take it."""
        exclude = frozenset(exclude)
        request = RouteRequest(prompt_len=len(prompt), session_id=session_id)
        colocated = self.candidates(COLOCATED, exclude) if self.mode != "disaggregated" else []
        if colocated:
            plan = self._plan(COLOCATED, colocated, prompt, request)
            if plan is not None:
                inst = plan.instance
                return RouteDecision("colocated", inst, plan.cached_tokens,
                                     inst.cost_model.exec(len(prompt), plan.cached_tokens), **_moves(plan))
            instance, cached = self._pick(COLOCATED, colocated, prompt, request)
            return RouteDecision("colocated", instance, cached, instance.cost_model.exec(len(prompt), cached))
        if self.mode == "colocated":
            return None
        prefills = self.candidates(PREFILL, exclude)
        decodes = self.candidates(DECODE, exclude) if prefills else []
        if not decodes:
            return None
        plan = self._plan(PREFILL, prefills, prompt, request)
        if plan is not None:
            prefill, prefill_cached, moves = plan.instance, plan.cached_tokens, _moves(plan)
        else:
            (prefill, prefill_cached), moves = self._pick(PREFILL, prefills, prompt, request), {}
        decode, decode_cached = self._pick(DECODE, decodes, prompt, request)
        return RouteDecision("disaggregated", decode, decode_cached,
                             prefill.cost_model.exec(len(prompt), prefill_cached), prefill, prefill_cached, **moves)

    def max_model_len(self, model_limit: int) -> int:
        """The context limit requests are checked against: the model's, or less if an instance says so."""
        limits = [r.max_model_len for r in self.instances.values() if r.max_model_len > 0]
        return min([model_limit, *limits])


def _moves(plan) -> dict:
    return dict(pull_from=plan.source, pull_tokens=plan.pull_tokens, host_tokens=plan.host_tokens,
                transfer_s=plan.transfer_s)
