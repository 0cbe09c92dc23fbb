"""Least wall time of a jax computation over repeats, after one warm-up call (which compiles). jax is imported
when called, so the bench package still loads without it."""

from __future__ import annotations

import time


def least_seconds(fn, *args, repeats: int = 5) -> float:
    import jax
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best
