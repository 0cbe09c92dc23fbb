"""Offline API in the manner of vLLM's `LLM`: load a model, generate for a list of prompts."""

from __future__ import annotations

import dataclasses
import os
import time

from jaxserve.cache_salt import check_salt
from jaxserve.config import CacheConfig, EngineConfig, MeshConfig, ModelConfig, SchedulerConfig
from jaxserve.engine.engine import Engine
from jaxserve.engine.outputs import CompletionOutput, RequestOutput, token_logprobs
from jaxserve.engine.sampling import SamplingParams


def enable_compilation_cache(path: str | None = None) -> None:
    """JAX's persistent compilation cache: a restarted server skips recompiling the buckets it has seen."""
    import jax
    path = path or os.environ.get("JAXSERVE_COMPILATION_CACHE",
                                  os.path.join(os.path.expanduser("~"), ".cache", "jaxserve", "xla"))
    if not path or path == "off":
        return
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


_PROMPT_KEYS = {"prompt", "prompt_token_ids", "cache_salt"}


def _salt(prompt) -> str:
    """A prompt dict's `cache_salt` (vLLM's TextPrompt / TokensPrompt), else no salt."""
    if not isinstance(prompt, dict):
        return ""
    salt = prompt.get("cache_salt") or ""
    check_salt(salt)
    return salt


def _prompt(prompt):
    """A prompt dict's text or token ids; other prompts as given."""
    if not isinstance(prompt, dict):
        return prompt
    unknown = set(prompt) - _PROMPT_KEYS
    if unknown or ("prompt" in prompt) == ("prompt_token_ids" in prompt):
        raise ValueError(f"a prompt dict has exactly one of 'prompt' (text) or 'prompt_token_ids', and "
                         f"optionally 'cache_salt'; got keys {sorted(prompt)}")
    return prompt["prompt"] if "prompt" in prompt else prompt["prompt_token_ids"]


class LLM:
    """`LLM(model="demo" | HF folder | Orbax folder | ModelConfig (random weights), ...)`. `ops`: the device-op
    channel of a multi-process instance's process (`jaxserve.engine.multihost.connect`), given to the Engine.
    `kv_cache_dtype`: "auto" (the model's dtype) | "fp8_e4m3" | "fp8_e5m2" | "int8" (per-token, per-KV-head scales,
    jaxserve/kernels/kv_quant.py); `kv_cache_memory_bytes` / `host_kv_gib`: size the device / host tiers
    in bytes instead of `num_pages` / `num_host_pages` (8-bit pages are ~2x as many as bf16, ~4x f32)."""

    def __init__(self, model="demo", *, page_size: int = 16, num_pages: int = 512, num_host_pages: int = 0,
                 enable_prefix_caching: bool = True, max_num_batched_tokens: int = 256, max_num_seqs: int = 32,
                 enable_chunked_prefill: bool = True, cut_padding: bool = True, tp: int = 1, device_ids=None,
                 attention_impl: str = "auto",
                 max_model_len: int | None = None, dtype: str | None = None, seed: int = 0,
                 compilation_cache: str | None = None, disaggregated: bool = False, prefill_devices=None,
                 decode_devices=None, prefill_tp: int | None = None, decode_tp: int | None = None,
                 pd_mode: str = "basic", sequence_parallel: int = 1, sp_threshold: int = 512, ep: int = 1,
                 async_scheduling: bool = True, ops=None, kv_cache_dtype: str = "auto",
                 kv_cache_memory_bytes: int | None = None, host_kv_gib: float | None = None):
        from jaxserve import model as model_lib
        enable_compilation_cache(compilation_cache)
        if isinstance(model, ModelConfig):
            import jax
            from jaxserve.model.decoder import init_params
            from jaxserve.model.tokenizer import ByteTokenizer
            cfg = model if dtype is None else dataclasses.replace(model, dtype=dtype)
            params, tokenizer = init_params(cfg, jax.random.PRNGKey(seed)), ByteTokenizer()
        else:
            cfg, params, tokenizer = model_lib.load(model, dtype=dtype)
        self.model_config = cfg
        self.model_path = None if isinstance(model, ModelConfig) else str(model)
        self.tokenizer = tokenizer
        kv_host_memory_bytes = None
        if host_kv_gib is not None:  # the host tier from a byte budget, at the pool's page size (scales included)
            if num_host_pages:
                raise ValueError(f"give num_host_pages ({num_host_pages}) or host_kv_gib ({host_kv_gib}), not both")
            if host_kv_gib < 0:
                raise ValueError(f"host_kv_gib must be >= 0, got {host_kv_gib}")
            kv_host_memory_bytes = int(host_kv_gib * 2**30) or None
        def engine_config(caching, tp, device_ids, seq=1, ep_=1):
            return EngineConfig(
                cache=CacheConfig(page_size=page_size, num_pages=num_pages, num_host_pages=num_host_pages,
                                  enable_prefix_caching=caching, kv_cache_dtype=kv_cache_dtype,
                                  memory_bytes=kv_cache_memory_bytes, host_memory_bytes=kv_host_memory_bytes),
                scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens,
                                          max_num_seqs=max_num_seqs, enable_chunked_prefill=enable_chunked_prefill,
                                          cut_padding=cut_padding),
                mesh=MeshConfig(tp=tp, seq=seq, ep=ep_, device_ids=tuple(device_ids) if device_ids else None),
                attention_impl=attention_impl, max_model_len=max_model_len, seed=seed, sp_threshold=sp_threshold,
                async_scheduling=async_scheduling)

        eos = tuple(cfg.eos_token_id) or tuple(getattr(tokenizer, "eos_token_ids", ()) or ())

        def grammars():
            from jaxserve.engine.structured import Grammars
            return Grammars(tokenizer, cfg.vocab_size, eos)
        self.pair = None
        if not disaggregated:
            self.engine = Engine(cfg, params,
                                 engine_config(enable_prefix_caching, tp, device_ids, sequence_parallel, ep),
                                 eos_token_ids=eos, detokenize=tokenizer.decode, ops=ops, grammars=grammars)
            return
        if ops is not None:
            raise ValueError("a device-op channel (multi-process instance) serves one engine, not a disaggregated pair")
        # Disaggregated: prefill and decode engines on disjoint meshes; caching per PD mode (DESIGN §2).
        from jaxserve.engine.disagg import DisaggregatedPair, mode_caching
        import jax
        n_dev = len(jax.devices())
        prefill_devices = list(prefill_devices if prefill_devices is not None else range(n_dev // 2))
        decode_devices = list(decode_devices if decode_devices is not None else range(n_dev // 2, n_dev))
        p_cache, d_cache = mode_caching(pd_mode)

        def pick_tp(tp_, devices, seq=1):
            if tp_ is None:  # the largest degree the devices and the KV heads allow
                tp_ = max(t for t in range(1, max(len(devices) // (seq * ep), 1) + 1) if cfg.num_kv_heads % t == 0)
            if tp_ * seq * ep > len(devices):
                raise ValueError(f"seq={seq} x ep={ep} x tp={tp_} needs {seq * ep * tp_} devices but "
                                 f"{len(devices)} were given: {devices}")
            return tp_, devices[:tp_ * seq * ep]

        shared = sorted(set(prefill_devices) & set(decode_devices))
        if shared:
            raise ValueError(f"prefill and decode meshes share devices {shared}")
        # Sequence parallelism applies to the prefill side (the decode engine never prefills long prompts).
        ptp, pdev = pick_tp(prefill_tp, prefill_devices, sequence_parallel)
        dtp, ddev = pick_tp(decode_tp, decode_devices)
        prefill = Engine(cfg, params, engine_config(p_cache, ptp, pdev, sequence_parallel, ep), eos_token_ids=eos,
                         detokenize=tokenizer.decode, grammars=grammars)
        decode = Engine(cfg, params, engine_config(d_cache, dtp, ddev, 1, ep), eos_token_ids=eos,
                        detokenize=tokenizer.decode, grammars=grammars)
        self.pair = DisaggregatedPair(prefill, decode, pd_mode)
        self.engine = decode

    def encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 ) -> list[RequestOutput]:
        """One RequestOutput per prompt; `SamplingParams(n=k)` gives it k outputs (with a seed s, output j
        samples with seed s + j, as the HTTP front does; without one each draws its own seed)."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        salts = [_salt(p) for p in prompts]
        prompts = [_prompt(p) for p in prompts]
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        encoded = [self.encode(p) for p in prompts]
        for toks, sp in zip(encoded, params):  # validate all before queueing any
            self.engine.validate(toks, sp)
        flat = []  # (prompt index, engine params) per sample
        for i, sp in enumerate(params):
            for j in range(sp.n):
                seed = sp.seed if sp.seed is None else (sp.seed + j) % 2**32
                flat.append((i, sp if j == 0 else dataclasses.replace(sp, seed=seed)))
        if self.pair is not None:
            reqs = [self.pair.add_request(encoded[i], sp, cache_salt=salts[i]) for i, sp in flat]
            while any(not r.finished for r in reqs):
                self.pair.step()
            self.pair.prefill.sync()
            self.pair.decode.sync()
        else:
            reqs = [self.engine.add_request(encoded[i], sp, cache_salt=salts[i]) for i, sp in flat]
            while any(not r.finished for r in reqs):
                self.engine.step()
            self.engine.sync()  # a step dispatched before the last stop was seen: its samples are discarded
        grouped: list[list] = [[] for _ in prompts]
        for (i, _), r in zip(flat, reqs):
            grouped[i].append(r)
        return [self._output(group, p if isinstance(p, str) else None) for group, p in zip(grouped, prompts)]

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None, *,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """vLLM's `LLM.chat`: one conversation (a list of {"role", "content"} dicts) or a list of them, rendered
        with the model's chat template (the same one the HTTP front uses; the demo model has the plain one)."""
        if messages and isinstance(messages[0], dict):
            messages = [messages]
        template = self._chat_template(chat_template)
        prompts = []
        bos = getattr(self.tokenizer, "bos_token_id", None)
        for m in messages:
            ids = self.encode(template.render(list(m), add_generation_prompt, **(chat_template_kwargs or {})))
            if bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
                ids = ids[1:]  # the template wrote BOS and the tokenizer added another (as the HTTP front)
            prompts.append(ids)
        return self.generate(prompts, sampling_params)

    def _chat_template(self, override: str | None):
        from jaxserve.scheduler.chat_template import ChatTemplate, load_template, special_token
        from jaxserve.util import resolve_model_path
        folder = resolve_model_path(self.model_path) if self.model_path else None
        folder = folder if folder is not None and folder.is_dir() else None
        return ChatTemplate(load_template(folder, override), special_token(folder, "bos_token"),
                            special_token(folder, "eos_token"))

    def _output(self, reqs, prompt: str | None) -> RequestOutput:
        completions = []
        for j, req in enumerate(reqs):
            self.engine.requests.pop(req.request_id, None)
            logprobs, cumulative = token_logprobs(req, self.tokenizer.decode)
            completions.append(CompletionOutput(index=j, text=self._text(req), token_ids=list(req.output_token_ids),
                                                cumulative_logprob=cumulative, logprobs=logprobs,
                                                finish_reason=req.finish_reason, stop_reason=req.stop_reason))
        req, first = reqs[0], completions[0]
        common = dict(request_id=req.request_id, prompt_token_ids=req.prompt_token_ids, token_ids=first.token_ids,
                      text=first.text, num_prompt_tokens=len(req.prompt_token_ids),
                      e2e_s=(req.finish_time or time.perf_counter()) - req.arrival_time,
                      finish_reason=req.finish_reason, outputs=completions, prompt=prompt,
                      stop_reason=req.stop_reason)
        if self.pair is not None:  # a DisaggRequest
            p = req.prefill
            first_at = req.first_token_time or time.perf_counter()
            return RequestOutput(
                **common, num_cached_tokens=p.num_cached_tokens, ttft_s=first_at - req.arrival_time,
                num_preemptions=(req.decode or p).num_preemptions,  # the decode side starts from the prefill's
                error=req.error, transferred_tokens=req.transferred_tokens, returned_tokens=req.returned_tokens)
        return RequestOutput(**common, num_cached_tokens=req.num_cached_tokens,
                             ttft_s=req.first_token_time - req.arrival_time, num_preemptions=req.num_preemptions)

    def _text(self, req) -> str:
        ids = req.output_token_ids
        eos = set(req.params.stop_token_ids) | (set() if req.params.ignore_eos else set(self.engine.eos_token_ids))
        if req.finish_reason == "stop" and ids and ids[-1] in eos and not req.params.include_stop_str_in_output:
            ids = ids[:-1]  # the stop token itself is not part of the text (vLLM)
        text = self.tokenizer.decode(ids)
        if req.stop_text_len is not None:
            text = text[:req.stop_text_len]
        return text

    def stats(self) -> dict:
        return self.engine.stats() if self.pair is None else self.pair.stats()
