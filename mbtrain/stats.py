"""Paired comparisons over seeds: the mean difference, a 95 % confidence interval from Student's t, seeds won,
and the verdict they allow. What `mbtrain sweep` and `mbtrain compare --baseline` report.

The interval is mean ± t(0.975, n−1)·s/√n over the n seeds where both sides finished, s the differences' sample
standard deviation: the paired t interval. Its half-width is the smallest difference these seeds could tell
from zero. Two seeds at least: one difference has no spread to estimate.

Several methods against one baseline are several tests: at 95 % each, about 5 % of the methods that differ in
nothing read "better" or "worse" by chance. `holm` adjusts the tests' p-values for their number (Holm's
step-down, which keeps the chance of any false verdict among them at 5 % whatever their dependence); a verdict
reads the adjusted p-value where one is given, and the interval stays the unadjusted one beside it.
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
ADJUSTMENT = "Holm's step-down over the methods compared with the baseline"
LEVEL = 0.05


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


def t_p_value(t: float, df: int) -> float:
    """Two-sided p-value of Student's t statistic `t` on `df` degrees of freedom: I_x(df/2, 1/2), x = df/(df+t²)."""
    if df < 1:
        raise ValueError("a t-test needs at least 1 degree of freedom")
    if math.isinf(t):
        return 0.0
    return _incomplete_beta(df / 2, 0.5, df / (df + t * t))


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz), on the side
    where it converges fast."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _incomplete_beta(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * fraction


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm-adjusted p-values, in the given order (None stays None and is not counted): the i-th smallest of k
    is multiplied by k − i + 1, kept at least its predecessor's and at most 1."""
    ranked = sorted((p, index) for index, p in enumerate(p_values) if p is not None)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, index) in enumerate(ranked):
        running = max(running, min(1.0, (len(ranked) - rank) * p))
        adjusted[index] = running
    return adjusted


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
    p: float | None = None  # the paired t-test's two-sided p-value (None for one seed)
    adjusted_p: float | None = None  # p adjusted for the methods compared (holm), where set
    compared: int = 1  # how many methods' tests `adjusted_p` accounts for

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
        ahead = self.mean > 0 if self.higher_is_better else self.mean < 0
        unadjusted = (self.low > 0 or self.high < 0) and ("better" if ahead else "worse")
        if self.adjusted_p is not None and self.compared > 1 and unadjusted and self.adjusted_p >= LEVEL:
            return (f"no difference once adjusted for {self.compared} methods compared (Holm p "
                    f"{self.adjusted_p:.3f}; alone it would read {unadjusted})")
        if unadjusted:
            return unadjusted
        return f"no difference this sweep can detect (it would see about ±{self.half_width:.4f})"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "verdict": self.verdict(), "method": METHOD,
                **({"adjustment": ADJUSTMENT} if self.adjusted_p is not None else {})}


def adjust(pairs: list[Paired]) -> None:
    """Each of several methods' tests against one baseline, its p-value adjusted for their number (holm), in
    place: what their verdicts then read."""
    compared = sum(pair.p is not None for pair in pairs)
    for pair, adjusted in zip(pairs, holm([pair.p for pair in pairs]), strict=True):
        pair.adjusted_p, pair.compared = adjusted, compared


def paired(method: Sequence[float | None], baseline: Sequence[float | None], higher_is_better: bool = True) -> Paired:
    """`method` and `baseline` seed by seed (None or NaN: that run failed, is missing or has no value; such seeds
    are left out)."""
    diffs = [m - b for m, b in zip(method, baseline, strict=True)
             if m is not None and b is not None and math.isfinite(m) and math.isfinite(b)]
    n = len(diffs)
    if n == 0:
        return Paired(0, None, None, None, None, 0, higher_is_better)
    mean = sum(diffs) / n
    won = sum(1 for d in diffs if (d > 0 if higher_is_better else d < 0))
    if n < 2:
        return Paired(n, mean, None, None, None, won, higher_is_better)
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = t_quantile(n - 1) * std / math.sqrt(n)
    p = t_p_value(math.inf if std == 0 else mean / (std / math.sqrt(n)), n - 1) if std or mean else 1.0
    return Paired(n, mean, std, mean - half, mean + half, won, higher_is_better, p)


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, sample std or None, n) of the values that are not None."""
    kept = [v for v in values if v is not None]
    if not kept:
        return None, None, 0
    mean = sum(kept) / len(kept)
    std = math.sqrt(sum((v - mean) ** 2 for v in kept) / (len(kept) - 1)) if len(kept) > 1 else None
    return mean, std, len(kept)
