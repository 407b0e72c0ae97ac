"""The task interface: examples in, chat prompts out, completions scored.

A task never sees weights or tensors (DESIGN.md, separation of concerns). Examples are
plain dicts; each task documents its fields.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

Example = dict[str, Any]
Message = dict[str, str]
RewardFunc = Callable[..., list[float]]


@runtime_checkable
class Task(Protocol):
    """What the trainer and the evaluation need from a task."""

    name: str

    def load(self, split: str, limit: int | None = None) -> list[Example]:
        """Examples of `split` ("train" or "test"), in a fixed order."""
        ...

    def messages(self, example: Example) -> list[Message]:
        """Chat messages for `example`; a final assistant message is a prefill."""
        ...

    def reward(self, completion: str, example: Example) -> float:
        """Training reward of one completion (never raises on model output)."""
        ...

    def is_correct(self, completion: str, example: Example) -> bool:
        """Accuracy under the task's answer-extraction rules."""
        ...


class BaseTask:
    """Defaults shared by the built-in tasks: batched rewards and prefill handling."""

    name: str = "base"
    #: Text the assistant turn starts with; generation continues after it.
    prefill: str | None = None

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


#: Keyword arguments TRL's GRPOTrainer passes to reward functions besides the dataset
#: columns; they are not example fields.
TRL_REWARD_EXTRAS = frozenset({"completion_ids", "trainer_state", "log_extra", "log_metric", "environments"})


def as_reward_func(task: Task) -> RewardFunc:
    """Adapt a task to TRL's signature `f(prompts, completions, **columns) -> list[float]`.

    The dataset columns are the example's fields, so `columns[k][i]` is example i's field k.
    Completions may be strings or TRL's conversational form (a list of messages). Scoring
    is ES training's own (`esft.rewards.score_completions`): a reward that raises or
    returns NaN/inf scores that completion 0 instead of stopping the run.
    """
    from esft.rewards import RewardStats, score_completions

    stats = RewardStats()

    def reward_func(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
        n = len(completions)
        # TRL adds trainer_state, log_metric, ... beside the columns: only per-completion
        # lists can be example fields.
        fields = {
            k: v for k, v in columns.items()
            if k not in TRL_REWARD_EXTRAS and isinstance(v, (list, tuple)) and len(v) == n
        }
        texts = []
        for completion in completions:
            if isinstance(completion, list):
                completion = completion[-1]["content"] if completion else ""
            texts.append(completion)
        examples = [{k: v[i] for k, v in fields.items()} for i in range(n)]
        return score_completions(task, texts, examples, stats)

    reward_func.__name__ = f"{task.name}_reward"
    return reward_func


def finite_or_zero(value: float) -> float:
    """Reward helper: NaN/inf become 0 so one bad score cannot poison the z-scores."""
    return value if math.isfinite(value) else 0.0
