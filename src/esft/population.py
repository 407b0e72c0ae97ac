"""Scoring an ES iteration's plan: the same code in-process and inside every Ray actor.

The ES side plans an iteration once (`es.plan_iteration`: seeds, members, the prompt
subset, groups of members); a population only scores that plan and returns one
`PopulationResult`. A member is scored by pointing the weights at master + sign·σ·ε(seed)
(or, for a group, by the batched forward of `esft.batched`), generating greedily for the
plan's prompts, restoring, then scoring the completions. `LocalPopulation` and the Ray
actors (`esft.distributed`) both call `generate_group` and `score_group`, so a member gets
the same reward, and reward errors are counted the same way, wherever it runs. Each
population (and each actor) scores user reward functions through one `RewardGuard` (worker
processes under a time and a memory limit, `esft.rewards`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from tqdm.auto import tqdm

from esft import es
from esft.batched import PopulationBatcher
from esft.config import ESConfig
from esft.engine import Generation, HFEngine
from esft.params import WeightState
from esft.rewards import RewardGuard, RewardStats, function_metrics, score_completions
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
    # User reward functions: name -> (count, sum, sum of squares) of the values it returned.
    reward_functions: dict[str, tuple] = field(default_factory=dict)


@dataclass
class PopulationResult:
    """The scored plan: one reward per member, in member order, and what it cost."""

    rewards: list[float]
    reward_errors: int  # completions scored 0 because the reward raised or was not finite
    stats: dict[str, Any] = field(default_factory=dict)  # generation, perturb_restore, tokens, completions
    metrics: dict[str, Any] = field(default_factory=dict)  # extra metrics (rewards/<func>/*, per-worker)

    @classmethod
    def from_members(cls, results: list[MemberResult], metrics: dict[str, Any] | None = None) -> PopulationResult:
        ordered = sorted(results, key=lambda r: r.index)
        stats = {
            "generation": sum(r.t_generation for r in ordered),
            "perturb_restore": sum(r.t_perturb for r in ordered),
            "tokens": sum(r.tokens for r in ordered),
            "completions": sum(r.completions for r in ordered),
        }
        # User reward functions: rewards/<name>/mean|std over every completion, as TRL logs them.
        extra = {**function_metrics(r.reward_functions for r in ordered), **(metrics or {})}
        return cls([r.reward for r in ordered], sum(r.reward_errors for r in ordered), stats, extra)


class Population(Protocol):
    """Where an iteration's members are scored: in this process or on Ray actors."""

    def start(self, iteration: int) -> None:
        """Bring replicas up to the driver's weights after `iteration` (0, or a resume)."""

    def max_group(self) -> int:
        """The most members one pass may hold (1: one at a time); the plan's groups obey it."""
        ...

    def score(self, plan: es.IterationPlan) -> PopulationResult:
        """Score every member of `plan`; the weights end bitwise as they began."""
        ...

    def begin_update(self, record: IterationRecord) -> None:
        """Hand the record to replicas so they update while the driver does."""

    def after_update(self, record: IterationRecord) -> dict[str, Any]:
        """Wait for the replicas' updates; returns metrics."""
        ...

    def close(self) -> None: ...


# ----------------------------------------------------------------- member scoring
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


def generate_members(
    batcher: PopulationBatcher, engine: HFEngine, members: list[es.Member], sigma: float, prompts: list[list[int]],
) -> tuple[list[list[Generation]], float, float]:
    """Greedy completions of several members in one batched decoding loop.

    Returns (one list of generations per member, generation seconds, seconds spent writing
    the members' stacked weights or low-rank factors). The at-rest weights are never
    touched. The caller keeps the group within `batcher.max_group(...)`: a full-rank member
    holds a copy of every trainable tensor while it is evaluated.
    """
    t0 = time.perf_counter()
    with batcher.members(members, sigma):
        t1 = time.perf_counter()
        gens = engine.generate_ids(prompts, copies=len(members))
        t2 = time.perf_counter()
    t3 = time.perf_counter()
    n = len(prompts)
    return [gens[m * n : (m + 1) * n] for m in range(len(members))], t2 - t1, (t1 - t0) + (t3 - t2)


def generate_group(
    state: WeightState, engine: HFEngine, batcher: PopulationBatcher | None, members: list[es.Member],
    sigma: float, prompts: list[list[int]],
) -> tuple[list[list[Generation]], float, float]:
    """Completions of one group of the plan: one member alone, or a batched pass (with a batcher)."""
    if batcher is None:
        if len(members) != 1:
            raise ValueError(f"a group of {len(members)} members needs a batcher (--members_per_batch)")
        gens, t_gen, t_perturb = generate_member(state, engine, members[0], sigma, prompts)
        return [gens], t_gen, t_perturb
    return generate_members(batcher, engine, members, sigma, prompts)


def score_member(
    task: Any, gens: list[Generation], examples: list[Any], warned: set[str] | None = None,
    guard: RewardGuard | None = None,
) -> tuple[float, RewardStats]:
    """(the member's reward, its reward stats): the mean task reward of its completions.

    `warned` is shared across calls so each kind of reward failure is logged once per run;
    `guard` times user reward functions (None: no limit).
    """
    stats = RewardStats(_seen=warned if warned is not None else set())
    rewards = score_completions(task, [g.text for g in gens], examples, stats, guard)
    return es.finite_mean(rewards), stats


def score_group(
    task: Any, indices: list[int], per_member: list[list[Generation]], examples: list[Any],
    t_gen: float, t_perturb: float, worker: str = "local", warned: set[str] | None = None,
    guard: RewardGuard | None = None,
) -> list[MemberResult]:
    """MemberResults of one generated group; a batched pass's time is shared evenly by its members."""
    share = 1.0 / len(indices)
    results = []
    for index, gens in zip(indices, per_member):
        reward, stats = score_member(task, gens, examples, warned, guard)
        results.append(MemberResult(
            index, reward, sum(g.num_tokens for g in gens), len(gens), t_gen * share, t_perturb * share,
            worker, 0.0, stats.errors + stats.nonfinite, stats.functions,
        ))
    return results


class BatcherOwner:
    """The batched forward of one population or Ray actor (`--members_per_batch`), built on
    first use (it probes and plans the model) and kept, so its member buffers are reused
    across iterations. Subclasses set `cfg`, `state` and `_batcher = None` (or a batcher)."""

    cfg: ESConfig
    state: WeightState
    _batcher: PopulationBatcher | None

    @property
    def batcher(self) -> PopulationBatcher | None:
        if self.cfg.members_per_batch == 1:
            return None
        if self._batcher is None:
            self._batcher = PopulationBatcher(self.state)
        return self._batcher

    def max_group(self) -> int:
        """`members_per_batch`, capped by the batcher's memory budget (1 without batching)."""
        batcher = self.batcher
        return batcher.max_group(self.cfg.members_per_batch) if batcher is not None else 1


# ------------------------------------------------------------------ in-process
class LocalPopulation(BatcherOwner):
    """Scores a plan's groups one after another in this process (the default, no Ray)."""

    def __init__(
        self, cfg: ESConfig, state: WeightState, engine: HFEngine, task: Any,
        examples: list[Any], prompts: list[list[int]], batcher: PopulationBatcher | None = None,
        guard: RewardGuard | None = None,
    ) -> None:
        """`guard`: the trainer's (built before the model loaded); without one the
        population builds its own from `cfg` and closes it with itself."""
        self.cfg, self.state, self.engine, self.task = cfg, state, engine, task
        self.examples, self.prompts = examples, prompts
        self._batcher = batcher
        self._warned: set[str] = set()
        self._owns_guard = guard is None
        self.guard = guard if guard is not None else RewardGuard.from_config(cfg)

    def score(self, plan: es.IterationPlan) -> PopulationResult:
        batch = [self.prompts[i] for i in plan.subset]
        examples = [self.examples[i] for i in plan.subset]
        results: list[MemberResult] = []
        bar = tqdm(total=len(plan.members), desc=f"iteration {plan.iteration}", leave=False, disable=self.cfg.disable_tqdm)
        for group in plan.groups:
            members = [plan.members[i] for i in group]
            per_member, t_gen, t_perturb = generate_group(self.state, self.engine, self.batcher, members, self.cfg.sigma, batch)
            results += score_group(self.task, group, per_member, examples, t_gen, t_perturb,
                                   warned=self._warned, guard=self.guard)
            bar.update(len(group))
        bar.close()
        return PopulationResult.from_members(results)

    def start(self, iteration: int) -> None:
        """Nothing to bring up to date in-process."""

    def begin_update(self, record: IterationRecord) -> None:
        """No replicas in-process."""

    def after_update(self, record: IterationRecord) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        if self._owns_guard:
            self.guard.close()


__all__ = [
    "BatcherOwner", "LocalPopulation", "MemberResult", "Population", "PopulationResult", "generate_group",
    "generate_member", "generate_members", "score_group", "score_member",
]
