"""Task sequences: stages that start where the previous ended, anchors, the forgetting matrix."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from helpers import TINY, assert_bitwise_equal

from esft.io import read_jsonl
from esft.report.continual import acc_bwt_fwt
from esft.sweep_spec import parse_spec

BASE: dict[str, Any] = {**TINY, "max_steps": 2, "save_steps": 0}


def test_acc_bwt_fwt_equal_a_hand_computation() -> None:
    # Rows: base, after stage 1, 2, 3; columns: the three stage tasks (and a prior task).
    R = [[0.1, 0.2, 0.3, 0.5],
         [0.6, 0.25, 0.35, 0.45],
         [0.4, 0.7, 0.3, 0.4],
         [0.3, 0.5, 0.8, 0.35]]
    out = acc_bwt_fwt(R, 3)
    assert out["acc"] == pytest.approx((0.3 + 0.5 + 0.8) / 3)
    assert out["bwt"] == pytest.approx(((0.3 - 0.6) + (0.5 - 0.7)) / 2)
    assert out["fwt"] == pytest.approx(((0.25 - 0.2) + (0.3 - 0.3)) / 2)
    assert acc_bwt_fwt([[None, 0.1], [0.2, 0.3], [0.4, 0.5]], 2)["fwt"] == pytest.approx(0.3 - 0.1)
    # Stage 1 gained 0.5 and lost 0.3 of it (−60%); stage 2 gained 0.7 − 0.25 and lost 0.2 of it.
    assert out["bwt_relative"] == pytest.approx(((0.3 - 0.6) / (0.6 - 0.1) + (0.5 - 0.7) / (0.7 - 0.25)) / 2)


def test_relative_bwt_is_undefined_where_a_stage_did_not_gain() -> None:
    R = [[0.5, 0.2], [0.4, 0.3], [0.3, 0.6]]  # stage 1 lowered its own task 0.5 → 0.4
    assert acc_bwt_fwt(R, 2)["bwt_relative"] is None
    assert acc_bwt_fwt(R, 2)["bwt"] == pytest.approx(0.3 - 0.4)


def test_a_chain_copied_elsewhere_links_through_its_sibling_directories(tmp_path) -> None:
    from types import SimpleNamespace

    from esft.report.continual import sequences

    kept = tmp_path / "kept"  # the stages trained in runs/seq, their records copied to kept/
    s1 = SimpleNamespace(path=kept / "es.s1-a", config={})
    s2 = SimpleNamespace(path=kept / "es.s2-b", config={"init_from": "runs/seq/es.s1-a"})
    s3 = SimpleNamespace(path=kept / "es.s3-c", config={"init_from": "runs/seq/es.s2-b"})
    other = SimpleNamespace(path=kept / "x.s2-b", config={"init_from": "runs/seq/x.s1-a"})  # its stage 1 not kept
    assert sequences([s3, other, s2, s1]) == [[s1, s2, s3]]


def test_a_grpo_sequence_links_through_the_final_model_each_stage_loads(tmp_path) -> None:
    from types import SimpleNamespace

    from esft.report.continual import sequences

    g1 = SimpleNamespace(path=tmp_path / "grpo.s1-a", config={"trainer": "grpo", "model": "embedded"})
    g2 = SimpleNamespace(path=tmp_path / "grpo.s2-b", config={"trainer": "grpo", "model": str(tmp_path / "grpo.s1-a" / "final")})
    hub = SimpleNamespace(path=tmp_path / "grpo-x", config={"trainer": "grpo", "model": "org/final"})  # a model named final
    assert sequences([g2, hub, g1]) == [[g1, g2]]


BAD = [
    ({"stages": []}, "stages: expected a non-empty list"),
    ({"stages": [{"task": "conciseness"}, {"task": "nosuchtask"}]}, r"stages\[1\]: task: unknown task 'nosuchtask'"),
    ({"stages": [{"task": "conciseness", "popsize": 3}]}, r"stages\[0\]: unknown ESConfig fields: popsize"),
    ({"stages": [{"max_steps": 3}]}, r"stages\[0\]: task: every stage names"),
    ({"variants": [{"name": "x", "anchor": "middle"}], "stages": [{"task": "conciseness"}]}, "anchor: expected base"),
    ({"variants": [{"name": "b", "kl_budget": 0.1, "kl_tasks": "previous"}], "stages": [{"task": "conciseness"}],
      "eval": {"tasks": ["conciseness"]}}, "kl_tasks: previous needs an earlier stage"),
    ({"variants": [{"name": "s1", "seed": 1}], "stages": [{"task": "conciseness", "seed": 2}]},
     r"seed: set by this arm and by stages\[0\]"),
]


@pytest.mark.parametrize(("spec", "message"), BAD, ids=[m for _, m in BAD])
def test_a_bad_sequence_spec_fails_before_anything_runs_naming_the_key(spec, message) -> None:
    with pytest.raises(ValueError, match=message):
        parse_spec({"base": BASE, **spec})


def test_each_arm_runs_every_stage_from_the_previous_one() -> None:
    spec = parse_spec({"base": BASE, "stages": [{"task": "conciseness"}, {"task": "countdown", "max_steps": 3}],
                       "variants": [{"name": "es"}, {"name": "re", "awd": "l2", "awd_lambda": 10, "anchor": "stage"},
                                    {"name": "kl", "kl_budget": 0.1, "kl_tasks": "previous", "anchor": "stage"}],
                       "eval": {"tasks": ["conciseness", "countdown", "piqa"]}})
    runs = {r.name: r for r in spec.runs}
    assert list(runs) == ["es.s1-conciseness", "es.s2-countdown", "re.s1-conciseness", "re.s2-countdown",
                          "kl.s1-conciseness", "kl.s2-countdown"]
    assert runs["es.s2-countdown"].previous == "es.s1-conciseness" and runs["es.s2-countdown"].config.max_steps == 3
    assert runs["re.s2-countdown"].config.anchor_at == "start" and runs["es.s2-countdown"].config.anchor_at == "base"
    assert runs["kl.s1-conciseness"].config.kl_tasks == "piqa", "stage 1: the prior tasks of eval"
    assert runs["kl.s2-countdown"].config.kl_tasks == "conciseness", "stage 2: the earlier stage's task"
    from pathlib import Path

    assert runs["es.s2-countdown"].resolved(Path("/x")).init_from == "/x/es.s1-conciseness"
    # A stage draws its own noise: the same seed's stream k−1, never stage k−1's perturbations again.
    assert [runs[f"{arm}.s{k}-{t}"].config.noise_stream for arm in ("es", "kl")
            for k, t in ((1, "conciseness"), (2, "countdown"))] == [0, 1, 0, 1]
    given = parse_spec({"base": {**BASE, "noise_stream": 5}, "stages": [{"task": "conciseness"},
                        {"task": "countdown"}, {"task": "conciseness", "noise_stream": 0}]})
    assert [r.config.noise_stream for r in given.runs] == [5, 6, 0], "base's stream, then one more per stage; a stage's own"


def test_a_run_that_redraws_the_noise_of_the_run_it_starts_from_is_warned(tmp_path, caplog) -> None:
    from esft.config import ESConfig
    from esft.trainer import _warn_on_shared_noise

    earlier = tmp_path / "stage1"
    earlier.mkdir()
    (earlier / "config.yaml").write_text(yaml.safe_dump({**BASE, "seed": 3, "output_dir": str(earlier)}))
    with caplog.at_level("WARNING", logger="esft.trainer"):
        _warn_on_shared_noise(ESConfig(**{**BASE, "seed": 3, "init_from": str(earlier), "output_dir": str(tmp_path / "a")}))
        _warn_on_shared_noise(ESConfig(**{**BASE, "seed": 3, "noise_stream": 1, "init_from": str(earlier),
                                          "output_dir": str(tmp_path / "b")}))
    (warning,) = caplog.records
    assert "same noise seeds as the run it starts from" in warning.getMessage() and "--noise_stream 1" in warning.getMessage()


def sequence_spec() -> dict[str, Any]:
    return {"base": BASE, "stages": [{"task": "conciseness"}, {"task": "countdown"}],
            "variants": [{"name": "es"}, {"name": "re", "awd": "l2", "awd_lambda": 10, "anchor": "stage"}],
            "eval": {"tasks": ["conciseness", "countdown"], "limit": 2, "max_new_tokens": 6,
                     "kl_tasks": ["conciseness"], "kl_num_prompts": 2, "kl_max_tokens": 4}}


@pytest.fixture(scope="module")
def sequence(tmp_path_factory, embedded_dir) -> dict[str, Any]:
    """The tiny two-stage sequence from the command line, killed once stage 2 logged an iteration, then rerun."""
    root = tmp_path_factory.mktemp("sequence")
    spec_path, out = root / "spec.yaml", root / "out"
    spec_path.write_text(yaml.safe_dump(sequence_spec(), sort_keys=False))
    cmd = [sys.executable, "-m", "esft.cli", "sweep", str(spec_path), "--output_dir", str(out), "--no_progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stage2 = out / "es.s2-countdown" / "seedlog.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not read_jsonl(stage2):
        time.sleep(0.05)
    assert proc.poll() is None, f"the sequence ended before stage 2 could be killed: {proc.communicate()[1][-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stage1 = out / "es.s1-conciseness" / "seedlog.jsonl"
    before = (stage1.stat().st_mtime_ns, stage1.read_bytes())
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    return {"out": out, "rerun": rerun, "before": before}


@pytest.mark.slow
def test_a_killed_sequence_finishes_without_retraining_stage_1(sequence) -> None:
    out, rerun = sequence["out"], sequence["rerun"]
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    stage1 = out / "es.s1-conciseness" / "seedlog.jsonl"
    assert (stage1.stat().st_mtime_ns, stage1.read_bytes()) == sequence["before"], "stage 1 was touched"
    assert "es.s1-conciseness: already trained" in rerun.stdout
    assert "es.s2-countdown: trained to 2 iterations (resumed at 1)" in rerun.stdout, rerun.stdout


@pytest.mark.slow
def test_stage_2_starts_from_stage_1s_final_weights_and_replays_to_its_checkpoint(sequence) -> None:
    from esft.seedlog import load_checkpoint_tensors, replay

    out = sequence["out"]
    s1, s2 = out / "es.s1-conciseness", out / "es.s2-countdown"
    assert yaml.safe_load((s2 / "config.yaml").read_text())["init_from"] == str(s1)
    start, _ = replay(s2, 0, device="cpu")
    stage1_final = load_checkpoint_tensors(s1 / "final")
    assert_bitwise_equal(dict(start.items()), {n: stage1_final[n] for n in start.names}, "stage 2 at iteration 0")
    end, _ = replay(s2, 2, device="cpu")
    final = load_checkpoint_tensors(s2 / "final")
    assert_bitwise_equal({n: t for n, t in end.state_dict().items() if n in final}, final, "stage 2 replay")


@pytest.mark.slow
def test_re_anchoring_pulls_toward_stage_1s_final_weights_and_the_default_toward_the_base(sequence) -> None:
    from safetensors.torch import load_file

    from esft.models import load_model
    from esft.params import WeightState
    from esft.seedlog import load_checkpoint_tensors

    out = sequence["out"]
    base_state = WeightState(load_model("embedded", "auto", "cpu")[0], TINY["trainable"])
    base = dict(base_state.items())
    re_theta0 = load_file(out / "re.s2-countdown" / "theta0.safetensors")
    es_theta0 = load_file(out / "es.s2-countdown" / "theta0.safetensors")
    stage1_final = load_checkpoint_tensors(out / "re.s1-conciseness" / "final")
    assert_bitwise_equal({n: re_theta0[n] for n in base}, {n: stage1_final[n] for n in base},
                         "anchor: stage → θ₀ is stage 1's final weights")
    assert_bitwise_equal({n: es_theta0[n] for n in base}, base, "default → θ₀ is the base model")


@pytest.mark.slow
def test_the_report_holds_the_forgetting_matrix_with_its_summaries_and_figure(sequence) -> None:
    import json

    out = sequence["out"] / "report"
    data = json.loads((out / "forgetting_matrix.json").read_text())["sequences"]
    assert len(data) == 2
    for seq in data:
        assert seq["tasks"][:2] == ["conciseness", "countdown"] and len(seq["matrix"]) == 3  # base + 2 stages
        assert all(key in seq for key in ("acc", "bwt", "fwt", "bwt_relative", "prior_kl_after_stage"))
        assert seq["matrix"][0] is not None and seq["acc"]["value"] is not None
    assert sorted(seq["arm"].endswith(", re-anchored") for seq in data) == [False, True]
    assert {seq["seed"] for seq in data} == {BASE["seed"]}
    for arm in ("es", "re"):  # stage 2's iteration 0 is stage 1's end (its rows), never the base model's
        stage1, stage2 = sequence["out"] / f"{arm}.s1-conciseness", sequence["out"] / f"{arm}.s2-countdown"
        start = [r for r in read_jsonl(stage2 / "eval" / "forgetting.jsonl") if r["iteration"] == 0]
        end = [r for r in read_jsonl(stage1 / "eval" / "forgetting.jsonl") if r["iteration"] == 2]
        assert len(start) == 2 and {r["copied_from"] for r in start} == {f"{arm}.s1-conciseness@2"}, start
        strip = ("iteration", "copied_from")
        assert sorted(({k: v for k, v in r.items() if k not in strip} for r in start), key=str) == sorted(
            ({k: v for k, v in r.items() if k not in strip} for r in end), key=str)
    md = (out / "report.md").read_text()
    assert "## Task sequences: the forgetting matrix" in md and (out / "forgetting_matrix.png").stat().st_size > 0


@pytest.mark.slow
def test_a_stage_takes_its_iteration_0_kl_from_the_previous_stage_and_it_is_what_measuring_gives(sequence) -> None:
    import json

    from esft.evaluation.kl import kl_report

    out = sequence["out"]
    stage1, stage2 = out / "es.s1-conciseness", out / "es.s2-countdown"
    (start,) = [r for r in json.loads((stage2 / "kl.json").read_text()) if r["iteration"] == 0]
    (end,) = [r for r in json.loads((stage1 / "kl.json").read_text()) if r["iteration"] == 2]
    assert start["copied_from"] == "es.s1-conciseness@2" and start["kl_exact_token"] == end["kl_exact_token"] > 0
    (measured,) = kl_report(stage2, ["conciseness"], iterations=[0], num_prompts=2, max_tokens=4)
    assert measured["kl_exact_token"] == pytest.approx(start["kl_exact_token"], rel=1e-6), "borrowed = measured"



@pytest.mark.slow
def test_each_stage_names_what_its_kl_and_drift_were_measured_against_and_a_rerun_keeps_them(sequence) -> None:
    import json

    from esft.sweep import _missing_drift, _missing_kl
    from esft.sweep_spec import EvalSpec

    out = sequence["out"]
    ev = EvalSpec(kl_tasks=("conciseness",), kl_num_prompts=2, kl_max_tokens=4)
    expected = {"es": ("embedded", "embedded"), "re": ("embedded", str((out / "re.s1-conciseness").resolve()))}
    for arm, (kl_reference, drift_reference) in expected.items():
        stage2 = out / f"{arm}.s2-countdown"
        kl_rows, drift_rows = (json.loads((stage2 / name).read_text()) for name in ("kl.json", "drift.json"))
        assert {r["reference"] for r in kl_rows} == {kl_reference}, "KL is to the base model, re-anchored or not"
        assert {str(Path(r["reference"]).resolve()) if arm == "re" else r["reference"] for r in drift_rows} == {drift_reference}
        assert _missing_kl(stage2, ev, [0, 2]) == [] and _missing_drift(stage2, [0, 2]) == [], "nothing to measure again"


def test_sequences_that_differ_only_in_seed_are_summarised_over_seeds() -> None:
    from types import SimpleNamespace

    from scipy import stats

    from esft.report.continual import over_seeds, over_seeds_markdown

    def chain(arm: str, seed: int, **awd: Any) -> list[SimpleNamespace]:
        s1 = SimpleNamespace(path=f"/x/{arm}-seed{seed}.s1", config={**BASE, "seed": seed, **awd})
        s2 = SimpleNamespace(path=f"/x/{arm}-seed{seed}.s2", config={**BASE, "seed": seed, "task": "countdown", **awd,
                                                                   "noise_stream": 1, "init_from": s1.path})
        return [s1, s2]

    def result(acc: float, bwt: float, kl: float) -> dict[str, Any]:
        value = {"value": None, "lo": None, "hi": None}
        return {"acc": {**value, "value": acc}, "bwt": {**value, "value": bwt}, "fwt": {**value, "value": 0.5},
                "bwt_relative": value, "prior_kl_after_stage": [kl / 2, kl]}

    chains = [chain("es", 0), chain("awd", 0, awd="l2", awd_lambda=10), chain("es", 1), chain("es", 2)]
    results = [result(1.0, -3.0, 0.3), result(9.0, 9.0, 0.1), result(2.0, -5.0, 0.5), result(4.0, -1.0, 0.4)]
    (row,) = over_seeds(chains, results)  # awd has one seed: no summary over seeds
    assert row["seeds"] == [0, 1, 2] and row["label"] == "ES (4)"
    bwt = [-3.0, -5.0, -1.0]
    half = stats.t.ppf(0.975, 2) * np.std(bwt, ddof=1) / np.sqrt(3)
    assert row["bwt"]["values"] == bwt and row["bwt"]["mean"] == pytest.approx(-3.0)
    assert (row["bwt"]["lo"], row["bwt"]["hi"]) == (pytest.approx(-3.0 - half), pytest.approx(-3.0 + half))
    assert row["prior_kl_after_stage"][1]["mean"] == pytest.approx(0.4) and row["bwt_relative"] is None
    assert "| ES (4) | 0, 1, 2 | +2.33 [" in "\n".join(over_seeds_markdown([row], "reward"))


def test_an_arm_is_named_by_its_setting_and_whether_it_re_anchors() -> None:
    from types import SimpleNamespace

    from esft.report.continual import arm_label

    awd = {**BASE, "awd": "l2", "awd_lambda": 10}
    at_base = [SimpleNamespace(path="/x/a.s1", config=awd), SimpleNamespace(path="/x/a.s2", config={**awd, "anchor_at": "base"})]
    at_start = [SimpleNamespace(path="/x/b.s1", config=awd), SimpleNamespace(path="/x/b.s2", config={**awd, "anchor_at": "start"})]
    assert arm_label(at_start) == arm_label(at_base) + ", re-anchored"
    assert "AWD L2" in arm_label(at_base) and "[" not in arm_label(at_base)


def test_the_figures_put_each_arm_on_a_row_and_each_seed_in_its_column(tmp_path) -> None:
    import matplotlib.image

    from esft.report.continual import _by_arm_and_seed, plot, plot_summary

    def result(arm: str, seed: int, rel: float | None, tasks: tuple[str, ...] = ("conciseness", "verbosity")) -> dict[str, Any]:
        return {"arm": arm, "seed": seed, "tasks": [*tasks, "piqa"], "stage_tasks": list(tasks),
                "metrics": ["reward", "reward", "accuracy"],
                "matrix": [[-80.0, 87.0, 0.4], [-60.0, 60.0, 0.4], [-75.0, 90.0, 0.3]],
                "bwt_relative": {"value": rel, "lo": None if rel is None else rel - 0.2, "hi": None if rel is None else rel + 0.2},
                "prior_kl_after_stage": [0.1, 0.2]}

    results = [result("ES (8)", 1, -0.6), result("AWD", 1, -0.3), result("ES (8)", 0, -0.5),
               result("ES (8)", 0, -0.4, ("verbosity", "conciseness"))]
    grid = _by_arm_and_seed(results)
    assert [(label, [r["seed"] for r in group]) for label, group in grid] == [
        ("ES (8) (conciseness → verbosity)", [0, 1]), ("AWD", [1]), ("ES (8) (verbosity → conciseness)", [0])]
    heatmaps = matplotlib.image.imread(plot(results, tmp_path / "matrix.png"))
    assert heatmaps.shape[:2] == (3 * 432, 2 * 540), "3 arms × seeds 0 and 1 at 4.5 × 3.6 inches, 120 dpi"
    # AWD ran seed 1 only: its panel is in seed 1's column, the one left of it is blank (white).
    awd_seed0 = heatmaps[432 + 50:2 * 432 - 50, 50:540 - 50, :3]
    assert awd_seed0.min() == 1.0 and heatmaps[432 + 50:2 * 432 - 50, 540 + 50:-50, :3].min() < 1.0
    assert plot_summary(results, tmp_path / "summary.png").stat().st_size > 0
    assert plot_summary([result("ES (8)", 0, None)], tmp_path / "kl-only.png") is not None, "no stage gained: KL still shown"
    none = result("ES (8)", 0, None)
    none["prior_kl_after_stage"] = [None, None]
    assert plot_summary([none], tmp_path / "none.png") is None, "nothing measured: no figure"
