"""Conciseness (Qiu et al.): short factual questions, rewarded for answering at target length.

The reward only looks at length, which makes it a clean probe of whether ES can move a
behaviour (brevity) without a correctness signal; `is_correct` is reported alongside so
a run that learns to emit two random characters is visible as such.
"""

from __future__ import annotations

import json
from importlib import resources

from esft.tasks.base import BaseTask, Example, Message

DATA_RESOURCE = "data/conciseness.jsonl"


def _read_rows() -> list[dict[str, str]]:
    # importlib.resources rather than a path relative to __file__: works from wheels/zips.
    text = resources.files("esft.tasks").joinpath(DATA_RESOURCE).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class ConcisenessTask(BaseTask):
    """Built-in question/answer pairs (48 train, 128 test, disjoint).

    Examples: `{"prompt": str, "target": str}`. No system prompt and no prefill: the
    model is asked the bare question, as in the original setup.
    """

    name = "conciseness"
    # 2: the test split grew from 24 to 128 questions (the first 24 unchanged), so held-out
    # changes carry intervals about 2.3x narrower; rows of version 1 are never compared with it.
    version = "2"
    primary_metric = "reward"  # exact matches are rare; the length gap is what it measures

    def __init__(self) -> None:
        self.prefill = None

    def load(self, split: str, limit: int | None = None) -> list[Example]:
        if split not in ("train", "test"):
            raise ValueError(f"unknown split {split!r}; conciseness has 'train' and 'test'")
        rows = [
            {"prompt": r["prompt"], "target": r["target"]}
            for r in _read_rows()
            if r["split"] == split
        ]
        return rows if limit is None else rows[:limit]

    def messages(self, example: Example) -> list[Message]:
        return [{"role": "user", "content": example["prompt"]}]

    def reward(self, completion: str, example: Example) -> float:
        """Minus the character-length gap to the target answer.

        The completion is stripped first so a trailing newline or leading space from the
        chat template/decoder does not count against the model.
        """
        if not isinstance(completion, str):
            return -float(len(example["target"]))
        return -float(abs(len(completion.strip()) - len(example["target"])))

    def is_correct(self, completion: str, example: Example) -> bool:
        """Case-insensitive exact match after stripping whitespace."""
        if not isinstance(completion, str):
            return False
        return completion.strip().lower() == str(example["target"]).strip().lower()
