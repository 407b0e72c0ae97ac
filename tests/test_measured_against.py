"""What KL and drift rows are measured against, and the base-model work a GRPO stage shares.

A GRPO stage of a task sequence loads the previous stage's `final/` as its `model` but is
measured against the sequence's base: its KL cache is the base's (borrowed from its
siblings), and rows measured against its own start (before that rule) are recomputed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from esft.evaluation.kl import CACHE_DIR
from esft.evaluation.runs import drift_reference, measured_against, origin_of
from esft.evaluation.sharing import borrow_kl_cache
from esft.seedlog import ANCHOR_FILE, SEEDLOG
from esft.sweep import _kl_rows, _missing_drift, _missing_kl
from esft.sweep_spec import EvalSpec


def make_run(root: Path, name: str, **config: Any) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text(json.dumps(rows))


def test_a_grpo_stage_borrows_the_base_models_kl_samples_from_its_sequence(tmp_path: Path) -> None:
    s1 = make_run(tmp_path, "g.s1", trainer="grpo", model="embedded")
    s2 = make_run(tmp_path, "g.s2", trainer="grpo", model=str(s1 / "final"))
    s3 = make_run(tmp_path, "g.s3", trainer="grpo", model=str(s2 / "final"))
    other = make_run(tmp_path, "other", trainer="grpo", model="HuggingFaceTB/SmolLM2-360M-Instruct")
    base = '{"base_model": "embedded"}\n'
    for run, text in ((s1, base), (s2, '{"base_model": "%s"}\n' % (s1 / "final"))):
        (run / CACHE_DIR).mkdir()
        (run / CACHE_DIR / "piqa-n16-t32-s0.json").write_text(text)  # s2's: its own start, from before the fix

    (s1 / CACHE_DIR / "piqa-n16-t32-s0.json").rename(tmp_path / "aside.json")
    borrow_kl_cache(s3)
    assert not (s3 / CACHE_DIR).exists(), "a sibling's cache for another base is not borrowed"
    (tmp_path / "aside.json").rename(s1 / CACHE_DIR / "piqa-n16-t32-s0.json")
    for run in (s2, s3, other):
        borrow_kl_cache(run)

    assert (s2 / CACHE_DIR / "piqa-n16-t32-s0.json").read_text() == base, "its stale cache is replaced"
    assert (s3 / CACHE_DIR / "piqa-n16-t32-s0.json").read_text() == base
    assert not (other / CACHE_DIR).exists(), "another base model's samples are not this one's"


def test_kl_rows_of_a_grpo_stage_measured_against_its_own_start_are_measured_again(tmp_path: Path) -> None:
    ev = EvalSpec(kl_tasks=("piqa",), kl_num_prompts=16, kl_max_tokens=32)
    s1 = make_run(tmp_path, "g.s1", trainer="grpo", model="embedded")
    s2 = make_run(tmp_path, "g.s2", trainer="grpo", model=str(s1 / "final"))
    row = {"task": "piqa", "num_prompts": 16, "max_tokens": 32, "kl_exact_token": 0.1}

    write_rows(s2 / "kl.json", [{**row, "iteration": 0}, {**row, "iteration": 60}])  # before rows named theirs
    assert _missing_kl(s2, ev, [0, 60]) == [0, 60]
    write_rows(s2 / "kl.json", [{**row, "iteration": k, "reference": "embedded"} for k in (0, 60)])
    assert _missing_kl(s2, ev, [0, 60]) == []

    # Stage 1 and every ES run were measured against their `model` all along: kept.
    write_rows(s1 / "kl.json", [{**row, "iteration": 60}])
    assert _missing_kl(s1, ev, [60]) == [] and len(_kl_rows(s1, ev)) == 1
    es = make_run(tmp_path, "es", model="embedded", seed=0)
    write_rows(es / "kl.json", [{**row, "iteration": 20}])
    assert _missing_kl(es, ev, [20]) == []


def test_drift_of_a_stage_re_anchored_at_its_start_is_against_that_start(tmp_path: Path) -> None:
    s1 = make_run(tmp_path, "a.s1", model="embedded", seed=0)
    restaged = make_run(tmp_path, "a.s2", model="embedded", seed=0, init_from=str(s1), anchor_at="start")
    at_base = make_run(tmp_path, "b.s2", model="embedded", seed=0, init_from=str(s1), anchor_at="base")
    for run in (restaged, at_base):  # ES runs: a seed log, and θ₀ written before the first iteration
        (run / SEEDLOG).write_text("")
        (run / ANCHOR_FILE).write_bytes(b"")
    assert drift_reference(restaged, yaml.safe_load((restaged / "config.yaml").read_text())) == str(s1)
    assert drift_reference(at_base, yaml.safe_load((at_base / "config.yaml").read_text())) == "embedded"

    write_rows(restaged / "drift.json", [{"iteration": 0, "reference": "embedded", "global": {"norm": 58.2}},
                                         {"iteration": 20, "reference": str(s1), "global": {"norm": 58.2}}])
    assert _missing_drift(restaged, [0, 20]) == [0]
    (restaged / ANCHOR_FILE).unlink()  # θ₀ gone: drift can only be against the base model
    assert drift_reference(restaged, yaml.safe_load((restaged / "config.yaml").read_text())) == "embedded"


def test_a_row_names_its_reference_and_a_row_without_one_is_read_by_the_old_rule() -> None:
    grpo_stage = {"trainer": "grpo", "model": "runs/g.s1/final"}
    assert measured_against({"reference": "embedded"}, grpo_stage, "embedded")
    assert not measured_against({}, grpo_stage, "embedded")
    assert measured_against({}, {"trainer": "grpo", "model": "embedded"}, "embedded")
    assert measured_against({}, {"model": "embedded"}, "embedded")
    assert not measured_against({"reference": "runs/a.s1"}, {"model": "embedded"}, "embedded")


def test_origin_of_needs_no_run_on_disk_beyond_the_configs(tmp_path: Path) -> None:
    s1 = make_run(tmp_path, "g.s1", trainer="grpo", model="embedded")
    s2 = make_run(tmp_path, "g.s2", trainer="grpo", model=str(s1 / "final"))
    config = yaml.safe_load((s2 / "config.yaml").read_text())
    assert origin_of(s2, config) == "embedded", "no checkpoint or seed log exists yet"
