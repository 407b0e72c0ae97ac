"""Nothing lost, nothing invented: saves never delete a user's files, damaged run files are
detected and rebuilt from the seed log, bad settings fail before anything runs."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import TINY, assert_bitwise_equal, copy_run, tiny_cli_args

from esft.anchor import AnchorFile
from esft.cli import main
from esft.config import ESConfig
from esft.io import check_replaceable, read_jsonl, write_dir_atomic, write_text_atomic
from esft.seedlog import SEEDLOG, load_checkpoint_tensors


def cli(argv: list[str]) -> int:
    """`esft ...` in-process: its exit code whether it returns or exits (argparse errors)."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code or 0)


def flip_bytes(path: Path, tensor: str | None = None, count: int = 4) -> None:
    """Flip `count` bytes in the middle of `tensor`'s data (default: the file's first tensor)."""
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    header.pop("__metadata__", None)
    begin, end = header[tensor or next(iter(header))]["data_offsets"]
    middle = 8 + header_len + (begin + end) // 2
    for i in range(count):
        data[middle + i] ^= 0xFF
    path.write_bytes(bytes(data))


# ------------------------------------------------------------ 1. saves never delete
def test_a_save_replaces_only_a_model_folder_esft_wrote(tmp_path) -> None:
    def fill(d: Path) -> None:
        (d / "esft_state.json").write_text("{}")

    model = tmp_path / "model"
    write_dir_atomic(model, fill)
    write_dir_atomic(model, fill)  # esft's own model folder: replaced
    (tmp_path / "empty").mkdir()
    write_dir_atomic(tmp_path / "empty", fill)  # an empty folder: fine
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="did not write"):
        write_dir_atomic(mine, fill)
    assert (mine / "notes.txt").read_text() == "keep me"
    run = tmp_path / "run"
    run.mkdir()
    (run / "seedlog.jsonl").write_text("")
    (run / "esft_state.json").write_text("{}")
    with pytest.raises(ValueError, match="run directory"):
        check_replaceable(run)


@pytest.mark.slow
def test_replay_over_the_run_itself_or_the_current_folder_is_refused(tmp_path, reference_run) -> None:
    run = copy_run(reference_run, tmp_path / "run")
    before = sorted(p.name for p in run.iterdir())
    for output, message in ((str(run), "run directory"), (".", "did not write")):
        r = subprocess.run([sys.executable, "-m", "esft.cli", "replay", str(run), "--iteration", "1", "--output", output],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    assert sorted(p.name for p in run.iterdir()) == before
    assert len(read_jsonl(run / SEEDLOG)) == 3 and (tmp_path / "run").exists()


@pytest.mark.slow
def test_save_model_into_the_run_directory_is_refused(tmp_path, embedded_dir) -> None:
    from esft.trainer import ESTrainer

    out = tmp_path / "run"
    trainer = ESTrainer(args=ESConfig(**{**TINY, "max_steps": 1, "save_steps": 0}, output_dir=str(out)))
    trainer.train()
    with pytest.raises(ValueError, match="run directory"):
        trainer.save_model(out)  # the transformers idiom trainer.save_model(args.output_dir)
    assert (out / SEEDLOG).exists() and (out / "final").exists()
    trainer.save_model(out / "final")  # esft's own model folder may be rewritten


# --------------------------------------------------- 3. a damaged seed log stops
def test_only_a_torn_last_line_is_dropped(tmp_path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3')
    assert read_jsonl(path, repair=True) == [{"a": 1}, {"a": 2}]
    assert path.read_text() == '{"a": 1}\n{"a": 2}\n'
    path.write_text('{"a": 1}\n{"a": oops\n{"a": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_jsonl(path, repair=True)
    assert path.read_text() == '{"a": 1}\n{"a": oops\n{"a": 3}\n', "nothing may be cut from a damaged log"


@pytest.mark.slow
def test_resume_stops_on_a_damaged_middle_seedlog_line(tmp_path, reference_run) -> None:
    from esft.trainer import ESTrainer

    run = copy_run(reference_run, tmp_path / "run")
    lines = (run / SEEDLOG).read_text().splitlines(keepends=True)
    damaged = lines[0] + lines[1][:20] + "\n" + lines[2]
    (run / SEEDLOG).write_text(damaged)
    with pytest.raises(ValueError, match="line 2"):
        ESTrainer(args=ESConfig(**{**TINY, "max_steps": 4}, output_dir=str(run), resume=True)).train()
    assert (run / SEEDLOG).read_text() == damaged


# ------------------------------------------------- 4. settings checked up front
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("awd_lambda", float("nan"), "awd_lambda must be a finite number"),
        ("learning_rate", float("inf"), "learning_rate must be a finite number"),
        ("sigma", float("inf"), "sigma must be a finite number"),
        ("awd_lambda", float("inf"), "awd_lambda must be a finite number"),
        ("awd", "l3", "awd must be one of"),
        ("population_size", 2.5, "population_size must be an integer"),
        ("reward_timeout", -1.0, "reward_timeout must be >= 0"),
    ],
)
def test_bad_settings_fail_in_python_and_yaml_before_anything_runs(tmp_path, field, value, message, capsys) -> None:
    extra = {"awd": "l1"} if field == "awd_lambda" else {}
    with pytest.raises(ValueError, match=message):
        ESConfig(**{field: value, **extra})
    # The same through a config file; a tiny max_steps bounds the damage if it were accepted.
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({field: value, **extra, "max_steps": 0, "output_dir": str(tmp_path / "out")}))
    assert cli(["train", "--config", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_wrong_types_fail_in_python() -> None:
    with pytest.raises(ValueError, match="mirror_sampling must be true or false"):
        ESConfig(mirror_sampling="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="population_size must be an integer"):
        ESConfig(population_size=True)


@pytest.mark.parametrize("flags", [["--awd", "l1", "--awd_lambda", "nan"], ["--learning_rate", "inf"], ["--sigma", "inf"]])
def test_non_finite_flags_are_refused_by_the_cli(tmp_path, flags, capsys) -> None:
    assert cli(["train", *flags, "--output_dir", str(tmp_path / "out")]) == 2
    assert "finite" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_config_file_errors_name_the_file_and_line(tmp_path, capsys) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("population_size: 8\nsigma: [0.1,\n")
    assert cli(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "line 3" in err and "Traceback" not in err


# ------------------------------------------- 5. damaged checkpoints and θ₀
@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_checkpoint_is_rebuilt_from_the_seed_log(tmp_path, reference_run, damage, caplog) -> None:
    from esft.trainer import ESTrainer

    run = copy_run(reference_run, tmp_path / "run", writable=("checkpoint-3/model.safetensors",))
    shutil.rmtree(run / "final")
    weights = run / "checkpoint-3" / "model.safetensors"
    if damage == "flip":
        # Inside a trained tensor: silently wrong weights without a checksum.
        flip_bytes(weights, "model.layers.0.mlp.down_proj.weight")
    else:
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    ESTrainer(args=ESConfig(**TINY, output_dir=str(run), resume=True)).train()
    assert "checkpoint-3 is damaged" in caplog.text
    assert_bitwise_equal(load_checkpoint_tensors(run / "final"), load_checkpoint_tensors(reference_run / "final"),
                         f"final weights after a {damage}ped checkpoint")


@pytest.mark.slow
def test_a_damaged_theta0_is_rebuilt_from_the_base_model(tmp_path, awd_run, caplog) -> None:
    from esft.trainer import ESTrainer

    run = copy_run(awd_run, tmp_path / "run", writable=("theta0.safetensors",))
    for d in ("final", "checkpoint-2", "checkpoint-3"):
        shutil.rmtree(run / d)
    flip_bytes(run / "theta0.safetensors")  # AWD replays 2 and 3 against θ₀: it must be right
    ESTrainer(args=ESConfig(**TINY, output_dir=str(run), awd="l2", awd_lambda=10.0, resume=True)).train()
    assert "rebuilding θ₀" in caplog.text
    assert_bitwise_equal(load_checkpoint_tensors(run / "final"), load_checkpoint_tensors(awd_run / "final"),
                         "AWD resume with a rebuilt θ₀")


# ------------------------------------ 6. debris and gaps a kill leaves behind
@pytest.mark.slow
def test_resume_cleans_temp_files_and_rewrites_lost_checkpoints_and_metrics(tmp_path, reference_run) -> None:
    from esft.trainer import ESTrainer

    run = copy_run(reference_run, tmp_path / "run")
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoint-2")
    (run / ".checkpoint-2.tmp-abc123").mkdir()
    (run / ".checkpoint-2.tmp-abc123" / "model.safetensors").write_bytes(b"\0" * 1000)
    (run / ".final.tmp-xyz").mkdir()
    (run / ".config.yaml.tmp-q1w2e3").write_text("half")
    metrics = read_jsonl(run / "metrics.jsonl")
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics if m["iteration"] != 2))
    ESTrainer(args=ESConfig(**TINY, output_dir=str(run), resume=True)).train()
    assert not [p.name for p in run.iterdir() if ".tmp-" in p.name]
    assert_bitwise_equal(load_checkpoint_tensors(run / "checkpoint-2"), load_checkpoint_tensors(reference_run / "checkpoint-2"),
                         "rewritten checkpoint-2")
    rebuilt = {m["iteration"]: m for m in read_jsonl(run / "metrics.jsonl")}
    assert sorted(rebuilt) == [1, 2, 3] and rebuilt[2]["metrics/rebuilt"] is True
    original = next(m for m in metrics if m["iteration"] == 2)
    for key in ("reward/mean", "reward/std", "es/skipped"):
        assert rebuilt[2][key] == original[key], key
    assert rebuilt[2]["drift/norm"] == pytest.approx(original["drift/norm"], rel=1e-9)
    assert rebuilt[2]["es/update_norm"] == pytest.approx(original["es/update_norm"], rel=1e-9)


# ------------------------------------------------ 7. a failed start never blocks
@pytest.mark.slow
@pytest.mark.parametrize("resume", [False, True])
def test_a_directory_without_a_logged_iteration_starts_afresh(tmp_path, reference_run, resume) -> None:
    from esft.trainer import ESTrainer

    run = tmp_path / "run"
    run.mkdir()
    # What a start that died before its first iteration leaves: a config (here another one) and θ₀.
    (run / "config.yaml").write_text(yaml.safe_dump(ESConfig(**{**TINY, "sigma": 0.3}).to_dict()))
    shutil.copy(reference_run / "theta0.safetensors", run / "theta0.safetensors")
    ESTrainer(args=ESConfig(**TINY, output_dir=str(run), resume=resume)).train()
    assert (run / SEEDLOG).read_bytes() == (reference_run / SEEDLOG).read_bytes()


# ------------------------------------------------------------- 8. one clear line
def test_a_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys, embedded_dir) -> None:
    import esft.anchor

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(esft.anchor, "save_file", no_space)
    out = tmp_path / "run"
    assert cli(["train", *tiny_cli_args(output_dir=out, max_steps=1)]) == 2
    err = capsys.readouterr().err
    assert "no space left" in err and "theta0.safetensors" in err and "Traceback" not in err
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]


def test_a_missing_local_model_directory_is_named(tmp_path) -> None:
    from esft.models import load_model

    with pytest.raises(ValueError, match="does not exist"):
        load_model(str(tmp_path / "no" / "such" / "model"))
    with pytest.raises(ValueError, match="does not exist"):
        load_model("./my-model")


# --------------------------------------------------------------- 9. permissions
def test_written_files_follow_the_umask(tmp_path) -> None:
    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "config.yaml", "a: 1\n")
        write_dir_atomic(tmp_path / "model", lambda d: (d / "esft_state.json").write_text("{}"))
        AnchorFile.write(tmp_path / "theta0.safetensors", [("w", torch.zeros(3))])
    finally:
        os.umask(old)
    assert (tmp_path / "config.yaml").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "theta0.safetensors").stat().st_mode & 0o777 == 0o644


# ------------------------------------------------------------------ 10. smaller
def test_eval_every_zero_is_refused(tmp_path, capsys) -> None:
    assert cli(["eval", "--run", str(tmp_path), "--tasks", "piqa", "--every", "0"]) == 2
    assert "--every must be >= 1" in capsys.readouterr().err


def test_help_never_repeats_the_default() -> None:
    import re

    r = subprocess.run([sys.executable, "-m", "esft.cli", "train", "--help"], capture_output=True, text=True, timeout=120)
    text = " ".join(r.stdout.split())
    assert "--awd_lambda" in text and "unset: 10 for l2" in text
    assert not re.search(r"\(default:[^)]*\)[^-]*\(default:", text), "a help text says its default twice"


def test_drift_markdown_table_has_one_column_per_header() -> None:
    from esft.evaluation.drift import format_drift_table

    g = {"norm": 1.0, "relative": 0.1, "mean_abs": 0.01, "max_abs": 0.2, "sparsity": {"1e-06": 0.5}}
    table = format_drift_table([{"iteration": 1, "global": g, "per_group": {"mlp": {"norm": 0.5}}}])
    header, rule, row = table.splitlines()
    assert header.count("|") == rule.count("|") == row.count("|")


def test_a_damaged_jsonl_dataset_names_the_file_and_line(tmp_path) -> None:
    from esft.tasks.custom import load_rows

    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"\n{"prompt": "c"}\n')
    with pytest.raises(ValueError, match=r"data\.jsonl: line 2 is not valid JSON"):
        load_rows(str(path))


def test_a_train_dataset_of_strings_is_one_clear_error() -> None:
    from esft.tasks.custom import CustomTask

    with pytest.raises(ValueError, match=r"row 0 is a str .* not a mapping .*'prompt'"):
        CustomTask.from_functions([lambda prompts, completions, **kw: [0.0] * len(completions)], ["a", "b"])
