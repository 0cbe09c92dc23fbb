"""The cost-model points of an instance: time to the first token of a prompt with part of it cached, measured
on the engine thread through the engine loop's own steps."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from jaxserve.engine.engine import Engine
from jaxserve.engine.request import Request
from jaxserve.engine.sampling import SamplingParams


def time_to_first_token(engine: Engine, step: Callable[[], object], points: Sequence[tuple[int, int]],
                        repeats: int = 3, seed: int = 0) -> list[tuple[int, int, float]]:
    """Least seconds from adding a request with prompt_len tokens, of which the first cached_len are in the
    index, to its first token, per point; `step` runs one engine step. One extra run per point warms the jit
    buckets. Points the engine cannot hold are skipped. The random prompts are deleted from the index
    afterwards."""
    ps = engine.pool.page_size
    capacity = (engine.pool.num_pages - 1) * ps
    rng = np.random.default_rng(seed)
    vocab = min(engine.model_config.vocab_size, 256)
    out = []
    for prompt_len, cached_len in points:
        prompt_len, cached_len = int(prompt_len), int(cached_len)
        if not 1 <= prompt_len < engine.max_model_len or prompt_len + 1 > capacity or cached_len >= prompt_len:
            continue
        times = []
        for r in range(max(repeats, 1) + 1):
            tokens = [int(t) for t in rng.integers(0, vocab, prompt_len)]
            if cached_len // ps:
                _run_to_end(engine, step, tokens[:cached_len // ps * ps + 1])
            t0 = time.perf_counter()
            _run_to_end(engine, step, tokens)
            if r:
                times.append(time.perf_counter() - t0)
            engine.pool.delete(tokens)
            engine.pool.delete(tokens[:cached_len // ps * ps + 1])
        # The least time, not the median: the cost model is the service time of an idle instance (queueing
        # is modelled separately), and on a shared host another process's burst lands on some repeats. With
        # the median, two like instances profiled 50% apart in a served run and one took every request.
        out.append((prompt_len, cached_len, float(np.min(times))))
    return out


def _run_to_end(engine: Engine, step: Callable[[], object], tokens: list[int]) -> Request:
    req = engine.add_request(tokens, SamplingParams(max_tokens=1, ignore_eos=True))
    try:
        while not req.finished:
            step()
            if req.request_id not in engine.requests:
                raise RuntimeError("profiling request was aborted (engine step failed)")
    finally:
        engine.requests.pop(req.request_id, None)
    return req
