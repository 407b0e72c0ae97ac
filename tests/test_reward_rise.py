"""benchmarks/reward_rise.py on metrics written by hand: the share of the smoothed training-reward
rise reached by mid-run, a resumed run's later rows, and clear errors for a log it cannot read."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import reward_rise  # noqa: E402


def write_run(root: Path, rewards: list[float], extra_rows: list[dict] | None = None) -> Path:
    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"task": "listing", "population_size": 4, "seed": 0}))
    rows = [{"iteration": 0, "awd/lambda": 5.0}]  # what `auto` writes first: no reward
    rows += [{"iteration": i, "reward/mean": r} for i, r in enumerate(rewards, start=1)]
    rows += extra_rows or []
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_linear_rise_is_lagged_by_the_trailing_mean_only() -> None:
    curve = [float(i) for i in range(20)]  # window 4: smoothed[i] = i - 1.5 from i = 3 on
    s = reward_rise.smoothed(curve)
    assert s[:3] == [0.0, 0.5, 1.0] and s[-1] == 17.5
    assert reward_rise.rise_at(curve, 0.5) == pytest.approx(7.5 / 17.5)  # iteration 10
    assert reward_rise.rise_at(curve, 0.75) == pytest.approx(12.5 / 17.5)  # iteration 15


def test_a_saturating_run_reaches_its_rise_early_and_a_flat_one_has_none() -> None:
    saturating = [0.0, 2.0, 4.0] + [5.0] * 17
    assert reward_rise.rise_at(saturating, 0.5) == pytest.approx(1.0)
    assert reward_rise.rise_at([3.0] * 10, 0.5) is None
    assert reward_rise.rise_at([3.0, 2.0, 1.0, 0.0], 0.5) is None


def test_describe_reads_the_log_and_a_resumed_iteration_keeps_its_later_row(tmp_path: Path) -> None:
    run = write_run(tmp_path, [0.0, 1.0, 2.0, 3.0], extra_rows=[{"iteration": 2, "reward/mean": 10.0}])
    assert reward_rise.reward_curve(run) == [0.0, 10.0, 2.0, 3.0]
    row = reward_rise.describe(run)
    assert (row["task"], row["max_steps"], row["population_size"], row["seed"]) == ("listing", 4, 4, 0)
    assert row["rise_at_0.5"] == pytest.approx(reward_rise.rise_at([0.0, 10.0, 2.0, 3.0], 0.5))
    assert "| run | listing | 4 | 4 | 0 |" in reward_rise.markdown([row])


def test_a_log_without_rewards_or_with_a_gap_is_refused(tmp_path: Path) -> None:
    run = write_run(tmp_path, [])
    with pytest.raises(ValueError, match="no 'reward/mean' rows"):
        reward_rise.reward_curve(run)
    (run / "metrics.jsonl").write_text(json.dumps({"iteration": 1, "reward/mean": 1.0}) + "\n"
                                       + json.dumps({"iteration": 3, "reward/mean": 2.0}) + "\n")
    with pytest.raises(ValueError, match=r"lacks iterations \[2\]"):
        reward_rise.reward_curve(run)
