"""Countdown: combine the given numbers with + - * / to hit a target.

The reward reproduces the ES fine-tuning papers' rule so scores are comparable across
systems: `0.1 * format_score + answer_score`. The rule is stated with regular
expressions; here it is computed with `str.find` scans that give the same result in
linear time, because a backtracking regex over megabytes of hostile output is quadratic.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from esft.tasks.arith import MAX_EXPR_LEN, numbers_in, safe_eval
from esft.tasks.base import BaseTask, Example, Message

PREFILL = "Let me solve this step by step.\n<think>"
DATA_FILE = Path("countdown") / "countdown.json"
N_TRAIN = 200
N_TEST = 2000
TOLERANCE = 1e-5

_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
_ANSWER_OPEN, _ANSWER_CLOSE = "<answer>", "</answer>"
_FORMAT_JOIN = _THINK_CLOSE + "\n" + _ANSWER_OPEN
_ALLOWED = re.compile(r"[0-9+\-*/() ]+")

SYSTEM_PROMPT = (
    "You are a methodical puzzle solver. Think the problem through before you commit "
    "to an answer, and keep the final answer free of commentary."
)
USER_TEMPLATE = (
    "Numbers: {numbers}\nTarget: {target}\n\n"
    "Write an arithmetic expression that equals the target. Every listed number must "
    "appear exactly once; you may use +, -, *, / and parentheses, and nothing else. "
    "Do your working inside <think></think>, then give only the expression inside "
    "<answer></answer>, for instance <answer>(7 + 5) * 2</answer>."
)


def format_score(completion: str) -> float:
    """1.0 for `<think>…</think>\\n<answer>…</answer>` exactly, else partial credit.

    Same result as `re.match(r"^<think>.*?</think>\\n<answer>.*?</answer>$", s, re.DOTALL)`
    on `s = "<think>" + completion` (the prefill opens the think block), then 0.1 for a
    `<think>…</think>` block plus 0.5 for an `<answer>…</answer>` block.
    """
    s = _THINK_OPEN + completion
    start = len(_THINK_OPEN)
    # `$` without MULTILINE matches at the very end or just before one final newline.
    body = s[:-1] if s.endswith("\n") else s
    if body.endswith(_ANSWER_CLOSE):
        close_at = len(body) - len(_ANSWER_CLOSE)
        join_at = s.find(_FORMAT_JOIN, start)
        if join_at != -1 and join_at + len(_FORMAT_JOIN) <= close_at:
            return 1.0
    score = 0.0
    if s.find(_THINK_CLOSE, start) != -1:
        score += 0.1
    open_at = s.find(_ANSWER_OPEN)
    if open_at != -1 and s.find(_ANSWER_CLOSE, open_at + len(_ANSWER_OPEN)) != -1:
        score += 0.5
    return score


def last_answer(completion: str) -> str | None:
    """Content of the last `<answer>(.*?)</answer>` match (DOTALL, findall order), or None."""
    found = None
    pos = 0
    while True:
        open_at = completion.find(_ANSWER_OPEN, pos)
        if open_at == -1:
            return found
        content_at = open_at + len(_ANSWER_OPEN)
        close_at = completion.find(_ANSWER_CLOSE, content_at)
        if close_at == -1:
            return found
        found = completion[content_at:close_at]
        pos = close_at + len(_ANSWER_CLOSE)


def answer_score(completion: str, numbers: list[int], target: float) -> float:
    """1.0 iff the last answer uses exactly `numbers` and evaluates to `target` (±1e-5)."""
    content = last_answer(completion)
    if content is None:
        return 0.0
    expr = content.strip()
    if not expr or len(expr) > MAX_EXPR_LEN or not _ALLOWED.fullmatch(expr):
        return 0.0
    if sorted(numbers_in(expr)) != sorted(numbers):
        return 0.0
    value = safe_eval(expr)
    if value is None or abs(value - float(target)) >= TOLERANCE:
        return 0.0
    return 1.0


def _parse_target(raw: Any) -> int | float:
    value = float(raw)
    return int(value) if value.is_integer() else value


def _parse_numbers(raw: Any) -> list[int]:
    # The data pack documents numbers as a string "[44, 19, 35]"; the file holds lists.
    if isinstance(raw, str):
        raw = json.loads(raw)
    return [int(n) for n in raw]


def _combine(a: int, b: int, rng: random.Random) -> tuple[int, str] | None:
    """A random op on (a, b) whose result is a positive integer of modest size."""
    options = [(a + b, "+"), (a * b, "*")]
    if a > b:
        options.append((a - b, "-"))
    if a % b == 0:
        options.append((a // b, "/"))
    options = [(v, op) for v, op in options if v <= 1000]
    return rng.choice(options) if options else None


def _generate_one(rng: random.Random) -> Example:
    numbers = [rng.randint(1, 99) for _ in range(rng.choice((3, 4)))]
    while True:
        pool = [(n, str(n)) for n in numbers]
        rng.shuffle(pool)
        while len(pool) > 1:
            (a, ea), (b, eb) = pool.pop(), pool.pop()
            picked = _combine(a, b, rng)
            if picked is None:
                break
            value, op = picked
            pool.append((value, f"({ea} {op} {eb})"))
        if len(pool) == 1:
            return {"numbers": numbers, "target": pool[0][0], "solution": pool[0][1]}


def generate(seed: str, n: int, exclude: set[tuple[Any, ...]] | None = None) -> list[Example]:
    """`n` distinct solvable problems from a seeded RNG; `exclude` keeps splits disjoint.

    Targets are built by combining the numbers with operations whose every intermediate
    is a positive integer, and the expression used is kept as `solution`.
    """
    rng = random.Random(seed)
    seen = set(exclude or ())
    out: list[Example] = []
    while len(out) < n:
        ex = _generate_one(rng)
        key = _key(ex)
        if key in seen:
            continue
        seen.add(key)
        out.append({"id": len(out), **ex})
    return out


def _key(example: Example) -> tuple[Any, ...]:
    return (*sorted(example["numbers"]), "=", example["target"])


class CountdownTask(BaseTask):
    """Countdown with the shared data pack's 200/2000 split, or generated problems.

    Examples: `{"numbers": list[int], "target": int | float}` plus `id` and `solution`
    when known. Non-integer targets in the real file (e.g. 27.4) stay gradable as floats.
    """

    name = "countdown"

    def __init__(
        self,
        data_dir: str | Path | None = None,
        *,
        seed: int = 0,
        prefill: bool = True,
        n_train: int = N_TRAIN,
        n_test: int = N_TEST,
    ) -> None:
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.seed = seed
        self.prefill = PREFILL if prefill else None
        self.n_train = n_train
        self.n_test = n_test

    @classmethod
    def from_options(cls, *, data_dir: str | None = None, seed: int = 0, prefill: bool = True) -> CountdownTask:
        return cls(data_dir, seed=seed, prefill=prefill)

    def load(self, split: str, limit: int | None = None) -> list[Example]:
        if split not in ("train", "test"):
            raise ValueError(f"unknown split {split!r}; countdown has 'train' and 'test'")
        rows = self._from_file(split) if self.data_dir is not None else self._generated(split)
        return rows if limit is None else rows[:limit]

    def _from_file(self, split: str) -> list[Example]:
        assert self.data_dir is not None
        path = self.data_dir / DATA_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"countdown data not found at {path}. Pass --data_dir (or set ESFT_DATA_DIR) "
                "to a folder laid out like the shared data pack (countdown/countdown.json), "
                "or omit it to use generated problems."
            )
        raw = json.loads(path.read_text(encoding="utf-8"))
        chosen = raw[:N_TRAIN] if split == "train" else raw[-N_TEST:]
        out = []
        for row in chosen:
            ex: Example = {
                "numbers": _parse_numbers(row["numbers"]),
                "target": _parse_target(row["target"]),
            }
            for key in ("id", "solution"):
                if row.get(key) is not None:
                    ex[key] = row[key]
            out.append(ex)
        return out

    def _generated(self, split: str) -> list[Example]:
        train = generate(f"countdown-train-{self.seed}", self.n_train)
        if split == "train":
            return train
        return generate(f"countdown-test-{self.seed}", self.n_test, {_key(e) for e in train})

    def messages(self, example: Example) -> list[Message]:
        numbers = ", ".join(str(n) for n in example["numbers"])
        user = USER_TEMPLATE.format(numbers=f"[{numbers}]", target=example["target"])
        msgs: list[Message] = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": user},
        ]
        if self.prefill:
            msgs.append({"role": "assistant", "content": self.prefill})
        return msgs

    def reward(self, completion: str, example: Example) -> float:
        """`0.1 * format_score + answer_score`; 0.0 for anything that is not a string."""
        if not isinstance(completion, str):
            return 0.0
        try:
            numbers, target = example["numbers"], example["target"]
            answer = answer_score(completion, numbers, target)
        except (KeyError, TypeError, ValueError):
            answer = 0.0
        return 0.1 * format_score(completion) + answer

    def is_correct(self, completion: str, example: Example) -> bool:
        if not isinstance(completion, str):
            return False
        try:
            return answer_score(completion, example["numbers"], example["target"]) == 1.0
        except (KeyError, TypeError, ValueError):
            return False
