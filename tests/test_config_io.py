"""Config validation, crash-safe files, and reward scoring that never stops a run."""

from __future__ import annotations

import math

import pytest

from esft.config import ESConfig
from esft.io import append_jsonl, ensure_writable_dir, read_jsonl
from esft.rewards import RewardStats, score_completions
from esft.seedlog import IterationRecord, SeedLog
from esft.tasks.base import BaseTask


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sigma": 0.0}, "sigma must be > 0"),
        ({"sigma": -1e-3}, "sigma must be > 0"),
        ({"learning_rate": -1.0}, "learning_rate must be >= 0"),
        ({"population_size": 1}, "population_size must be >= 2"),
        ({"population_size": 5, "mirror_sampling": True}, "even population_size"),
        ({"awd": "l2", "awd_lambda": 2000.0, "learning_rate": 5e-4}, "s = α·λ < 1"),
        ({"awd": "l2", "awd_lambda": 1.0, "awd_decoupled": True}, "s = λ < 1"),
    ],
)
def test_bad_hyperparameters_are_refused_with_a_clear_message(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        ESConfig(**kwargs)


def test_awd_lambda_defaults_follow_the_paper() -> None:
    assert ESConfig(awd="l2").resolved_awd_lambda == 10.0
    assert ESConfig(awd="l1").resolved_awd_lambda == 0.01
    assert ESConfig(awd="l2").awd_step == pytest.approx(5e-4 * 10)
    assert ESConfig(awd="l1", awd_lambda=0.5, awd_decoupled=True).awd_step == 0.5


def test_config_yaml_roundtrip_and_unknown_keys(tmp_path) -> None:
    import yaml

    cfg = ESConfig(sigma=2e-3, population_size=6, mirror_sampling=True)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert ESConfig.from_yaml(path) == cfg
    path.write_text("sigmaa: 1\n")
    with pytest.raises(ValueError, match="unknown config keys: sigmaa"):
        ESConfig.from_yaml(path)


def test_config_differences_name_the_fields_that_changed() -> None:
    a, b = ESConfig(sigma=1e-3), ESConfig(sigma=2e-3, max_steps=7, output_dir="elsewhere")
    assert a.differences(b) == ["sigma: 0.001 != 0.002"], "max_steps/output_dir may change on resume"


def test_kl_fields_only_block_a_resume_when_a_kl_budget_reads_them() -> None:
    old = ESConfig(kl_every=1)  # a run made while --kl_every defaulted to 1
    assert ESConfig(kl_every=5).differences(old) == [], "no budget: the KL fields never touched the weights"
    budget = dict(kl_budget=0.1, kl_tasks="piqa")
    assert ESConfig(**budget, kl_every=5).differences(ESConfig(**budget, kl_every=1)) == ["kl_every: 5 != 1"]


def test_a_budget_run_cannot_resume_for_another_length() -> None:
    budget = dict(kl_budget=0.1, kl_tasks="piqa")
    assert ESConfig(**budget, max_steps=20).differences(ESConfig(**budget, max_steps=30)) == [
        "max_steps: 20 != 30"], "its step was planned for the run's length"
    assert ESConfig(max_steps=20).differences(ESConfig(max_steps=30)) == [], "a fixed λ may be extended"


def test_torn_last_line_is_ignored_and_repaired(tmp_path) -> None:
    path = tmp_path / "log.jsonl"
    append_jsonl(path, {"iteration": 1})
    append_jsonl(path, {"iteration": 2})
    with open(path, "a") as f:
        f.write('{"iteration": 3, "see')  # a crash in the middle of a write
    assert read_jsonl(path) == [{"iteration": 1}, {"iteration": 2}]
    read_jsonl(path, repair=True)
    append_jsonl(path, {"iteration": 3})
    assert [r["iteration"] for r in read_jsonl(path)] == [1, 2, 3]


def test_seedlog_roundtrip_keeps_coefficients_bit_exact(tmp_path) -> None:
    log = SeedLog(tmp_path)
    coeffs = [0.1 + 0.2, -1 / 3, 1e-17]
    log.append(IterationRecord(1, [5, 6, 7], [0.0, 1.0, 2.0], coeffs, {"time": {"total": 1.0}}))
    log.append(IterationRecord(2, [8, 9, 10], [1.0, 1.0, 1.0], None, {}))
    recs = log.records()
    assert recs[0].coefficients == coeffs and recs[0].extra["time"]["total"] == 1.0
    assert recs[1].skipped


def test_unwritable_output_dir_is_a_clear_error(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="not writable"):
        ensure_writable_dir(blocker / "run")


class Hostile(BaseTask):
    name = "hostile"

    def reward(self, completion: str, example: dict) -> float:
        if completion == "raise":
            raise RuntimeError("boom")
        if completion == "nan":
            return math.nan
        if completion == "inf":
            return math.inf
        return 1.0


def test_raising_or_nonfinite_rewards_score_zero_and_are_counted() -> None:
    stats = RewardStats()
    out = score_completions(Hostile(), ["ok", "raise", "nan", "inf", "ok"], [{}] * 5, stats)
    assert out == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert (stats.errors, stats.nonfinite) == (1, 2)


def test_missing_report_backend_names_the_extra(tmp_path) -> None:
    import importlib.util

    from esft.metric_sinks import MetricsWriter

    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ValueError, match=r"esft\[tensorboard\]"):
            MetricsWriter(tmp_path, "tensorboard")
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ValueError, match=r"esft\[wandb\]"):
            MetricsWriter(tmp_path, "wandb")
    writer = MetricsWriter(tmp_path, "none")
    writer.log({"iteration": 1, "reward/mean": 0.5})
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"iteration": 1, "reward/mean": 0.5}]
