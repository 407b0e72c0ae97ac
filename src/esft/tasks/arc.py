"""ARC-Challenge: grade-school science multiple choice (a prior task, name "arc_challenge").

Also home of the letter-choice grading shared with MMLU-Pro (`LetterChoice`), so the
two tasks cannot drift apart. The paper's rule: uppercase the response, then take the
first `ANSWER IS (X)`, else the first `ANSWER IS X`, else the first standalone letter
of the task's range anywhere. Only the first `SCAN_CHARS` characters are read, which
holds every realistic answer and bounds the work on hostile output.

Examples: `{"question": str, "options": list[str], "labels": list[str] (A-E),
"answer": str (a letter)}` plus `id`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from esft.tasks.base import Example, Message
from esft.tasks.sources import (
    EVAL_CAP,
    SCAN_CHARS,
    SUBSET_SEED,
    BenchmarkTask,
    first_match,
    hub_rows,
    local_file,
    read_parquet,
    seeded_subset,
)

HUB_ID = "allenai/ai2_arc"
HUB_CONFIG = "ARC-Challenge"
FILES = {"test": "arc_challenge/test.parquet", "validation": "arc_challenge/validation.parquet"}
LETTERS = "ABCDE"

SYSTEM_PROMPT = "You are a knowledgeable and careful science teacher."
USER_TEMPLATE = (
    "{question}\n\n{choices}\n\n"
    "Reason briefly if it helps, then finish with the sentence "
    '"The answer is (X)", where X is the letter of the correct option.'
)


class LetterChoice:
    """Letter extraction for one range of option letters (e.g. "ABCDE" or "ABCDEFGHIJ")."""

    def __init__(self, letters: str) -> None:
        self.letters = letters
        span = f"[{re.escape(letters)}]"
        self._paren = re.compile(rf"ANSWER IS\s*\(({span})\)")
        self._bare = re.compile(rf"ANSWER IS\s+({span})")
        self._alone = re.compile(rf"\b({span})\b")

    def extract(self, completion: str) -> str | None:
        """The chosen letter under the rule in the module docstring, or None."""
        upper = completion[: SCAN_CHARS + 1].upper()
        limit = min(len(upper), SCAN_CHARS)
        for pattern in (self._paren, self._bare, self._alone):
            m = first_match(pattern, upper, limit)
            if m is not None:
                return m.group(1)
        return None


def format_choices(options: list[str], labels: list[str]) -> str:
    return "\n".join(f"({label}) {option}" for label, option in zip(labels, options))


def _example(row: dict[str, Any]) -> Example:
    """A data-pack row, or a hub row (`choices` dict, `answerKey`, labels maybe "1".."5")."""
    if "choices" in row:
        options, labels = list(row["choices"]["text"]), list(row["choices"]["label"])
        answer, qid = row["answerKey"], row.get("id")
    else:
        options, labels = list(row["options"]), list(row["option_labels"])
        answer, qid = row["answer"], row.get("question_id")
    # A few ARC questions number their options; the answer format asks for letters.
    to_letter = {str(i + 1): LETTERS[i] for i in range(len(LETTERS))}
    labels = [to_letter.get(str(label), str(label)) for label in labels]
    ex: Example = {
        "question": row["question"],
        "options": [str(o) for o in options],
        "labels": labels,
        "answer": to_letter.get(str(answer), str(answer)),
    }
    if qid is not None:
        ex["id"] = qid
    return ex


class ARCChallengeTask(BenchmarkTask):
    """ARC-Challenge: test (1,172 questions) to evaluate, validation (299) to train."""

    name = "arc_challenge"
    choice = LetterChoice(LETTERS)

    def __init__(self, data_dir: str | Path | None = None, *, n_eval: int = EVAL_CAP) -> None:
        super().__init__(data_dir)
        self.n_eval = n_eval

    def _build(self, split: str) -> list[Example]:
        source = "test" if split == "test" else "validation"
        if self.data_dir is not None:
            path = local_file(self.data_dir, FILES[source], task=self.name, hub_id=HUB_ID)
            rows = read_parquet(path)
        else:
            rows = hub_rows(
                HUB_ID, source, config=HUB_CONFIG, task=self.name, relpath=FILES[source]
            )
        examples = [_example(row) for row in rows]
        return seeded_subset(examples, self.n_eval, SUBSET_SEED) if split == "test" else examples

    def messages(self, example: Example) -> list[Message]:
        choices = format_choices(example["options"], example["labels"])
        user = USER_TEMPLATE.format(question=example["question"], choices=choices)
        return [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": user},
        ]

    def extract(self, completion: str) -> str | None:
        return self.choice.extract(completion)

    def gold(self, example: Example) -> str:
        return str(example["answer"]).strip().upper()
