"""A simulated instance (no jax): a continuous-batching engine stepped like jaxserve's, whose prefix cache is
the real prompt index and eviction (`PrefixCache`, a MemPool's PageBook without KV data) over page ids (see
jaxserve/sim/pages.py: one index "token" is one KV page). The event loop, routing and KV links are
jaxserve/sim/cluster.py's."""

from __future__ import annotations

import collections

from jaxserve.mempool.prefix_cache import PrefixCache
from jaxserve.scheduler.router import InstanceRecord
from jaxserve.sim.pages import common_pages


class SimRequest:
    __slots__ = ("rid", "session", "turn", "arrival", "prompt_len", "output_len", "prompt_pages", "full_pages",
                 "seq_pages", "cached", "computed", "generated", "first_t", "finish_t", "instance", "prefill",
                 "decision", "kv_bytes", "est", "pages_held", "on_done", "admit_seq", "resumed", "admitted",
                 "preemptions", "page_size", "moves", "deferred")

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
        self.moves = None      # jaxserve/sim/pool.py Moves: what bringing its prefix to device moved
        self.deferred = False  # waited once for a prefix another request was computing

    # What a (re)admission computes: the prompt, or after a preemption the prompt and the tokens generated.
    @property
    def target_len(self) -> int:
        return self.prompt_len + self.generated if self.resumed else self.prompt_len

    @property
    def target_pages(self) -> tuple:
        if self.resumed:
            return self.seq_pages[:self.target_len // self.page_size]
        return self.prompt_pages[:self.full_pages]


class SimInstance:
    """One engine, stepped like jaxserve's: pages are allocated as tokens are computed (prompt chunks, then
    one token per decode step), cached prefixes are evictable, and when a step cannot get its pages the
    latest-admitted request is preempted (recompute: its computed full pages stay cached, it requeues first).
    A waiting request whose prefix is being computed by a request on this instance waits for those pages
    to be indexed instead of computing them again (the engine's in-flight prefix dedupe)."""

    def __init__(self, sim: "Simulator", iid: str, role: int, caching: bool, host_pages: int = 0):
        self.sim, self.iid, self.role, self.caching = sim, iid, role, caching
        c = sim.cost
        self.record = InstanceRecord(instance_id=iid, address="", role=role, page_size=1,
                                     num_pages=c.kv_pages, cost_model=sim.page_cost_model)
        # One index page per KV page (page ids are the index's tokens); its events feed the prompt trees as a
        # real instance's do. Request pages are counted apart (`used_pages`), and the cache is kept within
        # what they leave free (`shrink`).
        def on_event(kind: str, pages: tuple) -> None:
            tree = sim.router.trees[role]
            {"insert": tree.insert, "evict": tree.evict, "offload": tree.offload}[kind](iid, pages)

        self.cache = PrefixCache(1, c.kv_pages, on_event, host_pages) if caching else None
        self.number = 0        # position in the cluster (per-pair links)
        self.pcie_free = 0.0   # when this instance's host-tier link is next free
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
        # A host-tier part was swapped in before the request queued (jaxserve/sim/pool.py); one evicted to host
        # since is recomputed.
        n = self.cache.match(r.target_pages, device_only=True)
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

    def _prefill_chunks(self, reqs: list[SimRequest], chunks: list, budget: int) -> int:
        for r in reqs:
            if budget <= 0 or r not in self.prefilling:
                continue
            n = min(budget, r.target_len - r.computed)
            if self._grow_or_preempt(r, r.computed + n):
                chunks.append((r, n))
                budget -= n
        return budget

    def _admit_waiting(self, chunks: list, budget: int, arrived_before: float | None = None) -> int:
        """Admits waiting requests in order (those that arrived before `arrived_before` only, when given),
        deferring those whose prefix a prefilling request is still computing."""
        max_seqs = self.sim.cost.max_num_seqs
        deferred = []
        while (budget > 0 and self.waiting and len(self.prefilling) + len(self.running) < max_seqs
               and (arrived_before is None or self.waiting[0].arrival < arrived_before)):
            r = self.waiting[0]
            matched = self._match(r)
            if self.cache is not None and self._shares_in_flight(r, matched):
                r.deferred = True
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
        return budget

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
        # Like the engine: prefills that arrived after a request deferred behind an in-flight shared prefix let
        # it be admitted first (it keeps its place in line).
        head = self.waiting[0] if self.waiting and self.waiting[0].deferred else None
        later = [r for r in self.prefilling if head is not None and r.arrival > head.arrival]
        budget = self._prefill_chunks([r for r in self.prefilling if r not in later], chunks, budget)
        preempted = self.preemptions > before  # like the engine: no admission in a step that preempted
        if later and not preempted:
            n_prefilling = len(self.prefilling)
            budget = self._admit_waiting(chunks, budget, arrived_before=min(r.arrival for r in later))
            admitted = self.prefilling[n_prefilling:]
            del self.prefilling[n_prefilling:]
            at = self.prefilling.index(later[0])
            self.prefilling[at:at] = admitted
        budget = self._prefill_chunks(later, chunks, budget)
        decodes = [r for r in decodes if r in self.running]  # a chunk's pages may have preempted a decode
        budget += sum(n for r, n in chunks if r not in self.prefilling)
        chunks = [(r, n) for r, n in chunks if r in self.prefilling]
        if self.preemptions == before:
            self._admit_waiting(chunks, budget)
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
