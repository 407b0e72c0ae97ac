"""Task accuracy under the paper's extraction rules: greedy, chat template, batched.

`evaluate_model` scores one model; `evaluate_run` walks a run's iterations (replayed from
the seed log, or read from checkpoints) and appends one line per (iteration, task,
setting) to `forgetting.jsonl`, so an interrupted evaluation resumes where it stopped.
A row's setting is everything that changes its number (`limit`, `max_new_tokens`,
`num_fewshot`, `task_version`): rows are only ever compared with rows of the same setting,
and each row keeps the per-example correctness (`correct`) for paired intervals.
"""

from __future__ import annotations

import json
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from esft.engine import HFEngine
from esft.io import append_jsonl, read_jsonl, write_text_atomic
from esft.tasks.base import Task

if TYPE_CHECKING:
    from esft.rewards import RewardGuard

FORGETTING_FILE = "forgetting.jsonl"


@dataclass
class TaskResult:
    task: str
    accuracy: float
    n: int
    strict_format_rate: float | None
    mean_completion_tokens: float
    seconds: float
    prompts_per_second: float
    tokens_per_second: float
    correct: list[int]  # 1/0 per evaluated example, in example order (paired intervals)
    reward: float  # mean training reward of the completions (the measure of reward-only tasks)
    rewards: list[float]  # per example, in example order


def setting_of(task: Task, limit: int | None, max_new_tokens: int) -> dict[str, Any]:
    """Everything besides the weights that changes a task's accuracy number."""
    return {
        "limit": limit,
        "max_new_tokens": max_new_tokens,
        "num_fewshot": getattr(task, "num_fewshot", None),
        "task_version": getattr(task, "version", None),
    }


def row_key(row: dict[str, Any]) -> tuple[Any, ...]:
    """One forgetting.jsonl row's identity: (iteration, task, setting); a missing key is None."""
    return (row["iteration"], row["task"], row.get("limit"), row.get("max_new_tokens"),
            row.get("num_fewshot"), row.get("task_version"))


def forgetting_row(iteration: int, result: TaskResult, setting: dict[str, Any]) -> dict[str, Any]:
    """The line `esft eval --run` and evaluation during training both append."""
    return {"iteration": iteration, **asdict(result), **setting}


def pending_tasks(rows: list[dict[str, Any]], iteration: int, tasks: Sequence[Task], limit: int | None,
                  max_new_tokens: int) -> list[Task]:
    """The tasks without a row for `iteration` at this setting."""
    done = {row_key(r) for r in rows}
    return [t for t in tasks
            if row_key({"iteration": iteration, "task": t.name, **setting_of(t, limit, max_new_tokens)}) not in done]


def _safe(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), or None if it raises: grading helpers must never stop an evaluation."""
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - a task's helper failing on odd output is that sample's problem
        return None


def evaluate_task(
    engine: HFEngine, task: Task, examples: list[dict], guard: RewardGuard | None = None,
) -> tuple[TaskResult, list[dict]]:
    """Greedy completions for `examples`, scored with the task's `is_correct` (a custom
    task: reward > 0, its functions run through `guard` as in training)."""
    from esft.rewards import RewardStats, score_completions
    from esft.tasks.custom import CustomTask

    conversations = [task.messages(e) for e in examples]
    prompts = engine.encode(conversations)
    t0 = time.perf_counter()
    gens = engine.generate_ids(prompts)
    seconds = time.perf_counter() - t0
    rewards = score_completions(task, [g.text for g in gens], examples, RewardStats(), guard)
    custom = isinstance(task, CustomTask)  # its is_correct would call the user code again, unguarded
    samples = []
    correct = 0
    strict: list[bool] = []
    for conv, ex, g, r in zip(conversations, examples, gens, rewards):
        ok = r > 0 if custom else bool(_safe(task.is_correct, g.text, ex))
        correct += ok
        s = _safe(task.strict_format, g.text)
        if s is not None:
            strict.append(bool(s))
        samples.append({
            "prompt": engine.prompt_text(conv),
            "completion": g.text,
            "extracted": _safe(task.extract, g.text),
            "gold": _safe(task.gold, ex),
            "correct": ok,
            "tokens": g.num_tokens,
        })
    for sample, r in zip(samples, rewards):
        sample["reward"] = r
    n = len(examples)
    tokens = sum(g.num_tokens for g in gens)
    result = TaskResult(
        task=task.name,
        accuracy=correct / n if n else 0.0,
        n=n,
        strict_format_rate=(sum(strict) / len(strict)) if strict else None,
        mean_completion_tokens=tokens / n if n else 0.0,
        seconds=seconds,
        prompts_per_second=n / seconds if seconds else 0.0,
        tokens_per_second=tokens / seconds if seconds else 0.0,
        correct=[int(s["correct"]) for s in samples],
        reward=sum(rewards) / n if n else 0.0,
        rewards=rewards,
    )
    return result, samples


def load_tasks(
    names: Sequence[str], data_dir: str | None = None, num_fewshot: int | None = None, dataset: str | None = None,
) -> list[Any]:
    """Tasks by name; `dataset` is the data of `module:function` custom tasks."""
    from esft.tasks import get_task

    tasks = []
    for name in names:
        task = get_task(name, data_dir=data_dir, dataset=dataset)
        if num_fewshot is not None and hasattr(task, "num_fewshot"):
            task.num_fewshot = num_fewshot
        tasks.append(task)
    return tasks


def evaluate_model(
    model: Any, tokenizer: Any, tasks: Sequence[Any], limit: int | None = None, max_new_tokens: int = 1024,
    batch_size: int = 32, samples_dir: str | Path | None = None, progress: bool = True,
    guard: RewardGuard | None = None,
) -> list[TaskResult]:
    """Accuracy of `model` on each task's evaluation split (first `limit` examples).

    User reward functions (custom tasks) run through `guard`, as in training; without one a
    guard with the default limits is used for this call.
    """
    from esft.rewards import RewardGuard

    if guard is None:
        with RewardGuard.from_config(None) as own:
            return evaluate_model(model, tokenizer, tasks, limit, max_new_tokens, batch_size, samples_dir,
                                  progress, own)
    engine = HFEngine(model, tokenizer, max_new_tokens, batch_size)
    results = []
    for task in tqdm(tasks, desc="eval", disable=not progress or len(tasks) < 2, leave=False):
        examples = task.load("test", limit=limit)
        if not examples:
            raise ValueError(f"task {task.name!r} has no evaluation examples")
        result, samples = evaluate_task(engine, task, examples, guard)
        results.append(result)
        if samples_dir is not None:
            d = Path(samples_dir)
            d.mkdir(parents=True, exist_ok=True)
            write_text_atomic(d / f"{task.name}.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
    return results


def format_results_table(results: Sequence[TaskResult]) -> str:
    lines = ["| task | accuracy | mean reward | n | strict format | mean tokens | seconds | prompts/s | tokens/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        strict = "" if r.strict_format_rate is None else f"{r.strict_format_rate:.3f}"
        lines.append(
            f"| {r.task} | {r.accuracy:.4f} | {r.reward:.4g} | {r.n} | {strict} | {r.mean_completion_tokens:.1f} | "
            f"{r.seconds:.1f} | {r.prompts_per_second:.2f} | {r.tokens_per_second:.1f} |"
        )
    return "\n".join(lines)


def write_results(results: Sequence[TaskResult], output: str | Path, extra: dict[str, Any]) -> Path:
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    payload = {**extra, "tasks": {r.task: asdict(r) for r in results}}
    write_text_atomic(out / "results.json", json.dumps(payload, indent=1))
    return out / "results.json"


# --------------------------------------------------------------------- over a run
def evaluate_run(
    run_dir: str | Path, task_names: Sequence[str], every: int | None = None, iterations: list[int] | None = None,
    limit: int | None = None, max_new_tokens: int = 1024, batch_size: int = 32, output: str | Path | None = None,
    data_dir: str | None = None, device: str = "auto", progress: bool = True, num_fewshot: int | None = None,
    dataset: str | None = None, reward_timeout: float | None = None,
) -> list[dict[str, Any]]:
    """Accuracy at iterations 0, K, 2K, ..., last; resumes from `forgetting.jsonl`.

    A `module:function` task takes `dataset`, or the run's own when the run trained on it;
    its functions run in worker processes (`reward_timeout`: the run's limit by default).
    """
    from esft.evaluation.runs import RunView
    from esft.rewards import RewardGuard
    from esft.runlock import writing_into

    run = RunView.open(run_dir)
    chosen = run.select(iterations, every)
    if dataset is None and run.config.get("task") in task_names:
        dataset = run.config.get("dataset")
    tasks = load_tasks(task_names, data_dir, num_fewshot, dataset)
    out = Path(output) if output else Path(run_dir) / "eval"
    limits = {**run.config, **({"reward_timeout": reward_timeout} if reward_timeout is not None else {})}
    with writing_into(run_dir, out, "evaluation", output_is_dir=True), \
            RewardGuard.from_config(types.SimpleNamespace(**limits)) as guard:
        for task in tasks:
            guard.prepare(task)  # before any model loads
        return _evaluate_run_into(run, out, chosen, tasks, limit, max_new_tokens, batch_size, device, progress, guard)


def _evaluate_run_into(
    run: Any, out: Path, chosen: list[int], tasks: list[Any], limit: int | None, max_new_tokens: int,
    batch_size: int, device: str, progress: bool, guard: RewardGuard,
) -> list[dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    path = out / FORGETTING_FILE
    rows = read_jsonl(path, repair=True)
    todo = [k for k in chosen if pending_tasks(rows, k, tasks, limit, max_new_tokens)]
    for k, model, tokenizer in tqdm(run.models(todo, device), total=len(todo), desc="iterations",
                                    disable=not progress or not todo):
        pending = pending_tasks(rows, k, tasks, limit, max_new_tokens)
        results = evaluate_model(model, tokenizer, pending, limit, max_new_tokens, batch_size,
                                 samples_dir=out / "samples" / f"iteration-{k}", progress=progress, guard=guard)
        for task, r in zip(pending, results):
            row = forgetting_row(k, r, setting_of(task, limit, max_new_tokens))
            append_jsonl(path, row)
            rows.append(row)
    wanted = {row_key({"iteration": k, "task": t.name, **setting_of(t, limit, max_new_tokens)}) for k in chosen for t in tasks}
    return [r for r in rows if row_key(r) in wanted]


def format_forgetting_table(rows: Sequence[dict[str, Any]]) -> str:
    tasks = sorted({r["task"] for r in rows})
    its = sorted({r["iteration"] for r in rows})
    acc = {(r["iteration"], r["task"]): r["accuracy"] for r in rows}
    lines = ["| iteration | " + " | ".join(tasks) + " |", "|---:|" + "---:|" * len(tasks)]
    for k in its:
        cells = [f"{acc[(k, t)]:.4f}" if (k, t) in acc else "" for t in tasks]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
