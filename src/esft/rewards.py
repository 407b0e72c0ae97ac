"""Scoring completions safely, and the TRL reward adapter.

Model output is untrusted and a reward function is user code: a reward must never stop a
run. ES training, evaluation and GRPO (through `as_reward_func`) all score with
`score_completions`, so a misbehaving reward costs the same everywhere: that completion
scores 0 and is counted.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from esft.tasks.base import Example, Task

RewardFunc = Callable[..., list[float]]

log = logging.getLogger(__name__)


@dataclass
class RewardStats:
    """Counts of completions that scored 0 because the reward misbehaved."""

    errors: int = 0
    nonfinite: int = 0
    _seen: set[str] = field(default_factory=set)

    def warn_once(self, kind: str, message: str) -> None:
        if kind not in self._seen:
            self._seen.add(kind)
            log.warning("%s (scored 0; further occurrences are only counted in metrics)", message)


def _clean(value: object, stats: RewardStats) -> float:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        stats.errors += 1
        stats.warn_once("type", f"reward returned a non-number: {value!r}")
        return 0.0
    if not math.isfinite(v):
        stats.nonfinite += 1
        stats.warn_once("nonfinite", f"reward returned {v}")
        return 0.0
    return v


def score_completions(task: Task, completions: list[str], examples: list[Example], stats: RewardStats) -> list[float]:
    """Rewards for a batch; an exception or a NaN/inf scores that completion 0.

    The whole batch is tried first (custom TRL-style functions are batched); if it
    raises, each completion is scored alone so one bad completion costs only itself.
    """
    try:
        values = list(task.rewards(completions, examples))
        if len(values) != len(completions):
            raise ValueError(f"reward returned {len(values)} values for {len(completions)} completions")
        return [_clean(v, stats) for v in values]
    except Exception:
        pass
    out = []
    for completion, example in zip(completions, examples):
        try:
            out.append(_clean(task.reward(completion, example), stats))
        except Exception as e:  # noqa: BLE001 - any failure of user code scores 0
            stats.errors += 1
            stats.warn_once(f"exc:{type(e).__name__}", f"reward raised {type(e).__name__}: {e}")
            out.append(0.0)
    return out


#: Keyword arguments TRL's GRPOTrainer passes to reward functions besides the dataset
#: columns; they are not example fields.
TRL_REWARD_EXTRAS = frozenset({"completion_ids", "trainer_state", "log_extra", "log_metric", "environments"})


def as_reward_func(task: Task) -> RewardFunc:
    """Adapt a task to TRL's signature `f(prompts, completions, **columns) -> list[float]`.

    The dataset columns are the example's fields, so `columns[k][i]` is example i's field k.
    Completions may be strings or TRL's conversational form (a list of messages). Scoring
    is ES training's own (`score_completions`): a reward that raises or returns NaN/inf
    scores that completion 0 instead of stopping the run.
    """
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
