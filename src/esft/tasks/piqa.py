"""PIQA: choose the more sensible of two ways to reach a physical goal (a prior task).

Graded the paper's way: the first standalone `1` or `2` (word boundaries, so "12" or
"x1" do not count) is the choice, correct when it equals label + 1. The strict format
rate (the whole output is exactly 1 or 2, surrounding whitespace aside) is reported
separately. Only the first `SCAN_CHARS` characters are read.

Examples: `{"goal": str, "solutions": [sol1, sol2], "label": 0 | 1}`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from esft.tasks.base import Example, Message
from esft.tasks.sources import (
    EVAL_CAP,
    SUBSET_SEED,
    BenchmarkTask,
    first_match,
    hub_rows,
    local_file,
    read_jsonl,
    read_lines,
    seeded_subset,
)

HUB_ID = "ybisk/piqa"
FILE = "piqa/valid.jsonl"
LABELS_FILE = "piqa/valid-labels.lst"

_CHOICE = re.compile(r"\b[12]\b")
_STRICT = frozenset("12")

SYSTEM_PROMPT = "You have good practical sense about how the physical world works."
USER_TEMPLATE = (
    "Goal: {goal}\n\n"
    "1) {sol1}\n"
    "2) {sol2}\n\n"
    "Which way reaches the goal more sensibly? Reply with 1 or 2 and nothing else."
)


def extract_choice(completion: str) -> str | None:
    """The first standalone 1 or 2 in the output, or None."""
    m = first_match(_CHOICE, completion)
    return m.group() if m is not None else None


def is_strict(completion: str) -> bool:
    """True when the whole output is exactly 1 or 2, surrounding whitespace aside."""
    return completion.strip() in _STRICT


def _example(row: dict[str, Any], label: Any) -> Example:
    return {"goal": row["goal"], "solutions": [row["sol1"], row["sol2"]], "label": int(label)}


class PIQATask(BenchmarkTask):
    """PIQA's 1,838-row validation set (its test labels are not public).

    Both splits are the evaluation rows: PIQA serves to measure forgetting, and
    training on it is only offered so that every task can be trained on.
    """

    name = "piqa"

    def __init__(self, data_dir: str | Path | None = None, *, n_eval: int = EVAL_CAP) -> None:
        super().__init__(data_dir)
        self.n_eval = n_eval

    def _build(self, split: str) -> list[Example]:
        if self.data_dir is not None:
            path = local_file(self.data_dir, FILE, task=self.name, hub_id=HUB_ID)
            labels_path = local_file(self.data_dir, LABELS_FILE, task=self.name, hub_id=HUB_ID)
            rows, labels = read_jsonl(path), read_lines(labels_path)
            if len(rows) != len(labels):
                raise ValueError(
                    f"piqa: {path} has {len(rows)} rows but {labels_path} has {len(labels)} "
                    "labels; the two files must be aligned line by line"
                )
            examples = [_example(row, label) for row, label in zip(rows, labels)]
        else:
            hub = hub_rows(HUB_ID, "validation", task=self.name, relpath=FILE)
            examples = [_example(row, row["label"]) for row in hub]
        return seeded_subset(examples, self.n_eval, SUBSET_SEED)

    def messages(self, example: Example) -> list[Message]:
        sol1, sol2 = example["solutions"]
        user = USER_TEMPLATE.format(goal=example["goal"], sol1=sol1, sol2=sol2)
        return [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": user},
        ]

    def extract(self, completion: str) -> str | None:
        return extract_choice(completion)

    def strict_format(self, completion: str) -> bool | None:
        return is_strict(completion) if isinstance(completion, str) else False

    def gold(self, example: Example) -> str:
        return str(int(example["label"]) + 1)
