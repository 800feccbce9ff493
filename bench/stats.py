"""Summary statistics of benchmark samples: mean, percentile, bootstrap interval (pure Python)."""

from __future__ import annotations

import math
import random
from typing import Callable, Optional, Sequence

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # fixed: the same rows give the same interval on every run


def mean(xs: Sequence) -> Optional[float]:
    """Mean of the values that are not None (booleans count as 0/1); None when there are none."""
    vals = [float(x) for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def percentile(xs: Sequence[float], q: float) -> Optional[float]:
    """Linear-interpolated percentile, numpy's default, q in [0, 100]; None for no values."""
    s = sorted(xs)
    if not s:
        return None
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def bootstrap_interval(statistic: Callable[[Sequence[int]], Optional[float]], n: int, level: float = 0.95,
                       resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> Optional[tuple[float, float]]:
    """Percentile bootstrap interval of `statistic`, a function of the indices of a resample.

    Resampling indices (not values) keeps paired samples paired: a KL ratio resamples the
    same questions in its numerator and denominator. None when n is 0 or no resample has a value.
    """
    if n == 0:
        return None
    rng = random.Random(seed)
    stats = [statistic(rng.choices(range(n), k=n)) for _ in range(resamples)]
    stats = [s for s in stats if s is not None]
    if not stats:
        return None
    tail = (1 - level) / 2 * 100
    return percentile(stats, tail), percentile(stats, 100 - tail)


def mean_interval(xs: Sequence, **kw) -> Optional[tuple[float, float]]:
    """Bootstrap interval of the mean of `xs` (None entries skipped in every resample)."""
    return bootstrap_interval(lambda idx: mean([xs[i] for i in idx]), len(xs), **kw)


def ratio_interval(num: Sequence[float], den: Sequence[float], **kw) -> Optional[tuple[float, float]]:
    """Bootstrap interval of mean(num) / mean(den) over paired samples (resamples whose
    denominator is 0 are dropped)."""
    if len(num) != len(den):
        raise ValueError("ratio_interval needs paired samples")

    def ratio(idx: Sequence[int]) -> Optional[float]:
        d = sum(den[i] for i in idx)
        return sum(num[i] for i in idx) / d if d > 0 else None

    return bootstrap_interval(ratio, len(num), **kw)
