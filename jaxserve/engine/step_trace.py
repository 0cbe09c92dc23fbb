"""A JSON-lines trace of where a served request's time goes: when it reaches the engine, when each step that
holds it is dispatched, when its first token is on the host and when that token is handed to its stream.

One line per event, `{"t": <time.time()>, "event": ..., ...}`, written on the engine thread:
  arrive       request_id, prompt_tokens      the engine loop took the request
  dispatch     t0, entries                    a step was dispatched (t0: when its dispatch began); one
                                              [id, tokens, start] per request: its tokens in the step and
                                              the position of the first (a first step's start: cached tokens)
  first_token  request_ids                    a completed step gave these requests their first token
  handed_over  request_ids                    those first tokens were handed to the requests' streams

`request_spans` turns a trace into per-request milestones. A sequence-parallel prefill (a step of its own) is
not traced, so its request has no span. No jax here: the summary runs anywhere."""

from __future__ import annotations

import json
import statistics
import threading
import time
from pathlib import Path
from typing import IO


class StepTrace:
    """Appends events to a file (a path, opened line-buffered for the process's life, or an open text file).
    Callable as `trace(event, **fields)`; thread-safe."""

    def __init__(self, file: str | Path | IO[str]):
        self._file = open(file, "a", buffering=1) if isinstance(file, (str, Path)) else file
        self._lock = threading.Lock()

    def __call__(self, event: str, **fields) -> None:
        line = json.dumps({"t": time.time(), "event": event, **fields})
        with self._lock:
            self._file.write(line + "\n")


def read(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def request_spans(events: list[dict]) -> list[dict]:
    """Per request that got its first token in the trace: prompt and cached tokens, and milliseconds from its
    arrival to its first step's dispatch (`queued_ms`), from then to its first token on the host (`compute_ms`,
    the dispatch time of its first step included) and from then to the hand-over (`handover_ms`)."""
    arrive: dict[str, dict] = {}
    first_dispatch: dict[str, float] = {}
    cached: dict[str, int] = {}
    first_token: dict[str, float] = {}
    handed: dict[str, float] = {}
    for e in events:
        kind = e["event"]
        if kind == "arrive":
            arrive[e["request_id"]] = e
        elif kind == "dispatch":
            for rid, _, start in e["entries"]:
                first_dispatch.setdefault(rid, e["t0"])
                cached.setdefault(rid, start)
        elif kind == "first_token":
            for rid in e["request_ids"]:
                first_token.setdefault(rid, e["t"])
        elif kind == "handed_over":
            for rid in e["request_ids"]:
                handed.setdefault(rid, e["t"])
    spans = []
    for rid, a in arrive.items():
        if rid not in first_token or rid not in first_dispatch:
            continue
        span = dict(request_id=rid, prompt_tokens=a["prompt_tokens"], cached_tokens=cached[rid],
                    queued_ms=(first_dispatch[rid] - a["t"]) * 1e3,
                    compute_ms=(first_token[rid] - first_dispatch[rid]) * 1e3)
        if rid in handed:
            span["handover_ms"] = (handed[rid] - first_token[rid]) * 1e3
        spans.append(span)
    return spans


def summary(spans: list[dict]) -> str:
    """A markdown table of the spans' medians (and least), by prompt and cached tokens."""
    by_len: dict[tuple[int, int], list[dict]] = {}
    for s in spans:
        by_len.setdefault((s["prompt_tokens"], s["cached_tokens"]), []).append(s)
    rows = ["| prompt tokens | cached | requests | queued ms | compute ms | hand-over ms |",
            "|---|---|---|---|---|---|"]
    for (n, c), group in sorted(by_len.items()):
        cells = []
        for key in ("queued_ms", "compute_ms", "handover_ms"):
            values = [s[key] for s in group if key in s]
            cells.append(f"{statistics.median(values):.2f} ({min(values):.2f})" if values else "-")
        rows.append(f"| {n} | {c} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
