"""Style targets for task sequences: answer at length (`verbosity`), in capitals (`shouting`), as a list (`listing`).

A task sequence needs targets the embedded model can learn in a few ES iterations on 2 CPU
cores, and that pull in different directions, so that learning one can undo another.
Conciseness (answers at the target's length, mostly a few characters) is one; these two
use the same 176 questions (48 train, 128 test, disjoint) with another instruction and
another reward, measured in the same unit, characters, so that a sequence's summaries
average like with like:

- `verbosity`: "… Answer in detail." rewarded by the answer's length in characters (capped
  at `CAP`): the opposite of conciseness;
- `shouting`: "… Answer in capital letters." rewarded by the number of capital letters in
  the answer (capped at `CAP`): a change of form that neither length target asks for;
- `listing`: "… Answer as a list, one item per line." rewarded by the line breaks between
  lines of text: a change of layout. Plain ES did not learn `shouting` here (its reward rose
  on the 8 training prompts, not on the held-out ones: capitals are a choice per word, made
  prompt by prompt); a line break, like the end of an answer, is one token the model is often
  close to choosing anywhere, the kind of decision ES moved for both length targets.

All three are bounded (the text is cut at `SCAN_CHARS` first) and `is_correct` is never true:
they are reward-measured (`primary_metric = "reward"`), like conciseness.
"""

from __future__ import annotations

from esft.tasks.base import BaseTask, Example, Message
from esft.tasks.conciseness import _read_rows

#: The most characters a reward reads (and the most it pays).
CAP = 400
SCAN_CHARS = CAP


class _StyleTask(BaseTask):
    instruction = ""
    version = "1"
    primary_metric = "reward"

    def __init__(self) -> None:
        self.prefill = None

    def load(self, split: str, limit: int | None = None) -> list[Example]:
        if split not in ("train", "test"):
            raise ValueError(f"unknown split {split!r}; {self.name} has 'train' and 'test'")
        rows = [{"prompt": r["prompt"]} for r in _read_rows() if r["split"] == split]
        return rows if limit is None else rows[:limit]

    def messages(self, example: Example) -> list[Message]:
        return [{"role": "user", "content": f"{example['prompt']} {self.instruction}"}]

    def is_correct(self, completion: str, example: Example) -> bool:
        return False  # no right answer: the reward is the measure

    def reward(self, completion: str, example: Example) -> float:
        # One guard and one cut for every style target: a non-string scores 0, and no
        # reward reads past SCAN_CHARS, so hostile output costs bounded work.
        if not isinstance(completion, str):
            return 0.0
        return float(self._score(completion[:SCAN_CHARS]))

    def _score(self, text: str) -> float:
        raise NotImplementedError

    def gold(self, example: Example) -> None:
        return None


class VerbosityTask(_StyleTask):
    """The conciseness questions, asked for detail; reward: the answer's length in characters."""

    name = "verbosity"
    instruction = "Answer in detail."

    def _score(self, text: str) -> float:
        return min(len(text.strip()), CAP)


class ShoutingTask(_StyleTask):
    """The conciseness questions, asked in capitals; reward: the capital letters of the answer."""

    name = "shouting"
    instruction = "Answer in capital letters."

    def _score(self, text: str) -> float:
        return sum(1 for c in text if c.isupper())


class ListingTask(_StyleTask):
    """The conciseness questions, asked as a list; reward: line breaks between lines of text."""

    name = "listing"
    instruction = "Answer as a list, one item per line."

    def _score(self, text: str) -> float:
        lines = [line for line in text.split("\n") if line.strip()]
        return max(len(lines) - 1, 0)


__all__ = ["CAP", "ListingTask", "ShoutingTask", "VerbosityTask"]
