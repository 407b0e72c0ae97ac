"""Benchmark answer extraction: the paper's rules, their edge cases, and hostile output.

No data files needed: examples are built inline, so these run everywhere.
"""

from __future__ import annotations

import time

import pytest

from esft.tasks.arc import ARCChallengeTask, LetterChoice
from esft.tasks.gsm8k import GSM8KTask, extract_number, last_boxed, parse_number
from esft.tasks.hellaswag import HellaSwagTask
from esft.tasks.mmlu_pro import MMLUProTask
from esft.tasks.piqa import PIQATask
from esft.tasks.proofwriter import ProofWriterTask, extract_label
from esft.tasks.sources import SCAN_CHARS, BenchmarkTask

# --- gsm8k ----------------------------------------------------------------------------

GSM = GSM8KTask()


def gsm(answer: str) -> dict:
    return {"question": "q", "answer": answer}


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("#### 72", 72.0),
        ("First #### 5\nthen corrected:\n#### 7", 7.0),  # the LAST #### wins
        ("#### 4\nand later \\boxed{3}", 4.0),  # #### beats \boxed wherever it is
        ("\\boxed{3} or rather \\boxed{5}", 5.0),  # last \boxed
        ("\\boxed{5} and an unclosed \\boxed{6", 5.0),  # only closed boxes count
        ("\\boxed{{42}}", 42.0),  # braces balance
        ("\\boxed{9} <answer>8</answer>", 9.0),  # \boxed beats <answer>
        ("<answer>1</answer> <answer>8</answer>", 8.0),  # last <answer>
        ("The total is 12 apples and 3 pears", 12.0),  # whole region: first number
        ("#### 1,234", 1234.0),
        ("#### $1,234.50", 1234.5),
        ("#### 25%", 25.0),
        ("#### 3/4", 0.75),  # an exact fraction is evaluated
        ("#### -1/2", -0.5),
        ("#### 3/4 cup", 3.0),  # not an exact fraction: first number
        ("#### -17", -17.0),
        ("####42", 42.0),
        ("#### about 42 dollars", 42.0),
        ("<think>#### 5</think>so it is 7", 7.0),  # only text after </think>
        ("a</think>#### 1</think>#### 2", 2.0),  # after the LAST </think>
        ("<think>#### 5</think>", None),  # nothing after </think>: no number
        ("#### 7\n" + "x" * 5000, None),  # outside the 4096-char window
        ("#### 7 </think>" + "x" * 5000, None),  # </think> outside the window is ignored
        ("x" * 5000 + "</think>#### 9", 9.0),
        ("#### 1/0", None),
        ("#### " + "9" * 5000, None),  # inf is not a number
        ("no digits here", None),
        ("", None),
        ("#### \u0663", None),  # only ASCII digits count
    ],
)
def test_gsm8k_extraction(completion: str, expected: float | None) -> None:
    assert extract_number(completion) == expected


def test_gsm8k_window_keeps_last_4096_chars() -> None:
    # The number sits just inside the window, then just outside it.
    inside = "#### 5" + "x" * (4096 - len("#### 5"))
    assert extract_number("pad " * 100 + inside) == 5.0
    assert extract_number("#### 5" + "x" * 4096) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [("3/4", 0.75), (" 1,000 ", 1000.0), ("$5", 5.0), ("50%", 50.0), ("x", None), ("2.5.1", 2.5)],
)
def test_gsm8k_parse_number(text: str, expected: float | None) -> None:
    assert parse_number(text) == expected


def test_gsm8k_last_boxed_nested() -> None:
    assert last_boxed("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{1} \\boxed{2") == "1"
    assert last_boxed("no box") is None


@pytest.mark.parametrize(
    ("completion", "gold", "correct"),
    [
        ("#### 0.7500001", "0.75", True),  # within 1e-6
        ("#### 0.751", "0.75", False),
        ("#### 3/4", "0.75", True),
        ("#### 1,080", "1080", True),
        ("no number", "5", False),
        ("", "0", False),
    ],
)
def test_gsm8k_is_correct(completion: str, gold: str, correct: bool) -> None:
    assert GSM.is_correct(completion, gsm(gold)) is correct


@pytest.mark.parametrize(
    ("completion", "reward"),
    [
        ("Work.\n#### 72", 1.1),
        ("Work.\n#### 72\n\n", 1.1),  # trailing blank lines are not the last line
        ("#### 72 apples", 1.0),  # correct, not exactly `#### <number>`
        ("#### $72", 1.0),
        ("The answer is 72", 1.0),
        ("Work.\n#### 71", 0.1),  # format only
        ("#### 72\nDone!", 1.0),  # last line is not the answer line
        ("", 0.0),
    ],
)
def test_gsm8k_reward(completion: str, reward: float) -> None:
    assert GSM.reward(completion, gsm("72")) == pytest.approx(reward)


def test_gsm8k_extract_and_gold_are_strings() -> None:
    assert GSM.extract("#### 1,000") == "1000"
    assert GSM.extract("#### 3/4") == "0.75"
    assert GSM.extract("nothing") is None
    assert GSM.gold(gsm("18")) == "18"
    assert GSM.strict_format("#### 1") is None


# --- proofwriter ----------------------------------------------------------------------

PW = ProofWriterTask()


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("Reasoning...\nAnswer: True", "True"),
        ("Answer: True.", "True"),  # trailing punctuation
        ("Answer: false\nmore text", "False"),
        ("Answer: False\nhmm, no\nAnswer: Unknown", "Unknown"),  # LAST Answer: line
        ("Answer: True\nFinal answer: False", "True"),  # rule 1 beats the last line
        ("  Answer:Unknown", "Unknown"),
        ("Answer: Maybe\nit is true", None),  # rule 1 matched a non-label: wrong
        ("I think so.\nFinal answer: unknown!", "Unknown"),  # lenient last line
        ("final answer false", "False"),
        ("reasoning\nTrue", "True"),
        ("reasoning\nanswer - true", "True"),  # lenient fails; last label anywhere
        ("It is true, not false.", "False"),  # fallback: last label anywhere
        ("**Answer: True**", "True"),
        ("TRUE or FALSE? UNKNOWN, I guess", "Unknown"),
        ("The statement is untrue", None),  # whole words only
        ("I cannot decide", None),
        ("", None),
    ],
)
def test_proofwriter_extraction(completion: str, expected: str | None) -> None:
    assert extract_label(completion) == expected
    assert PW.extract(completion) == expected


@pytest.mark.parametrize(
    ("completion", "reward"),
    [
        ("Because...\nAnswer: True", 1.1),
        ("Because...\nAnswer: True\n", 1.1),
        ("Answer: True.", 1.0),  # correct, not the exact format
        ("Answer: true", 1.0),
        ("Because...\nAnswer: False", 0.1),
        ("no idea", 0.0),
    ],
)
def test_proofwriter_reward(completion: str, reward: float) -> None:
    ex = {"theory": "t", "question": "q", "answer": "True"}
    assert PW.reward(completion, ex) == pytest.approx(reward)
    assert PW.gold(ex) == "True"


# --- hellaswag ------------------------------------------------------------------------

HS = HellaSwagTask()


@pytest.mark.parametrize(
    ("completion", "expected", "strict"),
    [
        ("2", "2", True),
        ("  3\n", "3", True),
        ("0", "0", True),
        ("The best ending is 1.", "1", False),
        ("Option 5, no wait, 2", "2", False),  # first char in [0-3], 5 skipped
        ("10", "1", False),  # first character, not a number
        ("22", "2", False),
        ("4", None, False),
        ("\u0662", None, False),  # Arabic-Indic two is not ASCII
        ("", None, False),
    ],
)
def test_hellaswag_extraction(completion: str, expected: str | None, strict: bool) -> None:
    assert HS.extract(completion) == expected
    assert HS.strict_format(completion) is strict


def test_hellaswag_correct_and_reward() -> None:
    ex = {"context": "c", "endings": ["a", "b", "c", "d"], "label": 2}
    assert HS.gold(ex) == "2"
    assert HS.reward("2", ex) == 1.0
    assert HS.reward("I pick 2 because", ex) == 1.0  # lenient accuracy
    assert HS.reward("3", ex) == 0.0


# --- piqa -----------------------------------------------------------------------------

PQ = PIQATask()


@pytest.mark.parametrize(
    ("completion", "expected", "strict"),
    [
        ("1", "1", True),
        (" 2 \n", "2", True),
        ("12 is not an option; 2 is", "2", False),  # "12" holds no standalone 1
        ("21", None, False),
        ("solution1", None, False),
        ("x1 then 2", "2", False),
        ("(1)", "1", False),
        ("Solution 2.", "2", False),
        ("3", None, False),
        ("", None, False),
    ],
)
def test_piqa_extraction(completion: str, expected: str | None, strict: bool) -> None:
    assert PQ.extract(completion) == expected
    assert PQ.strict_format(completion) is strict


def test_piqa_label_plus_one() -> None:
    ex = {"goal": "g", "solutions": ["a", "b"], "label": 0}
    assert PQ.gold(ex) == "1"
    assert PQ.is_correct("1", ex) and not PQ.is_correct("2", ex)
    assert PQ.reward("2", {**ex, "label": 1}) == 1.0
    assert PQ.reward("0", ex) == 0.0


def test_piqa_cut_does_not_create_standalone_digit() -> None:
    # The scan cap falls between "1" and "2": the full text is consulted at the cut.
    text = "y" * (SCAN_CHARS - 2) + " 12"
    assert text[SCAN_CHARS - 1 : SCAN_CHARS + 1] == "12"
    assert PQ.extract(text) is None
    assert PQ.extract(text + " 2") is None  # past the cap: not examined


# --- arc_challenge / mmlu_pro ---------------------------------------------------------

ARC = ARCChallengeTask()
MMLU = MMLUProTask()


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("The answer is (B)", "B"),
        ("the answer is (b).", "B"),  # uppercased first
        ("The answer is (A). Wait, the answer is (C).", "A"),  # FIRST match
        ("So the answer is D", "D"),
        ("The answer is D, or in fact the answer is (B)", "B"),  # (X) form beats bare
        ("I pick C.", "C"),  # standalone letter
        ("A good choice is C", "A"),  # the article counts: first standalone letter
        ("The answer is (E)", "E"),
        ("The answer is (F)", None),  # outside A-E, and no standalone A-E
        ("none", None),
        ("", None),
    ],
)
def test_arc_extraction(completion: str, expected: str | None) -> None:
    assert ARC.extract(completion) == expected


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("The answer is (J)", "J"),
        ("the answer is (f)", "F"),
        ("The answer is G", "G"),
        ("The answer is (K)", None),
        ("Looks like H to me", "H"),
    ],
)
def test_mmlu_pro_extraction(completion: str, expected: str | None) -> None:
    assert MMLU.extract(completion) == expected


def test_letter_choice_is_shared() -> None:
    assert isinstance(ARC.choice, LetterChoice) and isinstance(MMLU.choice, LetterChoice)
    assert ARC.choice.letters == "ABCDE" and MMLU.choice.letters == "ABCDEFGHIJ"


def test_multiple_choice_reward() -> None:
    ex = {"question": "q", "options": ["x", "y", "z"], "labels": ["A", "B", "C"], "answer": "C"}
    assert ARC.reward("The answer is (C)", ex) == 1.0
    assert ARC.reward("The answer is (B)", ex) == 0.0
    assert ARC.gold(ex) == "C"
    assert ARC.strict_format("The answer is (C)") is None
    mm = {"question": "q", "options": list("abcdefghij"), "answer": "J", "category": "law"}
    assert MMLU.reward("The answer is (J)", mm) == 1.0


# --- hostile output -------------------------------------------------------------------

HOSTILE = {
    "huge_number": "9" * 100_000,
    "hash_huge_number": "#### " + "9" * 100_000,
    "fraction_of_huge": "#### " + "9" * 2000 + "/" + "9" * 2000,
    "unclosed_boxed": "\\boxed{" * 50_000,
    "boxed_huge": "\\boxed{" + "9" * 100_000,
    "megabytes": "a" * 5_000_000,
    "spaces": " " * 3_000_000 + "x",
    "newlines": "\n" * 2_000_000,
    "hash_lines": "####\n" * 200_000,
    "think_spam": "</think>" * 200_000,
    "answer_tag_spam": "<answer>" * 200_000,
    "answer_colon_spaces": "Answer:" + " " * 1_000_000 + "!",
    "final_answer_spaces": "final answer" + " " * 1_000_000 + ":",
    "answer_is_spam": "the answer is " * 300_000,
    "digits_12": "12" * 1_000_000,
    "labels_spam": "true " * 500_000,
    "unicode_digits": "\u0663\uff12\u0661" * 100_000,
    "minus_signs": "-" * 1_000_000,
    "empty": "",
}
TASKS: dict[str, BenchmarkTask] = {
    "gsm8k": GSM,
    "proofwriter": PW,
    "hellaswag": HS,
    "piqa": PQ,
    "arc_challenge": ARC,
    "mmlu_pro": MMLU,
}
EXAMPLES = {
    "gsm8k": gsm("9"),
    "proofwriter": {"theory": "t", "question": "q", "answer": "True"},
    "hellaswag": {"context": "c", "endings": ["a", "b", "c", "d"], "label": 1},
    "piqa": {"goal": "g", "solutions": ["a", "b"], "label": 0},
    "arc_challenge": {"question": "q", "options": ["x"], "labels": ["A"], "answer": "A"},
    "mmlu_pro": {"question": "q", "options": ["x"], "answer": "A", "category": "law"},
}


@pytest.mark.parametrize("task_name", list(TASKS))
@pytest.mark.parametrize("hostile", list(HOSTILE))
def test_hostile_completion_never_raises_and_is_fast(task_name: str, hostile: str) -> None:
    task, example, completion = TASKS[task_name], EXAMPLES[task_name], HOSTILE[hostile]
    start = time.perf_counter()
    reward = task.reward(completion, example)
    task.is_correct(completion, example)
    task.extract(completion)
    task.strict_format(completion)
    assert time.perf_counter() - start < 0.5
    assert isinstance(reward, float) and 0.0 <= reward <= 1.1


@pytest.mark.parametrize("task_name", list(TASKS))
def test_non_string_completion_scores_zero(task_name: str) -> None:
    task, example = TASKS[task_name], EXAMPLES[task_name]
    assert task.reward(None, example) == 0.0  # type: ignore[arg-type]
    assert task.is_correct(None, example) is False  # type: ignore[arg-type]


@pytest.mark.parametrize("task_name", list(TASKS))
def test_malformed_example_is_wrong_not_an_error(task_name: str) -> None:
    assert TASKS[task_name].is_correct("The answer is (A)\n#### 1\nAnswer: True\n1", {}) is False
