"""The cost-model points of an instance: time to the first token of a prompt with part of it cached, measured
on the engine thread through the engine loop's own steps."""

from __future__ import annotations

import hashlib
import json
import os
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


def profile_cache_file(engine: Engine, identity: dict, points: Sequence[tuple[int, int]]) -> str | None:
    """Where a start-up profile of this engine is kept: next to JAX's persistent compilation cache (None when
    that is off), named by everything the timings depend on (model identity and config, engine config, the
    points, JAX version, devices, CPU count). A restart with a warm compilation cache then reuses the
    timings instead of re-measuring them (1.3 s at the serving defaults, docs/drafts/time-to-ready.md);
    delete the file to measure again."""
    import jax
    folder = jax.config.jax_compilation_cache_dir
    if not folder:
        return None
    key = json.dumps(dict(identity=identity, model=repr(engine.model_config), engine=repr(engine.config),
                          pages=[engine.pool.num_pages, engine.pool.num_host_pages, engine.pool.kv_cache_dtype],
                          points=[list(map(int, p)) for p in points], jax=jax.__version__,
                          devices=[d.device_kind for d in jax.local_devices()], cpus=os.cpu_count()),
                     sort_keys=True)
    return os.path.join(folder, f"jaxserve-profile-{hashlib.sha256(key.encode()).hexdigest()[:32]}.json")


def load_profile(path: str | None) -> list[tuple[int, int, float]] | None:
    if not path or not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return [(int(p), int(c), float(s)) for p, c, s in json.load(f)["samples"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable: measure again


def store_profile(path: str | None, samples: Sequence[tuple[int, int, float]]) -> None:
    if not path:
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(dict(samples=[list(s) for s in samples]), f)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache folder: profile again next time
