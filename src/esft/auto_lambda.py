"""`--awd_lambda auto`: the paper's tuning recipe, automated and cheap.

The recipe (Schweighofer et al. 2026): start with a high λ and lower it until the target no
longer drops against ES without AWD. Full runs per λ would cost a sweep; instead, before
the run:

1. Reference probe: the run's own first P iterations of plain ES (P ≈ 10% of max_steps),
   in process, from θ₀.
2. For each λ of a ladder, high to low: the counterfactual weights θ_λ = a replay of the
   reference's P records with AWD, its step stretched to the run's horizon T (the L2 decay
   of T/P iterations per probe iteration, 1 − (1 − s)^(T/P); T/P·s for L1 and Huber), as if
   the probe's learning were spread over the whole run under that λ. A replay regenerates
   noise but generates no text.
3. θ₀, the reference and each θ_λ are scored greedily on a fixed set of training prompts:
   retention = (R_λ − R₀) / (R_ref − R₀).
4. The first λ (the highest) with retention ≥ `RETENTION` is chosen. If the reference did
   not learn within P iterations, nothing can be judged: the lowest λ is chosen, and said.

The choice, the evidence and the cost (as a fraction of the run) go to `auto_lambda.json`,
config.yaml (`awd_lambda_chosen`), metrics.jsonl (an iteration-0 row) and the log; every
record then holds its `awd_step`. A resume reads the choice back and never probes again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from esft import es
from esft.config import ESConfig
from esft.io import write_text_atomic
from esft.seedlog import AWD_STEP_KEY, IterationRecord, apply_record

log = logging.getLogger(__name__)

AUTO_FILE = "auto_lambda.json"
#: Share of plain ES's target gain a λ must keep to be chosen (the paper: "no drop").
RETENTION = 0.9
#: Probe length as a share of the run (at least MIN_PROBE iterations).
PROBE_SHARE = 0.1
MIN_PROBE = 2
#: Training prompts the candidates are scored on (greedy, one pass each).
PROBE_PROMPTS = 32
#: Ladder of per-iteration steps, high to low. L2: the fraction of θ − θ₀ removed per
#: iteration. L1/Huber: the threshold, in units of the per-weight update size α/√N.
L2_STEPS = (0.3, 0.1, 0.03, 0.01, 0.003, 0.001)
L1_UNITS = (1.0, 0.3, 0.1, 0.03, 0.01, 0.003)


def ladder(cfg: ESConfig) -> list[float]:
    """The candidate λ values, highest first."""
    if cfg.awd == "l2":
        steps = list(L2_STEPS)
    else:
        unit = cfg.learning_rate / math.sqrt(cfg.population_size)
        steps = [u * unit for u in L1_UNITS]
    return [cfg.lambda_for_step(s) for s in steps]


def effective_step(cfg: ESConfig, step: float, stretch: float) -> float:
    """The per-probe-iteration step equivalent to `stretch` run iterations at `step`."""
    if cfg.awd == "l2":
        return 1.0 - (1.0 - step) ** stretch
    return step * stretch


def choose_lambda(trainer: Any, records: list[IterationRecord]) -> float:
    """λ for the run in `trainer.run_dir`: read back (resume) or chosen by probes now."""
    cfg: ESConfig = trainer.args
    path = Path(trainer.run_dir) / AUTO_FILE
    if path.exists():
        chosen = float(json.loads(path.read_text())["chosen_lambda"])
        log.info("awd_lambda auto: λ=%g, chosen before (%s)", chosen, path)
        return chosen
    if records:  # the evidence file is gone, the log still says what was applied
        return cfg.lambda_for_step(float(records[0].extra[AWD_STEP_KEY]))
    evidence = probe(trainer)
    write_text_atomic(path, json.dumps(evidence, indent=1) + "\n")
    _record_choice(trainer, evidence)
    log.info("awd_lambda auto:\n%s", format_table(evidence))
    return evidence["chosen_lambda"]


def probe(trainer: Any) -> dict[str, Any]:
    """Run the reference probe and the ladder; the weights end bitwise at θ₀."""
    from esft.population import LocalPopulation

    cfg: ESConfig = trainer.args
    state, anchor = trainer.state, trainer.anchor
    t0 = time.perf_counter()
    p = max(MIN_PROBE, round(PROBE_SHARE * cfg.max_steps))
    stretch = max(1.0, cfg.max_steps / p)
    # Probes run in this process even with --workers: the actors start afterwards from θ₀.
    population = LocalPopulation(_probe_config(cfg), state, trainer.engine, trainer.task, trainer.train_examples,
                                 trainer.prompts)
    n = len(trainer.train_examples)
    probe_idx = list(range(min(PROBE_PROMPTS, n)))
    theta0 = {name: anchor.get(name) for name in state.names}

    def score() -> float:
        return _greedy_reward(trainer, probe_idx)

    base_reward = score()
    reference: list[IterationRecord] = []
    t_ref = time.perf_counter()
    for k in range(1, p + 1):
        plan = trainer.plan(k, len(trainer.prompts), population)
        result = population.score(plan)
        record = IterationRecord(k, plan.seeds, result.rewards, es.coefficients(result.rewards, cfg.mirror_sampling),
                                 {AWD_STEP_KEY: 0.0})
        apply_record(state, record, cfg, anchor, compute_drift=False)
        reference.append(record)
    iteration_s = (time.perf_counter() - t_ref) / p
    ref_reward = score()
    gain = ref_reward - base_reward
    rungs = []
    chosen = None
    for lam in ladder(cfg):
        step = cfg.step_for_lambda(lam)
        eff = effective_step(cfg, step, stretch)
        state.load_masters(theta0)
        for rec in reference:
            apply_record(state, dataclasses.replace(rec, extra={AWD_STEP_KEY: eff}), cfg, anchor, compute_drift=False)
        reward = score()
        retention = (reward - base_reward) / gain if gain > 0 else float("nan")
        accepted = gain > 0 and retention >= RETENTION
        rungs.append({"lambda": lam, "step": step, "probe_step": eff, "reward": reward,
                      "retention": None if math.isnan(retention) else retention, "accepted": accepted})
        if accepted:
            chosen = lam
            break
    state.load_masters(theta0)  # the run starts from θ₀, bitwise
    note = ""
    if chosen is None:
        chosen = rungs[-1]["lambda"]
        note = ("the reference did not learn within the probe: the lowest λ of the ladder is used"
                if gain <= 0 else f"no λ of the ladder kept {RETENTION:.0%} of the gain: the lowest is used")
    seconds = time.perf_counter() - t0
    return {
        "chosen_lambda": chosen, "chosen_step": cfg.step_for_lambda(chosen), "penalty": cfg.awd,
        "probe_iterations": p, "horizon": cfg.max_steps, "probe_prompts": len(probe_idx),
        "reward_base": base_reward, "reward_reference": ref_reward, "ladder": rungs, "note": note,
        "seconds": seconds, "iteration_seconds": iteration_s,
        # What the probes cost against the run they tune (its iterations at the probe's pace).
        "cost_fraction": seconds / (iteration_s * cfg.max_steps) if cfg.max_steps else 0.0,
    }


def _probe_config(cfg: ESConfig) -> ESConfig:
    # The probe's population never touches a Ray cluster and shows no per-iteration bars.
    return dataclasses.replace(cfg, workers=None, ray_address=None, disable_tqdm=True)


def _greedy_reward(trainer: Any, idx: list[int]) -> float:
    """Mean task reward of the at-rest weights' greedy completions of the probe prompts."""
    from esft.es import finite_mean
    from esft.rewards import RewardStats, score_completions

    gens = trainer.engine.generate_ids([trainer.prompts[i] for i in idx])
    examples = [trainer.train_examples[i] for i in idx]
    rewards = score_completions(trainer.task, [g.text for g in gens], examples, RewardStats(), trainer.reward_guard)
    return finite_mean(rewards)


def _record_choice(trainer: Any, evidence: dict[str, Any]) -> None:
    """The choice in config.yaml and metrics.jsonl (an iteration-0 row), beside auto_lambda.json."""
    import yaml

    from esft.seedlog import CONFIG_FILE

    path = Path(trainer.run_dir) / CONFIG_FILE
    saved = yaml.safe_load(path.read_text()) or {}
    saved["awd_lambda_chosen"] = evidence["chosen_lambda"]
    write_text_atomic(path, yaml.safe_dump(saved, sort_keys=False))
    trainer.history.append({
        "iteration": 0, "awd/lambda": evidence["chosen_lambda"], "awd/step": evidence["chosen_step"],
        "awd/auto/probe_iterations": evidence["probe_iterations"], "awd/auto/seconds": evidence["seconds"],
        "awd/auto/cost_fraction": evidence["cost_fraction"], "awd/auto/reward_base": evidence["reward_base"],
        "awd/auto/reward_reference": evidence["reward_reference"],
    })


def format_table(evidence: dict[str, Any]) -> str:
    """The probes as a markdown table, for the log and the README."""
    lines = [
        f"reference: plain ES for {evidence['probe_iterations']} iterations, reward {evidence['reward_base']:.4g} → "
        f"{evidence['reward_reference']:.4g} on {evidence['probe_prompts']} training prompts; cost "
        f"{evidence['seconds']:.0f} s = {evidence['cost_fraction']:.0%} of the run",
        "",
        "| λ | step s | probe step | reward | retention | chosen |",
        "|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in evidence["ladder"]:
        ret = "–" if r["retention"] is None else f"{r['retention']:.0%}"
        mark = "✓" if r["lambda"] == evidence["chosen_lambda"] else ""
        lines.append(f"| {r['lambda']:.4g} | {r['step']:.3g} | {r['probe_step']:.3g} | {r['reward']:.4g} | {ret} | {mark} |")
    if evidence.get("note"):
        lines.append(f"\n{evidence['note']}")
    return "\n".join(lines)


__all__ = ["AUTO_FILE", "choose_lambda", "effective_step", "format_table", "ladder", "probe"]
