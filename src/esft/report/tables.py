"""The report's tables: changes with intervals (md, csv), settings used, drift.

A task's column is its primary metric: accuracy (markdown in percentage points,
report.csv in fractions, the unit of forgetting.jsonl) or, for a reward-measured task
like conciseness, the mean reward in its own units (header `Δ task (reward)`); each
value beside its 95% interval bounds.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from esft.report.evals import (
    ACCURACY,
    REWARD,
    Setting,
    mean_change,
    metric_change,
    primary_metric,
    prior_tasks,
    task_change,
)
from esft.report.intervals import (
    BOOTSTRAP,
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    NEWCOMBE,
    QUADRATURE,
    Estimate,
)
from esft.report.seeds import SeedGroup, seed_groups

if TYPE_CHECKING:
    from esft.report.summary import RunSummary

ZERO_MARK = "°"
PARTIAL_MARK = "*"


@dataclass
class ComparisonRow:
    """One run's row: the change of each task in its primary metric, and the average
    accuracy change over its prior tasks."""

    run: RunSummary
    changes: dict[str, Estimate | None]
    prior: Estimate | None
    prior_used: int  # prior tasks the average is over
    prior_columns: int  # prior tasks the table has (measured by accuracy)

    @property
    def target(self) -> Estimate | None:
        return self.changes.get(self.run.target_task or "")


def comparison(runs: Sequence[RunSummary], settings: dict[str, Setting]) -> list[ComparisonRow]:
    """Change from iteration 0 to each task's last evaluated iteration, in the task's setting
    and primary metric; the prior average is over the accuracy-measured tasks but the target."""
    out = []
    for r in runs:
        pairs = {t: task_change(r.evals, t, s) for t, s in settings.items()}
        changes = {t: metric_change(*p, primary_metric(t)) if p else None for t, p in pairs.items()}
        priors = prior_tasks(r.target_task, settings)
        prior = [p for t in priors if (p := pairs[t]) is not None]
        out.append(ComparisonRow(r, changes, mean_change(prior) if prior else None, len(prior), len(priors)))
    return out


def column_name(task: str) -> str:
    """'Δ piqa' for an accuracy, 'Δ conciseness (reward)' for a reward-measured task."""
    return f"Δ {task} (reward)" if primary_metric(task) == REWARD else f"Δ {task}"


# --------------------------------------------------------------------- markdown
def reward_units(x: float) -> str:
    """A reward (change) in the reward's own units, signed, one decimal, never '-0.0'."""
    s = f"{x:+.1f}"
    return "+0.0" if s == "-0.0" else s


def points(x: float) -> str:
    """A fraction as signed percentage points, one decimal, never '-0.0'."""
    return reward_units(100 * x)


def cell(e: Estimate | None, partial: bool = False, metric: str = ACCURACY) -> str:
    """'+20.0 [+12.1, +27.5]' (points, or reward units for metric "reward"), '°' when the
    interval holds 0, '–' when there is no value."""
    if e is None:
        return "–"
    fmt = reward_units if metric == REWARD else points
    s = fmt(e.value)
    if e.has_interval:
        s += f" [{fmt(e.lo)}, {fmt(e.hi)}]"
    if e.contains_zero():
        s += ZERO_MARK
    return s + (PARTIAL_MARK if partial else "")


def markdown_table(rows: Sequence[ComparisonRow], tasks: Sequence[str]) -> str:
    header = ["run", *[column_name(t) for t in tasks], "avg Δ prior"]
    out = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for row in rows:
        cells = [cell(row.changes[t], metric=primary_metric(t)) for t in tasks]
        cells.append(cell(row.prior, partial=row.prior is not None and row.prior_used < row.prior_columns))
        out.append(f"| {row.run.label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def footnotes(rows: Sequence[ComparisonRow]) -> list[str]:
    """What the marks mean and which interval methods the table used."""
    tasks = list(rows[0].changes) if rows else []
    reward_tasks = [t for t in tasks if primary_metric(t) == REWARD]
    rewards = [e for row in rows for t in reward_tasks if (e := row.changes[t]) is not None]
    estimates = [e for row in rows for t, e in [*row.changes.items(), ("", row.prior)]
                 if e is not None and t not in reward_tasks]  # accuracies
    methods = {e.method for e in estimates}
    notes = [f"{ZERO_MARK} interval contains 0: not distinguishable from no change.",
             "– no change: the run lacks the task's setting at iteration 0 or at its last evaluated iteration."]
    if any(r.prior is not None and r.prior_used < r.prior_columns for r in rows):
        notes.append(f"{PARTIAL_MARK} average over fewer prior tasks than the table has (the others show –).")
    if BOOTSTRAP in methods:
        notes.append(f"Intervals: paired bootstrap over examples ({BOOTSTRAP_RESAMPLES} resamples, seed "
                     f"{BOOTSTRAP_SEED}, percentile 95%) where both rows list per-example results; the average "
                     "resamples each prior task's examples and averages the per-task changes per replicate.")
    if NEWCOMBE in methods or QUADRATURE in methods:
        notes.append("Intervals: Newcombe's hybrid score interval for a difference of independent proportions "
                     "where rows lack per-example results (`correct`), which ignores the pairing of the two "
                     "evaluations and is usually conservative; averages combine the per-task half-widths in "
                     "quadrature / number of tasks.")
    if reward_tasks:
        names = ", ".join(column_name(t) for t in reward_tasks)
        note = (f"{names}: change in the mean training reward per example, in the reward's own units (not "
                "percentage points): the task is measured by its reward, not by exact-match accuracy; – also "
                "when those rows lack `reward` (evaluated before it was logged).")
        if any(e.has_interval for e in rewards):
            note += (f" Interval: paired bootstrap over the per-example `rewards` ({BOOTSTRAP_RESAMPLES} "
                     f"resamples, seed {BOOTSTRAP_SEED}, percentile 95%), each replicate averaging the redrawn "
                     "examples' reward changes.")
        notes.append(note)
        if any(not e.has_interval for e in rewards):
            notes.append("A reward change without an interval comes from rows without per-example `rewards` "
                         "(evaluated before they were logged).")
        if any(t != row.run.target_task for row in rows for t in reward_tasks):
            notes.append("avg Δ prior leaves out reward-measured tasks: a reward is never averaged with accuracies.")
    if any(e.method == BOOTSTRAP and e.lo == e.hi for e in [*estimates, *rewards]):
        notes.append("An interval of width 0 (e.g. [+0.0, +0.0]): every example moved alike, typically none "
                     "changed, so the bootstrap sees no variation; changes rarer than about 1 in n are not excluded.")
    if any(not e.has_interval for e in estimates):
        notes.append("A value without an interval comes from rows without `n` (evaluated before it was logged).")
    return notes


def settings_lines(runs: Sequence[RunSummary], settings: dict[str, Setting]) -> list[str]:
    """'- piqa: limit 200, 256 new tokens (rows in 3 of 3 runs)', and the settings left out."""
    lines = []
    for task, setting in settings.items():
        having = [r for r in runs if setting in r.evals.get(task, {})]
        line = f"- {task}: {setting.describe()} (rows in {len(having)} of {len(runs)} runs)"
        others = []
        for r in runs:
            for s, curve in r.evals.get(task, {}).items():
                if s != setting:
                    its = ", ".join(str(k) for k in sorted(curve))
                    others.append(f"{s.describe()} in {r.label} at iteration{'s' * (len(curve) > 1)} {its}")
        if others:
            line += "; not used: " + "; ".join(others)
        lines.append(line)
    return lines


# --------------------------------------------------------------------- csv
def csv_table(rows: Sequence[ComparisonRow], tasks: Sequence[str]) -> str:
    """Fractions (reward units for a reward-measured task): each change and the average
    prior change as value, lo95, hi95 columns."""
    names = [*[column_name(t) for t in tasks], "avg Δ prior"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["run", *[f"{n}{suffix}" for n in names for suffix in ("", " lo95", " hi95")]])
    for row in rows:
        values = [*[row.changes[t] for t in tasks], row.prior]
        w.writerow([row.run.label, *[v for e in values for v in _csv_triple(e)]])
    return buf.getvalue()


def _csv_triple(e: Estimate | None) -> list[float | str]:
    if e is None:
        return ["", "", ""]
    if not e.has_interval:
        return [e.value, "", ""]
    return [e.value, e.lo, e.hi]


# --------------------------------------------------------------------- drift
def _g(x: float) -> str:
    return f"{x:.4g}"


def drift_table(runs: Sequence[RunSummary]) -> str:
    """Final ‖θ_T − θ₀‖ against the random-walk (or AWD L2) prediction, one row per run."""
    out = ["| run | T | ‖θ_T − θ₀‖ | predicted | measured / predicted | prediction |",
           "|---|---:|---:|---:|---:|---|"]
    for r in runs:
        pred = r.drift_prediction()
        if not r.drift:
            out.append(f"| {r.label} | – | – | – | – | {pred} |")
            continue
        T = max(r.drift)
        measured = r.drift[T]
        if isinstance(pred, str):
            out.append(f"| {r.label} | {T} | {_g(measured)} | – | – | {pred} |")
            continue
        predicted = pred.norm(T)
        ratio = _g(measured / predicted) if predicted > 0 else "–"
        how = f"{pred.kind}, α={pred.alpha:g}, N={pred.N}, d={pred.d:,}"
        if pred.stationary_sq is not None:
            how += f"; stationary √X* = {_g(math.sqrt(pred.stationary_sq))}"
        out.append(f"| {r.label} | {T} | {_g(measured)} | {_g(predicted)} | {ratio} | {how} |")
    return "\n".join(out)


def drift_notes(runs: Sequence[RunSummary]) -> list[str]:
    notes = ["Prediction: without AWD, Eq. 2 of arXiv 2605.30148, √(T·α²·d/N) (updates of pure noise add up "
             "like a random walk); with AWD L2, √E‖D_T‖² of D ← (1−s)(D + u) from D₀ = 0 with E‖u‖² = α²·d/N and "
             "s = α·λ (λ when decoupled, or the logged `awd/step`), whose fixed point is X* = (1−s)²U/(1−(1−s)²). "
             "A ratio near 1 means the drift is what noise alone would give."]
    lacking = [r.label for r in runs if r.drift and r.drift_prediction() == "metrics.jsonl has no params/trainable (d)"]
    if lacking:
        notes.append(f"No prediction for {', '.join(lacking)}: metrics.jsonl has no `params/trainable` "
                     "(d, the number of trained weights), which the prediction needs.")
    if any(r.config.get("mirror_sampling") for r in runs if r.drift):
        notes.append("Mirrored runs: Eq. 2 assumes independent members; (+ε, −ε) pairs make it approximate.")
    return notes


# --------------------------------------------------------------------- report.md
def harness_section(runs: Sequence[RunSummary]) -> list[str]:
    """The same comparison on lm-evaluation-harness rows (acc_norm), where any run has them."""
    import dataclasses

    from esft.report.evals import choose_settings

    if not any(r.harness for r in runs):
        return []
    shadows = [dataclasses.replace(r, evals=r.harness) for r in runs]
    settings = choose_settings([r.evals for r in shadows])
    rows = comparison(shadows, settings)
    return ["## Accuracy change, lm-evaluation-harness (acc_norm)", "",
            "The same change from iteration 0, measured the way the field reports prior-task accuracy: "
            "lm-evaluation-harness, each answer choice scored by its length-normalised log-likelihood after "
            "a plain-text prompt, zero-shot (`esft eval --harness lm-eval`); points, with the paired "
            "bootstrap interval over examples.", "", markdown_table(rows, list(settings)), ""]


def seeds_table(groups: Sequence[SeedGroup], rows: Sequence[ComparisonRow]) -> str:
    """One line per setting trained at several seeds: target, prior, KL and drift over seeds."""
    target = next((g.rows[0].run.target_task for g in groups if g.rows[0].run.target_task), None)
    metric = primary_metric(target) if target else ACCURACY
    fmt = reward_units if metric == REWARD else points
    out = ["| setting | seeds | Δ target, mean [95% t over seeds] | per-example ± (mean) | avg Δ prior [t] | "
           "mean prior KL [t] | ‖θ − θ₀‖ [t] |", "|---|---|---:|---:|---:|---:|---:|"]
    for g in groups:
        half = "–" if g.example_half_width is None else f"±{fmt(g.example_half_width).lstrip('+')}"
        kl = "–" if g.kl is None else f"{g.kl.value:.4f} [{g.kl.lo:.4f}, {g.kl.hi:.4f}]"
        drift = "–" if g.drift is None else f"{g.drift.value:.2f} [{g.drift.lo:.2f}, {g.drift.hi:.2f}]"
        out.append(f"| {g.label} | {', '.join(map(str, g.seeds))} | {cell(g.target, metric=metric)} | {half} | "
                   f"{cell(g.prior)} | {kl} | {drift} |")
    return "\n".join(out)


def report_markdown(
    runs: Sequence[RunSummary], settings: dict[str, Setting], rows: Sequence[ComparisonRow], figures: dict[str, str]
) -> str:
    """The whole report.md: comparison table, settings, runs, drift table, figures."""
    tasks = list(settings)
    by_reward = any(primary_metric(t) == REWARD for t in tasks)
    lines = ["# esft report", "", "## Accuracy change from the base model", "",
             "Change from iteration 0 to each run's last evaluated iteration of that task, in percentage "
             "points, with its 95% interval [lo, hi]; prior = every task but the run's training task."
             + (" A column marked (reward) is the change in mean reward, in the reward's own units." if by_reward
                else ""), "",
             markdown_table(rows, tasks), ""]
    lines += [f"{n}  " for n in footnotes(rows)]
    lines += ["", "report.csv holds the same numbers as fractions (0.2 = 20 points)"
              + (", reward columns in the reward's units" if by_reward else "")
              + ", with `lo95` and `hi95` columns for the interval bounds.", ""]
    if settings:
        lines += ["### Evaluation setting per task", "",
                  "Changes are only taken between rows of one setting (limit, new tokens, shots, data version); "
                  "each task uses the setting most runs can compare in.", "", *settings_lines(runs, settings), ""]
    lines += harness_section(runs)
    groups = seed_groups(rows)
    if groups:
        lines += ["## Over training seeds", "", seeds_table(groups, rows), "",
                  "Mean over the runs that differ only in `seed`, with a 95% t-interval over those seeds "
                  "(mean ± t·s/√n); the per-example column is the mean half-width of each seed's own interval "
                  "over evaluation examples. Where the seed interval is the wider one, seeds decide the "
                  "comparison, not the number of test questions.", ""]
    lines += ["## Runs", ""]
    for r in runs:
        lines.append(f"- **{r.label}**: `{r.path}` (task `{r.target_task}`, model `{r.config.get('model')}`)")
    missing = [r.label for r in runs if not r.evals]
    if missing:
        lines += ["", f"No accuracy rows for {', '.join(missing)}: run `esft eval --run RUN_DIR --tasks ...` first."]
    lines.append("")
    if any(r.drift for r in runs):
        lines += ["## Weight drift", "", drift_table(runs), "", *[f"{n}  " for n in drift_notes(runs)], ""]
    if figures:
        lines += ["## Figures", ""]
        for name, caption in figures.items():
            lines += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    return "\n".join(lines)
