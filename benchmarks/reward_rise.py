"""How far a run's training reward had risen by mid-run: can the log tell a saturating task apart?

`--awd_lambda auto` reads only T, α, N and d, and so cannot see what decides whether any L2 λ
keeps 90% of plain ES's held-out gain with 2× less prior KL: a reward that saturates within the
run (docs/results/auto-lambda.md, "the proportional-gain bound"). A rule reading the run's own
log could see saturation only if the training reward showed it. This prints, for each plain-ES
run given, the share of its training-reward rise (a trailing mean over a fifth of the run,
first iteration to last) reached at T/2 and at 3T/4. A saturating run reaches most of it early.

    python benchmarks/reward_rise.py benchmarks/results/kept/paper-claims/es-n8 \
        benchmarks/results/kept/auto-grid/listing-t20-n8-es ...
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import yaml

REWARD_KEY = "reward/mean"
CHECKPOINTS = (0.5, 0.75)  # fractions of the run at which the rise is read


def reward_curve(run: Path) -> list[float]:
    """The mean training reward of iterations 1..T from metrics.jsonl (a resumed run's later row of
    an iteration wins; the iteration-0 row `auto` writes has no reward)."""
    by_iteration: dict[int, float] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if REWARD_KEY in row and int(row["iteration"]) >= 1:
                by_iteration[int(row["iteration"])] = float(row[REWARD_KEY])
    if not by_iteration:
        raise ValueError(f"{run}: no '{REWARD_KEY}' rows in metrics.jsonl")
    T = max(by_iteration)
    missing = sorted(set(range(1, T + 1)) - set(by_iteration))
    if missing:
        raise ValueError(f"{run}: metrics.jsonl lacks iterations {missing[:5]}")
    return [by_iteration[i] for i in range(1, T + 1)]


def smoothed(curve: list[float]) -> list[float]:
    """Trailing mean over max(2, T // 5) iterations: one iteration's reward is 8 prompts' worth."""
    w = max(2, len(curve) // 5)
    return [sum(curve[max(0, i - w + 1) : i + 1]) / len(curve[max(0, i - w + 1) : i + 1]) for i in range(len(curve))]


def rise_at(curve: list[float], fraction: float) -> float | None:
    """The share of the smoothed curve's rise (first to last value) reached at iteration ⌈fraction·T⌉;
    None when the curve did not rise."""
    s = smoothed(curve)
    total = s[-1] - s[0]
    if total <= 0:
        return None
    return (s[math.ceil(fraction * len(s)) - 1] - s[0]) / total


def describe(run: Path) -> dict[str, Any]:
    config = yaml.safe_load((run / "config.yaml").read_text())
    curve = reward_curve(run)
    return {
        "run": str(run), "task": config.get("task"), "max_steps": len(curve),
        "population_size": config.get("population_size"), "seed": config.get("seed"),
        **{f"rise_at_{f:g}": rise_at(curve, f) for f in CHECKPOINTS},
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    def share(v: float | None) -> str:
        return "–" if v is None else f"{v:.2f}"

    head = ["| run | task | T | N | seed | " + " | ".join(f"rise at {f:g}·T" for f in CHECKPOINTS) + " |",
            "|---|---|---:|---:|---:|" + "---:|" * len(CHECKPOINTS)]
    return "\n".join(head + [
        f"| {Path(r['run']).name} | {r['task']} | {r['max_steps']} | {r['population_size']} | {r['seed']} | "
        + " | ".join(share(r[f"rise_at_{f:g}"]) for f in CHECKPOINTS) + " |" for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories (plain ES)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    rows = [describe(run) for run in a.runs]
    print(markdown(rows))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
