"""Discrete-event simulation of a serving cluster (no jax) with the scheduler's real routing code.

Requests are routed by `jaxserve.scheduler.router.Router` (its prompt trees and policies, untouched) over
`InstanceRecord`s whose in-flight and pending-prefill accounting follows the scheduler server's. The
prompt trees are fed by each simulated instance's prefix cache (the real prompt index and eviction, without
KV data: jaxserve/mempool/prefix_cache.py) exactly as real instances feed them (INSERT / EVICT of page-aligned
prefixes). To keep long prompts cheap, a tree "token" here is one KV page (jaxserve/sim/pages.py); the cost
model handed to the policies is rescaled to page units, so their decisions are the ones they would take over
token ids.

Each instance (jaxserve/sim/instance.py) is a continuous-batching engine like jaxserve's: every step decodes one token for each
running request and fills the rest of the token budget with prefill chunks (FCFS), admitting waiting
requests while sequences and KV pages allow; a request matches its prompt in the instance's cache at
admission, and computed pages are indexed after every chunk. Runs of decode-only steps are advanced in one
event (and cut at the next step boundary when new work arrives), so a simulation costs O(requests x turns),
not O(tokens).

Settings: colocated, colocated+cache, pd, pd+cache (PD-Caching-3: the prefill side indexes its prompt KV,
only the KV the decode side lacks is sent, the decode side indexes what it receives and what it decodes,
and sends its decode-phase KV back at the end).

Cluster KV pool (issue 18): with `host_tier` each instance's evicted prefixes move to a host tier, and the
`kv_pool` policy may have a request's prefix pulled from a peer; both moves happen before the request queues
(jaxserve/sim/pool.py)."""

from __future__ import annotations

import dataclasses
import heapq

from jaxserve.bench.workloads import Workload, answer_segment, poisson_arrivals
from jaxserve.scheduler.cost_model import CostModel
from jaxserve.scheduler.kv_pool import KVPool
from jaxserve.scheduler.policies import LeastLoad, LoadGuard, Locality, Session
from jaxserve.scheduler.router import COLOCATED, DECODE, PREFILL, Router
from jaxserve.sim.cost import ClusterCost
from jaxserve.sim.instance import SimInstance, SimRequest
from jaxserve.sim.pages import PageHasher
from jaxserve.sim.pool import PoolMoves, transfer_model

SETTINGS = ("colocated", "colocated+cache", "pd", "pd+cache")
SIM_POLICIES = ("locality", "least_load", "round_robin", "session", "session_ll", "kv_pool")


class SessionLeastLoad(Session):
    """Session affinity whose new sessions go to the least-loaded instance (no prompt-tree locality):
    the session-based baseline as MemServe describes it. Ours (`session`) falls back to locality."""

    name = "session_ll"

    def __init__(self, guard: LoadGuard = LoadGuard()):
        super().__init__(guard)
        self._fallback = LeastLoad()


# ---------------------------------------------------------------------------------------- simulator
@dataclasses.dataclass
class SimConfig:
    setting: str = "colocated+cache"
    policy: str = "locality"
    num_instances: int = 2         # pd settings: half prefill, half decode (at least one each)
    num_prefill: int | None = None  # pd: override the split
    rate: float = 1.0              # sessions per second (ignored for timed sessions)
    seed: int = 0
    load_guard_factor: float = 1.5
    load_guard_slack: float = 2.0
    send_back: bool = True         # pd+cache: PD-Caching-3 (decode-phase KV back to the prefill side); False:
                                   # PD-Caching-2 (what the instance server runs today)
    miss_weight: float | None = None  # locality (and session's fallback): None = policies.MISS_WEIGHT
    host_tier: bool = False        # each instance's evicted prefixes move to a host tier of cost.host_kv_pages
    peer_fetch: bool = True        # kv_pool: pull prefixes from peers (False: host-tier aware only)

    def __post_init__(self):
        if self.setting not in SETTINGS:
            raise ValueError(f"setting must be one of {SETTINGS}, got {self.setting!r}")
        if self.policy not in SIM_POLICIES:
            raise ValueError(f"policy must be one of {SIM_POLICIES}, got {self.policy!r}")


class Simulator:
    def __init__(self, cost: ClusterCost, config: SimConfig):
        self.cost, self.config = cost, config
        ps = cost.page_size
        fitted = CostModel.fit((n, c, cost.prefill_time(n, c)) for n, c in
                               [(n, int(n * f)) for n in (128, 512, 2048, 8192, 32768) for f in (0, 0.5, 0.875)])
        # page units: exec(pages, cached pages) = exec(tokens, cached tokens) for whole pages
        self.page_cost_model = CostModel(fitted.fixed_s, fitted.per_token_s * ps, fitted.attention_s * ps * ps)
        guard = LoadGuard(config.load_guard_factor, config.load_guard_slack)
        policy = "session" if config.policy == "session_ll" else config.policy
        self.router = Router(policy, guard)
        if config.policy == "session_ll":
            self.router._policies = {role: SessionLeastLoad(guard) for role in self.router._policies}
        if config.miss_weight is not None:
            for p in self.router._policies.values():
                for loc in (p, getattr(p, "_fallback", None)):
                    if isinstance(loc, Locality):
                        loc.miss_weight = config.miss_weight
        caching = config.setting.endswith("+cache")
        self.pd = config.setting.startswith("pd")
        self.instances: list[SimInstance] = []
        if self.pd:
            n_p = config.num_prefill or max(1, config.num_instances // 2)
            n_d = max(1, config.num_instances - n_p)
            roles = [PREFILL] * n_p + [DECODE] * n_d
        else:
            roles = [COLOCATED] * config.num_instances
        for k, role in enumerate(roles):
            inst = SimInstance(self, f"{'cpd'[(COLOCATED, PREFILL, DECODE).index(role)]}{k}", role, caching,
                               host_pages=cost.host_kv_pages if config.host_tier else 0)
            inst.number = k
            self.router.add(inst.record)
            self.instances.append(inst)
        self.by_id = {i.iid: i for i in self.instances}
        self.pool = PoolMoves(self)
        if config.policy == "kv_pool":
            weight = {} if config.miss_weight is None else dict(miss_weight=config.miss_weight)
            tm = transfer_model(cost, self.instances)
            for role in (COLOCATED, PREFILL, DECODE):
                self.router.set_policy(role, KVPool(guard, transfer=tm, peer_fetch=config.peer_fetch, **weight))
        self.events: list = []
        self._seq = 0
        self.now = 0.0
        self.records: list[dict] = []
        self.hasher = PageHasher(ps)

    def push(self, t: float, kind: str, payload) -> None:
        self._seq += 1
        heapq.heappush(self.events, (t, self._seq, kind, payload))

    # ------------------------------------------------------------------------------------- sessions
    def run(self, workload: Workload, until: float = float("inf")) -> list[dict]:
        starts = poisson_arrivals(workload, self.config.rate, self.config.seed)
        prefix_states: dict = {}
        for s, t0 in zip(workload.sessions, starts):
            key = tuple(s.prefix)
            if key not in prefix_states:
                prefix_states[key] = self.hasher.extend_all(self.hasher.empty(), s.prefix)
            self.push(t0, "turn", (s, 0, prefix_states[key], prefix_states[key]))
        while self.events:
            t, _, kind, payload = heapq.heappop(self.events)
            if t > until:
                break
            self.now = t
            if kind == "turn":
                self._turn(t, *payload)
            elif kind == "step":
                inst, version, chunks, decodes, k = payload
                inst.step_done(t, version, chunks, decodes, k)
            elif kind == "enqueue":
                inst, r, d = payload
                self.pool.arrive(t, inst, r, d)
            elif kind == "fetched":
                self.pool.fetched(t, *payload)
            elif kind == "transfer":
                self._transfer_done(t, *payload)
            elif kind == "index":
                inst, pages = payload
                inst.index(pages)
        return self.records

    def _turn(self, t: float, session, k: int, hist_state, prefix_state) -> None:
        turn = session.turns[k]
        base = hist_state if session.carry_history else prefix_state
        state = self.hasher.extend_all(base, turn.user)
        prompt_len = sum(seg.length for seg in session.prompt_segments(k))
        answer = answer_segment(session.session_id, k, turn.output_len)
        seq_state = self.hasher.extend(state, answer)
        r = SimRequest(f"{session.session_id}-t{k}", session, k, t, prompt_len, turn.output_len,
                       PageHasher.prompt_ids(state), len(state[0]), seq_state[0], self.cost.page_size)
        r.on_done = (session, k, seq_state, prefix_state)
        self._route(r, t)

    def _route(self, r: SimRequest, t: float) -> None:
        d = self.router.route(r.prompt_pages, r.session.session_id)
        inst = self.by_id[d.instance.instance_id]
        if d.prefill is not None:
            p = self.by_id[d.prefill.instance_id]
            r.prefill = p
            r.instance = inst
            p.record.in_flight_requests += 1
            p.record.pending_prefill_s += d.estimate_s
            inst.record.in_flight_requests += 1
            target = p
        else:
            r.instance = inst
            inst.record.in_flight_requests += 1
            inst.record.pending_prefill_s += d.estimate_s
            target = inst
        r.est = d.estimate_s
        self.push(t + self.cost.rpc_overhead_s / 2, "enqueue", (target, r, d))

    def prefill_done(self, r: SimRequest, inst: SimInstance, t: float) -> None:
        r.first_t = t
        r.generated = 1
        rec = inst.record
        rec.pending_prefill_s = max(rec.pending_prefill_s - r.est, 0.0)
        if inst.role == COLOCATED:
            if r.generated >= r.output_len:
                self.finish(r, inst, t)
            else:
                inst.running.append(r)
            return
        # disaggregated: the prefill side is done with the request once its KV has left
        rec.in_flight_requests -= 1
        d = r.instance
        sent = r.prompt_len
        if d.cache is not None:
            sent -= min(d.cache.match(r.prompt_pages[:r.full_pages]) * self.cost.page_size, r.prompt_len)
        nbytes = sent * self.cost.kv_bytes_per_token
        r.kv_bytes += nbytes
        self.push(self._link(inst, d, t, nbytes), "transfer", (r, inst))

    def _link(self, src: SimInstance, dst: SimInstance, t: float, nbytes: float) -> float:
        """When a transfer of nbytes from src to dst issued at t completes: transfers share each instance's
        link (one at a time out of the sender, one at a time into the receiver), then pay the latency."""
        if nbytes <= 0:
            return t
        bw, latency = self.cost.link(src.number, dst.number)
        wire = nbytes / bw
        if not self.cost.transfer_contention:
            return t + wire + latency
        start = max(t, src.tx_free, dst.rx_free)
        src.tx_free = dst.rx_free = start + wire
        return start + wire + latency

    def _transfer_done(self, t: float, r: SimRequest, p: SimInstance) -> None:
        # The prefill instance answers (and the client sees the first token) once the KV has been sent.
        r.first_t = t
        p.release(r)
        p.kick(t)
        d = r.instance
        d.index(r.prompt_pages[:r.full_pages])  # transfer_with_insert
        if r.generated >= r.output_len:
            self.finish(r, d, t)
            return
        d.incoming.append(r)
        d.kick(t)

    def finish(self, r: SimRequest, inst: SimInstance, t: float) -> None:
        r.finish_t = t
        inst.release(r)
        inst.record.in_flight_requests -= 1
        inst.index(r.seq_pages)
        if r.prefill is not None and r.prefill.cache is not None and self.config.send_back:  # PD-Caching-3
            back = max(len(r.seq_pages) - r.full_pages, 0) * self.cost.page_size * self.cost.kv_bytes_per_token
            r.kv_bytes += back
            # Off the request's critical path, but it occupies both links; indexed once it has arrived.
            self.push(self._link(inst, r.prefill, t, back), "index", (r.prefill, r.seq_pages))
        o = self.cost.rpc_overhead_s / 2
        first = r.first_t + o
        end = t + o
        self.records.append(dict(
            request_id=r.rid, session_id=r.session.session_id, turn=r.turn, arrival_s=r.arrival,
            ttft_s=first - r.arrival, jct_s=end - r.arrival, prompt_tokens=r.prompt_len, cached_tokens=r.cached,
            output_tokens=r.output_len, ok=True, error=None, instance_id=inst.iid,
            prefill_instance_id=r.prefill.iid if r.prefill is not None else "", kv_bytes=r.kv_bytes,
            host_tokens=r.moves.host_tokens if r.moves else 0, peer_tokens=r.moves.peer_tokens if r.moves else 0,
            host_bytes=r.moves.host_bytes if r.moves else 0.0, peer_bytes=r.moves.peer_bytes if r.moves else 0.0))
        session, k, seq_state, prefix_state = r.on_done
        if k + 1 < len(session.turns):
            self.push(end + session.turns[k + 1].think_s, "turn", (session, k + 1, seq_state, prefix_state))


def simulate(workload: Workload, cost: ClusterCost, **config) -> list[dict]:
    return Simulator(cost, SimConfig(**config)).run(workload)
