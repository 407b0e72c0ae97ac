"""User rewards in TRL's signature, so reward code written for GRPO runs under ES unchanged.

`get_task("mypkg.rewards:my_func", dataset=...)` imports `my_func` and pairs it with a
dataset that has a `prompt` column. As in TRL, a string prompt is the standard format
(completions reach the function as strings) and a list of chat messages is the
conversational format (completions reach it as `[{"role": "assistant", ...}]`).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from esft.io import read_text
from esft.tasks.base import BaseTask, Example, Message
from esft.tasks.sources import to_native

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def load_reward_func(spec: str) -> Callable[..., Any]:
    """Import `module:function` (the function part may be dotted, e.g. `Class.method`).

    The current directory is made importable so a `rewards.py` next to the user works
    even when `esft` runs from a console script, where it is not on `sys.path`.
    """
    module_name, sep, attr_path = spec.rpartition(":")
    if not sep or not module_name or not attr_path:
        raise ValueError(f"custom reward must look like 'module:function', got {spec!r}")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(
            f"cannot import module {module_name!r} for custom reward {spec!r}: {e}. "
            "Put it on PYTHONPATH or in the current directory."
        ) from e
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            where = getattr(module, "__file__", module_name)
            raise ValueError(f"{spec!r}: {where} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{spec!r} is not callable (it is a {type(obj).__name__})")
    return obj


def read_json_rows(path: Path) -> list[Any]:
    """Rows of a `.json` list or of JSON lines (a `.json` file may hold lines too); a bad
    line is an error naming it."""
    text = read_text(path, "dataset")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # a .json file holding JSON lines
        if isinstance(data, list):
            return data
        if isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON list of objects, got an object")
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {number} is not valid JSON ({e.msg} at column {e.colno})") from None
    return rows


def _read_local(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = read_json_rows(path)
    elif suffix in (".parquet", ".csv"):
        import pandas as pd

        frame = pd.read_parquet(path) if suffix == ".parquet" else pd.read_csv(path)
        rows = frame.to_dict(orient="records")
    else:
        raise ValueError(f"unsupported dataset file {path}; use one of {LOCAL_SUFFIXES}")
    if not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: every row must be a JSON object")
    return [{str(k): to_native(v) for k, v in r.items()} for r in rows]


def _read_hub(dataset_id: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError as e:
        raise ValueError(
            f"{dataset_id!r} is not a local file, so it is read as a Hugging Face hub id, "
            "which needs the `datasets` package: pip install datasets"
        ) from e
    try:
        ds = datasets.load_dataset(dataset_id, split="train")
    except Exception as e:  # the hub raises many types; all mean "cannot use this id"
        raise ValueError(
            f"dataset {dataset_id!r} is not a local file and could not be loaded from the "
            f"Hugging Face hub: {e}"
        ) from e
    return [to_native(dict(row)) for row in ds]


def load_rows(dataset: str) -> list[dict[str, Any]]:
    """Rows of a local .jsonl/.json/.parquet/.csv file, else of a hub dataset's train split."""
    path = Path(dataset).expanduser()
    if path.is_file():
        return _read_local(path)
    if path.suffix.lower() in LOCAL_SUFFIXES or path.exists():
        raise ValueError(f"dataset file not found (or not a file): {path}")
    return _read_hub(dataset)


def _is_conversational(prompt: Any) -> bool:
    return isinstance(prompt, list)


def rows_of(dataset: Any) -> list[dict[str, Any]]:
    """Rows from a path/hub id, a pandas DataFrame, or any iterable of dicts (e.g. `datasets`)."""
    if isinstance(dataset, (str, os.PathLike)):
        return load_rows(str(dataset))
    if hasattr(dataset, "to_dict") and hasattr(dataset, "columns"):  # pandas DataFrame
        dataset = dataset.to_dict(orient="records")
    rows = []
    for i, row in enumerate(dataset):
        if not isinstance(row, Mapping):
            raise ValueError(
                f"dataset row {i} is a {type(row).__name__} ({row!r:.60}), not a mapping of columns: "
                "pass rows like {'prompt': 'Describe the sea.'}"
            )
        rows.append({str(k): to_native(v) for k, v in row.items()})
    return rows


class CustomTask(BaseTask):
    """TRL-style reward function(s) plus a dataset with a `prompt` column.

    Examples are the dataset rows. Each function is called once per batch as
    `func(prompts=[...], completions=[...], **columns)` with every column but `prompt`;
    with several functions the rewards are summed, as TRL does with unit weights. Each
    function has a name (`func_names`: its `__name__`, made unique) for its own metrics,
    `rewards/<name>/mean|std`. The task holds no limits: callers that must bound user
    code run `run_function` through `esft.rewards.RewardGuard` (a worker process).
    """

    def __init__(self, spec: str, dataset: str) -> None:
        self._setup(spec, [load_reward_func(spec)], load_rows(dataset), repr(dataset))

    @classmethod
    def from_functions(
        cls, funcs: Sequence[Callable[..., Any]], dataset: Any, name: str | None = None
    ) -> CustomTask:
        """Build from function objects (the ESTrainer `reward_funcs=` path) and any dataset."""
        funcs = list(funcs)
        if not funcs or not all(callable(f) for f in funcs):
            raise ValueError("reward_funcs must be one or more callables")
        task = cls.__new__(cls)
        label = name or "+".join(getattr(f, "__name__", "reward") for f in funcs)
        task._setup(label, funcs, rows_of(dataset), "the train dataset")
        return task

    def _setup(
        self, name: str, funcs: list[Callable[..., Any]], rows: list[dict[str, Any]], source: str
    ) -> None:
        self.name = name
        self.prefill = None
        self.version = None  # user code: no version to compare
        self.funcs = funcs
        # Names for metrics (rewards/<name>/mean) and messages, unique within the task.
        self.func_names = unique_names(funcs)
        self._rows = rows
        if not rows:
            raise ValueError(f"dataset {source} has no rows")
        columns: dict[str, None] = {}
        for row in rows:
            columns.update(dict.fromkeys(row))
        self.columns = list(columns)
        if "prompt" not in columns:
            raise ValueError(
                f"dataset {source} needs a 'prompt' column; found columns: {self.columns}"
            )

    def load(self, split: str, limit: int | None = None) -> list[Example]:
        """Train: all rows (or split=="train"). Test: split=="test" rows, else all rows."""
        if split not in ("train", "test"):
            raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")
        rows = self._rows
        if "split" in self.columns:
            rows = [r for r in rows if r.get("split") == split]
        rows = [dict(r) for r in rows]
        return rows if limit is None else rows[:limit]

    def messages(self, example: Example) -> list[Message]:
        prompt = example["prompt"]
        if _is_conversational(prompt):
            return [dict(m) for m in prompt]
        return [{"role": "user", "content": str(prompt)}]

    def rewards(self, completions: list[str], examples: list[Example]) -> list[float]:
        """One call per function for the whole batch, summed; None counts as 0.0.

        NaN/inf pass through so the trainer can count them before zeroing them. A function
        that raises, or returns anything but one number per completion, raises here;
        training scores through `esft.rewards.score_completions` instead, which isolates
        each function and runs every call in a worker process under the reward limits.
        """
        total = [0.0] * len(completions)
        for index in range(len(self.funcs)):
            values = self.call_function(index, completions, examples)
            total = [t + (0.0 if v is None else v) for t, v in zip(total, values, strict=True)]
        return total

    def function_kwargs(self, completions: list[str], examples: list[Example]) -> dict[str, Any]:
        """The keyword arguments of one batched call, TRL's way: `prompts`, `completions`
        (chat-shaped for conversational prompts) and every other column as a list."""
        if len(completions) != len(examples):
            raise ValueError("completions and examples must have the same length")
        prompts = [e.get("prompt") for e in examples]
        shaped: list[Any] = [
            [{"role": "assistant", "content": c}] if _is_conversational(p) else c
            for c, p in zip(completions, prompts, strict=True)
        ]
        columns = {col: [e.get(col) for e in examples] for col in self.columns if col != "prompt"}
        return {"prompts": prompts, "completions": shaped, **columns}

    def run_function(self, index: int, kwargs: dict[str, Any]) -> list[float | None]:
        """Call function `index` with `kwargs` and check what it returned: one value per
        completion, None where it said "not applicable" (TRL), NaN/inf as returned. Raises
        `RewardOutputError` for anything but one number per completion, and whatever the
        function itself raises. This is the user code: `esft.rewards.RewardGuard` runs it
        in a worker process, under a time and a memory limit."""
        out = self.funcs[index](**kwargs)
        return _check_output(self.func_names[index], out, len(kwargs["completions"]))

    def call_function(self, index: int, completions: list[str], examples: list[Example]) -> list[float | None]:
        """One batched call of function `index` in this process (no limits)."""
        return self.run_function(index, self.function_kwargs(completions, examples))

    def reward(self, completion: str, example: Example) -> float:
        return self.rewards([completion], [example])[0]


class RewardOutputError(ValueError):
    """A reward function returned something other than one number per completion.

    A systematic bug of the function, not of one completion: scoring zeroes the whole
    call instead of retrying completion by completion.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # "length" or "type"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _check_output(name: str, out: Any, n: int) -> list[float | None]:
    want = f"it must return a list of {n} numbers, one per completion"
    if isinstance(out, (str, bytes)) or not hasattr(out, "__len__"):
        raise RewardOutputError(
            "type", f"reward {name!r} returned a {type(out).__name__}, not a list ({want}): {out!r:.200}"
        )
    if len(out) != n:
        raise RewardOutputError(
            "length",
            f"reward {name!r} returned {_plural(len(out), 'value')} for {_plural(n, 'completion')} "
            f"({want}): {out!r:.200}",
        )
    values: list[float | None] = []
    for v in to_native(list(out)):
        if v is None:  # TRL's "not applicable to this sample"
            values.append(None)
        elif isinstance(v, (int, float)):  # bools count as 0/1, as in Python
            values.append(float(v))
        else:
            raise RewardOutputError("type", f"reward {name!r} returned a non-number: {v!r:.100} ({want})")
    return values


def unique_names(funcs: Sequence[Callable[..., Any]]) -> list[str]:
    """Each function's `__name__`, with `_2`, `_3`, ... added where two share one."""
    names: list[str] = []
    for f in funcs:
        base = getattr(f, "__name__", None) or type(f).__name__
        name, k = base, 1
        while name in names:
            k += 1
            name = f"{base}_{k}"
        names.append(name)
    return names
