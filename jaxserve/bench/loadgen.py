"""Load generator over the gRPC client (asyncio, no jax).

Sessions start at Poisson arrivals of `rate` sessions per second (or at the workload's own timestamps);
inside a session turn k+1 is sent only after turn k's answer has fully arrived, and its prompt contains that
answer's tokens. Runs are bounded: no session starts after `duration_s`, and whatever is still running
`grace_s` later is cancelled (recorded with error "CANCELLED"). One JSON-able record per request."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time
from typing import Callable

from jaxserve.bench.workloads import Segment, Workload, poisson_arrivals
from jaxserve.client import AsyncClient, ClientError, RetryPolicy


@dataclasses.dataclass
class LoadConfig:
    rate: float = 1.0                 # sessions per second (inf / <= 0: all at once); ignored for timed sessions
    duration_s: float = 60.0          # no session starts after this
    grace_s: float = 120.0            # then in-flight requests get this long before they are cancelled
    seed: int = 0
    request_timeout_s: float = 120.0
    max_context: int | None = None    # skip turns whose prompt + output would exceed this (end the session)
    progress: bool = True
    progress_interval_s: float = 1.0
    temperature: float = 0.0


class _Progress:
    def __init__(self, total: int, enabled: bool, stream=sys.stderr):
        self.total, self.enabled, self.stream = total, enabled, stream
        self.done = self.failed = self.in_flight = 0
        self.t0 = time.monotonic()

    def line(self) -> str:
        width = 30
        frac = self.done / self.total if self.total else 1.0
        bar = "#" * int(width * frac) + "." * (width - int(width * frac))
        return (f"[{bar}] {self.done}/{self.total} done, {self.in_flight} in flight, {self.failed} failed, "
                f"{time.monotonic() - self.t0:.0f}s")

    def show(self, final: bool = False) -> None:
        if self.enabled:
            self.stream.write("\r" + self.line() + ("\n" if final else ""))
            self.stream.flush()


async def run_load(target: str | AsyncClient, workload: Workload, config: LoadConfig = LoadConfig(),
                   on_record: Callable[[dict], None] | None = None) -> list[dict]:
    """Play the workload against the scheduler at `target`; returns the records (also given to on_record)."""
    own = not isinstance(target, AsyncClient)
    client = AsyncClient(target, retry=RetryPolicy(max_attempts=1)) if own else target
    starts = poisson_arrivals(workload, config.rate, config.seed)
    records: list[dict] = []
    progress = _Progress(workload.num_requests, config.progress)
    loop_t0 = time.monotonic()
    wall_t0 = time.time()

    def add(rec):
        records.append(rec)
        progress.done += 1
        progress.failed += not rec["ok"]
        if on_record is not None:
            on_record(rec)

    async def one(session, k, prompt, arrival):
        turn = session.turns[k]
        rec = dict(request_id=f"{workload.name}-{session.session_id}-t{k}", session_id=session.session_id, turn=k,
                   arrival_s=arrival - loop_t0, prompt_tokens=len(prompt), output_tokens=0, cached_tokens=0,
                   ttft_s=None, jct_s=None, ok=False, error=None, instance_id="", prefill_instance_id="",
                   kv_bytes=None, wall_start=wall_t0 + (arrival - loop_t0))
        tokens: list[int] = []
        first = None
        progress.in_flight += 1
        try:
            async for delta in client.stream(prompt, max_tokens=turn.output_len, ignore_eos=True,
                                             temperature=config.temperature, session_id=session.session_id,
                                             request_id=rec["request_id"], timeout_s=config.request_timeout_s):
                if delta.token_ids and first is None:
                    first = time.monotonic()
                tokens += delta.token_ids
                if delta.usage is not None:
                    rec.update(cached_tokens=delta.usage.cached_tokens, instance_id=delta.usage.instance_id,
                               prefill_instance_id=delta.usage.prefill_instance_id,
                               server_ttft_s=delta.usage.ttft_s, server_e2e_s=delta.usage.e2e_s)
            end = time.monotonic()
            rec.update(ok=True, ttft_s=(first or end) - arrival, jct_s=end - arrival, output_tokens=len(tokens))
        except ClientError as e:
            rec["error"] = e.code.name
        except asyncio.CancelledError:
            rec["error"] = "CANCELLED"
            add(rec)
            raise
        finally:
            progress.in_flight -= 1
        add(rec)
        return rec, tokens

    async def session_task(session, start):
        await asyncio.sleep(max(0.0, loop_t0 + start - time.monotonic()))
        history: list[int] = workload.tokens(session.prefix)
        for k, turn in enumerate(session.turns):
            if k and turn.think_s:
                await asyncio.sleep(turn.think_s)
            user = workload.tokens(turn.user)
            prompt = (history + user) if session.carry_history else (workload.tokens(session.prefix) + user)
            if config.max_context is not None and len(prompt) + turn.output_len > config.max_context:
                progress.done += len(session.turns) - k  # skipped: the context would not fit
                return
            rec, tokens = await one(session, k, prompt, time.monotonic())
            if not rec["ok"]:
                progress.done += len(session.turns) - k - 1
                return
            history = prompt + tokens

    tasks = []
    for session, start in zip(workload.sessions, starts):
        if start > config.duration_s:
            progress.total -= len(session.turns)
            continue
        tasks.append(asyncio.ensure_future(session_task(session, start)))

    async def ticker():
        while True:
            progress.show()
            await asyncio.sleep(config.progress_interval_s)

    tick = asyncio.ensure_future(ticker())
    try:
        deadline = loop_t0 + config.duration_s + config.grace_s
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for t in done:
                if t.exception() is not None:
                    raise t.exception()
    finally:
        tick.cancel()
        progress.show(final=True)
        if own:
            await client.close()
    records.sort(key=lambda r: r["arrival_s"])
    return records
