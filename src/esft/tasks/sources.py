"""Shared plumbing for the benchmark tasks: where rows come from, and bounded text scans.

Data comes from a local folder laid out like the shared data pack first, the Hugging
Face hub second. An explicit data dir is used alone: a file missing there is an error
that names the expected path, never a silent download of something else. Without a
data dir the hub is tried through `datasets`, imported only then so the package works
without it.

Graders see untrusted model output, so every scan here is bounded (`SCAN_CHARS`) and
linear; see `first_match` and `last_match`.
"""

from __future__ import annotations

import copy
import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from esft.tasks.base import BaseTask, Example

#: Largest evaluation set; bigger splits are cut to a fixed random subset of this size.
EVAL_CAP = 2000
#: Seed of every fixed subset (train and eval), independent of a run's seed, so the
#: same examples are used by every run and every system being compared.
SUBSET_SEED = 0
#: Characters of a completion examined by first-/last-match rules. About 8k tokens:
#: longer than any realistic answer, short enough that hostile megabyte outputs cost
#: microseconds. Rules that look for the first match read the head, "last" rules the tail.
SCAN_CHARS = 32_768

T = TypeVar("T")


class MissingDataError(FileNotFoundError):
    """A task's data is neither in the data dir nor reachable on the hub."""


# --- reading files --------------------------------------------------------------------


def to_native(value: Any) -> Any:
    """numpy arrays/scalars (from `datasets` or pandas) -> plain Python, JSON-like."""
    if isinstance(value, (str, bytes)):
        return value
    if hasattr(value, "tolist"):
        return to_native(value.tolist())
    if isinstance(value, (list, tuple)):
        return [to_native(v) for v in value]
    if isinstance(value, dict):
        return {k: to_native(v) for k, v in value.items()}
    return value


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_parquet(path: Path) -> list[dict[str, Any]]:
    """Rows as plain Python (pyarrow gives lists and dicts directly, unlike pandas)."""
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def read_lines(path: Path) -> list[str]:
    """Non-empty stripped lines (a trailing newline must not add a phantom row)."""
    text = path.read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


# --- locating a task's data -----------------------------------------------------------


def _options_text(task: str, relpath: str, hub_id: str) -> str:
    return (
        f"Pass --data_dir (or set ESFT_DATA_DIR) to a folder laid out like the shared data "
        f"pack, with {task} data at <data_dir>/{relpath}; or leave both unset, install "
        f"`datasets` (pip install 'esft[hub]') and have internet access to load {hub_id} "
        "from the Hugging Face hub."
    )


def local_file(data_dir: Path, relpath: str, *, task: str, hub_id: str) -> Path:
    """`data_dir / relpath`, or a `MissingDataError` that names both ways to get it."""
    path = data_dir / relpath
    if not path.is_file():
        raise MissingDataError(
            f"{task} data not found: expected {path}. {_options_text(task, relpath, hub_id)}"
        )
    return path


def hub_rows(
    hub_id: str,
    split: str,
    *,
    config: str | None = None,
    task: str,
    relpath: str,
    subset: int | None = None,
    seed: int = SUBSET_SEED,
) -> list[dict[str, Any]]:
    """Rows of a hub dataset split; any failure becomes a `MissingDataError`.

    `subset` draws a seeded subset (as `seeded_subset`) before rows are converted, so a
    585k-row split costs only the rows kept.
    """
    try:
        import datasets
    except ImportError as e:
        raise MissingDataError(
            f"{task} data not found: no data dir was given and the `datasets` package is not "
            f"installed. {_options_text(task, relpath, hub_id)}"
        ) from e
    try:
        ds = datasets.load_dataset(hub_id, config, split=split)
    except Exception as e:  # network, auth, missing split: all mean "not available here"
        raise MissingDataError(
            f"{task} data not found: loading {hub_id} ({split}) from the Hugging Face hub "
            f"failed: {e}. {_options_text(task, relpath, hub_id)}"
        ) from e
    if subset is not None and len(ds) > subset:
        ds = ds.select(seeded_subset(range(len(ds)), subset, seed))
    return [to_native(dict(row)) for row in ds]


def seeded_subset(rows: Sequence[T], n: int, seed: int = SUBSET_SEED) -> list[T]:
    """`n` rows drawn with a fixed seed, kept in file order; all rows when there are <= n."""
    if len(rows) <= n:
        return list(rows)
    picked = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in picked]


# --- bounded text scans ---------------------------------------------------------------


def first_match(
    pattern: re.Pattern[str], text: str, limit: int = SCAN_CHARS
) -> re.Match[str] | None:
    """First match lying in `text[:limit]`.

    A match that touches the cut is re-judged against the full text, so a cut through
    "12" cannot turn it into a standalone "1". That re-judgement is unbounded, so pass
    patterns with short matches (single characters) or an already-cut `text`.
    """
    m = pattern.search(text, 0, limit)
    if m is not None and m.end() >= limit and len(text) > limit:
        m = pattern.match(text, m.start())
    return m


def last_match(
    pattern: re.Pattern[str], text: str, limit: int = SCAN_CHARS
) -> re.Match[str] | None:
    """Last match starting in the final `limit` characters (anchors see the real context)."""
    found = None
    for m in pattern.finditer(text, max(0, len(text) - limit)):
        found = m
    return found


def last_nonempty_line(text: str) -> str:
    """The last line with non-whitespace content, stripped ("" when there is none)."""
    body = text.rstrip()
    return body[body.rfind("\n") + 1 :].strip()


# --- the common task shape ------------------------------------------------------------


class BenchmarkTask(BaseTask):
    """What every benchmark task shares: data dir, cached splits, safe grading.

    Subclasses implement `_build(split)`, `messages`, `extract`, `gold` and `_matches`.
    Prior tasks (reward 1.0 when correct) keep `reward` as is; target tasks add their
    format bonus by overriding it.
    """

    name = "benchmark"

    def __init__(self, data_dir: str | Path | None = None) -> None:
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self._cache: dict[str, list[Example]] = {}

    @classmethod
    def from_options(cls, *, data_dir: str | None = None, seed: int = 0, prefill: bool = True) -> BenchmarkTask:
        # Fixed example subsets (not `seed`), so every run trains and evaluates on the same ones.
        return cls(data_dir)

    def load(self, split: str, limit: int | None = None) -> list[Example]:
        if split not in ("train", "test"):
            raise ValueError(f"unknown split {split!r}; {self.name} has 'train' and 'test'")
        if split not in self._cache:
            self._cache[split] = self._build(split)
        rows = self._cache[split]
        # Copies, so a caller editing an example cannot change what the next load returns.
        return copy.deepcopy(rows if limit is None else rows[:limit])

    def _build(self, split: str) -> list[Example]:
        raise NotImplementedError

    def extract(self, completion: str) -> str | None:
        """The answer the grading rules read from `completion` (for sample logs)."""
        raise NotImplementedError

    def gold(self, example: Example) -> str:
        """The correct answer, spelled as the model is asked to give it."""
        raise NotImplementedError

    def strict_format(self, completion: str) -> bool | None:
        """Whether the output is exactly the requested answer; None where not measured."""
        return None

    def _matches(self, extracted: str, example: Example) -> bool:
        return extracted == self.gold(example)

    def is_correct(self, completion: str, example: Example) -> bool:
        if not isinstance(completion, str):
            return False
        try:
            got = self.extract(completion)
            return got is not None and self._matches(got, example)
        except (KeyError, TypeError, ValueError, IndexError):
            return False

    def reward(self, completion: str, example: Example) -> float:
        """1.0 when correct, else 0.0."""
        return 1.0 if self.is_correct(completion, example) else 0.0
