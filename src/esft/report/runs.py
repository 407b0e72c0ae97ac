"""`esft report`: the paper's comparison table and figures from run directories.

One row per run (labelled from its config, e.g. "ES (30) + AWD L2 λ=10"), one column per
task with the accuracy change from the base model at the last evaluated iteration, and
the average over prior tasks; plus forgetting curves, drift over iterations, a KL heatmap
and, when runs differ only in λ, accuracy against λ.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from esft.evaluation.accuracy import FORGETTING_FILE  # noqa: E402
from esft.io import read_jsonl, write_text_atomic  # noqa: E402


@dataclass
class RunSummary:
    path: Path
    label: str
    config: dict[str, Any]
    target_task: str | None
    accuracy: dict[str, dict[int, float]] = field(default_factory=dict)  # task -> iteration -> acc
    drift: dict[int, float] = field(default_factory=dict)
    kl: dict[str, float] = field(default_factory=dict)  # task -> KL at the last iteration

    def change(self, task: str) -> float | None:
        curve = self.accuracy.get(task)
        if not curve or 0 not in curve:
            return None
        return curve[max(curve)] - curve[0]


def run_label(config: dict[str, Any]) -> str:
    """'ES (30)', 'ES (30) + AWD L2 λ=10', 'GRPO (β=0.005)', from a run's config."""
    if config.get("trainer") == "grpo":
        beta = config.get("beta")
        return "GRPO" + (f" (β={beta:g})" if beta is not None else "")
    label = f"ES ({config.get('population_size', '?')})"
    awd = config.get("awd", "none")
    if awd and awd != "none":
        lam = config.get("awd_lambda")
        if lam is None:
            lam = {"l2": 10.0, "l1": 0.01, "huber": 0.01}.get(awd)
        label += f" + AWD {awd.upper()} λ={lam:g}"
        if config.get("awd_decoupled"):
            label += " (decoupled)"
    return label


def load_run(path: str | Path) -> RunSummary:
    import yaml

    path = Path(path)
    cfg_path = path / "config.yaml"
    if not cfg_path.exists():
        raise ValueError(f"{path} has no config.yaml: is it a run directory (--output_dir of esft train/grpo)?")
    config = yaml.safe_load(cfg_path.read_text()) or {}
    summary = RunSummary(path, run_label(config), config, config.get("task"))
    for row in read_jsonl(path / "eval" / FORGETTING_FILE):
        summary.accuracy.setdefault(row["task"], {})[int(row["iteration"])] = float(row["accuracy"])
    for m in read_jsonl(path / "metrics.jsonl"):
        if "drift/norm" in m:
            summary.drift[int(m["iteration"])] = float(m["drift/norm"])
    drift_file = path / "drift.json"
    if drift_file.exists():
        for rec in json.loads(drift_file.read_text()):
            summary.drift[int(rec["iteration"])] = float(rec["global"]["norm"])
    kl_file = path / "kl.json"
    if kl_file.exists():
        rows = json.loads(kl_file.read_text())
        if rows:
            last = max(r["iteration"] for r in rows)
            summary.kl = {r["task"]: float(r["kl_exact_token"]) for r in rows if r["iteration"] == last}
    return summary


def _unique_labels(runs: list[RunSummary]) -> None:
    seen: dict[str, int] = {}
    for r in runs:
        seen[r.label] = seen.get(r.label, 0) + 1
    for r in runs:
        if seen[r.label] > 1:
            r.label = f"{r.label} [{r.path.name}]"


def comparison_rows(runs: list[RunSummary]) -> tuple[list[str], list[list[Any]]]:
    tasks = sorted({t for r in runs for t in r.accuracy})
    header = ["run", *[f"Δ {t}" for t in tasks], "avg Δ prior"]
    rows = []
    for r in runs:
        changes = {t: r.change(t) for t in tasks}
        prior = [v for t, v in changes.items() if v is not None and t != r.target_task]
        avg = sum(prior) / len(prior) if prior else None
        rows.append([r.label, *[changes[t] for t in tasks], avg])
    return header, rows


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{100 * v:+.1f}"
    return str(v)


def markdown_table(runs: list[RunSummary]) -> str:
    header, rows = comparison_rows(runs)
    out = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in rows:
        out.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(out)


def csv_table(runs: list[RunSummary]) -> str:
    header, rows = comparison_rows(runs)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for row in rows:
        w.writerow(["" if v is None else v for v in row])
    return buf.getvalue()


# ------------------------------------------------------------------------ figures
def plot_forgetting(runs: list[RunSummary], path: Path) -> Path | None:
    tasks = sorted({t for r in runs for t in r.accuracy})
    if not tasks:
        return None
    cols = min(4, len(tasks))
    rows = (len(tasks) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for r in runs:
            curve = r.accuracy.get(task)
            if curve:
                its = sorted(curve)
                ax.plot(its, [100 * curve[k] for k in its], marker="o", markersize=3, label=r.label)
        role = " (target)" if any(r.target_task == task for r in runs) else ""
        ax.set(title=task + role, xlabel="iteration", ylabel="accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_drift(runs: list[RunSummary], path: Path) -> Path | None:
    if not any(r.drift for r in runs):
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        if r.drift:
            its = sorted(r.drift)
            ax.plot(its, [r.drift[k] for k in its], label=r.label)
    ax.set(xlabel="iteration", ylabel="‖θ − θ₀‖₂", title="Weight drift")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_kl_heatmap(runs: list[RunSummary], path: Path) -> Path | None:
    tasks = sorted({t for r in runs for t in r.kl})
    if not tasks:
        return None
    import numpy as np

    data = np.array([[r.kl.get(t, np.nan) for r in runs] for t in tasks])
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(runs), 1.2 + 0.5 * len(tasks)))
    im = ax.imshow(data, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(runs)), [r.label for r in runs], rotation=30, ha="right", fontsize=7)
    ax.set_yticks(range(len(tasks)), tasks)
    for i in range(len(tasks)):
        for j in range(len(runs)):
            if not np.isnan(data[i, j]):
                ax.text(j, i, f"{data[i, j]:.2g}", ha="center", va="center", color="w", fontsize=7)
    fig.colorbar(im, ax=ax, label="KL(base ‖ run), nats/token")
    ax.set_title("KL to the base model at the last iteration")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def lambda_sweep(runs: list[RunSummary]) -> list[RunSummary] | None:
    """Runs that differ only in awd_lambda (and output paths), sorted by λ; else None."""
    if len(runs) < 2:
        return None
    ignore = {"awd_lambda", "output_dir", "resume", "report_to", "logging_steps", "save_steps", "disable_tqdm"}
    first = {k: v for k, v in runs[0].config.items() if k not in ignore}
    for r in runs[1:]:
        if {k: v for k, v in r.config.items() if k not in ignore} != first:
            return None
    if len({r.config.get("awd_lambda") for r in runs}) < 2:
        return None
    return sorted(runs, key=lambda r: r.config.get("awd_lambda") or 0.0)


def plot_lambda(runs: list[RunSummary], path: Path) -> Path | None:
    sweep = lambda_sweep(runs)
    if not sweep or not sweep[0].target_task:
        return None
    header, rows = comparison_rows(sweep)
    lams = [r.config.get("awd_lambda") or 0.0 for r in sweep]
    target = [r.accuracy.get(r.target_task, {}) for r in sweep]
    target_acc = [100 * c[max(c)] if c else float("nan") for c in target]
    avg_prior = [100 * row[-1] if row[-1] is not None else float("nan") for row in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lams, target_acc, marker="o", label=f"target accuracy ({sweep[0].target_task})")
    ax.plot(lams, avg_prior, marker="s", label="avg prior-task change")
    ax.set(xlabel="AWD λ", ylabel="percentage points", title="Effect of λ")
    if min(lams) > 0:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def build_report(run_dirs: list[str | Path], output: str | Path) -> Path:
    runs = [load_run(p) for p in run_dirs]
    _unique_labels(runs)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    figures = {
        "forgetting_curves.png": plot_forgetting(runs, out / "forgetting_curves.png"),
        "drift.png": plot_drift(runs, out / "drift.png"),
        "kl_heatmap.png": plot_kl_heatmap(runs, out / "kl_heatmap.png"),
        "lambda.png": plot_lambda(runs, out / "lambda.png"),
    }
    lines = ["# esft report", "", "Accuracy change from the base model at each run's last evaluated iteration "
             "(percentage points; prior = every task but the run's training task).", "", markdown_table(runs), ""]
    for r in runs:
        lines.append(f"- **{r.label}**: `{r.path}` (task `{r.target_task}`, model `{r.config.get('model')}`)")
    missing = [r.label for r in runs if not r.accuracy]
    if missing:
        lines += ["", f"No accuracy rows for {', '.join(missing)}: run `esft eval --run RUN_DIR --tasks ...` first."]
    lines.append("")
    for name, made in figures.items():
        if made:
            lines += [f"![{name}]({name})", ""]
    write_text_atomic(out / "report.md", "\n".join(lines))
    write_text_atomic(out / "report.csv", csv_table(runs))
    return out / "report.md"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="esft report", description="Compare runs: tables (md, csv) and figures (png).")
    p.add_argument("runs", nargs="+", help="run directories (ES or GRPO)")
    p.add_argument("--output", required=True)
    a = p.parse_args(argv)
    path = build_report(a.runs, a.output)
    print(path.read_text())
    print(f"report: {path}")
    return 0
