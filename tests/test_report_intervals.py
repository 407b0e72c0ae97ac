"""The report's statistics against direct computations: Wilson, Newcombe, the paired
bootstrap, averages over tasks, and the drift predictions of Eq. 2 (no model needed)."""

from __future__ import annotations

import math
from math import factorial

import numpy as np
import pytest

from esft.report.intervals import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    Z95,
    Estimate,
    _resampled_means,
    bootstrap_mean,
    newcombe_change,
    paired_bootstrap_change,
    paired_bootstrap_mean_change,
    paired_bootstrap_mean_difference,
    quadrature_mean,
    wilson,
)
from esft.report.predictions import (
    l2_stationary_sq,
    l2_transient_sq,
    random_walk_sq,
    update_sq,
)


def test_wilson_equals_the_closed_form_and_the_published_value_at_7_of_20() -> None:
    k, n, z = 7, 20, Z95
    p = k / n
    center = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    lo, hi = wilson(k, n)
    assert (lo, hi) == pytest.approx((center - half, center + half), abs=1e-15)
    assert (round(lo, 4), round(hi, 4)) == (0.1812, 0.5671), "Wilson 95% interval of 7/20 (Newcombe 1998)"


def test_wilson_stays_inside_0_1_when_every_or_no_example_is_correct() -> None:
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and 0 < hi < 0.35
    lo, hi = wilson(10, 10)
    assert 0.65 < lo < 1 and hi == 1.0


def test_newcombe_change_reproduces_newcombe_1998_example() -> None:
    # Newcombe (1998), Stat. Med. 17:873, example (a): 56/70 − 48/80 = 0.2, method 10: 0.0524 to 0.3339.
    e = newcombe_change(48, 80, 56, 70)
    assert e.value == pytest.approx(0.2)
    assert (round(e.lo, 4), round(e.hi, 4)) == (0.0524, 0.3339)
    assert not e.contains_zero()


def _exact_quantiles(gained: int, lost: int, n: int) -> tuple[float, float, float]:
    """2.5% and 97.5% quantiles of the bootstrap distribution of a paired change, by
    enumerating the multinomial counts of redrawn gained/lost/unchanged examples; and the
    closest the CDF comes to 0.025 or 0.975 (so the test can refuse an ambiguous case)."""
    p = (gained / n, lost / n, (n - gained - lost) / n)
    dist: dict[float, float] = {}
    for g in range(n + 1):
        for lo in range(n + 1 - g):
            s = n - g - lo
            pr = factorial(n) / (factorial(g) * factorial(lo) * factorial(s)) * p[0] ** g * p[1] ** lo * p[2] ** s
            dist[(g - lo) / n] = dist.get((g - lo) / n, 0.0) + pr
    cdf, q_lo, q_hi, margin = 0.0, None, None, 1.0
    for v in sorted(dist):
        cdf += dist[v]
        margin = min(margin, abs(cdf - 0.025), abs(cdf - 0.975))
        if q_lo is None and cdf > 0.025:
            q_lo = v
        if q_hi is None and cdf > 0.975:
            q_hi = v
    return q_lo, q_hi, margin


def test_paired_bootstrap_equals_the_exact_bootstrap_distribution_of_a_small_case() -> None:
    before = [0, 0, 1, 0, 1]
    after = [1, 1, 0, 0, 1]  # two gained, one lost, two unchanged
    q_lo, q_hi, margin = _exact_quantiles(2, 1, 5)
    assert margin > 0.004, "the case must not sit on a CDF step, or sampling noise could decide it"
    e = paired_bootstrap_change(before, after)
    assert e.value == pytest.approx(0.2)
    assert (e.lo, e.hi) == pytest.approx((q_lo, q_hi)) == (-0.4, 0.8)


def test_paired_bootstrap_agrees_with_resampling_indices_directly() -> None:
    rng = np.random.default_rng(7)
    n, B = 60, 10_000
    before = (rng.random(n) < 0.5).astype(int)
    after = np.where(rng.random(n) < 0.3, 1 - before, before)
    idx = np.random.default_rng(0).integers(0, n, size=(B, n))  # the textbook bootstrap
    direct = np.quantile((after[idx] - before[idx]).mean(axis=1), [0.025, 0.975])
    e = paired_bootstrap_change(before.tolist(), after.tolist())
    assert e.value == pytest.approx((after - before).mean())
    # Same distribution, different draws: the quantiles agree up to one step of 1/n.
    assert abs(e.lo - direct[0]) <= 1 / n + 1e-9 and abs(e.hi - direct[1]) <= 1 / n + 1e-9, (e, direct)
    assert paired_bootstrap_change(before.tolist(), after.tolist()) == e, "fixed seed: deterministic"


def test_mean_change_bootstrap_averages_per_task_replicates() -> None:
    a = ([0, 0, 1, 0, 1], [1, 1, 0, 0, 1])
    assert paired_bootstrap_mean_change([a]) == paired_bootstrap_change(*a), "one task: the task's own interval"
    rng = np.random.default_rng(3)
    tasks = []
    for n in (40, 80):
        b = (rng.random(n) < 0.6).astype(int)
        tasks.append((b, np.where(rng.random(n) < 0.25, 0, b)))
    B = 10_000
    draw = np.random.default_rng(1)
    reps = np.zeros(B)
    for b, f in tasks:  # each task's examples redrawn on their own, then averaged
        idx = draw.integers(0, len(b), size=(B, len(b)))
        reps += (f[idx] - b[idx]).mean(axis=1)
    direct = np.quantile(reps / 2, [0.025, 0.975])
    e = paired_bootstrap_mean_change([(b.tolist(), f.tolist()) for b, f in tasks])
    assert e.value == pytest.approx(np.mean([(f - b).mean() for b, f in tasks]))
    assert abs(e.lo - direct[0]) < 0.01 and abs(e.hi - direct[1]) < 0.01, (e, direct)


def _textbook_bootstrap(values: np.ndarray) -> tuple[float, float]:
    idx = np.random.default_rng(BOOTSTRAP_SEED).integers(0, len(values), size=(BOOTSTRAP_RESAMPLES, len(values)))
    lo, hi = np.quantile(values[idx].mean(axis=1), [0.025, 0.975])
    return float(lo), float(hi)


def test_reward_bootstraps_equal_resampling_indices_with_the_same_seed() -> None:
    rng = np.random.default_rng(11)
    before = -rng.integers(0, 50, size=24).astype(float)
    after = before + rng.normal(6.0, 5.0, size=24)
    e = paired_bootstrap_mean_difference(before.tolist(), after.tolist())
    assert e.value == pytest.approx((after - before).mean(), abs=1e-12)
    assert (e.lo, e.hi) == _textbook_bootstrap(after - before), "the per-example differences redrawn"
    m = bootstrap_mean(after.tolist())
    assert (m.value, m.lo, m.hi) == (float(after.mean()), *_textbook_bootstrap(after))
    assert paired_bootstrap_mean_difference([-3.0] * 5, [-1.0] * 5) == Estimate(2.0, 2.0, 2.0, "paired bootstrap")
    with pytest.raises(ValueError):
        paired_bootstrap_mean_difference([1.0, 2.0], [1.0])


def test_reward_bootstrap_drawn_in_blocks_equals_one_draw() -> None:
    values = np.random.default_rng(5).normal(size=37)
    whole = _resampled_means(values, np.random.default_rng(0), 1000, block=10**9)
    blocks = _resampled_means(values, np.random.default_rng(0), 1000, block=37 * 7)  # 143 blocks, the last short
    assert np.array_equal(whole, blocks), "the block size must not change the replicates"


def test_quadrature_mean_combines_each_side_in_quadrature_over_the_task_count() -> None:
    e = quadrature_mean([Estimate(0.1, 0.0, 0.2, "newcombe"), Estimate(-0.1, -0.3, 0.0, "newcombe")])
    assert e.value == pytest.approx(0.0)
    assert e.lo == pytest.approx(-math.sqrt(0.1**2 + 0.2**2) / 2)
    assert e.hi == pytest.approx(math.sqrt(0.1**2 + 0.1**2) / 2)
    assert not quadrature_mean([Estimate(0.1), Estimate(0.2, 0.1, 0.3)]).has_interval


def test_eq2_random_walk_and_the_l2_recursion() -> None:
    alpha, d, N = 5e-4, 134_515_008, 30
    assert random_walk_sq(250, alpha, d, N) == 250 * alpha**2 * d / N
    # With no decay the recursion is the random walk.
    assert l2_transient_sq(alpha, d, N, [0.0] * 50) == pytest.approx([random_walk_sq(t, alpha, d, N) for t in range(51)])
    s = 0.005
    x_star = l2_stationary_sq(alpha, d, N, s)
    assert x_star == pytest.approx((1 - s) ** 2 * (x_star + update_sq(alpha, d, N))), "a fixed point"
    assert l2_transient_sq(alpha, d, N, [s] * 5000)[-1] == pytest.approx(x_star, rel=1e-9)


def test_a_config_written_before_a_field_existed_is_the_same_setting_as_one_at_its_default() -> None:
    from esft.report.seeds import setting_key

    old = {"model": "embedded", "population_size": 32, "seed": 0, "output_dir": "runs/a"}
    new = {**old, "seed": 1, "output_dir": "runs/b", "noise_stream": 0}   # the field written out at its default
    assert setting_key(old) == setting_key(new)
    assert setting_key(old) != setting_key({**new, "noise_stream": 1}), "a stream other than the default is a setting"
    assert setting_key(old) != setting_key({**old, "population_size": 16})
