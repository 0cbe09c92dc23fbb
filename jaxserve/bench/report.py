"""Metrics over per-request records, markdown tables and PNG plots (matplotlib, optional dep `bench`).

A record is a dict with at least: ok (bool), arrival_s, ttft_s, jct_s (relative to arrival), prompt_tokens,
cached_tokens, output_tokens; optional: error (gRPC status name), kv_bytes (None: not reported),
finish_s (absolute time of the last token, same clock as arrival_s).

Definitions (DESIGN §6): TTFT = arrival -> first token; TPOT = (JCT - TTFT) / (output tokens - 1); JCT =
arrival -> last token; hit rate = cached prompt tokens / prompt tokens; goodput = requests per second that
met every SLO given (DistServe's definition), over the same span as throughput."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Iterable, Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]; nan for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _stats(values: Sequence[float]) -> dict:
    return dict(mean=sum(values) / len(values) if values else float("nan"), p50=percentile(values, 50),
                p90=percentile(values, 90), p99=percentile(values, 99))


def tpot(r: dict) -> float | None:
    n = r.get("output_tokens", 0)
    return (r["jct_s"] - r["ttft_s"]) / (n - 1) if n > 1 else None


def summarize(records: Iterable[dict], slo_ttft_s: float | None = None, slo_tpot_s: float | None = None,
              slo_jct_s: float | None = None) -> dict:
    records = list(records)
    ok = [r for r in records if r.get("ok")]
    ttft = [r["ttft_s"] for r in ok]
    jct = [r["jct_s"] for r in ok]
    tpots = [t for t in (tpot(r) for r in ok) if t is not None]
    starts = [r["arrival_s"] for r in records]
    ends = [r["arrival_s"] + r["jct_s"] for r in ok]
    span = (max(ends) - min(starts)) if ok else float("nan")
    prompt = sum(r.get("prompt_tokens", 0) for r in ok)
    cached = sum(r.get("cached_tokens", 0) for r in ok)
    out_tokens = sum(r.get("output_tokens", 0) for r in ok)

    def meets(r):
        t = tpot(r)
        return ((slo_ttft_s is None or r["ttft_s"] <= slo_ttft_s)
                and (slo_tpot_s is None or t is None or t <= slo_tpot_s)
                and (slo_jct_s is None or r["jct_s"] <= slo_jct_s))

    good = sum(1 for r in ok if meets(r))
    kv = [r.get("kv_bytes") for r in ok]
    errors: dict[str, int] = {}
    for r in records:
        if not r.get("ok"):
            errors[r.get("error") or "unknown"] = errors.get(r.get("error") or "unknown", 0) + 1
    return dict(
        requests=len(records), completed=len(ok),
        rejected=errors.get("RESOURCE_EXHAUSTED", 0) + errors.get("INVALID_ARGUMENT", 0),
        failed=len(records) - len(ok), errors=errors,
        ttft=_stats(ttft), tpot=_stats(tpots), jct=_stats(jct),
        span_s=span,
        throughput_rps=len(ok) / span if ok and span > 0 else float("nan"),
        throughput_tok_s=out_tokens / span if ok and span > 0 else float("nan"),
        goodput_rps=good / span if ok and span > 0 else float("nan"),
        slo_attainment=good / len(records) if records else float("nan"),
        slo=dict(ttft_s=slo_ttft_s, tpot_s=slo_tpot_s, jct_s=slo_jct_s),
        prompt_tokens=prompt, cached_tokens=cached, hit_rate=cached / prompt if prompt else float("nan"),
        kv_bytes=None if not kv or any(k is None for k in kv) else sum(kv))


def _fmt(x, unit="ms") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if unit == "ms":
        return f"{x * 1e3:.1f}"
    if unit == "%":
        return f"{x * 100:.1f}%"
    if unit == "B":
        return f"{x / 2**20:.1f} MiB"
    return f"{x:.2f}"


COLUMNS = [("TTFT mean ms", "ttft", "mean"), ("TTFT p50", "ttft", "p50"), ("TTFT p90", "ttft", "p90"),
           ("TTFT p99", "ttft", "p99"), ("TPOT mean ms", "tpot", "mean"), ("TPOT p99", "tpot", "p99"),
           ("JCT mean ms", "jct", "mean"), ("JCT p50", "jct", "p50"), ("JCT p90", "jct", "p90"),
           ("JCT p99", "jct", "p99")]


def markdown_table(summaries: dict[str, dict], ratios: bool = True) -> str:
    """One row per setting; with ratios, a second table of mean/p99 TTFT and JCT relative to the first."""
    head = ["setting", *[c[0] for c in COLUMNS], "req/s", "tok/s", "goodput req/s", "hit rate", "rejected",
            "failed", "KV moved"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in summaries.items():
        row = [name, *[_fmt(s[k][q]) for _, k, q in COLUMNS], _fmt(s["throughput_rps"], "x"),
               _fmt(s["throughput_tok_s"], "x"), _fmt(s["goodput_rps"], "x"), _fmt(s["hit_rate"], "%"),
               str(s["rejected"]), str(s["failed"]), _fmt(s["kv_bytes"], "B")]
        lines.append("| " + " | ".join(row) + " |")
    if ratios and len(summaries) > 1:
        base_name, base = next(iter(summaries.items()))
        cols = [("TTFT mean", "ttft", "mean"), ("TTFT p99", "ttft", "p99"), ("JCT mean", "jct", "mean"),
                ("JCT p99", "jct", "p99"), ("TPOT mean", "tpot", "mean")]
        lines += ["", f"ratios to `{base_name}`:", "",
                  "| setting | " + " | ".join(c[0] for c in cols) + " | throughput | hit rate |",
                  "|" + "---|" * (len(cols) + 3)]
        for name, s in summaries.items():
            r = [_ratio(s[k][q], base[k][q]) for _, k, q in cols]
            r += [_ratio(s["throughput_rps"], base["throughput_rps"]), _fmt(s["hit_rate"], "%")]
            lines.append(f"| {name} | " + " | ".join(r) + " |")
    return "\n".join(lines)


def _ratio(a, b) -> str:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return "n/a"
    return f"{a / b:.2f}x"


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot(runs: dict[str, list[dict]], out_dir: str | Path, title: str = "") -> list[str]:
    """PNGs: CDF of JCT and of TTFT per setting, and prefix-cache hit rate over time (cumulative, by
    finish time). Returns the paths written ([] when matplotlib is missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logging.getLogger("jaxserve.bench").warning(
            "no plots: matplotlib is not installed (pip install -e '.[bench]'); the tables and JSON are complete")
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for metric, label in (("jct_s", "JCT"), ("ttft_s", "TTFT")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, recs in runs.items():
            xs = sorted(r[metric] for r in recs if r.get("ok"))
            if xs:
                ax.step([x * 1e3 for x in xs], [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=name)
        ax.set_xlabel(f"{label} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{label} CDF {title}".strip())
        ax.grid(alpha=0.3)
        ax.legend()
        path = out_dir / f"{label.lower()}_cdf.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(str(path))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, recs in runs.items():
        ok = sorted((r for r in recs if r.get("ok")), key=lambda r: r["arrival_s"] + r["jct_s"])
        if not ok:
            continue
        t0 = min(r["arrival_s"] for r in recs)
        p = c = 0
        xs, ys = [], []
        for r in ok:
            p += r.get("prompt_tokens", 0)
            c += r.get("cached_tokens", 0)
            xs.append(r["arrival_s"] + r["jct_s"] - t0)
            ys.append(c / p if p else 0.0)
        ax.plot(xs, ys, label=name)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("prefix-cache hit rate (tokens, cumulative)")
    ax.set_ylim(0, 1)
    ax.set_title(f"hit rate over time {title}".strip())
    ax.grid(alpha=0.3)
    ax.legend()
    path = out_dir / "hit_rate.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(str(path))
    return paths
