"""Token-count buckets of mixed engine steps, and where to cut a prefill chunk so a step pads little.

Jax-free: the engine's scheduler decides chunk sizes with the same buckets the model runner pads to."""

from __future__ import annotations

import functools

from jaxserve.util import next_pow2

MIN_TOKEN_BUCKET = 32


def token_bucket(n: int, minimum: int = MIN_TOKEN_BUCKET) -> int:
    """Padded token count of a mixed step: powers of two up to 128, then also 1.5x steps (192, 384, 768, ...),
    so a long prefill chunk pads by at most a third instead of up to double (544 tokens: 768, not 1024)."""
    pow2 = next_pow2(n, minimum)
    three_halves = 3 * pow2 // 4
    return three_halves if pow2 > 128 and n <= three_halves else pow2


@functools.lru_cache(maxsize=None)
def token_buckets(minimum: int, maximum: int) -> tuple[int, ...]:
    """Every value `token_bucket` can return in [minimum, maximum], ascending (cached: the scheduler asks on
    every mixed step)."""
    out, n = [], next_pow2(minimum)
    while 3 * n // 4 <= maximum:
        out += [m for m in (3 * n // 4, n) if m >= minimum and m <= maximum and token_bucket(m, minimum) == m]
        n *= 2
    return tuple(sorted(set(out)))


def padding_cut(num_tokens: int, chunk: int, max_bucket: int) -> int:
    """How many tokens to take off a step's last prefill chunk (`chunk` of its `num_tokens`) so the step fills
    a smaller bucket exactly, the rest going into the next step; 0 to leave the step as it is.

    A step's cost grows with its padded rows (on CPU nearly in proportion: a 768-row prefill step of issue
    14's model 38 ms, 512 rows 26 ms, 32 rows ~3 ms), so a 544-token prompt is cheaper as 512 + 32 than as
    one 768-row step. Cut only when that saves at least a fifth of the step's rows and 64 rows (about one
    step's fixed cost here), counting the deferred tokens as a step of their own."""
    padded = min(token_bucket(num_tokens), max_bucket)
    smaller = [b for b in token_buckets(MIN_TOKEN_BUCKET, max_bucket) if num_tokens - chunk < b < num_tokens]
    if not smaller:
        return 0
    fit = smaller[-1]
    rest = num_tokens - fit
    saved = padded - fit - token_bucket(rest)
    return rest if saved >= max(64, padded // 5) else 0
