"""Countdown: exact reward table, bounded grading of hostile output, data and generator."""

from __future__ import annotations

import random
import re
import time
from collections import Counter

import pytest
from helpers import SHARED_DATA

from esft.rewards import as_reward_func
from esft.tasks import get_task
from esft.tasks.arith import numbers_in, safe_eval
from esft.tasks.countdown import (
    PREFILL,
    CountdownTask,
    format_score,
    generate,
    last_answer,
)

EX = {"numbers": [44, 19, 35], "target": 98}
GOOD = "(44 + 19) + 35"


def done(answer: str, think: str = "adding up") -> str:
    """A completion in the exact expected shape (the prefill already opened <think>)."""
    return f"{think}</think>\n<answer>{answer}</answer>"


@pytest.fixture
def task() -> CountdownTask:
    return CountdownTask()


# --- reward table -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (done(GOOD), 1.1),
        (done(f"  {GOOD}  "), 1.1),
        (done(GOOD) + "\n", 1.1),  # `$` also matches before one final newline
        (done(GOOD) + "\n\n", 1.06),
        (done(GOOD) + " bye", 1.06),
        (f"x</think> <answer>{GOOD}</answer>", 1.06),  # no newline between the blocks
        (f"<answer>{GOOD}</answer>", 1.05),  # correct answer, no </think>: 1.0 + 0.1 * 0.5
        ("thinking</think>\n", 0.01),  # think block only
        ("thinking</think>\n<answer>", 0.01),
        ("", 0.0),
        (done("99"), 0.1),  # format only
        (done(""), 0.1),
        (done("   "), 0.1),
    ],
)
def test_reward_table_matches_papers_rule(completion: str, expected: float, task) -> None:
    assert task.reward(completion, EX) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        ("(44 + 19) + 35 + 0", "extra number"),
        ("44 + 54", "missing and unknown numbers"),
        ("44 + 19 + 35 - 19 + 19", "numbers reused"),
        ("(44 + 19) + 35 = 98", "character outside [0-9+-*/() ]"),
        ("44 + 19 + 35.0", "decimal point"),
        ("44 + 19 + 34", "wrong value"),
    ],
)
def test_wrong_answers_get_format_credit_only(answer: str, why: str, task) -> None:
    assert task.reward(done(answer), EX) == pytest.approx(0.1), why
    assert not task.is_correct(done(answer), EX)


def test_numbers_must_match_as_a_multiset(task) -> None:
    ex = {"numbers": [5, 5, 1], "target": 11}
    assert task.is_correct(done("5 + 5 + 1"), ex)
    assert not task.is_correct(done("5 + 6"), ex)
    assert not task.is_correct(done("5 * 1 + 5 + 1 - 1"), ex)


def test_non_integer_target_is_gradable(task) -> None:
    ex = {"numbers": [1, 5, 137], "target": 27.4}
    assert task.reward(done("137 / 5 * 1"), ex) == pytest.approx(1.1)
    assert task.reward(done("137 / 5 + 1"), ex) == pytest.approx(0.1)


def test_power_operator_scores_no_answer_credit(task) -> None:
    ex = {"numbers": [2, 3, 1], "target": 8}
    assert task.reward(done("2**3*1"), ex) == pytest.approx(0.1)
    assert task.reward(done("(2 + 3 + 1) * 1"), ex) == pytest.approx(0.1)


def test_division_by_zero_scores_no_answer_credit(task) -> None:
    ex = {"numbers": [4, 4, 7], "target": 7}
    assert task.reward(done("7 / (4 - 4)"), ex) == pytest.approx(0.1)


def test_last_answer_block_counts_not_the_first(task) -> None:
    right_last = f"a</think>\n<answer>1 + 2</answer> no wait <answer>{GOOD}</answer>"
    wrong_last = f"a</think>\n<answer>{GOOD}</answer> no wait <answer>1 + 2</answer>"
    assert task.reward(right_last, EX) == pytest.approx(1.1)
    assert task.reward(wrong_last, EX) == pytest.approx(0.1)


def test_is_correct_ignores_format(task) -> None:
    assert task.is_correct(f"<answer>{GOOD}</answer>", EX)
    assert task.is_correct(done(GOOD), EX)
    assert not task.is_correct(done("1"), EX)


def test_target_given_as_string_still_grades(task) -> None:
    assert task.reward(done(GOOD), {"numbers": [44, 19, 35], "target": "98"}) == 1.1


# --- the linear scans agree with the regexes they replace ---------------------------

_FORMAT_RE = re.compile(r"^<think>.*?</think>\n<answer>.*?</answer>$", re.DOTALL)
_TOKENS = ["<think>", "</think>", "<answer>", "</answer>", "\n", "1+2", " ", "x", "<", ">"]


def _reference_format(completion: str) -> float:
    s = "<think>" + completion
    if _FORMAT_RE.match(s):
        return 1.0
    score = 0.0
    if re.search(r"<think>.*?</think>", s, re.DOTALL):
        score += 0.1
    if re.search(r"<answer>.*?</answer>", s, re.DOTALL):
        score += 0.5
    return score


def test_format_score_and_last_answer_agree_with_regex_on_random_strings() -> None:
    rng = random.Random(1234)
    for _ in range(5000):
        text = "".join(rng.choice(_TOKENS) for _ in range(rng.randint(0, 9)))
        assert format_score(text) == pytest.approx(_reference_format(text)), repr(text)
        found = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
        assert last_answer(text) == (found[-1] if found else None), repr(text)


# --- hostile output -----------------------------------------------------------------

HOSTILE = {
    "1 MB of text": "a" * 1_000_000,
    "1 MB of answer openers": "<answer>" * 125_000,
    "many near-miss format blocks": "</think>\n<answer></answer>x" * 40_000,
    "many think closers": "</think>" * 125_000 + "<answer>",
    "huge literal": done("9" * 100_000),
    "power tower": done("2**99**99"),
    "power tower 9": done("9**9**9"),
    "deep parentheses": done("(" * 10_000 + "44+19+35" + ")" * 10_000),
    "deep unary": done("-" * 900 + "44+19+35"),
    "unicode digits": done("٤٤ + ١٩ + ٣٥"),
    "unbalanced tags": "</answer><answer><think></think><answer>" * 1000,
    "empty": "",
    "nul bytes": "\x00" * 10_000,
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_completion_never_raises_and_is_fast(name: str, task) -> None:
    completion = HOSTILE[name]
    start = time.perf_counter()
    reward = task.reward(completion, EX)
    correct = task.is_correct(completion, EX)
    assert time.perf_counter() - start < 0.5
    assert 0.0 <= reward <= 0.1
    assert correct is False


def test_non_string_completion_scores_zero(task) -> None:
    assert task.reward(None, EX) == 0.0  # type: ignore[arg-type]
    assert task.is_correct(None, EX) is False  # type: ignore[arg-type]


# --- prompts --------------------------------------------------------------------------


def test_messages_are_system_user_and_prefill(task) -> None:
    msgs = task.messages(EX)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    assert msgs[-1]["content"] == "Let me solve this step by step.\n<think>" == PREFILL
    assert task.prefill == PREFILL
    user = msgs[1]["content"]
    assert "[44, 19, 35]" in user and "98" in user
    assert "<think></think>" in user and "<answer></answer>" in user


def test_prefill_false_drops_the_assistant_turn() -> None:
    task = CountdownTask(prefill=False)
    assert task.prefill is None
    assert [m["role"] for m in task.messages(EX)] == ["system", "user"]


# --- the data pack --------------------------------------------------------------------


@pytest.fixture
def real_task() -> CountdownTask:
    if not (SHARED_DATA / "countdown" / "countdown.json").is_file():
        pytest.skip("shared data pack not available")
    return CountdownTask(SHARED_DATA)


def test_real_file_splits_200_train_2000_test_disjoint(real_task) -> None:
    train, test = real_task.load("train"), real_task.load("test")
    assert len(train) == 200 and len(test) == 2000
    assert {e["id"] for e in train}.isdisjoint(e["id"] for e in test)
    assert real_task.load("test", limit=5) == test[:5]


def test_real_file_numbers_are_int_lists_and_fractional_targets_floats(real_task) -> None:
    rows = real_task.load("train") + real_task.load("test")
    for ex in rows:
        assert isinstance(ex["numbers"], list) and len(ex["numbers"]) in (3, 4)
        assert all(type(n) is int for n in ex["numbers"])
        assert type(ex["target"]) in (int, float)
        assert "context" not in ex
    floats = [ex for ex in rows if isinstance(ex["target"], float)]
    # The data pack README says 58; the file itself holds 43, all in the test split.
    assert len(floats) == 43
    assert all(not t.is_integer() for t in (ex["target"] for ex in floats))
    assert not any(isinstance(ex["target"], float) for ex in real_task.load("train"))


def test_real_fractional_row_grades_with_its_solution(real_task) -> None:
    row = next(ex for ex in real_task.load("test") if ex["id"] == 204)
    assert row["target"] == 27.4
    assert real_task.reward(done(row["solution"]), row) == pytest.approx(1.1)


def test_get_task_reads_data_dir_from_env(monkeypatch, real_task) -> None:
    monkeypatch.setenv("ESFT_DATA_DIR", str(SHARED_DATA))
    assert get_task("countdown").load("train", limit=1)[0]["numbers"] == [44, 19, 35]


def test_missing_data_file_error_names_path_and_options(tmp_path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        CountdownTask(tmp_path).load("train")
    message = str(err.value)
    assert str(tmp_path / "countdown" / "countdown.json") in message
    assert "--data_dir" in message and "ESFT_DATA_DIR" in message and "omit" in message


def test_unknown_split_is_an_error(task) -> None:
    with pytest.raises(ValueError, match="split"):
        task.load("validation")


# --- the generator --------------------------------------------------------------------


def test_generated_problems_are_deterministic_per_seed() -> None:
    assert CountdownTask(seed=3).load("test") == CountdownTask(seed=3).load("test")
    assert CountdownTask(seed=3).load("train") != CountdownTask(seed=4).load("train")


def test_generated_splits_have_default_sizes_and_are_disjoint(monkeypatch) -> None:
    monkeypatch.delenv("ESFT_DATA_DIR", raising=False)
    task = get_task("countdown", seed=7)
    train, test = task.load("train"), task.load("test")
    assert len(train) == 200 and len(test) == 2000
    key = lambda ex: (tuple(sorted(ex["numbers"])), ex["target"])  # noqa: E731
    assert {key(e) for e in train}.isdisjoint(key(e) for e in test)
    assert len({key(e) for e in test}) == 2000
    assert task.load("train", limit=10) == train[:10]


def test_every_generated_problem_is_solvable_by_its_recorded_solution() -> None:
    task = CountdownTask(seed=0)
    for ex in task.load("train") + task.load("test"):
        assert len(ex["numbers"]) in (3, 4)
        assert all(1 <= n <= 99 for n in ex["numbers"])
        assert isinstance(ex["target"], int) and ex["target"] > 0
        assert Counter(numbers_in(ex["solution"])) == Counter(ex["numbers"])
        assert safe_eval(ex["solution"]) == ex["target"]
        assert task.reward(done(ex["solution"]), ex) == pytest.approx(1.1)


def test_generate_respects_exclusions() -> None:
    first = generate("s", 50)
    again = generate("s", 50, {(*sorted(e["numbers"]), "=", e["target"]) for e in first})
    assert not {(tuple(e["numbers"]), e["target"]) for e in first} & {
        (tuple(e["numbers"]), e["target"]) for e in again
    }


# --- TRL adapter ----------------------------------------------------------------------


def test_as_reward_func_gives_trl_style_rewards(monkeypatch) -> None:
    monkeypatch.delenv("ESFT_DATA_DIR", raising=False)
    func = as_reward_func(get_task("countdown"))
    rewards = func(
        prompts=["p1", "p2", "p3"],
        completions=[done(GOOD), [{"role": "assistant", "content": done("1")}], ""],
        numbers=[[44, 19, 35]] * 3,
        target=[98, 98, 98],
    )
    assert rewards == pytest.approx([1.1, 0.1, 0.0])
    assert func.__name__ == "countdown_reward"
