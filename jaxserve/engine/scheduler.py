"""Continuous batching: each step spends a token budget on running requests first (decodes and
prefill chunks), then admits waiting ones; preempts by recompute when the MemPool runs out of pages.

Prefix reuse happens at admission: a request `match`es its tokens in the MemPool's prompt index and only
its uncached suffix is computed. Full pages are offered to the index as soon as they are computed, so a
request admitted behind another that shares an uncached prefix is deferred until that prefix is in the
index, then reuses it instead of computing it a second time. It keeps its place in line meanwhile: running
prefills that arrived after it wait for its admission (FCFS by arrival)."""

from __future__ import annotations

import collections
import dataclasses

from jaxserve.config import SchedulerConfig
from jaxserve.engine.buckets import padding_cut, token_bucket
from jaxserve.engine.request import Request, Status


@dataclasses.dataclass
class ScheduledBatch:
    entries: list[tuple[Request, int]]  # (request, tokens computed for it this step)
    sequence_parallel: bool = False     # one request's whole uncached suffix, prefilled over the `seq` axis

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.entries)

    @property
    def decode_only(self) -> bool:
        return all(n == 1 for _, n in self.entries)


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool, *, enable_prefix_caching: bool,
                 sp_threshold: int | None = None):
        self.config = config
        self.pool = pool
        self.page_size = pool.page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.num_deferred_for_shared_prefix = 0
        self.sp_threshold = sp_threshold  # None: no sequence-parallel prefill

    # -- queue --------------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    # -- one step -----------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        if self.sp_threshold is not None and self.waiting:
            entry = self._admit_sequence_parallel()
            if entry is not None:  # a step of its own: running requests continue next step
                return ScheduledBatch([entry], sequence_parallel=True)
        budget = self.config.max_num_batched_tokens
        entries: list[tuple[Request, int]] = []
        # A request deferred behind an in-flight shared prefix keeps its place in line: running prefills that
        # arrived after it wait until it has been admitted (FCFS by arrival), so a group's followers run the
        # step after their prefix is computed instead of behind a later group's whole chunk.
        head = self.waiting[0] if self.waiting and self.waiting[0].deferred else None
        later: list[Request] = []
        preempted = stop = False
        for req in list(self.running):
            if budget <= 0 or stop:
                break
            if req.status is not Status.RUNNING or req.finishing:
                continue  # preempted for an earlier request's pages, or its last token is being sampled
            if head is not None and req.is_prefilling and req.arrival_time > head.arrival_time:
                later.append(req)
                continue
            n, p, stop = self._continue(req, entries, budget)
            budget -= n
            preempted |= p
        if later and not preempted:
            n_running = len(self.running)
            budget = self._admit(entries, budget, arrived_before=min(r.arrival_time for r in later))
            admitted = self.running[n_running:]
            del self.running[n_running:]
            at = self.running.index(later[0])  # the admitted go before the prefills that waited for them
            self.running[at:at] = admitted
        for req in later:
            if budget <= 0 or stop:
                break
            if req.status is Status.RUNNING:
                n, p, stop = self._continue(req, entries, budget)
                budget -= n
                preempted |= p
        if not preempted:
            budget = self._admit(entries, budget)
        if self.config.enable_chunked_prefill and self.config.cut_padding:
            self._cut_padding(entries)
        return ScheduledBatch(entries)

    def _continue(self, req: Request, entries, budget: int) -> tuple[int, bool, bool]:
        """Schedules running `req`'s next tokens (a decode or a prefill chunk) within `budget`, preempting the
        latest unscheduled requests when pages run out. Returns (tokens scheduled, whether it preempted, whether
        only finishing requests hold the pages it needs, so nothing after it can run either)."""
        n = min(req.num_uncomputed, budget)
        if n < req.num_uncomputed and not self.config.enable_chunked_prefill:
            return 0, False, False
        need = self._pages_for(req.num_computed + n) - len(req.pages)
        preempted = False
        while need > 0 and not self.pool.can_alloc(need):
            # Never a request already in this step, nor a finishing one: its pages come back when its last step
            # completes.
            scheduled = {id(r) for r, _ in entries}
            victim = next((r for r in reversed(self.running) if not r.finishing and id(r) not in scheduled), None)
            if victim is None:
                break
            self.preempt(victim)
            preempted = True
            if victim is req:
                return 0, True, False
        if need > 0 and not self.pool.can_alloc(need):
            return 0, preempted, True
        if need > 0:
            req.pages.extend(self.pool.alloc(need))
        entries.append((req, n))
        return n, preempted, False

    def _cut_padding(self, entries: list[tuple[Request, int]]) -> None:
        """Shortens the step's last prefill chunk so the step fills a smaller token bucket when that pads much
        less (`buckets.padding_cut`: a 544-token prompt runs as 512 + 32 tokens, not in one 768-row step); the
        request keeps its pages and computes the rest next step."""
        last = next((i for i in range(len(entries) - 1, -1, -1) if entries[i][1] > 1), None)
        if last is None:
            return
        req, n = entries[last]
        cut = padding_cut(sum(k for _, k in entries), n, token_bucket(self.config.max_num_batched_tokens))
        if cut:
            entries[last] = (req, n - cut)

    def _match_capped(self, tokens: list[int]) -> tuple[int, list[int]]:
        """Cached whole-page prefix of `tokens` (index tokens: salted; pages referenced for the caller), capped
        so at least one token is left to compute: the next token needs the last position's logits."""
        n_cached, pages = (self.pool.match(tokens) if self.enable_prefix_caching else (0, []))
        cap = (len(tokens) - 1) // self.page_size * self.page_size
        if n_cached > cap:
            keep = cap // self.page_size
            self.pool.free(pages[keep:])
            pages, n_cached = pages[:keep], cap
        return n_cached, pages

    def _start(self, req: Request, pages: list[int], num_computed: int) -> None:
        """Moves the head of the waiting queue to running with `pages` holding its first `num_computed`
        tokens' KV (cached, received or none)."""
        self.waiting.popleft()
        req.pages = pages
        req.num_computed = num_computed
        if not req.admitted_once:
            req.num_cached_tokens = num_computed
            req.admitted_once = True
        req.status = Status.RUNNING
        self.running.append(req)

    def _admit(self, entries, budget: int, arrived_before: float | None = None) -> int:
        """Admits waiting requests in order (those that arrived before `arrived_before` only, when given) while
        budget, sequence slots and pages last; defers those sharing a prefix still being computed."""
        deferred = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if arrived_before is not None and req.arrival_time >= arrived_before:
                break
            if req.preloaded:
                if not self._admit_preloaded(req, entries, budget):
                    break
                budget -= entries[-1][1]
                continue
            tokens = req.index_tokens(req.all_token_ids)
            n_cached, pages = self._match_capped(tokens)
            if self.enable_prefix_caching and self._shares_prefix_in_flight(tokens, n_cached):
                self.pool.free(pages)
                req.deferred = True
                deferred.append(self.waiting.popleft())
                self.num_deferred_for_shared_prefix += 1
                continue
            n = len(tokens) - n_cached
            if n > budget and not self.config.enable_chunked_prefill:
                self.pool.free(pages)
                break
            n = min(n, budget)
            new_pages = self.pool.alloc(self._pages_for(n_cached + n) - len(pages))
            if new_pages is None:
                self.pool.free(pages)
                break
            req.num_indexed_pages = len(pages)
            self._start(req, pages + new_pages, n_cached)
            entries.append((req, n))
            budget -= n
        self.waiting.extendleft(reversed(deferred))
        return budget

    def _admit_sequence_parallel(self) -> tuple[Request, int] | None:
        """Admits the first waiting request for a sequence-parallel prefill of its whole uncached suffix when
        that suffix has >= sp_threshold tokens and its pages can be allocated; otherwise leaves it to the
        normal path (which chunks, defers for in-flight shared prefixes, or preempts)."""
        req = self.waiting[0]
        tokens = req.index_tokens(req.all_token_ids)
        # The sequence-parallel step has the plain sampler only: a request with sampling extras (logprobs,
        # penalties, grammar, ...) takes the normal path.
        if req.preloaded or req.params.extended or len(tokens) < self.sp_threshold \
                or len(self.running) >= self.config.max_num_seqs:
            return None
        n_cached, pages = self._match_capped(tokens)
        n = len(tokens) - n_cached
        if n < self.sp_threshold or (self.enable_prefix_caching and self._shares_prefix_in_flight(tokens, n_cached)):
            self.pool.free(pages)
            return None
        new_pages = self.pool.alloc(self._pages_for(len(tokens)) - len(pages))
        if new_pages is None:
            self.pool.free(pages)
            return None
        req.num_indexed_pages = len(pages)
        self._start(req, pages + new_pages, n_cached)
        return req, n

    def _admit_preloaded(self, req: Request, entries, budget: int) -> bool:
        """Admits a request whose first `num_computed` tokens' KV is already in `req.pages` (received from a
        prefill instance). If it cannot run now it stays first in line and keeps its pages."""
        n = req.num_uncomputed
        if n > budget and not self.config.enable_chunked_prefill:
            return False
        n = min(n, budget)
        new_pages = self.pool.alloc(max(0, self._pages_for(req.num_computed + n) - len(req.pages)))
        if new_pages is None:
            return False
        req.preloaded = False
        self._start(req, req.pages + new_pages, req.num_computed)
        entries.append((req, n))
        return True

    def _shares_prefix_in_flight(self, tokens: list[int], n_cached: int) -> bool:
        """True when a running request is still computing whole pages this one could reuse later: they agree on
        a whole page beyond both what this one has cached and what the other has computed (and short of this
        one's last token, which it computes itself). One list comparison per running prefill."""
        cap = (len(tokens) - 1) // self.page_size * self.page_size
        for other in self.running:
            if other.num_computed >= len(other.prompt_token_ids):
                continue
            need = (max(n_cached, other.num_computed) // self.page_size + 1) * self.page_size
            if need <= cap and other.index_tokens(other.all_token_ids[:need]) == tokens[:need]:
                return True
        return False

    # -- bookkeeping --------------------------------------------------------------------------------
    def index_computed_pages(self, req: Request) -> None:
        """Offer newly completed full pages to the prompt index (no-op without prefix caching); a page whose
        token is still being sampled on the device (async scheduling) waits for it."""
        full = min(req.num_computed, req.num_known_tokens) // self.page_size
        if not self.enable_prefix_caching or full <= req.num_indexed_pages:
            return
        self.pool.insert(req.index_tokens(req.all_token_ids[: full * self.page_size]), req.pages[:full])
        req.num_indexed_pages = full

    def preempt(self, req: Request) -> None:
        """Recompute-style preemption: drop the request's pages (full ones stay indexed) and requeue it
        at the front."""
        self.index_computed_pages(req)
        self.running.remove(req)
        self.pool.free(req.pages)
        req.pages, req.num_computed, req.num_indexed_pages = [], 0, 0
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def hold(self, req: Request) -> None:
        """Prefill-only request done: leaves the batch like a finished one, but keeps its pages (full ones are
        indexed as usual) until `finish` releases them."""
        self.index_computed_pages(req)
        self.running.remove(req)
        req.status = Status.FINISHED
        req.finish_reason = "prefilled"

    def finish(self, req: Request, reason: str) -> None:
        if req.status is Status.RUNNING:
            self.index_computed_pages(req)
            self.running.remove(req)
            self.pool.free(req.pages)
        elif req.status is Status.WAITING:
            self.waiting.remove(req)
            self.pool.free(req.pages)  # a preloaded request's received pages (empty otherwise)
        elif req.pages:  # held after a prefill-only run
            self.pool.free(req.pages)
        req.pages = []
        req.status = Status.FINISHED
        req.finish_reason = reason
