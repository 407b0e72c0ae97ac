"""benchmarks/paper_claims.py's recovery curve on a run written by hand (no model): prior-task
accuracy pooled over the three tasks with its Wilson interval, the mean KL per iteration,
the target's mean reward, the table and the figure."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import paper_claims  # noqa: E402

from esft.report.intervals import wilson

PRIORS = ("hellaswag", "piqa", "arc_challenge")


def test_recovery_pools_the_prior_tasks_per_iteration(tmp_path: Path) -> None:
    run = tmp_path / "recovery" / "es-n4-seed0"
    (run / "eval").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"task": "conciseness", "population_size": 4, "seed": 0}))
    correct = {0: (30, 40, 10), 5: (28, 20, 9), 10: (31, 38, 11)}  # PIQA drops at 5 and comes back at 10
    rows = [{"iteration": k, "task": t, "n": 50, "accuracy": c / 50} for k, cs in correct.items()
            for t, c in zip(PRIORS, cs)]
    rows += [{"iteration": k, "task": "conciseness", "n": 2, "accuracy": 0.0, "rewards": [-10.0 + k, -20.0]}
             for k in correct]
    rows.append({"iteration": 7, "task": "piqa", "n": 50, "accuracy": 0.5})  # one task alone: no pooled point
    (run / "eval" / "forgetting.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "kl.json").write_text(json.dumps([{"iteration": k, "task": t, "kl_exact_token": 0.01 * k * (j + 1)}
                                             for k in correct for j, t in enumerate(PRIORS)]))
    rec = paper_claims.recovery(tmp_path / "recovery")
    curve = rec["es-n4-seed0"]["accuracy"]
    assert [c["iteration"] for c in curve] == [0, 5, 10]
    for c in curve:
        k = c["iteration"]
        assert c["prior_accuracy"] == pytest.approx(sum(correct[k]) / 150)
        assert (c["lo"], c["hi"]) == pytest.approx(wilson(sum(correct[k]), 150))
        assert c["piqa_accuracy"] == pytest.approx(correct[k][1] / 50)
        assert c["target_reward"] == pytest.approx((-10.0 + k - 20.0) / 2)
    assert rec["es-n4-seed0"]["kl"] == pytest.approx({0: 0.0, 5: 0.1, 10: 0.2})  # mean of k·(1, 2, 3)/100
    table = paper_claims.recovery_markdown(rec)
    assert "| es-n4-seed0 | 5 | 38.0% [" in table and "| 40% |" in table and "| 0.100 |" in table
    figure = paper_claims.plot_recovery(rec, tmp_path / "recovery.png")
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
