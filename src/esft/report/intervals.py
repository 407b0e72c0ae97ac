"""95% intervals for accuracies, mean rewards and their changes, so that noise never reads as an effect.

A few hundred evaluation examples give intervals of several points: a table of bare
changes invites reading −1.5 as forgetting. Every number the report shows comes with
one of these intervals, and the method used is named in the report's footnotes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Two-sided 95% normal quantile.
Z95 = 1.959963984540054
#: Bootstrap replicates and seed: fixed, so a report regenerated from the same rows is identical.
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0

WILSON = "wilson"
BOOTSTRAP = "paired bootstrap"
MEAN_BOOTSTRAP = "bootstrap of the mean"
NEWCOMBE = "newcombe"
QUADRATURE = "quadrature"


@dataclass(frozen=True)
class Estimate:
    """A value with its 95% interval; lo/hi are NaN and method "" when no interval exists."""

    value: float
    lo: float = math.nan
    hi: float = math.nan
    method: str = ""

    @property
    def has_interval(self) -> bool:
        return not (math.isnan(self.lo) or math.isnan(self.hi))

    def contains_zero(self) -> bool:
        """True when the interval does not exclude "no change" (1e-12 absorbs float residue)."""
        return self.has_interval and self.lo <= 1e-12 and self.hi >= -1e-12

    def scaled(self, factor: float) -> Estimate:
        return Estimate(self.value * factor, self.lo * factor, self.hi * factor, self.method)


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n: stays inside [0, 1] and is sane at 0/n and n/n."""
    if n <= 0:
        raise ValueError("wilson needs n >= 1")
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At 0/n and n/n the bound is exactly 0 or 1; say so rather than 0.9999999999999999.
    lo = 0.0 if k == 0 else max(0.0, center - half)
    hi = 1.0 if k == n else min(1.0, center + half)
    return lo, hi


def accuracy_estimate(k: int, n: int) -> Estimate:
    """An accuracy k/n with its Wilson interval."""
    lo, hi = wilson(k, n)
    return Estimate(k / n, lo, hi, WILSON)


def newcombe_change(k0: int, n0: int, k1: int, n1: int, z: float = Z95) -> Estimate:
    """p1 − p0 for independent samples: Newcombe's hybrid score interval (his method 10).

    Used when the per-example results are not stored, so the pairing of the two
    evaluations (the same examples) cannot be used; it is then usually conservative.
    """
    p0, p1 = k0 / n0, k1 / n1
    l0, u0 = wilson(k0, n0, z)
    l1, u1 = wilson(k1, n1, z)
    d = p1 - p0
    lo = d - math.sqrt((p1 - l1) ** 2 + (u0 - p0) ** 2)
    hi = d + math.sqrt((u1 - p1) ** 2 + (p0 - l0) ** 2)
    return Estimate(d, lo, hi, NEWCOMBE)


def _paired_counts(before: Sequence[int], after: Sequence[int]) -> tuple[int, int, int]:
    """(examples gained 0→1, lost 1→0, total) of two evaluations of the same examples."""
    if len(before) != len(after) or not before:
        raise ValueError("a paired change needs two equally long, non-empty lists of 0/1")
    b = np.asarray(before, dtype=bool)
    a = np.asarray(after, dtype=bool)
    return int(np.sum(a & ~b)), int(np.sum(~a & b)), len(b)


def _bootstrap_draws(gained: int, lost: int, n: int, rng: np.random.Generator, resamples: int) -> np.ndarray:
    """Replicates of the change when n examples are redrawn with replacement.

    Only how many redrawn examples were gained and lost matters, and those counts are
    multinomial: drawing them is the same bootstrap as redrawing indices, at O(1) per
    replicate instead of O(n).
    """
    probs = [gained / n, lost / n, max(0.0, 1.0 - (gained + lost) / n)]
    counts = rng.multinomial(n, probs, size=resamples)
    return (counts[:, 0] - counts[:, 1]) / n


def _percentiles(draws: np.ndarray) -> tuple[float, float]:
    lo, hi = np.quantile(draws, [0.025, 0.975])
    return float(lo), float(hi)


def paired_bootstrap_change(
    before: Sequence[int], after: Sequence[int], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> Estimate:
    """mean(after) − mean(before) on the same examples, with a percentile bootstrap interval.

    Pairing matters: an example answered correctly at both iterations contributes no
    uncertainty, so this interval is much tighter than one for independent samples.
    """
    gained, lost, n = _paired_counts(before, after)
    draws = _bootstrap_draws(gained, lost, n, np.random.default_rng(seed), resamples)
    lo, hi = _percentiles(draws)
    return Estimate((gained - lost) / n, lo, hi, BOOTSTRAP)


def paired_bootstrap_mean_change(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]], resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Estimate:
    """Average over tasks of paired changes: each task's examples are redrawn independently
    and the per-task changes averaged within each replicate."""
    if not pairs:
        raise ValueError("no tasks to average")
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)
    value = 0.0
    for before, after in pairs:
        gained, lost, n = _paired_counts(before, after)
        total += _bootstrap_draws(gained, lost, n, rng, resamples)
        value += (gained - lost) / n
    lo, hi = _percentiles(total / len(pairs))
    return Estimate(value / len(pairs), lo, hi, BOOTSTRAP)


#: Indices drawn per block of replicates: bounds the memory of a bootstrap over many examples.
_BLOCK = 1 << 22


def _resampled_means(values: np.ndarray, rng: np.random.Generator, resamples: int, block: int = _BLOCK) -> np.ndarray:
    """Means of `values` redrawn with replacement, one per replicate: the textbook bootstrap.

    Real-valued rewards have no few-outcome shortcut like the 0/1 case, so indices are
    drawn directly, a block of replicates at a time; the generator's stream is the same
    as one `rng.integers(0, n, size=(resamples, n))`, so the result does not depend on
    the block size.
    """
    n = len(values)
    rows = max(1, block // n)
    return np.concatenate([values[rng.integers(0, n, size=(min(rows, resamples - start), n))].mean(axis=1)
                           for start in range(0, resamples, rows)])


def _as_values(values: Sequence[float]) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    if v.ndim != 1 or not len(v):
        raise ValueError("a bootstrap needs a non-empty list of numbers")
    return v


def bootstrap_mean(
    values: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> Estimate:
    """The mean of per-example values (e.g. rewards) with a percentile bootstrap interval."""
    v = _as_values(values)
    lo, hi = _percentiles(_resampled_means(v, np.random.default_rng(seed), resamples))
    return Estimate(float(v.mean()), lo, hi, MEAN_BOOTSTRAP)


def paired_bootstrap_mean_difference(
    before: Sequence[float], after: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> Estimate:
    """mean(after) − mean(before) of per-example values on the same examples (e.g. rewards),
    with a percentile bootstrap interval: the per-example differences are redrawn, so the
    pairing counts as it does for `paired_bootstrap_change`."""
    if len(before) != len(after):
        raise ValueError("a paired change needs two equally long lists")
    d = _as_values(after) - _as_values(before)
    lo, hi = _percentiles(_resampled_means(d, np.random.default_rng(seed), resamples))
    return Estimate(float(d.mean()), lo, hi, BOOTSTRAP)


def quadrature_mean(estimates: Sequence[Estimate]) -> Estimate:
    """Average of independent estimates; each side's half-widths combined in quadrature / m.

    The fallback when per-example results are missing: exact for normal errors of
    independent tasks, an approximation for the (asymmetric) score intervals.
    """
    if not estimates:
        raise ValueError("no estimates to average")
    m = len(estimates)
    value = sum(e.value for e in estimates) / m
    if not all(e.has_interval for e in estimates):
        return Estimate(value)
    down = math.sqrt(sum((e.value - e.lo) ** 2 for e in estimates)) / m
    up = math.sqrt(sum((e.hi - e.value) ** 2 for e in estimates)) / m
    return Estimate(value, value - down, value + up, QUADRATURE)


#: Two-sided 95% Student t quantiles t_{0.975, df} for df = 1..30 (beyond: the Cornish–Fisher
#: expansion below, within 0.001 of the exact value). A table, since the report must not need scipy.
_T975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
         2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
         2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272)
T_OVER_SEEDS = "t over seeds"


def t975(df: int) -> float:
    """t_{0.975, df}, the two-sided 95% quantile of Student's t with `df` degrees of freedom."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 2 values (df >= 1), got df={df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = Z95
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def t_interval(values: Sequence[float]) -> Estimate:
    """The mean of `values` (one per training seed) with its 95% t-interval over them:
    mean ± t_{0.975, n−1}·s/√n; no interval for a single value."""
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        raise ValueError("no values")
    mean = float(x.mean())
    if x.size < 2:
        return Estimate(mean)
    half = t975(x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return Estimate(mean, mean - half, mean + half, T_OVER_SEEDS)
