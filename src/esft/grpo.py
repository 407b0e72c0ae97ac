"""GRPO baseline: TRL's `GRPOTrainer` on an esft task, in a run directory esft can evaluate.

The comparison that matters (Schweighofer et al. 2026) is ES against GRPO on the same
model, task and evaluation: forgetting is not specific to ES. So GRPO here is TRL's own
trainer, unchanged; this module only adapts the inputs and the outputs:

- prompts are the task's chat messages rendered exactly as ES renders them (chat
  template + assistant prefill, see `HFEngine.prompt_text`), and the reward is the task's
  `reward` through the TRL adapter (`esft.rewards.as_reward_func`), as in ES training;
- the run directory holds `config.yaml` (`trainer: grpo`, the base `model`, the `task`,
  every GRPOConfig field), `metrics.jsonl` (one line per logged step, TRL's metric names
  plus `iteration` and `reward/mean|std`), HF checkpoints `checkpoint-<step>/` written
  atomically, and `final/`; `esft eval --run`, `esft kl`, `esft drift` and `esft report`
  read it like an ES run (from checkpoints instead of a seed log).

Defaults that differ from TRL's (all overridable by flag, listed in `ESFT_GRPO_DEFAULTS`):
the paper's reference settings for these tasks (lr 1e-6, β = 5e-3 so the KL penalty to
the reference model is on, 8 generations per prompt, temperature 0.7), completions of up
to 1024 tokens as in ES, a log line per step, model-only checkpoints every 50 steps (they
exist for evaluation; `--save_only_model false` keeps optimizer state for resuming), and on
machines without CUDA `use_cpu` with fp32 (no bf16 autocast).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from esft.flags import option
from esft.io import append_jsonl, ensure_writable_dir, read_jsonl, write_text_atomic
from esft.runlock import run_lock

log = logging.getLogger(__name__)

TRL_MISSING = "esft grpo needs TRL: pip install 'esft[grpo]'"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
#: The dataset column holding the task example (JSON): field names never collide with
#: TRL's own columns (`prompt`, `completion`, ...) and any JSON-like example fits Arrow.
EXAMPLE_COLUMN = "esft_example"

#: esft's defaults where they differ from TRL's GRPOConfig (the paper's GRPO settings).
ESFT_GRPO_DEFAULTS: dict[str, Any] = {
    "output_dir": "runs/grpo",
    "learning_rate": 1e-6,
    "beta": 5e-3,
    "num_generations": 8,
    "temperature": 0.7,
    "max_completion_length": 1024,
    "logging_steps": 1,
    "save_steps": 50,
    "save_only_model": True,
    "report_to": "none",
}


def require_trl() -> Any:
    """The `trl` module, or a RuntimeError that says how to install it."""
    try:
        import trl
    except ImportError as e:
        raise RuntimeError(TRL_MISSING) from e
    return trl


@dataclass
class GRPOTaskArgs:
    """esft's options of a GRPO run; every other flag is a field of `trl.GRPOConfig`.

    Parameters that choose the model and the data (as in `esft train`):
        model: "embedded", a hub id or a local HF directory.
        task: a built-in task name or `module:function` (TRL reward signature) with `dataset`.
        dataset: data file or hub id with a `prompt` column, for `module:function` tasks.
        data_dir: folder laid out like the shared data pack (default `$ESFT_DATA_DIR`).
        max_train_samples: use only the first k training examples.
        assistant_prefill: start the answer with the task's prefill (countdown).
        num_threads: torch CPU threads.
        reward_timeout, reward_memory_gb: limits of a `module:function` reward, which runs in
            a worker process as in ES training (`esft.rewards.RewardGuard`).
    """

    model: str = option("'embedded', a hub id or a local HF directory", default="embedded")
    task: str = option("built-in task name or module:function", default="conciseness")
    dataset: str | None = option("jsonl/parquet file or hub id with a 'prompt' column", default=None)
    data_dir: str | None = option("data folder laid out like the shared data pack", default=None)
    max_train_samples: int | None = option("use only the first k training examples", default=None)
    assistant_prefill: bool = option("start the answer with the task's prefill", default=True)
    num_threads: int | None = option("torch CPU threads; unset: torch's choice", default=None)
    reward_timeout: float = option("seconds per call of a module:function reward (0: no limit)", default=60.0)
    reward_memory_gb: float = option("GB a module:function reward's worker process may allocate (0: no limit)",
                                     default=8.0)


# ------------------------------------------------------------------------ arguments
def _parser():
    from trl import GRPOConfig

    from esft.flags import dataclass_parser

    return dataclass_parser(
        (GRPOTaskArgs, GRPOConfig), prog="esft grpo",
        description="GRPO baseline with TRL's GRPOTrainer on an esft task; flags are esft's task options "
        "and GRPOConfig fields (esft's defaults: " + ", ".join(f"{k}={v}" for k, v in ESFT_GRPO_DEFAULTS.items()) + ").",
    )


def _allowed_keys() -> set[str]:
    from trl import GRPOConfig

    from esft.flags import field_names

    return field_names((GRPOTaskArgs, GRPOConfig))


def _grpo_defaults(values: dict[str, Any], use_cpu: bool | None, bf16_given: bool) -> dict[str, Any]:
    """esft's defaults, then `values` (a config file or a sweep's mapping), then the CPU rules.

    Without CUDA a run uses the CPU; there TRL's default bf16 autocast is slow and changes the
    numbers, so CPU runs stay fp32 unless bf16 is asked for.
    """
    import torch

    defaults = {**ESFT_GRPO_DEFAULTS, **values}
    if not torch.cuda.is_available():
        defaults.setdefault("use_cpu", True)
    cpu = use_cpu if use_cpu is not None else bool(defaults.get("use_cpu"))
    if cpu and not bf16_given:
        defaults.setdefault("bf16", False)
    return defaults


def parse_grpo_args(argv: Sequence[str]) -> tuple[GRPOTaskArgs, Any]:
    """(GRPOTaskArgs, trl.GRPOConfig) from `--config file.yaml` (optional) and flags, flags winning."""
    require_trl()
    from transformers.hf_argparser import string_to_bool

    from esft.flags import config_file_values, parse_dataclass_flags

    argv = list(argv)
    # A run directory's config.yaml records `trainer: grpo`; it may be passed back as --config.
    values = config_file_values(argv, _allowed_keys(), ignore=("trainer",))
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--use_cpu", type=string_to_bool, nargs="?", const=True, default=None)
    known, _ = pre.parse_known_args(argv)
    defaults = _grpo_defaults(values, known.use_cpu, any(a.startswith("--bf16") for a in argv))
    run, cfg, _ = parse_dataclass_flags(_parser(), argv, defaults)
    return run, cfg


def grpo_args_from_mapping(values: dict[str, Any]) -> tuple[GRPOTaskArgs, Any]:
    """(GRPOTaskArgs, trl.GRPOConfig) from a mapping of their fields (a sweep's `grpo:` arm).

    Same defaults as the command line; an unknown key is a ValueError naming it.
    """
    require_trl()
    from trl import GRPOConfig

    values = {k: v for k, v in values.items() if k != "trainer"}
    unknown = sorted(set(values) - _allowed_keys())
    if unknown:
        raise ValueError(f"unknown GRPO fields: {', '.join(map(str, unknown))}")
    merged = _grpo_defaults(values, values.get("use_cpu"), "bf16" in values)
    task_keys = {f.name for f in dataclasses.fields(GRPOTaskArgs)}
    run = GRPOTaskArgs(**{k: v for k, v in merged.items() if k in task_keys})
    cfg = GRPOConfig(**{k: v for k, v in merged.items() if k not in task_keys})
    return run, cfg


# -------------------------------------------------------------------- data, reward
def prompt_text(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt ES generates from, as a string TRL tokenizes to the same ids.

    Same rendering as ES (`esft.engine.hf.render_chat`: chat template with the generation
    prompt, then a final assistant message as a prefill to continue). TRL tokenizes string
    prompts with special tokens; where that prepends a BOS the template already holds,
    the template's copy is dropped so the ids are ES's.
    """
    from esft.engine.hf import render_chat

    text = render_chat(tokenizer, messages)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos):
        with_special = tokenizer(text)["input_ids"]
        plain = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(with_special) > len(plain) and with_special[1:] == plain:
            text = text[len(bos):]
    return text


def task_dataset(task: Any, examples: list[dict[str, Any]], tokenizer: Any) -> Any:
    """A `datasets.Dataset` for GRPOTrainer: the rendered `prompt` and the example as JSON."""
    from datasets import Dataset

    rows = []
    for i, ex in enumerate(examples):
        try:
            encoded = json.dumps(ex)
        except TypeError as e:
            raise ValueError(f"training example {i} of task {task.name!r} is not JSON-like: {e}") from None
        rows.append({"prompt": prompt_text(tokenizer, task.messages(ex)), EXAMPLE_COLUMN: encoded})
    return Dataset.from_list(rows)


def task_reward_func(task: Any, guard: Any = None) -> Any:
    """The task's reward in TRL's signature, fed the examples stored in `EXAMPLE_COLUMN`;
    user functions run through `guard` (`esft.rewards.RewardGuard`), as in ES training."""
    from esft.rewards import as_reward_func

    adapter = as_reward_func(task, guard)

    def reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        examples = [json.loads(s) for s in kwargs[EXAMPLE_COLUMN]]
        names = dict.fromkeys(k for ex in examples for k in ex)
        columns = {k: [ex.get(k) for ex in examples] for k in names}
        return adapter(prompts, completions, **columns)

    # TRL names the logged metrics after the function: rewards/<task>_reward/mean.
    reward.__name__ = adapter.__name__
    return reward


# ------------------------------------------------------------------------ callbacks
def _callback_base() -> type:
    from transformers import TrainerCallback

    return TrainerCallback


def metrics_callback(run_dir: Path) -> Any:
    """Append TRL's log of each step to metrics.jsonl, with ES's `iteration` and `reward/*` names."""

    class MetricsToJsonl(_callback_base()):
        def __init__(self) -> None:
            self.last = time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001 - transformers' signature
            self.last = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001 - transformers' signature
            if not logs or "reward" not in logs or not state.is_world_process_zero:
                return
            now = time.perf_counter()
            row: dict[str, Any] = {"iteration": int(state.global_step), "reward/mean": float(logs["reward"])}
            if "reward_std" in logs:
                row["reward/std"] = float(logs["reward_std"])
            # Seconds since the previous logged step (one step at logging_steps=1), as in ES metrics.
            row["time/iteration"] = now - self.last
            self.last = now
            for k, v in logs.items():
                if isinstance(v, (int, float)) and v == v and abs(v) != float("inf"):
                    row.setdefault(k, v)
            append_jsonl(run_dir / METRICS_FILE, row)

    return MetricsToJsonl()


def trainer_class() -> type:
    """GRPOTrainer whose checkpoints appear atomically, as every esft run directory's do.

    transformers writes `checkpoint-<step>/` file by file; a crash midway would leave a
    directory that evaluation (and a resume) trusts. The checkpoint is built under
    `.staging-checkpoint-<step>/` (which nothing lists) and renamed into place.
    """
    from trl import GRPOTrainer

    class AtomicCheckpointGRPOTrainer(GRPOTrainer):
        def _save_checkpoint(self, model, trial):  # noqa: ANN001 - transformers' signature
            if trial is not None or getattr(self, "hp_search_backend", None) is not None:
                return super()._save_checkpoint(model, trial)
            run_dir = Path(self.args.output_dir)
            name = f"checkpoint-{self.state.global_step}"
            staging = run_dir / f".staging-{name}"
            if self.args.should_save and staging.exists():
                shutil.rmtree(staging)
            self.accelerator.wait_for_everyone()
            self._get_output_dir = lambda trial=None: str(staging)
            try:
                super()._save_checkpoint(model, trial)
            finally:
                del self._get_output_dir
            self.accelerator.wait_for_everyone()
            if not self.args.should_save or not (staging / name).is_dir():
                return None
            target = run_dir / name
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging / name, target)
            shutil.rmtree(staging, ignore_errors=True)
            if self.args.save_total_limit:
                from transformers.trainer_utils import rotate_checkpoints

                rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                                   best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
            return None

    return AtomicCheckpointGRPOTrainer


# ------------------------------------------------------------------------ run dir
def run_config(run: GRPOTaskArgs, cfg: Any, task_name: str) -> dict[str, Any]:
    """What config.yaml records: the trainer, the base model and task, then every field."""
    grpo = json.loads(json.dumps(cfg.to_dict(), default=str))
    grpo.pop("model", None)
    return {"trainer": "grpo", **asdict(run), "task": task_name, **grpo}


def _resume_step(resume: Any, run_dir: Path) -> int | None:
    if resume in (None, False, "", "false", "False"):
        return None
    from esft.seedlog import checkpoint_steps

    if resume in (True, "true", "True", "last"):
        steps = checkpoint_steps(run_dir)
        if not steps:
            raise ValueError(f"--resume_from_checkpoint: {run_dir} has no checkpoint-<step>/ to resume from")
        return steps[-1]
    name = Path(str(resume)).name
    k = name.partition("-")[2]
    if not k.isdigit():
        raise ValueError(f"--resume_from_checkpoint {resume!r}: expected a checkpoint-<step> directory or 'last'")
    return int(k)


#: config.yaml keys that may change between a GRPO run and its resume: where and how often it
#: logs and saves, how long it trains, how many threads; none of them changes a step's update.
RESUMABLE_KEYS = frozenset({
    "output_dir", "resume_from_checkpoint", "max_steps", "num_train_epochs", "logging_steps",
    "logging_strategy", "logging_first_step", "logging_dir", "save_steps", "save_strategy", "save_total_limit",
    "report_to", "run_name", "disable_tqdm", "num_threads", "dataloader_num_workers", "push_to_hub",
    "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo", "hub_always_push", "log_level",
    "log_level_replica", "log_on_each_node", "log_completions", "num_completions_to_print",
    "wandb_log_unique_prompts", "eval_steps", "eval_strategy", "reward_timeout", "reward_memory_gb",
})
#: Keys transformers fills from the clock or the machine (logging_dir holds a timestamp).
VOLATILE_KEYS = frozenset({"logging_dir", "run_name"})


def resume_differences(saved: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """Every config.yaml key outside `RESUMABLE_KEYS` whose value differs, as 'key: a != b'
    (a key only one side has counts: a field another TRL version added may change the run)."""
    out = []
    for key in sorted(set(saved) | set(config)):
        if key in RESUMABLE_KEYS:
            continue
        a, b = saved.get(key, "<absent>"), config.get(key, "<absent>")
        if a != b:
            out.append(f"{key}: {a!r} != {b!r}")
    return out


def _prepare_run_dir(run_dir: Path, config: dict[str, Any], resume_step: int | None, is_main: bool) -> None:
    cfg_path = run_dir / CONFIG_FILE
    if resume_step is None:
        if cfg_path.exists():
            raise ValueError(
                f"{run_dir} already holds a run ({CONFIG_FILE} exists); pass --resume_from_checkpoint last "
                "to continue it or choose another --output_dir"
            )
    else:
        saved = yaml.safe_load(cfg_path.read_text()) if cfg_path.exists() else {}
        diffs = resume_differences(saved or {}, config)
        if saved and diffs:
            raise ValueError(
                "--resume_from_checkpoint refused: the config differs from the run's config.yaml in:\n  "
                + "\n  ".join(diffs)
                + f"\n(only {', '.join(sorted(RESUMABLE_KEYS - VOLATILE_KEYS))} may change on a resume)"
            )
    if not is_main:
        return
    write_text_atomic(cfg_path, yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    if resume_step is not None:
        # Steps after the checkpoint will be trained (and logged) again.
        kept = [m for m in read_jsonl(run_dir / METRICS_FILE, repair=True) if m.get("iteration", 0) <= resume_step]
        write_text_atomic(run_dir / METRICS_FILE, "".join(json.dumps(m) + "\n" for m in kept))


# ---------------------------------------------------------------------------- train
def run_grpo(run: GRPOTaskArgs, cfg: Any, callbacks: Sequence[Any] = ()) -> Any:
    """Train with TRL's GRPOTrainer on `run.task`; returns the trainer (its run dir is cfg.output_dir)."""
    require_trl()
    import torch

    from esft.rewards import RewardGuard
    from esft.tasks import get_task

    if run.num_threads:
        torch.set_num_threads(run.num_threads)
    task = get_task(run.task, data_dir=run.data_dir, dataset=run.dataset, seed=cfg.seed, prefill=run.assistant_prefill)
    examples = task.load("train")
    if run.max_train_samples is not None:
        if run.max_train_samples < 1:
            raise ValueError(f"max_train_samples must be >= 1 (got {run.max_train_samples})")
        examples = examples[: run.max_train_samples]
    if not examples:
        raise ValueError(f"task {task.name!r} has no training examples")
    run_dir = ensure_writable_dir(cfg.output_dir)
    # One writer per run; the other ranks of a multi-process run write through the main one.
    lock = run_lock(run_dir, "GRPO training") if cfg.process_index == 0 else contextlib.nullcontext()
    # User rewards run in worker processes forked before TRL loads the model.
    with lock, RewardGuard(run.reward_timeout, memory_gb=run.reward_memory_gb) as guard:
        guard.prepare(task)
        return _train_in(run_dir, run, cfg, task, examples, callbacks, guard)


def _train_in(
    run_dir: Path, run: GRPOTaskArgs, cfg: Any, task: Any, examples: list[Any], callbacks: Sequence[Any], guard: Any,
) -> Any:
    from esft.models import load_tokenizer, resolve_model_path

    resume_step = _resume_step(cfg.resume_from_checkpoint, run_dir)
    config = run_config(run, cfg, task.name)
    _prepare_run_dir(run_dir, config, resume_step, cfg.process_index == 0)

    tokenizer = load_tokenizer(run.model)
    dataset = task_dataset(task, examples, tokenizer)
    trainer = trainer_class()(
        model=resolve_model_path(run.model),
        reward_funcs=task_reward_func(task, guard),
        args=cfg,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[metrics_callback(run_dir), *callbacks],
    )
    resume: Any = None
    if resume_step is not None:
        resume = str(run_dir / f"checkpoint-{resume_step}")
    trainer.train(resume_from_checkpoint=resume)
    save_final(trainer, run_dir / "final")
    return trainer


def save_final(trainer: Any, target: Path) -> None:
    """`final/`, built under a staging name and renamed (every rank saves: ZeRO-3 gathers)."""
    staging = target.parent / f".staging-{target.name}"
    main_process = trainer.args.should_save
    if main_process and staging.exists():
        shutil.rmtree(staging)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))
    trainer.accelerator.wait_for_everyone()
    if not main_process:
        return
    write_text_atomic(staging / "esft_state.json", json.dumps({"iteration": trainer.state.global_step}) + "\n")
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)


def main(argv: list[str]) -> int:
    """`esft grpo`: train, then print where the run is and how to evaluate it."""
    run, cfg = parse_grpo_args(argv)
    trainer = run_grpo(run, cfg)
    rows = [m for m in read_jsonl(Path(cfg.output_dir) / METRICS_FILE) if "reward/mean" in m]
    last = f", final reward mean {rows[-1]['reward/mean']:.4g}" if rows else ""
    print(
        f"done: {trainer.state.global_step} GRPO steps{last}; model in {Path(cfg.output_dir) / 'final'}\n"
        f"evaluate: esft eval --run {cfg.output_dir} --tasks {run.task},... ; esft kl/drift --run {cfg.output_dir}"
    )
    return 0


__all__ = [
    "ESFT_GRPO_DEFAULTS", "GRPOTaskArgs", "TRL_MISSING", "main", "parse_grpo_args", "prompt_text",
    "require_trl", "run_grpo", "task_dataset", "task_reward_func",
]
