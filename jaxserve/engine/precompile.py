"""Compile every step and transfer shape an engine can run before it serves, so no request waits on a compile.

A first-time shape costs 0.3-0.5 s on the demo model even when the persistent XLA cache hits (tracing, lowering
and loading the executable), and seconds when it misses; served, that lands on whichever request first needs
the shape (measured: every TTFT outlier of a served multi-turn run sat on such a compile, WORKSPACE_NOTES.md).
vLLM does the same on TPU (it compiles all padded shapes at start-up) and captures CUDA graphs for all its
batch sizes on GPU. The shapes are bounded by `model_runner`'s buckets, so this is a finite list.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from jaxserve.engine.model_runner import SAMPLERS, StepInputs, next_pow2
from jaxserve.engine.sampling import neutral_extras, sampling_arrays
from jaxserve.model.batch import AttentionBatch


def _pow2_range(lo: int, hi: int) -> list[int]:
    out, n = [], next_pow2(lo)
    while n <= hi:
        out.append(n)
        n *= 2
    return out


def step_shapes(runner, extended: bool | None = None) -> list[tuple]:
    """Every program a step can run: the step keys `ModelRunner.prepare` can produce, (decode_only, tokens T,
    slots S, pages per sequence P), and the samplers' per slot count: ("sample", S), and ("extended", S)
    (logprobs, penalties, bias, grammars) unless `extended` is False (default: where the runner serves it,
    i.e. not on a multi-process instance)."""
    if extended is None:
        extended = not runner.ops.is_multiprocess
    return runner.step_keys() + runner.sampler_keys(extended)


def dummy_inputs(decode_only: bool, num_tokens: int, num_slots: int, pages_per_seq: int, *variant,
                 vocab_size: int = 0) -> StepInputs:
    """A step of the given shape with no live sequence: every token writes to page 0 (the pool's sink).
    variant ("sample",): every row samples (temperature 1); ("extended",): with the extended sampler's neutral
    inputs (needs vocab_size)."""
    z = lambda n: np.zeros(n, np.int32)  # noqa: E731
    attn = AttentionBatch(slot_pages=z(num_tokens), slot_offsets=z(num_tokens), kv_lens=z(num_slots),
                          page_indices=np.zeros((num_slots, pages_per_seq), np.int32),
                          cu_q_lens=z(num_slots + 1), num_seqs=z(1))
    no_previous = np.full(num_tokens, -1, np.int32)
    extra = neutral_extras(num_slots, vocab_size) if variant == ("extended",) else None
    sampling = sampling_arrays([], [], [], num_slots)
    if variant == ("sample",):
        sampling["temperature"][:] = 1.0
    return StepInputs(decode_only, z(num_tokens), no_previous, z(num_tokens), attn, z(num_slots), sampling, extra)


def warm_inputs(decode_only: bool, num_tokens: int, num_slots: int, pages_per_seq: int, live: int, page_size: int,
                *variant, vocab_size: int = 0) -> StepInputs:
    """A step of the given shape with `live` sequences of num_tokens // live tokens each (decode: one), every
    page of every table the sink page 0: it reads and writes only the sink, but runs the attention branch a
    real step of that make-up takes (one live prompt chunk, or every slot alike). A prompt step's sequences
    have a cached page before their rows, the same one, so several of them also run the general path's
    shared-prefix phase (a burst over a cached system prompt)."""
    inputs = dummy_inputs(decode_only, num_tokens, num_slots, pages_per_seq, *variant, vocab_size=vocab_size)
    q_len = 1 if decode_only else num_tokens // live
    cached = page_size if not decode_only and q_len + page_size <= pages_per_seq * page_size else 0
    pos = np.tile(np.arange(cached, cached + q_len, dtype=np.int32), live)
    attn = inputs.attn
    attn.slot_offsets[:len(pos)] = pos % page_size
    attn.kv_lens[:live] = cached + q_len
    attn.cu_q_lens[:] = q_len * np.minimum(np.arange(num_slots + 1), live)
    attn.num_seqs[0] = live
    inputs.positions[:len(pos)] = pos
    inputs.logits_indices[:live] = q_len * np.arange(1, live + 1) - 1
    return inputs


def _step_before(runner, sampler_key: tuple) -> tuple:
    """A step key with the sampler's slot count: a sampler runs after such a step."""
    return next(k for k in runner.step_keys() if k[2] == sampler_key[1])


def precompile_steps(runner, shapes=None, progress=None, workers: int | None = None) -> int:
    """Compiles every program in `shapes` (default `step_shapes(runner)`) not yet seen. A single-device runner
    compiles them ahead into executables, `workers` at a time (default: $JAXSERVE_COMPILE_WORKERS, else the
    CPUs, at most 2: measured in docs/drafts/time-to-ready.md); otherwise one dummy step per program runs as
    a "step" device op (so a multi-process instance's followers compile it too). `progress(done, total)`
    after each (a progress bar). Returns the number of programs compiled."""
    todo = [s for s in (step_shapes(runner) if shapes is None else shapes) if s not in runner.shapes_seen]
    vocab = runner.model_config.vocab_size
    if runner.can_compile_ahead:
        if workers is None:
            workers = int(os.environ.get("JAXSERVE_COMPILE_WORKERS", 0)) or min(2, os.cpu_count() or 1)
        runner.compile_ahead(todo, lambda key: dummy_inputs(*key, vocab_size=vocab), workers, progress)
        # A program's first run costs far more than later ones (XLA:CPU materialises code on first use: a
        # first 544-token prompt after start-up 121 vs 42 ms, docs/notes-issue-14.md, session 10), so each step
        # runs here on sink-page inputs: once with one live sequence and once with every slot live.
        ps = runner.page_size
        for key in todo:
            if key[0] in SAMPLERS:
                step = _step_before(runner, key)
                runner.submit(warm_inputs(*step, step[2], ps, key[0], vocab_size=vocab))
            else:
                for live in sorted({1, min(key[1], key[2])}):
                    runner.submit(warm_inputs(*key, live, ps, vocab_size=vocab))
        return len(todo)
    runs = []
    for key in todo:
        if key[0] in SAMPLERS:
            step = _step_before(runner, key)
            runs.append(dummy_inputs(*step, key[0], vocab_size=vocab))
        else:
            runs.append(dummy_inputs(*key, vocab_size=vocab))
    # The runner's very first step feeds its last-token buffer from host memory, every later one from the
    # device: two jit keys for that step's shape, so the first shape runs once more at the end.
    again = runs[:1] if runner.first_step_pending else []
    for k, inputs in enumerate(runs + again):
        runner.submit(inputs)
        if progress is not None:
            progress(min(k + 1, len(todo)), len(todo))
    return len(todo)


def precompile_transfers(pool, max_pages: int) -> int:
    """Compiles the KV gather and scatter executables (one per page-count bucket up to `max_pages`) on page 0,
    the sink, so moving a request's KV never compiles while serving. Single-process pools only."""
    from jaxserve.mempool.transfer import gather_chunks, scatter_block
    sizes = _pow2_range(1, next_pow2(max_pages))
    for n in sizes:
        chunks = gather_chunks(pool, [0] * n)
        scatter_block(pool, [0] * n, chunks)
    return 2 * len(sizes)


def precompile_host_tier(pool) -> int:
    """Compiles the host-tier copies (one gather and one scatter per page-count bucket up to the pool's size)
    between the sink page 0 and host page 0, through the device-op channel. Only before serving: host page 0
    may hold a cached page later."""
    if not pool.num_host_pages:
        return 0
    sizes = _pow2_range(1, next_pow2(min(pool.num_pages, pool.num_host_pages)))
    for n in sizes:
        pool.copy_to_host([0] * n, [0] * n)
        pool.copy_to_device([0] * n, [0] * n)
    return 2 * len(sizes)


def precompile(engine, *, transfers: bool = False, progress=None) -> dict:
    """Everything above for `engine`; returns counts and seconds for the start-up log."""
    t0 = time.perf_counter()
    steps = precompile_steps(engine.runner, progress=progress)
    moved = precompile_host_tier(engine.pool)
    if transfers:
        moved += precompile_transfers(engine.pool, -(-engine.max_model_len // engine.pool.page_size))
    jax.block_until_ready(engine.pool.kv_cache)  # the dummy steps run asynchronously
    return dict(step_shapes=steps, copy_shapes=moved, seconds=round(time.perf_counter() - t0, 2))
