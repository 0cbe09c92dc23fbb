"""One serving instance's runtime on one mesh: MemPool + scheduler + model runner, stepped in a loop."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Callable

import jax
import numpy as np

from jaxserve.cache_salt import check_salt
from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.engine.device_ops import DeviceOps, LocalOps
from jaxserve.engine.model_runner import ModelRunner
from jaxserve.engine.request import PENDING, Request, Status
from jaxserve.engine.sampling import SamplingParams
from jaxserve.engine.scheduler import Scheduler
from jaxserve.kernels.dispatch import resolve_impl
from jaxserve.mempool import MemPool
from jaxserve.mempool.kv_store import size_cache
from jaxserve.model.decoder import kv_cache_partition_spec, param_partition_specs


def make_mesh(tp: int, device_ids=None, seq: int = 1, ep: int = 1) -> jax.sharding.Mesh:
    """1-D mesh ("tp",) or, with seq > 1, 2-D ("seq", "tp"), or with ep > 1, 2-D ("ep", "tp") (tp
    neighbours adjacent)."""
    devices = jax.devices()
    count = seq * ep * tp
    if device_ids is not None:
        by_id = {d.id: d for d in devices}
        missing = [i for i in device_ids if i not in by_id]
        if missing:
            raise ValueError(f"device ids {missing} not found; available: {sorted(by_id)}")
        chosen = [by_id[i] for i in device_ids]
    else:
        if count > len(devices):
            raise ValueError(f"seq={seq} x ep={ep} x tp={tp} needs {count} devices but only {len(devices)} are "
                             "visible")
        chosen = devices[:count]
    if seq > 1:
        return jax.sharding.Mesh(np.asarray(chosen).reshape(seq, tp), ("seq", "tp"))
    if ep > 1:
        return jax.sharding.Mesh(np.asarray(chosen).reshape(ep, tp), ("ep", "tp"))
    return jax.sharding.Mesh(np.asarray(chosen), ("tp",))


def check_parallelism(model_config: ModelConfig, tp: int, ep: int = 1, seq: int = 1) -> None:
    """Refuse a mesh the model cannot be split over, naming the degree and the model size it must divide."""
    if model_config.num_kv_heads % tp:
        raise ValueError(f"tp={tp} must divide num_kv_heads={model_config.num_kv_heads}")
    if model_config.intermediate_size % tp:
        raise ValueError(f"tp={tp} must divide intermediate_size={model_config.intermediate_size}")
    if model_config.num_experts:
        if model_config.moe_intermediate_size % tp:
            raise ValueError(f"tp={tp} must divide moe_intermediate_size={model_config.moe_intermediate_size}")
        if model_config.num_experts % ep:
            raise ValueError(f"ep={ep} must divide num_experts={model_config.num_experts}")
    elif ep > 1:
        raise ValueError(f"ep={ep} needs a mixture-of-experts model; {model_config.architecture} has no experts")
    if seq > 1:
        features = [name for name, on in (("sliding-window attention", model_config.has_sliding_layers),
                                          ("attention logit soft-capping", model_config.attn_logit_softcap),
                                          ("attention sinks", model_config.attention_sinks)) if on]
        if features:
            raise ValueError(f"sequence-parallel prefill does not support {', '.join(features)} "
                             f"({model_config.architecture}); use sequence_parallel=1")


def kv_storage_dtype(model_config: ModelConfig, platform: str | None = None, attention_impl: str = "auto") -> str:
    """The KV pool's dtype: the model's, except on CPU, where XLA scatters a bf16 cache through f32 (24-42 ms
    per layer write of 8 tokens into a 33 MB cache, against 0.009 ms in f32: `jaxserve.launch.bench_cpu_ops`).
    There a model whose matmuls read bf16 (a bf16 checkpoint) stores the bits of its bf16 K/V in uint16, which
    scatters in place and which the XLA attention paths bitcast back: half the bytes of f32 per page and per
    decode gather, and the same values, since those paths round every key block to bf16 for the dot anyway
    (`Attention.attention_dot_dtype`). Other models, and the Pallas kernels (which read the pool as it is), keep
    f32 on CPU."""
    platform = platform or jax.default_backend()
    if platform == "cpu":
        bits = (model_config.matmul_dtype == "bfloat16" and model_config.kv_cache_dtype == "auto"
                and resolve_impl(attention_impl, platform) == "reference")
        return "uint16" if bits else "float32"
    return model_config.dtype


log = logging.getLogger(__name__)


class Unschedulable(RuntimeError):
    """`Engine.step`: the head of the waiting queue can never be scheduled (nothing runs and it does not fit
    the free KV pages); the engine itself is fine. `request_id`: that request."""

    def __init__(self, request_id: str, message: str):
        super().__init__(message)
        self.request_id = request_id


class Engine:
    def __init__(self, model_config: ModelConfig, params, config: EngineConfig, *, eos_token_ids=(),
                 detokenize=None, ops: DeviceOps | None = None, grammars=None):
        """`ops`: the device-op channel every part that runs device work gets (jaxserve/engine/device_ops.py):
        a multi-process instance's `LeaderOps` / `FollowerOps` (multihost.connect); default: one process.
        `grammars()`: builds the structured-output factory (engine.structured.Grammars) on first use; None:
        requests with a json_schema are refused."""
        self._grammars_factory = grammars
        self._grammars = None
        self.ops = ops if ops is not None else LocalOps()
        # The compiled step writes and reads K/V the way the pool stores them (CacheConfig.kv_cache_dtype), and
        # a memory budget in bytes becomes a page count at that storage dtype.
        if model_config.kv_cache_dtype != config.cache.kv_cache_dtype:
            model_config = dataclasses.replace(model_config, kv_cache_dtype=config.cache.kv_cache_dtype)
        storage = kv_storage_dtype(model_config, attention_impl=config.attention_impl)
        config = dataclasses.replace(config, cache=size_cache(model_config, config.cache, storage))
        # Called (engine thread) before a step or sequence-parallel prefill whose shapes never ran (it compiles
        # first): `add_new_shape_hook`; a step watchdog extends its deadline.
        self._new_shape_hooks: list[Callable[[], None]] = []
        self.model_config = model_config
        self.config = config
        self.max_model_len = config.max_model_len or model_config.max_position_embeddings
        if config.max_model_len and config.max_model_len > model_config.max_position_embeddings:
            raise ValueError(f"max_model_len ({config.max_model_len}) exceeds the model's "
                             f"max_position_embeddings ({model_config.max_position_embeddings})")
        mesh_cfg = config.mesh
        check_parallelism(model_config, mesh_cfg.tp, mesh_cfg.ep, mesh_cfg.seq)
        self.mesh = make_mesh(mesh_cfg.tp, mesh_cfg.device_ids, mesh_cfg.seq, mesh_cfg.ep)
        specs = param_partition_specs(model_config, ep_axis="ep" if mesh_cfg.ep > 1 else None)
        if jax.process_count() > 1:  # multi-process mesh: put each process's host copy (committed arrays on
            params = jax.tree.map(np.asarray, params)  # one local device cannot device_put across hosts)
        self.params = jax.tree.map(
            lambda x, s: jax.device_put(x, jax.sharding.NamedSharding(self.mesh, s)), params, specs)
        kv_sharding = jax.sharding.NamedSharding(self.mesh, kv_cache_partition_spec())
        self.pool = MemPool(model_config, config.cache, sharding=kv_sharding, dtype=storage,
                            ops=self.ops)
        log.info("KV cache: %s, %d device pages + %d host pages of %d bytes (%.1f MiB device); %.0f pages/GiB",
                 config.cache.kv_cache_dtype, self.pool.num_pages, self.pool.num_host_pages, self.pool.page_bytes,
                 self.pool.num_pages * self.pool.page_bytes / 2**20, 2**30 / self.pool.page_bytes)
        self.attention_impl = resolve_impl(config.attention_impl)
        self.runner = ModelRunner(model_config, self.params, self.pool,
                                  max_num_seqs=config.scheduler.max_num_seqs,
                                  max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
                                  max_model_len=self.max_model_len, attention_impl=self.attention_impl,
                                  mesh=self.mesh if model_config.num_experts and self.mesh.size > 1 else None,
                                  ops=self.ops, on_new_shape=self._new_shape)
        self.sp = None
        if config.mesh.seq > 1:  # sequence-parallel prefill of long prompts (engine/seq_parallel.py)
            from jaxserve.engine.seq_parallel import SequenceParallelPrefill
            self.sp = SequenceParallelPrefill(model_config, self.params, self.pool, self.mesh, ops=self.ops,
                                              on_new_shape=self._new_shape)
        self.scheduler = Scheduler(config.scheduler, self.pool,
                                   enable_prefix_caching=config.cache.enable_prefix_caching,
                                   sp_threshold=config.sp_threshold if self.sp is not None else None)
        self.eos_token_ids = tuple(eos_token_ids)
        self.runner.eos_token_ids = self.eos_token_ids
        self.detokenize = detokenize
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.num_prefill_tokens_computed = 0
        self.num_steps = 0
        self._in_flight = None  # (samples, device tokens) of the dispatched step not yet completed
        # A served instance's step trace (jaxserve.engine.step_trace.StepTrace, `--step_trace`): called on the
        # engine thread as `step_trace(event, **fields)`; None: nothing is recorded.
        self.step_trace: Callable[..., None] | None = None

    def add_new_shape_hook(self, hook: Callable[[], None]) -> None:
        """`hook()` runs before every step or sequence-parallel prefill that compiles first (new shapes)."""
        self._new_shape_hooks.append(hook)

    def _new_shape(self) -> None:
        for hook in self._new_shape_hooks:
            hook()

    # -- requests -----------------------------------------------------------------------------------
    def validate(self, prompt_token_ids, params: SamplingParams) -> None:
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("prompt is empty: at least one token is required")
        if n >= self.max_model_len:
            raise ValueError(f"prompt has {n} tokens, but the maximum model length is {self.max_model_len} "
                             f"(the prompt must leave room for at least one new token)")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= int(t) < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        bad = [t for t in params.stop_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"stop token id {bad[0]} is outside the vocabulary [0, {vocab})")
        bad = [t for t, _ in params.logit_bias if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"logit_bias token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if params.json_schema is not None:
            self.grammars.validate(params.json_schema)
        if params.extended and self.ops.is_multiprocess:
            raise ValueError("logprobs, penalties, logit_bias, min_p and min_tokens are not supported on a "
                             "multi-process instance yet")
        usable = (self.pool.num_pages - 1) * self.pool.page_size
        if min(n + params.max_tokens, self.max_model_len) > usable:
            raise ValueError(f"prompt ({n} tokens) plus max_tokens ({params.max_tokens}) needs more KV "
                             f"memory than the pool holds ({usable} tokens = {self.pool.num_pages - 1} pages "
                             f"of {self.pool.page_size}); raise num_pages or lower max_tokens")

    def add_request(self, prompt_token_ids, params: SamplingParams, request_id: str | None = None, *,
                    prefill_only: bool = False, cache_salt: str = "") -> Request:
        """Queues a request. `prefill_only`: stop after the first token and keep the KV pages (finish_reason
        "prefilled") until `release(request_id)`, so a disaggregated decode instance can receive them.
        `cache_salt`: requests with different salts never share prefix-cache KV (jaxserve.cache_salt)."""
        req = self._new_request(prompt_token_ids, params, request_id, cache_salt=cache_salt)
        req.prefill_only = bool(prefill_only)
        self.scheduler.add(req)
        return req

    def add_prefilled_request(self, prompt_token_ids, output_token_ids, params: SamplingParams, pages, *,
                              num_computed: int, num_indexed_pages: int = 0, request_id: str | None = None,
                              seed: int | None = None, cache_salt: str = "") -> Request:
        """Queues a request whose first `num_computed` tokens already have their KV in `pages` (e.g. received
        from a prefill instance); the engine takes over the callers' references to `pages`. It continues from
        there (typically: decode after the first token the prefill side sampled)."""
        req = self._new_request(prompt_token_ids, params, request_id, seed=seed, cache_salt=cache_salt)
        req.output_token_ids = [int(t) for t in output_token_ids]
        ps = self.pool.page_size
        if not 0 < num_computed < req.num_tokens or len(pages) != -(-num_computed // ps):
            self.requests.pop(req.request_id)
            raise ValueError(f"{len(pages)} pages for {num_computed} computed of {req.num_tokens} tokens")
        req.pages, req.num_computed, req.num_indexed_pages = list(pages), int(num_computed), int(num_indexed_pages)
        req.preloaded = True
        self.scheduler.add(req)
        return req

    def _new_request(self, prompt_token_ids, params, request_id, seed=None, cache_salt: str = "") -> Request:
        prompt_token_ids = [int(t) for t in prompt_token_ids]
        self.validate(prompt_token_ids, params)
        check_salt(cache_salt)
        idx = next(self._ids)
        request_id = request_id if request_id is not None else str(idx)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if seed is None:
            seed = params.seed if params.seed is not None else (self.config.seed * 1_000_003 + idx) % 2**32
        req = Request(request_id, prompt_token_ids, params, seed, self.max_model_len, cache_salt=cache_salt)
        if params.json_schema is not None:
            req.grammar = self.grammars.matcher(params.json_schema)
        self.requests[request_id] = req
        return req

    def release(self, request_id: str) -> None:
        """Frees the pages a prefill-only request kept (after its KV was transferred, or gave up on)."""
        req = self.requests.pop(request_id, None)
        if req is not None and req.pages:
            self.pool.free(req.pages)
            req.pages = []

    def abort(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None and not req.finished:
            req.output_token_ids = req.ready_output_token_ids
            req.pending_slot = None
            self.scheduler.finish(req, "abort")
            req.finish_time = time.perf_counter()
        elif req is not None and req.pages:  # a prefill-only request still holding its KV
            self.pool.free(req.pages)
            req.pages = []

    @property
    def grammars(self):
        if self._grammars is None:
            if self._grammars_factory is None:
                raise ValueError("structured output (json_schema) needs the model's tokenizer; this engine has none")
            try:
                self._grammars = self._grammars_factory()
            except ImportError as e:
                raise ValueError(f"structured output needs llguidance (pip install llguidance): {e}") from None
        return self._grammars

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self._in_flight is not None

    # -- stepping -----------------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """Dispatch one batch and complete the one before it (async scheduling; without it, complete this
        one). Returns the requests that got a new token (finished ones included). A request with a grammar
        needs its last token on the host to mask the next one, so then the step in flight completes first."""
        early = []
        if self._in_flight is not None and any(r.grammar is not None for r in self.scheduler.running):
            early = self._complete_in_flight()
        return early + self._step()

    def _step(self) -> list[Request]:
        batch = self.scheduler.schedule()
        if not batch.entries:
            if self._in_flight is not None:
                return self._complete_in_flight()
            if self.scheduler.waiting and not self.scheduler.running:
                req = self.scheduler.waiting[0]
                raise Unschedulable(req.request_id, f"request {req.request_id} cannot be scheduled: the KV pool "
                                                    f"has {self.pool.num_free_pages()} free pages")
            return []
        if batch.sequence_parallel:  # a synchronous step of its own
            done = self._complete_in_flight()
            tokens = self.sp.run(batch)
            return done + self._complete(self._advance(batch), tokens)
        trace = self.step_trace
        t0 = time.time() if trace is not None else 0.0
        tokens = self.runner.dispatch(batch)  # reads the requests' progress: before `_advance`
        if trace is not None:
            trace("dispatch", t0=t0, entries=[[req.request_id, n, req.num_computed] for req, n in batch.entries])
        samples = self._advance(batch)
        done = self._complete_in_flight()
        self._in_flight = (samples, tokens)
        if not self.config.async_scheduling:
            done += self._complete_in_flight()
        return done

    def sync(self) -> list[Request]:
        """Wait for the step in flight (if any) and complete it; returns the requests it updated."""
        return self._complete_in_flight()

    def _advance(self, batch) -> list[tuple[Request, int, int]]:
        """Host bookkeeping of a dispatched step, before its samples are known: progress, and a PENDING output
        for every entry that reaches its end. Returns (request, output index, slot) of those samples."""
        self.num_steps += 1
        samples = []
        for slot, (req, n) in enumerate(batch.entries):
            if not (n == 1 and req.output_token_ids and req.num_uncomputed == 1):  # not a plain decode
                self.num_prefill_tokens_computed += n
            req.num_computed += n
            self.scheduler.index_computed_pages(req)  # pages are usable once this step ran: device order
            if req.num_computed < req.num_tokens:
                continue  # a prefill chunk: no token yet
            req.output_token_ids.append(PENDING)
            req.pending_slot = slot
            samples.append((req, len(req.output_token_ids) - 1, slot))
            if req.prefill_only or len(req.output_token_ids) >= req.params.max_tokens \
                    or req.num_tokens >= req.max_total_len:
                req.finishing = True  # stops after this token whatever it is: not scheduled again
        return samples

    def _complete_in_flight(self) -> list[Request]:
        if self._in_flight is None:
            return []
        samples, tokens = self._in_flight
        self._in_flight = None
        if isinstance(tokens, tuple):  # the extended sampler: (tokens, sampled logprob, top ids, top logprobs)
            return self._complete(samples, np.asarray(tokens[0]), [np.asarray(t) for t in tokens[1:]])
        return self._complete(samples, np.asarray(tokens))

    def _complete(self, samples, tokens, logprobs=None) -> list[Request]:
        """Fill in a step's samples (and their logprobs), index what is now known, and apply stop
        conditions."""
        now = time.perf_counter()
        updated, first = [], []
        for req, index, slot in samples:
            if req.finished:
                continue  # aborted while its step ran
            tok = int(tokens[slot])
            req.output_token_ids[index] = tok
            k = req.params.logprobs
            if k is not None and logprobs is not None:
                lp, top_ids, top_lp = logprobs
                req.logprobs[index] = (float(lp[slot]), [(int(top_ids[slot, j]), float(top_lp[slot, j]))
                                                         for j in range(k)])
            if index == len(req.output_token_ids) - 1:
                req.pending_slot = None
            if req.status is Status.RUNNING:
                self.scheduler.index_computed_pages(req)
            if req.first_token_time is None:
                req.first_token_time = now
                first.append(req.request_id)
            reason = self._stop_reason(req, tok, index + 1)
            if reason:
                del req.output_token_ids[index + 1:]  # a sample of the step after, not wanted
                req.pending_slot = None
                self.scheduler.finish(req, reason)
                req.finish_time = now
            elif req.prefill_only:
                self.scheduler.hold(req)
            updated.append(req)
        if first and self.step_trace is not None:
            self.step_trace("first_token", request_ids=first)
        return updated

    def _stop_reason(self, req: Request, tok: int, num_outputs: int) -> str | None:
        """Why `req` stops at output `tok`, its `num_outputs`-th (None: it goes on)."""
        p = req.params
        if num_outputs < p.min_tokens:  # as vLLM: no stop condition but the length before min_tokens
            return "length" if len(req.prompt_token_ids) + num_outputs >= req.max_total_len else None
        if tok in p.stop_token_ids:
            req.stop_reason = tok
            return "stop"
        if not p.ignore_eos and tok in self.eos_token_ids:
            return "stop"
        if p.stop and self.detokenize is not None:
            text = self.detokenize(req.output_token_ids[:num_outputs])
            found = None  # (start, stop string) of the earliest match
            for s in p.stop:
                at = text.find(s, max(0, len(req.text) - len(s)))
                if at >= 0 and (found is None or at < found[0]):
                    found = (at, s)
            req.text = text
            if found is not None:
                req.stop_reason = found[1]
                req.stop_text_len = found[0] + (len(found[1]) if p.include_stop_str_in_output else 0)
                return "stop"
        if num_outputs >= p.max_tokens or len(req.prompt_token_ids) + num_outputs >= req.max_total_len:
            return "length"
        return None

    def stats(self) -> dict:
        s = dict(self.pool.stats())
        s.update(num_preemptions=self.scheduler.num_preemptions, num_steps=self.num_steps,
                 num_compilations=self.runner.num_compilations,
                 num_prefill_tokens_computed=self.num_prefill_tokens_computed,
                 num_deferred_for_shared_prefix=self.scheduler.num_deferred_for_shared_prefix,
                 num_sequence_parallel_prefills=self.sp.num_prefills if self.sp is not None else 0)
        return s
