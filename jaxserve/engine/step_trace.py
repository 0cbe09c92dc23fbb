"""A JSON-lines trace of where a served request's time goes: when it reaches the engine, when each step that
holds it is dispatched, when its first token is on the host and when that token is handed to its stream.

One line per event, `{"t": <time.time()>, "event": ..., ...}`; an instance's, written on the engine thread:
  arrive       request_id, prompt_tokens      the engine loop took the request
  dispatch     t0, entries                    a step was dispatched (t0: when its dispatch began); one
                                              [id, tokens, start] per request: its tokens in the step and
                                              the position of the first (a first step's start: cached tokens)
  first_token  request_ids                    a completed step gave these requests their first token
  handed_over  request_ids                    those first tokens were handed to the requests' streams

The scheduler's `--step_trace` writes the served path around the engine, on its event loop (its request ids are
the instance's up to the `#`; wall-clock times, so two processes on one host line up):
  http_in         t0, request_ids, stream  the HTTP handler started at t0 (before parsing); its requests
  routed          request_id, instance_id  the request was routed (again, if it moved)
  first_response  request_id               its first tokens came back from the instance
  first_write     request_id               its first token was written to the client (streamed requests)

`request_spans` turns one or both traces into per-request milestones. A sequence-parallel prefill (a step of its
own) is not traced, so its request has no span. No jax here: the summary runs anywhere."""

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


# Span name -> (from milestone, to milestone), in path order; a span is reported when both ends are known.
SPANS = {
    "front_ms": ("http_in", "routed"),            # HTTP parsing, validation, routing
    "to_engine_ms": ("routed", "arrive"),         # the gRPC hop and the instance until the engine loop has it
    "queued_ms": ("arrive", "dispatch"),          # until its first step's dispatch began
    "compute_ms": ("dispatch", "first_token"),    # its steps, dispatch included, to the first token on the host
    "handover_ms": ("first_token", "handed_over"),
    "back_ms": ("handed_over", "first_response"),  # the instance's flush and the gRPC hop back
    "write_ms": ("first_response", "first_write"),
    "total_ms": ("http_in", "first_write"),
}


def milestones(events: list[dict]) -> dict[str, dict]:
    """Request id (the scheduler's; an instance's id up to its `#`) -> {"prompt_tokens", "cached_tokens",
    milestone name -> time (the first occurrence)} from one or both traces' events, in any order."""
    out: dict[str, dict] = {}

    def of(rid: str) -> dict:
        return out.setdefault(rid.split("#", 1)[0], {})

    for e in events:
        kind = e["event"]
        if kind == "arrive":
            m = of(e["request_id"])
            m.setdefault("arrive", e["t"])
            m.setdefault("prompt_tokens", e["prompt_tokens"])
        elif kind == "dispatch":
            for rid, _, start in e["entries"]:
                m = of(rid)
                m.setdefault("dispatch", e["t0"])
                m.setdefault("cached_tokens", start)
        elif kind in ("first_token", "handed_over"):
            for rid in e["request_ids"]:
                of(rid).setdefault(kind, e["t"])
        elif kind == "http_in":
            for rid in e["request_ids"]:
                of(rid).setdefault("http_in", e["t0"])
        elif kind in ("routed", "first_response", "first_write"):
            of(e["request_id"]).setdefault(kind, e["t"])
    return out


def request_spans(events: list[dict]) -> list[dict]:
    """Per request that got its first token (on the instance, or back at the scheduler): prompt and cached tokens
    where the instance's trace is given, and each span of `SPANS` in milliseconds whose two ends are known."""
    spans = []
    for rid, m in milestones(events).items():
        if "first_token" not in m and "first_response" not in m:
            continue
        span = dict(request_id=rid, prompt_tokens=m.get("prompt_tokens"), cached_tokens=m.get("cached_tokens"))
        for name, (a, b) in SPANS.items():
            if a in m and b in m:
                span[name] = (m[b] - m[a]) * 1e3
        spans.append(span)
    return spans


def _cell(length: int | None) -> str:
    return "-" if length is None else str(length)  # the scheduler's trace alone has no lengths


def summary(spans: list[dict]) -> str:
    """A markdown table of the spans' medians (and least), by prompt and cached tokens; the columns are the spans
    some request has."""
    by_len: dict[tuple, list[dict]] = {}
    for s in spans:
        by_len.setdefault((s["prompt_tokens"], s["cached_tokens"]), []).append(s)
    names = [n for n in SPANS if any(n in s for s in spans)]
    rows = ["| prompt tokens | cached | requests | " + " | ".join(n.removesuffix("_ms").replace("_", " ") + " ms"
                                                               for n in names) + " |",
            "|---|---|---|" + "---|" * len(names)]
    for (n, c), group in sorted(by_len.items(), key=lambda kv: tuple(-1 if x is None else x for x in kv[0])):
        cells = []
        for key in names:
            values = [s[key] for s in group if key in s]
            cells.append(f"{statistics.median(values):.2f} ({min(values):.2f})" if values else "-")
        rows.append(f"| {_cell(n)} | {_cell(c)} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
