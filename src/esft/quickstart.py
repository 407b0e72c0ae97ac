"""`esft quickstart`: plain ES and ES+AWD on the embedded model, same seeds, one report.

Defaults are sized for a 2-core laptop CPU: both runs together finish in about ten
minutes, the conciseness reward climbs, the held-out reward (greedy, test examples) shows
what each run kept, and the drift curves show AWD holding θ near θ₀.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

from esft.config import ESConfig
from esft.io import write_text_atomic
from esft.report.curves import plot_training_curves
from esft.report.intervals import Estimate, bootstrap_mean, paired_bootstrap_mean_difference

# Where the quickstart's defaults differ from ESConfig's; every other flag is an ESConfig
# field with its usual default. Tuned on a 2-core CPU (see README "Quickstart" for the
# measured run).
QUICKSTART_DEFAULTS: dict[str, Any] = {
    "output_dir": "runs/quickstart",
    "max_steps": 10,
    "population_size": 8,
    "max_train_samples": 8,
    "max_new_tokens": 24,
    # The paper's σ=1e-3, α=5e-4 need hundreds of iterations; a 10-iteration demo on a
    # 135M model needs larger steps (swept on the conciseness task: α=2e-3 gained 8
    # reward points in 8 iterations, α=5e-3 gained 17).
    "sigma": 2e-3,
    "learning_rate": 5e-3,
    "awd": "l2",
    # s = α·λ = 0.05 per iteration, the stable point of the paper-claims sweep (README "What
    # the paper claims"): at these σ, α and N it kept all of plain ES's held-out gain over 20
    # iterations with 2.6x less prior-task KL, where λ=30 (s = 0.15) kept 35%; over the
    # quickstart's 10 iterations it kept 85% (the difference within noise on 128 questions).
    # Not `auto`: its s = 1/T is λ=20 at 10 iterations, which kept 39% (N=4) and 43% (N=16)
    # of the gain in the auto grid (docs/results/auto-lambda.md).
    "awd_lambda": 10.0,
    # The prior-task KL section samples this many prompts per task (ESConfig's own KL fields).
    "kl_num_prompts": 8,
}


def parse_args(argv: list[str]) -> tuple[ESConfig, argparse.Namespace]:
    """The AWD run's ESConfig (the plain ES run is the same without AWD) and the report options."""
    from esft.flags import config_file_values, dataclass_parser, field_names, parse_dataclass_flags

    parser = dataclass_parser([ESConfig], "esft quickstart", "ES vs ES+AWD on the embedded model (CPU, minutes).")
    parser.add_argument("--prior_tasks", default="hellaswag,piqa,arc_challenge")
    parser.add_argument("--prior_limit", type=int, default=20, help="eval examples per prior task")
    parser.add_argument("--heldout_limit", type=int, default=128,
                        help="held-out (test) examples of the training task, scored greedily before and after "
                             "(128: all of conciseness's; a cap for tasks with thousands)")
    values = {**QUICKSTART_DEFAULTS, **config_file_values(argv, field_names([ESConfig]))}
    cfg, extra = parse_dataclass_flags(parser, argv, values)
    if cfg.awd == "none":
        parser.error("the quickstart compares ES with ES + AWD: --awd must be l2, l1 or huber")
    for name in ("prior_limit", "heldout_limit"):
        if getattr(extra, name) is not None and getattr(extra, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return cfg, extra


def _run_config(cfg: ESConfig, awd: bool, output_dir: Path) -> ESConfig:
    """One of the two runs: the same config and seeds, with or without AWD; resumes a finished part."""
    return dataclasses.replace(
        cfg, awd=cfg.awd if awd else "none", awd_lambda=cfg.awd_lambda if awd else None,
        output_dir=str(output_dir), resume=(output_dir / "config.yaml").exists(),
    )


def run_quickstart(cfg: ESConfig, a: argparse.Namespace) -> dict[str, Any]:
    from esft.trainer import ESTrainer

    started = time.perf_counter()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = {"ES": (False, out / "es"), f"ES + AWD {cfg.awd.upper()} λ={cfg.resolved_awd_lambda:g}": (True, out / "es_awd")}
    run_dirs = {label: run_dir for label, (_, run_dir) in runs.items()}
    histories: dict[str, list[dict[str, Any]]] = {}
    seconds: dict[str, float] = {}
    for label, (awd, run_dir) in runs.items():
        print(f"\n=== {label}  ->  {run_dir}")
        t0 = time.perf_counter()
        trainer = ESTrainer(args=_run_config(cfg, awd, run_dir))
        histories[label] = trainer.train()
        seconds[label] = sum(m.get("time/iteration", 0.0) for m in histories[label])
        print(f"=== {label}: {time.perf_counter() - t0:.0f} s")
    heldout = _heldout_rewards(cfg, a, run_dirs)
    plot_training_curves(histories, out / "curves.png", heldout=_heldout_points(heldout, cfg.max_steps))
    report = _report(histories, seconds, cfg, heldout, a.heldout_limit)
    report += _prior_tasks_section(cfg, a, run_dirs)
    report += f"\nWall time, training and evaluation: {_minutes(time.perf_counter() - started)}.\n"
    write_text_atomic(out / "report.md", report)
    print("\n" + report)
    print(f"report: {out / 'report.md'}   curves: {out / 'curves.png'}")
    return {"histories": histories, "seconds": seconds, "heldout": heldout}


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60)} s"


#: Per run: (base, final) TaskResult rows of the held-out evaluation, or a reason there is none.
HeldOut = dict[str, tuple[dict[str, Any], dict[str, Any]]] | str


def _heldout_rewards(cfg: ESConfig, a: argparse.Namespace, runs: dict[str, Path]) -> HeldOut:
    """Greedy reward of the base and each final model on the training task's test examples.

    The training table's reward is the perturbed population's mean on the training prompts;
    whether a run kept what it learned shows on examples it never trained on, greedily.
    """
    from esft.evaluation.accuracy import evaluate_run
    from esft.evaluation.sharing import borrow_base_rows

    reason = _no_heldout_split(cfg)
    if reason:
        return reason
    out: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    for label, run_dir in runs.items():
        print(f"\n=== held-out {cfg.task} for {label}: {a.heldout_limit or 'all'} test examples, greedy")
        borrow_base_rows(run_dir)  # iteration 0 is the base model in both runs: scored once
        rows = evaluate_run(run_dir, [cfg.task], iterations=[0, cfg.max_steps], limit=a.heldout_limit,
                            max_new_tokens=cfg.max_new_tokens, data_dir=cfg.data_dir, device=cfg.device,
                            progress=not cfg.disable_tqdm)
        by_iteration = {r["iteration"]: r for r in rows}
        out[label] = (by_iteration[0], by_iteration[cfg.max_steps])
    return out


def _no_heldout_split(cfg: ESConfig) -> str | None:
    """Why the training task has no held-out examples to score, or None when it has."""
    from esft.tasks import get_task

    if ":" in cfg.task or cfg.dataset:
        # A custom dataset has no split the training did not see (its test rows may be its train rows).
        return f"no held-out evaluation: `{cfg.task}` is a custom task; the built-in tasks have test splits"
    try:
        if not get_task(cfg.task, data_dir=cfg.data_dir).load("test", limit=1):
            return f"no held-out evaluation: `{cfg.task}` has no test examples"
    except ValueError as e:
        return f"no held-out evaluation of `{cfg.task}`: {e}"
    return None


def _heldout_change(base: dict[str, Any], final: dict[str, Any]) -> Estimate:
    return paired_bootstrap_mean_difference(base["rewards"], final["rewards"])


def _heldout_count(heldout: HeldOut, limit: int | None) -> int | str:
    """Examples actually scored: the split may hold fewer than the limit."""
    if isinstance(heldout, str) or not heldout:
        return "all" if limit is None else limit
    return int(next(iter(heldout.values()))[1]["n"])


def _heldout_points(heldout: HeldOut, last: int) -> dict[str, dict[int, tuple[float, float, float]]] | None:
    """Held-out reward with its 95% interval at iteration 0 and the last, for the curves."""
    if isinstance(heldout, str):
        return None
    points = {}
    for label, (base, final) in heldout.items():
        points[label] = {}
        for k, row in ((0, base), (last, final)):
            e = bootstrap_mean(row["rewards"])
            points[label][k] = (e.value, e.lo, e.hi)
    return points


def _report(histories: dict[str, list[dict[str, Any]]], seconds: dict[str, float], a: ESConfig, heldout: HeldOut,
            heldout_limit: int | None) -> str:
    lines = [
        "# esft quickstart",
        "",
        f"Model `{a.model}`, task `{a.task}`, {a.max_steps} iterations, N={a.population_size}, "
        f"the same {a.max_train_samples} training prompts for every member, {a.max_new_tokens} new tokens, σ={a.sigma:g}, "
        f"α={a.learning_rate:g}, seed {a.seed}. Both runs use the same seeds.",
        "",
        "| run | training reward, iteration 1 → final | held-out reward, base → final | held-out change [95% CI] "
        "| ‖θ−θ₀‖ final | ‖θ−θ₀‖/‖θ₀‖ | training seconds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, h in histories.items():
        if not h:
            continue
        first, last = h[0], h[-1]
        if isinstance(heldout, dict) and label in heldout:
            base, final = heldout[label]
            change = _heldout_change(base, final)
            held = f"{base['reward']:.2f} → {final['reward']:.2f}"
            delta = f"{change.value:+.2f} [{change.lo:+.2f}, {change.hi:+.2f}]" + ("" if change.contains_zero() else " *")
        else:
            held = delta = "–"
        lines.append(
            f"| {label} | {first['reward/mean']:.2f} → {last['reward/mean']:.2f} | {held} | {delta} | "
            f"{last['drift/norm']:.2f} | {last['drift/relative']:.2e} | {seconds[label]:.0f} |"
        )
    lines += [
        "",
        "Training reward: the mean over the perturbed population on the training prompts, a noisy view of "
        "learning. Held-out reward: the at-rest weights' greedy completions of the first "
        f"{_heldout_count(heldout, heldout_limit)} test examples, which no run trained on; the change carries a 95% "
        "paired-bootstrap interval over those examples (* = the interval excludes 0). "
        + (f"({heldout}.) " if isinstance(heldout, str) else "")
        + ("Conciseness reward: −|len(answer) − len(target)| in characters." if a.task == "conciseness" else ""),
        "",
    ]
    kept = _kept_sentence(heldout)
    if kept:
        lines += [kept, ""]
    lines += ["![curves](curves.png)", ""]
    return "\n".join(lines)


def _kept_sentence(heldout: HeldOut) -> str | None:
    """What a reader wants from the two rows: the share of plain ES's held-out gain AWD kept,
    and whether the two final models differ on the same examples (a paired interval)."""
    if isinstance(heldout, str) or len(heldout) != 2:
        return None
    (es_label, (es_base, es_final)), (awd_label, (_, awd_final)) = heldout.items()
    es_gain = _heldout_change(es_base, es_final).value
    awd_gain = _heldout_change(es_base, awd_final).value
    gap = paired_bootstrap_mean_difference(es_final["rewards"], awd_final["rewards"])
    share = f"kept {awd_gain / es_gain:.0%} of plain ES's held-out gain" if es_gain > 0 else \
        f"changed the held-out reward by {awd_gain:+.2f} where plain ES changed it by {es_gain:+.2f}"
    verdict = "the interval contains 0: no difference this sample can show" if gap.contains_zero() else \
        "the interval excludes 0"
    return (f"{awd_label} {share}; its final held-out reward minus {es_label}'s on the same examples: "
            f"{gap.value:+.2f} [{gap.lo:+.2f}, {gap.hi:+.2f}] ({verdict}).")


def _prior_tasks_section(cfg: ESConfig, a: argparse.Namespace, runs: dict[str, Path]) -> str:
    """Prior-task accuracy and KL to the base model, when a data pack is available."""
    import json
    import os

    from esft.evaluation.accuracy import evaluate_run
    from esft.evaluation.kl import kl_report
    from esft.evaluation.sharing import borrow_base_rows, borrow_kl_cache

    data_dir = cfg.data_dir or os.environ.get("ESFT_DATA_DIR")
    tasks = [t.strip() for t in a.prior_tasks.split(",") if t.strip()]
    if not data_dir or not Path(data_dir).is_dir():
        return ("\n## Prior tasks\n\nSkipped: no data pack (pass `--data_dir` or set `ESFT_DATA_DIR` to a folder "
                "laid out like the shared data pack to add prior-task accuracy and KL here).\n")
    acc: dict[str, dict[str, dict[int, float]]] = {}
    kl: dict[str, dict[str, float]] = {}
    for label, run_dir in runs.items():
        print(f"\n=== prior tasks for {label}: accuracy on {a.prior_limit} examples, KL on {cfg.kl_num_prompts} prompts")
        # Iteration 0 is the base model in both runs: its rows and KL samples are made once.
        borrow_base_rows(run_dir)
        borrow_kl_cache(run_dir)
        rows = evaluate_run(run_dir, tasks, iterations=[0, cfg.max_steps], limit=a.prior_limit, max_new_tokens=16,
                            data_dir=data_dir, device=cfg.device, progress=not cfg.disable_tqdm)
        for r in rows:
            acc.setdefault(label, {}).setdefault(r["task"], {})[r["iteration"]] = r["accuracy"]
        kl_rows = kl_report(run_dir, tasks, iterations=[cfg.max_steps], num_prompts=cfg.kl_num_prompts, max_tokens=cfg.kl_max_tokens,
                            data_dir=data_dir, device=cfg.device, progress=not cfg.disable_tqdm)
        write_text_atomic(run_dir / "kl.json", json.dumps(kl_rows, indent=1))
        kl[label] = {r["task"]: r["kl_exact_token"] for r in kl_rows}
    lines = [
        "",
        "## Prior tasks",
        "",
        f"Data pack `{data_dir}`: the first {a.prior_limit} evaluation examples of each prior task "
        f"(greedy, 16 new tokens), and KL(base ‖ final) as the exact per-position KL on 32-token continuations "
        f"sampled once from the base model for the first {cfg.kl_num_prompts} prompts of each task (nats/token). "
        "Tiny samples: a smoke view of forgetting, not a benchmark result.",
        "",
        "| run | " + " | ".join(f"{t} acc (base → final)" for t in tasks) + " | " + " | ".join(f"KL {t}" for t in tasks) + " |",
        "|---|" + "---:|" * (2 * len(tasks)),
    ]
    for label in runs:
        cells = []
        for t in tasks:
            c = acc.get(label, {}).get(t, {})
            cells.append(f"{c.get(0, float('nan')):.2f} → {c.get(cfg.max_steps, float('nan')):.2f}")
        cells += [f"{kl.get(label, {}).get(t, float('nan')):.3g}" for t in tasks]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
