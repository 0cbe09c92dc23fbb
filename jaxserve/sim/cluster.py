"""Discrete-event simulation of a serving cluster (no jax) with the scheduler's real routing code.

Requests are routed by `jaxserve.scheduler.router.Router` (its prompt trees and policies, untouched) over
`InstanceRecord`s whose in-flight and pending-prefill accounting follows the scheduler server's. The
prompt trees are fed by each simulated instance's LRU page cache exactly as real instances feed them
(INSERT / EVICT of page-aligned prefixes). To keep long prompts cheap, a tree "token" here is one KV page:
page ids are a hash chain over the page's content (which segments, which offsets), so two prompts share a
page id exactly when they share that page and everything before it; the cost model handed to the policies is
rescaled to page units, so their decisions are the ones they would take over token ids.

Each instance is a continuous-batching engine like jaxserve's: every step decodes one token for each
running request and fills the rest of the token budget with prefill chunks (FCFS), admitting waiting
requests while sequences and KV pages allow; a request matches its prompt in the instance's cache at
admission, and computed pages are indexed after every chunk. Runs of decode-only steps are advanced in one
event (and cut at the next step boundary when new work arrives), so a simulation costs O(requests x turns),
not O(tokens).

Settings: colocated, colocated+cache, pd, pd+cache (PD-Caching-3: the prefill side indexes its prompt KV,
only the KV the decode side lacks is sent, the decode side indexes what it receives and what it decodes,
and sends its decode-phase KV back at the end)."""

from __future__ import annotations

import collections
import dataclasses
import heapq
from typing import Sequence

from jaxserve.bench.workloads import Segment, Workload, answer_segment, poisson_arrivals
from jaxserve.scheduler.cost_model import CostModel
from jaxserve.scheduler.policies import LeastLoad, LoadGuard, Locality, Session
from jaxserve.scheduler.router import COLOCATED, DECODE, PREFILL, InstanceRecord, Router
from jaxserve.sim.cost import ClusterCost

SETTINGS = ("colocated", "colocated+cache", "pd", "pd+cache")
SIM_POLICIES = ("locality", "least_load", "round_robin", "session", "session_ll")


class SessionLeastLoad(Session):
    """Session affinity whose new sessions go to the least-loaded instance (no prompt-tree locality):
    the session-based baseline as MemServe describes it. Ours (`session`) falls back to locality."""

    name = "session_ll"

    def __init__(self, guard: LoadGuard = LoadGuard()):
        super().__init__(guard)
        self._fallback = LeastLoad()


# ------------------------------------------------------------------------------------------ page ids
class PageHasher:
    """Page ids of a segment sequence: full pages plus the trailing partial page's content."""

    def __init__(self, page_size: int):
        self.page_size = page_size

    def empty(self):
        return ((), (), 0, 0)  # full page ids, pieces of the partial page, partial length, last full id

    def extend(self, state, seg: Segment):
        pages, pieces, plen, last = state
        pages = list(pages)
        ps = self.page_size
        key = (seg.key, seg.namespace)
        off = 0
        while off < seg.length:
            n = min(ps - plen, seg.length - off)
            pieces = pieces + ((key, off, off + n),)
            plen += n
            off += n
            if plen == ps:
                last = hash((last, pieces))
                pages.append(last)
                pieces, plen = (), 0
        return (tuple(pages), pieces, plen, last)

    def extend_all(self, state, segs: Sequence[Segment]):
        for s in segs:
            state = self.extend(state, s)
        return state

    @staticmethod
    def prompt_ids(state) -> tuple:
        pages, pieces, plen, last = state
        return pages + ((hash((last, pieces, "partial")),) if plen else ())


# ------------------------------------------------------------------------------------------- caches
class PageLRU:
    """An instance's prefix cache over page ids: LRU, leaves first (touching a path walks it deepest first,
    so ancestors are always more recent than descendants)."""

    def __init__(self, on_insert, on_evict):
        self._pages: collections.OrderedDict = collections.OrderedDict()  # id -> [parent, seq, end, children]
        self.on_insert, self.on_evict = on_insert, on_evict

    def __len__(self):
        return len(self._pages)

    def match(self, pages: Sequence) -> int:
        n = 0
        for pid in pages:
            if pid not in self._pages:
                break
            n += 1
        for pid in reversed(pages[:n]):
            self._pages.move_to_end(pid)
        return n

    def insert(self, pages: tuple) -> int:
        added, parent = 0, None
        for i, pid in enumerate(pages):
            if pid not in self._pages:
                self._pages[pid] = [parent, pages, i + 1, 0]
                if parent is not None:
                    self._pages[parent][3] += 1
                added += 1
            parent = pid
        for pid in reversed(pages):
            self._pages.move_to_end(pid)
        if added:
            self.on_insert(pages)
        return added

    def shrink(self, limit: int) -> None:
        while len(self._pages) > max(limit, 0):
            pid = next(k for k, v in self._pages.items() if v[3] == 0)
            parent, seq, end, _ = self._pages.pop(pid)
            if parent is not None and parent in self._pages:
                self._pages[parent][3] -= 1
            self.on_evict(seq[:end])


# ----------------------------------------------------------------------------------------- requests
class SimRequest:
    __slots__ = ("rid", "session", "turn", "arrival", "prompt_len", "output_len", "prompt_pages", "full_pages",
                 "seq_pages", "cached", "computed", "generated", "first_t", "finish_t", "instance", "prefill",
                 "decision", "kv_bytes", "est", "pages_held", "on_done", "admit_seq", "resumed", "admitted",
                 "preemptions", "page_size")

    def __init__(self, rid, session, turn, arrival, prompt_len, output_len, prompt_pages, full_pages, seq_pages,
                 page_size):
        self.page_size = page_size
        self.rid, self.session, self.turn, self.arrival = rid, session, turn, arrival
        self.prompt_len, self.output_len = prompt_len, output_len
        self.prompt_pages, self.full_pages, self.seq_pages = prompt_pages, full_pages, seq_pages
        self.cached = self.computed = self.generated = 0
        self.first_t = self.finish_t = None
        self.instance = self.prefill = None
        self.kv_bytes = 0
        self.est = 0.0
        self.pages_held = 0
        self.admit_seq = 0
        self.resumed = False   # preempted after its first token: recomputes prompt + outputs, then decodes on
        self.admitted = False
        self.preemptions = 0

    # What a (re)admission computes: the prompt, or after a preemption the prompt and the tokens generated.
    @property
    def target_len(self) -> int:
        return self.prompt_len + self.generated if self.resumed else self.prompt_len

    @property
    def target_pages(self) -> tuple:
        if self.resumed:
            return self.seq_pages[:self.target_len // self.page_size]
        return self.prompt_pages[:self.full_pages]


def common_pages(a: Sequence, b: Sequence) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class SimInstance:
    """One engine, stepped like jaxserve's: pages are allocated as tokens are computed (prompt chunks, then
    one token per decode step), cached prefixes are evictable, and when a step cannot get its pages the
    latest-admitted request is preempted (recompute: its computed full pages stay cached, it requeues first).
    A waiting request whose prefix is being computed by a request on this instance waits for those pages
    to be indexed instead of computing them again (the engine's in-flight prefix dedupe)."""

    def __init__(self, sim: "Simulator", iid: str, role: int, caching: bool):
        self.sim, self.iid, self.role, self.caching = sim, iid, role, caching
        c = sim.cost
        self.record = InstanceRecord(instance_id=iid, address="", role=role, page_size=1,
                                     num_pages=c.kv_pages, cost_model=sim.page_cost_model)
        tree_role = role
        self.cache = PageLRU(lambda pages: sim.router.trees[tree_role].insert(iid, pages),
                             lambda pages: sim.router.trees[tree_role].evict(iid, pages)) if caching else None
        self.waiting: collections.deque[SimRequest] = collections.deque()   # to prefill (or recompute)
        self.incoming: collections.deque[SimRequest] = collections.deque()  # prefilled elsewhere, to decode
        self.prefilling: list[SimRequest] = []
        self.running: list[SimRequest] = []
        self.used_pages = 0
        self.busy = False
        self.version = 0
        self.macro = None  # (start, cumulative end times, decodes) of a multi-step decode run
        self.steps = 0
        self.busy_s = 0.0
        self.preemptions = 0
        self.deferrals = 0
        self.prefill_tokens = 0  # prompt (and recomputed) tokens computed
        self.tx_free = self.rx_free = 0.0  # when this instance's KV link is next free to send / receive
        self._admissions = 0

    # ---------------------------------------------------------------------------------------- pages
    def _pages(self, tokens: int) -> int:
        return -(-tokens // self.sim.cost.page_size)

    def _free(self) -> int:
        return self.sim.cost.kv_pages - self.used_pages  # cached prefixes are evictable

    def _grow(self, r: SimRequest, tokens: int) -> bool:
        """Hold pages for `tokens` of r's KV; False (nothing held) if the pool cannot give them. A request
        alone on the instance always gets them (the real engine rejects what can never fit up front)."""
        need = self._pages(tokens) - r.pages_held
        if need <= 0:
            return True
        if need > self._free() and not self._alone(r):
            return False
        r.pages_held += need
        self.used_pages += need
        if self.cache is not None:
            self.cache.shrink(self._free())
        return True

    def _alone(self, r: SimRequest) -> bool:
        return all(o is r for o in self.running) and all(o is r for o in self.prefilling)

    def release(self, r: SimRequest) -> None:
        self.used_pages -= r.pages_held
        r.pages_held = 0

    def _preempt(self, r: SimRequest) -> None:
        if r in self.running:
            self.running.remove(r)
            r.resumed = True  # it has produced tokens: recompute them too
        else:
            self.prefilling.remove(r)
        ps = self.sim.cost.page_size
        self.index(r.target_pages[:r.computed // ps])
        self.release(r)
        r.computed = 0
        r.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(r)

    def _victim(self) -> SimRequest:
        return max(self.running + self.prefilling, key=lambda x: x.admit_seq)

    def _grow_or_preempt(self, r: SimRequest, tokens: int) -> bool:
        """Pages for r, preempting the latest-admitted requests as needed; False if r itself went."""
        while not self._grow(r, tokens):
            victim = self._victim()
            self._preempt(victim)
            if victim is r:
                return False
        return True

    def _match(self, r: SimRequest) -> int:
        if self.cache is None:
            return 0
        n = self.cache.match(r.target_pages)
        ps = self.sim.cost.page_size
        return min(n * ps, (r.target_len - 1) // ps * ps)

    def _shares_in_flight(self, r: SimRequest, matched: int) -> bool:
        ps = self.sim.cost.page_size
        mine = r.target_pages
        for o in self.prefilling:
            shared = min(common_pages(mine, o.target_pages) * ps, (r.target_len - 1) // ps * ps)
            if shared > matched and o.computed < shared:
                return True
        return False

    def index(self, pages: tuple) -> None:
        if self.cache is not None and pages:
            self.cache.insert(pages)
            self.cache.shrink(self._free())

    # -------------------------------------------------------------------------------------- stepping
    def kick(self, now: float) -> None:
        """New work arrived: start a step now if idle, or cut a multi-step decode run at the next boundary."""
        if not self.busy:
            self._start_step(now)
        elif self.macro is not None:
            start, ends, decodes = self.macro
            i = next(j for j, e in enumerate(ends) if e >= now)  # the step in progress
            if i + 1 < len(ends):
                self.version += 1
                self.macro = (start, ends[:i + 1], decodes)
                self.sim.push(ends[i], "step", (self, self.version, None, decodes, i + 1))

    def _admit(self, r: SimRequest) -> None:
        self._admissions += 1
        r.admit_seq = self._admissions

    def _start_step(self, now: float) -> None:
        c = self.sim.cost
        budget, max_seqs = c.max_num_batched_tokens, c.max_num_seqs
        while (self.incoming and len(self.running) + len(self.prefilling) < max_seqs
               and self._grow(self.incoming[0], self.incoming[0].prompt_len + 1)):
            r = self.incoming.popleft()
            self._admit(r)
            self.running.append(r)
        before = self.preemptions
        decodes = []
        for r in list(self.running):
            if r not in self.running:
                continue  # preempted for an earlier request's pages
            if len(decodes) >= max_seqs:
                break
            if self._grow_or_preempt(r, r.prompt_len + r.generated):
                decodes.append(r)
        decodes = [r for r in decodes if r in self.running]
        budget -= len(decodes)
        chunks, tokens, pairs = [], 0, 0.0
        for r in list(self.prefilling):
            if budget <= 0 or r not in self.prefilling:
                continue
            n = min(budget, r.target_len - r.computed)
            if self._grow_or_preempt(r, r.computed + n):
                chunks.append((r, n))
                budget -= n
        decodes = [r for r in decodes if r in self.running]  # a chunk's pages may have preempted a decode
        budget += sum(n for r, n in chunks if r not in self.prefilling)
        chunks = [(r, n) for r, n in chunks if r in self.prefilling]
        preempted = self.preemptions > before  # like the engine: no admission in a step that preempted
        deferred = []
        while (not preempted and budget > 0 and self.waiting
               and len(self.prefilling) + len(self.running) < max_seqs):
            r = self.waiting[0]
            matched = self._match(r)
            if self.cache is not None and self._shares_in_flight(r, matched):
                deferred.append(self.waiting.popleft())
                self.deferrals += 1
                continue
            n = min(budget, r.target_len - matched)
            if not self._grow(r, matched + n):
                break
            self.waiting.popleft()
            r.computed = matched
            if not r.admitted:
                r.cached, r.admitted = matched, True
            self._admit(r)
            self.prefilling.append(r)
            chunks.append((r, n))
            budget -= n
        self.waiting.extendleft(reversed(deferred))
        for r, n in chunks:
            tokens += n
            pairs += n * (2 * r.computed + n + 1) / 2
        if not chunks and not decodes:
            self.busy = False
            return
        self.busy = True
        ctx = sum(r.prompt_len + r.generated for r in decodes)
        if chunks or self.waiting or self.prefilling or self.incoming:
            dur = c.step_time(tokens, pairs, len(decodes), ctx, len(chunks))
            self.macro = None
            self.version += 1
            self.steps += 1
            self.busy_s += dur
            self.sim.push(now + dur, "step", (self, self.version, chunks, decodes, 1))
            return
        # Decode only: advance until the first of them finishes, new work cuts the run, or the pool cannot
        # give the next step its pages (that step then starts normally and preempts). Pages for the whole run
        # are held now.
        k = min(r.output_len - r.generated for r in decodes)
        free = self._free()
        for i in range(1, k):
            extra = sum(max(0, self._pages(r.prompt_len + r.generated + i) - r.pages_held) for r in decodes)
            if extra > free:
                k = i
                break
        for r in decodes:
            self._grow(r, r.prompt_len + r.generated + k - 1)
        ends, t = [], now
        for i in range(k):
            t += c.step_time(0, 0.0, len(decodes), ctx + i * len(decodes))
            ends.append(t)
        self.macro = (now, ends, decodes)
        self.version += 1
        self.sim.push(ends[-1], "step", (self, self.version, None, decodes, k))

    def step_done(self, now: float, version: int, chunks, decodes, k: int) -> None:
        if version != self.version:
            return
        if self.macro is not None:
            self.busy_s += now - self.macro[0]
            self.steps += k
        self.macro = None
        sim = self.sim
        ps = sim.cost.page_size
        for r, n in chunks or ():
            if r not in self.prefilling:
                continue
            r.computed += n
            self.prefill_tokens += n
            self.index(r.target_pages[:r.computed // ps])
            if r.computed >= r.target_len:
                self.prefilling.remove(r)
                if r.resumed:  # recomputed after a preemption: its next token, then decoding again
                    r.resumed = False
                    r.generated += 1
                    if r.generated >= r.output_len:
                        self.finish_here(r, now)
                    else:
                        self.running.append(r)
                else:
                    sim.prefill_done(r, self, now)
        finished = []
        for r in decodes:
            if r not in self.running:
                continue
            r.generated += k
            if r.generated >= r.output_len:
                finished.append(r)
        for r in finished:
            self.finish_here(r, now)
        self._start_step(now)

    def finish_here(self, r: SimRequest, now: float) -> None:
        if r in self.running:
            self.running.remove(r)
        self.sim.finish(r, self, now)


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


class Simulator:
    def __init__(self, cost: ClusterCost, config: SimConfig):
        if config.setting not in SETTINGS:
            raise ValueError(f"setting must be one of {SETTINGS}, got {config.setting!r}")
        if config.policy not in SIM_POLICIES:
            raise ValueError(f"policy must be one of {SIM_POLICIES}, got {config.policy!r}")
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
            inst = SimInstance(self, f"{'cpd'[(COLOCATED, PREFILL, DECODE).index(role)]}{k}", role, caching)
            self.router.add(inst.record)
            self.instances.append(inst)
        self.by_id = {i.iid: i for i in self.instances}
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
                inst, r = payload
                inst.waiting.append(r)
                inst.kick(t)
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
        self.push(t + self.cost.rpc_overhead_s / 2, "enqueue", (target, r))

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
        wire = nbytes / self.cost.transfer_bytes_s
        if not self.cost.transfer_contention:
            return t + wire + self.cost.transfer_latency_s
        start = max(t, src.tx_free, dst.rx_free)
        src.tx_free = dst.rx_free = start + wire
        return start + wire + self.cost.transfer_latency_s

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
            prefill_instance_id=r.prefill.iid if r.prefill is not None else "", kv_bytes=r.kv_bytes))
        session, k, seq_state, prefix_state = r.on_done
        if k + 1 < len(session.turns):
            self.push(end + session.turns[k + 1].think_s, "turn", (session, k + 1, seq_state, prefix_state))


def simulate(workload: Workload, cost: ClusterCost, **config) -> list[dict]:
    return Simulator(cost, SimConfig(**config)).run(workload)
