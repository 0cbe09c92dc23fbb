"""Paged-attention kernel benchmark: `python -m jaxserve.kernels.bench [--quick] [--out=FILE]`.

On the same inputs in one run it times
  decode   our flash-decoding kernel (decode_attention.py)
  ragged   our ragged kernel (ragged_paged_attention.py) on the same batch (decode: one query per seq)
  jax_gpu  JAX's own `jax.experimental.pallas.ops.gpu.paged_attention` (GPU only; page contents converted
           to its [Hkv, P, page_size, D] K / V layout outside the timed region, q pre-scaled since it has
           no sm_scale)
  xla      the jnp reference under XLA (`reference.*_xla`)
over batch x context x GQA (bf16 by default). Decode rows report the achieved KV bandwidth (bytes of K and
V read / time) next to a measured device-to-device copy bandwidth ((read + written bytes) / time of
`x + c`); prefill rows (pure prefill, one sequence per batch entry, causal) report TFLOP/s
(4 * Hq * D * L^2 / 2 per sequence) next to a measured bf16 matmul rate. Every implementation's max
abs error against the reference is recorded too (when the reference ran).

On CPU everything runs in Pallas interpret mode: use `--quick` (a tiny configuration) there.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform as _platform
import statistics
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.kernels import reference, xla_attention
from jaxserve.kernels.decode_attention import decode_paged_attention
from jaxserve.kernels.ragged_paged_attention import ragged_paged_attention


@dataclasses.dataclass
class BenchConfig:
    batches: tuple[int, ...] = (1, 8, 64, 256)
    contexts: tuple[int, ...] = (512, 2048, 8192, 32768)
    gqa: tuple[str, ...] = ("32:8", "32:4")  # "Hq:Hkv"
    head_dim: int = 128
    page_size: int = 16
    dtype: str = "bfloat16"
    modes: tuple[str, ...] = ("decode", "prefill")
    impls: tuple[str, ...] = ("decode", "ragged", "jax_gpu", "xla")
    max_kv_gib: float = 24.0  # skip configs whose KV cache is larger
    max_prefill_tokens: int = 65536  # skip prefill configs with more query tokens
    warmup: int = 2
    iters: int = 10
    seed: int = 0
    interpret: bool | None = None
    check: bool = True


QUICK = dict(batches=(1, 2), contexts=(64, 128), gqa=("4:1",), head_dim=64, page_size=16, warmup=1, iters=2,
             max_prefill_tokens=256)


def _time(fn, args, warmup, iters, repeats=3):
    """Seconds per call: `iters` calls dispatched back to back, one sync at the end (so host dispatch
    overlaps device work, as in a serving loop); the median of `repeats` such runs."""
    out = None
    for _ in range(max(1, warmup)):
        out = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            res = fn(*args)
        jax.block_until_ready(res)
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times), out


def measure_copy_bandwidth(nbytes: int, warmup=2, iters=10) -> float:
    """Device-to-device copy bandwidth in bytes/s: (read + written) bytes of `x + c` / time."""
    n = max(1024, nbytes // 2)
    x = jnp.ones((n,), jnp.bfloat16)
    c = jnp.asarray(1, jnp.bfloat16)
    f = jax.jit(lambda x, c: x + c)
    t, _ = _time(f, (x, c), warmup, iters)
    return 2 * n * 2 / t


def measure_matmul_flops(n: int, warmup=2, iters=10) -> float:
    a = jnp.ones((n, n), jnp.bfloat16)
    b = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    t, _ = _time(f, (a, b), warmup, iters)
    return 2 * n ** 3 / t


def _make_inputs(rng, batch, context, hq, hkv, head_dim, page_size, dtype, q_len):
    pages_per_seq = -(-context // page_size)
    num_pages = batch * pages_per_seq + 1
    perm = rng.permutation(num_pages - 1) + 1  # page 0 stays reserved, order scrambled
    page_indices = perm.reshape(batch, pages_per_seq).astype(np.int32)
    key = jax.random.PRNGKey(int(rng.integers(1 << 30)))
    k1, k2 = jax.random.split(key)
    kv_pages = jax.random.normal(k1, (num_pages, page_size, 2 * hkv, head_dim), jnp.float32).astype(dtype)
    num_tokens = batch * q_len
    q = jax.random.normal(k2, (num_tokens, hq, head_dim), jnp.float32).astype(dtype)
    kv_lens = np.full((batch,), context, np.int32)
    cu = np.arange(batch + 1, dtype=np.int32) * q_len
    return (q, kv_pages, jnp.asarray(kv_lens), jnp.asarray(page_indices), jnp.asarray(cu),
            jnp.asarray([batch], jnp.int32))


def _jax_gpu_paged_attention():
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from jax.experimental.pallas.ops.gpu import paged_attention as mod
        return mod.paged_attention
    except Exception:  # pragma: no cover - depends on the jax build
        return None


def _jax_gpu_splits(pages_per_seq):
    k_splits = 16
    while k_splits > 1 and pages_per_seq % k_splits:
        k_splits //= 2
    per_part = pages_per_seq // k_splits
    ppcb = 8
    while ppcb > 1 and per_part % ppcb:
        ppcb //= 2
    return k_splits, ppcb


def run_bench(cfg: BenchConfig, out_path: str | None = None, log=print):
    platform = jax.default_backend()
    interpret = (platform == "cpu") if cfg.interpret is None else cfg.interpret
    on_gpu = platform in ("gpu", "cuda", "rocm")
    dtype = jnp.dtype(cfg.dtype)
    rng = np.random.default_rng(cfg.seed)
    small = platform == "cpu"
    copy_bw = measure_copy_bandwidth(1 << (24 if small else 30), cfg.warmup, cfg.iters)
    mm_flops = measure_matmul_flops(256 if small else 8192, cfg.warmup, cfg.iters)
    log(f"device: {jax.devices()[0].device_kind} ({platform}), jax {jax.__version__}, interpret={interpret}")
    log(f"measured copy bandwidth {copy_bw / 1e9:.1f} GB/s, bf16 matmul {mm_flops / 1e12:.2f} TFLOP/s")
    jax_gpu = _jax_gpu_paged_attention() if on_gpu else None
    results = []
    for mode in cfg.modes:
        for gqa in cfg.gqa:
            hq, hkv = (int(x) for x in gqa.split(":"))
            for batch in cfg.batches:
                for context in cfg.contexts:
                    q_len = 1 if mode == "decode" else context
                    kv_bytes = batch * context * hkv * cfg.head_dim * 2 * dtype.itemsize
                    if kv_bytes > cfg.max_kv_gib * (1 << 30):
                        log(f"skip {mode} b={batch} ctx={context} {gqa}: KV {kv_bytes / 2**30:.1f} GiB")
                        continue
                    if mode == "prefill" and batch * q_len > cfg.max_prefill_tokens:
                        continue
                    results += _bench_one(cfg, rng, mode, batch, context, hq, hkv, dtype, q_len, kv_bytes,
                                          interpret, jax_gpu, copy_bw, mm_flops, log)
    report = dict(device=jax.devices()[0].device_kind, platform=platform, jax_version=jax.__version__,
                  python=_platform.python_version(), interpret=interpret, copy_bandwidth_Bps=copy_bw,
                  matmul_flops=mm_flops, config=dataclasses.asdict(cfg), results=results)
    if out_path:
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)
        log(f"wrote {out_path}")
    return report


def _bench_one(cfg, rng, mode, batch, context, hq, hkv, dtype, q_len, kv_bytes, interpret, jax_gpu, copy_bw,
               mm_flops, log):
    d, ps = cfg.head_dim, cfg.page_size
    sm_scale = 1.0 / math.sqrt(d)
    args = _make_inputs(rng, batch, context, hq, hkv, d, ps, dtype, q_len)
    q, kv_pages, kv_lens, page_indices, cu, num_seqs = args
    fns = {}
    if mode == "decode":
        if "decode" in cfg.impls:
            fns["decode"] = (lambda q, kv, kl, pi: decode_paged_attention(
                q, kv, kl, pi, sm_scale=sm_scale, interpret=interpret), (q, kv_pages, kv_lens, page_indices))
        if "ragged" in cfg.impls:
            fns["ragged"] = (lambda *a: ragged_paged_attention(*a, sm_scale=sm_scale, interpret=interpret), args)
        if "xla" in cfg.impls:
            fns["xla"] = (lambda q, kv, kl, pi: reference.decode_paged_attention_xla(
                q, kv, kl, pi, sm_scale=sm_scale), (q, kv_pages, kv_lens, page_indices))
        if "jax_gpu" in cfg.impls and jax_gpu is not None:
            k_pages = jnp.moveaxis(kv_pages[:, :, 0::2, :], 2, 0)  # [Hkv, P, ps, D], outside the timing
            v_pages = jnp.moveaxis(kv_pages[:, :, 1::2, :], 2, 0)
            k_splits, ppcb = _jax_gpu_splits(page_indices.shape[1])
            fns["jax_gpu"] = (lambda q, k, v, pi, kl: jax_gpu(q * jnp.asarray(sm_scale, q.dtype), k, v, pi, kl,
                                                              k_splits=k_splits, pages_per_compute_block=ppcb),
                              (q, k_pages, v_pages, page_indices, kv_lens))
    else:
        if "ragged" in cfg.impls:
            fns["ragged"] = (lambda *a: ragged_paged_attention(*a, sm_scale=sm_scale, interpret=interpret), args)
        if "xla" in cfg.impls:
            fns["xla"] = (lambda *a: xla_attention.ragged_paged_attention_xla(*a, sm_scale=sm_scale), args)
    flops = 2 * hq * d * q_len * q_len * batch if mode == "prefill" else 4 * hq * d * context * batch
    rows, outs = [], {}
    for name, (fn, fargs) in fns.items():
        try:
            t, out = _time(jax.jit(fn), fargs, cfg.warmup, cfg.iters)
        except Exception as e:  # keep the sweep going; record the failure
            log(f"{mode} b={batch} ctx={context} {hq}:{hkv} {name}: FAILED {type(e).__name__}: {e}"[:400])
            rows.append(dict(mode=mode, batch=batch, context=context, hq=hq, hkv=hkv, impl=name, error=str(e)[:500]))
            continue
        outs[name] = out
        row = dict(mode=mode, batch=batch, context=context, hq=hq, hkv=hkv, head_dim=d, page_size=ps,
                   dtype=str(dtype), impl=name, time_s=t, kv_bytes=kv_bytes, flops=flops,
                   kv_bandwidth_Bps=kv_bytes / t, tflops=flops / t / 1e12,
                   frac_copy_bw=kv_bytes / t / copy_bw, frac_matmul=flops / t / mm_flops)
        rows.append(row)
        del out
    if cfg.check and "xla" in outs:
        ref = np.asarray(outs["xla"], np.float32)
        for row in rows:
            if row.get("impl") in outs and "error" not in row:
                row["max_abs_err"] = float(np.max(np.abs(np.asarray(outs[row["impl"]], np.float32) - ref)))
    for row in rows:
        if "error" in row:
            continue
        metric = (f"{row['kv_bandwidth_Bps'] / 1e9:9.1f} GB/s ({100 * row['frac_copy_bw']:5.1f}% copy)"
                  if mode == "decode" else
                  f"{row['tflops']:9.3f} TFLOP/s ({100 * row['frac_matmul']:5.1f}% mm)")
        err = f" err {row['max_abs_err']:.2e}" if "max_abs_err" in row else ""
        log(f"{mode:7s} b={batch:4d} ctx={context:6d} {hq:3d}:{hkv:<3d} {row['impl']:8s} "
            f"{1e3 * row['time_s']:10.3f} ms {metric}{err}")
    return rows


def main(argv):
    del argv
    from absl import flags

    F = flags.FLAGS
    cfg = BenchConfig(**QUICK) if F.quick else BenchConfig()
    for name in ("batches", "contexts"):
        v = getattr(F, name)
        if v:
            setattr(cfg, name, tuple(int(x) for x in v))
    for name in ("gqa", "modes", "impls"):
        v = getattr(F, name)
        if v:
            setattr(cfg, name, tuple(v))
    for name in ("head_dim", "page_size", "iters", "warmup", "dtype", "max_kv_gib"):
        v = getattr(F, name)
        if v is not None:
            setattr(cfg, name, v)
    run_bench(cfg, F.out)


def _define_flags():
    from absl import flags

    flags.DEFINE_bool("quick", False, "tiny configuration (CPU / interpret mode)")
    flags.DEFINE_list("batches", None, "batch sizes (default 1,8,64,256)")
    flags.DEFINE_list("contexts", None, "context lengths (default 512,2048,8192,32768)")
    flags.DEFINE_list("gqa", None, "Hq:Hkv pairs (default 32:8,32:4)")
    flags.DEFINE_list("modes", None, "decode,prefill")
    flags.DEFINE_list("impls", None, "decode,ragged,jax_gpu,xla")
    flags.DEFINE_integer("head_dim", None, "head dim (default 128)")
    flags.DEFINE_integer("page_size", None, "tokens per page (default 16)")
    flags.DEFINE_integer("iters", None, "timed iterations (median reported)")
    flags.DEFINE_integer("warmup", None, "warm-up iterations")
    flags.DEFINE_string("dtype", None, "bfloat16 (default) or float32")
    flags.DEFINE_float("max_kv_gib", None, "skip configs whose KV cache exceeds this")
    flags.DEFINE_string("out", "kernel_bench.json", "JSON output path")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
