"""`esft report` tables on run directories written by hand: like-with-like settings,
intervals and their marks, report.csv columns, the drift table (no model needed)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

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
