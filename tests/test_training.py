"""End-to-end ES on the embedded model: exact arithmetic, replay, resume after kill -9."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import SHARED_DATA, TINY, assert_bitwise_equal, tiny_cli_args
from safetensors.torch import load_file

from esft import es
from esft.config import ESConfig
from esft.io import read_jsonl
from esft.noise import noise
from esft.seedlog import SeedLog, load_checkpoint_tensors, replay
from esft.trainer import ESTrainer

pytestmark = pytest.mark.slow


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint_tensors(path)


def test_population_evaluation_leaves_every_weight_bitwise_unchanged(tmp_path, embedded_dir) -> None:
    cfg = ESConfig(**{**TINY, "trainable": None, "population_size": 2, "max_new_tokens": 3}, output_dir=str(tmp_path))
    trainer = ESTrainer(args=cfg)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    prompts = trainer.engine.encode([trainer.task.messages(e) for e in trainer.train_examples])
    # A perturbed member really differs from the base (else the check below is empty).
    trainer.state.perturb(123, 1, cfg.sigma)
    assert not torch.equal(trainer.model.model.layers[3].mlp.up_proj.weight, before["model.layers.3.mlp.up_proj.weight"])
    trainer.state.restore()
    for it in (1, 2):
        trainer.evaluate_population(it, prompts)
    after = trainer.model.state_dict()
    assert_bitwise_equal(after, before, "weights after a whole population without update")


def test_run_directory_follows_the_contract(reference_run: Path) -> None:
    for name in ("config.yaml", "seedlog.jsonl", "metrics.jsonl", "checkpoint-1", "checkpoint-3", "final"):
        assert (reference_run / name).exists(), f"{name} missing from the run directory"
    recs = SeedLog(reference_run).records()
    assert [r.iteration for r in recs] == [1, 2, 3]
    assert all(len(r.seeds) == 4 and len(r.rewards) == 4 for r in recs)
    assert sum(not r.skipped for r in recs) >= 2, "tiny run should see differing rewards; adjust TINY"
    assert "time" not in recs[0].extra, "timings belong in metrics.jsonl: the seed log is a pure function of the config"
    metrics = read_jsonl(reference_run / "metrics.jsonl")
    assert {"time/generation", "time/perturb_restore", "time/update"} <= set(metrics[0])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(reference_run / "final")
    assert model.config.model_type == "llama"


def test_update_equals_independent_computation_from_the_seed_log(reference_run: Path, embedded_dir: Path) -> None:
    base = load_file(str(embedded_dir / "model.safetensors"))
    final = weights(reference_run / "final")
    scale = es.update_scale(TINY["learning_rate"], TINY["population_size"])
    recs = SeedLog(reference_run).records()
    for name, theta0 in base.items():
        if not name.startswith("model.layers.0."):
            assert torch.equal(final[name], theta0), f"frozen tensor {name} changed"
            continue
        expected = theta0.double()
        for rec in (r for r in recs if not r.skipped):
            expected = expected + scale * sum(c * noise(s, name, theta0.shape).double() for s, c in zip(rec.seeds, rec.coefficients))
        torch.testing.assert_close(final[name].double(), expected, rtol=0, atol=1e-6, msg=f"{name} ≠ θ₀ + Σ(α/N)Σcε")
    # The logged coefficients are the z-scores of the logged rewards.
    for rec in recs:
        assert rec.coefficients == (None if rec.skipped else pytest.approx(es.normalize_rewards(rec.rewards)))


@pytest.mark.parametrize("k", [0, 1, 3])
def test_replay_is_bitwise_equal_to_the_checkpoint(reference_run: Path, embedded_dir: Path, k: int) -> None:
    state, _ = replay(reference_run, k, device="cpu")
    expected = weights(embedded_dir) if k == 0 else weights(reference_run / f"checkpoint-{k}")
    replayed = {n: t for n, t in state.state_dict().items() if n in expected}
    assert_bitwise_equal(replayed, expected, f"replay of iteration {k}")


def test_replay_with_awd_equals_the_final_weights(awd_run: Path) -> None:
    state, _ = replay(awd_run, 3, device="cpu")
    final = weights(awd_run / "final")
    assert_bitwise_equal({n: t for n, t in state.state_dict().items() if n in final}, final, "AWD replay")


def test_awd_shrinks_the_first_update_by_one_minus_step(reference_run: Path, awd_run: Path) -> None:
    import json

    plain = [json.loads(x) for x in (reference_run / "metrics.jsonl").read_text().splitlines()]
    awd = [json.loads(x) for x in (awd_run / "metrics.jsonl").read_text().splitlines()]
    # Iteration 1 starts from the same weights with the same seeds, so the same update.
    assert awd[0]["es/update_norm"] == pytest.approx(plain[0]["es/update_norm"])
    step = TINY["learning_rate"] * 10.0
    assert awd[0]["drift/norm"] == pytest.approx((1 - step) * plain[0]["drift/norm"], rel=1e-5)
    assert awd[-1]["drift/norm"] < plain[-1]["drift/norm"]


def test_kill_9_then_resume_ends_bitwise_equal_to_an_uninterrupted_run(tmp_path, reference_run: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "esft.cli", "train", *tiny_cli_args(output_dir=out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = out / "seedlog.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and log.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    time.sleep(random.uniform(0.0, 0.8))  # somewhere inside iteration 2 (or its checkpoint)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists()
    resumed = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_bitwise_equal(weights(out / "final"), weights(reference_run / "final"), "resumed vs uninterrupted")
    assert [r.seeds for r in SeedLog(out).records()] == [r.seeds for r in SeedLog(reference_run).records()]


def test_resume_with_a_different_config_is_refused(reference_run: Path) -> None:
    cfg = ESConfig(**{**TINY, "sigma": 0.07}, output_dir=str(reference_run), resume=True)
    with pytest.raises(ValueError, match=r"sigma: 0\.07 != 0\.05"):
        ESTrainer(args=cfg).train()


def test_reusing_a_run_directory_without_resume_is_refused(reference_run: Path) -> None:
    with pytest.raises(ValueError, match="already holds a run"):
        ESTrainer(args=ESConfig(**TINY, output_dir=str(reference_run))).train()


def test_mirror_sampling_logs_one_seed_per_pair(tmp_path, embedded_dir) -> None:
    # Shared (reference-parity) noise here, so replay is checked in both noise modes.
    cfg = ESConfig(**{**TINY, "max_steps": 1, "mirror_sampling": True, "save_steps": 0, "noise_mode": "shared"},
                   output_dir=str(tmp_path))
    ESTrainer(args=cfg).train()
    (rec,) = SeedLog(tmp_path).records()
    assert len(rec.seeds) == 2 and len(rec.rewards) == 4
    assert rec.coefficients == pytest.approx(es.coefficients(rec.rewards, mirror=True))
    state, _ = replay(tmp_path, 1, device="cpu")
    final = weights(tmp_path / "final")
    assert_bitwise_equal({n: t for n, t in state.state_dict().items() if n in final}, final, "mirror replay")


def write_rewards_module(tmp_path: Path) -> str:
    (tmp_path / "odd_rewards_mod.py").write_text(
        "import math\n"
        "def constant(prompts, completions, **kw):\n    return [1.0] * len(completions)\n"
        "def explosive(prompts, completions, **kw):\n    raise RuntimeError('reward bug')\n"
        "def nan_or_len(prompts, completions, **kw):\n"
        "    return [math.nan if i == 0 else float(len(c)) for i, c in enumerate(completions)]\n"
    )
    (tmp_path / "data.jsonl").write_text('{"prompt": "Say hi."}\n{"prompt": "Name a fruit."}\n')
    return str(tmp_path / "data.jsonl")


def test_equal_rewards_skip_the_update_and_leave_weights_unchanged(tmp_path, monkeypatch, embedded_dir) -> None:
    data = write_rewards_module(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = ESConfig(**{**TINY, "task": "odd_rewards_mod:constant", "max_steps": 1, "save_steps": 0},
                   dataset=data, output_dir=str(tmp_path / "run"))
    trainer = ESTrainer(args=cfg)
    history = trainer.train()
    assert history[0]["es/skipped"] is True and history[0]["es/update_norm"] == 0.0
    assert_bitwise_equal(weights(tmp_path / "run" / "final"), weights(embedded_dir), "skipped update")


def test_raising_and_nan_rewards_score_zero_and_the_run_continues(tmp_path, monkeypatch, embedded_dir) -> None:
    data = write_rewards_module(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for func, expected_errors in (("explosive", 4 * 2), ("nan_or_len", 4)):
        cfg = ESConfig(**{**TINY, "task": f"odd_rewards_mod:{func}", "max_steps": 1, "save_steps": 0},
                       dataset=data, output_dir=str(tmp_path / func))
        history = ESTrainer(args=cfg).train()
        assert history[0]["reward/errors"] == expected_errors, func


def test_python_api_with_trl_style_reward_funcs(tmp_path, embedded_dir) -> None:
    def shorter_is_better(prompts, completions, **kwargs):
        return [-float(len(c)) for c in completions]

    trainer = ESTrainer(
        model="embedded",
        reward_funcs=shorter_is_better,
        args=ESConfig(**{**TINY, "max_steps": 1, "save_steps": 0}, output_dir=str(tmp_path / "run")),
        train_dataset=[{"prompt": "Describe the sea."}, {"prompt": "Describe a cat."}],
    )
    trainer.train()
    path = trainer.save_model(tmp_path / "saved")
    assert (path / "config.json").exists()
    assert_bitwise_equal(weights(path), weights(tmp_path / "run" / "final"), "save_model vs final")


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"task": "no_such_task"}, ValueError, "no_such_task"),
        ({"model": "definitely-not-a-model"}, ValueError, "unknown model"),
        ({"task": "countdown", "data_dir": "/nonexistent/data"}, FileNotFoundError, "countdown.json"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, overrides, error, message) -> None:
    with pytest.raises(error, match=message):
        ESTrainer(args=ESConfig(**{**TINY, **overrides}, output_dir=str(tmp_path / "run"))).train()


def test_cli_replay_and_errors(tmp_path, reference_run: Path) -> None:
    out = tmp_path / "replayed"
    r = subprocess.run([sys.executable, "-m", "esft.cli", "replay", str(reference_run), "--iteration", "2", "--output", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_bitwise_equal(weights(out), weights(reference_run / "checkpoint-2"), "esft replay vs checkpoint-2")
    bad = subprocess.run([sys.executable, "-m", "esft.cli", "replay", str(reference_run), "--iteration", "9", "--output", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "out of range" in bad.stderr
    odd = subprocess.run([sys.executable, "-m", "esft.cli", "train", "--population_size", "5", "--mirror_sampling",
                          "--output_dir", str(tmp_path / "x")], capture_output=True, text=True, timeout=300)
    assert odd.returncode == 2 and "even population_size" in odd.stderr


def test_quickstart_writes_report_and_curves(tmp_path, embedded_dir) -> None:
    out = tmp_path / "qs"
    r = subprocess.run(
        [sys.executable, "-m", "esft.cli", "quickstart", "--output_dir", str(out), "--max_steps", "2",
         "--population_size", "2", "--max_train_samples", "2", "--max_new_tokens", "4", "--disable_tqdm",
         "--data_dir", str(SHARED_DATA), "--prior_tasks", "piqa", "--prior_limit", "2", "--kl_num_prompts", "2",
         "--heldout_limit", "3"],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert "| ES |" in report and "| ES + AWD L2" in report
    # Held-out reward: 3 test examples scored greedily at iterations 0 and 2; the base model once.
    held = {d: [row for row in read_jsonl(out / d / "eval" / "forgetting.jsonl")
                if row["task"] == "conciseness" and row["limit"] == 3] for d in ("es", "es_awd")}
    assert sorted(row["iteration"] for row in held["es"]) == [0, 2] and all(row["n"] == 3 for row in held["es"])
    assert [row.get("copied_from") for row in held["es_awd"] if row["iteration"] == 0] == ["es"]
    es_row = next(line for line in report.splitlines() if line.startswith("| ES |"))
    base, final = (next(row for row in held["es"] if row["iteration"] == k) for k in (0, 2))
    assert f"{base['reward']:.2f} → {final['reward']:.2f}" in es_row
    change = sum(b - a for a, b in zip(base["rewards"], final["rewards"])) / 3
    assert f"{change:+.2f} [" in es_row, "the held-out change is final minus base on the same examples"
    assert (out / "curves.png").stat().st_size > 10_000
    if SHARED_DATA.exists():
        assert "## Prior tasks" in report and "KL piqa" in report and "| ES |" in report.split("## Prior tasks")[1]
    else:
        assert "Skipped: no data pack" in report
    assert len(SeedLog(out / "es").records()) == 2 and len(SeedLog(out / "es_awd").records()) == 2
    # Both runs draw the same seeds: only AWD differs.
    assert [x.seeds for x in SeedLog(out / "es").records()] == [x.seeds for x in SeedLog(out / "es_awd").records()]


def test_the_quickstart_table_shows_the_held_out_change_with_its_interval() -> None:
    from esft.quickstart import _report, parse_args
    from esft.report.intervals import paired_bootstrap_mean_difference

    cfg, _ = parse_args(["--max_steps", "1"])
    history = [{"iteration": 1, "reward/mean": -9.0, "drift/norm": 3.0, "drift/relative": 1e-3}]
    base = {"reward": -10.0, "rewards": [-10.0] * 4, "n": 4}
    final = {"reward": -5.0, "rewards": [-4.0, -6.0, -5.0, -5.0], "n": 4}
    report = _report({"ES": history}, {"ES": 7.0}, cfg, {"ES": (base, final)}, 50)
    row = next(line for line in report.splitlines() if line.startswith("| ES |"))
    change = paired_bootstrap_mean_difference(base["rewards"], final["rewards"])
    assert change.value == 5.0 and change.lo > 0, "final minus base, an interval that excludes 0"
    assert "-10.00 → -5.00" in row and f"+5.00 [{change.lo:+.2f}, {change.hi:+.2f}] *" in row, row
    assert "first 4 test examples" in report, "the examples scored, not the limit asked for"
    assert "no held-out" in _report({"ES": history}, {"ES": 7.0}, cfg, "no held-out evaluation: x", 50)
    assert "kept" not in report, "one run: nothing to compare"
    awd_final = {"reward": -6.0, "rewards": [-5.0, -7.0, -6.0, -6.0], "n": 4}
    both = _report({"ES": history, "AWD": history}, {"ES": 7.0, "AWD": 7.0}, cfg,
                   {"ES": (base, final), "AWD": (base, awd_final)}, 50)
    gap = paired_bootstrap_mean_difference(final["rewards"], awd_final["rewards"])
    assert gap.value == -1.0
    assert f"AWD kept 80% of plain ES's held-out gain; its final held-out reward minus ES's on the same examples: " \
           f"-1.00 [{gap.lo:+.2f}, {gap.hi:+.2f}] (the interval excludes 0)" in both
    with pytest.raises(SystemExit):
        parse_args(["--heldout_limit", "0"])


def test_countdown_trains_from_the_shared_data_file(tmp_path, embedded_dir) -> None:
    if not (SHARED_DATA / "countdown" / "countdown.json").exists():
        pytest.skip("shared data pack not present")
    cfg = ESConfig(**{**TINY, "task": "countdown", "max_steps": 1, "save_steps": 0, "population_size": 2},
                   data_dir=str(SHARED_DATA), output_dir=str(tmp_path / "run"))
    trainer = ESTrainer(args=cfg)
    assert len(trainer.train_examples) == 200
    assert trainer.engine.prompt_text(trainer.task.messages(trainer.train_examples[0])).endswith(
        "Let me solve this step by step.\n<think>"
    )
    history = trainer.train()
    assert history[0]["completions/mean_tokens"] <= TINY["max_new_tokens"]


def test_run_view_jumps_to_checkpoints_and_matches_pure_replay(reference_run: Path, monkeypatch) -> None:
    import esft.seedlog as seedlog_mod
    from esft.evaluation.runs import RunView

    calls = []
    real = seedlog_mod.apply_record
    monkeypatch.setattr(seedlog_mod, "apply_record", lambda *a, **k: calls.append(1) or real(*a, **k))
    ((k, model, _),) = list(RunView.open(reference_run).models([3], device="cpu"))
    assert k == 3 and calls == [], "checkpoint-3 exists: no record should be replayed"
    pure, _ = replay(reference_run, 3, device="cpu")
    got = {n: t for n, t in model.state_dict().items() if n in pure.state_dict()}
    assert_bitwise_equal(got, {n: t for n, t in pure.state_dict().items() if n in got}, "checkpoint jump vs replay")
