"""Prefill cost model exec(prompt_len, cached_len) -> seconds, fitted to an instance's profile.

Prefilling n = prompt_len - cached_len new tokens costs a fixed step overhead, a per-token part (the
matmuls) and an attention part: new token i attends to cached_len + i tokens, so attention work is about
n * (prompt_len + cached_len) / 2. The three coefficients are fitted by non-negative least squares."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Iterable, Sequence


def _features(prompt_len: int, cached_len: int) -> tuple[float, float, float]:
    new = max(prompt_len - cached_len, 1)  # at least the last token is computed, for its logits
    return 1.0, float(new), new * (prompt_len + cached_len) / 2.0


@dataclasses.dataclass(frozen=True)
class CostModel:
    fixed_s: float = 2e-3
    per_token_s: float = 5e-5
    attention_s: float = 2e-9  # per (new token x context token)

    def __post_init__(self):
        for name in ("fixed_s", "per_token_s", "attention_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"CostModel.{name} must be >= 0, got {getattr(self, name)}")

    def exec(self, prompt_len: int, cached_len: int = 0) -> float:
        """Estimated prefill seconds for a prompt of which cached_len tokens are already cached."""
        # _features inlined: this runs once per candidate instance in every routing decision.
        cached = cached_len if cached_len < prompt_len else prompt_len
        new = prompt_len - cached if prompt_len - cached > 1 else 1
        return self.fixed_s + new * (self.per_token_s + self.attention_s * (prompt_len + cached) * 0.5)

    @classmethod
    def fit(cls, samples: Iterable[tuple[int, int, float]]) -> "CostModel":
        """Least-squares fit with every coefficient >= 0, from (prompt_len, cached_len, seconds) samples.
        With three unknowns the exact answer is the best fit over the 7 subsets of free coefficients."""
        rows = [(_features(p, c), s) for p, c, s in samples]
        if not rows:
            raise ValueError("CostModel.fit needs at least one sample")
        best, best_err = None, float("inf")
        for k in (1, 2, 3):
            for active in itertools.combinations(range(3), k):
                coef = _least_squares([[f[i] for i in active] for f, _ in rows], [s for _, s in rows])
                if coef is None or any(c < 0 for c in coef):
                    continue
                full = [0.0, 0.0, 0.0]
                for i, c in zip(active, coef):
                    full[i] = c
                err = sum((sum(a * b for a, b in zip(full, f)) - s) ** 2 for f, s in rows)
                if err < best_err:
                    best, best_err = full, err
        if best is None:
            return cls()
        return cls(*best)


def _least_squares(a: Sequence[Sequence[float]], b: Sequence[float]) -> list[float] | None:
    """Solve the normal equations of a small system by Gaussian elimination; None if singular. Columns are
    scaled first: the features differ by many orders of magnitude."""
    n = len(a[0])
    scale = [max(abs(row[j]) for row in a) or 1.0 for j in range(n)]
    a = [[row[j] / scale[j] for j in range(n)] for row in a]
    ata = [[sum(r[i] * r[j] for r in a) for j in range(n)] for i in range(n)]
    atb = [sum(r[i] * y for r, y in zip(a, b)) for i in range(n)]
    m = [ata[i] + [atb[i]] for i in range(n)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-12:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(n):
            if r != col:
                f = m[r][col] / m[col][col]
                m[r] = [x - f * y for x, y in zip(m[r], m[col])]
    return [m[i][n] / m[i][i] / scale[i] for i in range(n)]


def profile_points(max_model_len: int) -> list[tuple[int, int]]:
    """(prompt_len, cached_len) points the scheduler asks an instance to time: a few lengths up to the
    context, each uncached, half cached and mostly cached."""
    lengths = [n for n in (32, 128, 512, 2048, 8192) if n < max_model_len] or [max(max_model_len // 2, 1)]
    points = []
    for n in lengths:
        for frac in (0.0, 0.5, 0.875):
            points.append((n, int(n * frac)))
    return points
