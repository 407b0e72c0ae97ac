"""A run is its seed log (DESIGN.md, principle 1).

Each finished iteration appends one record: `iteration`, `seeds`, `rewards`,
`coefficients` (null when the update was skipped) and the prompt subset; timings
live in metrics.jsonl, so the log is a pure function of the config. The weights after
iteration k are base weights + the updates of records 1..k (+ AWD after each), which is
all that replay, resume and distributed catch-up ever need.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esft.io import append_jsonl, read_jsonl

SEEDLOG = "seedlog.jsonl"


@dataclass
class IterationRecord:
    iteration: int
    seeds: list[int]
    rewards: list[float]
    coefficients: list[float] | None  # None: all rewards equal, update skipped
    extra: dict[str, Any]

    @property
    def skipped(self) -> bool:
        return self.coefficients is None

    def to_json(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "seeds": self.seeds,
            "rewards": self.rewards,
            "coefficients": self.coefficients,
            "skipped": self.skipped,
            **self.extra,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> IterationRecord:
        known = {"iteration", "seeds", "rewards", "coefficients", "skipped"}
        return cls(
            iteration=int(d["iteration"]),
            seeds=[int(s) for s in d["seeds"]],
            rewards=[float(r) for r in d["rewards"]],
            coefficients=None if d.get("coefficients") is None else [float(c) for c in d["coefficients"]],
            extra={k: v for k, v in d.items() if k not in known},
        )


class SeedLog:
    """The append-only log file of a run directory."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / SEEDLOG

    def records(self, repair: bool = False) -> list[IterationRecord]:
        recs = [IterationRecord.from_json(d) for d in read_jsonl(self.path, repair=repair)]
        for expected, rec in enumerate(recs, start=1):
            if rec.iteration != expected:
                raise ValueError(
                    f"{self.path} is out of order: record {expected} says iteration {rec.iteration}"
                )
        return recs

    def append(self, record: IterationRecord) -> None:
        append_jsonl(self.path, record.to_json())
