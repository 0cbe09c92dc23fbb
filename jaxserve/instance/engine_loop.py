"""The one thread that owns an `Engine`: it takes commands (add, abort, profile, stats) from a thread-safe
queue, steps the engine while it has work, and hands each request's new tokens, finish or error to that
request's sink. Also mirrors the MemPool's prompt index (for the reporter's snapshots) and publishes a load
snapshot after every step, so other threads never touch the engine.

With `step_timeout_s` (multi-process instances) a watchdog thread breaks the instance when a step (or a
guarded KV-transfer op) does not finish in time, even though the engine thread itself is stuck in a
collective waiting for a process that hangs: every live request ends with UNAVAILABLE, `on_broken` fires
(health NOT_SERVING) and commands fail at once instead of queueing behind the stuck thread."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import queue
import threading
import time
import zlib
from typing import Callable, Sequence

import grpc

from jaxserve.engine.engine import Engine, Unschedulable
from jaxserve.engine.request import Request
from jaxserve.engine.sampling import SamplingParams
from jaxserve.instance.index_mirror import IndexMirror  # noqa: F401 - re-exported
from jaxserve.instance.profiling import time_to_first_token
from jaxserve.instance.sink import Sink, deliver  # noqa: F401 - Sink re-exported
from jaxserve.instance.throughput_log import ThroughputLog
from jaxserve.proto.enums import FINISH_REASON_CODES

log = logging.getLogger("jaxserve.instance")

# Consecutive failed engine steps after which the engine counts as broken (health NOT_SERVING).
_BROKEN_AFTER = 3


@dataclasses.dataclass
class _Live:
    req: Request
    external_id: str
    sink: Sink
    num_resumed: int        # output tokens that came with the request (a migrated request's stream so far)
    arrival: float          # perf_counter when the instance got the request
    sent: int = 0           # output tokens already pushed (the resumed ones count as sent)
    scheduled_at: float | None = None


class EngineLoop:
    """Owns `engine` on a background thread. `on_index_event(kind, tokens)` is called on that thread for
    every index insert/evict (after the mirror is updated)."""

    def __init__(self, engine: Engine, on_index_event: Callable[[str, tuple], None] | None = None,
                 idle_poll_s: float = 0.5, *, step_timeout_s: float = 0.0, compile_grace_s: float = 600.0,
                 throughput_log: ThroughputLog | None = None):
        """step_timeout_s > 0: the watchdog (see the module docstring); a step that compiles first (new shapes)
        gets compile_grace_s more. throughput_log: the periodic status line (default: every 5 s as
        "instance")."""
        self.engine = engine
        self.step_timeout_s = float(step_timeout_s)
        self.compile_grace_s = float(compile_grace_s)
        self._deadline: float | None = None   # monotonic, while a guarded operation runs on the engine thread
        self._guard_what = ""
        self._stuck = False                   # the watchdog fired and the engine thread has not come back yet
        self._current: concurrent.futures.Future | None = None  # the command running on the engine thread
        self._watchdog: threading.Thread | None = None
        self.mirror = IndexMirror(engine.pool.page_size)
        self._on_index_event = on_index_event
        self._idle_poll_s = idle_poll_s
        self._commands: queue.Queue = queue.Queue()
        self._live: dict[str, _Live] = {}
        # Prefill-only requests done with their first token, still holding their KV pages until `release`.
        self._held: dict[str, _Live] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._failed_steps = 0
        self.broken: str | None = None    # why the engine stopped working, once it has
        self.on_broken: Callable[[str], None] | None = None  # called once (engine thread) when it breaks
        self.load: dict = {}              # replaced (never mutated) after each step: safe to read anywhere
        # While busy the load is refreshed at most every load_interval_s; always when idle.
        self.load_interval_s = 0.05
        self._load_at = 0.0
        self.counters = dict(num_requests=0, prompt_tokens=0, cached_tokens=0, generated_tokens=0)
        self.throughput_log = throughput_log or ThroughputLog("instance")
        engine.pool.set_event_listener(self._index_event)
        self._update_load()

    # ---------------------------------------------------------------------------- any thread
    def start(self) -> "EngineLoop":
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()
        if self.step_timeout_s > 0:
            self.engine.add_new_shape_hook(self._extend_for_compile)  # steps and sequence-parallel prefills
            self._watchdog = threading.Thread(target=self._watch, name="engine-watchdog", daemon=True)
            self._watchdog.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the thread; requests still running end with UNAVAILABLE."""
        self._stopping = True
        self._commands.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run fn() on the engine thread; its result (or exception) lands in the returned future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self._stopping:
            future.set_exception(RuntimeError("the engine loop is stopped"))
            return future
        if self._stuck:
            future.set_exception(RuntimeError(f"the engine is broken: {self.broken}"))
            return future
        self._commands.put((fn, future))
        return future

    def add(self, internal_id: str, external_id: str, prompt: Sequence[int], generated: Sequence[int],
            params: SamplingParams, sink: Sink, arrival: float, *, prefill_only: bool = False,
            cache_salt: str = "") -> None:
        """Queue a request; everything about it (including a refusal) comes back through `sink`.
        prefill_only (role prefill): after the first token the sink gets ("prefilled", token, usage dict)
        instead of a finish, and the request keeps its KV pages until `release(internal_id)`."""
        self.submit(lambda: self._add(internal_id, external_id, list(prompt), list(generated), params, sink,
                                      arrival, prefill_only, cache_salt))

    def abort(self, internal_id: str) -> concurrent.futures.Future:
        return self.submit(lambda: self._abort(internal_id))

    def abort_external(self, external_id: str) -> concurrent.futures.Future:
        """Abort every request with this external (scheduler) id; the future says whether any was found."""
        def run():
            ids = [i for i, live in self._live.items() if live.external_id == external_id]
            for i in ids:
                self._abort(i)
            return bool(ids)
        return self.submit(run)

    def guarded(self, fn: Callable[[], object], extra_s: float = 0.0) -> Callable[[], object]:
        """fn, watched like a step (allowed step_timeout_s + extra_s) when it runs on the engine thread: for
        device work outside the steps that waits on other processes (multi-process KV transfer ops)."""
        def run():
            with self._guard(self.step_timeout_s + extra_s, "a KV transfer operation"):
                return fn()
        return run

    @property
    def num_live(self) -> int:
        return len(self._live) + len(self._held)

    def held_pages(self, internal_id: str) -> list[int]:
        """Engine thread: the pages of a prefilled (held) request, in order."""
        live = self._held.get(internal_id)
        if live is None:
            raise KeyError(f"no prefilled request {internal_id!r} holds pages here")
        return list(live.req.pages)

    def add_prefilled(self, internal_id: str, external_id: str, prompt: Sequence[int], output: Sequence[int],
                      params: SamplingParams, pages: Sequence[int], *, num_computed: int, num_indexed_pages: int,
                      sink: Sink, arrival: float, num_resumed: int, cache_salt: str = "") -> Request:
        """Engine thread: admit a request whose KV for its first num_computed tokens is in `pages` (received
        from a prefill instance; the engine takes over the caller's references). Its events go to `sink`;
        `num_resumed` output tokens count as already sent (the prefill side's first token included)."""
        if self.broken:
            raise RuntimeError(f"the engine is broken: {self.broken}")
        req = self.engine.add_prefilled_request(prompt, output, params, pages, num_computed=num_computed,
                                                num_indexed_pages=num_indexed_pages, request_id=internal_id,
                                                seed=params.seed, cache_salt=cache_salt)
        self._live[internal_id] = _Live(req, external_id, sink, num_resumed, arrival, sent=len(output))
        self.counters["num_requests"] += 1
        return req

    # ---------------------------------------------------------------------------- engine thread
    def _run(self) -> None:
        while True:
            busy = self.engine.has_unfinished()
            try:
                item = self._commands.get(block=not busy, timeout=None if busy else self._idle_poll_s)
            except queue.Empty:
                item = False
            while item is not False:
                if item is None:  # stop
                    self._shutdown()
                    return
                fn, future = item
                if future.set_running_or_notify_cancel():
                    self._current = future
                    try:
                        result = fn()
                        with contextlib.suppress(concurrent.futures.InvalidStateError):  # failed by the watchdog
                            future.set_result(result)
                    except BaseException as e:  # noqa: BLE001 - the caller gets it through the future
                        with contextlib.suppress(concurrent.futures.InvalidStateError):
                            future.set_exception(e)
                    finally:
                        self._current = None
                    self._came_back()
                try:
                    item = self._commands.get_nowait()
                except queue.Empty:
                    item = False
            try:
                if self.engine.has_unfinished():
                    self._step()
                now = time.monotonic()
                if not self.engine.has_unfinished() or now - self._load_at >= self.load_interval_s:
                    self._load_at = now
                    self._update_load()
                self.throughput_log.observe(self.counters, self.load)
            except Exception as e:  # noqa: BLE001 - a dead engine thread would hang every request
                log.exception("engine loop error")
                self._step_failed(e)

    def _shutdown(self) -> None:
        for internal_id in list(self._live):
            self._fail(internal_id, grpc.StatusCode.UNAVAILABLE, "the instance is shutting down")
        for internal_id in list(self._held):
            self._release(internal_id)
        while True:  # commands that raced the stop get an answer rather than a hang
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item[1].set_exception(RuntimeError("the engine loop is stopped"))

    def _add(self, internal_id, external_id, prompt, generated, params: SamplingParams, sink: Sink,
             arrival: float, prefill_only: bool = False, cache_salt: str = "") -> None:
        if self.broken:
            sink.push(("error", grpc.StatusCode.UNAVAILABLE, f"the engine is broken: {self.broken}"))
            return
        context_len = len(prompt) + len(generated)
        remaining = params.max_tokens - len(generated)
        if remaining <= 0 or context_len >= self.engine.max_model_len:
            # Nothing left to generate (a resumed request at its limit): done without touching the engine.
            sink.push(("finish", "length", dict(prompt_tokens=context_len, cached_tokens=0, completion_tokens=0,
                                                ttft_s=0.0, queue_time_s=0.0, prefill_time_s=0.0), [], {}))
            return
        try:
            # Validate the whole context (prompt + resumed tokens) as the prompt it effectively is.
            self.engine.validate(prompt + generated, dataclasses.replace(params, max_tokens=remaining))
            req = self.engine.add_request(prompt, params, request_id=internal_id, prefill_only=prefill_only,
                                          cache_salt=cache_salt)
        except ValueError as e:
            sink.push(("error", grpc.StatusCode.INVALID_ARGUMENT, str(e)))
            return
        if generated:
            # A resumed request starts exactly like one preempted after emitting `generated`: its context is
            # prompt + generated, nothing computed yet, and sampling continues at output index
            # len(generated) (the sampler keys on the output index, so a seeded request resumes its sequence).
            req.output_token_ids = list(generated)
        self._live[internal_id] = _Live(req, external_id, sink, len(generated), arrival, sent=len(generated))
        self.counters["num_requests"] += 1
        if self.engine.step_trace is not None:
            self.engine.step_trace("arrive", request_id=internal_id, prompt_tokens=context_len)

    def _release(self, internal_id: str) -> bool:
        live = self._held.pop(internal_id, None)
        self.engine.release(internal_id)
        return live is not None

    def _abort(self, internal_id: str) -> bool:
        live = self._live.pop(internal_id, None) or self._held.pop(internal_id, None)
        self.engine.abort(internal_id)  # frees its pages (full ones stay in the index)
        return live is not None

    def _fail(self, internal_id: str, code: grpc.StatusCode, message: str) -> None:
        live = self._live.pop(internal_id, None)
        try:
            self.engine.abort(internal_id)
        except Exception:  # noqa: BLE001 - the engine may be in a bad state; the request is failed anyway
            log.exception("abort of %s after a failure", internal_id)
        if live is not None:
            live.sink.push(("error", code, message))

    def _step(self) -> list[Request]:
        t0 = time.perf_counter()
        try:
            with self._guard(self.step_timeout_s, "a step"):
                updated = self.engine.step()
        except Exception as e:  # noqa: BLE001 - every request must end, never hang
            self._came_back()
            self._step_failed(e)
            return []
        if self._came_back():
            return []
        self._failed_steps = 0
        for live in self._live.values():
            if live.scheduled_at is None and live.req.admitted_once:
                live.scheduled_at = t0
        outbox: list[tuple[Sink, tuple]] = []  # this step's events, handed over together (`deliver`)
        trace = self.engine.step_trace
        firsts = []  # with a step trace: requests whose first token is in the outbox (its hand-over)
        try:
            for req in updated:
                live = self._live.get(req.request_id)
                if live is None:
                    continue  # a profiling request
                known = req.num_known_tokens - len(req.prompt_token_ids)  # outputs on the host (no PENDING)
                new = req.output_token_ids[live.sent:known]
                if trace is not None and new and live.sent == live.num_resumed:
                    firsts.append(req.request_id)
                live.sent = known
                self.counters["generated_tokens"] += len(new)
                if req.finish_reason == "prefilled":
                    outbox.append((live.sink, self._prefilled(live)))
                elif req.finished:
                    outbox.append((live.sink, self._finish(live, new)))
                elif new:
                    outbox.append((live.sink, ("tokens", new, _logprobs(req, known - len(new), known))))
        finally:
            deliver(outbox)
            if firsts:
                trace("handed_over", request_ids=firsts)
        return updated

    def _step_failed(self, e: Exception) -> None:
        sched = self.engine.scheduler
        if isinstance(e, Unschedulable):
            # The head of the queue can never fit: fail it alone, the engine itself is fine.
            head = e.request_id
            log.warning("request %s: %s", head, e)
            self._fail(head, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
            if head not in self._live:
                self.engine.abort(head)
            return
        self._failed_steps += 1
        log.exception("engine step failed (%d in a row); failing %d requests", self._failed_steps, len(self._live))
        # A multi-process instance (its leader broadcasts every step) cannot recover from a failed step: the
        # processes are out of step or one of them is gone (jaxserve/engine/multihost.py).
        multiprocess = self.engine.ops.is_multiprocess
        if (self._failed_steps >= _BROKEN_AFTER or multiprocess) and not self.broken:
            self.broken = f"{type(e).__name__}: {e}"
            if multiprocess:
                self.broken = f"a process of this multi-process instance failed or is unreachable: {self.broken}"
            if self.on_broken is not None:
                try:
                    self.on_broken(self.broken)
                except Exception:  # noqa: BLE001 - best effort; requests are failed below regardless
                    log.exception("on_broken callback")
        for internal_id in list(self._live):
            self._fail(internal_id, grpc.StatusCode.INTERNAL, f"engine step failed: {type(e).__name__}: {e}")
        for req in list(sched.running) + list(sched.waiting):  # profiling requests, if any
            self.engine.abort(req.request_id)

    # ---------------------------------------------------------------------------- step watchdog
    @contextlib.contextmanager
    def _guard(self, seconds: float, what: str):
        if self.step_timeout_s <= 0 or self._deadline is not None:  # off, or inside a guarded operation
            yield
            return
        self._guard_what = what
        self._deadline = time.monotonic() + seconds
        try:
            yield
        finally:
            self._deadline = None

    def _extend_for_compile(self) -> None:
        deadline = self._deadline
        if deadline is not None:
            self._deadline = deadline + self.compile_grace_s

    def _watch(self) -> None:
        period = min(1.0, self.step_timeout_s / 4)
        while not self._stopping:
            time.sleep(period)
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline and not self._stuck:
                self._fire()

    def _fire(self) -> None:
        """Watchdog thread: the engine thread is stuck in a guarded operation. Break the instance and end
        every request and command now; the engine thread cleans up if it ever comes back (`_came_back`)."""
        why = (f"a process of this multi-process instance failed or is unreachable: {self._guard_what} did not "
               f"finish within {self.step_timeout_s:g} s (a process hangs, is stopped or lost its network)")
        log.error("step watchdog: %s; failing every request", why)
        self._stuck = True
        if not self.broken:
            self.broken = why
            if self.on_broken is not None:
                try:
                    self.on_broken(why)
                except Exception:  # noqa: BLE001 - best effort; requests are failed below regardless
                    log.exception("on_broken callback")
        for _ in range(3):  # the dicts belong to the (stuck) engine thread: copy, retry if one changed size
            try:
                lives = list(self._live.values()) + list(self._held.values())
                break
            except RuntimeError:
                continue
        else:
            lives = []
        for live in lives:
            live.sink.push(("error", grpc.StatusCode.UNAVAILABLE, why))
        current = self._current
        if current is not None:
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                current.set_exception(RuntimeError(why))
        stop = False
        while True:
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                break
            if item is None:
                stop = True
            elif item[1].set_running_or_notify_cancel():
                item[1].set_exception(RuntimeError(why))
        if stop:
            self._commands.put(None)

    def _came_back(self) -> bool:
        """Engine thread, after a guarded operation: if the watchdog fired meanwhile, fail (quietly: the
        requests were told) and abort everything that was live, and say so."""
        if not self._stuck:
            return False
        self._stuck = False
        for internal_id in list(self._live):
            self._fail(internal_id, grpc.StatusCode.UNAVAILABLE, self.broken or "the engine is broken")
        for internal_id in list(self._held):
            self._release(internal_id)
        return True

    def _usage(self, live: _Live) -> dict:
        req = live.req
        first = req.first_token_time or time.perf_counter()
        scheduled = live.scheduled_at or live.arrival
        return dict(prompt_tokens=len(req.prompt_token_ids) + live.num_resumed,
                    cached_tokens=req.num_cached_tokens, completion_tokens=len(req.output_token_ids) - live.num_resumed,
                    ttft_s=max(first - live.arrival, 0.0), queue_time_s=max(scheduled - live.arrival, 0.0),
                    prefill_time_s=max(first - scheduled, 0.0))

    def _prefilled(self, live: _Live) -> tuple:
        """A prefill-only request has its first token: it keeps its pages (held) until `release`. Returns the
        sink's event."""
        req = live.req
        del self._live[req.request_id]
        self._held[req.request_id] = live
        usage = self._usage(live)
        self.counters["prompt_tokens"] += usage["prompt_tokens"]
        self.counters["cached_tokens"] += req.num_cached_tokens
        n = len(req.output_token_ids)
        return "prefilled", req.output_token_ids[-1], usage, _logprobs(req, n - 1, n)

    def _finish(self, live: _Live, new: list[int]) -> tuple:
        """The request is done: forget it; returns the sink's finish event."""
        req = live.req
        del self._live[req.request_id]
        self.engine.requests.pop(req.request_id, None)
        first = req.first_token_time or time.perf_counter()
        scheduled = live.scheduled_at or live.arrival
        context_len = len(req.prompt_token_ids) + live.num_resumed
        self.counters["prompt_tokens"] += context_len
        self.counters["cached_tokens"] += req.num_cached_tokens
        return ("finish", req.finish_reason if req.finish_reason in FINISH_REASON_CODES else "length", dict(
            prompt_tokens=context_len, cached_tokens=req.num_cached_tokens,
            completion_tokens=len(req.output_token_ids) - live.num_resumed,
            ttft_s=max(first - live.arrival, 0.0), queue_time_s=max(scheduled - live.arrival, 0.0),
            prefill_time_s=max(first - scheduled, 0.0)), new,
            dict(logprobs=_logprobs(req, len(req.output_token_ids) - len(new), len(req.output_token_ids)),
                 stop_reason=req.stop_reason))

    def _index_event(self, kind: str, tokens: tuple) -> None:
        getattr(self.mirror, kind)(tokens)  # insert, evict or offload
        if self._on_index_event is not None:
            self._on_index_event(kind, tokens)

    def _update_load(self) -> None:
        sched, pool = self.engine.scheduler, self.engine.pool
        self.load = dict(
            num_running_requests=len(sched.running), num_queued_requests=len(sched.waiting),
            num_running_tokens=sum(r.num_tokens for r in sched.running),
            num_queued_tokens=sum(r.num_tokens for r in sched.waiting),
            num_free_pages=pool.num_free_pages() + pool.num_unreferenced_cached_pages(),
            num_total_pages=pool.num_pages - 1, num_preemptions=sched.num_preemptions,
            cached_pages=pool.stats()["cached_pages"])

    # ---------------------------------------------------------------------------- profiling
    def profile(self, points: Sequence[tuple[int, int]], repeats: int = 3, seed: int = 0
                ) -> list[tuple[int, int, float]]:
        """Engine thread only (use `submit`): `profiling.time_to_first_token` over this loop's steps, so live
        requests keep being served (and share the steps, as they would in production)."""
        return time_to_first_token(self.engine, self._step, points, repeats, seed)


def default_seed(request_id: str) -> int | None:
    """Seed for a request that came without one: derived from its id, so a request moved to another
    instance (same id) draws the same random numbers there."""
    return zlib.crc32(request_id.encode()) if request_id else None


def _logprobs(req: Request, start: int, end: int) -> list | None:
    """The logprobs of output tokens [start, end) as the engine recorded them, or None when the request did
    not ask for any (a resumed token, sampled elsewhere, has None)."""
    if req.params.logprobs is None:
        return None
    return [req.logprobs.get(i) for i in range(start, end)]
