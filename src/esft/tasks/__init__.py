"""Task registry: one name -> one Task, so the trainer, the CLI and evaluation agree.

Built-in tasks are looked up by name; `module:function` wraps a user's TRL-style
reward function and a dataset (`CustomTask`). Task modules are imported only when
asked for, so naming one task never pays for the others' imports.
"""

from __future__ import annotations

import importlib
import os

from esft.tasks.base import BaseTask, Task

#: Built-in tasks: name -> "module:Class". Data, not code: modules are imported only when
#: their task is asked for, so naming one task never pays for the others' imports.
BUILTIN_TASKS: dict[str, str] = {
    "conciseness": "esft.tasks.conciseness:ConcisenessTask",
    "verbosity": "esft.tasks.styles:VerbosityTask",
    "shouting": "esft.tasks.styles:ShoutingTask",
    "listing": "esft.tasks.styles:ListingTask",
    "countdown": "esft.tasks.countdown:CountdownTask",
    "gsm8k": "esft.tasks.gsm8k:GSM8KTask",
    "proofwriter": "esft.tasks.proofwriter:ProofWriterTask",
    "hellaswag": "esft.tasks.hellaswag:HellaSwagTask",
    "piqa": "esft.tasks.piqa:PIQATask",
    "arc_challenge": "esft.tasks.arc:ARCChallengeTask",
    "mmlu_pro": "esft.tasks.mmlu_pro:MMLUProTask",
}


def available_tasks() -> list[str]:
    """Names `get_task` accepts besides the `module:function` form."""
    return list(BUILTIN_TASKS)


def get_task(
    name: str,
    *,
    data_dir: str | None = None,
    dataset: str | None = None,
    seed: int = 0,
    prefill: bool = True,
) -> Task:
    """Build a task by name.

    `data_dir` (default: env `ESFT_DATA_DIR`) points at a folder laid out like the shared
    data pack; without it countdown generates its problems from `seed` and the benchmark
    tasks (gsm8k, proofwriter, hellaswag, piqa, arc_challenge, mmlu_pro) load from the
    Hugging Face hub. Their example subsets use a fixed seed, not `seed`, so every run
    trains and evaluates on the same examples. `dataset` is the data for a
    `module:function` custom reward. `prefill` adds the task's assistant prefill where it
    has one.
    """
    if data_dir is None:
        data_dir = os.environ.get("ESFT_DATA_DIR") or None
    if ":" in name:
        from esft.tasks.custom import CustomTask

        if not dataset:
            raise ValueError(
                f"custom task {name!r} needs a dataset with a 'prompt' column: pass --dataset "
                "(a .jsonl/.json/.parquet/.csv file or a Hugging Face hub id)"
            )
        return CustomTask(name, dataset)
    target = BUILTIN_TASKS.get(name.strip().lower())
    if target is None:
        raise ValueError(
            f"unknown task {name!r}; available tasks: {', '.join(available_tasks())}, "
            "or 'module:function' for a custom TRL-style reward (with --dataset)"
        )
    module, _, cls_name = target.partition(":")
    cls = getattr(importlib.import_module(module), cls_name)
    return cls.from_options(data_dir=data_dir, seed=seed, prefill=prefill)


__all__ = ["BUILTIN_TASKS", "BaseTask", "Task", "available_tasks", "get_task"]
