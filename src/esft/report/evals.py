"""Evaluation rows grouped by setting, and changes computed only like with like.

`eval/forgetting.jsonl` may hold the same (iteration, task) several times: evaluated at
`--limit 500` during training, re-evaluated at `--limit 2` for a quick look. Two
accuracies measured on different example sets (or token budgets, shot counts, data
versions) differ by construction, so a change is only ever taken between rows of one
setting, and the report says which setting each task used.

A task is measured by its `primary_metric`: accuracy for every benchmark, the mean
training reward for tasks like conciseness whose exact-match accuracy stays near 0
while the reward is what training moves.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from esft.report.intervals import (
    Estimate,
    accuracy_estimate,
    bootstrap_mean,
    newcombe_change,
    paired_bootstrap_change,
    paired_bootstrap_mean_change,
    paired_bootstrap_mean_difference,
    quadrature_mean,
)
from esft.tasks import BUILTIN_TASKS, get_task

#: Row keys that define what was measured; a row without one of them means null.
SETTING_KEYS = ("limit", "max_new_tokens", "num_fewshot", "task_version")

ACCURACY = "accuracy"
REWARD = "reward"


@functools.cache
def primary_metric(task: str) -> str:
    """What measures `task`: its `primary_metric` ("accuracy" or "reward") for a built-in
    task, "accuracy" for a `module:function` custom task or a name the registry lacks."""
    name = task.strip().lower()
    if name not in BUILTIN_TASKS:
        return ACCURACY
    return REWARD if getattr(get_task(name), "primary_metric", ACCURACY) == REWARD else ACCURACY


def prior_tasks(target: str | None, tasks: Iterable[str]) -> list[str]:
    """The tasks a run's average prior change is over: every task but its target that is
    measured by accuracy (a reward, in its own units, is never averaged with accuracies)."""
    return [t for t in tasks if t != target and primary_metric(t) == ACCURACY]


@dataclass(frozen=True)
class Setting:
    """How a task was evaluated: rows of different settings are never compared."""

    limit: int | None = None
    max_new_tokens: int | None = None
    num_fewshot: int | None = None
    task_version: str | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Setting:
        return cls(*(row.get(k) for k in SETTING_KEYS))

    def describe(self) -> str:
        """'limit 200, 256 new tokens', with shots and data version when they are set."""
        parts = ["all examples" if self.limit is None else f"limit {self.limit}"]
        if self.max_new_tokens is not None:
            parts.append(f"{self.max_new_tokens} new tokens")
        if self.num_fewshot is not None:
            parts.append(f"{self.num_fewshot}-shot")
        if self.task_version is not None:
            parts.append(f"version {self.task_version}")
        return ", ".join(parts)


@dataclass(frozen=True)
class EvalPoint:
    """One evaluated (iteration, task, setting); `line` orders rows by recency in the file.

    `reward` and `rewards` (mean and per-example training reward) are None in rows
    written before they were logged.
    """

    accuracy: float
    n: int | None
    correct: tuple[int, ...] | None
    line: int
    reward: float | None = None
    rewards: tuple[float, ...] | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any], line: int) -> EvalPoint:
        correct = row.get("correct")
        correct = tuple(int(bool(c)) for c in correct) if isinstance(correct, list) else None
        n = row.get("n")
        rewards = row.get("rewards")
        rewards = tuple(float(x) for x in rewards) if isinstance(rewards, list) and rewards else None
        reward = row.get("reward")
        if reward is None and rewards:
            reward = sum(rewards) / len(rewards)
        return cls(float(row["accuracy"]), int(n) if n is not None else None, correct, line,
                   None if reward is None else float(reward), rewards)

    @property
    def count(self) -> tuple[int, int] | None:
        """(correct, evaluated), from the per-example list when present."""
        if self.correct:
            return sum(self.correct), len(self.correct)
        if self.n:
            return round(self.accuracy * self.n), self.n
        return None

    def estimate(self) -> Estimate:
        """The accuracy with its Wilson interval (no interval when the row lacks `n`)."""
        count = self.count
        return accuracy_estimate(*count) if count else Estimate(self.accuracy)

    def reward_estimate(self) -> Estimate | None:
        """The mean reward with a bootstrap interval of the mean (none without per-example
        `rewards`); None when the row lacks the reward."""
        if self.rewards:
            return bootstrap_mean(self.rewards)
        return None if self.reward is None else Estimate(self.reward)

    def metric_estimate(self, metric: str) -> Estimate | None:
        """The point in `metric` ("accuracy" or "reward"); None where the row lacks it."""
        return self.reward_estimate() if metric == REWARD else self.estimate()


#: task -> setting -> iteration -> point
Evals = dict[str, dict[Setting, dict[int, EvalPoint]]]


def group_rows(rows: Iterable[dict[str, Any]]) -> Evals:
    """Rows by task and setting; a repeated (iteration, task, setting) keeps the later row."""
    evals: Evals = {}
    for line, row in enumerate(rows):
        if row.get("accuracy") is None or "task" not in row or "iteration" not in row:
            continue
        by_setting = evals.setdefault(row["task"], {})
        by_setting.setdefault(Setting.from_row(row), {})[int(row["iteration"])] = EvalPoint.from_row(row, line)
    return evals


def last_iteration(evals: Evals, task: str) -> int | None:
    """The last iteration at which `task` was evaluated, in any setting."""
    its = [k for curve in evals.get(task, {}).values() for k in curve]
    return max(its) if its else None


def change_between(p0: EvalPoint, p1: EvalPoint) -> Estimate:
    """p1 − p0 of one setting: paired bootstrap when both rows list per-example results,
    else Newcombe's interval for independent proportions, else the bare value."""
    if p0.correct and p1.correct and len(p0.correct) == len(p1.correct):
        return paired_bootstrap_change(p0.correct, p1.correct)
    c0, c1 = p0.count, p1.count
    if c0 and c1:
        return newcombe_change(*c0, *c1)
    return Estimate(p1.accuracy - p0.accuracy)


def reward_change(p0: EvalPoint, p1: EvalPoint) -> Estimate | None:
    """Mean-reward p1 − p0 of one setting, in the reward's units: paired bootstrap over the
    per-example rewards when both rows list them, else the bare value, else None (a row
    written before rewards were logged)."""
    if p0.rewards and p1.rewards and len(p0.rewards) == len(p1.rewards):
        return paired_bootstrap_mean_difference(p0.rewards, p1.rewards)
    if p0.reward is None or p1.reward is None:
        return None
    return Estimate(p1.reward - p0.reward)


def metric_change(p0: EvalPoint, p1: EvalPoint, metric: str) -> Estimate | None:
    """p1 − p0 in `metric`: `reward_change` for "reward", else `change_between`."""
    return reward_change(p0, p1) if metric == REWARD else change_between(p0, p1)


def mean_change(pairs: Sequence[tuple[EvalPoint, EvalPoint]]) -> Estimate:
    """Average change over tasks: a joint bootstrap when every task is paired, else the
    per-task intervals combined in quadrature."""
    if all(p0.correct and p1.correct and len(p0.correct) == len(p1.correct) for p0, p1 in pairs):
        return paired_bootstrap_mean_change([(p0.correct or (), p1.correct or ()) for p0, p1 in pairs])
    return quadrature_mean([change_between(p0, p1) for p0, p1 in pairs])


def _usable(curve: dict[int, EvalPoint], last: int | None) -> bool:
    """Both ends of a change present: iteration 0 and the task's last evaluated iteration."""
    return last is not None and last > 0 and 0 in curve and last in curve


def choose_settings(evals_per_run: Sequence[Evals]) -> dict[str, Setting]:
    """For each task the setting to report: the one most runs can compute a change in,
    then the one most runs have rows for, then the larger n, then the most recent row."""
    scores: dict[str, dict[Setting, list[int]]] = {}
    for evals in evals_per_run:
        for task, by_setting in evals.items():
            last = last_iteration(evals, task)
            for setting, curve in by_setting.items():
                s = scores.setdefault(task, {}).setdefault(setting, [0, 0, 0, -1])
                s[0] += _usable(curve, last)
                s[1] += 1
                s[2] = max(s[2], max((p.n or 0) for p in curve.values()))
                s[3] = max(s[3], max(p.line for p in curve.values()))
    return {task: max(by, key=lambda st: tuple(by[st])) for task, by in sorted(scores.items())}


def task_change(evals: Evals, task: str, setting: Setting) -> tuple[EvalPoint, EvalPoint] | None:
    """(iteration 0, last evaluated iteration) in `setting`, or None when either is missing
    there: a change is never taken across settings."""
    curve = evals.get(task, {}).get(setting, {})
    last = last_iteration(evals, task)
    if last is None or not _usable(curve, last):
        return None
    return curve[0], curve[last]


def mean_change_curve(evals: Evals, settings: dict[str, Setting], tasks: Sequence[str]) -> dict[int, Estimate]:
    """Average change over `tasks` at each iteration where all of them (that have an
    iteration 0 in their setting) were evaluated; 0 at iteration 0 by definition."""
    curves = [c for t in tasks if t in settings and 0 in (c := evals.get(t, {}).get(settings[t], {}))]
    if not curves:
        return {}
    common = sorted(set.intersection(*(set(c) for c in curves)))
    return {k: mean_change([(c[0], c[k]) for c in curves]) if k else Estimate(0.0, 0.0, 0.0, "baseline")
            for k in common}
