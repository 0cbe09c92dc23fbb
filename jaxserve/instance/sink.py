"""Where a request's engine events go (`Sink`), and how the engine thread hands a whole step's events over
(`deliver`): one event-loop callback per loop and step instead of one per request."""

from __future__ import annotations

import contextlib


class Sink:
    """Where one request's events go. Called on the engine thread; implementations must be thread-safe.
    Events: ("tokens", [ids], logprobs), ("finish", reason, usage dict, [last ids], {"logprobs", "stop_reason"}),
    ("error", grpc.StatusCode, message); logprobs: None (not asked for) or one (logprob, [(id, logprob)]) or
    None per token (see `engine_loop._logprobs`).

    A sink that hands events to an asyncio loop may also define `stage(event) -> (loop, fn)`: the engine thread
    then delivers a whole step's events with one `loop.call_soon_threadsafe` per loop (one wake-up of the loop
    per step instead of one per request per step), calling fn(event) on that loop in push order."""

    def push(self, event: tuple) -> None:
        raise NotImplementedError


def deliver(outbox: list[tuple[Sink, tuple]]) -> None:
    """Hand a step's (sink, event) pairs over: sinks with `stage` batched per asyncio loop, the rest pushed."""
    by_loop: dict = {}
    for sink, event in outbox:
        stage = getattr(sink, "stage", None)
        if stage is None:
            sink.push(event)
            continue
        loop, fn = stage(event)
        calls = by_loop.get(loop)
        if calls is None:
            calls = by_loop[loop] = []
        calls.append((fn, event))
    for loop, calls in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            loop.call_soon_threadsafe(_call_all, calls)


def _call_all(calls: list) -> None:
    for fn, event in calls:
        fn(event)
