"""ProofWriter: decide whether a statement follows from facts and rules (a target task).

The label is read with the paper's rule, in order:

1. the last line starting `Answer: <word>` anywhere (case-sensitive `Answer:`);
2. else the last non-empty line, if it is, case-insensitively, an optional
   `Final answer` or `Answer`, an optional colon, then one word with optional trailing
   punctuation (`Final answer: unknown!`);
3. else the last whole word true/false/unknown anywhere (any case);
4. else the whole response.

The text picked is canonicalised (trimmed, trailing `.!?,:;` dropped, lowercased) and
must then be true/false/unknown; anything else is wrong. Rules 1-3 look at the last
`SCAN_CHARS` characters only, which holds every realistic answer and bounds the work
on hostile output.

Examples: `{"theory": str, "question": str, "answer": "True" | "False" | "Unknown"}`
plus `id`, `config` and `QDep` (proof depth) when the source has them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from esft.tasks.base import Example, Message
from esft.tasks.sources import (
    SCAN_CHARS,
    SUBSET_SEED,
    BenchmarkTask,
    hub_rows,
    last_match,
    last_nonempty_line,
    local_file,
    read_parquet,
    seeded_subset,
)

HUB_ID = "tasksource/proofwriter"
FILES = {"train": "proofwriter/train.parquet", "test": "proofwriter/test.parquet"}
N_TRAIN = 200
#: The evaluation size of the reference split (the data pack's test file holds 1,000).
N_TEST = 1000
LABELS = {"true": "True", "false": "False", "unknown": "Unknown"}

_ANSWER_LINE = re.compile(r"^[ \t]*Answer:[ \t]*([A-Za-z]+)", re.MULTILINE)
# Written so every whitespace run is consumed by exactly one quantifier: linear time.
_LENIENT_LINE = re.compile(
    r"(?:(?:final\s+answer|answer)\s*)?(?::\s*)?([a-z]+)[.!?,:;]*", re.IGNORECASE
)
_ANY_LABEL = re.compile(r"\b(true|false|unknown)\b", re.IGNORECASE)
_FORMAT_LINES = frozenset(f"Answer: {label}" for label in LABELS.values())

SYSTEM_PROMPT = "You reason strictly from the premises you are given, like a logician."
USER_TEMPLATE = (
    "Premises (facts and rules):\n{theory}\n\n"
    "Statement: {question}\n\n"
    "Using only the premises, classify the statement: True if it can be derived, False if "
    "its negation can be derived, Unknown if neither can. Think it through, then end your "
    "reply with one line in exactly this form and nothing after it:\n"
    "Answer: True\n(or Answer: False, or Answer: Unknown)"
)


def canonical_label(text: str) -> str | None:
    """The label (True/False/Unknown) a picked answer text names, or None."""
    word = text.strip().rstrip(".!?,:;").lower()
    return LABELS.get(word)


def answer_text(completion: str) -> str:
    """The piece of text the label is read from (rules 1-4 of the module docstring)."""
    m = last_match(_ANSWER_LINE, completion)
    if m is not None:
        return m.group(1)
    line = last_nonempty_line(completion[-SCAN_CHARS:])
    lenient = _LENIENT_LINE.fullmatch(line)
    if lenient is not None:
        return lenient.group(1)
    m = last_match(_ANY_LABEL, completion)
    if m is not None:
        return m.group(1)
    return completion


def extract_label(completion: str) -> str | None:
    return canonical_label(answer_text(completion))


def format_score(completion: str) -> float:
    """1.0 when the last non-empty line is exactly `Answer: True|False|Unknown`."""
    return 1.0 if last_nonempty_line(completion) in _FORMAT_LINES else 0.0


def _example(row: dict[str, Any]) -> Example:
    # The data pack nests the fields in `extra_info`; the hub rows carry them directly.
    info = row.get("extra_info") or row
    label = canonical_label(str(info["answer"]))
    if label is None:
        raise ValueError(f"proofwriter row with unexpected answer {info['answer']!r}")
    ex: Example = {"theory": info["theory"], "question": info["question"], "answer": label}
    for key in ("id", "config", "QDep"):
        value = row.get(key, info.get(key))
        if value is not None:
            ex[key] = value
    return ex


class ProofWriterTask(BenchmarkTask):
    """ProofWriter with 200 seeded train examples and up to 1,000 disjoint test ones.

    `data_seed` picks the training examples where more than 200 exist (the data pack's
    train file holds exactly 200, used in file order); the test subset uses a fixed seed.
    """

    name = "proofwriter"

    def __init__(
        self,
        data_dir: str | Path | None = None,
        *,
        data_seed: int = SUBSET_SEED,
        n_train: int = N_TRAIN,
        n_test: int = N_TEST,
    ) -> None:
        super().__init__(data_dir)
        self.data_seed = data_seed
        self.n_train = n_train
        self.n_test = n_test

    def _raw(self, split: str, n: int, seed: int) -> list[dict[str, Any]]:
        if self.data_dir is not None:
            path = local_file(self.data_dir, FILES[split], task=self.name, hub_id=HUB_ID)
            return seeded_subset(read_parquet(path), n, seed)
        return hub_rows(HUB_ID, split, task=self.name, relpath=FILES[split], subset=n, seed=seed)

    def _build(self, split: str) -> list[Example]:
        if split == "train":
            rows = self._raw("train", self.n_train, self.data_seed)
        else:
            rows = self._raw("test", self.n_test, SUBSET_SEED)
        return [_example(row) for row in rows]

    def messages(self, example: Example) -> list[Message]:
        user = USER_TEMPLATE.format(theory=example["theory"], question=example["question"])
        return [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": user},
        ]

    def extract(self, completion: str) -> str | None:
        return extract_label(completion)

    def gold(self, example: Example) -> str:
        return str(example["answer"])

    def _matches(self, extracted: str, example: Example) -> bool:
        return extracted == canonical_label(self.gold(example))

    def reward(self, completion: str, example: Example) -> float:
        """`0.1 * format + answer`: 1.1 for a correct label in the exact format."""
        if not isinstance(completion, str):
            return 0.0
        answer = 1.0 if self.is_correct(completion, example) else 0.0
        return 0.1 * format_score(completion) + answer
