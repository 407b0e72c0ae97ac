"""MMLU-Pro: ten-option multiple choice across 14 subjects (a prior task).

Graded like ARC-Challenge with letters A-J (`arc.LetterChoice`). The evaluation set is
a fixed 2,000-question random subset of the 12,032-question test split, the same for
every run. Worked examples (`num_fewshot`, default 0; the reference used 5) are chat
turns taken from the validation split, same category only, never from the test split.

Examples: `{"question": str, "options": list[str] (up to 10), "answer": str (A-J),
"category": str}` plus `id`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from esft.tasks.arc import LetterChoice, format_choices
from esft.tasks.base import Example, Message
from esft.tasks.sources import (
    EVAL_CAP,
    SUBSET_SEED,
    BenchmarkTask,
    hub_rows,
    local_file,
    read_parquet,
    seeded_subset,
)

HUB_ID = "TIGER-Lab/MMLU-Pro"
FILES = {"test": "mmlu_pro/test.parquet", "validation": "mmlu_pro/validation.parquet"}
LETTERS = "ABCDEFGHIJ"
_PADDING = frozenset({"", "N/A"})

SYSTEM_PROMPT = "You are an expert across academic and professional subjects."
USER_TEMPLATE = (
    "Subject: {category}\n\n{question}\n\n{choices}\n\n"
    "Work through it step by step, then finish with the sentence "
    '"The answer is (X)", where X is the letter of the correct option.'
)


def _example(row: dict[str, Any]) -> Example:
    """Convert a row; "N/A" padding options are dropped and the answer letter re-aimed."""
    options = [str(o) for o in row["options"]]
    old_answer = LETTERS.index(str(row["answer"]).strip().upper())
    keep = [i for i, o in enumerate(options) if o.strip() not in _PADDING or i == old_answer]
    ex: Example = {
        "question": row["question"],
        "options": [options[i] for i in keep],
        "answer": LETTERS[keep.index(old_answer)],
        "category": str(row["category"]),
    }
    if row.get("question_id") is not None:
        ex["id"] = row["question_id"]
    if row.get("cot_content"):
        ex["cot_content"] = str(row["cot_content"])
    return ex


def worked_answer(shot: Example) -> str:
    """The assistant turn of a worked example: its reasoning, ending in our answer format."""
    text = str(shot.get("cot_content") or "").strip()
    if text.startswith("A:"):
        text = text[2:].strip()
    closing = f"The answer is ({shot['answer']})."
    if not text:
        return closing
    return text if "answer is (" in text else f"{text}\n{closing}"


class MMLUProTask(BenchmarkTask):
    """MMLU-Pro: 2,000 fixed test questions to evaluate, the 70 validation ones to train.

    `num_fewshot` worked examples (at most 5 per category exist) precede each question.
    """

    name = "mmlu_pro"
    choice = LetterChoice(LETTERS)

    def __init__(
        self,
        data_dir: str | Path | None = None,
        *,
        num_fewshot: int = 0,
        n_eval: int = EVAL_CAP,
    ) -> None:
        super().__init__(data_dir)
        if num_fewshot < 0:
            raise ValueError(f"num_fewshot must be >= 0, got {num_fewshot}")
        self.num_fewshot = num_fewshot
        self.n_eval = n_eval
        self._validation: list[Example] | None = None

    def _source(self, source: str, subset: int | None = None) -> list[Example]:
        if self.data_dir is not None:
            path = local_file(self.data_dir, FILES[source], task=self.name, hub_id=HUB_ID)
            rows = read_parquet(path)
            if subset is not None:
                rows = seeded_subset(rows, subset, SUBSET_SEED)
        else:
            rows = hub_rows(HUB_ID, source, task=self.name, relpath=FILES[source], subset=subset)
        return [_example(row) for row in rows]

    def _build(self, split: str) -> list[Example]:
        if split == "test":
            return self._source("test", self.n_eval)
        return list(self.validation_rows())

    def validation_rows(self) -> list[Example]:
        """The validation split, the only source of worked examples."""
        if self._validation is None:
            self._validation = self._source("validation")
        return self._validation

    def fewshot(self, example: Example) -> list[Example]:
        """The first `num_fewshot` validation examples of the same category (not itself)."""
        if self.num_fewshot == 0:
            return []
        same = [
            shot
            for shot in self.validation_rows()
            if shot["category"] == example["category"]
            and (shot.get("id") is None or shot.get("id") != example.get("id"))
        ]
        return same[: self.num_fewshot]

    def _user(self, example: Example) -> str:
        labels = list(LETTERS[: len(example["options"])])
        return USER_TEMPLATE.format(
            category=example.get("category", "general"),
            question=example["question"],
            choices=format_choices(example["options"], labels),
        )

    def messages(self, example: Example) -> list[Message]:
        msgs: list[Message] = [{"role": "system", "content": SYSTEM_PROMPT}]
        for shot in self.fewshot(example):
            msgs.append({"role": "user", "content": self._user(shot)})
            msgs.append({"role": "assistant", "content": worked_answer(shot)})
        msgs.append({"role": "user", "content": self._user(example)})
        return msgs

    def extract(self, completion: str) -> str | None:
        return self.choice.extract(completion)

    def gold(self, example: Example) -> str:
        return str(example["answer"]).strip().upper()
