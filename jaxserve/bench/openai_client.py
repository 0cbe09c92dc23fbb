"""Streamed OpenAI completions over HTTP (aiohttp) and their statistics, for `jaxserve/launch/bench_serve.py`: an
event-stream parser, one timed streaming request (TTFT = first chunk that carries a token), batch decode rate,
and the markdown table with ratios. No jax, no flags (so tests can import it beside other launchers)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import socket
import statistics
import time

# key, table header, unit scale, higher is better
METRICS = (
    ("cold_ttft_s", "cold TTFT 544 (ms)", 1e3, False),
    ("cached_ttft_s", "cached TTFT 512+32 (ms)", 1e3, False),
    ("burst_cold_ttft_p50_s", "burst x8 cold p50 TTFT (ms)", 1e3, False),
    ("burst_primed_ttft_p50_s", "burst x8 primed p50 TTFT (ms)", 1e3, False),
)


def random_prompt(rng, n: int, vocab: int, low: int = 3) -> list[int]:
    """n random token ids in [low, vocab) (`rng`: a numpy Generator); low=3 skips the test tokenizer's
    <unk>/<s>/</s>."""
    return [int(x) for x in rng.integers(low, vocab, n)]


def parse_sse_line(line: bytes | str):
    """One line of an OpenAI event stream: the decoded JSON event, "[DONE]", or None (blank / comment / other)."""
    if isinstance(line, bytes):
        line = line.decode("utf-8", errors="replace")
    line = line.strip()
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return "[DONE]"
    if not data:
        return None
    return json.loads(data)


def chunk_tokens(event: dict) -> bool:
    """Whether a streamed completions chunk carries a generated token: some choice with text, token ids or a
    finish reason (the last chunk of a one-token answer may carry only that)."""
    for c in event.get("choices") or ():
        if c.get("text") or c.get("token_ids") or (c.get("delta") or {}).get("content") or c.get("finish_reason"):
            return True
    return False


@dataclasses.dataclass
class RequestResult:
    start: float                     # perf_counter when the request was sent
    token_times: list[float]         # perf_counter of every chunk that carried a token
    completion_tokens: int | None    # from the usage chunk (None: the server sent none)
    cached_tokens: int | None        # usage.prompt_tokens_details.cached_tokens when the server reports it
    end: float
    text: str = ""                   # the streamed text, concatenated

    @property
    def ttft_s(self) -> float:
        return self.token_times[0] - self.start

    @property
    def num_tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else len(self.token_times)

    @property
    def tpot_s(self) -> float | None:
        """(last - first token) / (tokens - 1); None for a single token."""
        n = self.num_tokens
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else None

    def to_json(self) -> dict:
        return dict(ttft_s=self.ttft_s, tpot_s=self.tpot_s, num_tokens=self.num_tokens, chunks=len(self.token_times),
                    cached_tokens=self.cached_tokens, e2e_s=self.end - self.start)


def decode_stats(results: list[RequestResult]) -> dict:
    """Batch decode rate: tokens after each request's first / (last token of any - first token of any), and the
    median per-request TPOT."""
    first = min(r.token_times[0] for r in results)
    last = max(r.token_times[-1] for r in results)
    after_first = sum(r.num_tokens - 1 for r in results)
    tpots = [r.tpot_s for r in results if r.tpot_s is not None]
    return dict(tok_s=after_first / (last - first) if last > first else float("nan"),
                tpot_p50_s=statistics.median(tpots) if tpots else float("nan"),
                ttft_p50_s=statistics.median(r.ttft_s for r in results),
                total_tokens=sum(r.num_tokens for r in results), window_s=last - first)


def metric_list(decode_batches) -> list[tuple[str, str, float, bool]]:
    out = list(METRICS)
    for b in decode_batches:
        out.append((f"decode_b{b}_tok_s", f"decode b{b} (tok/s)", 1.0, True))
    for b in decode_batches:
        out.append((f"decode_b{b}_tpot_p50_s", f"TPOT b{b} p50 (ms)", 1e3, False))
    return out


def median_or_nan(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def format_table(rows: dict[str, dict[str, list[float]]], metrics, base: str | None = None) -> str:
    """Markdown: one row per engine (median over repeats of each metric), then `base / other` per other engine.
    rows: engine -> metric key -> measured values."""
    names = list(rows)
    lines = ["| engine | " + " | ".join(h for _, h, _, _ in metrics) + " |",
             "|---|" + "---|" * len(metrics)]
    med = {n: {k: median_or_nan(rows[n].get(k, [])) for k, _, _, _ in metrics} for n in names}
    for n in names:
        lines.append(f"| {n} | " + " | ".join(_fmt(med[n][k] * scale) for k, _, scale, _ in metrics) + " |")
    base = base or names[0]
    for n in names:
        if n == base:
            continue
        ratios = [med[base][k] / med[n][k] if med[n][k] else float("nan") for k, _, _, _ in metrics]
        lines.append(f"| {base} / {n} | " + " | ".join(_fmt(r, ratio=True) for r in ratios) + " |")
    return "\n".join(lines)


def _fmt(v: float, ratio: bool = False) -> str:
    if v != v:  # nan
        return "-"
    if ratio:
        return f"{v:.2f}x"
    return f"{v:.1f}" if abs(v) < 1000 else f"{v:.0f}"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ HTTP client
@dataclasses.dataclass
class Endpoint:
    name: str
    base_url: str           # without /v1
    model: str | None = None
    extra_body: dict = dataclasses.field(default_factory=dict)


class RequestError(RuntimeError):
    pass


async def stream_completion(session, ep: Endpoint, prompt: list[int], max_tokens: int,
                            timeout_s: float) -> RequestResult:
    """One streamed greedy completion of a token-id prompt; raises RequestError on an HTTP or stream error."""
    import aiohttp
    body = {"model": ep.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, **ep.extra_body}
    times: list[float] = []
    texts: list[str] = []
    usage = None
    start = time.perf_counter()
    try:
        async with session.post(ep.base_url + "/v1/completions", json=body,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                raise RequestError(f"{ep.name}: HTTP {resp.status}: {(await resp.text())[:500]}")
            async for line in resp.content:
                event = parse_sse_line(line)
                if event is None:
                    continue
                if event == "[DONE]":
                    break
                now = time.perf_counter()
                if "error" in event:
                    raise RequestError(f"{ep.name}: stream error: {event['error']}")
                if chunk_tokens(event):
                    times.append(now)
                    texts.extend(c.get("text") or "" for c in event["choices"])
                if event.get("usage"):
                    usage = event["usage"]
    except asyncio.TimeoutError:
        raise RequestError(f"{ep.name}: request timed out after {timeout_s:g} s") from None
    end = time.perf_counter()
    if not times:
        raise RequestError(f"{ep.name}: the stream carried no token")
    completion = usage.get("completion_tokens") if usage else None
    details = (usage or {}).get("prompt_tokens_details") or {}
    return RequestResult(start=start, token_times=times, completion_tokens=completion,
                         cached_tokens=details.get("cached_tokens"), end=end, text="".join(texts))


async def get_json(session, url: str, timeout_s: float = 5.0):
    import aiohttp
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
        text = await resp.text()
        return resp.status, (json.loads(text) if text.startswith(("{", "[")) else text)


async def wait_other(session, ep: Endpoint) -> tuple[str, dict]:
    """The other server's model id (given or its first listed one) and what it says about itself."""
    status, models = await get_json(session, ep.base_url + "/v1/models", 10.0)
    if status != 200:
        raise RuntimeError(f"{ep.name} at {ep.base_url}: /v1/models answered {status}: {models}")
    ids = [m["id"] for m in models.get("data", [])]
    if ep.model and ep.model not in ids:
        logging.warning("%s lists %s, not %s", ep.name, ids, ep.model)
    info = {"models": models.get("data", [])}
    with contextlib.suppress(Exception):
        status, version = await get_json(session, ep.base_url + "/version", 5.0)
        if status == 200:
            info["version"] = version.get("version") if isinstance(version, dict) else version
    return ep.model or ids[0], info
