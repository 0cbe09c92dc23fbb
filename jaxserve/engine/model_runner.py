"""Turns a scheduled batch into padded device arrays and runs the jitted model step + sampler.

Shapes come from a small set of buckets so the number of compilations stays bounded (and all of them are
compiled before a server says ready, `precompile.py`); measured choices in docs/drafts/time-to-ready.md:
- decode-only steps: S = T = the next power of two of the batch size, at least MIN_DECODE_SLOTS (8): on CPU a
  decode step of 1-8 rows costs the same (the weights are read once either way);
- mixed steps: T = `token_bucket` of the token count (powers of two from MIN_TOKEN_BUCKET (32), and 1.5x steps
  above 128), S = 8 or the slot maximum (padding slots cost no attention, their tiles are skipped, only
  lm_head rows and tile bookkeeping: 32 slots instead of 8 cost 2x at 64 tokens, +8% at 256);
- pages per sequence: on the XLA (CPU) path one width, the context maximum, since its attention loops over key
  blocks up to the longest live sequence and costs nothing per unused column; the Pallas kernels' grids
  follow the table width, so there it is the next power of two of the longest sequence's pages.
The CPU shapes are then (decode, S) for S = 8, 16, ..., max and (mixed, T, S in {8, max}): 13 at the serving
defaults (32 seqs, 256-token budget), and per slot count (3) a sampler program and an extended one (logprobs,
penalties, ...), run on the step's logits when a row samples (an all-greedy step is the step alone).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.engine.buckets import MIN_TOKEN_BUCKET, token_bucket, token_buckets
from jaxserve.engine.device_ops import DeviceOps, LocalOps
from jaxserve.engine.request import PENDING
from jaxserve.engine.sampling import (greedy_tokens, neutral_extras, sample_extended, sample_tokens, sampling_arrays,
                                      sampling_extras)
from jaxserve.engine.scheduler import ScheduledBatch
from jaxserve.model.batch import AttentionBatch
from jaxserve.model.decoder import Decoder
from jaxserve.util import next_pow2


class StepInputs(NamedTuple):
    """One step's host inputs (numpy); `decode_only` and the array shapes are the static compile key."""
    decode_only: bool
    token_ids: np.ndarray       # i32[T]
    prev_slots: np.ndarray      # i32[T]: >= 0: the token is the previous step's sample in that slot (on device)
    positions: np.ndarray       # i32[T]
    attn: AttentionBatch        # i32 fields, see model/batch.py
    logits_indices: np.ndarray  # i32[S]
    sampling: dict              # name -> [S] arrays (sampling.sampling_arrays)
    extra: dict | None = None   # the extended sampler's inputs (sampling.sampling_extras), None: plain sampler


def _step_key(inputs: StepInputs) -> tuple:
    """What selects a compiled step: (decode_only, tokens T, slots S, pages per sequence P)."""
    return inputs.decode_only, len(inputs.token_ids), len(inputs.logits_indices), inputs.attn.page_indices.shape[1]


def _sampler_key(inputs: StepInputs) -> tuple | None:
    """The sampler program a step's logits go through, by slot count S: ("extended", S) when a row needs the
    extended sampler (logprobs, penalties, bias, ...), ("sample", S) when a row samples, None when every row
    is greedy (the step's own argmax)."""
    if inputs.extra is not None:
        return "extended", len(inputs.logits_indices)
    if np.any(inputs.sampling["temperature"] > 0):
        return "sample", len(inputs.logits_indices)
    return None


def _shape_keys(inputs: StepInputs) -> list[tuple]:
    """The compiled programs a step runs: its step shape and its sampler's, if any."""
    sampler = _sampler_key(inputs)
    return [_step_key(inputs)] + ([sampler] if sampler is not None else [])


SAMPLERS = ("sample", "extended")  # the first element of a sampler program's key
MIN_DECODE_SLOTS = 8


@functools.lru_cache(maxsize=None)
def jitted_step(model_config, attention_impl: str, mesh=None):
    """One jitted step per (model shape, attention impl, MoE mesh), shared by every engine in the process, so
    a second engine with the same model reuses the first one's compilations. `mesh` is given only to MoE
    models on several devices (their experts are placed explicitly; everything else follows the params)."""
    model = Decoder(model_config, attention_impl=attention_impl, mesh=mesh)

    def step(params, kv_cache, last_tokens, token_ids, prev_slots, positions, batch, logits_indices, decode_only):
        """last_tokens i32[M]: the previous step's samples, padded to the runner's slot maximum. Returns
        (greedy tokens i32[S], logits f32[S, V], each row's last input token i32[S], the greedy tokens padded
        to [M] for the next step, the updated cache). Sampling is a program of its own on the logits
        (`jitted_sampler`), run only when a row samples: it costs a small compilation per slot count instead
        of a third of every step's (docs/drafts/time-to-ready.md), and an all-greedy step nothing."""
        token_ids = jnp.where(prev_slots >= 0, last_tokens[jnp.maximum(prev_slots, 0)], token_ids)
        logits, kv_cache = model.apply({"params": params}, token_ids, positions, kv_cache, batch,
                                       decode_only=decode_only, logits_indices=logits_indices)
        greedy = greedy_tokens(logits.astype(jnp.float32))  # = sample_tokens at T=0
        return (greedy, logits, token_ids[logits_indices],
                jnp.zeros_like(last_tokens).at[:greedy.shape[0]].set(greedy), kv_cache)

    return jax.jit(step, static_argnames=("decode_only",), donate_argnums=(1,))


@functools.lru_cache(maxsize=None)
def jitted_sampler(extended: bool):
    """The sampler on a step's logits. Plain: `(logits f32[S, V], last_tokens i32[M], sampling) -> (tokens
    i32[S], tokens padded to [M])`. Extended (`sample_extended`: logprobs, penalties, bias, min_p):
    `(logits, last_tokens, sampling, extra, fed i32[S], fed_pending bool[S]) -> (tokens, (sampled logprob, top
    ids, top logprobs), tokens padded to [M])`, `fed` the step's last input token per row, `fed_pending`
    whether it was read on the device."""

    def plain(logits, last_tokens, sampling):
        tokens = sample_tokens(logits, **sampling)
        return tokens, jnp.zeros_like(last_tokens).at[:tokens.shape[0]].set(tokens)

    def with_extras(logits, last_tokens, sampling, extra, fed, fed_pending):
        tokens, logprobs = sample_extended(logits, sampling, extra, fed, fed_pending)
        return tokens, logprobs, jnp.zeros_like(last_tokens).at[:tokens.shape[0]].set(tokens)

    return jax.jit(with_extras if extended else plain)


def standalone_step(model_config, attention_impl: str, mesh=None):
    """`jitted_step` + the plain sampler without the device-side token feed, for tools and tests: `(params,
    kv_cache, token_ids, positions, batch, logits_indices, sampling, decode_only=...) -> (sampled i32[S],
    kv_cache)`."""
    step = jitted_step(model_config, attention_impl, mesh)

    def run(params, kv_cache, token_ids, positions, batch, logits_indices, sampling, decode_only):
        slots = max(8, len(logits_indices))
        last = np.zeros(slots, np.int32)
        sampled, logits, _, _, kv_cache = step(params, kv_cache, last, token_ids,
                                               np.full(len(token_ids), -1, np.int32), positions, batch,
                                               logits_indices, decode_only=decode_only)
        if np.any(np.asarray(sampling["temperature"]) > 0):
            sampled, _ = jitted_sampler(False)(logits, last, sampling)
        return sampled, kv_cache

    return run


class ModelRunner:
    def __init__(self, model_config, params, pool, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, attention_impl: str, mesh=None, ops: DeviceOps | None = None,
                 on_new_shape: Callable[[], None] | None = None):
        """`ops`: the instance's device-op channel (default: a single process's); every step runs through it
        (op "step"), so the followers of a multi-process instance run it too. `on_new_shape()`: called before a
        step whose shapes were never run (it compiles first; a step watchdog extends its deadline)."""
        self.model_config = model_config
        self.params = params
        self.pool = pool
        self.page_size = pool.page_size
        self.max_num_seqs = max_num_seqs
        self.max_tokens_bucket = token_bucket(max_num_batched_tokens)
        self.max_pages_bucket = next_pow2(-(-max_model_len // self.page_size))
        self.fixed_page_table = attention_impl != "pallas"
        self.shapes_seen: set[tuple] = set()
        self._step = jitted_step(model_config, attention_impl, mesh)
        self._samplers = {False: jitted_sampler(False), True: jitted_sampler(True)}
        self.executables: dict[tuple, object] = {}  # key -> executable compiled ahead (compile_ahead)
        # The last step's samples stay on the device so the next step can start before the host reads them.
        self.max_slots = max(next_pow2(max_num_seqs), 8)
        self._last_tokens = np.zeros(self.max_slots, np.int32)  # numpy: placed by the step, as its inputs are
        self.ops = ops if ops is not None else LocalOps()
        self.on_new_shape = on_new_shape
        self.eos_token_ids: tuple[int, ...] = ()  # masked before a request's min_tokens (set by the engine)
        self.ops.bind("step", lambda inputs: self.execute(inputs))  # late-bound: tests may wrap `execute`

    @property
    def first_step_pending(self) -> bool:
        """No step has run yet: the next one reads the last-token buffer from host memory."""
        return isinstance(self._last_tokens, np.ndarray)

    @property
    def num_compilations(self) -> int:
        return len(self.shapes_seen)

    def dispatch(self, batch: ScheduledBatch) -> jax.Array:
        """Start one step; returns its samples as a device array without waiting (entry i's sample in slot i,
        meaningful where the entry reached the end of its known tokens). A PENDING last token of a request is
        read on the device from the previous step's slot `req.pending_slot`."""
        inputs = self.prepare(batch)
        if self.on_new_shape is not None and not self.shapes_seen.issuperset(_shape_keys(inputs)):
            self.on_new_shape()  # this step compiles first
        return self.submit(inputs)

    def submit(self, inputs: "StepInputs") -> jax.Array:
        """Run prepared inputs as the "step" device op (on every process of the instance); see `execute`."""
        return self.ops.call("step", inputs)

    def run(self, batch: ScheduledBatch) -> np.ndarray:
        """Run one step and wait: the sampled token of each entry."""
        out = self.dispatch(batch)
        return np.asarray(out[0] if isinstance(out, tuple) else out)[:len(batch.entries)]

    def slot_bucket(self, num_entries: int, decode_only: bool) -> int:
        if decode_only:
            return max(next_pow2(num_entries), MIN_DECODE_SLOTS)
        return 8 if num_entries <= 8 else self.max_slots

    def slot_buckets(self, decode_only: bool) -> list[int]:
        """Every value `slot_bucket` can return."""
        if decode_only:
            return sorted({self.slot_bucket(n, True) for n in range(1, self.max_num_seqs + 1)})
        return sorted({8, self.max_slots})

    def page_bucket(self, num_pages: int) -> int:
        return self.max_pages_bucket if self.fixed_page_table else min(next_pow2(num_pages), self.max_pages_bucket)

    def page_buckets(self) -> list[int]:
        """Every value `page_bucket` can return."""
        if self.fixed_page_table:
            return [self.max_pages_bucket]
        return sorted({min(next_pow2(n), self.max_pages_bucket) for n in range(1, self.max_pages_bucket + 1)})

    def prepare(self, batch: ScheduledBatch) -> "StepInputs":
        """The host-side (numpy) inputs of one step: everything `execute` needs, nothing request-shaped."""
        entries = batch.entries
        decode_only = batch.decode_only
        ps = self.page_size
        num_slots = self.slot_bucket(len(entries), decode_only)
        num_tokens = num_slots if decode_only else min(token_bucket(batch.num_tokens), self.max_tokens_bucket)
        pages_per_seq = self.page_bucket(max(len(r.pages) for r, _ in entries))

        token_ids = np.zeros(num_tokens, np.int32)
        prev_slots = np.full(num_tokens, -1, np.int32)
        positions = np.zeros(num_tokens, np.int32)
        slot_pages = np.zeros(num_tokens, np.int32)   # padding writes go to reserved page 0
        slot_offsets = np.zeros(num_tokens, np.int32)
        kv_lens = np.zeros(num_slots, np.int32)
        page_indices = np.zeros((num_slots, pages_per_seq), np.int32)
        cu_q_lens = np.zeros(num_slots + 1, np.int32)
        logits_indices = np.zeros(num_slots, np.int32)
        t = 0
        for s, (req, n) in enumerate(entries):
            start = req.num_computed
            toks = req.all_token_ids[start:start + n]
            pos = np.arange(start, start + n)
            if toks[-1] == PENDING:  # sampled by the step still running: read on the device
                toks[-1] = 0
                prev_slots[t + n - 1] = req.pending_slot
            token_ids[t:t + n] = toks
            positions[t:t + n] = pos
            pages = np.asarray(req.pages, np.int32)
            slot_pages[t:t + n] = pages[pos // ps]
            slot_offsets[t:t + n] = pos % ps
            kv_lens[s] = start + n
            page_indices[s, :len(pages)] = pages
            t += n
            cu_q_lens[s + 1] = t
            logits_indices[s] = t - 1
        cu_q_lens[len(entries) + 1:] = t
        attn = AttentionBatch(slot_pages=slot_pages, slot_offsets=slot_offsets, kv_lens=kv_lens,
                              page_indices=page_indices, cu_q_lens=cu_q_lens,
                              num_seqs=np.array([len(entries)], np.int32))
        reqs = [r for r, _ in entries]
        sampling = sampling_arrays([r.params for r in reqs], [r.seed for r in reqs],
                                   [len(r.output_token_ids) for r in reqs], num_slots)
        extra = sampling_extras(reqs, num_slots, self.model_config.vocab_size, self.eos_token_ids)
        return StepInputs(decode_only, token_ids, prev_slots, positions, attn, logits_indices, sampling, extra)

    def execute(self, inputs: "StepInputs"):
        """The "step" op's local function: start the jitted step on prepared inputs (and the sampler on its
        logits when a row samples or needs the extended sampler); returns the sampled token of every slot
        (padding included) as a device array, without waiting for it; with the extended sampler, (tokens,
        sampled logprob, top ids, top logprobs). A program compiled ahead (`compile_ahead`) runs as that
        executable; any other goes through the jit (compiling on first use)."""
        key = _step_key(inputs)
        self.shapes_seen.add(key)
        args = (self.params, self.pool.kv_cache, self._last_tokens, inputs.token_ids, inputs.prev_slots,
                inputs.positions, inputs.attn, inputs.logits_indices)
        compiled = self.executables.get(key)
        out = compiled(*args) if compiled is not None else self._step(*args, decode_only=inputs.decode_only)
        tokens, logits, fed, self._last_tokens, self.pool.kv_cache = out
        skey = _sampler_key(inputs)
        if skey is None:
            return tokens  # every row greedy: the step's argmax
        self.shapes_seen.add(skey)
        sampler = self.executables.get(skey) or self._samplers[skey[0] == "extended"]
        if skey[0] == "sample":
            tokens, self._last_tokens = sampler(logits, self._last_tokens, inputs.sampling)
            return tokens
        fed_pending = inputs.prev_slots[inputs.logits_indices] >= 0
        tokens, logprobs, self._last_tokens = sampler(logits, self._last_tokens, inputs.sampling, inputs.extra,
                                                      fed, fed_pending)
        return (tokens, *logprobs)

    # ----------------------------------------------------------------------------------- compile ahead
    @property
    def can_compile_ahead(self) -> bool:
        """Single process, single device: executables compiled from `lower()` run as they are (on a mesh, an
        input placed differently from the lowering would be refused instead of recompiled)."""
        return not self.ops.is_multiprocess and len(self.pool.kv_cache.sharding.device_set) == 1

    def compile_ahead(self, keys, inputs_of: Callable[[tuple], "StepInputs"], workers: int = 2,
                      progress: Callable[[int, int], None] | None = None) -> int:
        """Compile the programs of `keys` (step keys, ("sample", S) and ("extended", S)) into
        `self.executables`, lowering here and compiling in `workers` threads (XLA compiles without the GIL:
        lowering the next program and compiling overlap, and with 2+ cores two compiles run at once); the
        persistent compilation cache applies as for the jit. `inputs_of(key)`: dummy inputs of a step key.
        `progress(done, total)`."""
        keys = [k for k in keys if k not in self.executables]
        steps = [k for k in keys if k[0] not in SAMPLERS]
        samplers = [k for k in keys if k[0] in SAMPLERS]
        step_out: dict[int, tuple] = {}  # slots -> (logits, fed, last tokens) shapes, from a lowered step
        last = jax.ShapeDtypeStruct((self.max_slots,), jnp.int32)

        def lower_step(x):
            return self._step.lower(self.params, self.pool.kv_cache, last, x.token_ids, x.prev_slots, x.positions,
                                    x.attn, x.logits_indices, decode_only=x.decode_only)

        with ThreadPoolExecutor(max(workers, 1)) as pool:
            futures = []
            for key in steps:
                lowered = lower_step(inputs_of(key))
                step_out.setdefault(key[2], tuple(lowered.out_info[1:4]))
                futures.append((key, pool.submit(lowered.compile)))
            for kind, slots in samplers:
                if slots not in step_out:  # its steps were compiled before: their output shapes
                    x = inputs_of(next(k for k in self.step_keys() if k[2] == slots))
                    step_out[slots] = tuple(lower_step(x).out_info[1:4])
                logits, fed, last_out = step_out[slots]
                sampling = sampling_arrays([], [], [], slots)
                if kind == "sample":
                    lowered = self._samplers[False].lower(logits, last_out, sampling)
                else:
                    lowered = self._samplers[True].lower(logits, last_out, sampling,
                                                         neutral_extras(slots, self.model_config.vocab_size), fed,
                                                         np.zeros(slots, bool))
                futures.append(((kind, slots), pool.submit(lowered.compile)))
            for done, (key, future) in enumerate(futures, 1):
                self.executables[key] = future.result()
                self.shapes_seen.add(key)
                if progress is not None:
                    progress(done, len(futures))
        return len(keys)

    def step_keys(self) -> list[tuple]:
        """Every step key `prepare` can produce: (decode_only, tokens T, slots S, pages per sequence P)."""
        pages = self.page_buckets()
        keys = [(True, s, s, p) for s in self.slot_buckets(True) for p in pages]
        return keys + [(False, t, s, p) for t in token_buckets(MIN_TOKEN_BUCKET, self.max_tokens_bucket)
                       for s in self.slot_buckets(False) for p in pages]

    def sampler_keys(self, extended: bool = True) -> list[tuple]:
        """The sampler programs: ("sample", S) and (with `extended`) ("extended", S) per slot count S a step
        can have."""
        slots = sorted({k[2] for k in self.step_keys()})
        return [(kind, s) for kind in SAMPLERS[:1 + extended] for s in slots]
