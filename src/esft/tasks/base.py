"""The task interface: examples in, chat prompts out, completions scored.

A task never sees weights or tensors (DESIGN.md, separation of concerns). Examples are
plain dicts; each task documents its fields.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

Example = dict[str, Any]
Message = dict[str, str]
RewardFunc = Callable[..., list[float]]


@runtime_checkable
class Task(Protocol):
    """Everything the trainer, the population, evaluation and GRPO call on a task.

    `BaseTask` implements the optional parts (`rewards`, `extract`, `gold`,
    `strict_format`), so a task only writes what it has.
    """

    name: str
    version: str | None  # changes when prompts or grading change (None: unversioned, e.g. custom)
    primary_metric: str  # "accuracy" or "reward"

    def load(self, split: str, limit: int | None = None) -> list[Example]:
        """Examples of `split` ("train" or "test"), in a fixed order."""
        ...

    def messages(self, example: Example) -> list[Message]:
        """Chat messages for `example`; a final assistant message is a prefill."""
        ...

    def reward(self, completion: str, example: Example) -> float:
        """Training reward of one completion (never raises on model output)."""
        ...

    def rewards(self, completions: list[str], examples: list[Example]) -> list[float]:
        """Training rewards of a batch (one call of a TRL-style function for custom tasks)."""
        ...

    def is_correct(self, completion: str, example: Example) -> bool:
        """Accuracy under the task's answer-extraction rules."""
        ...

    def extract(self, completion: str) -> str | None:
        """The answer the grading rules read from `completion`, for sample logs (None: not defined)."""
        ...

    def gold(self, example: Example) -> Any:
        """The correct answer, for sample logs."""
        ...

    def strict_format(self, completion: str) -> bool | None:
        """Whether the output is exactly the requested answer; None where not measured."""
        ...


class BaseTask:
    """Defaults shared by the built-in tasks: batched rewards, prefill, sample-log helpers."""

    name: str = "base"
    #: Text the assistant turn starts with; generation continues after it.
    prefill: str | None = None
    #: Bumped when prompts or grading change, so results of two versions are never compared.
    version: str | None = "1"
    #: What measures the task: "accuracy" (is_correct), or "reward" for tasks whose reward is
    #: the point and exact answers are not (conciseness).
    primary_metric: str = "accuracy"

    @classmethod
    def from_options(cls, *, data_dir: str | None = None, seed: int = 0, prefill: bool = True) -> BaseTask:
        """Build the task from `get_task`'s options; each task takes the ones it uses."""
        return cls()

    def load(self, split: str, limit: int | None = None) -> list[Example]:
        raise NotImplementedError

    def messages(self, example: Example) -> list[Message]:
        raise NotImplementedError

    def reward(self, completion: str, example: Example) -> float:
        raise NotImplementedError

    def is_correct(self, completion: str, example: Example) -> bool:
        return self.reward(completion, example) > 0

    def rewards(self, completions: list[str], examples: list[Example]) -> list[float]:
        """Rewards for a batch; custom tasks override this to call a TRL-style function."""
        return [self.reward(c, e) for c, e in zip(completions, examples)]

    def extract(self, completion: str) -> str | None:
        return None

    def gold(self, example: Example) -> Any:
        return example.get("target", example.get("answer"))

    def strict_format(self, completion: str) -> bool | None:
        return None
