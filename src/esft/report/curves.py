"""Reward and drift curves over iterations, one line per run (the quickstart's plot)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: works on machines without a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def plot_training_curves(
    runs: dict[str, list[dict[str, Any]]], path: str | Path,
    heldout: dict[str, dict[int, tuple[float, float, float]]] | None = None,
) -> Path:
    """Two panels: population mean reward (with min–max band) and ‖θ − θ₀‖.

    `heldout`: per run, iteration -> (reward, lo, hi) of the greedy reward on held-out
    examples, drawn as squares with their 95% intervals on the reward panel: the training
    population's mean is a noisy view, the held-out reward is what a run kept.
    """
    fig, (ax_r, ax_d) = plt.subplots(1, 2, figsize=(11, 4.4), layout="constrained")
    for i, (label, history) in enumerate(runs.items()):
        it = [m["iteration"] for m in history]
        mean = [m["reward/mean"] for m in history]
        line = ax_r.plot(it, mean, label=label, marker="o", markersize=3)[0]
        ax_r.fill_between(it, [m["reward/min"] for m in history], [m["reward/max"] for m in history],
                          color=line.get_color(), alpha=0.15)
        ax_d.plot(it, [m["drift/norm"] for m in history], color=line.get_color())
        points = (heldout or {}).get(label, {})
        if points:
            ks = sorted(points)
            values = [points[k][0] for k in ks]
            err = [[points[k][0] - points[k][1] for k in ks], [points[k][2] - points[k][0] for k in ks]]
            # Side by side, not on top of each other: the runs share the base model's point.
            shift = 0.015 * max(ks[-1], 1) * (i - (len(runs) - 1) / 2)
            ax_r.errorbar([k + shift for k in ks], values, yerr=err, color=line.get_color(), marker="s", markersize=6, linestyle="--",
                          linewidth=1.2, capsize=4, label=f"{label}: held-out (greedy, 95% CI)")
    ax_r.set(xlabel="iteration", ylabel="reward (population mean, band = min..max)",
             title="Training reward" + (" and held-out reward" if heldout else ""))
    ax_d.set(xlabel="iteration", ylabel="‖θ − θ₀‖₂", title="Weight drift from the base model")
    for ax in (ax_r, ax_d):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    # One legend for both panels, below them, so it never covers a curve.
    fig.legend(loc="outside lower center", ncols=min(4, 2 * len(runs) if heldout else len(runs)), frameon=False)
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
