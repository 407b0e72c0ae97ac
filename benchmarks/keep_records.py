"""Keep the small files of a sweep's runs in the repository, so that a measurement outlives
the machine it ran on.

A run directory holds gigabytes (θ₀, checkpoints, the final model) but its result is a few
tens of kilobytes: the config, the seed log (with the base model, the run itself: every
weight replays from it), the metrics, the held-out and prior-task scores, the KL. The
benchmark scripts read exactly these files, so a record directory is a valid input to
`paper_claims.py` and `auto_lambda_grid.py`, and sessions on fresh machines add runs to the
same table instead of retraining the ones measured before.

    python benchmarks/keep_records.py runs/paper-claims benchmarks/results/kept/paper-claims
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

#: What a record keeps, relative to its run directory (the scripts' inputs and the seed log).
KEPT = ("config.yaml", "seedlog.jsonl", "metrics.jsonl", "kl.json", "eval/forgetting.jsonl")


def finished(run: Path) -> bool:
    """A run whose evaluation and KL are written; an unfinished one is left for a later call."""
    return (run / "config.yaml").exists() and (run / "eval" / "forgetting.jsonl").exists() and (run / "kl.json").exists()


def keep(sweep_dir: Path, records: Path) -> list[str]:
    """Copy the kept files of every finished run of `sweep_dir` to `records/<run>/`; returns the runs."""
    kept = []
    for run in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name != "report"):
        if not finished(run):
            continue
        for name in KEPT:
            if (run / name).exists():
                (records / run.name / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(run / name, records / run.name / name)
        kept.append(run.name)
    return kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("records", type=Path, help="e.g. benchmarks/results/kept/paper-claims")
    a = ap.parse_args()
    kept = keep(a.sweep_dir, a.records)
    print(f"kept {len(kept)} runs in {a.records}: {', '.join(kept) or '-'}")


if __name__ == "__main__":
    main()
