"""`esft grpo`: TRL's GRPOTrainer on esft tasks, in run directories esft evaluates like ES runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from helpers import TINY

from esft.cli import main
from esft.io import read_jsonl

trl = pytest.importorskip("trl", reason="the GRPO baseline needs TRL (pip install 'esft[grpo]')")

# Tiny but real: 2 steps of 2 prompts × 2 generations of 4 tokens on the embedded model.
TINY_GRPO = [
    "--model", "embedded", "--task", "conciseness", "--max_train_samples", "2", "--max_steps", "2",
    "--per_device_train_batch_size", "2", "--num_generations", "2", "--max_completion_length", "4",
    "--save_steps", "1", "--learning_rate", "1e-4", "--gradient_checkpointing", "false",
    "--num_threads", "2", "--seed", "7", "--disable_tqdm", "true",
]


# ------------------------------------------------------------------ missing TRL
def test_missing_trl_names_the_install_command(monkeypatch, capsys, tmp_path) -> None:
    from esft.grpo import TRL_MISSING, require_trl

    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` now raises ImportError
    with pytest.raises(RuntimeError, match=r"pip install 'esft\[grpo\]'"):
        require_trl()
    assert main(["grpo", "--output_dir", str(tmp_path / "run")]) == 2
    assert TRL_MISSING in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ arguments
def test_defaults_are_the_papers_grpo_settings_and_flags_override_them(tmp_path) -> None:
    from esft.grpo import parse_grpo_args

    run, cfg = parse_grpo_args(["--output_dir", str(tmp_path / "r")])
    assert (cfg.learning_rate, cfg.beta, cfg.num_generations, cfg.temperature) == (1e-6, 5e-3, 8, 0.7)
    assert cfg.max_completion_length == 1024 and cfg.logging_steps == 1 and cfg.save_steps == 50
    assert (run.model, run.task) == ("embedded", "conciseness")
    import torch

    if not torch.cuda.is_available():
        assert cfg.use_cpu and not cfg.bf16, "CPU runs must not autocast to bf16"
    run, cfg = parse_grpo_args(["--task", "countdown", "--beta", "0", "--learning_rate", "3e-6", "--output_dir", "x"])
    assert (run.task, cfg.beta, cfg.learning_rate) == ("countdown", 0.0, 3e-6)


def test_config_file_sets_fields_and_flags_win(tmp_path) -> None:
    from esft.grpo import parse_grpo_args

    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump({"task": "countdown", "beta": 0.01, "num_generations": 4, "output_dir": "o"}))
    run, cfg = parse_grpo_args(["--config", str(path), "--beta", "0.02"])
    assert (run.task, cfg.num_generations, cfg.beta) == ("countdown", 4, 0.02)
    path.write_text(yaml.safe_dump({"betta": 0.01}))
    with pytest.raises(ValueError, match="unknown keys betta"):
        parse_grpo_args(["--config", str(path)])


# ------------------------------------------------------------------ prompts, reward
@pytest.mark.parametrize("task_name", ["conciseness", "countdown"])
def test_prompts_tokenize_to_the_ids_es_generates_from(task_name, embedded_dir, monkeypatch) -> None:
    """TRL tokenizes string prompts itself; it must see exactly ES's ids (prefill included)."""
    monkeypatch.delenv("ESFT_DATA_DIR", raising=False)
    from esft.engine import HFEngine
    from esft.grpo import prompt_text
    from esft.models import load_model
    from esft.tasks import get_task

    model, tok = load_model("embedded")
    task = get_task(task_name)
    conversations = [task.messages(e) for e in task.load("train", limit=3)]
    es_ids = HFEngine(model, tok).encode(conversations)
    trl_ids = [tok(prompt_text(tok, m))["input_ids"] for m in conversations]
    assert trl_ids == es_ids
    if task_name == "countdown":
        assert prompt_text(tok, conversations[0]).endswith("<think>")


def test_reward_is_the_task_reward_through_the_trl_adapter(monkeypatch, embedded_dir) -> None:
    """TRL passes trainer_state, log_metric, completion_ids, ... beside the columns."""
    monkeypatch.delenv("ESFT_DATA_DIR", raising=False)
    from esft.grpo import EXAMPLE_COLUMN, task_dataset, task_reward_func
    from esft.models import load_tokenizer
    from esft.tasks import get_task

    tok = load_tokenizer("embedded")
    for name, completions in [
        ("conciseness", ["Red", "It is red, of course.", [{"role": "assistant", "content": "Blue"}]]),
        ("countdown", ["x</think>\n<answer>1 + 2</answer>", "no answer", ""]),
    ]:
        task = get_task(name)
        examples = task.load("train", limit=3)
        ds = task_dataset(task, examples, tok)
        assert ds.column_names == ["prompt", EXAMPLE_COLUMN]
        func = task_reward_func(task)
        got = func(prompts=ds["prompt"], completions=completions, completion_ids=[[1]] * 3,
                   trainer_state=object(), log_extra=print, log_metric=print, **{EXAMPLE_COLUMN: ds[EXAMPLE_COLUMN]})
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        assert got == [task.reward(c, e) for c, e in zip(texts, examples)], name
        assert func.__name__ == f"{name}_reward"


def test_trl_adapter_scores_a_raising_reward_zero_instead_of_stopping(caplog) -> None:
    from esft.rewards import as_reward_func
    from esft.tasks.base import BaseTask

    class Fragile(BaseTask):
        name = "fragile"

        def reward(self, completion, example):
            if completion == "boom":
                raise ZeroDivisionError("bad")
            return float(example["w"])

    out = as_reward_func(Fragile())(["p", "p"], ["ok", "boom"], w=[2, 3], trainer_state=object())
    assert out == [2.0, 0.0]


# ------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory, embedded_dir) -> Path:
    out = tmp_path_factory.mktemp("grpo") / "run"
    assert main(["grpo", *TINY_GRPO, "--output_dir", str(out)]) == 0
    return out


@pytest.mark.slow
def test_tiny_grpo_run_writes_loadable_checkpoints_config_and_metrics(grpo_run: Path, embedded_dir) -> None:
    from transformers import AutoModelForCausalLM

    from esft.seedlog import checkpoint_steps

    assert checkpoint_steps(grpo_run) == [1, 2]
    assert not list(grpo_run.glob(".staging-*")), "staging directories must be renamed away"
    for d in ("checkpoint-1", "checkpoint-2", "final"):
        model = AutoModelForCausalLM.from_pretrained(grpo_run / d)
        assert model.config.num_hidden_layers == 30, d
    assert json.loads((grpo_run / "final" / "esft_state.json").read_text()) == {"iteration": 2}
    cfg = yaml.safe_load((grpo_run / "config.yaml").read_text())
    assert (cfg["trainer"], cfg["model"], cfg["task"], cfg["beta"]) == ("grpo", "embedded", "conciseness", 0.005)
    rows = read_jsonl(grpo_run / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [1, 2]
    assert all("reward/mean" in r and "rewards/conciseness_reward/mean" in r and "kl" in r for r in rows)
    # A second run into the same directory is refused rather than mixed into it.
    assert main(["grpo", *TINY_GRPO, "--output_dir", str(grpo_run)]) == 2


@pytest.mark.slow
def test_eval_kl_drift_and_report_take_a_grpo_run_beside_an_es_run(grpo_run: Path, tmp_path, capsys) -> None:
    from esft.config import ESConfig
    from esft.trainer import ESTrainer

    es = tmp_path / "es"
    ESTrainer(args=ESConfig(**{**TINY, "max_steps": 2, "save_steps": 0}, output_dir=str(es))).train()
    for run in (es, grpo_run):
        assert main(["eval", "--run", str(run), "--tasks", "conciseness", "--limit", "2", "--max_new_tokens", "4"]) == 0
    rows = read_jsonl(grpo_run / "eval" / "forgetting.jsonl")
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert main(["drift", "--run", str(grpo_run), "--iterations", "0,2"]) == 0
    drift = json.loads((grpo_run / "drift.json").read_text())
    assert drift[0]["global"]["norm"] == 0.0 and drift[1]["global"]["norm"] > 0.0
    assert main(["kl", "--run", str(grpo_run), "--tasks", "conciseness", "--iterations", "2",
                 "--num_prompts", "2", "--max_tokens", "4"]) == 0
    assert json.loads((grpo_run / "kl.json").read_text())[0]["kl_exact_token"] >= 0.0
    out = tmp_path / "report"
    assert main(["report", str(es), str(grpo_run), "--output", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "ES (4)" in md and "GRPO (β=0.005)" in md
    header = (out / "report.csv").read_text().splitlines()[0]
    assert header == "run,Δ conciseness (reward),Δ conciseness (reward) lo95,Δ conciseness (reward) hi95,avg Δ prior,avg Δ prior lo95,avg Δ prior hi95"
    capsys.readouterr()


def test_a_grpo_resume_compares_every_field_but_where_and_how_often_it_logs_and_saves(tmp_path) -> None:
    from esft.grpo import _prepare_run_dir, parse_grpo_args, run_config

    def config(*flags: str) -> dict:
        run, cfg = parse_grpo_args(["--output_dir", str(tmp_path), "--max_steps", "2", *flags])
        return run_config(run, cfg, "conciseness")

    _prepare_run_dir(tmp_path, config(), None, True)
    # Logging, saving, length and output place may change: the run's updates do not.
    _prepare_run_dir(tmp_path, config("--logging_steps", "5", "--save_steps", "3", "--max_steps", "4"), 1, True)
    with pytest.raises(ValueError, match=r"differs from the run's config.yaml in:\n  learning_rate: 1e-06 != 0.001") as err:
        _prepare_run_dir(tmp_path, config("--learning_rate", "1e-3"), 1, True)
    assert "beta" not in str(err.value).split("(only")[0], "only the changed field is listed"
    with pytest.raises(ValueError, match=r"beta: 0.005 != 0.1"):
        _prepare_run_dir(tmp_path, config("--beta", "0.1"), 1, True)
