"""Prior-task accuracy through lm-evaluation-harness on the local data pack."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import SHARED_DATA

from esft.evaluation import harness
from esft.io import read_jsonl

HAS_DATA = (SHARED_DATA / "piqa" / "valid.jsonl").exists()
needs_data = pytest.mark.skipif(not HAS_DATA, reason="the shared data pack is not there")


@needs_data
def test_documents_are_the_standard_zero_shot_formulation_of_each_task(tmp_path) -> None:
    docs = {}
    for name in harness.FORMULATIONS:
        path = harness.write_documents(name, tmp_path, 2, str(SHARED_DATA))
        docs[name] = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(docs[name]) == 2 and all(0 <= d["gold"] < len(d["choices"]) for d in docs[name]), name
    assert docs["piqa"][0]["query"].startswith("Question: ") and docs["piqa"][0]["query"].endswith("\nAnswer:")
    assert len(docs["piqa"][0]["choices"]) == 2 and len(docs["hellaswag"][0]["choices"]) == 4
    raw = json.loads((SHARED_DATA / "hellaswag" / "validation_1000.jsonl").read_text().splitlines()[0])
    assert docs["hellaswag"][0]["query"].startswith(raw["activity_label"] + ": ")
    assert "[" not in "".join(docs["hellaswag"][0]["choices"]), "WikiHow markup is dropped"


def test_a_task_pointing_at_a_missing_data_file_fails_in_one_line_naming_it(tmp_path) -> None:
    (tmp_path / "piqa").mkdir()  # the folder, without valid.jsonl
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        harness.write_documents("piqa", tmp_path / "docs", 2, str(tmp_path))
    assert str(tmp_path / "piqa" / "valid.jsonl") in str(err.value) and "\n" not in str(err.value)


def test_a_task_without_a_formulation_is_refused_before_any_model_loads() -> None:
    with pytest.raises(ValueError, match="no harness formulation for conciseness"):
        harness.harness_tasks(["piqa", "conciseness"])


@pytest.mark.slow
@needs_data
def test_harness_rows_of_the_embedded_model_reach_the_report(tmp_path, embedded_dir, reference_run) -> None:
    from helpers import copy_run

    from esft.report.runs import build_report

    out = tmp_path / "base"
    proc = subprocess.run(
        [sys.executable, "-m", "esft.cli", "eval", "--harness", "lm-eval", "--model", "embedded", "--tasks",
         "piqa,arc_challenge", "--limit", "3", "--output", str(out), "--data_dir", str(SHARED_DATA)],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = read_jsonl(out / harness.HARNESS_FILE)
    assert {r["task"] for r in rows} == {"piqa", "arc_challenge"}
    for r in rows:
        assert r["n"] == 3 and len(r["correct"]) == 3 and 0 <= r["acc_norm"] <= 1 and r["acc_norm_stderr"] >= 0
        assert r["accuracy"] == r["acc_norm"] == sum(r["correct"]) / 3 and r["protocol"] == "lm-eval"

    run = copy_run(reference_run, tmp_path / "run")
    rows = harness.evaluate_run(run, ["piqa"], iterations=[0, 3], limit=3, data_dir=str(SHARED_DATA), progress=False)
    assert sorted(r["iteration"] for r in rows) == [0, 3]
    assert harness.evaluate_run(run, ["piqa"], iterations=[0, 3], limit=3, data_dir=str(SHARED_DATA)) == rows, \
        "a second call resumes: nothing is scored again"
    md = build_report([run], tmp_path / "report", figures=False).read_text()
    assert "## Accuracy change, lm-evaluation-harness (acc_norm)" in md
    table = md.split("lm-evaluation-harness (acc_norm)", 1)[1]
    assert "| Δ piqa |" in table or "piqa" in table
