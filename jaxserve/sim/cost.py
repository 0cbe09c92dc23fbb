"""Cost models of the simulator (no jax): engine step time, KV transfer time, cache capacity.

An engine step runs `prefill_tokens` new prompt tokens (chunks of one or more requests, whose attention
covers `prefill_pairs` (query token, context token) pairs) and one token for each of `decode_seqs` running
requests whose contexts sum to `decode_ctx` tokens. Two step models:

- `LinearStep`: fixed + per_token x tokens + attn x pairs + per_seq x decodes + ctx x decode context +
  chunk x prefill chunks; fitted
  by non-negative least squares to timings of the real engine (`jaxserve.launch.sim calibrate`);
- `RooflineStep`: max(FLOPs / (peak x mfu), bytes / (HBM bandwidth x mbu)) + overhead, from a GPU's or TPU's
  figures and a model shape (`h200_llama8b()` preset: 989 TFLOP/s bf16 dense, 4.8 TB/s, Llama-3-8B)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class LinearStep:
    fixed_s: float = 2e-3
    per_token_s: float = 1e-5
    attn_s: float = 0.0
    per_seq_s: float = 1e-4
    ctx_s: float = 0.0
    chunk_s: float = 0.0             # per prefill chunk in the step (admission, first-token sampling, ...)

    kind = "linear"

    def step(self, prefill_tokens: int, prefill_pairs: float, decode_seqs: int, decode_ctx: int,
             prefill_chunks: int = 0) -> float:
        return (self.fixed_s + self.per_token_s * (prefill_tokens + decode_seqs) + self.attn_s * prefill_pairs
                + self.per_seq_s * decode_seqs + self.ctx_s * decode_ctx + self.chunk_s * prefill_chunks)

    @staticmethod
    def features(prefill_tokens, prefill_pairs, decode_seqs, decode_ctx, prefill_chunks=0) -> list[float]:
        return [1.0, float(prefill_tokens + decode_seqs), float(prefill_pairs), float(decode_seqs), float(decode_ctx),
                float(prefill_chunks)]

    @classmethod
    def fit(cls, rows: list[list[float]], seconds: list[float], relative: bool = False) -> "LinearStep":
        """Non-negative least squares (exact: best over every subset of free coefficients). rows: sums of
        `features` over the steps of each timed sample. relative: minimise relative errors (each sample
        weighted by 1 / its time), so small steps (decode) count as much as long prefills."""
        a, b = np.asarray(rows, float), np.asarray(seconds, float)
        if relative:
            a, b = a / b[:, None], np.ones_like(b)
        scale = np.maximum(np.abs(a).max(axis=0), 1e-30)
        a = a / scale
        best, best_err = np.zeros(a.shape[1]), float(np.sum(b ** 2))
        for k in range(1, a.shape[1] + 1):
            for cols in itertools.combinations(range(a.shape[1]), k):
                coef, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
                if np.any(coef < 0):
                    continue
                err = float(np.sum((a[:, cols] @ coef - b) ** 2))
                if err < best_err:
                    best_err = err
                    best = np.zeros(a.shape[1])
                    best[list(cols)] = coef
        c = best / scale
        return cls(*[float(x) for x in c])


@dataclasses.dataclass(frozen=True)
class RooflineStep:
    peak_flops: float = 989e12       # dense bf16
    hbm_bytes_s: float = 4.8e12
    mfu: float = 0.6                 # fraction of peak a large prefill reaches
    mbu: float = 0.8                 # fraction of bandwidth decode reaches
    params: float = 8.03e9
    layers: int = 32
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    dtype_bytes: int = 2
    overhead_s: float = 1e-3         # launch + scheduling per step

    kind = "roofline"

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    def step(self, prefill_tokens: int, prefill_pairs: float, decode_seqs: int, decode_ctx: int,
             prefill_chunks: int = 0) -> float:
        tokens = prefill_tokens + decode_seqs
        attn_flops_per_pair = 4 * self.layers * self.heads * self.head_dim
        flops = 2 * self.params * tokens + attn_flops_per_pair * (prefill_pairs + decode_ctx)
        kv = self.kv_bytes_per_token
        bytes_ = self.params * self.dtype_bytes + kv * (decode_ctx + tokens)
        if prefill_pairs and prefill_tokens:
            bytes_ += kv * prefill_pairs / max(prefill_tokens, 1)  # the cached context is read once per chunk
        return max(flops / (self.peak_flops * self.mfu), bytes_ / (self.hbm_bytes_s * self.mbu)) + self.overhead_s


@dataclasses.dataclass(frozen=True)
class ClusterCost:
    step: LinearStep | RooflineStep = LinearStep()
    kv_bytes_per_token: int = 131072
    transfer_bytes_s: float = 50e9   # each instance's KV link, per direction
    transfer_latency_s: float = 5e-4
    transfer_contention: bool = True # transfers out of (into) one instance share its link, one at a time
    page_size: int = 16
    kv_pages: int = 52000            # KV pages per instance (running requests + cached prefixes)
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    rpc_overhead_s: float = 0.0      # client <-> scheduler <-> instance, half before the instance sees the
                                     # request and half after its last token
    step_overhead_s: float = 0.0     # per engine step of a served instance beyond the offline engine's step
                                     # (streaming each step's tokens over gRPC from the same core, GIL)
    name: str = ""
    # Issue 18: host tiers and per-pair links. Host pages are used only where a SimConfig turns the tier on.
    host_kv_pages: int = 0           # host-tier KV pages per instance
    host_bytes_s: float = 50e9       # host tier <-> device (PCIe), per instance, one copy at a time
    host_latency_s: float = 0.0
    node_size: int = 0               # instances per node (0: every pair talks over the network link above)
    node_link_bytes_s: float = 400e9 # within a node (NVLink-class), per direction
    node_link_latency_s: float = 1e-5

    def link(self, src: int, dst: int) -> tuple[float, float]:
        """(bytes/s, latency) of the KV link from instance number src to instance number dst."""
        if self.node_size and src // self.node_size == dst // self.node_size:
            return self.node_link_bytes_s, self.node_link_latency_s
        return self.transfer_bytes_s, self.transfer_latency_s

    def step_time(self, prefill_tokens, prefill_pairs, decode_seqs, decode_ctx, prefill_chunks=0) -> float:
        return self.step.step(prefill_tokens, prefill_pairs, decode_seqs, decode_ctx, prefill_chunks) + \
            self.step_overhead_s

    def prefill_time(self, prompt_len: int, cached_len: int = 0) -> float:
        """Seconds to prefill alone (no decodes in the batch), in chunks of max_num_batched_tokens."""
        done, t = cached_len, 0.0
        while True:
            n = min(self.max_num_batched_tokens, prompt_len - done)
            t += self.step_time(n, n * (2 * done + n + 1) / 2, 0, 0, 1)
            done += n
            if done >= prompt_len:
                return t

    def transfer_time(self, n_bytes: float) -> float:
        return self.transfer_latency_s + n_bytes / self.transfer_bytes_s if n_bytes > 0 else 0.0

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["step"] = dict(kind=self.step.kind, **dataclasses.asdict(self.step))
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ClusterCost":
        d = dict(d)
        step = dict(d.pop("step"))
        kind = step.pop("kind")
        step_cls = {"linear": LinearStep, "roofline": RooflineStep}[kind]
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(step=step_cls(**step), **{k: v for k, v in d.items() if k in fields})

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "ClusterCost":
        return cls.from_json(json.loads(Path(path).read_text()))


def h200_llama8b(**overrides) -> ClusterCost:
    """An H200-class GPU (989 TFLOP/s bf16 dense, 4.8 TB/s HBM, 141 GB) serving Llama-3-8B in bf16: KV pages
    fill what the weights (16 GB) and 10% headroom leave."""
    step = RooflineStep()
    kv = step.kv_bytes_per_token
    pages = int((141e9 * 0.9 - step.params * step.dtype_bytes) / (kv * 16))
    # Host tier (when a run turns it on): 200 GB of a node's ~2 TB DRAM per GPU, over PCIe 5 x16 (~50 GB/s).
    host_pages = int(200e9 / (kv * 16))
    base = dict(step=step, kv_bytes_per_token=kv, transfer_bytes_s=50e9, transfer_latency_s=5e-4, page_size=16,
                kv_pages=pages, max_num_batched_tokens=8192, max_num_seqs=256, rpc_overhead_s=2e-3,
                name="h200-llama8b", host_kv_pages=host_pages, host_bytes_s=50e9)
    base.update(overrides)
    return ClusterCost(**base)


PRESETS = {"h200": h200_llama8b}


def load_cost(spec: str) -> ClusterCost:
    """A preset name ("h200") or a calibration JSON path."""
    if spec in PRESETS:
        return PRESETS[spec]()
    return ClusterCost.load(spec)


def pages_for(tokens: int, page_size: int) -> int:
    return math.ceil(tokens / page_size)
