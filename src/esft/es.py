"""The ES arithmetic that does not touch a model: the plan of an iteration, reward shaping,
coefficients.

An iteration is planned once (`plan_iteration`: seeds, members, the prompt subset and the
groups of members scored in one pass); a population only scores that plan, in-process or
on Ray actors. The update itself, θ ← θ + (α/N)·Σⱼ cⱼ·ε(seedⱼ), lives in
`params.WeightState.apply_update` because it streams tensor by tensor; this module decides
the seeds and the cⱼ.
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


def _key(run_seed: int, iteration: int, purpose: int, stream: int) -> list[int]:
    """The RNG key of one draw; stream 0 is the key every run used before streams existed, so
    its seed logs stay what they were."""
    return [run_seed, iteration, purpose] if stream == 0 else [run_seed, iteration, purpose, stream]


def iteration_seeds(run_seed: int, iteration: int, num_seeds: int, stream: int = 0) -> list[int]:
    """The noise seeds of `iteration`, a pure function of (run seed, noise stream, iteration)."""
    rng = np.random.default_rng(_key(run_seed, iteration, 0x5EED, stream))
    return [int(s) for s in rng.integers(0, _SEED_HIGH, size=num_seeds)]


def prompt_subset(run_seed: int, iteration: int, num_prompts: int, k: int | None, stream: int = 0) -> list[int]:
    """Indices of the prompts every member sees in `iteration` (all of them by default)."""
    if k is None or k >= num_prompts:
        return list(range(num_prompts))
    rng = np.random.default_rng(_key(run_seed, iteration, 0x9409, stream))
    return sorted(int(i) for i in rng.choice(num_prompts, size=k, replace=False))


def members(seeds: list[int], mirror: bool) -> list[Member]:
    """Population layout: one member per seed, or a (+ε, −ε) pair per seed."""
    if mirror:
        return [Member(s, sign) for s in seeds for sign in (1, -1)]
    return [Member(s, 1) for s in seeds]


def balanced_groups(n: int, cap: int) -> list[int]:
    """Split n members into the fewest groups of at most `cap`, sizes differing by at most 1."""
    if n <= 0:
        return []
    count = math.ceil(n / max(1, cap))
    base, extra = divmod(n, count)
    return [base + (1 if g < extra else 0) for g in range(count)]


@dataclass(frozen=True)
class IterationPlan:
    """Everything that decides which members an iteration scores, and how they are grouped.

    `groups` lists member indices scored in one pass (`--members_per_batch`); a group's
    size changes how fast members are scored, never their rewards on CPU, and the same
    plan is used in-process and on Ray actors so both get the same bits.
    """

    iteration: int
    seeds: list[int]
    members: list[Member]
    subset: list[int]  # prompt indices every member sees
    groups: list[list[int]]


def plan_iteration(
    run_seed: int, iteration: int, num_seeds: int, mirror: bool, num_prompts: int,
    prompts_per_step: int | None, max_group: int = 1, stream: int = 0,
) -> IterationPlan:
    """The plan of `iteration`: a pure function of the run's seed and settings.

    `max_group` is the most members one pass may hold (1: one member at a time), which the
    population derives from `--members_per_batch` and its memory budget. `stream` picks one of
    the run seed's independent streams (`--noise_stream`).
    """
    seeds = iteration_seeds(run_seed, iteration, num_seeds, stream)
    population = members(seeds, mirror)
    groups, start = [], 0
    for size in balanced_groups(len(population), max_group):
        groups.append(list(range(start, start + size)))
        start += size
    return IterationPlan(iteration, seeds, population, prompt_subset(run_seed, iteration, num_prompts, prompts_per_step, stream), groups)


#: Above this magnitude sums of rewards can overflow float64 (1e308 + 1e308 = inf); such
#: rewards are divided by their largest magnitude first. Below it the arithmetic is the
#: plain formula, bit for bit, so ordinary runs never change.
LARGE_REWARD = 1e150


def _scale_of(r: np.ndarray) -> float:
    """1, or the largest |reward| when rewards are large enough that sums could overflow."""
    top = float(np.max(np.abs(r))) if r.size else 0.0
    return top if top > LARGE_REWARD else 1.0


def finite_mean(values: list[float]) -> float:
    """The mean of finite values, finite even when their sum is not (±1e308 rewards)."""
    r = np.asarray(values, dtype=np.float64)
    scale = _scale_of(r)
    return float(np.mean(r / scale) * scale) if scale != 1.0 else float(np.mean(r))


def reward_summary(values: list[float]) -> dict[str, float]:
    """`reward/mean|std|min|max` of an iteration's member rewards, every one finite."""
    r = np.asarray(values, dtype=np.float64)
    scale = _scale_of(r)
    mean, std = (float(np.mean(r)), float(np.std(r))) if scale == 1.0 else (
        float(np.mean(r / scale) * scale), float(np.std(r / scale) * scale))
    return {"reward/mean": mean, "reward/std": std, "reward/min": float(r.min()), "reward/max": float(r.max())}


def normalize_rewards(rewards: list[float]) -> list[float] | None:
    """z = (R − mean) / (std + 1e-8) with the population std; None when all are equal.

    Equal rewards carry no signal; returning None (the caller skips the update) avoids
    both a division by ~0 and a spurious step along the noise. Any finite rewards give
    finite z-scores: rewards so large that their mean or std would overflow are divided
    by their largest magnitude first (the 1e-8 with them), which is the same formula.
    """
    r = np.asarray(rewards, dtype=np.float64)
    if r.size == 0 or not np.all(np.isfinite(r)):
        raise ValueError("rewards must be finite (the trainer maps NaN/inf to 0 first)")
    if r.max() == r.min():
        return None
    scale = _scale_of(r)
    if scale != 1.0:
        r = r / scale
    z = (r - r.mean()) / (r.std() + 1e-8 / scale)
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
