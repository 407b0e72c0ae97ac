"""Inputs a careless or hostile user gives: rewards at the edge of the float range, KL
prompt files that are empty or binary, undecodable specs, custom tasks evaluated from the
command line. Each fails early with a line naming the culprit, or is handled exactly."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY, assert_bitwise_equal

from esft import es
from esft.config import ESConfig
from esft.io import append_jsonl, read_jsonl
from esft.seedlog import SeedLog

ROWS = [{"prompt": "Say hi."}, {"prompt": "Name a fruit."}]


# ------------------------------------------------------------- huge finite rewards
def test_finite_rewards_of_any_size_give_finite_z_scores_equal_to_the_scaled_formula() -> None:
    rewards = [1e308, -1e308, 5e307, 0.0]
    z = es.normalize_rewards(rewards)
    assert z is not None and all(math.isfinite(v) for v in z)
    r = np.asarray(rewards) / 1e308
    assert z == pytest.approx(list((r - r.mean()) / r.std()), rel=1e-12)
    assert sum(v * v for v in z) == pytest.approx(len(z))  # still z-scores: Σz² = N


def test_ordinary_rewards_are_normalised_by_the_plain_formula_bit_for_bit() -> None:
    rewards = [-82.3, -65.0, -70.25, -91.5, 3e140]
    r = np.asarray(rewards, dtype=np.float64)
    assert es.normalize_rewards(rewards) == [float(x) for x in (r - r.mean()) / (r.std() + 1e-8)]


def test_reward_summary_and_member_means_stay_finite_where_numpy_overflows() -> None:
    with np.errstate(over="ignore"):
        assert not math.isfinite(float(np.mean([1e308, 1e308])))
    assert es.finite_mean([1e308, 1e308]) == 1e308
    summary = es.reward_summary([1e308, -1e308, 1e308, -1e308])
    assert summary == {"reward/mean": 0.0, "reward/std": 1e308, "reward/min": -1e308, "reward/max": 1e308}


def test_a_non_finite_value_never_reaches_a_jsonl_file_and_the_error_names_it(tmp_path) -> None:
    path = tmp_path / "seedlog.jsonl"
    with pytest.raises(ValueError, match=r"seedlog.jsonl: not written, because coefficients\[1\] \(inf\)"):
        append_jsonl(path, {"iteration": 1, "coefficients": [0.5, math.inf]})
    assert not path.exists()


def huge(prompts, completions, **kw):
    """±1e308 by completion length: finite, but their sum and square overflow."""
    return [1e308 if len(c) % 2 else -1e308 for c in completions]


@pytest.mark.slow
def test_a_run_with_rewards_of_1e308_trains_logs_finite_numbers_and_resumes_exactly(tmp_path, embedded_dir, caplog) -> None:
    from esft.trainer import ESTrainer

    caplog.set_level(logging.WARNING)
    cfg = ESConfig(**{**TINY, "save_steps": 0}, output_dir=str(tmp_path / "straight"))
    history = ESTrainer(reward_funcs=huge, train_dataset=ROWS, args=cfg).train()
    records = SeedLog(tmp_path / "straight").records()
    assert len(records) == TINY["max_steps"]
    assert any(not r.skipped for r in records), "every update was skipped: the test shows nothing"
    for r in records:
        assert all(math.isfinite(v) for v in r.rewards + (r.coefficients or []))
    for m in history:
        assert math.isfinite(m["reward/mean"]) and math.isfinite(m["reward/std"])
    lines = (tmp_path / "straight" / "metrics.jsonl").read_text()
    assert "Infinity" not in lines and "NaN" not in lines
    first = json.loads(lines.splitlines()[0])
    assert first["rewards/huge/mean"] == pytest.approx(first["reward/mean"]) and math.isfinite(first["rewards/huge/std"])

    # A kill after iteration 1 (its metrics line lost too): the resume rebuilds it from the
    # record with finite numbers and ends on the same weights as the straight run.
    killed = tmp_path / "killed"
    ESTrainer(reward_funcs=huge, train_dataset=ROWS, args=dataclasses.replace(cfg, output_dir=str(killed), max_steps=1)).train()
    (killed / "metrics.jsonl").write_text("")
    ESTrainer(reward_funcs=huge, train_dataset=ROWS, args=dataclasses.replace(cfg, output_dir=str(killed), resume=True)).train()
    assert (killed / "seedlog.jsonl").read_bytes() == (tmp_path / "straight" / "seedlog.jsonl").read_bytes()
    rebuilt = read_jsonl(killed / "metrics.jsonl")[0]
    assert rebuilt["metrics/rebuilt"] and math.isfinite(rebuilt["reward/std"])
    from safetensors.torch import load_file

    assert_bitwise_equal(load_file(killed / "final" / "model.safetensors"),
                         load_file(tmp_path / "straight" / "final" / "model.safetensors"), "resumed vs straight")


# --------------------------------------------------------- KL inputs, checked first
BAD_KL = [
    ({"kl_tasks": "conciseness,nosuchtask"}, "--kl_tasks 'nosuchtask'"),
    ({"kl_prompts": "empty.txt"}, "no prompts in it"),
    ({"kl_prompts": "blank.txt"}, "no prompts in it"),
    ({"kl_prompts": "binary.txt"}, "not UTF-8 text"),
    ({"kl_prompts": "nul.txt"}, "a binary file"),
    ({"kl_prompts": "missing.txt"}, "no such file"),
    ({"kl_prompts": "rows.jsonl"}, "row 1 needs a 'prompt'"),
]


@pytest.mark.parametrize(("fields", "message"), BAD_KL, ids=[m for _, m in BAD_KL])
def test_bad_kl_inputs_are_refused_before_the_output_directory_is_created(tmp_path, fields, message) -> None:
    from esft.trainer import ESTrainer

    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n   \n\t\n")
    (tmp_path / "binary.txt").write_bytes(bytes(range(128, 256)) * 4)
    (tmp_path / "nul.txt").write_bytes(b"prompt\x00\x00\x00\n")
    (tmp_path / "rows.jsonl").write_text('{"prompt": "fine"}\n{"text": "no prompt"}\n')
    if "kl_prompts" in fields:
        fields = {"kl_prompts": str(tmp_path / fields["kl_prompts"])}
    out = tmp_path / "run"
    cfg = ESConfig(**TINY, kl_budget=0.1, output_dir=str(out), **fields)
    with pytest.raises(ValueError, match=message):
        ESTrainer(args=cfg)
    assert not out.exists(), f"a refused run left {sorted(p.name for p in out.iterdir())}"


def test_a_kl_budget_without_awd_says_in_one_line_that_it_applies_l2(tmp_path, caplog) -> None:
    from esft.trainer import ESTrainer

    caplog.set_level(logging.INFO, logger="esft.trainer")
    (tmp_path / "p.txt").write_text("Describe the sea.\n")
    assert ESTrainer._checked_kl_inputs(ESConfig(kl_budget=0.1, kl_prompts=str(tmp_path / "p.txt")))
    assert "--kl_budget 0.1 drives an AWD L2 step" in caplog.text


# ------------------------------------------------------------ undecodable files
def test_an_undecodable_sweep_spec_or_config_file_is_named(tmp_path) -> None:
    from esft.flags import read_config_file
    from esft.sweep import load_spec

    bad = tmp_path / "spec.yaml"
    bad.write_bytes(b"base: {task: conciseness}\n# caf\xe9\n")
    with pytest.raises(ValueError, match=rf"sweep spec {bad}: not UTF-8 text \(byte 31, 0xe9"):
        load_spec(bad)
    with pytest.raises(ValueError, match=rf"--config {bad}: not UTF-8 text"):
        read_config_file(bad, None)


# ------------------------------------------------------- custom tasks from the CLI
REWARDS = '''
def short(prompts, completions, **kw):
    return [1.0 if len(c) < 40 else 0.0 for c in completions]
'''


@pytest.fixture
def custom_task(tmp_path, monkeypatch) -> tuple[str, Path, dict]:
    (tmp_path / "cli_rewards.py").write_text(REWARDS)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    env = {"PYTHONPATH": str(tmp_path)}
    return "cli_rewards:short", data, env


def _esft(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    import os

    full = {**os.environ, "PYTHONPATH": os.pathsep.join([env["PYTHONPATH"], os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "esft.cli", *args], capture_output=True, text=True, env=full,
                          cwd=cwd, timeout=600)


@pytest.mark.slow
def test_eval_and_kl_take_a_custom_task_with_its_dataset(tmp_path, custom_task, embedded_dir) -> None:
    name, data, env = custom_task
    out = tmp_path / "eval"
    proc = _esft("eval", "--model", "embedded", "--tasks", name, "--dataset", str(data), "--limit", "2",
                 "--max_new_tokens", "4", "--output", str(out), env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "results.json").read_text())["tasks"][name]
    assert result["n"] == 2 and result["accuracy"] == 1.0  # 4 tokens are always under 40 characters

    # A run trained on the custom task: --run finds the dataset in its config.
    run = tmp_path / "run"
    cfg = {**TINY, "task": name, "dataset": str(data), "max_steps": 1, "save_steps": 0}
    train = _esft("train", *[a for k, v in cfg.items() for a in ([f"--{k}"] if v is True else [f"--{k}", str(v)])],
                  "--output_dir", str(run), env=env, cwd=tmp_path)
    assert train.returncode == 0, train.stderr
    proc = _esft("eval", "--run", str(run), "--tasks", name, "--limit", "2", "--max_new_tokens", "4", env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert {r["iteration"] for r in read_jsonl(run / "eval" / "forgetting.jsonl")} == {0, 1}
    proc = _esft("kl", "--run", str(run), "--tasks", name, "--num_prompts", "2", "--max_tokens", "4", env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert {r["task"] for r in json.loads((run / "kl.json").read_text())} == {name}


def test_eval_of_a_custom_task_without_a_dataset_says_which_flag(tmp_path, custom_task) -> None:
    name, _, env = custom_task
    proc = _esft("eval", "--model", "embedded", "--tasks", name, "--output", str(tmp_path / "e"), env=env, cwd=tmp_path)
    assert proc.returncode == 2 and "pass --dataset" in proc.stderr, proc.stderr
