"""`--awd_lambda auto`: λ from the run's horizon, in the stable range of the paper's ladder.

The paper tunes λ by a ladder of full runs (start high, lower it until the target no longer
drops). What the ladder finds follows from how ES moves the weights. An update is mostly a
random walk: ‖Σ zᵢεᵢ‖² concentrates at N·d and successive updates are orthogonal, so after
T iterations plain ES has drifted ‖θ_T − θ₀‖² = T·u² (u² = α²·d/N, Eq. 2), and near θ₀ the
prior-task KL grows like that squared distance. The learning is a small coherent part of the
same updates. L2 AWD with step s keeps a share of each:

    random part, mean square:   u² · Σ_{k=1..T} (1 − s)^{2k}    KL cut = T / Σ (1 − s)^{2k} ≈ 2c / (1 − e^{−2c})
    coherent part, summed:      g  · Σ_{k=1..T} (1 − s)^k      kept   = Σ (1 − s)^k / T   ≈ (1 − e^{−c}) / c

with c = s·T, whatever N, α and d are. So the run's horizon decides the stable range:
c ≈ 1 halves the KL and more while keeping 59–63% of the coherent displacement (T ≥ 10; more of
the held-out gain only where the reward saturates within the run), c ≫ 1 throws the learning
away, c ≪ 1 cuts nothing. Measured on the quickstart's cell (conciseness, T=20,
N=8, 2026-11-26): s·T = 0.3, 1 and 3 kept 89%, 118% and 35% of plain ES's held-out gain at
1.37×, 2.58× and 9.3× less KL, where the sums above predict 1.35×, 2.48× and 7.7× (the
random part dominates the KL less as λ grows). `auto` takes c = 1 (`HORIZON`): s = 1/T, capped
at `MAX_STEP` for very short runs. For L1 and Huber the same reasoning on one weight (a
random walk of step α/√N per iteration held by a constant pull τ settles at an rms of
α²/(√2·N·τ)) gives the threshold whose plateau equals L2's at c: τ = α/(c·√(N·T)).

The previous `auto` replayed a short plain-ES probe with each rung of a ladder and chose
λ = 0.2 (s = 0.001) on that cell: two probe iterations cannot see the gain saturate, so every
stronger rung looked like a loss, and a user typing `auto` got plain ES. The rule costs
nothing, is a pure function of the config (replay, resume and Ray need no log to agree), and
its choice and prediction go to `auto_lambda.json`, config.yaml (`awd_lambda_chosen`), an
iteration-0 row of metrics.jsonl and the log; every record holds its `awd_step`, and a resume
reads the choice back (a resume with a longer `max_steps` keeps the λ the run started with).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from esft.config import ESConfig
from esft.io import write_text_atomic
from esft.seedlog import AWD_STEP_KEY, IterationRecord

log = logging.getLogger(__name__)

AUTO_FILE = "auto_lambda.json"
#: c = s·T, the AWD strength over the run's horizon (see the module docstring).
HORIZON = 1.0
#: Largest L2 step `auto` takes (a 1- or 2-iteration run would otherwise pull θ back to θ₀).
MAX_STEP = 0.5


def horizon_step(cfg: ESConfig, horizon: float = HORIZON) -> float:
    """The AWD step s for `cfg`'s run: c/T for L2 (at most `MAX_STEP`), the threshold
    α/(c·√(N·T)) for L1 and Huber."""
    steps = max(1, cfg.max_steps)
    if cfg.awd == "l2":
        return min(MAX_STEP, horizon / steps)
    return cfg.learning_rate / (horizon * math.sqrt(cfg.population_size * steps))


def predicted(step: float, steps: int) -> dict[str, float]:
    """What L2 at `step` keeps after `steps` iterations, against plain ES: the random walk's
    mean square (1/KL cut) and the coherent displacement."""
    keep = 1.0 - step
    random = sum(keep ** (2 * k) for k in range(1, steps + 1)) / steps
    coherent = sum(keep**k for k in range(1, steps + 1)) / steps
    return {"kl_cut": 1.0 / random if random else math.inf, "coherent_share": coherent}


def evidence_for(cfg: ESConfig) -> dict[str, Any]:
    """The choice and what it predicts, as `auto_lambda.json` holds them."""
    step = horizon_step(cfg)
    out: dict[str, Any] = {
        "rule": "horizon", "horizon_c": HORIZON, "penalty": cfg.awd, "max_steps": cfg.max_steps,
        "learning_rate": cfg.learning_rate, "population_size": cfg.population_size,
        "chosen_step": step, "chosen_lambda": cfg.lambda_for_step(step), "seconds": 0.0, "cost_fraction": 0.0,
    }
    if cfg.awd == "l2":
        p = predicted(step, max(1, cfg.max_steps))
        out["predicted_kl_cut"], out["predicted_coherent_share"] = p["kl_cut"], p["coherent_share"]
    return out


def choose_step(trainer: Any, records: list[IterationRecord]) -> float:
    """The AWD step for the run in `trainer.run_dir`: read back (resume) or chosen by the
    horizon rule now. The step, not λ, is what records apply: no λ → step round trip."""
    cfg: ESConfig = trainer.args
    path = Path(trainer.run_dir) / AUTO_FILE
    if path.exists():
        evidence = json.loads(path.read_text())
        log.info("awd_lambda auto: λ=%g, chosen before (%s)", evidence["chosen_lambda"], path)
        return float(evidence["chosen_step"])
    if records:  # the evidence file is gone (a kept record resumed): the log says what was applied
        step = float(records[0].extra[AWD_STEP_KEY])
        evidence = {"rule": "horizon", "penalty": cfg.awd, "chosen_step": step,
                    "chosen_lambda": cfg.lambda_for_step(step), "rebuilt_from": "seed log"}
        write_text_atomic(path, json.dumps(evidence, indent=1) + "\n")
        _record_choice(trainer, evidence, metrics_row=False)
        return step
    evidence = evidence_for(cfg)
    write_text_atomic(path, json.dumps(evidence, indent=1) + "\n")
    _record_choice(trainer, evidence)
    log.info("awd_lambda auto: %s", describe(evidence))
    return float(evidence["chosen_step"])


def describe(evidence: dict[str, Any]) -> str:
    """One line: the choice, and for L2 what it predicts."""
    head = (f"λ={evidence['chosen_lambda']:.4g} ({evidence['penalty']} step {evidence['chosen_step']:.3g}; "
            f"s·T = {evidence['horizon_c']:g} over {evidence['max_steps']} iterations)")
    if "predicted_kl_cut" in evidence:
        head += (f": predicted {evidence['predicted_kl_cut']:.2f}× less prior-task KL than plain ES, keeping "
                 f"{evidence['predicted_coherent_share']:.0%} of the coherent displacement")
    return head


def _record_choice(trainer: Any, evidence: dict[str, Any], metrics_row: bool = True) -> None:
    """The choice in config.yaml and (`metrics_row`) metrics.jsonl's iteration-0 row, beside
    auto_lambda.json."""
    import yaml

    from esft.seedlog import CONFIG_FILE

    path = Path(trainer.run_dir) / CONFIG_FILE
    saved = yaml.safe_load(path.read_text()) or {}
    saved["awd_lambda_chosen"] = evidence["chosen_lambda"]
    write_text_atomic(path, yaml.safe_dump(saved, sort_keys=False))
    if not metrics_row:
        return
    row = {"iteration": 0, "awd/lambda": evidence["chosen_lambda"], "awd/step": evidence["chosen_step"],
           "awd/auto/horizon_c": evidence["horizon_c"]}
    if "predicted_kl_cut" in evidence:
        row["awd/auto/predicted_kl_cut"] = evidence["predicted_kl_cut"]
    trainer.history.append(row)


__all__ = ["AUTO_FILE", "HORIZON", "choose_step", "describe", "evidence_for", "horizon_step", "predicted"]
