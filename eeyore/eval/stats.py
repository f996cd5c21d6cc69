"""Summary statistics shared by the adherence scores and the authenticity metrics."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def mean_ci(values: Sequence[float], resamples: int = 10_000, level: float = 0.95, seed: int = 0) -> dict:
    """Mean with a percentile bootstrap confidence interval; n = how many values were given."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return {"mean": None, "ci": [None, None], "n": 0}
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return {"mean": float(x.mean()), "ci": [float(lo), float(hi)], "n": int(x.size)}


def ks_statistic(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs
    (0 = same distribution, 1 = no overlap). Compares whole distributions, not just means."""
    a, b = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    if a.size == 0 or b.size == 0:
        raise ValueError("ks_statistic needs two non-empty samples")
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / a.size
    cdf_b = np.searchsorted(b, grid, side="right") / b.size
    return float(np.abs(cdf_a - cdf_b).max())


def standardized_mean_difference(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Cohen's d of a against b with the pooled standard deviation; None when it is undefined
    (fewer than two values in total, or zero spread with different means)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size == 0 or b.size == 0 or a.size + b.size < 3:
        return None
    pooled = ((a.size - 1) * a.var(ddof=1 if a.size > 1 else 0) + (b.size - 1) * b.var(ddof=1 if b.size > 1 else 0))
    sd = math.sqrt(pooled / (a.size + b.size - 2))
    diff = float(a.mean() - b.mean())
    if sd == 0.0:
        return 0.0 if diff == 0.0 else None
    return diff / sd
