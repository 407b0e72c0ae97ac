"""Conciseness: length-gap reward, exact-match accuracy, built-in disjoint splits."""

from __future__ import annotations

import pytest

from esft.tasks import get_task
from esft.tasks.conciseness import ConcisenessTask

EX = {"prompt": "What is the capital of France?", "target": "Paris"}


@pytest.fixture
def task() -> ConcisenessTask:
    return ConcisenessTask()


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("Paris", 0.0),
        ("Lyon!", 0.0),  # only length matters
        ("  Paris\n", 0.0),  # surrounding whitespace is stripped
        ("The capital is Paris.", -16.0),
        ("", -5.0),
        ("Pa", -3.0),
    ],
)
def test_reward_is_minus_length_gap_after_strip(completion: str, expected: float, task) -> None:
    assert task.reward(completion, EX) == expected


def test_is_correct_is_case_insensitive_exact_match_after_strip(task) -> None:
    assert task.is_correct(" paris \n", EX)
    assert task.is_correct("PARIS", EX)
    assert not task.is_correct("Paris.", EX)
    assert not task.is_correct("Lyon!", EX)


def test_splits_have_48_train_and_128_test_disjoint(task) -> None:
    train, test = task.load("train"), task.load("test")
    assert len(train) == 48 and len(test) == 128
    assert {e["prompt"] for e in train}.isdisjoint(e["prompt"] for e in test)
    assert len({e["prompt"] for e in train}) == 48
    assert task.load("test", limit=3) == test[:3]


def test_examples_are_short_question_answer_pairs(task) -> None:
    for ex in task.load("train") + task.load("test"):
        assert set(ex) == {"prompt", "target"}
        assert ex["prompt"].strip() and ex["target"].strip()
        assert 1 <= len(ex["target"].split()) <= 4


def test_messages_are_a_single_user_turn_without_prefill(task) -> None:
    assert task.messages(EX) == [{"role": "user", "content": EX["prompt"]}]
    assert task.prefill is None


def test_get_task_builds_conciseness() -> None:
    task = get_task("conciseness")
    assert task.name == "conciseness"
    assert len(task.load("train")) == 48


def test_unknown_split_is_an_error(task) -> None:
    with pytest.raises(ValueError, match="split"):
        task.load("dev")
