"""Small statistics for steering reports: Wilson intervals for rates, effect sizes, and the
fluency scores (distinct-n, repetition) reported beside every refusal rate.

    lo, hi = wilson_interval(12, 40)        # 95% interval of a 12/40 refusal rate
    distinct_n(["a b a b", "c d"], n=2)     # unique bigrams / all bigrams
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% for z=1.96); (0, 1) when ``n`` is 0.

    Unlike the normal approximation it stays inside [0, 1] and is sensible at 0/n and n/n,
    which refusal rates often are.
    """
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def cohens_d(a: Tensor, b: Tensor, eps: float = 1e-6) -> Tensor:
    """Effect size per column of (Na, F) and (Nb, F) samples: difference of means over the
    pooled standard deviation."""
    na, nb = a.shape[0], b.shape[0]
    va = a.var(0, unbiased=True) if na > 1 else torch.zeros_like(a[0])
    vb = b.var(0, unbiased=True) if nb > 1 else torch.zeros_like(b[0])
    pooled = ((max(na - 1, 0) * va + max(nb - 1, 0) * vb) / max(na + nb - 2, 1)).sqrt()
    return (a.mean(0) - b.mean(0)) / (pooled + eps)


def _ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    words = text.split()
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Unique n-grams over all n-grams of ``texts`` (whitespace words); 1 = never repeats.

    Broken steering collapses into loops ("I I I I ...") and this drops towards 0. Texts too
    short for one n-gram are skipped; nan when none is long enough.
    """
    grams = [g for t in texts for g in _ngrams(t, n)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def repetition_rate(text: str, n: int = 3) -> float:
    """Fraction of a text's n-grams that repeat an earlier n-gram of the same text (0 = none)."""
    grams = _ngrams(text, n)
    if not grams:
        return 0.0
    return 1 - len(set(grams)) / len(grams)


def mean(values: Sequence[float]) -> float:
    """Mean ignoring nan; nan for no values."""
    vals = [v for v in values if v == v]
    return sum(vals) / len(vals) if vals else float("nan")
