"""`esft sweep`: spec validation, grid names, the GRPO arm's configs, and a tiny sweep killed and rerun."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import SHARED_DATA, TINY

from esft.cli import main
from esft.io import read_jsonl
from esft.sweep import chosen_iterations, derived_name, load_spec, parse_spec, run_sweep

BASE: dict[str, Any] = {**TINY, "max_steps": 2, "save_steps": 0}
HAS_DATA = (SHARED_DATA / "piqa").exists()


def names(spec: dict[str, Any]) -> list[str]:
    return [r.name for r in parse_spec(spec).runs]


# ------------------------------------------------------------------ grids and names
def test_grid_multiplies_its_lists_over_base_with_readable_names() -> None:
    spec = parse_spec({"base": BASE, "grid": {"awd": ["l2"], "awd_lambda": [1, 3, "1e-1"], "seed": [7, 8]}})
    assert [r.name for r in spec.runs] == [
        "l2-lambda1-seed7", "l2-lambda1-seed8", "l2-lambda3-seed7", "l2-lambda3-seed8",
        "l2-lambda0.1-seed7", "l2-lambda0.1-seed8",
    ]
    first = spec.runs[0].config
    # Base fields reach every run; PyYAML's string '1e-1' is read as the number it is.
    assert (first.population_size, first.max_new_tokens, first.awd, first.awd_lambda) == (4, 6, "l2", 1.0)
    assert spec.runs[4].config.awd_lambda == 0.1
    # What --dry_run shows: the fields that differ from base (seed 7 is base's).
    assert spec.runs[4].changes == {"awd": "l2", "awd_lambda": 0.1}
    assert spec.runs[5].changes == {"awd": "l2", "awd_lambda": 0.1, "seed": 8}
    # Stable: the same spec names its runs the same way every time.
    assert names({"base": BASE, "grid": {"awd": ["l2"], "awd_lambda": [3]}}) == ["l2-lambda3"]


def test_derived_names_are_filesystem_safe_and_say_what_differs() -> None:
    assert derived_name({"awd_lambda": 10.0}) == "lambda10"
    assert derived_name({"noise_mode": "shared", "mirror_sampling": True}) == "noise_mode-shared-mirror_sampling-true"
    assert derived_name({"population_size": 8, "learning_rate": 1e-5, "noise_rank": None}) == "pop8-lr1e-05-rank-none"
    assert derived_name({"trainable": r"model\.layers\.0\."}) == "trainable-model_.layers_.0_."


def test_a_list_of_grids_expands_each_grid_over_base_after_the_variants() -> None:
    spec = {
        "base": BASE,
        "variants": [{"name": "es"}, {"name": "awd-l2", "awd": "l2", "awd_lambda": 3}],
        "grid": [{"awd": ["l2"], "awd_lambda": [1, 10]}, {"awd": ["l1"], "awd_lambda": [0.001, 0.01]}],
    }
    runs = parse_spec(spec).runs
    assert [r.name for r in runs] == ["es", "awd-l2", "l2-lambda1", "l2-lambda10", "l1-lambda0.001", "l1-lambda0.01"]
    assert [(r.config.awd, r.config.awd_lambda) for r in runs] == [
        ("none", None), ("l2", 3.0), ("l2", 1.0), ("l2", 10.0), ("l1", 0.001), ("l1", 0.01),
    ]
    assert [r.where for r in runs[2:4]] == ["grid[0] ('l2-lambda1')", "grid[0] ('l2-lambda10')"]


def test_evaluation_iterations_are_0_every_k_and_the_last() -> None:
    assert chosen_iterations(range(41), 10) == [0, 10, 20, 30, 40]
    assert chosen_iterations(range(41), 15) == [0, 15, 30, 40]
    assert chosen_iterations(range(41), None) == [0, 40]
    assert chosen_iterations([0, 50, 100, 150], 100) == [0, 100, 150]  # GRPO: the checkpoints there are


def test_eval_defaults_to_the_training_task_with_drift_every_as_every() -> None:
    ev = parse_spec({"base": BASE, "variants": [{"name": "es"}], "eval": {"every": 5}}).eval
    assert (ev.tasks, ev.every, ev.drift_every, ev.limit, ev.kl_tasks) == (("conciseness",), 5, 5, None, ())


def test_existing_run_dirs_are_checked_against_the_spec_before_anything_runs(tmp_path: Path) -> None:
    from esft.config import ESConfig
    from esft.sweep import _check_existing_runs

    out = tmp_path / "sweep"
    (out / "es").mkdir(parents=True)
    (out / "es" / "config.yaml").write_text(yaml.safe_dump(ESConfig(**BASE).to_dict()))
    (out / "es" / "seedlog.jsonl").write_text("")
    edited = {"base": BASE, "variants": [{"name": "es", "sigma": 0.01}]}
    _check_existing_runs(parse_spec(edited), out)  # no iteration logged: restarted afresh, nothing to protect
    (out / "es" / "seedlog.jsonl").write_text('{"iteration": 1}\n')
    with pytest.raises(ValueError, match=r"es \(variants\[0\] \('es'\)\): sigma: 0.01 != 0.05"):
        _check_existing_runs(parse_spec(edited), out)
    same = {"base": {**BASE, "task": "Conciseness"}, "variants": [{"name": "es"}]}
    _check_existing_runs(parse_spec(same), out)  # the task as the trainer saves it: the same run


def test_eval_limits_override_the_limit_per_task_and_group_the_calls() -> None:
    spec = {"base": BASE, "variants": [{"name": "es"}],
            "eval": {"tasks": ["conciseness", "gsm8k", "countdown"], "limit": 50, "limits": {"GSM8K": None}}}
    ev = parse_spec(spec).eval
    assert [ev.limit_for(t) for t in ev.tasks] == [50, None, 50]
    assert ev.task_groups() == [(50, ["conciseness", "countdown"]), (None, ["gsm8k"])]


# ------------------------------------------------------------------ bad specs
ES = {"name": "es"}
BAD_SPECS = {
    "unknown top-level key": ({"base": BASE, "variant": [ES]}, ["sweep spec:", "variant", "did you mean variants"]),
    "unknown field in a variant": (
        {"base": BASE, "variants": [ES, {"name": "awd-l2", "popsize": 3}]},
        ["variants[1] ('awd-l2')", "popsize", "population_size"],
    ),
    "unknown field in base": ({"base": {**BASE, "sigmaa": 1}, "variants": [ES]}, ["sweep spec base", "sigmaa"]),
    "unknown field in a grid": ({"base": BASE, "grid": {"awd_lamda": [1]}}, ["sweep spec grid", "awd_lamda"]),
    "wrong type": (
        {"base": BASE, "variants": [ES, {"name": "awd-l2", "population_size": "eight"}]},
        ["variants[1] ('awd-l2'): population_size: expected an integer, got 'eight'"],
    ),
    "out of range": (
        {"base": BASE, "variants": [ES, {"name": "awd-l2", "population_size": 1}]},
        ["variants[1] ('awd-l2'): population_size must be >= 2"],
    ),
    "out of range in base": ({"base": {**BASE, "sigma": -1}, "variants": [ES]}, ["variants[0] ('es')", "sigma", "set in base"]),
    "not a choice": ({"base": BASE, "variants": [{"name": "x", "awd": "L2"}]}, ["variants[0] ('x'): awd: expected one of"]),
    "grid key with an empty list": ({"base": BASE, "grid": {"awd_lambda": []}}, ["grid: awd_lambda: empty list"]),
    "empty grid mapping": ({"base": BASE, "variants": [ES], "grid": {}}, ["grid: empty"]),
    "empty grid in a list": ({"base": BASE, "grid": [{"awd": ["l2"]}, {}]}, ["grid[1]: empty"]),
    "grid value not a list": ({"base": BASE, "grid": {"awd_lambda": 3}}, ["grid: awd_lambda: expected a list"]),
    "two variants with one name": ({"base": BASE, "variants": [ES, ES]}, ["variants[1] ('es'): name 'es': already used by variants[0]"]),
    "a variant named like a grid run": (
        {"base": BASE, "variants": [{"name": "l2-lambda3"}], "grid": {"awd": ["l2"], "awd_lambda": [3]}},
        ["grid ('l2-lambda3'): name 'l2-lambda3': already used by variants[0]"],
    ),
    "a variant without a name": ({"base": BASE, "variants": [{"awd": "l2"}]}, ["variants[0]: name"]),
    "an unsafe name": ({"base": BASE, "variants": [{"name": "a/b"}]}, ["variants[0] ('a/b'): name 'a/b'"]),
    "the report's name": ({"base": BASE, "variants": [{"name": "report"}]}, ["name 'report'"]),
    "grid lambda without awd": ({"base": BASE, "grid": {"awd_lambda": [1, 3]}}, ["grid ('lambda1'): awd_lambda", "awd is none"]),
    "output_dir in base": ({"base": {**BASE, "output_dir": "x"}, "variants": [ES]}, ["base: output_dir: the sweep decides it"]),
    "output_dir in a variant": ({"base": BASE, "variants": [{"name": "x", "output_dir": "y"}]}, ["variants[0] ('x'): output_dir"]),
    "unknown eval key": ({"base": BASE, "variants": [ES], "eval": {"taks": ["piqa"]}}, ["eval: unknown eval keys: taks"]),
    "unknown eval task": ({"base": BASE, "variants": [ES], "eval": {"tasks": ["conciseness", "piqaa"]}}, ["eval: tasks: unknown task 'piqaa'"]),
    "unknown KL task": ({"base": BASE, "variants": [ES], "eval": {"kl_tasks": ["hellaswg"]}}, ["eval: kl_tasks: unknown task 'hellaswg'"]),
    "eval every 0": ({"base": BASE, "variants": [ES], "eval": {"every": 0}}, ["eval: every: expected an integer >= 1"]),
    "a limit for a task not evaluated": (
        {"base": BASE, "variants": [ES], "eval": {"limits": {"piqa": 5}}}, ["eval: limits: 'piqa' is not one of eval.tasks"],
    ),
    "a per-task limit of 0": (
        {"base": BASE, "variants": [ES], "eval": {"limits": {"conciseness": 0}}},
        ["eval: limits.conciseness: expected an integer >= 1 or null"],
    ),
    "unknown training task": ({"base": {**BASE, "task": "cuntdown"}, "variants": [ES]}, ["base: task: unknown task 'cuntdown'"]),
    "no runs": ({"base": BASE}, ["no runs"]),
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_bad_spec_is_refused_naming_the_key_before_anything_is_created(case: str, tmp_path: Path) -> None:
    spec, expected = BAD_SPECS[case]
    out = tmp_path / "sweep"
    with pytest.raises(ValueError) as err:
        run_sweep(spec, out)
    for text in expected:
        assert text in str(err.value), f"{case}: {text!r} not in the error: {err.value}"
    assert not out.exists(), f"{case}: a refused spec created {out}"


def test_cli_error_is_one_line_with_exit_code_2_and_a_yaml_error_names_the_line(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": BASE, "variants": [ES, {"name": "awd-l2", "population_size": 1}]}))
    out = tmp_path / "sweep"
    assert main(["sweep", str(bad), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("esft sweep: error: sweep spec variants[1] ('awd-l2'): population_size must be >= 2"), err
    broken = tmp_path / "broken.yaml"
    broken.write_text("base: {model: embedded}\nvariants:\n  - {name: es\n")
    assert main(["sweep", str(broken), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(broken) in err and "line 4" in err, err
    assert not out.exists()


def test_dry_run_lists_each_run_with_what_differs_from_base_and_runs_nothing(tmp_path: Path, capsys) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({
        "base": BASE, "variants": [ES, {"name": "awd-l2", "awd": "l2", "awd_lambda": 3}],
        "grid": {"awd": ["l2"], "awd_lambda": [1, 10]},
    }))
    out = tmp_path / "sweep"
    assert main(["sweep", str(path), "--output_dir", str(out), "--dry_run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"sweep: 4 runs in {out}, report in {out / 'report'} (dry run: nothing runs)"
    assert re.match(r"\s+es\s+\(base\)$", lines[1]) and re.match(r"\s+awd-l2\s+awd=l2 awd_lambda=3$", lines[2]), lines
    assert re.match(r"\s+l2-lambda10\s+awd=l2 awd_lambda=10$", lines[4]), lines
    assert not out.exists()


def test_only_picks_runs_by_name_pattern_and_a_stage_brings_the_stages_before_it() -> None:
    from esft.sweep_spec import select

    spec = parse_spec({"base": BASE, "grid": [{"awd": ["l2"], "awd_lambda": [1, 10]}, {"seed": [1, 2]}]})
    assert [r.name for r in select(spec, ["l2-*"]).runs] == ["l2-lambda1", "l2-lambda10"]
    assert [r.name for r in select(spec, ["seed2", "l2-lambda1"]).runs] == ["l2-lambda1", "seed2"], "spec order kept"
    seq = parse_spec({"base": BASE, "stages": [{"task": "conciseness"}, {"task": "countdown"}, {"task": "conciseness"}],
                      "variants": [{"name": "es"}, {"name": "awd", "awd": "l2", "awd_lambda": 10}]})
    assert [r.name for r in select(seq, ["awd.s3-*"]).runs] == [
        "awd.s1-conciseness", "awd.s2-countdown", "awd.s3-conciseness"], "stage 3 needs stages 1 and 2"
    assert [r.arm for r in select(seq, ["es"]).runs] == ["es"] * 3, "an arm's name picks its stages"
    with pytest.raises(ValueError, match=r"--only 'l3-\*': matches no run of the spec \(its runs: l2-lambda1, "):
        select(spec, ["l2-lambda1", "l3-*"])


def test_only_on_the_command_line_lists_the_chosen_runs_and_refuses_an_empty_pattern(tmp_path: Path, capsys) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"base": BASE, "grid": {"seed": [0, 1, 2]}}))
    out = tmp_path / "sweep"
    assert main(["sweep", str(path), "--output_dir", str(out), "--only", "seed1,seed2", "--dry_run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("sweep: 2 runs in") and [ln.split()[0] for ln in lines[1:3]] == ["seed1", "seed2"]
    with pytest.raises(SystemExit) as e:  # argparse: one line, exit code 2
        main(["sweep", str(path), "--output_dir", str(out), "--only", " , "])
    assert e.value.code == 2 and not out.exists()


# ------------------------------------------------------------------ GRPO arm
def test_grpo_arm_inherits_base_model_and_data_unless_it_sets_them(tmp_path: Path) -> None:
    pytest.importorskip("trl", reason="the GRPO arm needs TRL")
    from esft.sweep import grpo_run_args

    base = {**BASE, "task": "countdown", "data_dir": "/data", "max_train_samples": 5, "max_steps": 40}
    spec = parse_spec({"base": base, "grpo": {"max_steps": 3, "seed": 11, "learning_rate": "1e-5"}, "eval": {"every": 2}})
    run, cfg = grpo_run_args(spec, tmp_path / "sweep")
    assert (run.model, run.task, run.data_dir, run.max_train_samples, run.num_threads) == ("embedded", "countdown", "/data", 5, 2)
    assert cfg.output_dir == str(tmp_path / "sweep" / "grpo")
    assert cfg.seed == 11, "the arm's own seed wins over base's"
    assert cfg.max_steps == 3, "an ES iteration is not a GRPO step: max_steps is never inherited"
    assert cfg.learning_rate == 1e-5 and cfg.beta == 5e-3, "esft grpo's defaults, with PyYAML's '1e-5' read as a number"
    assert cfg.save_only_model is False, "a killed GRPO run resumes only from a checkpoint with optimizer state"
    assert cfg.save_steps == 2, "a checkpoint at every evaluated step"
    assert cfg.disable_tqdm
    _, cfg = grpo_run_args(spec, tmp_path / "sweep", resume_from=str(tmp_path / "sweep" / "grpo" / "checkpoint-2"))
    assert cfg.resume_from_checkpoint.endswith("checkpoint-2")
    own = parse_spec({"base": base, "grpo": {"seed": 1, "model": "other/model", "save_only_model": True, "save_steps": 5}})
    run, cfg = grpo_run_args(own, tmp_path)
    assert (run.model, cfg.seed, cfg.save_only_model, cfg.save_steps) == ("other/model", 1, True, 5)
    assert own.runs[-1].name == "grpo" and own.runs[-1].is_grpo


@pytest.mark.parametrize("arm, expected", [
    ({"betaa": 0.1}, "sweep spec grpo: unknown GRPO fields: betaa"),
    ({"output_dir": "x"}, "sweep spec grpo: output_dir: the sweep decides it"),
    ({"learning_rate": "fast"}, "sweep spec grpo: learning_rate: expected a number"),
    ({"per_device_train_batch_size": 3, "num_generations": 2}, "sweep spec grpo: "),
])
def test_bad_grpo_arm_is_refused_naming_the_key(arm: dict[str, Any], expected: str, tmp_path: Path) -> None:
    pytest.importorskip("trl", reason="the GRPO arm needs TRL")
    with pytest.raises(ValueError, match=re.escape(expected)):
        run_sweep({"base": BASE, "grpo": arm}, tmp_path / "sweep")
    assert not (tmp_path / "sweep").exists()


def test_interrupted_grpo_arm_that_cannot_resume_says_what_to_do(tmp_path: Path) -> None:
    pytest.importorskip("trl", reason="the GRPO arm needs TRL")
    out, spec = tmp_path / "sweep", {"base": BASE, "grpo": {"max_steps": 4, "save_only_model": True}}
    run = out / "grpo"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("trainer: grpo\nmodel: embedded\ntask: conciseness\n")
    with pytest.raises(ValueError, match=r"stopped before its first checkpoint.*delete .*grpo"):
        run_sweep(spec, out, progress=False)
    (run / "checkpoint-2").mkdir()
    (run / "checkpoint-2" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"checkpoint-2 holds no optimizer state \(save_only_model: true\)"):
        run_sweep(spec, out, progress=False)


# ------------------------------------------------------------------ end to end
def tiny_spec() -> dict[str, Any]:
    """2 runs × 2 iterations; accuracy on 2 examples, KL on 2 prompts × 4 tokens."""
    tasks = ["conciseness", "piqa"] if HAS_DATA else ["conciseness"]
    base = {**BASE, "data_dir": str(SHARED_DATA)} if HAS_DATA else BASE
    return {
        "base": base,
        "variants": [{"name": "es"}],
        "grid": {"awd": ["l2"], "awd_lambda": [10]},
        "eval": {"tasks": tasks, "every": 1, "limit": 2, "limits": {"conciseness": 3}, "max_new_tokens": 6,
                 "batch_size": 4, "kl_tasks": tasks[-1:], "kl_num_prompts": 2, "kl_max_tokens": 4,
                 **({"harness": "lm-eval"} if HAS_DATA else {})},
    }


@pytest.fixture(scope="module")
def killed_sweep(tmp_path_factory, embedded_dir) -> dict[str, Any]:
    """The tiny sweep from the command line, SIGKILLed once the second run has logged an iteration, then rerun."""
    root = tmp_path_factory.mktemp("sweep")
    spec_path, out = root / "spec.yaml", root / "out"
    spec_path.write_text(yaml.safe_dump(tiny_spec(), sort_keys=False))
    cmd = [sys.executable, "-m", "esft.cli", "sweep", str(spec_path), "--output_dir", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = out / "l2-lambda10" / "seedlog.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not read_jsonl(second):
        time.sleep(0.02)
    assert proc.poll() is None, f"the sweep ended before it could be killed: {proc.communicate()[1][-3000:]}"
    proc.send_signal(signal.SIGKILL)
    first_out, _ = proc.communicate()
    first_log = out / "es" / "seedlog.jsonl"
    before = {"mtime": first_log.stat().st_mtime_ns, "bytes": first_log.read_bytes(),
              "second_final": (out / "l2-lambda10" / "final").exists(), "first_out": first_out}
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    return {"out": out, "spec_path": spec_path, "before": before, "rerun": rerun}


@pytest.mark.slow
def test_killed_sweep_rerun_finishes_without_retraining_the_finished_run(killed_sweep: dict[str, Any]) -> None:
    out, before, rerun = killed_sweep["out"], killed_sweep["before"], killed_sweep["rerun"]
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert not before["second_final"], "the kill should have interrupted the second run"
    first_log = out / "es" / "seedlog.jsonl"
    assert first_log.stat().st_mtime_ns == before["mtime"], "the finished run's seed log was rewritten"
    assert first_log.read_bytes() == before["bytes"], "the finished run's seed log changed"
    assert "es: already trained (2 iterations), skipped" in rerun.stdout, rerun.stdout
    assert "l2-lambda10: trained to 2 iterations (resumed at 1)" in rerun.stdout, rerun.stdout
    assert [r["iteration"] for r in read_jsonl(out / "l2-lambda10" / "seedlog.jsonl")] == [1, 2]


@pytest.mark.slow
def test_tiny_sweep_writes_every_run_its_evaluation_and_the_report_with_figures(killed_sweep: dict[str, Any]) -> None:
    import json

    out, spec = killed_sweep["out"], tiny_spec()
    tasks, kl_tasks = spec["eval"]["tasks"], spec["eval"]["kl_tasks"]
    assert yaml.safe_load((out / "sweep.yaml").read_text()) == spec
    for name in ("es", "l2-lambda10"):
        run = out / name
        assert (run / "final").is_dir() and (run / "config.yaml").exists(), name
        rows = read_jsonl(run / "eval" / "forgetting.jsonl")
        assert sorted((r["iteration"], r["task"]) for r in rows) == sorted((k, t) for k in (0, 1, 2) for t in tasks), name
        assert {(r["task"], r["n"]) for r in rows} == {(t, 3 if t == "conciseness" else 2) for t in tasks}, \
            "eval.limits overrides eval.limit for its task only"
        kl = json.loads((run / "kl.json").read_text())
        assert sorted((r["iteration"], r["task"]) for r in kl) == sorted((k, t) for k in (0, 1, 2) for t in kl_tasks), name
        assert [r["iteration"] for r in json.loads((run / "drift.json").read_text())] == [0, 1, 2], name
        if HAS_DATA:  # harness: lm-eval scores the prior task with lm-evaluation-harness too
            harness_rows = read_jsonl(run / "eval" / "harness.jsonl")
            assert sorted((r["iteration"], r["task"], r["n"]) for r in harness_rows) == [(k, "piqa", 2) for k in (0, 1, 2)]
        log = (run / "sweep.log").read_text()
        # Training's metric lines go to the run's log, not to the console. (The killed run may
        # die before its iteration-1 line is written, and the rerun starts at 2: any line will do.)
        assert "=== " in log and re.search(r"iter\s+2 ", log), f"{name}/sweep.log lacks the training lines"
    assert not re.search(r"iter\s+\d+ ", killed_sweep["rerun"].stdout + killed_sweep["rerun"].stderr)
    report = out / "report" / "report.md"
    assert f"report: {report}" in killed_sweep["rerun"].stdout
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", report.read_text())
    assert {"forgetting_curves.png", "drift.png", "kl_heatmap.png"} <= set(figures), figures
    for fig in figures:
        assert (out / "report" / fig).stat().st_size > 0, f"{fig} is in report.md but not written"


@pytest.mark.slow
def test_a_variant_edited_after_its_run_is_refused_before_anything_runs(killed_sweep: dict[str, Any]) -> None:
    out = killed_sweep["out"]
    spec = tiny_spec()
    spec["variants"] = [{"name": "es", "sigma": 0.01}]  # es was trained with base's sigma (0.05)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"es \(variants\[0\] \('es'\)\): sigma: 0.01 != 0.05"):
        run_sweep(spec, out, progress=False)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps, "nothing touched"


@pytest.mark.slow
def test_rerunning_a_finished_sweep_redoes_nothing(killed_sweep: dict[str, Any], capsys) -> None:
    out = killed_sweep["out"]
    run_files = [p for p in out.glob("*/**/*")
                 if p.is_file() and p.name != "sweep.log" and p.relative_to(out).parts[0] != "report"]
    stamps = {p: p.stat().st_mtime_ns for p in run_files}
    report = run_sweep(load_spec(killed_sweep["spec_path"]), out, progress=False)
    assert report == out / "report" / "report.md"
    changed = [str(p) for p in run_files if p.stat().st_mtime_ns != stamps[p]]
    assert not changed, f"a rerun of a finished sweep rewrote {changed}"
    text = capsys.readouterr().out
    for line in ("es: already trained", "l2-lambda10: eval already done", "es: KL already in kl.json",
                 "l2-lambda10: drift already in drift.json"):
        assert line in text, text


@pytest.mark.slow
def test_only_touches_the_chosen_runs_and_reports_every_run_measured(killed_sweep: dict[str, Any], capsys) -> None:
    out = killed_sweep["out"]
    spec = tiny_spec()
    spec["variants"] += [{"name": "never-run", "seed": 5}, {"name": "half-run", "seed": 6}]
    half = out / "half-run"  # killed before its first iteration, yet its evaluation file exists
    (half / "eval").mkdir(parents=True)
    (half / "config.yaml").write_text((out / "es" / "config.yaml").read_text())
    (half / "eval" / "forgetting.jsonl").write_text((out / "es" / "eval" / "forgetting.jsonl").read_text())
    stamps = {p: p.stat().st_mtime_ns for p in (out / "l2-lambda10").rglob("*") if p.is_file()}
    try:
        report = run_sweep(spec, out, progress=False, only=["es"])
    finally:
        shutil.rmtree(half)
    text = capsys.readouterr().out
    assert "es: already trained" in text and "l2-lambda10" not in text and "never-run" not in text, text
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items()), "a run left out by --only was touched"
    assert not (out / "never-run").exists()
    md = report.read_text()
    assert "l2-lambda10" in md, "the report keeps every run the spec's eval has measured"
    assert "never-run" not in md and "half-run" not in md, "but not one never run or not trained"


# ------------------------------------------------------------ eval caps and the ETA
def test_eval_caps_scale_with_limit_unless_given() -> None:
    small = parse_spec({"base": BASE, "variants": [{"name": "es"}], "eval": {"limit": 2, "kl_tasks": ["conciseness"]}})
    assert (small.eval.max_new_tokens, small.eval.kl_num_prompts, small.eval.kl_max_tokens) == (64, 2, 64)
    full = parse_spec({"base": BASE, "variants": [{"name": "es"}], "eval": {}})
    assert (full.eval.max_new_tokens, full.eval.kl_num_prompts, full.eval.kl_max_tokens) == (1024, 50, 256)
    given = parse_spec({"base": BASE, "variants": [{"name": "es"}],
                        "eval": {"limit": 2, "max_new_tokens": 8, "kl_num_prompts": 5, "kl_max_tokens": 3}})
    assert (given.eval.max_new_tokens, given.eval.kl_num_prompts, given.eval.kl_max_tokens) == (8, 5, 3)


def test_kl_prompts_is_read_as_the_old_name_of_kl_num_prompts_but_not_beside_it() -> None:
    spec = parse_spec({"base": BASE, "variants": [{"name": "es"}], "eval": {"kl_prompts": 7}})
    assert spec.eval.kl_num_prompts == 7
    with pytest.raises(ValueError, match="kl_prompts and kl_num_prompts: give one"):
        parse_spec({"base": BASE, "variants": [{"name": "es"}], "eval": {"kl_prompts": 7, "kl_num_prompts": 7}})


def test_the_eta_times_each_kind_of_stage_by_its_own_rate() -> None:
    from esft.sweep import StageRates

    rates = StageRates()
    assert rates.eta([("train", 100.0)]) is None, "nothing timed yet"
    # The running stage's own pace stands in before any stage has finished.
    assert rates.eta([("eval", 50.0)], current=("train", 100.0, 10.0, 100.0)) == pytest.approx(150 * 0.1)
    rates.record("train", 1000.0, 100.0)  # 0.1 s per unit
    rates.record("eval", 100.0, 25.0)  # 0.25 s per unit: unlike stages, unlike costs
    assert rates.eta([("train", 500.0), ("eval", 40.0)]) == pytest.approx(50 + 10)
    assert rates.eta([("kl", 10.0)]) == pytest.approx(10 * 125 / 1100), "an untimed kind takes the pooled rate"
    assert rates.eta([], current=("eval", 4.0, 100.0, 1.0)) == pytest.approx(1.0), "a timed kind keeps its rate"


def test_a_grid_over_seeds_names_its_runs_and_a_grpo_arm_takes_seeds() -> None:
    spec = parse_spec({"base": BASE, "grid": [{"seed": [0, 1, 2]}, {"awd": ["l2"], "awd_lambda": [10], "seed": [1, 2]}]})
    assert [r.name for r in spec.runs] == ["seed0", "seed1", "seed2", "l2-lambda10-seed1", "l2-lambda10-seed2"]
    assert [r.config.seed for r in spec.runs] == [0, 1, 2, 1, 2]
    grpo = parse_spec({"base": BASE, "grpo": {"max_steps": 2, "seeds": [0, 3]}})
    assert [(r.name, r.grpo_values["seed"]) for r in grpo.runs] == [("grpo-seed0", 0), ("grpo-seed3", 3)]
    with pytest.raises(ValueError, match="seed and seeds: give one"):
        parse_spec({"base": BASE, "grpo": {"seed": 1, "seeds": [0, 1]}})


EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_spec_is_valid_and_states_its_measured_time(path: Path) -> None:
    """A user runs these as they are: each must parse (unique run names, known keys and tasks),
    and its header must say how long it took on 2 cores, dated, before anyone starts hours of work."""
    spec = load_spec(path)
    names = [run.name for run in spec.runs]
    assert names and len(set(names)) == len(names)
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    assert re.search(r"[Mm]easured", header) and re.search(r"2026-\d\d-\d\d", header), path.name
    assert re.search(r"\d+(\.\d+)?\s*(min|s|hours?)\b", header), f"{path.name}: no time in its header"
