"""Custom `module:function` tasks (TRL reward signature) and the task registry."""

from __future__ import annotations

import json
import math
import re
import sys
from itertools import count
from pathlib import Path

import pandas as pd
import pytest

from esft.tasks import BaseTask, Task, available_tasks, get_task
from esft.tasks.custom import CustomTask, RewardOutputError

_names = count()

REWARDS_SRC = """
CALLS = []

def exact(prompts, completions, **columns):
    CALLS.append({"prompts": prompts, "completions": completions, **columns})
    out = []
    for completion, answer in zip(completions, columns["answer"]):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        out.append(1.0 if text.strip() == answer else 0.0)
    return out

def too_short(prompts, completions, **columns):
    return [1.0]

def not_numbers(prompts, completions, **columns):
    return ["high"] * len(completions)

def odd_values(prompts, completions, **columns):
    return [None, float("nan"), True][: len(completions)]

NOT_A_FUNCTION = 3
"""


@pytest.fixture
def rewards_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh, uniquely named reward module importable from tmp_path."""
    name = f"user_rewards_{next(_names)}"
    (tmp_path / f"{name}.py").write_text(REWARDS_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def jsonl(folder: Path) -> str:
    """The standard two-row dataset as a .jsonl file in `folder`."""
    return write_jsonl(folder / "d.jsonl", STANDARD_ROWS)


STANDARD_ROWS = [
    {"prompt": "2+2?", "answer": "4", "level": 1},
    {"prompt": "3+3?", "answer": "6", "level": 2},
]
CHAT_ROWS = [
    {
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
        ],
        "answer": "4",
    },
    {"prompt": [{"role": "user", "content": "3+3?"}], "answer": "6"},
]


# --- standard and conversational formats --------------------------------------------


def test_standard_format_passes_strings_and_columns(rewards_module, tmp_path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", STANDARD_ROWS)
    task = get_task(f"{rewards_module}:exact", dataset=data)
    assert isinstance(task, Task) and isinstance(task, BaseTask)
    examples = task.load("train")
    assert task.messages(examples[0]) == [{"role": "user", "content": "2+2?"}]
    assert task.rewards(["4", " 7 "], examples) == [1.0, 0.0]

    calls = sys.modules[rewards_module].CALLS
    assert len(calls) == 1  # one call for the whole batch
    assert calls[0] == {
        "prompts": ["2+2?", "3+3?"],
        "completions": ["4", " 7 "],
        "answer": ["4", "6"],
        "level": [1, 2],
    }


def test_conversational_format_uses_messages_and_wraps_completions(
    rewards_module, tmp_path
) -> None:
    data = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    task = get_task(f"{rewards_module}:exact", dataset=data)
    examples = task.load("train")
    assert task.messages(examples[0]) == CHAT_ROWS[0]["prompt"]
    assert task.rewards(["4", "5"], examples) == [1.0, 0.0]
    call = sys.modules[rewards_module].CALLS[-1]
    assert call["completions"] == [
        [{"role": "assistant", "content": "4"}],
        [{"role": "assistant", "content": "5"}],
    ]
    assert call["prompts"] == [r["prompt"] for r in CHAT_ROWS]


def test_reward_and_is_correct_use_the_batch_function(rewards_module, tmp_path) -> None:
    task = get_task(f"{rewards_module}:exact", dataset=jsonl(tmp_path))
    ex = task.load("train")[1]
    assert task.reward("6", ex) == 1.0
    assert task.is_correct("6", ex) and not task.is_correct("5", ex)


# --- splits and file formats --------------------------------------------------------


def test_split_column_selects_train_and_test_rows(rewards_module, tmp_path) -> None:
    rows = [{"prompt": f"q{i}", "answer": "a", "split": s} for i, s in enumerate("ttvte")]
    rows = [{**r, "split": {"t": "train", "v": "test", "e": "test"}[r["split"]]} for r in rows]
    task = get_task(f"{rewards_module}:exact", dataset=write_jsonl(tmp_path / "d.jsonl", rows))
    assert [e["prompt"] for e in task.load("train")] == ["q0", "q1", "q3"]
    assert [e["prompt"] for e in task.load("test")] == ["q2", "q4"]
    assert [e["prompt"] for e in task.load("train", limit=2)] == ["q0", "q1"]


def test_without_split_column_train_and_test_are_all_rows(rewards_module, tmp_path) -> None:
    task = get_task(f"{rewards_module}:exact", dataset=jsonl(tmp_path))
    assert task.load("train") == task.load("test") == STANDARD_ROWS


def test_loads_json_list_csv_and_parquet(rewards_module, tmp_path) -> None:
    spec = f"{rewards_module}:exact"
    (tmp_path / "d.json").write_text(json.dumps(STANDARD_ROWS))
    pd.DataFrame(STANDARD_ROWS).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(CHAT_ROWS).to_parquet(tmp_path / "chat.parquet")
    assert get_task(spec, dataset=str(tmp_path / "d.json")).load("train") == STANDARD_ROWS
    csv_rows = get_task(spec, dataset=str(tmp_path / "d.csv")).load("train")
    assert [r["prompt"] for r in csv_rows] == ["2+2?", "3+3?"]
    parquet = get_task(spec, dataset=str(tmp_path / "chat.parquet"))
    examples = parquet.load("train")
    assert examples == CHAT_ROWS  # numpy arrays from parquet come back as plain lists
    assert parquet.rewards(["4", "6"], examples) == [1.0, 1.0]


def test_json_file_holding_json_lines_is_accepted(rewards_module, tmp_path) -> None:
    data = write_jsonl(tmp_path / "d.json", STANDARD_ROWS)
    assert get_task(f"{rewards_module}:exact", dataset=data).load("train") == STANDARD_ROWS


def test_cwd_module_is_importable(tmp_path, monkeypatch) -> None:
    name = f"cwd_rewards_{next(_names)}"
    (tmp_path / f"{name}.py").write_text("def f(prompts, completions, **kw):\n    return [2.0]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    task = get_task(f"{name}:f", dataset=write_jsonl(tmp_path / "d.jsonl", STANDARD_ROWS[:1]))
    assert task.reward("x", task.load("train")[0]) == 2.0


# --- errors ---------------------------------------------------------------------------


def test_missing_prompt_column_names_found_columns(rewards_module, tmp_path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match=r"prompt.*\['question', 'answer'\]"):
        get_task(f"{rewards_module}:exact", dataset=data)


def test_unimportable_module_is_a_value_error(tmp_path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", STANDARD_ROWS)
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        get_task("no_such_module_xyz:f", dataset=data)


def test_missing_attribute_is_a_value_error(rewards_module, tmp_path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", STANDARD_ROWS)
    with pytest.raises(ValueError, match="no attribute 'nope'"):
        get_task(f"{rewards_module}:nope", dataset=data)


def test_non_callable_attribute_is_a_value_error(rewards_module, tmp_path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", STANDARD_ROWS)
    with pytest.raises(ValueError, match="not callable"):
        get_task(f"{rewards_module}:NOT_A_FUNCTION", dataset=data)


def test_missing_dataset_file_is_a_value_error(rewards_module, tmp_path) -> None:
    with pytest.raises(ValueError, match="not found"):
        get_task(f"{rewards_module}:exact", dataset=str(tmp_path / "absent.jsonl"))


def test_custom_task_without_dataset_says_dataset_is_required(rewards_module) -> None:
    with pytest.raises(ValueError, match="--dataset"):
        get_task(f"{rewards_module}:exact")


def test_hub_id_without_datasets_package_says_to_install_it(rewards_module, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ValueError, match="pip install datasets"):
        get_task(f"{rewards_module}:exact", dataset="someone/some-dataset")


def test_wrong_length_return_is_a_value_error(rewards_module, tmp_path) -> None:
    task = get_task(f"{rewards_module}:too_short", dataset=jsonl(tmp_path))
    with pytest.raises(ValueError, match="list of 2 numbers"):
        task.rewards(["a", "b"], task.load("train"))


def test_wrong_length_message_names_the_function_and_both_counts(rewards_module, tmp_path) -> None:
    task = get_task(f"{rewards_module}:too_short", dataset=jsonl(tmp_path))
    with pytest.raises(RewardOutputError, match=r"reward 'too_short' returned 1 value for 2 completions") as err:
        task.rewards(["a", "b"], task.load("train"))
    assert err.value.kind == "length"


def test_run_function_takes_the_batch_kwargs_and_keeps_none_and_nan_for_the_caller(rewards_module, tmp_path) -> None:
    task = get_task(f"{rewards_module}:odd_values", dataset=jsonl(tmp_path))
    kwargs = task.function_kwargs(["a", "b"], task.load("train"))
    assert kwargs["completions"] == ["a", "b"] and len(kwargs["prompts"]) == 2
    values = task.run_function(0, kwargs)
    assert values[0] is None and math.isnan(values[1])  # None (not applicable) is kept for the caller
    assert task.call_function(0, ["a", "b"], task.load("train"))[0] is None


def test_non_number_return_is_a_value_error(rewards_module, tmp_path) -> None:
    task = get_task(f"{rewards_module}:not_numbers", dataset=jsonl(tmp_path))
    with pytest.raises(ValueError, match="non-number"):
        task.rewards(["a", "b"], task.load("train"))


def test_none_becomes_zero_and_nan_reaches_the_trainer_for_counting(rewards_module, tmp_path) -> None:
    rows = STANDARD_ROWS + [{"prompt": "1?", "answer": "1", "level": 3}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    task = get_task(f"{rewards_module}:odd_values", dataset=data)
    values = task.rewards(["a", "b", "c"], task.load("train"))
    assert values[0] == 0.0 and math.isnan(values[1]) and values[2] == 1.0


def test_custom_task_class_is_exported_and_named_by_spec(rewards_module, tmp_path) -> None:
    task = get_task(f"{rewards_module}:exact", dataset=jsonl(tmp_path))
    assert isinstance(task, CustomTask)
    assert task.name == f"{rewards_module}:exact"


# --- registry -------------------------------------------------------------------------


def test_available_tasks_lists_builtins() -> None:
    assert {"conciseness", "countdown"} <= set(available_tasks())


def test_unknown_task_message_lists_choices_and_custom_form() -> None:
    with pytest.raises(ValueError) as err:
        get_task("gsm9k")
    message = str(err.value)
    assert "'gsm9k'" in message
    assert "countdown" in message and "conciseness" in message
    assert "module:function" in message


def test_builtin_names_ignore_case_and_spaces(monkeypatch) -> None:
    monkeypatch.delenv("ESFT_DATA_DIR", raising=False)
    assert get_task(" Countdown ").name == "countdown"


def test_source_has_no_eval_or_exec() -> None:
    import esft.tasks as pkg

    root = Path(pkg.__file__).parent
    for path in root.glob("*.py"):
        assert not re.search(r"(?<![\w.])(eval|exec)\(", path.read_text()), path


# --- function objects (ESTrainer's reward_funcs= path) --------------------------------


def _length(prompts, completions, **columns):
    return [float(len(c)) for c in completions]


def _matches(prompts, completions, answer, **columns):
    return [1.0 if c == a else 0.0 for c, a in zip(completions, answer, strict=True)]


def test_from_functions_sums_several_rewards_over_a_list_dataset() -> None:
    task = CustomTask.from_functions([_length, _matches], STANDARD_ROWS)
    assert task.name == "_length+_matches"
    assert task.rewards(["4", "xyz"], task.load("train")) == [2.0, 3.0]


def test_from_functions_accepts_a_dataframe() -> None:
    task = CustomTask.from_functions([_matches], pd.DataFrame(CHAT_ROWS[1:]))
    assert task.load("train") == CHAT_ROWS[1:]
    assert task.reward("6", task.load("train")[0]) == 0.0  # conversational: gets a message list


def test_from_functions_rejects_non_callables_and_missing_prompt() -> None:
    with pytest.raises(ValueError, match="callables"):
        CustomTask.from_functions(["not-a-function"], STANDARD_ROWS)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="prompt"):
        CustomTask.from_functions([_length], [{"text": "x"}])
