"""Scoring one ES population: the same code in-process and inside every Ray worker.

A member is scored by pointing the weights at master + sign·σ·ε(seed), generating
greedily for the iteration's prompts, restoring, then scoring the completions. Both
`LocalPopulation` and the Ray workers (`esft.distributed`) call `generate_member` and
`score_member`, so a member gets the same reward wherever it runs.

With `--members_per_batch M` the in-process loop evaluates M members in one batched
decoding pass (`generate_members`, `esft.engine.batched`); full-rank members get bitwise
the rewards `generate_member` gives them one at a time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from esft import es
from esft.config import ESConfig
from esft.engine import Generation, HFEngine
from esft.engine.batched import PopulationBatcher
from esft.params import WeightState
from esft.rewards import RewardStats, score_completions
from esft.seedlog import IterationRecord


@dataclass
class MemberResult:
    """What comes back for one member: a reward and a few counters (no text, no weights)."""

    index: int
    reward: float
    tokens: int
    completions: int
    t_generation: float
    t_perturb: float
    worker: str = "local"
    t_busy: float = 0.0  # seconds the worker spent on this member, scoring included
    reward_errors: int = 0  # completions whose reward raised or was not finite (scored 0)


@dataclass
class PopulationResult:
    seeds: list[int]
    subset: list[int]
    rewards: list[float]
    stats: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)  # extra metrics (per-worker etc.)


def generate_member(
    state: WeightState, engine: HFEngine, member: es.Member, sigma: float, prompts: list[list[int]]
) -> tuple[list[Generation], float, float]:
    """Greedy completions of one perturbed member; weights end bitwise as they began.

    Returns (generations, generation seconds, perturb+restore seconds).
    """
    t0 = time.perf_counter()
    state.perturb(member.seed, member.sign, sigma)
    t1 = time.perf_counter()
    try:
        gens = engine.generate_ids(prompts)
    finally:
        t2 = time.perf_counter()
        state.restore()
        t3 = time.perf_counter()
    return gens, t2 - t1, (t1 - t0) + (t3 - t2)


def population_batcher(state: WeightState) -> PopulationBatcher:
    """The batched-forward helper of `state`, built once (it probes and plans the model)
    and kept with the state, so its member buffers are reused across iterations."""
    batcher = getattr(state, "_population_batcher", None)
    if batcher is None:
        batcher = state._population_batcher = PopulationBatcher(state)  # type: ignore[attr-defined]
    return batcher


def generate_members(
    state: WeightState, engine: HFEngine, members: list[es.Member], sigma: float, prompts: list[list[int]],
    batcher: PopulationBatcher | None = None,
) -> tuple[list[list[Generation]], float, float]:
    """Greedy completions of several members in one batched decoding loop.

    Returns (one list of generations per member, generation seconds, seconds spent writing
    the members' stacked weights or low-rank factors). The at-rest weights are never
    touched. The caller keeps the group within `batcher.max_group(...)`: a full-rank member
    holds a copy of every trainable tensor while it is evaluated.
    """
    batcher = batcher or population_batcher(state)
    t0 = time.perf_counter()
    with batcher.members(members, sigma):
        t1 = time.perf_counter()
        gens = engine.generate_ids(prompts, copies=len(members))
        t2 = time.perf_counter()
    t3 = time.perf_counter()
    n = len(prompts)
    return [gens[m * n : (m + 1) * n] for m in range(len(members))], t2 - t1, (t1 - t0) + (t3 - t2)


def score_member(task: Any, gens: list[Generation], examples: list[Any], stats: RewardStats) -> float:
    """The member's reward: the mean task reward of its completions (NaN/errors map to 0)."""
    return float(np.mean(score_completions(task, [g.text for g in gens], examples, stats)))


class LocalPopulation:
    """Scores members one after another in this process (the default, no Ray)."""

    def __init__(
        self, cfg: ESConfig, state: WeightState, engine: HFEngine, task: Any,
        examples: list[Any], prompts: list[list[int]], reward_stats: RewardStats,
    ) -> None:
        self.cfg, self.state, self.engine, self.task = cfg, state, engine, task
        self.examples, self.prompts, self.reward_stats = examples, prompts, reward_stats

    def evaluate(self, iteration: int) -> PopulationResult:
        cfg = self.cfg
        seeds = es.iteration_seeds(cfg.seed, iteration, cfg.num_seeds)
        subset = es.prompt_subset(cfg.seed, iteration, len(self.prompts), cfg.prompts_per_step)
        batch = [self.prompts[i] for i in subset]
        examples = [self.examples[i] for i in subset]
        population = es.members(seeds, cfg.mirror_sampling)
        rewards: list[float] = []
        t_gen = t_perturb = 0.0
        tokens = 0
        bar = tqdm(total=len(population), desc=f"iteration {iteration}", leave=False, disable=cfg.disable_tqdm)
        for group in self._groups(population):
            if len(group) == 1 and self.cfg.members_per_batch == 1:
                gens, dt_gen, dt_perturb = generate_member(self.state, self.engine, group[0], cfg.sigma, batch)
                per_member = [gens]
            else:
                per_member, dt_gen, dt_perturb = generate_members(
                    self.state, self.engine, group, cfg.sigma, batch, self._batcher()
                )
            t_gen += dt_gen
            t_perturb += dt_perturb
            for gens in per_member:
                tokens += sum(g.num_tokens for g in gens)
                rewards.append(score_member(self.task, gens, examples, self.reward_stats))
            bar.update(len(group))
        bar.close()
        stats = {
            "generation": t_gen,
            "perturb_restore": t_perturb,
            "tokens": tokens,
            "completions": len(population) * len(batch),
        }
        return PopulationResult(seeds, subset, rewards, stats)

    def _batcher(self) -> PopulationBatcher:
        return population_batcher(self.state)

    def _groups(self, population: list[es.Member]) -> list[list[es.Member]]:
        """Consecutive groups of at most members_per_batch (fewer if memory says so)."""
        m = self.cfg.members_per_batch
        if m == 1:
            return [[member] for member in population]
        sizes = self._batcher().group_sizes(len(population), m)
        groups, start = [], 0
        for size in sizes:
            groups.append(population[start : start + size])
            start += size
        return groups

    def start(self, iteration: int) -> None:
        """Bring replicas up to the driver's weights after `iteration`; nothing to do in-process."""

    def begin_update(self, record: IterationRecord) -> None:
        """Hand the record to replicas so they update while the driver does; none in-process."""

    def after_update(self, record: IterationRecord) -> dict[str, Any]:
        """Keep replicas in step with the driver's weights; nothing to do in-process."""
        return {}

    def close(self) -> None: ...
