"""`esft report`: the paper's comparison table and figures from run directories.

One row per run (labelled from its config, e.g. "ES (30) + AWD L2 λ=10"), one column per
task with the change from the base model at the last evaluated iteration in the task's
primary metric (accuracy, or mean reward for a task like conciseness) and its 95%
interval, the average accuracy change over prior tasks, the evaluation setting each task used,
weight drift against the random-walk prediction, and the figures of `report/figures.py`.
This module writes the report; run directories are read by `summary.py`, statistics live
in `intervals.py`, settings in `evals.py`, tables in `tables.py`, plots in `figures.py`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from esft.io import write_text_atomic
from esft.report.summary import RunSummary, load_run, run_label, unique_labels


def build_report(run_dirs: list[str | Path], output: str | Path, figures: bool = True) -> Path:
    """report.md, report.csv and (unless `figures=False`) the PNGs for `run_dirs` in `output`;
    returns the path of report.md."""
    from esft.report import tables
    from esft.report.evals import choose_settings

    runs = [load_run(p) for p in run_dirs]
    unique_labels(runs)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    settings = choose_settings([r.evals for r in runs])
    rows = tables.comparison(runs, settings)
    made = {}
    if figures:
        from esft.report.figures import make_all  # matplotlib only when figures are wanted

        made = make_all(runs, settings, rows, out)
    text = tables.report_markdown(runs, settings, rows, made) + _sequence_section(runs, settings, out, figures)
    write_text_atomic(out / "report.md", text)
    write_text_atomic(out / "report.csv", tables.csv_table(rows, list(settings)))
    return out / "report.md"


def _sequence_section(runs: list[RunSummary], settings: dict, out: Path, figures: bool) -> str:
    """Task sequences among the runs (chains of `init_from`): their forgetting matrices in
    report.md, `forgetting_matrix.json` and `forgetting_matrix.png`."""
    import json

    from esft.report import continual

    chains = continual.sequences(runs)
    if not chains:
        return ""
    results = [continual.forgetting_matrix(chain, settings) for chain in chains]
    seeds = continual.over_seeds(chains, results)
    write_text_atomic(out / continual.MATRIX_FILE, json.dumps({"sequences": results, "over_seeds": seeds}, indent=1) + "\n")
    lines = ["", "## Task sequences: the forgetting matrix", "",
             "R[i][j]: task j after stage i (row 0: the base model), in the task's primary metric (points, or "
             "reward units), 95% interval; ACC = mean_j R[T][j], BWT = mean_{j<T} (R[T][j] − R[j][j]), "
             f"FWT = mean_{{j>1}} (R[j−1][j] − R[0][j]); BWT relative to each stage's own gain = mean_{{j<T}} "
             "(R[T][j] − R[j][j]) / (R[j][j] − R[j−1][j]), unitless (−10%: a tenth of the gains lost). "
             f"Numbers also in `{continual.MATRIX_FILE}`.", ""]
    for r in results:
        lines += [f"### {r['labels'][0]} → … ({len(r['stage_tasks'])} stages)", "", *continual.markdown(r), ""]
    if seeds:
        lines += continual.over_seeds_markdown(seeds, results[0]["units"]) + [""]
    if figures and continual.plot(results, out / "forgetting_matrix.png") is not None:
        lines += ["![forgetting matrix](forgetting_matrix.png)", ""]
    if figures and continual.plot_summary(results, out / "forgetting_summary.png") is not None:
        lines += ["![gains lost and prior KL per arm and seed](forgetting_summary.png)", ""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="esft report", description="Compare runs: tables (md, csv) and figures (png).")
    p.add_argument("runs", nargs="+", help="run directories (ES or GRPO)")
    p.add_argument("--output", required=True)
    p.add_argument("--no_figures", action="store_true", help="tables only (report.md, report.csv)")
    a = p.parse_args(argv)
    path = build_report(a.runs, a.output, figures=not a.no_figures)
    print(path.read_text())
    print(f"report: {path}")
    return 0


__all__ = ["RunSummary", "build_report", "load_run", "main", "run_label"]
