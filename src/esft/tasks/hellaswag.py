"""HellaSwag: pick the most plausible ending of a short passage (a prior task).

It measures forgetting, so it is graded the paper's way: the first character 0-3
anywhere in the output is the choice (reward 1.0 when it is the label). The strict
format rate (the whole output is one digit 0-3, surrounding whitespace aside) is
reported separately. Only the first `SCAN_CHARS` characters are read, which bounds the
work on hostile output.

Examples: `{"context": str, "endings": list[str] (4), "label": int 0-3}` plus `id` and
`activity_label`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from esft.tasks.base import Example, Message
from esft.tasks.sources import (
    SUBSET_SEED,
    BenchmarkTask,
    first_match,
    hub_rows,
    local_file,
    read_jsonl,
    seeded_subset,
)

HUB_ID = "Rowan/hellaswag"
FILE = "hellaswag/validation_1000.jsonl"
#: The data pack's size; a hub download is cut to the same number of validation rows.
N_EVAL = 1000

_DIGIT = re.compile(r"[0-3]")
_STRICT = frozenset("0123")

SYSTEM_PROMPT = "You have good common sense about everyday situations."
USER_TEMPLATE = (
    "How does this passage most plausibly continue?\n\n"
    "Passage: {context}\n\n"
    "{choices}\n\n"
    "Reply with the number of the best continuation (0, 1, 2 or 3) and nothing else."
)


def extract_choice(completion: str) -> str | None:
    """The first character 0-3 in the output, or None."""
    m = first_match(_DIGIT, completion)
    return m.group() if m is not None else None


def is_strict(completion: str) -> bool:
    """True when the whole output is one digit 0-3, surrounding whitespace aside."""
    return completion.strip() in _STRICT


def _example(row: dict[str, Any]) -> Example:
    ex: Example = {
        "context": row["ctx"],
        "endings": [str(e) for e in row["endings"]],
        "label": int(row["label"]),  # the hub spells labels as strings
    }
    if row.get("ind") is not None:
        ex["id"] = row["ind"]
    if row.get("activity_label"):
        ex["activity_label"] = str(row["activity_label"])  # lm-evaluation-harness's prompt starts with it
    return ex


class HellaSwagTask(BenchmarkTask):
    """HellaSwag's 1,000-row validation subset.

    Both splits are the evaluation rows: HellaSwag serves to measure forgetting, and
    training on it is only offered so that every task can be trained on.
    """

    name = "hellaswag"

    def __init__(self, data_dir: str | Path | None = None, *, n_eval: int = N_EVAL) -> None:
        super().__init__(data_dir)
        self.n_eval = n_eval

    def _build(self, split: str) -> list[Example]:
        if self.data_dir is not None:
            path = local_file(self.data_dir, FILE, task=self.name, hub_id=HUB_ID)
            rows = seeded_subset(read_jsonl(path), self.n_eval, SUBSET_SEED)
        else:
            rows = hub_rows(HUB_ID, "validation", task=self.name, relpath=FILE, subset=self.n_eval)
        return [_example(row) for row in rows]

    def messages(self, example: Example) -> list[Message]:
        choices = "\n".join(f"{i}) {ending}" for i, ending in enumerate(example["endings"]))
        user = USER_TEMPLATE.format(context=example["context"], choices=choices)
        return [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": user},
        ]

    def extract(self, completion: str) -> str | None:
        return extract_choice(completion)

    def strict_format(self, completion: str) -> bool | None:
        return is_strict(completion) if isinstance(completion, str) else False

    def gold(self, example: Example) -> str:
        return str(int(example["label"]))
