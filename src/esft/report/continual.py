"""Task sequences: the forgetting matrix and the continual-learning summaries.

A sequence is a chain of ordinary runs, each started from the previous one's final weights
(an ES stage's `init_from`, a GRPO stage's `model: <previous>/final`): the report finds the
chains among its runs, nothing else knows about stages.
For a chain of T stages with target tasks 1..T (and any prior tasks evaluated beside them):

    R[0][j]   task j on the base model (the first stage's iteration 0)
    R[i][j]   task j after stage i (stage i's last evaluated iteration)
    ACC = mean_j R[T][j]                       (j over the stage tasks)
    BWT = mean_{j<T} (R[T][j] − R[j][j])       backward transfer: < 0 is forgetting
    FWT = mean_{j>1} (R[j−1][j] − R[0][j])     forward transfer
    BWT_rel = mean_{j<T} (R[T][j] − R[j][j]) / (R[j][j] − R[j−1][j])

each in the task's primary metric (accuracy, or mean reward for reward-measured tasks; a
chain mixing the two averages unlike units, which the report says). BWT_rel is unitless:
the share of each stage's own gain lost by the end (−0.1: a tenth of it), so it averages
tasks whose rewards differ in scale; it is undefined when a stage did not gain. The
intervals come from a paired bootstrap over each task's evaluation examples (the same test
examples at every stage, resampled together), 2,000 replicates, seed 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from esft.report.evals import REWARD, EvalPoint, Setting, primary_metric

RESAMPLES = 2000
MATRIX_FILE = "forgetting_matrix.json"


def started_from(config: dict[str, Any]) -> str | None:
    """The run directory a stage started from: an ES stage's `init_from`; a GRPO stage loads
    the previous stage's `final/` as its model."""
    from esft.evaluation.runs import grpo_parent

    if config.get("init_from"):
        return str(config["init_from"])
    parent = grpo_parent(config)
    return None if parent is None else str(parent)


def sequences(runs: Sequence[Any]) -> list[list[Any]]:
    """Chains of at least two runs linked by `started_from`, in stage order (first: no parent among the runs).

    A stage's `init_from` names the directory it trained in; a chain whose records were copied
    elsewhere together (benchmarks/keep_records.py) links through the sibling of that name."""
    by_path = {Path(r.path).resolve(): r for r in runs}
    child: dict[Path, Any] = {}
    for r in runs:
        parent = started_from(r.config)
        if not parent:
            continue
        linked = Path(parent).resolve()
        if linked not in by_path:
            linked = Path(r.path).resolve().parent / Path(parent).name
        if linked in by_path:
            child[linked] = r
    # A head is a parent that is nobody's child: a first stage may itself name a model directory
    # outside the sweep (a GRPO arm whose base model is some run's final/).
    children = {id(r) for r in child.values()}
    heads = [r for r in runs if Path(r.path).resolve() in child and id(r) not in children]
    out = []
    for head in heads:
        chain = [head]
        while Path(chain[-1].path).resolve() in child:
            chain.append(child[Path(chain[-1].path).resolve()])
        out.append(chain)
    return out


def _point(run: Any, task: str, setting: Setting | None, last: bool) -> EvalPoint | None:
    curves = run.evals.get(task, {})
    curve = curves.get(setting) if setting is not None else None
    if curve is None and curves:
        curve = max(curves.values(), key=len)
    if not curve:
        return None
    return curve[max(curve)] if last else curve.get(0)


def _values(point: EvalPoint | None, metric: str) -> np.ndarray | None:
    if point is None:
        return None
    if metric == REWARD:
        return np.asarray(point.rewards, dtype=np.float64) if point.rewards else None
    return np.asarray(point.correct, dtype=np.float64) if point.correct else None


def forgetting_matrix(chain: Sequence[Any], settings: dict[str, Setting]) -> dict[str, Any]:
    """The matrix, its intervals, ACC, BWT, FWT (with bootstrap intervals) and the prior KL
    after each stage, for one chain of runs."""
    stage_tasks = [r.target_task for r in chain]
    priors = [t for t in settings if t not in stage_tasks]
    tasks = stage_tasks + priors
    metrics = [primary_metric(t) for t in tasks]
    # points[i][j]: row 0 the base model, row i the end of stage i.
    points = [[_point(chain[0], t, settings.get(t), last=False) for t in tasks]]
    points += [[_point(run, t, settings.get(t), last=True) for t in tasks] for run in chain]
    matrix, intervals = [], []
    for row in points:
        cells, bounds = [], []
        for p, metric in zip(row, metrics):
            e = p.metric_estimate(metric) if p is not None else None
            cells.append(None if e is None else e.value)
            bounds.append(None if e is None or not e.has_interval else [e.lo, e.hi])
        matrix.append(cells)
        intervals.append(bounds)
    per_example = [[_values(p, m) for p, m in zip(row, metrics)] for row in points]
    T = len(chain)
    summary = _summaries(matrix, per_example, T)
    kl = [float(np.mean(list(r.kl.values()))) if r.kl else None for r in chain]
    return {
        "runs": [str(r.path) for r in chain], "labels": [r.label for r in chain], "arm": arm_label(chain),
        "seed": int(chain[0].config.get("seed") or 0), "tasks": tasks,
        "stage_tasks": stage_tasks, "metrics": metrics, "units": "mixed" if len(set(metrics[:T])) > 1 else metrics[0],
        "matrix": matrix, "intervals": intervals, **summary, "prior_kl_after_stage": kl,
    }


def arm_label(chain: Sequence[Any]) -> str:
    """The setting of a chain in words: its last stage's label without the run name, and whether
    its stages re-anchor (two AWD arms differ only in that)."""
    from esft.report.summary import run_label

    return run_label(chain[-1].config) + (", re-anchored" if chain[-1].config.get("anchor_at") == "start" else "")


def _arm_key(chain: Sequence[Any]) -> str:
    """Everything that decides a chain but its seed: each stage's setting without the link to
    the stage before (whose directory name carries the seed)."""
    import json

    from esft.report.seeds import setting_key

    keys = []
    for r in chain:
        config = dict(r.config)
        if started_from(config):
            config.pop("init_from", None)
            if config.get("trainer") == "grpo":
                config.pop("model", None)
        keys.append(setting_key(config))
    return json.dumps(keys)


def over_seeds(chains: Sequence[Sequence[Any]], results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sequences that differ only in the training seed, summarised over the seeds: ACC, BWT,
    FWT, BWT_rel and the prior KL after each stage, each as the mean over seeds with a 95%
    t-interval over them and the per-seed values (an ES run at small N is one draw of many:
    the interval over examples says how well that draw was measured, not what the next gives)."""
    from esft.report.intervals import t_interval

    groups: dict[str, list[tuple[Any, dict[str, Any]]]] = {}
    for chain, result in zip(chains, results):
        groups.setdefault(_arm_key(chain), []).append((chain, result))
    out = []
    for members in groups.values():
        if len(members) < 2:
            continue
        members.sort(key=lambda m: int(m[0][0].config.get("seed") or 0))
        first = members[0][0]
        label = arm_label(first)

        def estimate(values: list[float | None]) -> dict[str, Any] | None:
            if any(v is None for v in values):
                return None
            e = t_interval([float(v) for v in values])
            return {"mean": e.value, "lo": e.lo, "hi": e.hi, "values": values}

        row: dict[str, Any] = {"label": label, "seeds": [int(m[0][0].config.get("seed") or 0) for m in members],
                               "runs": [[str(r.path) for r in m[0]] for m in members]}
        for key in ("acc", "bwt", "fwt", "bwt_relative"):
            row[key] = estimate([m[1][key]["value"] for m in members])
        stages = len(first)
        row["prior_kl_after_stage"] = [estimate([m[1]["prior_kl_after_stage"][i] for m in members]) for i in range(stages)]
        out.append(row)
    return out


def over_seeds_markdown(rows: Sequence[dict[str, Any]], units: str) -> list[str]:
    """The over-seed summaries as a table for report.md."""
    if not rows:
        return []

    def fmt(e: dict[str, Any] | None, form: str = "{:+.2f}", scale: float = 1.0) -> str:
        if e is None:
            return "–"
        values = ", ".join(form.format(scale * v) for v in e["values"])
        return f"{form.format(scale * e['mean'])} [{form.format(scale * e['lo'])}, {form.format(scale * e['hi'])}] ({values})"

    scale = 1.0 if units == REWARD else 100.0
    lines = ["", "Over training seeds (mean, 95% t-interval over seeds, then each seed):", "",
             "| arm | seeds | ACC | BWT | BWT / own gain | FWT | prior KL after the last stage |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {', '.join(map(str, r['seeds']))} | {fmt(r['acc'], scale=scale)} | "
                     f"{fmt(r['bwt'], scale=scale)} | {fmt(r['bwt_relative'], '{:+.0f}%', 100.0)} | "
                     f"{fmt(r['fwt'], scale=scale)} | {fmt(r['prior_kl_after_stage'][-1], '{:.3f}')} |")
    return lines


def acc_bwt_fwt(matrix: Sequence[Sequence[float | None]], T: int) -> dict[str, float | None]:
    """ACC, BWT, FWT and BWT_rel of a (T+1) × ≥T matrix (row 0 the base model); None where a cell
    is missing, and BWT_rel None where a stage's own gain is not positive."""
    def mean(xs: list[float | None]) -> float | None:
        return None if not xs or any(x is None for x in xs) else float(np.mean(xs))

    def change(later: float | None, earlier: float | None) -> float | None:
        return None if later is None or earlier is None else later - earlier

    acc = mean([matrix[T][j] for j in range(T)])
    # Stage j's own task: what stage j gained on it, and what the later stages did to that.
    gained = [change(matrix[j + 1][j], matrix[j][j]) for j in range(T - 1)]
    kept = [change(matrix[T][j], matrix[j + 1][j]) for j in range(T - 1)]
    fwt = mean([change(matrix[j][j], matrix[0][j]) for j in range(1, T)])
    rel = [None if g is None or k is None or g <= 0 else k / g for g, k in zip(gained, kept)]
    return {"acc": acc, "bwt": mean(kept), "fwt": fwt, "bwt_relative": mean(rel)}


def _summaries(matrix: list[list[float | None]], per_example: list[list[np.ndarray | None]], T: int) -> dict[str, Any]:
    point = acc_bwt_fwt(matrix, T)
    cols = range(T)
    sizes = {j: {len(per_example[i][j]) for i in range(T + 1) if per_example[i][j] is not None} for j in cols}
    paired = all(per_example[i][j] is not None for i in range(T + 1) for j in cols) and all(len(s) == 1 for s in sizes.values())
    draws: dict[str, list[float]] = {"acc": [], "bwt": [], "fwt": [], "bwt_relative": []}
    if paired:
        rng = np.random.default_rng(0)
        for _ in range(RESAMPLES):
            resampled = [row[:] for row in matrix]
            for j in cols:
                n = len(per_example[0][j])
                idx = rng.integers(0, n, size=n)
                for i in range(T + 1):
                    resampled[i][j] = float(per_example[i][j][idx].mean())
            for key, value in acc_bwt_fwt(resampled, T).items():
                if value is not None:
                    draws[key].append(value)
    out: dict[str, Any] = {}
    for key, value in point.items():
        d = draws[key]
        lo, hi = (float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))) if d else (None, None)
        out[key] = {"value": value, "lo": lo, "hi": hi}
    return out


def markdown(result: dict[str, Any]) -> list[str]:
    """The matrix as a table and the summaries, for report.md."""
    tasks = result["tasks"]
    lines = ["| after | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    names = ["base model"] + [f"stage {i} ({t})" for i, t in enumerate(result["stage_tasks"], start=1)]
    for name, row, bounds in zip(names, result["matrix"], result["intervals"]):
        cells = []
        for v, b, metric in zip(row, bounds, result["metrics"]):
            scale = 1.0 if metric == REWARD else 100.0
            cells.append("–" if v is None else f"{scale * v:.1f}" + ("" if b is None else f" [{scale * b[0]:.1f}, {scale * b[1]:.1f}]"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    def fmt(s: dict[str, Any], share: bool = False) -> str:
        """A summary with its interval: in the matrix's units, or (`share`) as a percentage."""
        if s["value"] is None:
            return "–"
        scale, form = (100.0, "{:+.0f}%") if share else (1.0 if result["units"] == REWARD else 100.0, "{:+.2f}")
        text = form.format(scale * s["value"])
        return text + ("" if s["lo"] is None else f" [{form.format(scale * s['lo'])}, {form.format(scale * s['hi'])}]")

    units = {"accuracy": "points", "reward": "reward units"}.get(result["units"], "mixed units: read the matrix")
    kl = ", ".join("–" if k is None else f"{k:.3f}" for k in result["prior_kl_after_stage"])
    lines += ["", f"ACC {fmt(result['acc'])}, BWT {fmt(result['bwt'])}, FWT {fmt(result['fwt'])} ({units}, "
                  f"95% paired bootstrap over examples); BWT relative to each stage's own gain {fmt(result['bwt_relative'], share=True)}; "
                  f"mean prior-task KL after each stage: {kl}."]
    return lines


def plot(results: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """One heatmap per sequence: each cell the change from the base model, scaled per column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        return None
    # One row per arm, one column per seed: ten sequences in one row would be 45 inches wide.
    grid, seeds = _by_arm_and_seed(results), sorted({r["seed"] for r in results})
    fig, axes = plt.subplots(len(grid), len(seeds), figsize=(4.5 * len(seeds), 3.6 * len(grid)), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.set_axis_off()
    placed = [(axes[i][seeds.index(r["seed"])], label, r) for i, (label, group) in enumerate(grid) for r in group]
    for ax, label, r in placed:
        ax.set_axis_on()
        m = np.array([[math.nan if v is None else v for v in row] for row in r["matrix"]], dtype=float)
        change = m - m[0]
        spread = np.nanmax(np.abs(change), axis=0)
        spread[~np.isfinite(spread) | (spread == 0)] = 1.0
        ax.imshow(change / spread, cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                if np.isfinite(m[i, j]):
                    scale = 1.0 if r["metrics"][j] == REWARD else 100.0
                    dark = abs(change[i, j] / spread[j]) > 0.6  # white on the deep reds and blues
                    ax.text(j, i, f"{scale * m[i, j]:.1f}", ha="center", va="center", fontsize=8,
                            color="white" if dark else "black")
        ax.set_xticks(range(len(r["tasks"])), r["tasks"], rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(m.shape[0]), ["base"] + [f"after {i}" for i in range(1, m.shape[0])], fontsize=8)
        ax.set_title(f"{label}, seed {r['seed']}", fontsize=9)
    fig.suptitle("Forgetting matrix: score of each task (column) after each stage (row); colour: change from the "
                 "base model, per column", fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _by_arm_and_seed(results: Sequence[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """(label, its sequences by seed) per arm, in the order the arms first appear. An arm is its
    setting and its tasks in order; the label names the tasks only where two arms share a setting."""
    arms: dict[tuple[str, tuple[str, ...]], list[dict[str, Any]]] = {}
    for r in results:
        arms.setdefault((r["arm"], tuple(r["stage_tasks"])), []).append(r)
    shared = {arm for arm, _ in arms if sum(a == arm for a, _ in arms) > 1}
    return [(arm if arm not in shared else f"{arm} ({' → '.join(tasks)})", sorted(group, key=lambda r: r["seed"]))
            for (arm, tasks), group in arms.items()]


def plot_summary(results: Sequence[dict[str, Any]], path: Path, goal: float = -0.10) -> Path | None:
    """Per arm, one dot per seed: the share of the stages' own gains lost by the end (BWT
    relative, with its interval over examples; "n/a" where no stage gained) beside the
    prior-task KL after the last stage. The arms' forgetting and cost side by side, which the
    heatmaps show only cell by cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = _by_arm_and_seed(results)
    if not any(r["bwt_relative"]["value"] is not None or r["prior_kl_after_stage"][-1] is not None
               for _, group in grid for r in group):
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 0.6 * len(grid) + 1.6), sharey=True, layout="constrained",
                                      gridspec_kw={"width_ratios": [3, 2]})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    seeds = sorted({r["seed"] for _, group in grid for r in group})
    step = min(0.12, 0.8 / len(seeds))  # the seeds of one arm stay within its row
    for y, (_, group) in enumerate(grid):
        if all(r["bwt_relative"]["value"] is None for r in group):
            left.text(0, y, "n/a: no stage gained", ha="center", va="center", fontsize=7, color="0.4")
        for r in group:
            k = seeds.index(r["seed"])
            offset = y + step * (k - (len(seeds) - 1) / 2)
            colour = colours[k % len(colours)]
            rel = r["bwt_relative"]
            if rel["value"] is not None:
                if rel["lo"] is not None:
                    left.plot([100 * rel["lo"], 100 * rel["hi"]], [offset, offset], color=colour, lw=1.2)
                left.plot(100 * rel["value"], offset, "o", color=colour, label=f"seed {r['seed']}")
            kl = r["prior_kl_after_stage"][-1]
            if kl is not None:
                right.plot(kl, offset, "o", color=colour, label=f"seed {r['seed']}")
    left.axvline(0, color="0.5", lw=0.8)
    left.axvline(100 * goal, color="tab:green", lw=0.8, ls="--", label=f"goal: {100 * goal:+.0f}%")
    left.set_yticks(range(len(grid)), [label for label, _ in grid], fontsize=8)
    left.invert_yaxis()
    left.set_xlabel("BWT / own gain, % (−50%: half of the stages' gains lost; 95% interval over examples)", fontsize=8)
    right.set_xlabel("mean prior-task KL after the last stage (nats/token)", fontsize=8)
    right.set_xlim(left=0)
    handles: dict[str, Any] = {}
    for ax in (left, right):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    left.legend(handles.values(), handles.keys(), fontsize=7, loc="best")
    fig.suptitle("Task sequences: how much of each stage's gain is lost, and at what KL (one dot per seed)", fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["MATRIX_FILE", "acc_bwt_fwt", "forgetting_matrix", "markdown", "over_seeds", "over_seeds_markdown", "plot",
           "plot_summary", "sequences", "started_from"]
