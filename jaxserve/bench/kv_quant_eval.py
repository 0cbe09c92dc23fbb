"""How close a quantized KV cache keeps a model to its unquantized self (issue 19): greedy agreement and log-prob
drift, measured against the plain `kv_cache_dtype="auto"` run of the same weights.

- free-running: each dtype generates greedily; `prefix_agreement` is the share of generated tokens before the
  first one that differs from the reference (1.0: identical), `token_agreement` the share equal position by
  position;
- teacher-forced: the reference sequence (prompt + reference output) runs through the quantized model in one
  paged prefill step (every query reads quantized K/V, its own included, as in decode); `forced_agreement` is
  the share of output positions whose argmax is the reference token, `mean_abs_logprob_diff` the mean
  |log p_quant(ref token) - log p_auto(ref token)| over those positions.
"""

from __future__ import annotations

import dataclasses
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig


def random_hf_llama(folder: str, *, seed: int = 0, layers: int = 2, hidden: int = 128, heads: int = 4,
                    kv_heads: int = 2, vocab: int = 512, init: float = 0.1) -> str:
    """A random-weight Llama saved as a Hugging Face checkpoint (torch), with weights large enough (`init`)
    that greedy choices are not near-ties; plus a byte tokenizer. Returns the folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from jaxserve.tokenizer import ByteTokenizer
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                      initializer_range=init, rms_norm_eps=1e-6, tie_word_embeddings=False, torch_dtype="float32")
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder, safe_serialization=True)
    ByteTokenizer(vocab_size=vocab).save(folder)
    return folder


def generate(llm, prompts, max_tokens: int) -> list[list[int]]:
    from jaxserve.engine.sampling import SamplingParams
    outs = llm.generate([list(p) for p in prompts], SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                   ignore_eos=True))
    return [list(o.token_ids) for o in outs]


def forced_logprobs(model_config: ModelConfig, params, sequence, kv_cache_dtype: str, page_size: int = 16):
    """log-softmax f32[len(sequence), vocab] of one sequence run as one paged prefill step with the cache
    stored as `kv_cache_dtype` (row t: the distribution of token t + 1)."""
    from jaxserve.engine.engine import kv_storage_dtype
    from jaxserve.mempool.kv_store import storage_dtype
    from jaxserve.config import CacheConfig
    from jaxserve.model import kv_cache_shape, make_attention_batch, make_paged_forward
    cfg = dataclasses.replace(model_config, kv_cache_dtype=kv_cache_dtype)
    n = len(sequence)
    pages = -(-n // page_size)
    batch, positions = make_attention_batch([n], [n], [list(range(1, pages + 1))], page_size=page_size)
    dtype = storage_dtype(CacheConfig(page_size=page_size, kv_cache_dtype=kv_cache_dtype), kv_storage_dtype(cfg))
    cache = jnp.zeros(kv_cache_shape(cfg, pages + 1, page_size), dtype)
    step = make_paged_forward(cfg, decode_only=False, donate_cache=False)
    logits, _ = step(params, jnp.asarray(sequence, jnp.int32), jnp.asarray(positions), cache,
                     jax.tree.map(jnp.asarray, batch), jnp.arange(n, dtype=jnp.int32))
    return np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))


@dataclasses.dataclass
class Agreement:
    kv_cache_dtype: str
    prompts: int
    tokens: int                    # generated tokens per prompt
    prefix_agreement: float        # free-running: share of tokens before the first divergence
    token_agreement: float         # free-running: share equal position by position
    identical_prompts: int         # free-running: outputs equal to the reference's
    forced_agreement: float        # teacher-forced argmax == reference token
    mean_abs_logprob_diff: float   # teacher-forced |log p(ref token)| difference, nats


def agreement(llm_factory, model_config: ModelConfig, params, prompts, max_tokens: int,
              dtypes=("fp8_e4m3", "fp8_e5m2", "int8"), page_size: int = 16) -> tuple[list[list[int]], list[Agreement]]:
    """`llm_factory(kv_cache_dtype)` -> an LLM on the same weights. Returns the reference outputs and one
    Agreement per quantized dtype."""
    reference = generate(llm_factory("auto"), prompts, max_tokens)
    ref_lp = [forced_logprobs(model_config, params, list(p) + r, "auto", page_size) for p, r in zip(prompts, reference)]
    results = []
    for kvd in dtypes:
        outs = generate(llm_factory(kvd), prompts, max_tokens)
        prefix, same, forced, dlp = [], [], [], []
        for p, r, o, lp_ref in zip(prompts, reference, outs, ref_lp):
            diverge = next((i for i, (a, b) in enumerate(zip(r, o)) if a != b), len(r))
            prefix.append(diverge / len(r))
            same.append(np.mean(np.asarray(r) == np.asarray(o)))
            lp = forced_logprobs(model_config, params, list(p) + r, kvd, page_size)
            rows = np.arange(len(p) - 1, len(p) + len(r) - 1)  # row t predicts token t + 1
            forced.append(np.mean(lp[rows].argmax(-1) == np.asarray(r)))
            dlp.append(np.mean(np.abs(lp[rows, r] - lp_ref[rows, r])))
        results.append(Agreement(kvd, len(prompts), max_tokens, float(np.mean(prefix)), float(np.mean(same)),
                                 int(sum(s == 1.0 for s in same)), float(np.mean(forced)), float(np.mean(dlp))))
    return reference, results


def scale_scheme_errors(kv: np.ndarray) -> dict:
    """Relative RMS error of real K/V rows `kv` [layers, pages, page_size, 2*Hkv, D] (f32, pages in use)
    quantized under four scale schemes, per format: per token and head (ours), one per-tensor scale of 1.0
    (vLLM's fp8 default without calibration), per (layer, page, head) fixed at the page's first token (a page
    written token by token without re-quantizing), per (layer, page, head) from the whole page."""
    from jaxserve.kernels import kv_quant
    x = np.asarray(kv, np.float32)
    out = {}
    for fmt, (value_dtype, qmax) in kv_quant._FORMATS.items():
        def q(y):
            y = np.clip(np.asarray(y, np.float32), -qmax, qmax)
            if fmt == "int8":
                return np.round(y)
            return np.asarray(jnp.asarray(y).astype(value_dtype).astype(jnp.float32))

        def err(scale):
            scale = np.maximum(scale, 1e-30)
            return float(np.sqrt(((q(x / scale) * scale - x) ** 2).sum() / (x ** 2).sum()))
        out[fmt] = dict(per_token=err(np.abs(x).max(-1, keepdims=True) / qmax), per_tensor_1=err(np.ones(1)),
                        page_first_token=err(np.abs(x[:, :, :1]).max(-1, keepdims=True) / qmax),
                        page_whole=err(np.abs(x).max(axis=(2, 4), keepdims=True) / qmax))
    return out


def demo_kv_rows(n_prompts: int = 4, prompt_len: int = 60, new_tokens: int = 30) -> np.ndarray:
    """The demo model's K/V after a few greedy requests (unquantized pool): the pages in use."""
    from jaxserve.engine.llm import LLM
    llm = LLM("demo", num_pages=64)
    rng = np.random.default_rng(0)
    generate(llm, [rng.integers(1, 250, prompt_len).tolist() for _ in range(n_prompts)], new_tokens)
    kv = np.asarray(llm.engine.pool.kv_cache, np.float32)
    used = [p for p in range(1, kv.shape[1]) if np.abs(kv[:, p]).sum() > 0]
    return kv[:, used]


def random_prompts(rng, n: int, vocab: int, lo: int = 8, hi: int = 40) -> list[list[int]]:
    return [rng.integers(1, vocab, int(rng.integers(lo, hi))).tolist() for _ in range(n)]


def hf_agreement(n_prompts: int, max_tokens: int, seed: int = 0, **llm_kwargs):
    """Agreement on a fresh random HF checkpoint (see `random_hf_llama`)."""
    from jaxserve import model as model_lib
    from jaxserve.engine.llm import LLM
    with tempfile.TemporaryDirectory() as folder:
        random_hf_llama(folder, seed=seed)
        cfg, params, _ = model_lib.load(folder)
        prompts = random_prompts(np.random.default_rng(seed), n_prompts, cfg.vocab_size)
        return agreement(lambda kvd: LLM(folder, kv_cache_dtype=kvd, **llm_kwargs), cfg, params, prompts,
                         max_tokens)
