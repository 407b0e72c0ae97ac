"""Benchmark tasks on the real data pack: split sizes, fixed subsets, gold answers grade.

Every loaded example is graded with its own gold answer written in the requested
format, so a conversion slip in any single row (a comma in a GSM8K number, a shifted
MMLU-Pro letter) fails here. Skipped when the shared data pack is absent.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from esft.tasks import Task, available_tasks, get_task
from esft.tasks.mmlu_pro import MMLUProTask
from esft.tasks.sources import MissingDataError

SHARED_DATA = Path(
    os.environ.get("ESFT_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data"
)
BENCH = ("gsm8k", "proofwriter", "hellaswag", "piqa", "arc_challenge", "mmlu_pro")
SIZES = {
    "gsm8k": (200, 1319),
    "proofwriter": (200, 1000),
    "hellaswag": (1000, 1000),
    "piqa": (1838, 1838),
    "arc_challenge": (299, 1172),
    "mmlu_pro": (70, 2000),
}
TARGET_REWARD = {"gsm8k": 1.1, "proofwriter": 1.1}


@pytest.fixture(scope="module")
def data_dir() -> Path:
    if not (SHARED_DATA / "gsm8k" / "test.jsonl").is_file():
        pytest.skip("shared data pack not available")
    return SHARED_DATA


@pytest.fixture(scope="module")
def tasks(data_dir: Path) -> dict:
    return {name: get_task(name, data_dir=str(data_dir)) for name in BENCH}


def gold_completion(name: str, gold: str) -> str:
    """A completion giving `gold` in exactly the format the task asks for."""
    if name == "gsm8k":
        return f"Adding it all up.\n#### {gold}"
    if name == "proofwriter":
        return f"From the rules it follows.\nAnswer: {gold}"
    if name in ("arc_challenge", "mmlu_pro"):
        return f"The answer is ({gold})"
    return gold


def test_registry_lists_all_tasks() -> None:
    names = available_tasks()
    assert sorted(names) == sorted({*BENCH, "countdown", "conciseness", "verbosity", "shouting", "listing"})
    for name in BENCH:
        task = get_task(name)  # building a task reads no data
        assert task.name == name and isinstance(task, Task)


@pytest.mark.parametrize("name", BENCH)
def test_split_sizes(name: str, tasks: dict) -> None:
    n_train, n_test = SIZES[name]
    assert len(tasks[name].load("train")) == n_train
    assert len(tasks[name].load("test")) == n_test


@pytest.mark.parametrize("name", BENCH)
def test_subsets_are_fixed_across_calls_and_instances(name: str, tasks: dict, data_dir) -> None:
    fresh = get_task(name, data_dir=str(data_dir), seed=123)  # the run seed changes nothing
    for split in ("train", "test"):
        first = tasks[name].load(split)
        assert first == tasks[name].load(split)
        assert first == fresh.load(split)


def test_mmlu_pro_eval_subset_is_a_fixed_2000_of_test(tasks: dict) -> None:
    test = tasks["mmlu_pro"].load("test")
    ids = [ex["id"] for ex in test]
    assert len(set(ids)) == 2000
    assert ids == sorted(ids)  # a subset kept in file order
    assert {ex["category"] for ex in test} >= {"math", "law", "history"}


@pytest.mark.parametrize("name", BENCH)
def test_limit_keeps_the_first_examples(name: str, tasks: dict) -> None:
    assert tasks[name].load("test", limit=5) == tasks[name].load("test")[:5]


def test_loaded_examples_are_copies(tasks: dict) -> None:
    task = tasks["hellaswag"]
    task.load("test")[0]["endings"].append("tampered")
    assert len(task.load("test")[0]["endings"]) == 4


def test_target_tasks_train_and_test_are_disjoint(tasks: dict) -> None:
    gsm_train = {ex["question"] for ex in tasks["gsm8k"].load("train")}
    gsm_test = {ex["question"] for ex in tasks["gsm8k"].load("test")}
    assert len(gsm_train) == 200 and not gsm_train & gsm_test
    pw_train = {(ex["theory"], ex["question"]) for ex in tasks["proofwriter"].load("train")}
    pw_test = {(ex["theory"], ex["question"]) for ex in tasks["proofwriter"].load("test")}
    assert len(pw_train) == 200 and not pw_train & pw_test


def test_gsm8k_train_is_a_seeded_subset_not_the_file_head(tasks: dict, data_dir) -> None:
    import json

    head = [
        json.loads(line)["question"]
        for line in (data_dir / "gsm8k" / "train.jsonl").read_text().splitlines()[:200]
    ]
    assert [ex["question"] for ex in tasks["gsm8k"].load("train")] != head


@pytest.mark.parametrize("name", BENCH)
@pytest.mark.parametrize("split", ["train", "test"])
def test_gold_answer_is_correct_for_every_example(name: str, split: str, tasks: dict) -> None:
    task = tasks[name]
    expected_reward = TARGET_REWARD.get(name, 1.0)
    for ex in task.load(split):
        completion = gold_completion(name, task.gold(ex))
        assert task.is_correct(completion, ex), (completion, ex)
        assert task.reward(completion, ex) == pytest.approx(expected_reward), (completion, ex)
        assert task.extract(completion) == task.gold(ex)


def test_example_fields(tasks: dict) -> None:
    gsm = tasks["gsm8k"].load("test")
    assert all("," not in ex["answer"] for ex in gsm)
    labels = {ex["answer"] for ex in tasks["proofwriter"].load("test")}
    assert labels == {"True", "False", "Unknown"}
    for ex in tasks["hellaswag"].load("test"):
        assert len(ex["endings"]) == 4 and ex["label"] in range(4)
    for ex in tasks["piqa"].load("test"):
        assert len(ex["solutions"]) == 2 and ex["label"] in (0, 1)
    for ex in tasks["arc_challenge"].load("test"):
        assert ex["answer"] in ex["labels"] and len(ex["labels"]) == len(ex["options"])
        assert set(ex["labels"]) <= set("ABCDE")
    for ex in tasks["mmlu_pro"].load("test"):
        assert 3 <= len(ex["options"]) <= 10
        assert "N/A" not in ex["options"]
        assert "ABCDEFGHIJ".index(ex["answer"]) < len(ex["options"])


@pytest.mark.parametrize("name", BENCH)
def test_messages_are_chat_turns_ending_with_the_question(name: str, tasks: dict) -> None:
    ex = tasks[name].load("test", limit=1)[0]
    msgs = tasks[name].messages(ex)
    assert msgs[0]["role"] == "system" and msgs[-1]["role"] == "user"
    assert all(isinstance(m["content"], str) and m["content"] for m in msgs)
    text = msgs[-1]["content"]
    key = {"hellaswag": "context", "piqa": "goal", "proofwriter": "theory"}.get(name, "question")
    assert ex[key] in text


def test_mmlu_pro_fewshot_comes_from_validation_same_category(data_dir: Path) -> None:
    task = MMLUProTask(data_dir, num_fewshot=5)
    validation = {ex["id"]: ex for ex in task.validation_rows()}
    test = task.load("test")
    assert not {ex["id"] for ex in test} & set(validation)
    seen_categories = set()
    for ex in test:
        shots = task.fewshot(ex)
        assert len(shots) == 5
        for shot in shots:
            assert shot["id"] in validation and shot["category"] == ex["category"]
        msgs = task.messages(ex)
        assert len(msgs) == 1 + 2 * 5 + 1
        assert [m["role"] for m in msgs[1:-1]] == ["user", "assistant"] * 5
        for shot, reply in zip(shots, msgs[2:-1:2]):
            assert f"The answer is ({shot['answer']})" in reply["content"]
        seen_categories.add(ex["category"])
    assert len(seen_categories) == 14
    # Training on validation never shows a question its own worked answer.
    for ex in task.load("train"):
        assert ex["id"] not in {s["id"] for s in task.fewshot(ex)}
        assert len(task.fewshot(ex)) == 4


def test_mmlu_pro_zero_shot_by_default(tasks: dict) -> None:
    ex = tasks["mmlu_pro"].load("test", limit=1)[0]
    assert len(tasks["mmlu_pro"].messages(ex)) == 2


@pytest.mark.parametrize(
    ("name", "expected_file"),
    [
        ("gsm8k", "gsm8k/train.jsonl"),
        ("proofwriter", "proofwriter/train.parquet"),
        ("hellaswag", "hellaswag/validation_1000.jsonl"),
        ("piqa", "piqa/valid.jsonl"),
        ("arc_challenge", "arc_challenge/validation.parquet"),
        ("mmlu_pro", "mmlu_pro/validation.parquet"),
    ],
)
def test_missing_files_give_a_clear_error(name: str, expected_file: str, tmp_path: Path) -> None:
    task = get_task(name, data_dir=str(tmp_path))
    with pytest.raises(MissingDataError) as err:
        task.load("train")
    message = str(err.value)
    assert str(tmp_path / expected_file) in message
    assert "--data_dir" in message and "ESFT_DATA_DIR" in message
    assert "datasets" in message
    assert isinstance(err.value, FileNotFoundError)


def test_piqa_without_its_labels_file_names_it(tmp_path: Path, data_dir: Path) -> None:
    (tmp_path / "piqa").mkdir()
    shutil.copy(data_dir / "piqa" / "valid.jsonl", tmp_path / "piqa" / "valid.jsonl")
    with pytest.raises(MissingDataError, match="valid-labels.lst"):
        get_task("piqa", data_dir=str(tmp_path)).load("test")


def test_data_dir_falls_back_to_env(monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> None:
    monkeypatch.setenv("ESFT_DATA_DIR", str(data_dir))
    assert len(get_task("arc_challenge").load("test")) == 1172


def test_unknown_split_is_an_error(tasks: dict) -> None:
    with pytest.raises(ValueError, match="split"):
        tasks["piqa"].load("validation")
