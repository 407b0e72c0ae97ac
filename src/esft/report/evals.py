"""Evaluation rows grouped by setting, and accuracy changes computed only like with like.

`eval/forgetting.jsonl` may hold the same (iteration, task) several times: evaluated at
`--limit 500` during training, re-evaluated at `--limit 2` for a quick look. Two
accuracies measured on different example sets (or token budgets, shot counts, data
versions) differ by construction, so a change is only ever taken between rows of one
setting, and the report says which setting each task used.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from esft.report.intervals import (
    Estimate,
    accuracy_estimate,
    newcombe_change,
    paired_bootstrap_change,
    paired_bootstrap_mean_change,
    quadrature_mean,
)

#: Row keys that define what was measured; a row without one of them means null.
SETTING_KEYS = ("limit", "max_new_tokens", "num_fewshot", "task_version")


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
    """One evaluated (iteration, task, setting); `line` orders rows by recency in the file."""

    accuracy: float
    n: int | None
    correct: tuple[int, ...] | None
    line: int

    @classmethod
    def from_row(cls, row: dict[str, Any], line: int) -> EvalPoint:
        correct = row.get("correct")
        correct = tuple(int(bool(c)) for c in correct) if isinstance(correct, list) else None
        n = row.get("n")
        return cls(float(row["accuracy"]), int(n) if n is not None else None, correct, line)

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
