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

#: What a record keeps, relative to its run directory (the scripts' inputs and the seed log);
#: drift.json holds a GRPO run's drift (an ES run's is in its metrics), when the sweep measured it;
#: auto_lambda.json, `--awd_lambda auto`'s choice and prediction.
KEPT = ("config.yaml", "seedlog.jsonl", "metrics.jsonl", "kl.json", "eval/forgetting.jsonl", "drift.json",
        "auto_lambda.json")


def finished(run: Path, kl: bool = True) -> bool:
    """A run whose evaluation and KL (`kl=False`: a sweep without `kl_tasks`) are written; an
    unfinished one is left for a later call."""
    return ((run / "config.yaml").exists() and (run / "eval" / "forgetting.jsonl").exists()
            and (not kl or (run / "kl.json").exists()))


def keep(sweep_dir: Path, records: Path, kl: bool = True) -> list[str]:
    """Copy the kept files of every finished run of `sweep_dir` to `records/<run>/`; returns the runs."""
    kept = []
    for run in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name != "report"):
        if not finished(run, kl):
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
    ap.add_argument("--without_kl", action="store_true", help="the sweep measures no KL: a run is finished "
                    "once its evaluation is written")
    a = ap.parse_args()
    kept = keep(a.sweep_dir, a.records, kl=not a.without_kl)
    print(f"kept {len(kept)} runs in {a.records}: {', '.join(kept) or '-'}")


if __name__ == "__main__":
    main()
