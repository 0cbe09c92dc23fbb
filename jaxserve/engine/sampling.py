"""Sampling parameters (validated on construction) and the on-device sampler.

Each request draws its randomness from `fold_in(PRNGKey(seed), output_index)`, so a token depends only on the
request's own seed, logits and position: not on which requests share the batch, nor on preemption."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


MAX_LOGPROBS = 20  # top alternatives per token, as OpenAI and vLLM allow


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling, with vLLM's meanings. Defaults differ from vLLM's in one place: temperature 0
    (greedy) rather than 1.0, because the engine, the benchmarks and the equality tests rely on it."""
    max_tokens: int = 16
    temperature: float = 0.0          # 0 = greedy
    top_k: int = -1                   # -1 = all tokens
    top_p: float = 1.0                # (0, 1]
    seed: int | None = None           # None: derived from the engine seed and the request's arrival order
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()        # stop strings; the output text ends before the first one found
    ignore_eos: bool = False
    # vLLM's extras. Any of them set sends the batch through the extended sampler (sample_extended).
    logprobs: int | None = None       # None: none; k in [0, 20]: the sampled token's logprob and the top k
    presence_penalty: float = 0.0     # [-2, 2], subtracted once from every token already in the output
    frequency_penalty: float = 0.0    # [-2, 2], subtracted per occurrence in the output
    repetition_penalty: float = 1.0   # > 0; tokens in prompt or output: positive logits / p, negative * p
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to the logits; bias in [-100, 100]
    min_p: float = 0.0                # [0, 1]: drop tokens whose probability < min_p * the top probability
    min_tokens: int = 0               # EOS and stop_token_ids are masked (and stop strings ignored) until then
    include_stop_str_in_output: bool = False
    n: int = 1                        # offline API: samples per prompt (LLM.generate)
    json_schema: str | None = None    # structured output: the text is a JSON document valid against it

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
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be greater than 0, got {self.repetition_penalty}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], "
                             f"got {self.min_tokens!r}")
        if self.json_schema is not None and not isinstance(self.json_schema, str):
            raise ValueError(f"json_schema must be the schema as a JSON string, got {type(self.json_schema)}")
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n!r}")
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        pairs = {}
        for tok, b in bias:
            try:
                tok = int(tok)
            except (TypeError, ValueError):
                raise ValueError(f"logit_bias keys must be token ids, got {tok!r}") from None
            # Clamped as OpenAI documents ("values between -100 and 100"), as vLLM does.
            pairs[tok] = min(max(float(b), -100.0), 100.0)
        object.__setattr__(self, "logit_bias", tuple(sorted(pairs.items())))

    @property
    def extended(self) -> bool:
        """Whether this request needs the extended sampler (anything beyond temperature/top-k/top-p)."""
        return (self.logprobs is not None or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0 or bool(self.logit_bias) or self.min_p > 0.0
                or self.min_tokens > 0 or self.json_schema is not None)


def greedy_tokens(logits: jax.Array) -> jax.Array:
    """logits [S, V] -> i32[S]: each row's first index of its maximum (a NaN counts as the maximum), as
    `jnp.argmax`. Two plain reductions instead of argmax's (value, index) one, which XLA:CPU runs as a scalar
    loop: 32 x 8192 f32 0.74 -> 0.27 ms, 128 rows 2.4 -> 0.6 ms (`bench_cpu_ops`)."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.min(jnp.where((logits == top) | jnp.isnan(logits), ids, logits.shape[-1]), axis=-1)


def sample_tokens(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
                  seeds: jax.Array, output_index: jax.Array, min_p: jax.Array | None = None) -> jax.Array:
    """logits f32[S, V]; per-row temperature f32[S], top_k i32[S] (-1 off), top_p f32[S], seeds u32[S],
    output_index i32[S], optionally min_p f32[S] -> token ids i32[S]. Rows with temperature 0 take the
    argmax."""
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    greedy = greedy_tokens(logits)
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
        if min_p is not None:  # p < min_p * p_max  <=>  logit < max logit + log(min_p) (log 0 = -inf: keep all)
            floor = jnp.max(scaled, axis=-1, keepdims=True) + jnp.log(min_p)[:, None]
            scaled = jnp.where(scaled >= floor, scaled, -jnp.inf)
        masked = jax.lax.cond(filtering, filtered, lambda x: x, scaled)
        return jnp.where(sampling, jax.vmap(draw)(masked, seeds, output_index).astype(jnp.int32), greedy)

    return jax.lax.cond(jnp.any(sampling), sample, lambda _: greedy, None)


def sample_extended(logits: jax.Array, sampling: dict, extra: dict, fed: jax.Array, fed_pending: jax.Array):
    """The sampler with vLLM's extras (see `sampling_extras` for `extra`). fed i32[S]: each row's last input
    token; fed_pending bool[S]: it is an output token the host did not know yet (async scheduling), so it is
    counted here. Order: logit bias and min_tokens mask, then repetition, frequency and presence penalties
    (greedy takes the argmax of the result), then temperature, min_p, top-k/top-p. Logprobs are those of
    the raw model output (vLLM's default "raw_logprobs"). Returns (tokens i32[S], (sampled logprob f32[S],
    top ids i32[S, 20], top logprobs f32[S, 20]))."""
    raw = logits.astype(jnp.float32)
    vocab = raw.shape[-1]
    fed_hot = (jnp.arange(vocab)[None, :] == fed[:, None]) & fed_pending[:, None]
    counts = extra["counts"] + fed_hot.astype(jnp.int32)
    in_output = counts > 0
    rep = extra["repetition"][:, None]
    x = raw + extra["bias"]
    x = jnp.where(extra["prompt_mask"] | in_output, jnp.where(x > 0, x / rep, x * rep), x)
    x = x - extra["frequency"][:, None] * counts - extra["presence"][:, None] * in_output
    tokens = sample_tokens(x, **sampling, min_p=extra["min_p"])
    lp = jax.nn.log_softmax(raw, axis=-1)
    top_lp, top_ids = jax.lax.top_k(lp, min(MAX_LOGPROBS, vocab))
    tok_lp = jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0]
    return tokens, (tok_lp, top_ids.astype(jnp.int32), top_lp)


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


def sampling_extras(reqs: list, size: int, vocab: int, eos_token_ids=()) -> dict[str, np.ndarray] | None:
    """Host-side inputs of `sample_extended` for a step's requests (engine.request.Request), padded to `size`
    rows; None when no request needs them (the plain sampler runs, and no [S, V] array is built or sent).
    counts/prompt_mask cover the tokens known on the host; the step adds a still-pending fed token."""
    if not any(r.params.extended for r in reqs):
        return None
    bias = np.zeros((size, vocab), np.float32)
    counts = np.zeros((size, vocab), np.int32)
    prompt_mask = np.zeros((size, vocab), bool)
    presence = np.zeros(size, np.float32)
    frequency = np.zeros(size, np.float32)
    repetition = np.ones(size, np.float32)
    min_p = np.zeros(size, np.float32)
    for i, r in enumerate(reqs):
        p = r.params
        if not p.extended:
            continue
        if r.grammar is not None:  # every output is on the host: the engine synced for this step
            r.grammar.advance(r.ready_output_token_ids)
            r.grammar.apply(bias[i])
        for tok, b in p.logit_bias:
            if 0 <= tok < vocab:
                bias[i, tok] += b
        if len(r.output_token_ids) < p.min_tokens:  # the token sampled now is output number len(...)
            stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
            bias[i, [t for t in stops if 0 <= t < vocab]] = -np.inf
        if p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0:
            np.add.at(counts[i], np.asarray(r.ready_output_token_ids, np.int64), 1)
            prompt_mask[i, np.asarray(r.prompt_token_ids, np.int64)] = True
        presence[i], frequency[i] = p.presence_penalty, p.frequency_penalty
        repetition[i], min_p[i] = p.repetition_penalty, p.min_p
    return dict(bias=bias, counts=counts, prompt_mask=prompt_mask, presence=presence, frequency=frequency,
                repetition=repetition, min_p=min_p)


def neutral_extras(size: int, vocab: int) -> dict[str, np.ndarray]:
    """`sampling_extras` of rows that change nothing: for precompiling the extended sampler's executables
    (StepInputs(..., extra=neutral_extras(S, V)) has the key of the plain shape + ("extended",))."""
    return dict(bias=np.zeros((size, vocab), np.float32), counts=np.zeros((size, vocab), np.int32),
                prompt_mask=np.zeros((size, vocab), bool), presence=np.zeros(size, np.float32),
                frequency=np.zeros(size, np.float32), repetition=np.ones(size, np.float32),
                min_p=np.zeros(size, np.float32))
