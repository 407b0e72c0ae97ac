"""`esft report` tables on run directories written by hand: like-with-like settings,
intervals and their marks, report.csv columns, the drift table (no model needed)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from esft.report.intervals import newcombe_change
from esft.report.runs import build_report


def write_run(root: Path, name: str, config: dict[str, Any], evals: list[dict[str, Any]] = (),
              metrics: list[dict[str, Any]] = ()) -> Path:
    """A run directory: config.yaml, eval/forgetting.jsonl and metrics.jsonl as given."""
    run = root / name
    (run / "eval").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "eval" / "forgetting.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return run


def row(iteration: int, task: str, correct: list[int], limit: int, **extra: Any) -> dict[str, Any]:
    """A forgetting.jsonl row as `esft eval --run` writes it (with per-example results)."""
    return {"iteration": iteration, "task": task, "accuracy": sum(correct) / len(correct), "n": len(correct),
            "limit": limit, "max_new_tokens": 16, "num_fewshot": None, "task_version": None,
            "correct": correct, **extra}


def es(n: int = 30, **kw: Any) -> dict[str, Any]:
    return {"model": "embedded", "task": "countdown", "population_size": n, "learning_rate": 5e-4, "awd": "none", **kw}


def table_line(md: str, label: str, section: str = "## Accuracy change") -> str:
    """The row of run `label` in the first table after the heading `section`."""
    return next(line for line in md.split(section, 1)[1].splitlines() if line.startswith(f"| {label} |"))


def test_a_change_is_never_taken_across_evaluation_settings(tmp_path) -> None:
    # Run A: evaluated at --limit 4 for iterations 0, 5, 10; then iteration 0 again at --limit 2.
    # The old report took piqa's Δ as 0.75 (limit 4, it. 10) − 1.0 (limit 2, it. 0) = −25.0.
    cd0, cd10, piqa = [0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]
    a = [row(k, t, c, 4) for k in (0, 5, 10) for t, c in (("countdown", cd10 if k else cd0), ("piqa", piqa))]
    a.append(row(0, "piqa", [1, 1], 2))
    # Run B: its last piqa evaluation (iteration 10) exists only at limit 2: no change to show.
    b = [row(k, "countdown", cd10 if k else cd0, 4) for k in (0, 5, 10)]
    b += [row(0, "piqa", piqa, 4), row(5, "piqa", piqa, 4), row(10, "piqa", [0, 0], 2)]
    runs = [write_run(tmp_path, "a", es(30), a), write_run(tmp_path, "b", es(20), b)]
    md = build_report(runs, tmp_path / "rep", figures=False).read_text()
    # countdown: 2 of 4 gained, none lost; the redrawn gain count is Binomial(4, 1/2), whose
    # 2.5% and 97.5% quantiles are 0 and 4 of 4: the interval [0, 100] points holds 0.
    assert table_line(md, "ES (30)") == "| ES (30) | +50.0 [+0.0, +100.0]° | +0.0 [+0.0, +0.0]° | +0.0 [+0.0, +0.0]° |"
    assert table_line(md, "ES (20)") == "| ES (20) | +50.0 [+0.0, +100.0]° | – | – |"
    assert "-25.0" not in md
    assert ("- piqa: limit 4, 16 new tokens (rows in 2 of 2 runs); not used: limit 2, 16 new tokens in ES (30) at "
            "iteration 0; limit 2, 16 new tokens in ES (20) at iteration 10") in md
    assert "- countdown: limit 4, 16 new tokens (rows in 2 of 2 runs)\n" in md


def test_setting_choice_prefers_more_runs_then_larger_n() -> None:
    from esft.report.evals import Setting, choose_settings, group_rows

    def rows(limit: int, its: tuple[int, ...]) -> list[dict[str, Any]]:
        return [row(k, "piqa", [1] * limit, limit) for k in its]

    one = group_rows(rows(8, (0, 10)) + rows(2, (0, 10)))
    two = group_rows(rows(2, (0, 10)))
    assert choose_settings([one])["piqa"] == Setting(8, 16), "a tie in runs goes to the larger n"
    assert choose_settings([one, two])["piqa"] == Setting(2, 16), "the setting both runs can compare in"
    old = group_rows([{"iteration": 0, "task": "piqa", "accuracy": 0.5, "n": 4, "limit": 4, "max_new_tokens": 16}])
    assert list(old["piqa"]) == [Setting(4, 16, None, None)], "a missing setting key means null"


def test_a_change_whose_interval_holds_zero_is_marked_and_footnoted(tmp_path) -> None:
    # No per-example results (older rows): Newcombe's interval for independent proportions.
    def old(k: int, task: str, acc: float) -> dict[str, Any]:
        return {"iteration": k, "task": task, "accuracy": acc, "n": 100, "limit": 100, "max_new_tokens": 16}

    evals = [old(0, "countdown", 0.5), old(9, "countdown", 0.8), old(0, "piqa", 0.60), old(9, "piqa", 0.58)]
    md = build_report([write_run(tmp_path, "r", es(), evals)], tmp_path / "rep", figures=False).read_text()
    up, flat = newcombe_change(50, 100, 80, 100), newcombe_change(60, 100, 58, 100)
    assert up.lo > 0 and flat.lo < 0 < flat.hi

    def pts(x: float) -> str:
        return f"{100 * x:+.1f}"

    cd = f"+30.0 [{pts(up.lo)}, {pts(up.hi)}]"
    pq = f"-2.0 [{pts(flat.lo)}, {pts(flat.hi)}]°"
    assert table_line(md, "ES (30)") == f"| ES (30) | {cd} | {pq} | {pq} |", "one prior task: the average is its change"
    assert "° interval contains 0: not distinguishable from no change." in md
    assert "Newcombe's hybrid score interval" in md and "paired bootstrap" not in md


def test_report_csv_has_value_and_interval_bounds_as_fractions(tmp_path) -> None:
    cd0, cd10, piqa = [0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]
    a = [row(k, t, c, 4) for k in (0, 10) for t, c in (("countdown", cd10 if k else cd0), ("piqa", piqa))]
    b = [row(0, "countdown", cd0, 4), row(10, "countdown", cd10, 4), row(0, "piqa", piqa, 4)]
    runs = [write_run(tmp_path, "a", es(30), a), write_run(tmp_path, "b", es(20), b)]
    build_report(runs, tmp_path / "rep", figures=False)
    with open(tmp_path / "rep" / "report.csv") as f:
        reader = csv.reader(f)
        header = next(reader)
        body = list(reader)
    assert header == ["run", "Δ countdown", "Δ countdown lo95", "Δ countdown hi95", "Δ piqa", "Δ piqa lo95",
                      "Δ piqa hi95", "avg Δ prior", "avg Δ prior lo95", "avg Δ prior hi95"]
    assert body == [["ES (30)", "0.5", "0.0", "1.0", "0.0", "0.0", "0.0", "0.0", "0.0", "0.0"],
                    ["ES (20)", "0.5", "0.0", "1.0", "", "", "", "", "", ""]]


def test_drift_table_compares_final_drift_with_eq2(tmp_path) -> None:
    alpha, N, d = 2e-3, 8, 1000
    metrics = [{"iteration": t, "reward/mean": 0.1 * t, "drift/norm": 0.02 * t, "params/trainable": d} for t in (1, 2, 3, 4)]
    awd = [{**m, "drift/norm": 0.01 * m["iteration"], "awd/step": 0.1} for m in metrics]
    runs = [write_run(tmp_path, "plain", es(N, learning_rate=alpha), metrics=metrics),
            write_run(tmp_path, "awd", es(N, learning_rate=alpha, awd="l2", awd_lambda=10.0), metrics=awd),
            write_run(tmp_path, "nod", es(12), metrics=[{"iteration": 1, "drift/norm": 0.5}])]
    md = build_report(runs, tmp_path / "rep", figures=False).read_text()
    predicted = math.sqrt(4 * alpha**2 * d / N)
    assert table_line(md, "ES (8)", "## Weight drift") == (
        f"| ES (8) | 4 | 0.08 | {predicted:.4g} | {0.08 / predicted:.4g} | random walk, α=0.002, N=8, d=1,000 |")
    # AWD L2 with the logged step s = 0.1 (not α·λ = 0.02): X_t = 0.81·(X_{t−1} + U).
    U, x = alpha**2 * d / N, 0.0
    for _ in range(4):
        x = 0.81 * (x + U)
    x_star = 0.81 * U / (1 - 0.81)
    assert table_line(md, "ES (8) + AWD L2 λ=10", "## Weight drift") == (
        f"| ES (8) + AWD L2 λ=10 | 4 | 0.04 | {math.sqrt(x):.4g} | {0.04 / math.sqrt(x):.4g} | "
        f"AWD L2, α=0.002, N=8, d=1,000; stationary √X* = {math.sqrt(x_star):.4g} |")
    assert table_line(md, "ES (12)", "## Weight drift") == "| ES (12) | 1 | 0.5 | – | – | metrics.jsonl has no params/trainable (d) |"
    assert "No prediction for ES (12): metrics.jsonl has no `params/trainable`" in md


def test_an_average_over_fewer_prior_tasks_than_the_table_is_marked(tmp_path) -> None:
    full = [row(k, t, [1, 0, 1, 0], 4) for k in (0, 10) for t in ("countdown", "piqa", "hellaswag")]
    part = [r for r in full if not (r["task"] == "hellaswag" and r["iteration"] == 10)]
    runs = [write_run(tmp_path, "full", es(30), full), write_run(tmp_path, "part", es(20), part)]
    md = build_report(runs, tmp_path / "rep", figures=False).read_text()
    assert table_line(md, "ES (30)").endswith("| +0.0 [+0.0, +0.0]° |")
    assert table_line(md, "ES (20)").endswith("| – | +0.0 [+0.0, +0.0]° | +0.0 [+0.0, +0.0]°* |")
    assert "* average over fewer prior tasks than the table has (the others show –)." in md


# --------------------------------------------------------------------- reward-measured target
def reward_row(iteration: int, task: str, rewards: list[float] | None, limit: int, reward: float | None = None,
               **extra: Any) -> dict[str, Any]:
    """A forgetting.jsonl row of a reward-measured task: exact matches ~0, the reward is the measure;
    `rewards=None` is a row written before per-example rewards were logged."""
    n = len(rewards) if rewards is not None else limit
    out = {"iteration": iteration, "task": task, "accuracy": 0.0, "n": n, "limit": limit, "max_new_tokens": 16,
           "num_fewshot": None, "task_version": "1", "correct": [0] * n, **extra}
    if rewards is not None:
        out |= {"reward": sum(rewards) / len(rewards), "rewards": rewards}
    elif reward is not None:
        out["reward"] = reward
    return out


def numpy_paired_bootstrap(before: list[float], after: list[float]) -> tuple[float, float, float]:
    """The textbook paired bootstrap: redraw example indices, average the per-example
    differences; seed and resample count of the report."""
    from esft.report.intervals import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED

    d = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)
    idx = np.random.default_rng(BOOTSTRAP_SEED).integers(0, len(d), size=(BOOTSTRAP_RESAMPLES, len(d)))
    lo, hi = np.quantile(d[idx].mean(axis=1), [0.025, 0.975])
    return float(d.mean()), float(lo), float(hi)


def conciseness_rewards(seed: int, shift: float, n: int = 24) -> tuple[list[float], list[float]]:
    """Per-example rewards (minus the length gap in characters) before and after training."""
    rng = np.random.default_rng(seed)
    before = -rng.integers(5, 60, size=n).astype(float)
    after = np.minimum(0.0, before + shift + rng.integers(-8, 9, size=n))
    return before.tolist(), after.tolist()


def test_primary_metric_is_the_tasks_own_and_accuracy_for_custom_tasks() -> None:
    from esft.report.evals import primary_metric

    assert primary_metric("conciseness") == "reward"
    assert [primary_metric(t) for t in ("countdown", "piqa", "gsm8k")] == ["accuracy"] * 3
    assert primary_metric("my_rewards:length_reward") == "accuracy", "a custom task is measured by accuracy"


def test_a_reward_measured_target_shows_its_mean_reward_change_with_a_paired_bootstrap(tmp_path) -> None:
    before, after = conciseness_rewards(1, 14.0)
    flat_before, flat_after = conciseness_rewards(2, 0.0)
    piqa = [1, 1, 1, 0]

    def run(b: list[float], a: list[float]) -> list[dict[str, Any]]:
        return [reward_row(0, "conciseness", b, 24), reward_row(10, "conciseness", a, 24),
                row(0, "piqa", piqa, 4), row(10, "piqa", piqa, 4)]

    runs = [write_run(tmp_path, "up", es(30, task="conciseness"), run(before, after)),
            write_run(tmp_path, "flat", es(20, task="conciseness"), run(flat_before, flat_after))]
    md = build_report(runs, tmp_path / "rep", figures=False).read_text()
    up, flat = numpy_paired_bootstrap(before, after), numpy_paired_bootstrap(flat_before, flat_after)
    assert up[1] > 0 and flat[1] < 0 < flat[2], "the cases must sit on both sides of 0"

    def units(x: float) -> str:
        return f"{x:+.1f}"

    assert "| run | Δ conciseness (reward) | Δ piqa | avg Δ prior |" in md
    assert table_line(md, "ES (30)") == (
        f"| ES (30) | {units(up[0])} [{units(up[1])}, {units(up[2])}] | +0.0 [+0.0, +0.0]° | +0.0 [+0.0, +0.0]° |"
    ), "reward units, not points; the prior average is piqa's accuracy alone"
    assert table_line(md, "ES (20)") == (
        f"| ES (20) | {units(flat[0])} [{units(flat[1])}, {units(flat[2])}]° | +0.0 [+0.0, +0.0]° | +0.0 [+0.0, +0.0]° |"
    ), "an interval holding 0 is marked as for accuracies"
    assert "A column marked (reward) is the change in mean reward, in the reward's own units." in md
    assert ("Δ conciseness (reward): change in the mean training reward per example, in the reward's own units "
            "(not percentage points)") in md
    assert "Interval: paired bootstrap over the per-example `rewards` (10000 resamples, seed 0, percentile 95%)" in md
    assert "without per-example `rewards`" not in md and "leaves out reward-measured tasks" not in md

    with open(tmp_path / "rep" / "report.csv") as f:
        header, *body = list(csv.reader(f))
    assert header == ["run", "Δ conciseness (reward)", "Δ conciseness (reward) lo95", "Δ conciseness (reward) hi95",
                      "Δ piqa", "Δ piqa lo95", "Δ piqa hi95", "avg Δ prior", "avg Δ prior lo95", "avg Δ prior hi95"]
    assert body == [["ES (30)", *map(str, up), "0.0", "0.0", "0.0", "0.0", "0.0", "0.0"],
                    ["ES (20)", *map(str, flat), "0.0", "0.0", "0.0", "0.0", "0.0", "0.0"]], \
        "report.csv: the reward change and its bounds in the reward's units"


def test_a_reward_change_without_per_example_rewards_has_no_interval(tmp_path) -> None:
    # Rows with the mean reward only: a bare change. Rows from before rewards were logged: none.
    mean_only = [reward_row(0, "conciseness", None, 24, reward=-31.25), reward_row(10, "conciseness", None, 24, reward=-18.5),
                 row(0, "piqa", [1, 1, 0, 0], 4), row(10, "piqa", [1, 1, 0, 0], 4)]
    no_reward = [reward_row(0, "conciseness", None, 24), reward_row(10, "conciseness", None, 24),
                 row(0, "piqa", [1, 1, 0, 0], 4), row(10, "piqa", [1, 1, 0, 0], 4)]
    runs = [write_run(tmp_path, "mean", es(30, task="conciseness"), mean_only),
            write_run(tmp_path, "old", es(20, task="conciseness"), no_reward)]
    md = build_report(runs, tmp_path / "rep", figures=False).read_text()
    assert table_line(md, "ES (30)") == "| ES (30) | +12.8 | +0.0 [+0.0, +0.0]° | +0.0 [+0.0, +0.0]° |"
    assert table_line(md, "ES (20)") == "| ES (20) | – | +0.0 [+0.0, +0.0]° | +0.0 [+0.0, +0.0]° |", \
        "a row without `reward` gives no reward change, and never an accuracy one in its place"
    assert ("A reward change without an interval comes from rows without per-example `rewards` "
            "(evaluated before they were logged).") in md
    assert "– also when those rows lack `reward` (evaluated before it was logged)." in md
    assert "Interval: paired bootstrap over the per-example `rewards`" not in md
    assert "A value without an interval comes from rows without `n`" not in md, "accuracy rows all had n"
    with open(tmp_path / "rep" / "report.csv") as f:
        body = list(csv.reader(f))[1:]
    assert [b[:4] for b in body] == [["ES (30)", "12.75", "", ""], ["ES (20)", "", "", ""]]


def test_a_reward_measured_prior_task_is_left_out_of_the_accuracy_average(tmp_path) -> None:
    before, after = conciseness_rewards(3, 10.0)
    evals = [row(0, "countdown", [0, 0, 0, 0], 4), row(10, "countdown", [1, 1, 0, 0], 4),
             row(0, "piqa", [1, 1, 1, 0], 4), row(10, "piqa", [1, 1, 0, 0], 4),
             reward_row(0, "conciseness", before, 24), reward_row(10, "conciseness", after, 24)]
    md = build_report([write_run(tmp_path, "cd", es(30), evals)], tmp_path / "rep", figures=False).read_text()
    up = numpy_paired_bootstrap(before, after)
    line = table_line(md, "ES (30)")
    assert line.startswith(f"| ES (30) | {up[0]:+.1f} [{up[1]:+.1f}, {up[2]:+.1f}] | +50.0 [+0.0, +100.0]° | "), \
        "columns in sorted order: conciseness (in reward units), countdown, piqa"
    piqa = line.split(" | ")[3]
    assert line.endswith(f"| {piqa} | {piqa} |"), "the average is piqa's change alone, without a star"
    assert "avg Δ prior leaves out reward-measured tasks: a reward is never averaged with accuracies." in md


# ------------------------------------------------------------------ over seeds
def test_t_interval_over_seeds_equals_a_direct_computation() -> None:
    from esft.report.intervals import t975, t_interval

    values = [21.1, 15.5, 12.9]
    e = t_interval(values)
    mean, sd = np.mean(values), np.std(values, ddof=1)
    assert e.value == mean
    assert (e.lo, e.hi) == (mean - 4.302653 * sd / math.sqrt(3), mean + 4.302653 * sd / math.sqrt(3))
    assert t975(1) == 12.706205 and t975(30) == 2.042272
    assert abs(t975(60) - 2.000298) < 1e-3 and abs(t975(1000) - 1.962339) < 1e-4
    assert not t_interval([3.0]).has_interval, "one seed: no interval"


def test_runs_that_differ_only_in_seed_are_summarised_over_seeds_with_a_figure(tmp_path) -> None:
    base, gains = [0, 0, 0, 0, 0], {0: [1, 1, 0, 0, 0], 1: [1, 0, 0, 0, 0], 2: [1, 1, 1, 1, 0]}
    runs = []
    for seed, after in gains.items():
        evals = [row(0, "countdown", base, 5), row(10, "countdown", after, 5)]
        runs.append(write_run(tmp_path, f"es-seed{seed}", es(8, seed=seed, output_dir=f"x/{seed}"), evals))
        kl = [{"iteration": 10, "task": "piqa", "kl_exact_token": 0.1 * (seed + 1)}]
        (tmp_path / f"es-seed{seed}" / "kl.json").write_text(json.dumps(kl))
    # Another setting at one seed only: not a group.
    runs.append(write_run(tmp_path, "awd", es(8, awd="l2", awd_lambda=10), [row(0, "countdown", base, 5)]))
    out = tmp_path / "rep"
    md = build_report(runs, out).read_text()
    line = table_line(md, "ES (8)", section="## Over training seeds")
    changes = [100 * sum(v) / 5 for v in gains.values()]  # 40, 20, 80 points
    half = 4.302653 * np.std(changes, ddof=1) / math.sqrt(3)
    assert f"| 0, 1, 2 | +46.7 [{46.6667 - half:+.1f}, {46.6667 + half:+.1f}]" in line, line
    assert "0.2000 [" in line, "the mean prior KL over the three seeds"
    assert "ES (8) + AWD" not in md.split("## Over training seeds", 1)[1].split("## Runs", 1)[0]
    assert (out / "seeds.png").exists() and "seeds.png" in md


def test_the_report_reads_kl_and_drift_rows_only_against_the_runs_reference(tmp_path) -> None:
    """A kl.json / drift.json row measured against another reference (a GRPO stage's own start,
    as rows without `reference` were before that changed) is not mixed into the run's KL or drift."""
    from esft.report.summary import load_run

    run = write_run(tmp_path, "es", es(8), metrics=[{"iteration": 10, "drift/norm": 1.5}])
    kl = [{"iteration": 10, "task": "piqa", "kl_exact_token": 0.2, "reference": "embedded"},
          {"iteration": 20, "task": "piqa", "kl_exact_token": 9.0, "reference": "elsewhere/final"}]
    (run / "kl.json").write_text(json.dumps(kl))
    drift = [{"iteration": 10, "global": {"norm": 99.0}, "reference": "elsewhere/final"}]
    (run / "drift.json").write_text(json.dumps(drift))
    summary = load_run(run)
    assert summary.kl == {"piqa": 0.2}, "the last iteration measured against the run's origin"
    assert summary.drift == {10: 1.5}, "metrics.jsonl's drift, not a row against another θ₀"

    # A GRPO stage: its old rows (no `reference`) were measured against its own start, not the origin.
    grpo = {"trainer": "grpo", "task": "countdown", "learning_rate": 1e-6}
    write_run(tmp_path, "stage1", {**grpo, "model": "embedded"})
    stage2 = write_run(tmp_path, "stage2", {**grpo, "model": str(tmp_path / "stage1" / "final")})
    (stage2 / "kl.json").write_text(json.dumps([{"iteration": 5, "task": "piqa", "kl_exact_token": 0.05}]))
    assert load_run(stage2).kl == {}
    (stage2 / "kl.json").write_text(json.dumps([{"iteration": 5, "task": "piqa", "kl_exact_token": 0.3,
                                                 "reference": "embedded"}]))
    assert load_run(stage2).kl == {"piqa": 0.3}
