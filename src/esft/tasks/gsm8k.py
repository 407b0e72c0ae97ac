"""GSM8K: grade-school math word problems with a single numeric answer (a target task).

Grading follows the paper's extraction rule so accuracies compare across systems:
only the last 4096 characters are searched (after the last `</think>` if one is there);
the answer text is the last `#### ...`, else the last `\\boxed{...}`, else the last
`<answer>...</answer>`, else the whole region; it is read as a number by dropping
`,` `$` `%`, evaluating an exact fraction `a/b`, or else taking the first number in it.
The 4096-character window also bounds the work done on hostile output.

Examples: `{"question": str, "answer": str}` where `answer` is the gold number (the text
after `#### ` in the source, commas removed).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from esft.tasks.base import Example, Message
from esft.tasks.countdown import last_answer
from esft.tasks.sources import (
    EVAL_CAP,
    SUBSET_SEED,
    BenchmarkTask,
    hub_rows,
    last_nonempty_line,
    local_file,
    read_jsonl,
    seeded_subset,
)

HUB_ID = "openai/gsm8k"
HUB_CONFIG = "main"
FILES = {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"}
N_TRAIN = 200
#: Characters at the end of a completion that are searched for the answer.
WINDOW = 4096
TOLERANCE = 1e-6

_THINK_CLOSE = "</think>"
_BOXED = "\\boxed{"
_HASH_ANSWER = re.compile(r"####\s*(.+)")
_BRACE_TOKEN = re.compile(r"\\boxed\{|[{}]")
_FRACTION = re.compile(r"(-?[0-9]+(?:\.[0-9]+)?)\s*/\s*([0-9]+(?:\.[0-9]+)?)")
_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
_FORMAT_LINE = re.compile(r"#### -?[0-9][0-9,]*(?:\.[0-9]+)?")

SYSTEM_PROMPT = "You are a careful tutor who solves arithmetic word problems one step at a time."
USER_TEMPLATE = (
    "{question}\n\n"
    "Show your working. Then put the final result on its own last line, written as four "
    "hash marks, a space and the number only, e.g.\n#### 17"
)


def search_region(completion: str) -> str:
    """The last `WINDOW` characters, cut to what follows the last `</think>` in them."""
    region = completion[-WINDOW:]
    cut = region.rfind(_THINK_CLOSE)
    return region[cut + len(_THINK_CLOSE) :] if cut != -1 else region


def last_boxed(text: str) -> str | None:
    """Content of the last closed `\\boxed{...}` (braces balanced), or None.

    One pass over brace tokens, so many unclosed `\\boxed{` cost linear time.
    """
    stack: list[int | None] = []  # content start for a \boxed{ brace, None for a plain {
    best: tuple[int, str] | None = None
    for tok in _BRACE_TOKEN.finditer(text):
        if tok.group() == _BOXED:
            stack.append(tok.end())
        elif tok.group() == "{":
            stack.append(None)
        elif stack:
            start = stack.pop()
            if start is not None and (best is None or start > best[0]):
                best = (start, text[start : tok.start()])
    return best[1] if best is not None else None


def answer_text(completion: str) -> str:
    """The piece of the completion the number is read from (see module docstring)."""
    region = search_region(completion)
    hashes = _HASH_ANSWER.findall(region)
    if hashes:
        return hashes[-1]
    boxed = last_boxed(region)
    if boxed is not None:
        return boxed
    tagged = last_answer(region)
    if tagged is not None:
        return tagged
    return region


def parse_number(text: str) -> float | None:
    """Drop `,` `$` `%`; an exact fraction `a/b` is divided out, else the first number.

    Non-finite results (a 5,000-digit literal reads as inf) and `a/0` give None. Only
    ASCII digits count.
    """
    s = text.replace(",", "").replace("$", "").replace("%", "").strip()
    frac = _FRACTION.fullmatch(s)
    if frac is not None:
        num, den = float(frac.group(1)), float(frac.group(2))
        if den == 0:
            return None
        value = num / den
    else:
        m = _NUMBER.search(s)
        if m is None:
            return None
        value = float(m.group())
    return value if math.isfinite(value) else None


def extract_number(completion: str) -> float | None:
    """The graded number of a completion, or None when it has none."""
    return parse_number(answer_text(completion))


def _spell(value: float) -> str:
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def format_score(completion: str) -> float:
    """1.0 when the last non-empty line is exactly `#### <number>` (commas allowed)."""
    return 1.0 if _FORMAT_LINE.fullmatch(last_nonempty_line(completion)) else 0.0


def gold_from_solution(solution: str) -> str:
    """The gold number from a GSM8K solution: the text after the last `#### `, no commas."""
    return solution.rsplit("####", 1)[-1].strip().replace(",", "")


class GSM8KTask(BenchmarkTask):
    """GSM8K with the paper's split: 200 seeded train problems, the test split to evaluate.

    `data_seed` picks the 200 training problems (default 0, the same for every run);
    `n_train` and `n_test` size the splits (the test split has 1,319 problems).
    """

    name = "gsm8k"

    def __init__(
        self,
        data_dir: str | Path | None = None,
        *,
        data_seed: int = SUBSET_SEED,
        n_train: int = N_TRAIN,
        n_test: int = EVAL_CAP,
    ) -> None:
        super().__init__(data_dir)
        self.data_seed = data_seed
        self.n_train = n_train
        self.n_test = n_test

    def _raw(self, split: str, n: int, seed: int) -> list[dict]:
        if self.data_dir is not None:
            path = local_file(self.data_dir, FILES[split], task=self.name, hub_id=HUB_ID)
            return seeded_subset(read_jsonl(path), n, seed)
        return hub_rows(
            HUB_ID,
            split,
            config=HUB_CONFIG,
            task=self.name,
            relpath=FILES[split],
            subset=n,
            seed=seed,
        )

    def _build(self, split: str) -> list[Example]:
        if split == "train":
            rows = self._raw("train", self.n_train, self.data_seed)
        else:
            rows = self._raw("test", self.n_test, SUBSET_SEED)
        return [
            {"question": row["question"], "answer": gold_from_solution(row["answer"])}
            for row in rows
        ]

    def messages(self, example: Example) -> list[Message]:
        return [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": USER_TEMPLATE.format(question=example["question"])},
        ]

    def extract(self, completion: str) -> str | None:
        value = extract_number(completion)
        return None if value is None else _spell(value)

    def gold(self, example: Example) -> str:
        return str(example["answer"])

    def is_correct(self, completion: str, example: Example) -> bool:
        """Within 1e-6 of the gold number; no number means wrong."""
        if not isinstance(completion, str):
            return False
        try:
            value = extract_number(completion)
            gold = parse_number(str(example["answer"]))
        except (KeyError, TypeError, ValueError):
            return False
        return value is not None and gold is not None and abs(value - gold) <= TOLERANCE

    def reward(self, completion: str, example: Example) -> float:
        """`0.1 * format + answer`: 1.1 for a correct answer in the exact format."""
        if not isinstance(completion, str):
            return 0.0
        answer = 1.0 if self.is_correct(completion, example) else 0.0
        return 0.1 * format_score(completion) + answer
