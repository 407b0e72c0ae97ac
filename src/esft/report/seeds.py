"""Runs that differ only in their training seed, summarised over the seeds.

ES runs at small N diverge between seeds: two runs that part early are two independent
draws (twelve seed pairs of the KL-budget study had a pair difference with an sd of 7.5
points on gains of about 15). An interval over one run's evaluation examples says how well
that run was measured, not what the next seed gives; a claim about a setting needs the
spread over training seeds. `seed_groups` finds the runs of a report that share every
setting but `seed` (a sweep `grid: {seed: [0, 1, 2]}` makes them), and gives each group's
mean with a t-interval over its seeds beside the typical per-example interval.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from esft.config import INFO_KEYS, RESUMABLE_FIELDS, without_defaults
from esft.report.intervals import Estimate, t_interval

#: A `tables.ComparisonRow` (the run, its changes and prior average); named loosely here,
#: since tables imports this module.
ComparisonRow = Any

#: Config keys two runs of one setting may differ in: the seed, where they were written, how
#: they logged (ES's resumable fields, GRPO's run name and logging dir), notes esft adds.
SEED_FREE = frozenset({"seed", "output_dir", "resume", "resume_from_checkpoint", "logging_dir", "run_name",
                       *RESUMABLE_FIELDS, *INFO_KEYS}) - {"max_steps"}


@dataclass
class SeedGroup:
    """One setting trained at several seeds: per-seed numbers and their t-intervals."""

    label: str
    rows: list[ComparisonRow]
    seeds: list[int]
    target: Estimate | None  # the target task's change, over seeds
    prior: Estimate | None  # the average prior-task change, over seeds
    kl: Estimate | None  # the mean prior-task KL at the last iteration, over seeds
    drift: Estimate | None  # ‖θ − θ₀‖ at the last iteration, over seeds
    example_half_width: float | None  # the mean half-width of the per-seed target intervals

    @property
    def target_values(self) -> list[float]:
        return [r.target.value for r in self.rows if r.target is not None]

    @property
    def kl_values(self) -> list[float]:
        return [v for v in (mean_kl(r) for r in self.rows) if v is not None]


def setting_key(config: dict[str, Any]) -> str:
    """Everything that decides a run but its seed, as a comparable string (a field at its
    default counts as absent: see `without_defaults`)."""
    return json.dumps({k: v for k, v in without_defaults(config).items() if k not in SEED_FREE},
                      sort_keys=True, default=str)


def mean_kl(row: ComparisonRow) -> float | None:
    kl = row.run.kl
    return sum(kl.values()) / len(kl) if kl else None


def _over(values: Sequence[float | None]) -> Estimate | None:
    present = [v for v in values if v is not None and math.isfinite(v)]
    return t_interval(present) if len(present) >= 2 else None


def seed_groups(rows: Sequence[ComparisonRow]) -> list[SeedGroup]:
    """The groups of at least two runs that differ only in `seed`, in the order of their first run."""
    groups: dict[str, list[ComparisonRow]] = {}
    for row in rows:
        groups.setdefault(setting_key(row.run.config), []).append(row)
    out = []
    for members in groups.values():
        seeds = [int(r.run.config.get("seed", 0)) for r in members]
        if len(set(seeds)) < 2:
            continue
        members = [r for _, r in sorted(zip(seeds, members), key=lambda p: p[0])]
        seeds = sorted(seeds)
        halves = [(r.target.hi - r.target.lo) / 2 for r in members if r.target is not None and r.target.has_interval]
        drifts = [r.run.drift[max(r.run.drift)] if r.run.drift else None for r in members]
        out.append(SeedGroup(
            label=_label(members[0]), rows=members, seeds=seeds,
            target=_over([r.target.value if r.target is not None else None for r in members]),
            prior=_over([r.prior.value if r.prior is not None else None for r in members]),
            kl=_over([mean_kl(r) for r in members]), drift=_over(drifts),
            example_half_width=sum(halves) / len(halves) if halves else None,
        ))
    return out


def _label(row: ComparisonRow) -> str:
    from esft.report.summary import run_label

    return run_label(row.run.config)


__all__ = ["SEED_FREE", "SeedGroup", "mean_kl", "seed_groups", "setting_key"]
