"""What the report reads from one run directory (ES seed log or GRPO checkpoints).

Loading lives apart from the tables (`tables.py`) and figures (`figures.py`) that use it,
so those import this module and `runs.py` imports all three, without a cycle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esft.config import DEFAULT_AWD_LAMBDA
from esft.evaluation.accuracy import FORGETTING_FILE
from esft.evaluation.harness import HARNESS_FILE
from esft.io import read_jsonl
from esft.report.evals import Evals, group_rows
from esft.report.predictions import DriftPrediction, predict_drift


@dataclass
class RunSummary:
    """Everything the report reads from one run directory."""

    path: Path
    label: str
    config: dict[str, Any]
    target_task: str | None
    evals: Evals = field(default_factory=dict)  # task -> setting -> iteration -> point
    metrics: list[dict[str, Any]] = field(default_factory=list)
    drift: dict[int, float] = field(default_factory=dict)  # iteration -> ‖θ − θ₀‖
    kl: dict[str, float] = field(default_factory=dict)  # task -> KL at the last iteration
    # lm-evaluation-harness rows (eval/harness.jsonl), accuracy = acc_norm: the field's protocol.
    harness: Evals = field(default_factory=dict)

    @property
    def is_es(self) -> bool:
        return self.config.get("trainer") != "grpo"

    @property
    def awd(self) -> str:
        if not self.is_es:
            return "none"
        if self.config.get("kl_budget") is not None:
            return "kl"  # AWD L2 with a step that adapts: not a point on a λ axis
        return self.config.get("awd") or "none"

    @property
    def awd_lambda(self) -> float | None:
        """λ with the per-penalty default filled in (the chosen one for `auto`); None without AWD."""
        if self.awd in ("none", "kl"):
            return None
        return config_lambda(self.config)

    def series(self, key: str) -> dict[int, float]:
        """iteration -> value of one metrics.jsonl key, where it was logged."""
        return {int(m["iteration"]): float(m[key]) for m in self.metrics if m.get(key) is not None and "iteration" in m}

    def drift_prediction(self) -> DriftPrediction | str:
        """Eq. 2 (or its AWD L2 version) up to the last measured iteration, or why there is none."""
        if not self.is_es:
            return "not an ES run"
        if not self.drift:
            return "no drift/norm in metrics.jsonl and no drift.json"
        return predict_drift(self.config, self.metrics, max(self.drift))


def config_lambda(config: dict[str, Any]) -> float | None:
    """A run's λ: the value given, the chosen one for `auto`, else the penalty's default."""
    lam = config.get("awd_lambda")
    if lam == "auto":
        chosen = config.get("awd_lambda_chosen")
        return None if chosen is None else float(chosen)
    return DEFAULT_AWD_LAMBDA.get(config.get("awd") or "none") if lam is None else float(lam)


def run_label(config: dict[str, Any]) -> str:
    """'ES (30)', 'ES (30) + AWD L2 λ=10', 'ES (30) + AWD L2 λ=auto→3', 'ES (30) + KL ≤ 0.05',
    'GRPO (β=0.005)', from a run's config."""
    if config.get("trainer") == "grpo":
        beta = config.get("beta")
        return "GRPO" + (f" (β={beta:g})" if beta is not None else "")
    label = f"ES ({config.get('population_size', '?')})"
    if config.get("kl_budget") is not None:
        return label + f" + KL ≤ {float(config['kl_budget']):g}"
    awd = config.get("awd", "none")
    if awd and awd != "none":
        lam = config_lambda(config)
        shown = "?" if lam is None else f"{lam:g}"
        label += f" + AWD {awd.upper()} λ=" + (f"auto→{shown}" if config.get("awd_lambda") == "auto" else shown)
        if config.get("awd_decoupled"):
            label += " (decoupled)"
    return label


def _read_drift(path: Path, config: dict[str, Any], metrics: list[dict[str, Any]]) -> dict[int, float]:
    """‖θ − θ₀‖ per iteration from metrics.jsonl, overridden by drift.json (float64 and exact)
    where its rows were measured against what `esft drift` compares this run with now."""
    from esft.evaluation.runs import drift_reference, measured_against  # torch: not at import time

    drift = {int(m["iteration"]): float(m["drift/norm"]) for m in metrics if m.get("drift/norm") is not None}
    drift_file = path / "drift.json"
    if drift_file.exists():
        reference = drift_reference(path, config)
        for rec in json.loads(drift_file.read_text()):
            if measured_against(rec, config, reference):
                drift[int(rec["iteration"])] = float(rec["global"]["norm"])
    return drift


def _read_kl(path: Path, config: dict[str, Any]) -> dict[str, float]:
    """KL(base ‖ run) per task at the last iteration kl.json holds, from rows measured against
    the run's sequence origin: a row left from another reference (a GRPO stage's own start,
    before that changed) would mix two different KLs in one table."""
    from esft.evaluation.runs import measured_against, origin_of  # torch: not at import time

    kl_file = path / "kl.json"
    rows = json.loads(kl_file.read_text()) if kl_file.exists() else []
    origin = origin_of(path, config)
    rows = [r for r in rows if measured_against(r, config, origin)]
    if not rows:
        return {}
    last = max(r["iteration"] for r in rows)
    return {r["task"]: float(r["kl_exact_token"]) for r in rows if r["iteration"] == last}


def load_run(path: str | Path) -> RunSummary:
    """A run directory (ES or GRPO) as the report sees it; every file but config.yaml is optional."""
    import yaml

    path = Path(path)
    cfg_path = path / "config.yaml"
    if not cfg_path.exists():
        raise ValueError(f"{path} has no config.yaml: is it a run directory (--output_dir of esft train/grpo)?")
    config = yaml.safe_load(cfg_path.read_text()) or {}
    metrics = read_jsonl(path / "metrics.jsonl")
    return RunSummary(
        path, run_label(config), config, config.get("task"),
        evals=group_rows(read_jsonl(path / "eval" / FORGETTING_FILE)),
        metrics=metrics, drift=_read_drift(path, config, metrics), kl=_read_kl(path, config),
        harness=group_rows(read_jsonl(path / "eval" / HARNESS_FILE)),
    )


def unique_labels(runs: list[RunSummary]) -> None:
    """Make labels unique by appending the directory name where two runs share one."""
    seen: dict[str, int] = {}
    for r in runs:
        seen[r.label] = seen.get(r.label, 0) + 1
    for r in runs:
        if seen[r.label] > 1:
            r.label = f"{r.label} [{r.path.name}]"
