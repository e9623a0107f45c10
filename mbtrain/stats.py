"""Paired comparisons over seeds: the mean difference, a 95 % confidence interval from Student's t, seeds won,
and the verdict they allow. What `mbtrain sweep` and `mbtrain compare --baseline` report.

The interval is mean ± t(0.975, n−1)·s/√n over the n seeds where both sides finished, s the differences' sample
standard deviation: the paired t interval. Its half-width is the smallest difference these seeds could tell
from zero. Two seeds at least: one difference has no spread to estimate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

# Student's t 0.975 quantile by degrees of freedom (1..30, then 40, 60, 120); beyond, interpolated in 1/df
# toward the normal's 1.959964. Values to 6 digits, as tabulated.
T_975 = {
    1: 12.706205, 2: 4.302653, 3: 3.182446, 4: 2.776445, 5: 2.570582, 6: 2.446912, 7: 2.364624, 8: 2.306004,
    9: 2.262157, 10: 2.228139, 11: 2.200985, 12: 2.178813, 13: 2.160369, 14: 2.144787, 15: 2.131450,
    16: 2.119905, 17: 2.109816, 18: 2.100922, 19: 2.093024, 20: 2.085963, 21: 2.079614, 22: 2.073873,
    23: 2.068658, 24: 2.063899, 25: 2.059539, 26: 2.055529, 27: 2.051831, 28: 2.048407, 29: 2.045230,
    30: 2.042272, 40: 2.021075, 60: 2.000298, 120: 1.979930,
}
NORMAL_975 = 1.959964
METHOD = "paired t interval over seeds (95 %)"


def t_quantile(df: int) -> float:
    """t(0.975, df); between tabulated degrees of freedom, linear in 1/df (exact to ~1e-4)."""
    if df < 1:
        raise ValueError("a t quantile needs at least 1 degree of freedom")
    if df in T_975:
        return T_975[df]
    known = sorted(T_975) + [math.inf]
    upper = next(d for d in known if d > df)
    lower = max(d for d in known if d < df)
    high = NORMAL_975 if upper == math.inf else T_975[upper]
    weight = (1 / lower - 1 / df) / (1 / lower - (0 if upper == math.inf else 1 / upper))
    return T_975[lower] + (high - T_975[lower]) * weight


@dataclass
class Paired:
    """One method against the baseline on one metric, over the seeds both finished."""

    n: int  # seeds compared
    mean: float | None  # mean difference, method − baseline (None: no seed to pair)
    std: float | None  # the differences' sample standard deviation (None for one seed)
    low: float | None  # the 95 % interval (None for one seed)
    high: float | None
    won: int  # seeds where the method was better
    higher_is_better: bool

    @property
    def half_width(self) -> float | None:
        return None if self.low is None else (self.high - self.low) / 2

    def verdict(self) -> str:
        """better, worse, or no difference this comparison can detect (the interval spans 0)."""
        if self.n == 0:
            return "no seed where both runs finished: nothing to compare"
        if self.low is None:
            return "no interval: at least 2 seeds are needed"
        if self.std == 0 and self.mean == 0:
            return "identical on every seed"
        better = self.low > 0 if self.higher_is_better else self.high < 0
        worse = self.high < 0 if self.higher_is_better else self.low > 0
        if better:
            return "better"
        if worse:
            return "worse"
        return f"no difference this sweep can detect (it would see about ±{self.half_width:.4f})"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "verdict": self.verdict(), "method": METHOD}


def paired(method: Sequence[float | None], baseline: Sequence[float | None], higher_is_better: bool = True) -> Paired:
    """`method` and `baseline` seed by seed (None: that run failed or is missing; such seeds are left out)."""
    diffs = [m - b for m, b in zip(method, baseline, strict=True) if m is not None and b is not None]
    n = len(diffs)
    if n == 0:
        return Paired(0, None, None, None, None, 0, higher_is_better)
    mean = sum(diffs) / n
    won = sum(1 for d in diffs if (d > 0 if higher_is_better else d < 0))
    if n < 2:
        return Paired(n, mean, None, None, None, won, higher_is_better)
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = t_quantile(n - 1) * std / math.sqrt(n)
    return Paired(n, mean, std, mean - half, mean + half, won, higher_is_better)


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, sample std or None, n) of the values that are not None."""
    kept = [v for v in values if v is not None]
    if not kept:
        return None, None, 0
    mean = sum(kept) / len(kept)
    std = math.sqrt(sum((v - mean) ** 2 for v in kept) / (len(kept) - 1)) if len(kept) > 1 else None
    return mean, std, len(kept)
