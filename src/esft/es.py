"""The ES arithmetic that does not touch a model: seeds, reward shaping, coefficients.

The update itself, θ ← θ + (α/N)·Σⱼ cⱼ·ε(seedⱼ), lives in `params.WeightState.apply_update`
because it streams tensor by tensor; this module decides the seeds and the cⱼ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_SEED_HIGH = 2**31 - 1  # seeds stay in int32 range so any RNG accepts them


@dataclass(frozen=True)
class Member:
    """One population member: which noise seed and which sign of it."""

    seed: int
    sign: int  # +1 or -1 (mirror sampling)


def iteration_seeds(run_seed: int, iteration: int, num_seeds: int) -> list[int]:
    """The noise seeds of `iteration`, a pure function of (run seed, iteration)."""
    rng = np.random.default_rng([run_seed, iteration, 0x5EED])
    return [int(s) for s in rng.integers(0, _SEED_HIGH, size=num_seeds)]


def prompt_subset(run_seed: int, iteration: int, num_prompts: int, k: int | None) -> list[int]:
    """Indices of the prompts every member sees in `iteration` (all of them by default)."""
    if k is None or k >= num_prompts:
        return list(range(num_prompts))
    rng = np.random.default_rng([run_seed, iteration, 0x9409])
    return sorted(int(i) for i in rng.choice(num_prompts, size=k, replace=False))


def members(seeds: list[int], mirror: bool) -> list[Member]:
    """Population layout: one member per seed, or a (+ε, −ε) pair per seed."""
    if mirror:
        return [Member(s, sign) for s in seeds for sign in (1, -1)]
    return [Member(s, 1) for s in seeds]


def normalize_rewards(rewards: list[float]) -> list[float] | None:
    """z = (R − mean) / (std + 1e-8) with the population std; None when all are equal.

    Equal rewards carry no signal; returning None (the caller skips the update) avoids
    both a division by ~0 and a spurious step along the noise.
    """
    r = np.asarray(rewards, dtype=np.float64)
    if r.size == 0 or not np.all(np.isfinite(r)):
        raise ValueError("rewards must be finite (the trainer maps NaN/inf to 0 first)")
    if r.max() == r.min():
        return None
    z = (r - r.mean()) / (r.std() + 1e-8)
    return [float(x) for x in z]


def coefficients(rewards: list[float], mirror: bool) -> list[float] | None:
    """Per-seed coefficients cⱼ of the update; None when the update is skipped.

    Without mirroring cⱼ = zⱼ. With mirroring the pair (+ε, −ε) contributes
    z₊·ε + z₋·(−ε) = (z₊ − z₋)·ε, so one coefficient per seed is enough.
    """
    z = normalize_rewards(rewards)
    if z is None:
        return None
    if mirror:
        return [z[i] - z[i + 1] for i in range(0, len(z), 2)]
    return z


def update_scale(learning_rate: float, population_size: int) -> float:
    """α/N: the factor in front of Σ cⱼ·εⱼ (no 1/σ, as in Qiu et al. 2025)."""
    if population_size < 1 or not math.isfinite(learning_rate):
        raise ValueError("need population_size >= 1 and a finite learning_rate")
    return learning_rate / population_size
