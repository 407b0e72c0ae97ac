"""Prior-task accuracy through lm-evaluation-harness, the protocol the field compares against.

esft's own evaluation (`accuracy.py`) follows the paper (arXiv 2605.30148, App. D.3): the
chat template, greedy answers and exact extraction rules. Researchers report prior-task
accuracy with lm-evaluation-harness instead: each answer choice scored by its
log-likelihood after a plain-text prompt, `acc` and length-normalised `acc_norm` with their
standard errors. This module runs the `lm_eval` package itself (its `HFLM` model wrapper,
its `ConfigurableTask`, its metrics and stderr) on the local data pack: every task is a
harness task config whose documents esft writes from the pack (no hub download), in the
harness's standard zero-shot formulation of that benchmark:

- hellaswag: "<activity label>: <context>" continued by each of the 4 endings;
- piqa: "Question: <goal>\\nAnswer:" continued by each of the 2 solutions;
- arc_challenge: "Question: <question>\\nAnswer:" continued by each option's text;
- mmlu_pro: as ARC with up to 10 options (the harness's own MMLU-Pro task is generative
  5-shot chain of thought; this is its multiple-choice log-likelihood form, zero-shot).

Rows go to `harness.jsonl` beside `forgetting.jsonl`, one per (iteration, task) with `acc`,
`acc_norm`, their stderrs, the per-example `correct` (of acc_norm) and the setting, so that
`esft report` can show this protocol's changes with the same paired intervals.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from esft.io import append_jsonl, read_jsonl, write_text_atomic

log = logging.getLogger(__name__)

HARNESS_FILE = "harness.jsonl"
PROTOCOL = "lm-eval"
LM_EVAL_MISSING = "esft eval --harness lm-eval needs lm-evaluation-harness: pip install lm-eval"


def _clean_hellaswag(text: str) -> str:
    """WikiHow rows carry bracketed markup ("[title]", "[step]"): the standard formulation drops it."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(ex: dict[str, Any]) -> dict[str, Any]:
    label = ex.get("activity_label", "")
    query = _clean_hellaswag(f"{label}: {ex['context']}" if label else ex["context"])
    return {"query": query, "choices": [_clean_hellaswag(e) for e in ex["endings"]], "gold": int(ex["label"])}


def _piqa(ex: dict[str, Any]) -> dict[str, Any]:
    return {"query": f"Question: {ex['goal']}\nAnswer:", "choices": list(ex["solutions"]), "gold": int(ex["label"])}


def _lettered(ex: dict[str, Any]) -> dict[str, Any]:
    labels = list(ex.get("labels") or "ABCDEFGHIJ"[: len(ex["options"])])
    return {"query": f"Question: {ex['question']}\nAnswer:", "choices": list(ex["options"]),
            "gold": labels.index(ex["answer"])}


#: esft task -> its harness document (query, choices, gold index).
FORMULATIONS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "hellaswag": _hellaswag, "piqa": _piqa, "arc_challenge": _lettered, "mmlu_pro": _lettered,
}


def require_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError as e:
        raise RuntimeError(LM_EVAL_MISSING) from e
    return lm_eval


def harness_tasks(names: Sequence[str]) -> list[str]:
    """The names that have a harness formulation; a ValueError naming the others."""
    unknown = [n for n in names if n not in FORMULATIONS]
    if unknown:
        raise ValueError(f"--harness lm-eval: no harness formulation for {', '.join(unknown)} "
                         f"(available: {', '.join(FORMULATIONS)})")
    return list(names)


def write_documents(name: str, out: Path, limit: int | None, data_dir: str | None) -> Path:
    """The task's evaluation examples (esft's loader: the data pack, else the hub) as harness
    documents in `out/<name>.jsonl`; a missing data file is esft's one-line error naming it."""
    from esft.tasks import get_task

    examples = get_task(name, data_dir=data_dir).load("test", limit=limit)
    if not examples:
        raise ValueError(f"task {name!r} has no evaluation examples")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.jsonl"
    write_text_atomic(path, "".join(json.dumps(FORMULATIONS[name](ex)) + "\n" for ex in examples))
    return path


def task_config(name: str, documents: Path) -> dict[str, Any]:
    """A harness task config over esft's documents: zero-shot multiple choice, acc and acc_norm."""
    return {
        "task": f"esft_{name}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(documents)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{query}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{gold}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "num_fewshot": 0,
        "metadata": {"version": 1.0, "esft_task": name},
    }


def evaluate_model(
    model: Any, tokenizer: Any, names: Sequence[str], limit: int | None = None, batch_size: int = 16,
    data_dir: str | None = None, work_dir: str | Path | None = None,
) -> list[dict[str, Any]]:
    """One result per task: acc, acc_norm, their stderrs, n and the per-example correct."""
    import tempfile

    require_lm_eval()
    import datasets
    from lm_eval import evaluator
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.models.huggingface import HFLM

    datasets.disable_progress_bar()  # one bar per document file otherwise
    names = harness_tasks(names)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        tasks = [ConfigurableTask(config=task_config(n, write_documents(n, Path(tmp), limit, data_dir))) for n in names]
        device = str(next(model.parameters()).device)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
        t0 = time.perf_counter()
        out = evaluator.simple_evaluate(model=lm, tasks=tasks, num_fewshot=0, log_samples=True,
                                        bootstrap_iters=1000, verbosity="WARNING")
        seconds = time.perf_counter() - t0
    import lm_eval

    rows = []
    for name in names:
        key = f"esft_{name}"
        metrics = out["results"][key]
        samples = sorted(out["samples"][key], key=lambda s: s["doc_id"])
        rows.append({
            "task": name, "protocol": PROTOCOL, "lm_eval_version": lm_eval.__version__,
            "acc": metrics["acc,none"], "acc_stderr": metrics["acc_stderr,none"],
            "acc_norm": metrics["acc_norm,none"], "acc_norm_stderr": metrics["acc_norm_stderr,none"],
            "n": len(samples), "correct": [int(s["acc_norm"]) for s in samples],
            "correct_acc": [int(s["acc"]) for s in samples], "seconds": seconds / len(names),
        })
    return rows


def harness_row(iteration: int, result: dict[str, Any], limit: int | None) -> dict[str, Any]:
    """A harness.jsonl line: the result, keyed like forgetting.jsonl rows (accuracy = acc_norm)."""
    return {"iteration": iteration, **result, "accuracy": result["acc_norm"], "limit": limit,
            "max_new_tokens": None, "num_fewshot": 0, "task_version": PROTOCOL}


def evaluate_run(
    run_dir: str | Path, names: Sequence[str], every: int | None = None, iterations: list[int] | None = None,
    limit: int | None = None, batch_size: int = 16, output: str | Path | None = None, data_dir: str | None = None,
    device: str = "auto", progress: bool = True,
) -> list[dict[str, Any]]:
    """Harness accuracy at iterations 0, K, ..., last of a run; resumes from `harness.jsonl`."""
    from esft.evaluation.runs import RunView
    from esft.runlock import writing_into

    names = harness_tasks(names)
    run = RunView.open(run_dir)
    chosen = run.select(iterations, every)
    out = Path(output) if output else Path(run_dir) / "eval"
    with writing_into(run_dir, out, "evaluation", output_is_dir=True):
        out.mkdir(parents=True, exist_ok=True)
        path = out / HARNESS_FILE
        rows = read_jsonl(path, repair=True)

        def pending(k: int) -> list[str]:
            done = {r["task"] for r in rows if r["iteration"] == k and r.get("limit") == limit}
            return [n for n in names if n not in done]

        todo = [k for k in chosen if pending(k)]
        for k, model, tokenizer in tqdm(run.models(todo, device), total=len(todo), desc="iterations",
                                        disable=not progress or not todo):
            for result in evaluate_model(model, tokenizer, pending(k), limit, batch_size, data_dir, work_dir=out):
                row = harness_row(k, result, limit)
                append_jsonl(path, row)
                rows.append(row)
    return [r for r in rows if r["iteration"] in chosen and r["task"] in names and r.get("limit") == limit]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| iteration | task | n | acc | acc_norm |", "|---:|---|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r.get("iteration", 0), r["task"])):
        lines.append(f"| {r.get('iteration', 0)} | {r['task']} | {r['n']} | {100 * r['acc']:.1f} ± {100 * r['acc_stderr']:.1f} | "
                     f"{100 * r['acc_norm']:.1f} ± {100 * r['acc_norm_stderr']:.1f} |")
    return "\n".join(lines)


__all__ = ["FORMULATIONS", "HARNESS_FILE", "evaluate_model", "evaluate_run", "format_table", "harness_row",
           "task_config", "write_documents"]
