"""The paper's figures as PNGs a person can read without opening a JSON file.

Every panel has units and a title, every accuracy (or, for a reward-measured task such as
conciseness, mean reward) its 95% interval, iteration axes have integer ticks, and each
figure has one legend outside the panels so it never covers data. A run keeps its colour
across figures.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # files only: works on machines without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator, NullLocator  # noqa: E402

from esft.config import RESUMABLE_FIELDS, unused_kl_fields, without_defaults  # noqa: E402
from esft.report.evals import (  # noqa: E402
    ACCURACY,
    REWARD,
    EvalPoint,
    Setting,
    mean_change_curve,
    primary_metric,
    prior_tasks,
)
from esft.report.intervals import Estimate  # noqa: E402
from esft.report.predictions import random_walk_sq  # noqa: E402

if TYPE_CHECKING:
    from esft.report.summary import RunSummary
    from esft.report.tables import ComparisonRow

DPI = 120
AWD_ORDER = ("l2", "l1", "huber")
#: Config fields that do not make two λ-sweep runs different experiments.
SWEEP_FREE = (RESUMABLE_FIELDS - {"max_steps"}) | {"awd_lambda", "awd_lambda_chosen"}
#: ...and those that a no-AWD reference may differ in on top.
REFERENCE_FREE = SWEEP_FREE | {"awd", "awd_decoupled", "awd_huber_delta"}
SHORT_NAMES = {"population_size": "N", "learning_rate": "α", "sigma": "σ", "awd_decoupled": "decoupled"}
#: Plotted value per unit of each metric: accuracy in percent, a reward in its own units.
SCALE = {ACCURACY: 100.0, REWARD: 1.0}
ACCURACY_LABEL = "accuracy (%), 95% Wilson interval"
REWARD_LABEL = "mean reward, 95% bootstrap interval"
POINTS_CHANGE_LABEL = "change from iteration 0 (points)"
REWARD_CHANGE_LABEL = "change in mean reward from iteration 0"


# --------------------------------------------------------------------- helpers
def color(i: int) -> str:
    """The colour of the i-th run, the same in every figure."""
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return cycle[i % len(cycle)]


def _subplots(nrows: int, ncols: int, size: tuple[float, float]) -> tuple[Figure, np.ndarray]:
    # Constrained layout sizes every panel so titles, labels, colorbars and the outside
    # legend all fit the canvas.
    return plt.subplots(nrows, ncols, figsize=size, layout="constrained", squeeze=False, dpi=DPI)


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path)
    plt.close(fig)
    return path


def _legend(fig: Figure, handles: Sequence[Any], where: str = "lower center") -> None:
    """One legend per figure, outside the panels, where it cannot cover data."""
    if handles:
        ncols = 1 if "right" in where else min(3, len(handles))
        fig.legend(handles=list(handles), loc=f"outside {where}", ncols=ncols, fontsize=8, frameon=False)


def _run_handles(runs: Sequence[RunSummary], which: Sequence[int]) -> list[Line2D]:
    return [Line2D([], [], color=color(i), marker="o", markersize=4, label=runs[i].label) for i in which]


def _iteration_axis(ax: Axes) -> None:
    ax.set_xlabel("iteration")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
    ax.grid(alpha=0.3)


def _dodge(i: int, n: int, span: float) -> float:
    """A small horizontal shift per run so that error bars at one iteration stay apart."""
    return 0.0 if n < 2 else (i - (n - 1) / 2) * 0.012 * max(span, 1.0)


def _plot_estimates(ax: Axes, xs: Sequence[float], ests: Sequence[Estimate], c: str, label: str,
                    dodge: float = 0.0, scale: float = 100.0, **kw: Any) -> Line2D:
    """A line through the values, with 95% error bars where an interval exists."""
    xs = [x + dodge for x in xs]
    line = ax.plot(xs, [scale * e.value for e in ests], color=c, marker=kw.pop("marker", "o"), markersize=3.5,
                   linewidth=1.3, label=label, **kw)[0]
    bars = [(x, e) for x, e in zip(xs, ests) if e.has_interval]
    if bars:
        ax.errorbar([x for x, _ in bars], [scale * e.value for _, e in bars],
                    yerr=[[max(0.0, scale * (e.value - e.lo)) for _, e in bars],
                          [max(0.0, scale * (e.hi - e.value)) for _, e in bars]],
                    fmt="none", ecolor=c, elinewidth=0.9, capsize=2.5, alpha=0.85)
    return line


def _empty(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4", fontsize=9)


def _span(runs: Sequence[RunSummary]) -> float:
    its = [k for r in runs for by in r.evals.values() for c in by.values() for k in c]
    its += [int(m["iteration"]) for r in runs for m in r.metrics if "iteration" in m]
    return float(max(its, default=1))


def _target_curve(r: RunSummary, settings: dict[str, Setting]) -> dict[int, EvalPoint]:
    t = r.target_task
    return r.evals.get(t, {}).get(settings[t], {}) if t in settings else {}


def _target_metric(r: RunSummary) -> str:
    return primary_metric(r.target_task) if r.target_task else ACCURACY


def metric_curve(curve: dict[int, EvalPoint], metric: str) -> tuple[list[int], list[Estimate]]:
    """(iterations, estimates) of one task in `metric`, skipping rows that lack it."""
    pts = [(k, e) for k in sorted(curve) if (e := curve[k].metric_estimate(metric)) is not None]
    return [k for k, _ in pts], [e for _, e in pts]


def prior_curve(r: RunSummary, settings: dict[str, Setting]) -> dict[int, Estimate]:
    """Average prior-task accuracy change per iteration, in each task's reported setting."""
    return mean_change_curve(r.evals, settings, prior_tasks(r.target_task, settings))


# --------------------------------------------------------------------- forgetting (Fig. 1/2)
def plot_forgetting_curves(runs: Sequence[RunSummary], settings: dict[str, Setting], path: Path) -> Path | None:
    """Left: the target task over iterations in its primary metric (the training reward where
    it was never evaluated); right: the average prior-task change."""
    fig, axes = _subplots(1, 2, (12, 4.8))
    ax_t, ax_p = axes[0]
    span = _span(runs)
    targets = sorted({r.target_task for r in runs if r.target_task})
    curves = [(_target_metric(r), *metric_curve(_target_curve(r, settings), _target_metric(r))) for r in runs]
    # The left axis takes accuracy when any run's target is measured by it; a target in the
    # other unit (and the training-reward fallback) goes on a right axis of its own.
    left = REWARD if {m for m, its, _ in curves if its} == {REWARD} else ACCURACY
    right_ax: Axes | None = None
    on_right: set[str] = set()  # "evaluation", "training"
    shown = []
    for i, (r, (metric, its, ests)) in enumerate(zip(runs, curves)):
        dodge, drawn = _dodge(i, len(runs), span), False
        reward = r.series("reward/mean")
        if its:
            ax = ax_t
            if metric != left:
                ax = right_ax = right_ax or ax_t.twinx()
                on_right.add("evaluation")
            _plot_estimates(ax, its, ests, color(i), r.label, dodge, scale=SCALE[metric])
            drawn = True
        elif reward:
            right_ax = right_ax or ax_t.twinx()
            rs = sorted(reward)
            right_ax.plot(rs, [reward[k] for k in rs], color=color(i), linestyle="--", linewidth=1.2)
            on_right.add("training")
            drawn = True
        prior = prior_curve(r, settings)
        if prior:
            ps = sorted(prior)
            _plot_estimates(ax_p, ps, [prior[k] for k in ps], color(i), r.label, dodge)
            drawn = True
        if drawn:
            shown.append(i)
    if not shown:
        plt.close(fig)
        return None
    title = f"Target task: {targets[0]}" if len(targets) == 1 else "Target task (each run's training task)"
    ax_t.set(title=title, ylabel=REWARD_LABEL if left == REWARD else ACCURACY_LABEL)
    _iteration_axis(ax_t)
    handles: list[Any] = _run_handles(runs, shown)
    if right_ax is not None:
        # Short labels: a right-axis label longer than the panel is tall is cut off.
        right = {frozenset({"evaluation"}): "mean reward of reward targets, 95% bootstrap",
                 frozenset({"training"}): "training reward (reward/mean), dashed",
                 frozenset({"evaluation", "training"}): "reward: evaluated (solid), training (dashed)"}
        right_ax.set_ylabel(right[frozenset(on_right)])
        if "evaluation" in on_right:
            handles.append(Line2D([], [], color="0.4", marker="o", markersize=4,
                                  label="mean reward of reward-measured targets, right axis"))
        if "training" in on_right:
            handles.append(Line2D([], [], color="0.4", linestyle="--",
                                  label="dashed: training reward (no target evaluation), right axis"))
    if not any(its for _, its, _ in curves) and right_ax is None:
        _empty(ax_t, "no target-task evaluations or rewards")
    ax_p.axhline(0, color="0.2", linewidth=0.8)
    ax_p.set(title="Prior tasks: average accuracy change", ylabel="change from iteration 0 (points), 95% interval")
    _iteration_axis(ax_p)
    if not any(prior_curve(r, settings) for r in runs):
        _empty(ax_p, "no prior-task evaluations\n(esft eval --run RUN --tasks ...)")
    fig.suptitle("Learning the target task vs. keeping prior tasks")
    _legend(fig, handles)
    return _save(fig, path)


def plot_task_curves(runs: Sequence[RunSummary], settings: dict[str, Setting], path: Path) -> Path | None:
    """One panel per task in its primary metric over iterations: accuracy with Wilson
    intervals, or mean reward with bootstrap intervals of the mean."""
    tasks = list(settings)
    if not tasks:
        return None
    cols = 2 if len(tasks) in (2, 4) else min(3, len(tasks))
    rows = -(-len(tasks) // cols)
    fig, axes = _subplots(rows, cols, (4.3 * cols, 3.3 * rows + 0.8))
    span, shown = _span(runs), set()
    metrics = {t: primary_metric(t) for t in tasks}
    for ax, task in zip(axes.flat, tasks):
        for i, r in enumerate(runs):
            its, ests = metric_curve(r.evals.get(task, {}).get(settings[task], {}), metrics[task])
            if its:
                _plot_estimates(ax, its, ests, color(i), r.label, _dodge(i, len(runs), span),
                                scale=SCALE[metrics[task]])
                shown.add(i)
        role = " (target)" if any(r.target_task == task for r in runs) else ""
        ax.set_title(f"{task}{role}\n{settings[task].describe()}", fontsize=9)
        ax.set_ylabel("mean reward" if metrics[task] == REWARD else "accuracy (%)")
        _iteration_axis(ax)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    if REWARD in metrics.values():
        # Two lines, so that the title fits a one-panel figure.
        fig.suptitle("Each task over iterations (95% intervals:\nWilson for accuracy, bootstrap for mean reward)")
    else:
        fig.suptitle("Accuracy per task over iterations (95% Wilson intervals)")
    _legend(fig, _run_handles(runs, sorted(shown)))
    return _save(fig, path)


# --------------------------------------------------------------------- λ (Fig. 5)
@dataclass
class Sweep:
    """Runs of one AWD kind whose configs agree apart from λ (and output paths)."""

    awd: str
    config: dict[str, Any]
    members: list[tuple[RunSummary, ComparisonRow]]


def _comparable(config: dict[str, Any], free: frozenset[str] | set[str]) -> dict[str, Any]:
    # Runs made before a KL default changed would otherwise split one λ ladder in two.
    # So would runs made before a field existed (read as its default): see without_defaults.
    ignored = set(free) | unused_kl_fields(config.get("kl_budget"))
    return {k: v for k, v in without_defaults(config).items() if k not in ignored}


def lambda_sweeps(runs: Sequence[RunSummary], rows: Sequence[ComparisonRow]) -> list[Sweep]:
    """AWD runs grouped into sweeps over λ, sorted by λ; a set of runs may hold several."""
    groups: dict[tuple[str, str], Sweep] = {}
    for r, row in zip(runs, rows):
        lam = r.awd_lambda
        if r.is_es and r.awd != "none" and lam is not None and lam > 0:
            cfg = _comparable(r.config, SWEEP_FREE)
            key = (r.awd, repr(sorted(cfg.items(), key=lambda kv: kv[0])))
            groups.setdefault(key, Sweep(r.awd, cfg, [])).members.append((r, row))
    for s in groups.values():
        s.members.sort(key=lambda m: m[0].awd_lambda or 0.0)
    order = {a: i for i, a in enumerate(AWD_ORDER)}
    return sorted(groups.values(), key=lambda s: (order.get(s.awd, len(order)), repr(sorted(s.config.items()))))


def _sweep_labels(sweeps: Sequence[Sweep]) -> list[str]:
    """'ES (30)', plus whatever else tells sweeps of one figure apart (e.g. 'α=0.001')."""
    keys = sorted({k for s in sweeps for k in s.config} - {"awd", "population_size"})
    varying = [k for k in keys if len({repr(s.config.get(k)) for s in sweeps}) > 1]
    labels = []
    for s in sweeps:
        extra = [f"{SHORT_NAMES.get(k, k)}={s.config.get(k)}" for k in varying]
        labels.append(f"ES ({s.config.get('population_size', '?')})" + (", " + ", ".join(extra) if extra else ""))
    return labels


def no_awd_reference(sweep: Sweep, runs: Sequence[RunSummary], rows: Sequence[ComparisonRow]
                     ) -> tuple[RunSummary, ComparisonRow, list[str]] | None:
    """The run without AWD to compare a sweep with, and the config fields it differs in.

    Same task and model required; then the closest config, preferring the same N.
    """
    want = _comparable(sweep.config, REFERENCE_FREE)
    best, best_score = None, None
    for r, row in zip(runs, rows):
        if not r.is_es or r.awd != "none" or r.target_task != sweep.config.get("task"):
            continue
        if r.config.get("model") != sweep.config.get("model"):
            continue
        have = _comparable(r.config, REFERENCE_FREE)
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        score = (not diff, have.get("population_size") == want.get("population_size"), -len(diff))
        if best_score is None or score > best_score:
            best, best_score = (r, row, diff), score
    return best


def _reference_band(ax: Axes, e: Estimate | None, c: str, scale: float = 100.0) -> None:
    if e is None:
        return
    ax.axhline(scale * e.value, color=c, linestyle="--", linewidth=1.1)
    if e.has_interval:
        ax.axhspan(scale * e.lo, scale * e.hi, color=c, alpha=0.12, linewidth=0)


def _sweep_metric(sweep: Sweep) -> str:
    return _target_metric(sweep.members[0][0])


def plot_lambda(runs: Sequence[RunSummary], rows: Sequence[ComparisonRow], path: Path) -> Path | None:
    """Target change in its primary metric (top) and average prior accuracy change (bottom)
    against λ, one column per AWD kind (and target metric, where sweeps differ in it)."""
    sweeps = lambda_sweeps(runs, rows)
    kinds = [k for k in AWD_ORDER if any(s.awd == k for s in sweeps)]
    if not any(len({m[0].awd_lambda for s in sweeps if s.awd == k for m in s.members}) > 1 for k in kinds):
        return None
    columns = sorted({(s.awd, _sweep_metric(s)) for s in sweeps if s.awd in kinds},
                     key=lambda km: (kinds.index(km[0]), km[1] != ACCURACY))
    fig, axes = _subplots(2, len(columns), (5.4 * len(columns), 7.4))
    handles: list[Any] = []
    refs = [no_awd_reference(s, runs, rows) for s in sweeps]
    # One reference for the whole figure is grey; several take the colour of their first sweep.
    ref_color: dict[str, str] = {}
    for j, ref in enumerate(refs):
        if ref:
            ref_color.setdefault(str(ref[0].path), color(j))
    if len(ref_color) == 1:
        ref_color = dict.fromkeys(ref_color, "0.3")
    drawn: set[tuple[int, str]] = set()
    notes: dict[int, set[str]] = {}  # column -> config fields its no-AWD reference differs in
    for j, (sweep, label, ref) in enumerate(zip(sweeps, _sweep_labels(sweeps), refs)):
        if sweep.awd not in kinds:
            continue
        metric = _sweep_metric(sweep)
        col, c = columns.index((sweep.awd, metric)), color(j)
        lams = [m[0].awd_lambda or 0.0 for m in sweep.members]
        for row_i, pick in enumerate((lambda cr: cr.target, lambda cr: cr.prior)):
            pts = [(lam, e) for lam, (_, cr) in zip(lams, sweep.members) if (e := pick(cr)) is not None]
            if pts:
                _plot_estimates(axes[row_i, col], [p[0] for p in pts], [p[1] for p in pts], c, label, marker="s",
                                scale=SCALE[metric] if row_i == 0 else 100.0)
        handles.append(Line2D([], [], color=c, marker="s", markersize=4, label=f"{label} + AWD {sweep.awd.upper()}"))
        if not ref or (col, str(ref[0].path)) in drawn:
            continue
        r, cr, diff = ref
        rc = ref_color[str(r.path)]
        _reference_band(axes[0, col], cr.target, rc, SCALE[metric])
        _reference_band(axes[1, col], cr.prior, rc)
        if not any(p == str(r.path) for _, p in drawn):
            handles.append(Line2D([], [], color=rc, linestyle="--", label=f"{r.label}, no AWD: dashed, band = 95%"))
        drawn.add((col, str(r.path)))
        notes.setdefault(col, set()).update(diff)
    for col, (kind, metric) in enumerate(columns):
        for row_i, what in enumerate(("target task", "average prior-task")):
            ax = axes[row_i, col]
            ax.set_xscale("log")
            # The λ values themselves as plain numbers: "3×10⁰" ticks hide the ladder.
            lams = sorted({m[0].awd_lambda or 0.0 for sw in sweeps if sw.awd == kind for m in sw.members} - {0.0})
            ax.set_xticks(lams, [f"{lam:g}" for lam in lams])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.axhline(0, color="0.2", linewidth=0.7)
            title = f"AWD {kind.upper()}: {what} change"
            if notes.get(col):
                title += f"\n(the no-AWD reference differs in {', '.join(sorted(notes[col]))})"
            reward = row_i == 0 and metric == REWARD
            ax.set(title=title, xlabel="λ (log scale)", ylabel=REWARD_CHANGE_LABEL if reward else POINTS_CHANGE_LABEL)
            ax.grid(alpha=0.3)
    fig.suptitle("Effect of the AWD strength λ (95% intervals)")
    _legend(fig, handles)
    return _save(fig, path)


# --------------------------------------------------------------------- drift (Fig. 6)
@dataclass(frozen=True)
class Overlay:
    """A predicted ‖θ_t − θ₀‖ curve drawn over the measured drift."""

    label: str
    linestyle: str
    color: str
    iterations: list[int]
    norms: list[float]


def drift_overlays(runs: Sequence[RunSummary]) -> list[Overlay]:
    """Eq. 2 per distinct (α, N, d) among runs without AWD; transient and fixed point per L2 run."""
    walks: dict[tuple[float, int, int], list[int]] = {}
    out = []
    for i, r in enumerate(runs):
        pred = r.drift_prediction()
        if isinstance(pred, str):
            continue
        T = max(r.drift)
        if pred.kind == "random walk":
            walks.setdefault((pred.alpha, pred.N, pred.d), []).append(i)
            continue
        its = list(range(T + 1))
        out.append(Overlay(f"{r.label}: L2 recursion from θ₀", "-.", color(i), its, [pred.norm(t) for t in its]))
        if pred.stationary_sq is not None:
            out.append(Overlay(f"{r.label}: L2 stationary √X*", ":", color(i), [0, T], [math.sqrt(pred.stationary_sq)] * 2))
    for (alpha, N, d), idx in walks.items():
        T = max(max(runs[i].drift) for i in idx)
        its = list(range(T + 1))
        c = color(idx[0]) if len(idx) == 1 else "0.3"
        out.insert(0, Overlay(f"Eq. 2 random walk √(T·α²·d/N), α={alpha:g}, N={N}, d={d:,}", "--", c, its,
                              [math.sqrt(random_walk_sq(t, alpha, d, N)) for t in its]))
    return out


def plot_drift(runs: Sequence[RunSummary], path: Path) -> Path | None:
    """Measured ‖θ − θ₀‖ per run against the noise-only predictions."""
    drawn = [i for i, r in enumerate(runs) if r.drift]
    if not drawn:
        return None
    fig, axes = _subplots(1, 1, (10, 4.8))
    ax = axes[0, 0]
    handles: list[Any] = []
    for i in drawn:
        its = sorted(runs[i].drift)
        handles.append(ax.plot(its, [runs[i].drift[k] for k in its], color=color(i), linewidth=1.8,
                               marker="o" if len(its) <= 30 else None, markersize=3, label=runs[i].label)[0])
    for o in drift_overlays(runs):
        handles.append(ax.plot(o.iterations, o.norms, color=o.color, linestyle=o.linestyle, linewidth=1.2,
                               label=o.label)[0])
    ax.set(title="Weight drift vs. the noise-only prediction (Eq. 2)", ylabel="‖θ − θ₀‖₂ (distance from the base)")
    ax.set_ylim(bottom=0)
    _iteration_axis(ax)
    _legend(fig, handles, where="right upper")
    return _save(fig, path)


# --------------------------------------------------------------------- KL (Fig. 7)
def plot_kl_heatmap(runs: Sequence[RunSummary], path: Path) -> Path | None:
    """Tasks × runs, KL(base ‖ run) at each run's last KL iteration."""
    tasks = sorted({t for r in runs for t in r.kl})
    if not tasks:
        return None
    data = np.array([[r.kl.get(t, np.nan) for r in runs] for t in tasks])
    longest = max(len(r.label) for r in runs)
    fig, axes = _subplots(1, 1, (3.0 + 1.2 * len(runs), 1.8 + 0.5 * len(tasks) + 0.06 * longest))
    ax = axes[0, 0]
    im = ax.imshow(data, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(runs)), [r.label for r in runs], rotation=30, ha="right", rotation_mode="anchor",
                  fontsize=8)
    ax.set_yticks(range(len(tasks)), tasks)
    for i in range(len(tasks)):
        for j in range(len(runs)):
            if not np.isnan(data[i, j]):
                shade = "black" if im.norm(data[i, j]) > 0.6 else "white"
                ax.text(j, i, f"{data[i, j]:.2g}", ha="center", va="center", color=shade, fontsize=8)
    fig.colorbar(im, ax=ax, label="KL(base ‖ run), nats/token")
    ax.set_title("KL to the base model at the last iteration")
    return _save(fig, path)


#: The KL budget's probe: a hollow marker, on the axes and in the legend alike.
PROBE_STYLE = dict(color="C0", marker="o", markersize=4.5, markerfacecolor="none", linestyle="none")


def plot_kl_budget(runs: Sequence[RunSummary], path: Path) -> Path | None:
    """Per run with a KL budget: measured KL and the budget over iterations, reward on the right axis."""
    tracked = [r for r in runs if r.series("kl/measured")]
    if not tracked:
        return None
    cols = min(2, len(tracked))
    rows = -(-len(tracked) // cols)
    fig, axes = _subplots(rows, cols, (6.2 * cols, 3.6 * rows + 0.6))
    probed = False
    for ax, r in zip(axes.flat, tracked):
        kl, budget, reward = r.series("kl/measured"), r.series("kl/budget"), r.series("reward/mean")
        its = sorted(kl)
        ax.plot(its, [kl[k] for k in its], color="C0", marker="o", markersize=3.5)
        probe = r.series("kl/probe")  # at θ₀ + one random update-sized step, before the first update
        if probe:
            probed = True
            ax.plot(list(probe), list(probe.values()), **PROBE_STYLE)
        if budget:
            b = sorted(budget)
            ax.plot(b, [budget[k] for k in b], color="C3", linestyle="--", drawstyle="steps-post")
        ax.set(title=r.label, ylabel="KL to the base (nats/token)")
        ax.set_ylim(bottom=0)
        _iteration_axis(ax)
        if reward:
            tw = ax.twinx()
            rs = sorted(reward)
            tw.plot(rs, [reward[k] for k in rs], color="0.45", linewidth=1.0)
            tw.set_ylabel("target reward (reward/mean)")
    for ax in list(axes.flat)[len(tracked):]:
        ax.axis("off")
    fig.suptitle("KL budget: measured KL to the base and the target reward")
    handles = [Line2D([], [], color="C0", marker="o", markersize=4, label="measured KL (left axis)")]
    if probed:
        handles.append(Line2D([], [], **PROBE_STYLE, label="the probe: θ₀ + one update-sized step (left axis)"))
    _legend(fig, [*handles, Line2D([], [], color="C3", linestyle="--", label="KL budget (left axis)"),
                  Line2D([], [], color="0.45", label="target reward (right axis)")])
    return _save(fig, path)


# --------------------------------------------------------------------- all
Plot = Callable[[Sequence["RunSummary"], dict[str, Setting], Sequence["ComparisonRow"], Path], "Path | None"]

#: file name -> (caption in report.md, how to draw it); a figure without data is skipped.
def plot_seeds(rows: Sequence[ComparisonRow], path: Path) -> Path | None:
    """Each setting trained at several seeds: every seed a dot, the mean and its t-interval
    over seeds a bar; the target change (left) and the mean prior-task KL (right)."""
    from esft.report.seeds import seed_groups

    groups = seed_groups(rows)
    if not groups:
        return None
    target = next((g.rows[0].run.target_task for g in groups if g.rows[0].run.target_task), None)
    metric = primary_metric(target) if target else ACCURACY
    scale = SCALE[metric]
    fig, axes = _subplots(1, 2, (max(8.0, 1.6 * len(groups) + 4), 4.2))
    panels = [(axes[0, 0], lambda g: [v * scale for v in g.target_values], lambda g: g.target, scale,
               f"Δ {target or 'target'} from iteration 0" + (" (points)" if metric == ACCURACY else " (reward)")),
              (axes[0, 1], lambda g: g.kl_values, lambda g: g.kl, 1.0, "mean prior-task KL (nats/token)")]
    for ax, values, summary, factor, title in panels:
        for i, g in enumerate(groups):
            v = values(g)
            jitter = np.linspace(-0.12, 0.12, len(v)) if len(v) > 1 else np.zeros(len(v))
            ax.scatter(i + jitter, v, color=color(i), s=22, alpha=0.8, zorder=3)
            e = summary(g)
            if e is not None and e.has_interval:
                ax.errorbar([i + 0.3], [e.value * factor], yerr=[[(e.value - e.lo) * factor], [(e.hi - e.value) * factor]],
                            fmt="_", color="black", capsize=4, markersize=14, zorder=4)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{g.label}\n({len(g.seeds)} seeds)" for g in groups], rotation=20, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].axhline(0, color="grey", lw=0.8)
    fig.suptitle("Each training seed a dot; black: mean and 95% t-interval over seeds", fontsize=10)
    return _save(fig, path)


PLOTS: dict[str, tuple[str, Plot]] = {
    "forgetting_curves.png": ("Target task in its primary metric, accuracy or mean reward (left), and average "
                              "prior-task change (right) over iterations",
                              lambda runs, settings, rows, path: plot_forgetting_curves(runs, settings, path)),
    "task_curves.png": ("Each task's primary metric (accuracy or mean reward) over iterations",
                        lambda runs, settings, rows, path: plot_task_curves(runs, settings, path)),
    "lambda.png": ("Target and average prior-task change against λ",
                   lambda runs, settings, rows, path: plot_lambda(runs, rows, path)),
    "drift.png": ("‖θ − θ₀‖ over iterations against the noise-only prediction",
                  lambda runs, settings, rows, path: plot_drift(runs, path)),
    "kl_heatmap.png": ("KL to the base model per task and run",
                       lambda runs, settings, rows, path: plot_kl_heatmap(runs, path)),
    "kl_budget.png": ("Measured KL against the KL budget",
                      lambda runs, settings, rows, path: plot_kl_budget(runs, path)),
    "seeds.png": ("Settings trained at several seeds: each seed a dot, the mean and its t-interval over seeds",
                  lambda runs, settings, rows, path: plot_seeds(rows, path)),
}


def make_all(runs: Sequence[RunSummary], settings: dict[str, Setting], rows: Sequence[ComparisonRow],
             out: Path) -> dict[str, str]:
    """Every figure the runs have data for: file name -> caption."""
    made = {}
    for name, (caption, plot) in PLOTS.items():
        if plot(runs, settings, rows, out / name) is not None:
            made[name] = caption
    return made
