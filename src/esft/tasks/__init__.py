"""Task registry: one name -> one Task, so the trainer, the CLI and evaluation agree.

Built-in tasks are looked up by name; `module:function` wraps a user's TRL-style
reward function and a dataset (`CustomTask`). Task modules are imported only when
asked for, so naming one task never pays for the others' imports.
"""

from __future__ import annotations

import os

from esft.tasks.base import BaseTask, Task, as_reward_func

_BUILTINS = (
    "conciseness",
    "countdown",
    "gsm8k",
    "proofwriter",
    "hellaswag",
    "piqa",
    "arc_challenge",
    "mmlu_pro",
)


def available_tasks() -> list[str]:
    """Names `get_task` accepts besides the `module:function` form."""
    return list(_BUILTINS)


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
    key = name.strip().lower()
    if key == "countdown":
        from esft.tasks.countdown import CountdownTask

        return CountdownTask(data_dir, seed=seed, prefill=prefill)
    if key == "conciseness":
        from esft.tasks.conciseness import ConcisenessTask

        return ConcisenessTask()
    if key == "gsm8k":
        from esft.tasks.gsm8k import GSM8KTask

        return GSM8KTask(data_dir)
    if key == "proofwriter":
        from esft.tasks.proofwriter import ProofWriterTask

        return ProofWriterTask(data_dir)
    if key == "hellaswag":
        from esft.tasks.hellaswag import HellaSwagTask

        return HellaSwagTask(data_dir)
    if key == "piqa":
        from esft.tasks.piqa import PIQATask

        return PIQATask(data_dir)
    if key == "arc_challenge":
        from esft.tasks.arc import ARCChallengeTask

        return ARCChallengeTask(data_dir)
    if key == "mmlu_pro":
        from esft.tasks.mmlu_pro import MMLUProTask

        return MMLUProTask(data_dir)
    raise ValueError(
        f"unknown task {name!r}; available tasks: {', '.join(available_tasks())}, "
        "or 'module:function' for a custom TRL-style reward (with --dataset)"
    )


__all__ = ["BaseTask", "Task", "as_reward_func", "available_tasks", "get_task"]
