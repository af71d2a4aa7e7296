"""Results over several seeds: mean and spread per cell, and a paired yes / no / within-noise reading.

A claim "A beats B" is read on the per-seed paired differences d_i = A_i - B_i (same seed, same
held-out questions): **yes** when the two-sided 95% Student-t interval of their mean lies above 0,
**no** when it lies below 0, **within noise** otherwise. With one seed there is no spread and
no verdict ("one seed"). The rule is fixed here, before any result is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom; the normal's beyond
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t95(degrees_of_freedom: int) -> float:
    if degrees_of_freedom < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {degrees_of_freedom}")
    return _T95[degrees_of_freedom - 1] if degrees_of_freedom <= len(_T95) else 1.960


def mean_sd(values: Sequence[Optional[float]]) -> tuple[float, float, int]:
    """(mean, sample standard deviation, count) of the finite values; sd is nan below two values."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan, 0
    mean = sum(finite) / len(finite)
    if len(finite) < 2:
        return mean, math.nan, len(finite)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)), len(finite)


def format_mean_sd(values: Sequence[Optional[float]], digits: int = 1) -> str:
    mean, sd, count = mean_sd(values)
    if count == 0:
        return "-"
    if count == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


@dataclass(frozen=True)
class Verdict:
    """A claim "a > b" read on paired per-seed values."""

    answer: str  # "yes", "no", "within noise", "one seed", "no data"
    mean_difference: float
    half_width: float  # of the 95% interval (nan with one seed)
    seeds: int

    def describe(self, digits: int = 1) -> str:
        if self.seeds == 0:
            return "no data"
        if self.seeds == 1:
            return f"one seed: difference {self.mean_difference:+.{digits}f} (no spread, no verdict)"
        return (f"{self.answer}: difference {self.mean_difference:+.{digits}f} ± {self.half_width:.{digits}f} "
                f"(95% t-interval, {self.seeds} seeds)")


def paired_verdict(a: Sequence[Optional[float]], b: Sequence[Optional[float]]) -> Verdict:
    """Whether ``a`` exceeds ``b`` (one value per seed, paired by position)."""
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    differences = [x - y for x, y in zip(a, b)
                   if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
    mean, sd, count = mean_sd(differences)
    if count == 0:
        return Verdict("no data", math.nan, math.nan, 0)
    if count == 1:
        return Verdict("one seed", mean, math.nan, 1)
    half = t95(count - 1) * sd / math.sqrt(count)
    answer = "yes" if mean - half > 0 else "no" if mean + half < 0 else "within noise"
    return Verdict(answer, mean, half, count)
