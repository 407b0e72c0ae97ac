"""`esft eval` (a model, a run over its iterations, during training) and `esft report`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import SHARED_DATA, TINY

from esft.cli import main
from esft.config import ESConfig
from esft.evaluation.accuracy import FORGETTING_FILE, evaluate_run
from esft.io import read_jsonl
from esft.trainer import ESTrainer

pytestmark = pytest.mark.slow

needs_data = pytest.mark.skipif(not (SHARED_DATA / "piqa").exists(), reason="shared data pack not present")


@pytest.fixture(scope="module")
def run_with_eval(tmp_path_factory, embedded_dir) -> Path:
    """A 2-iteration ES run that evaluates conciseness during training."""
    out = tmp_path_factory.mktemp("evalrun") / "run"
    cfg = ESConfig(**{**TINY, "max_steps": 2, "save_steps": 0}, output_dir=str(out), eval_tasks="conciseness",
                   eval_steps=1, eval_limit=2, eval_max_new_tokens=4)
    ESTrainer(args=cfg).train()
    return out


def test_eval_callback_writes_rows_for_iterations_0_to_last(run_with_eval: Path) -> None:
    rows = read_jsonl(run_with_eval / "eval" / FORGETTING_FILE)
    assert [(r["iteration"], r["task"]) for r in rows] == [(0, "conciseness"), (1, "conciseness"), (2, "conciseness")]
    assert all(r["n"] == 2 and 0.0 <= r["accuracy"] <= 1.0 for r in rows)
    assert (run_with_eval / "eval" / "samples" / "iteration-2" / "conciseness.jsonl").exists()


@needs_data
def test_eval_run_replays_iterations_and_resumes_without_redoing_work(run_with_eval: Path, tmp_path) -> None:
    out = tmp_path / "eval"
    kwargs = dict(every=2, limit=3, max_new_tokens=4, output=out, data_dir=str(SHARED_DATA), device="cpu", progress=False)
    rows = evaluate_run(run_with_eval, ["piqa", "conciseness"], **kwargs)
    assert sorted((r["iteration"], r["task"]) for r in rows) == [
        (0, "conciseness"), (0, "piqa"), (2, "conciseness"), (2, "piqa")]
    piqa0 = next(r for r in rows if r["task"] == "piqa" and r["iteration"] == 0)
    assert piqa0["strict_format_rate"] is not None and piqa0["n"] == 3
    # Interrupted or repeated: nothing already written is evaluated again.
    before = (out / FORGETTING_FILE).read_text()
    evaluate_run(run_with_eval, ["piqa", "conciseness"], **kwargs)
    assert (out / FORGETTING_FILE).read_text() == before
    samples = read_jsonl(out / "samples" / "iteration-2" / "piqa.jsonl")
    assert set(samples[0]) >= {"prompt", "completion", "extracted", "gold", "correct"}


@needs_data
def test_eval_model_cli_writes_results_and_samples(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    code = main(["eval", "--model", "embedded", "--tasks", "hellaswag,arc_challenge", "--limit", "2",
                 "--max_new_tokens", "4", "--output", str(out), "--data_dir", str(SHARED_DATA)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["tasks"]) == {"hellaswag", "arc_challenge"}
    assert results["tasks"]["hellaswag"]["n"] == 2 and results["tasks"]["hellaswag"]["strict_format_rate"] is not None
    assert len(read_jsonl(out / "samples" / "arc_challenge.jsonl")) == 2
    assert "| hellaswag |" in capsys.readouterr().out


def test_eval_errors_name_the_fix(tmp_path, run_with_eval: Path, capsys) -> None:
    assert main(["eval", "--run", str(tmp_path), "--tasks", "conciseness"]) == 2
    assert "seedlog" in capsys.readouterr().err
    assert main(["eval", "--run", str(run_with_eval), "--tasks", "conciseness", "--iterations", "5"]) == 2
    assert "not in" in capsys.readouterr().err
    assert main(["eval", "--run", str(run_with_eval), "--tasks", "no_such_task"]) == 2
    assert "no_such_task" in capsys.readouterr().err


def make_checkpoint_run(root: Path, embedded_dir: Path) -> Path:
    """A GRPO-style run: config.yaml naming the base, and HF checkpoint directories."""
    run = root / "grpo"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": "embedded", "trainer": "grpo", "task": "conciseness", "beta": 0.005}))
    shutil.copytree(embedded_dir, run / "checkpoint-1")
    return run


def test_checkpoint_runs_are_evaluated_like_es_runs_and_reported_side_by_side(tmp_path, run_with_eval, embedded_dir) -> None:
    grpo = make_checkpoint_run(tmp_path, embedded_dir)
    rows = evaluate_run(grpo, ["conciseness"], limit=2, max_new_tokens=4, device="cpu", progress=False)
    assert [r["iteration"] for r in rows] == [0, 1]
    assert rows[0]["accuracy"] == rows[1]["accuracy"], "checkpoint-1 holds the base weights here"
    out = tmp_path / "report"
    assert main(["report", str(run_with_eval), str(grpo), "--output", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "ES (4)" in md and "GRPO (β=0.005)" in md
    assert (out / "report.csv").read_text().startswith(
        "run,Δ conciseness (reward),Δ conciseness (reward) lo95,Δ conciseness (reward) hi95,avg Δ prior,avg Δ prior lo95,avg Δ prior hi95\n")
    assert (out / "forgetting_curves.png").stat().st_size > 5_000
    assert (out / "drift.png").exists()


def test_a_checkpoint_from_another_base_model_is_refused(tmp_path, embedded_dir) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    run = tmp_path / "other"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": "embedded", "trainer": "grpo"}))
    tiny = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, vocab_size=49152))
    tiny.save_pretrained(run / "checkpoint-3")
    shutil.copy(embedded_dir / "tokenizer.json", run / "checkpoint-3")
    shutil.copy(embedded_dir / "tokenizer_config.json", run / "checkpoint-3")
    with pytest.raises(ValueError, match="does not come from base model"):
        evaluate_run(run, ["conciseness"], iterations=[3], limit=1, max_new_tokens=2, device="cpu", progress=False)


def test_lambda_sweep_report_plots_accuracy_against_lambda(tmp_path) -> None:
    from esft.report.runs import build_report

    runs = []
    for lam, target, prior in ((1.0, 0.30, 0.50), (10.0, 0.28, 0.55)):
        d = tmp_path / f"lam{lam:g}"
        (d / "eval").mkdir(parents=True)
        cfg = ESConfig(awd="l2", awd_lambda=lam, task="countdown", output_dir=str(d)).to_dict()
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
        rows = [{"iteration": 0, "task": "countdown", "accuracy": 0.1}, {"iteration": 5, "task": "countdown", "accuracy": target},
                {"iteration": 0, "task": "piqa", "accuracy": 0.6}, {"iteration": 5, "task": "piqa", "accuracy": prior}]
        (d / "eval" / FORGETTING_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs.append(d)
    md = build_report(runs, tmp_path / "rep").read_text()
    assert "| ES (30) + AWD L2 λ=1 | +20.0 | -10.0 | -10.0 |" in md
    assert "| ES (30) + AWD L2 λ=10 | +18.0 | -5.0 | -5.0 |" in md
    assert (tmp_path / "rep" / "lambda.png").exists()


def test_a_grpo_stage_measures_kl_and_drift_against_the_sequences_base(tmp_path, embedded_dir) -> None:
    """Stage 2 of a GRPO sequence loads stage 1's final/: its KL and drift are to the first
    stage's model, so stage 2 at iteration 0 equals stage 1 at its end (not 0)."""
    import os

    import torch

    from esft.evaluation.drift import drift_report
    from esft.evaluation.kl import kl_report
    from esft.evaluation.runs import RunView
    from esft.models import load_model

    model, tokenizer = load_model(str(embedded_dir), "float32", "cpu")
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in model.model.layers[0].parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    stage1, stage2 = tmp_path / "s1", tmp_path / "s2"
    stage1.mkdir()
    stage2.mkdir()
    model.save_pretrained(stage1 / "checkpoint-1")
    tokenizer.save_pretrained(stage1 / "checkpoint-1")
    os.symlink(stage1 / "checkpoint-1", stage1 / "final")
    os.symlink(stage1 / "checkpoint-1", stage2 / "checkpoint-1")
    grpo = {"trainer": "grpo", "task": "conciseness", "beta": 0.005, "torch_dtype": "float32"}
    (stage1 / "config.yaml").write_text(yaml.safe_dump({**grpo, "model": "embedded"}))
    (stage2 / "config.yaml").write_text(yaml.safe_dump({**grpo, "model": str(stage1 / "final")}))

    assert RunView.open(stage2).origin_model == "embedded"
    assert RunView.open(stage2).base_model == str(stage1 / "final"), "iteration 0 is still the stage's start"
    kl1 = kl_report(stage1, ["conciseness"], iterations=[1], num_prompts=2, max_tokens=4)
    kl2 = kl_report(stage2, ["conciseness"], iterations=[0, 1], num_prompts=2, max_tokens=4)
    assert kl1[0]["kl_exact_token"] > 0
    assert [r["kl_exact_token"] for r in kl2] == pytest.approx([kl1[0]["kl_exact_token"]] * 2, rel=1e-6)
    d1, d2 = drift_report(stage1, iterations=[1]), drift_report(stage2, iterations=[0])
    assert d2[0]["global"]["norm"] == pytest.approx(d1[0]["global"]["norm"], rel=1e-6) and d2[0]["global"]["norm"] > 0
    assert {r["reference"] for r in kl2 + d2} == {"embedded"}, "each row names what it was measured against"


def test_a_grpo_stage_finds_its_sequences_base_from_the_configs_alone(tmp_path, monkeypatch) -> None:
    """Three stages with `model:` relative to where the sweep ran, stage 1's checkpoints gone;
    a GRPO run on an ES run's final/ keeps that as its base; a loop is an error."""
    from esft.evaluation.runs import RunView

    def stage(name: str, **config: Any) -> Path:
        run = tmp_path / "runs" / name
        (run / "checkpoint-1").mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump({"trainer": "grpo", **config}))
        return run

    s1 = stage("g.s1", model="embedded")
    shutil.rmtree(s1 / "checkpoint-1")
    stage("g.s2", model="runs/g.s1/final")
    s3 = stage("g.s3", model="runs/g.s2/final")
    monkeypatch.chdir(tmp_path)
    assert RunView.open(s3).origin_model == "embedded"
    monkeypatch.chdir(s1)  # elsewhere: the relative paths resolve through the stages' siblings
    assert RunView.open(s3).origin_model == "embedded"

    es = tmp_path / "runs" / "es"
    es.mkdir()
    (es / "config.yaml").write_text(yaml.safe_dump({"model": "embedded", "seed": 0}))
    on_es = stage("on-es", model=str(es / "final"))
    assert RunView.open(on_es).origin_model == str(es / "final")

    stage("loop.a", model=str(tmp_path / "runs" / "loop.b" / "final"))
    loop_b = stage("loop.b", model=str(tmp_path / "runs" / "loop.a" / "final"))
    with pytest.raises(ValueError, match="loops back"):
        _ = RunView.open(loop_b).origin_model
