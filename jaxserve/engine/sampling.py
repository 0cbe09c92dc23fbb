"""Sampling parameters (validated on construction) and the on-device sampler.

Each request draws its randomness from `fold_in(PRNGKey(seed), output_index)`, so a token depends only on the
request's own seed, logits and position: not on which requests share the batch, nor on preemption."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0          # 0 = greedy
    top_k: int = -1                   # -1 = all tokens
    top_p: float = 1.0                # (0, 1]
    seed: int | None = None           # None: derived from the engine seed and the request's arrival order
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()        # stop strings; the output text ends before the first one found
    ignore_eos: bool = False

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1 or self.top_k == 0:
            raise ValueError(f"top_k must be -1 (disable) or at least 1, got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        object.__setattr__(self, "stop", stop)


def sample_tokens(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
                  seeds: jax.Array, output_index: jax.Array) -> jax.Array:
    """logits f32[S, V]; per-row temperature f32[S], top_k i32[S] (-1 off), top_p f32[S], seeds u32[S],
    output_index i32[S] -> token ids i32[S]. Rows with temperature 0 take the argmax."""
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampling = temperature > 0
    # A full-vocabulary sort costs far more than the model step on CPU (32 x 32k rows: ~0.3 s), so each stage
    # runs only when some row in the batch needs it.
    filtering = jnp.any(sampling & ((top_k > 0) | (top_p < 1.0)))

    def filtered(scaled):
        sorted_desc = -jnp.sort(-scaled, axis=-1)
        k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
        kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
        ranked = jnp.where(jnp.arange(vocab)[None, :] < k[:, None], sorted_desc, -jnp.inf)
        probs = jax.nn.softmax(ranked, axis=-1)
        # Keep the smallest set of top tokens whose mass reaches top_p (the first token always stays).
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]
        pth = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)
        return jnp.where(scaled >= jnp.maximum(kth, pth), scaled, -jnp.inf)

    def draw(row, seed, idx):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), idx)
        return jax.random.categorical(key, row)

    def sample(_):
        scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
        masked = jax.lax.cond(filtering, filtered, lambda x: x, scaled)
        return jnp.where(sampling, jax.vmap(draw)(masked, seeds, output_index).astype(jnp.int32), greedy)

    return jax.lax.cond(jnp.any(sampling), sample, lambda _: greedy, None)


def sampling_arrays(params: list[SamplingParams | None], seeds: list[int], output_index: list[int],
                    size: int) -> dict[str, np.ndarray]:
    """Host-side per-row sampling inputs padded to `size` rows (padding rows are greedy)."""
    temp = np.zeros(size, np.float32)
    top_k = np.full(size, -1, np.int32)
    top_p = np.ones(size, np.float32)
    seed = np.zeros(size, np.uint32)
    idx = np.zeros(size, np.int32)
    for i, p in enumerate(params):
        if p is None:
            continue
        temp[i], top_k[i], top_p[i] = p.temperature, p.top_k, p.top_p
        seed[i], idx[i] = seeds[i], output_index[i]
    return dict(temperature=temp, top_k=top_k, top_p=top_p, seeds=seed, output_index=idx)
