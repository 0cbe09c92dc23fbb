"""Disaggregated prefill/decode pair in one process (MemServe §2 and its PD modes).

A prefill Engine on one mesh computes the part of each prompt it has not cached and samples the first token
(`add_request(..., prefill_only=True)`: it keeps the prompt's pages afterwards); the pair then moves the KV the
decode Engine lacks with the PD protocol the gRPC instances run (`jaxserve.engine.pd_protocol.send_kv`: prepare
on the decode side's `KvReceiver`, offer, commit; the block moves with an `InProcessTransport`) and hands the
request to the decode Engine, which admits it with that KV in place (`add_prefilled_request`) and decodes to
the end.

Modes (`PD_MODES`), as in MemServe:
- basic:    neither side caches; the full prompt KV moves with `transfer` into pages the decode side allocated.
- caching1: the prefill side indexes its prompt KV (later prompts prefill only their uncached suffix); the
            full prompt KV still moves.
- caching2: as caching1, and the decode side indexes what it receives and its own decode KV; the pair first
            asks the decode side's index how much of the prompt it holds and sends only the rest
            (transfer_with_insert: the receiver references what it holds, allocates, receives and indexes).
- caching3: as caching2, and when a request finishes the decode side sends its decode-phase KV (the part the
            prefill side lacks) back with `transfer_with_insert`, so the next turn's prefill reuses it.
"""

from __future__ import annotations

import collections
import dataclasses
import time

from jaxserve.engine.engine import Engine
from jaxserve.engine.request import Request, Status
from jaxserve.engine.sampling import SamplingParams
from jaxserve.engine.pd_protocol import PD_MODES, LocalPeer, mode_caching, run_sync, send_kv  # noqa: F401
from jaxserve.mempool.transfer import InProcessTransport, KvReceiver, TransferError


@dataclasses.dataclass
class DisaggRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    prefill: Request | None = None
    decode: Request | None = None
    transferred_tokens: int = 0     # prompt tokens whose KV moved prefill -> decode
    transferred_pages: int = 0
    returned_tokens: int = 0        # tokens whose KV moved decode -> prefill (caching3)
    transfer_s: float = 0.0
    error: str | None = None
    finished: bool = False

    @property
    def output_token_ids(self) -> list[int]:
        src = self.decode if self.decode is not None else self.prefill
        return list(src.output_token_ids) if src is not None else []

    @property
    def finish_reason(self) -> str | None:
        if self.error is not None:
            return "error"
        src = self.decode if self.decode is not None else self.prefill
        return src.finish_reason if src is not None else None

    @property
    def stop_text_len(self) -> int | None:
        src = self.decode if self.decode is not None else self.prefill
        return src.stop_text_len if src is not None else None

    @property
    def stop_reason(self):
        src = self.decode if self.decode is not None else self.prefill
        return src.stop_reason if src is not None else None

    @property
    def logprobs(self) -> dict:
        src = self.decode if self.decode is not None else self.prefill
        return src.logprobs if src is not None else {}

    @property
    def first_token_time(self) -> float | None:
        return self.prefill.first_token_time if self.prefill is not None else None

    @property
    def finish_time(self) -> float | None:
        src = self.decode if self.decode is not None else self.prefill
        return src.finish_time if src is not None else None


class DisaggregatedPair:
    """A prefill Engine and a decode Engine (disjoint meshes, tensor-parallel degrees may differ) stepped
    together. The engines' prefix caching must match the mode (`mode_caching`)."""

    def __init__(self, prefill: Engine, decode: Engine, mode: str = "basic", transport=None):
        """transport: the in-process transport both directions use (it owns their OpCounts); tests pass one
        that fails at a chosen stage."""
        p_cache, d_cache = mode_caching(mode)
        if prefill.config.cache.enable_prefix_caching != p_cache or \
                decode.config.cache.enable_prefix_caching != d_cache:
            raise ValueError(f"pd_mode {mode!r} needs prefix caching prefill={p_cache}, decode={d_cache}")
        if prefill.pool.kv_cache_dtype != decode.pool.kv_cache_dtype:
            raise ValueError(f"kv_cache_dtype differs: prefill {prefill.pool.kv_cache_dtype!r}, decode "
                             f"{decode.pool.kv_cache_dtype!r}; the KV moves between them, so both must store it alike")
        if prefill.pool.page_shape != decode.pool.page_shape:
            raise ValueError(f"page shapes differ: {prefill.pool.page_shape} vs {decode.pool.page_shape}")
        overlap = {d.id for d in prefill.mesh.devices.flat} & {d.id for d in decode.mesh.devices.flat}
        if overlap:
            raise ValueError(f"prefill and decode meshes share devices {sorted(overlap)}")
        self.prefill, self.decode, self.mode = prefill, decode, mode
        self.decode_caching, self.send_back = d_cache, mode == "caching3"
        self.requests: dict[str, DisaggRequest] = {}
        self._handoff: collections.deque[DisaggRequest] = collections.deque()
        self._ids = 0
        self.counters = collections.Counter()
        self.transport = transport if transport is not None else InProcessTransport()
        self.decode_receiver = KvReceiver(decode.pool, "decode")
        self.prefill_receiver = KvReceiver(prefill.pool, "prefill")  # caching3: the decode-phase KV comes back

    # -- requests ------------------------------------------------------------------------------------
    def add_request(self, prompt_token_ids, params: SamplingParams, request_id: str | None = None, *,
                    cache_salt: str = "") -> DisaggRequest:
        prompt_token_ids = [int(t) for t in prompt_token_ids]
        if request_id is None:
            request_id = f"pd{self._ids}"
            self._ids += 1
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.decode.validate(prompt_token_ids, params)
        dreq = DisaggRequest(request_id, prompt_token_ids, params, time.perf_counter())
        dreq.prefill = self.prefill.add_request(prompt_token_ids, params, request_id, prefill_only=True,
                                                cache_salt=cache_salt)
        dreq.prefill.arrival_time = dreq.arrival_time
        self.requests[request_id] = dreq
        return dreq

    def abort(self, request_id: str) -> None:
        dreq = self.requests.pop(request_id, None)
        if dreq is None or dreq.finished:
            return
        if dreq in self._handoff:
            self._handoff.remove(dreq)
        self.prefill.abort(request_id)
        if dreq.decode is not None:
            self.decode.abort(request_id)
        dreq.finished = True

    def has_unfinished(self) -> bool:
        return bool(self._handoff) or self.prefill.has_unfinished() or self.decode.has_unfinished()

    # -- stepping ------------------------------------------------------------------------------------
    def step(self) -> list[DisaggRequest]:
        """One prefill step, the hand-overs it made ready, one decode step. Returns requests that finished."""
        done = []
        if self.prefill.has_unfinished():
            for req in self.prefill.step():
                dreq = self.requests[req.request_id]
                if req.finish_reason == "prefilled":
                    self._handoff.append(dreq)
                elif req.finished:  # stopped at the first token: nothing to decode
                    self.prefill.requests.pop(req.request_id, None)
                    done.append(self._finish(dreq))
        while self._handoff:
            dreq = self._handoff[0]
            if not self._hand_over(dreq):
                break  # decode pool full for now: retry after the decode side frees pages
            self._handoff.popleft()
            if dreq.error is not None:
                done.append(self._finish(dreq))
        if self.decode.has_unfinished():
            for req in self.decode.step():
                if req.finished:
                    dreq = self.requests[req.request_id]
                    self.decode.requests.pop(req.request_id, None)
                    if self.send_back and req.finish_reason != "abort":
                        self._send_back(req)
                    done.append(self._finish(dreq))
        return done

    def _finish(self, dreq: DisaggRequest) -> DisaggRequest:
        dreq.finished = True
        self.requests.pop(dreq.request_id, None)
        return dreq

    def _hand_over(self, dreq: DisaggRequest) -> bool:
        """Moves the KV the decode side lacks and queues the request there. False: no room yet."""
        preq = dreq.prefill
        P, D = self.prefill.pool, self.decode.pool
        prompt = preq.prompt_token_ids
        keys = preq.index_tokens(prompt)  # what both indexes key the KV by (salted: jaxserve.cache_salt)
        L, ps = len(prompt), P.page_size
        n_pages = len(preq.pages)
        assert preq.num_computed == L and n_pages == -(-L // ps), (preq.num_computed, L, n_pages)
        start = min(D.cached_prefix_pages(keys), n_pages) if self.decode_caching else 0
        if not D.can_alloc(n_pages - start + 1):  # + the page the first decode step may need
            if not self.decode.has_unfinished():
                dreq.error = f"decode pool cannot hold {n_pages - start} pages"
                self.prefill.release(preq.request_id)
                return True
            return False
        t0 = time.perf_counter()
        committed = []
        peer = LocalPeer("the decode engine", self.decode_receiver, self.transport, committed.append)

        async def offer(start_page, prepared):
            return self.transport.offer(P, preq.pages[start_page:])
        try:
            sent = run_sync(send_kv(peer, dreq.request_id, keys, ps, offer))
        except TransferError as e:
            dreq.error = f"KV transfer failed: {e}"
            self.counters["transfer_failures"] += 1
            return True
        finally:
            self.prefill.release(preq.request_id)  # the prefill side's pages, sent or not
        r = committed[0]
        start, pages, indexed = sent.start_page, r.pages, L // ps if r.insert else 0
        dreq.transfer_s += time.perf_counter() - t0
        dreq.transferred_pages = n_pages - start
        dreq.transferred_tokens = L - start * ps
        self.counters["transferred_tokens"] += dreq.transferred_tokens
        self.counters["transferred_pages"] += dreq.transferred_pages
        dreq.decode = self.decode.add_prefilled_request(
            prompt, preq.output_token_ids, dreq.params, pages, num_computed=L, num_indexed_pages=indexed,
            request_id=dreq.request_id, seed=preq.seed, cache_salt=preq.cache_salt)
        dreq.decode.arrival_time = dreq.arrival_time
        dreq.decode.logprobs.update(preq.logprobs)  # the first token's, sampled on the prefill side
        dreq.decode.num_preemptions = preq.num_preemptions
        return True

    def _send_back(self, req: Request) -> None:
        """caching3: the decode side's whole computed pages the prefill side lacks go back to it."""
        dreq = self.requests[req.request_id]
        P, D = self.prefill.pool, self.decode.pool
        ps = D.page_size
        seq = req.index_tokens(req.all_token_ids[:req.num_computed // ps * ps])
        if not seq:
            return
        n, pages = D.match(seq)
        try:
            start = P.cached_prefix_pages(seq[:n])
            if n // ps > start:
                peer = LocalPeer("the prefill engine", self.prefill_receiver, self.transport,
                                 lambda r: P.free(r.pages))  # the prefill side's index keeps them

                async def offer(start_page, prepared):
                    return self.transport.offer(D, pages[start_page:])
                sent = run_sync(send_kv(peer, req.request_id, seq[:n], ps, offer))
                dreq.returned_tokens = sent.received
                self.counters["returned_tokens"] += dreq.returned_tokens
        except TransferError:
            self.counters["send_back_failures"] += 1  # an optimisation only: the request is complete
        finally:
            D.free(pages)

    def stats(self) -> dict:
        return dict(mode=self.mode, prefill=self.prefill.stats(), decode=self.decode.stats(), **self.counters)
