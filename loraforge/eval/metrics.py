"""pass@k and mean@k from n samples per problem, and their spread.

pass@k is the probability that at least one of k samples is correct. Drawing k of the n samples we
have without replacement gives the unbiased estimator of Chen et al. (2021):

    pass@k = 1 - C(n - c, k) / C(n, k)

The binomials overflow floats long before n = 32 stops being small (C(1024, 512) has 307 digits), so
the ratio is computed as the product prod_{i = n-c+1}^{n} (1 - k / i), which only multiplies numbers
in [0, 1]. Estimating pass@k as 1 - (1 - c/n)^k instead is biased (it treats samples as drawn with
replacement), which is why the formula matters.

mean@k is the mean accuracy of k samples; its unbiased estimate from n >= k samples is c / n whatever
k is, so it equals pass@1. The paper's text calls its MATH500 and AIME numbers mean@4 and mean@32
while appendix C.2 calls them pass@4 and pass@32: the report gives both so either reading can be
compared.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from loraforge.core.errors import LoraforgeError


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples of which c are correct: 1 - C(n-c,k)/C(n,k)."""
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise LoraforgeError(f"pass_at_k: {name} must be an int, got {value!r}")
    if n < 1:
        raise LoraforgeError(f"pass_at_k: n (samples per problem) must be >= 1, got {n}")
    if k < 1:
        raise LoraforgeError(f"pass_at_k: k must be >= 1, got {k}")
    if k > n:
        raise LoraforgeError(
            f"pass_at_k: k = {k} is larger than n = {n} samples; pass@k needs at least k samples "
            f"per problem: generate n >= {k} samples or lower k"
        )
    if not 0 <= c <= n:
        raise LoraforgeError(f"pass_at_k: c (correct samples) must be in [0, n = {n}], got {c}")
    if n - c < k:
        # Every choice of k samples contains a correct one (C(n-c, k) = 0).
        return 1.0
    ratio = 1.0
    for i in range(n - c + 1, n + 1):
        ratio *= 1.0 - k / i
    return 1.0 - ratio


def mean_at_k(n: int, c: int) -> float:
    """Mean accuracy of the samples of one problem, c / n (the unbiased mean@k for every k <= n)."""
    if n < 1 or not 0 <= c <= n:
        raise LoraforgeError(f"mean_at_k: need n >= 1 and 0 <= c <= n, got n = {n}, c = {c}")
    return c / n


def problem_scores(counts: Sequence[tuple[int, int]], metric: str, k: int) -> list[float]:
    """Per-problem values of `metric` ("pass" or "mean") from (n, c) pairs."""
    if metric == "pass":
        return [pass_at_k(n, c, k) for n, c in counts]
    if metric == "mean":
        return [mean_at_k(n, c) for n, c in counts]
    raise LoraforgeError(f"unknown metric {metric!r}; expected 'pass' or 'mean'")


def bootstrap_std(values: Sequence[float], resamples: int = 1000, seed: int = 0) -> dict:
    """Spread of the mean of `values` when the problems are resampled with replacement.

    The benchmark is a sample of problems; this says how much the score would move on another
    draw of the same size. Seeded so a report is reproducible.
    """
    m = len(values)
    if m == 0 or resamples < 1:
        return {"kind": "bootstrap", "resamples": resamples, "std": 0.0, "ci95": [0.0, 0.0]}
    rng = random.Random(seed)
    means = []
    for _ in range(resamples):
        means.append(sum(values[rng.randrange(m)] for _ in range(m)) / m)
    means.sort()
    mu = sum(means) / len(means)
    std = math.sqrt(sum((x - mu) ** 2 for x in means) / max(len(means) - 1, 1))
    lo = means[int(0.025 * (len(means) - 1))]
    hi = means[int(math.ceil(0.975 * (len(means) - 1)))]
    return {"kind": "bootstrap", "resamples": resamples, "std": std, "ci95": [lo, hi]}


def seed_spread(per_seed: Sequence[float], seeds: Sequence[int]) -> dict:
    """Spread across evaluation seeds: sample standard deviation (n - 1) of the per-seed scores."""
    s = len(per_seed)
    mu = sum(per_seed) / s
    std = math.sqrt(sum((x - mu) ** 2 for x in per_seed) / (s - 1)) if s > 1 else 0.0
    return {"kind": "seeds", "seeds": list(seeds), "per_seed": list(per_seed), "std": std}
