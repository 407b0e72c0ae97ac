"""Training callbacks (TRL/transformers-style hooks) and the built-in ones.

The trainer calls `on_train_begin`, `on_iteration_end` and `on_train_end` on each
callback; nothing here imports the trainer, so evaluation and user code can hook into
training without an import cycle.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class TrainerCallback:
    """Hooks into training; override what you need. `trainer` is the running ESTrainer."""

    def on_train_begin(self, trainer: Any) -> None: ...

    def on_iteration_end(self, trainer: Any, metrics: dict[str, Any]) -> None: ...

    def on_train_end(self, trainer: Any) -> None: ...


class EvalCallback(TrainerCallback):
    """Scores the unperturbed weights at iteration 0 and every `every` iterations.

    Rows land in `<output_dir>/eval/forgetting.jsonl`, exactly the rows `esft eval --run`
    writes (`esft.evaluation.accuracy`), so `esft report` reads both alike and a resumed
    run skips what is already there.
    """

    def __init__(self, tasks: list[str], every: int, limit: int | None, max_new_tokens: int,
                 batch_size: int = 32, data_dir: str | None = None) -> None:
        self.task_names = tasks
        self.every = every
        self.limit = limit
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.data_dir = data_dir
        self.tasks: list[Any] = []

    def on_train_begin(self, trainer: Any) -> None:
        from esft.evaluation.accuracy import FORGETTING_FILE, load_tasks

        self.tasks = load_tasks(self.task_names, self.data_dir)
        self.path = trainer.run_dir / "eval" / FORGETTING_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._evaluate(trainer, trainer.iteration)

    def on_iteration_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        k = trainer.iteration
        if k % self.every == 0 or k == trainer.args.max_steps:
            self._evaluate(trainer, k)

    def _evaluate(self, trainer: Any, iteration: int) -> None:
        from esft.evaluation.accuracy import (
            evaluate_model,
            forgetting_row,
            pending_tasks,
            setting_of,
        )
        from esft.io import append_jsonl, read_jsonl

        pending = pending_tasks(read_jsonl(self.path, repair=True), iteration, self.tasks, self.limit, self.max_new_tokens)
        if not pending:
            return
        results = evaluate_model(trainer.model, trainer.tokenizer, pending, self.limit, self.max_new_tokens,
                                 self.batch_size, samples_dir=self.path.parent / "samples" / f"iteration-{iteration}",
                                 progress=False)
        for task, r in zip(pending, results):
            append_jsonl(self.path, forgetting_row(iteration, r, setting_of(task, self.limit, self.max_new_tokens)))
        log.info("eval @ iteration %d: %s", iteration, " ".join(f"{r.task}={r.accuracy:.3f}" for r in results))


__all__ = ["EvalCallback", "TrainerCallback"]
