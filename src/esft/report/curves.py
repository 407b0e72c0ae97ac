"""Reward and drift curves over iterations, one line per run (the quickstart's plot)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: works on machines without a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def plot_training_curves(runs: dict[str, list[dict[str, Any]]], path: str | Path) -> Path:
    """Two panels: population mean reward (with min–max band) and ‖θ − θ₀‖."""
    fig, (ax_r, ax_d) = plt.subplots(1, 2, figsize=(11, 4.4), layout="constrained")
    for label, history in runs.items():
        it = [m["iteration"] for m in history]
        mean = [m["reward/mean"] for m in history]
        line = ax_r.plot(it, mean, label=label, marker="o", markersize=3)[0]
        ax_r.fill_between(it, [m["reward/min"] for m in history], [m["reward/max"] for m in history],
                          color=line.get_color(), alpha=0.15)
        ax_d.plot(it, [m["drift/norm"] for m in history], color=line.get_color())
    ax_r.set(xlabel="iteration", ylabel="reward (population mean, band = min..max)", title="Training reward")
    ax_d.set(xlabel="iteration", ylabel="‖θ − θ₀‖₂", title="Weight drift from the base model")
    for ax in (ax_r, ax_d):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    # One legend for both panels, below them, so it never covers a curve.
    fig.legend(loc="outside lower center", ncols=min(4, len(runs)), frameon=False)
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
