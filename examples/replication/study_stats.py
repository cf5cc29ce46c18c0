"""The statistics of the replication study: intervals over seeds and held-out problems, method differences,
and the collapse criterion. Pure functions on plain arrays, so that they can be checked (tests/rl/
test_replication_study.py) and the numbers recomputed from the committed files without running anything.

The data: per method, a list of runs (one per seed); per run and evaluated step, the correctness of every
held-out problem (greedy: 0/1; mean@4: correct samples / 4). All runs are scored on the same problems.

Two sources of uncertainty, both resampled by `hier_bootstrap`:
- seeds: a method's held-out accuracy varies from seed to seed (data order, sampling, LoRA's random A0);
  the method's value is the mean over its seeds, and seeds are resampled with replacement per method;
- problems: the 256 held-out problems are a sample of the task; they are resampled with replacement once per
  bootstrap draw and the same draw is used for every method, so a difference between two methods is paired
  on problems (a hard problem counts against both).
Seeds are not paired across methods: after the first update the rollouts of two methods differ, so a seed
means the same data order and sampling seed, not the same samples.

With 3 seeds per method the seed resampling has only 10 distinct outcomes per method: the percentile
intervals are approximate, and are reported with that caveat, beside a plain t-interval over seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# two-sided 97.5% quantiles of Student's t by degrees of freedom (scipy.stats.t.ppf(0.975, df))
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


@dataclass
class Interval:
    mean: float
    low: float
    high: float

    def as_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high}


def hier_bootstrap(
    runs_by_method: dict[str, list[np.ndarray]], draws: int = 10_000, seed: int = 0
) -> dict[str, np.ndarray]:
    """Bootstrap distribution of each method's mean held-out accuracy.

    runs_by_method: method -> list over seeds of (problems,) per-problem scores, all of one length P.
    Each draw resamples the P problems once (shared by all methods) and each method's seeds; returns
    method -> (draws,) array of the resampled method means.
    """
    lengths = {len(r) for runs in runs_by_method.values() for r in runs}
    if len(lengths) != 1:
        raise ValueError(f"every run must be scored on the same problems; got lengths {sorted(lengths)}")
    n_problems = lengths.pop()
    rng = np.random.default_rng(seed)
    problems = rng.integers(0, n_problems, size=(draws, n_problems))
    out = {}
    for method, runs in runs_by_method.items():
        scores = np.stack(runs)  # (seeds, P)
        # per draw: the mean over the resampled problems of each seed's run, then over the resampled seeds
        per_seed = np.stack([scores[s][problems].mean(axis=1) for s in range(len(runs))], axis=1)  # (draws, seeds)
        picks = rng.integers(0, len(runs), size=(draws, len(runs)))
        out[method] = np.take_along_axis(per_seed, picks, axis=1).mean(axis=1)
    return out


def percentile_interval(point: float, draws: np.ndarray) -> Interval:
    low, high = np.percentile(draws, [2.5, 97.5])
    return Interval(float(point), float(low), float(high))


def method_mean(runs: list[np.ndarray]) -> float:
    return float(np.mean([r.mean() for r in runs]))


def t_interval(values: list[float]) -> Interval:
    """Mean and 95% t-interval over seeds (problems fixed): the seed-only view beside the bootstrap."""
    m = float(np.mean(values))
    if len(values) < 2:
        return Interval(m, math.nan, math.nan)
    half = T975.get(len(values) - 1, 1.96) * float(np.std(values, ddof=1)) / math.sqrt(len(values))
    return Interval(m, m - half, m + half)


def difference(
    a: str, b: str, runs_by_method: dict[str, list[np.ndarray]], boot: dict[str, np.ndarray]
) -> dict[str, float | bool]:
    """a - b: point estimate, 95% bootstrap interval, the share of draws on the other side of 0 (a
    two-sided bootstrap p-value), and whether the interval excludes 0."""
    point = method_mean(runs_by_method[a]) - method_mean(runs_by_method[b])
    diff = boot[a] - boot[b]
    low, high = np.percentile(diff, [2.5, 97.5])
    p = 2 * min(float((diff <= 0).mean()), float((diff >= 0).mean()))
    return {
        "diff": point,
        "low": float(low),
        "high": float(high),
        "p_boot": min(1.0, p),
        "significant": bool(low > 0 or high < 0),
    }


def collapse(curve: dict[int, float], drop: float = 0.10) -> dict | None:
    """The collapse criterion: held-out accuracy at an evaluated step at least `drop` below the highest
    value the run reached at an earlier evaluated step. Returns the first such step (with its peak) or None.
    `curve` maps step -> accuracy."""
    peak_step, peak = None, -math.inf
    for step in sorted(curve):
        value = curve[step]
        if peak_step is not None and value <= peak - drop:
            return {"step": step, "value": value, "peak_step": peak_step, "peak": peak}
        if value > peak:
            peak_step, peak = step, value
    return None


def dead_from(accuracy: list[float]) -> int | None:
    """The first step (counted from 1) from which the rollout accuracy is 0 at every later step, when that lasts at
    least 3 steps and to the end of the run; None otherwise. A policy that gets every response of every group
    wrong gets no learning signal from DAPO (every advantage is 0), so it stays there: a collapse seen in training,
    which the held-out criterion on mean@k cannot see when mean@k starts near 0."""
    start = len(accuracy)
    while start > 0 and accuracy[start - 1] == 0:
        start -= 1
    return start + 1 if len(accuracy) - start >= 3 else None
