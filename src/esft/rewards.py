"""Scoring completions safely: model output is untrusted, a reward must never stop a run."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from esft.tasks.base import Example

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


def score_completions(task, completions: list[str], examples: list[Example], stats: RewardStats) -> list[float]:
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
