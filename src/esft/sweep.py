"""`esft sweep`: many runs from one YAML spec, then evaluation, KL, drift and one report.

    esft sweep SPEC.yaml --output_dir DIR [--dry_run]

The spec has five top-level keys (anything else is an error):

    base: {model: embedded, task: proofwriter, max_steps: 40, population_size: 8}
    variants:                                    # named runs: base + these ESConfig fields
      - {name: es}
      - {name: awd-l2, awd: l2, awd_lambda: 3}
    grid: {awd: [l2], awd_lambda: [1, 3, 10]}    # or a list of such mappings
    grpo: {max_steps: 200}                       # a GRPO arm (GRPOConfig fields, esft's task options)
    eval: {tasks: [proofwriter, piqa], every: 10, limit: 200, kl_tasks: [piqa]}

- `base`: ESConfig fields every ES run shares. `variants`: runs named by `name`, each base plus
  its fields. `grid`: each mapping's value lists multiplied out over base, one run per
  combination; several grids (a list) let ladders differ (L2 λ in 1..10, L1 λ in 0.001..0.01).
- Grid runs are named from their values in the grid's key order, joined by "-": `awd` gives
  its value (`l2`), a few fields a short prefix (`awd_lambda` -> `lambda3`, `population_size`
  -> `pop8`, `learning_rate` -> `lr0.001`, `max_steps` -> `steps40`, `noise_rank` ->
  `rank4`), any other field its own name (`sigma0.001`, `seed7`); a value that is not a
  number follows a "-" (`noise_mode-shared`). So `{awd: [l2], awd_lambda: [1, 3]}` gives
  `l2-lambda1` and `l2-lambda3`. Other characters than [A-Za-z0-9._+-] become "_". Every name
  (variants, grids, `grpo`) must be unique; `report` is taken by the report.
- `grpo`: one GRPO run in `DIR/grpo`. It inherits `model`, `task`, `dataset`, `data_dir`,
  `max_train_samples`, `assistant_prefill`, `num_threads` and `seed` from base where base sets
  them and it does not; never `max_steps` (a GRPO step is not an ES iteration). Defaults on
  top of `esft grpo`'s: `save_only_model: false` (a checkpoint with optimizer state is what a
  killed GRPO run resumes from; it costs ~3x the disk of a model-only one) and `save_steps`
  = eval `every` (else `max_steps`), so that the GRPO run is evaluated at the same steps.
- `eval`: `tasks` (default: the runs' built-in training tasks), `every` K (iterations 0, K,
  2K, ..., last; default: 0 and last), `limit` (default: the whole eval set), `max_new_tokens`
  (1024), `batch_size` (32), `kl_tasks` (default: none, no KL), `kl_prompts` (50),
  `kl_max_tokens` (256), `drift_every` (default: `every`). Drift is always measured.
- The sweep decides `output_dir` (`DIR/<name>`), `resume` and `disable_tqdm` (true: the
  console shows one sweep bar); the spec may not set the first two.

Order: train every run, then per run `evaluate_run` (`RUN/eval/forgetting.jsonl`), `kl_report`
(`RUN/kl.json`, rows carrying `num_prompts`/`max_tokens`), `drift_report` (`RUN/drift.json`),
then `build_report` into `DIR/report/`. The spec is saved as `DIR/sweep.yaml`; each run's
output (progress bars, metric lines, logging) is appended to `DIR/<name>/sweep.log` and the
stage lines to `DIR/sweep.log`.

Resumable: the same command after a crash finishes the work without redoing any. A finished
ES run (`final/` and `max_steps` seed-log records) is skipped, an interrupted one resumes
bitwise from its seed log (a changed config is refused with the differing fields); a GRPO
run resumes from its last checkpoint holding optimizer state; evaluation skips rows already
written; KL and drift compute only the iterations their JSON lacks.

The whole spec is validated before anything runs (no directory, no model): unknown keys,
types and ranges (every run's ESConfig is built up front), names, grids, eval tasks.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import functools
import gc
import itertools
import json
import logging
import math
import re
import sys
import threading
import time
import traceback
import types
import typing
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from esft.config import ESConfig
from esft.evaluation.sharing import borrow_base_rows, borrow_kl_cache
from esft.io import read_jsonl, read_text, write_text_atomic
from esft.runlock import run_lock

TOP_LEVEL_KEYS = ("base", "variants", "grid", "grpo", "eval")
GRPO_NAME = "grpo"
REPORT_DIR = "report"
SPEC_FILE = "sweep.yaml"
LOG_FILE = "sweep.log"
KL_FILE = "kl.json"
DRIFT_FILE = "drift.json"
#: Fields the sweep sets for every run: a value in the spec would be silently overridden.
SWEEP_DECIDES = ("output_dir", "resume")
#: Names that cannot be runs: they are other entries of DIR.
RESERVED_NAMES = frozenset({REPORT_DIR, SPEC_FILE, LOG_FILE})
#: ESConfig fields (besides `seed`) that also are GRPOTaskArgs fields: the GRPO arm inherits them.
GRPO_INHERITS = (
    "model", "task", "dataset", "data_dir", "max_train_samples", "assistant_prefill", "num_threads", "seed",
    "reward_timeout", "reward_memory_gb",
)
#: Short prefixes of derived names; other fields use their own name.
NAME_PREFIX = {
    "awd": "", "awd_lambda": "lambda", "population_size": "pop", "learning_rate": "lr",
    "max_steps": "steps", "noise_rank": "rank",
}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")

# The progress bar's unit is one generated token of one sequence: what a training step, an
# evaluation row or a KL row costs is estimated in it, so one ETA spans unlike stages.
_UNKNOWN_TRAIN_PROMPTS = 200  # the paper's tasks train on 200 examples
_UNKNOWN_EVAL_EXAMPLES = 1000  # the prior tasks' eval sets hold 1000-2000 examples
_REPLAY = 0.025  # replaying an ES iteration regenerates its noise once: DESIGN keeps that < 5% of it
_TEACHER_FORCED = 0.125  # scoring a continuation in one forward pass vs sampling it token by token


# ---------------------------------------------------------------------------- spec
@dataclass(frozen=True)
class EvalSpec:
    """The `eval:` section: what every run is measured on."""

    tasks: tuple[str, ...] = ()
    every: int | None = None
    limit: int | None = None
    # Per-task exceptions to `limit` (null: every example), e.g. the whole held-out split of
    # the training task while the prior tasks keep a cheaper cap.
    limits: tuple[tuple[str, int | None], ...] = ()
    max_new_tokens: int = 1024
    batch_size: int = 32
    kl_tasks: tuple[str, ...] = ()
    kl_prompts: int = 50
    kl_max_tokens: int = 256
    drift_every: int | None = None

    def limit_for(self, task: str) -> int | None:
        return dict(self.limits).get(task, self.limit)

    def task_groups(self) -> list[tuple[int | None, list[str]]]:
        """The tasks grouped by their limit (evaluate_run takes one limit per call), in order."""
        groups: dict[int | None, list[str]] = {}
        for task in self.tasks:
            groups.setdefault(self.limit_for(task), []).append(task)
        return list(groups.items())


@dataclass(frozen=True)
class RunSpec:
    """One run of the sweep: an ES config, or the GRPO arm's field values."""

    name: str
    where: str  # its place in the spec, for messages: "variants[1] ('awd-l2')", "grid[0] ('l2-lambda3')", "grpo"
    changes: dict[str, Any]  # the fields that differ from base (what --dry_run prints)
    config: ESConfig | None = None
    grpo_values: dict[str, Any] | None = None  # grpo_args_from_mapping's input, without output_dir
    grpo_config: Any = field(default=None, repr=False)  # the validated trl.GRPOConfig (its steps and batch sizes size the progress bar)

    @property
    def is_grpo(self) -> bool:
        return self.config is None


@dataclass(frozen=True)
class SweepSpec:
    """A validated spec: the runs in order, the evaluation, and the spec as written."""

    runs: list[RunSpec]
    eval: EvalSpec
    data: dict[str, Any] = field(repr=False)
    data_dir: str | None = None  # base's: every run is evaluated on the same data
    device: str = "auto"  # base's: where evaluation, KL and drift run


def _fail(where: str, message: str) -> ValueError:
    return ValueError(f"sweep spec {where}: {message}" if where else f"sweep spec: {message}")


def _unknown(keys: Sequence[str], known: Sequence[str], what: str) -> str:
    """'unknown ESConfig fields: popsize (did you mean population_size?)'."""
    parts = []
    for k in keys:
        close = difflib.get_close_matches(str(k), list(known), n=1)
        parts.append(f"{k} (did you mean {close[0]}?)" if close else str(k))
    return f"unknown {what}: {', '.join(parts)}"


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a spec file; a YAML error names the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep spec {path}: no such file")
    try:
        data = yaml.safe_load(read_text(path, "sweep spec"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"sweep spec {path}: not valid YAML{where}: {problem}") from None
    return parse_spec(data)


def parse_spec(data: Any) -> SweepSpec:
    """Validate a spec mapping completely, building every run's config; ValueError names the key."""
    if not isinstance(data, Mapping):
        raise _fail("", f"expected a mapping with keys {', '.join(TOP_LEVEL_KEYS)}, got {type(data).__name__}")
    unknown = [k for k in data if k not in TOP_LEVEL_KEYS]
    if unknown:
        raise _fail("", _unknown(unknown, TOP_LEVEL_KEYS, "top-level keys") + f" (allowed: {', '.join(TOP_LEVEL_KEYS)})")
    base = _es_fields(data.get("base"), "base")
    named = _variants(data.get("variants"), base) + _grid_runs(data.get("grid"), base)
    arm = data.get("grpo") if isinstance(data.get("grpo"), Mapping) else {}
    trained = [values.get("task", base.get("task", ESConfig.task)) for _, _, values in named]
    trained += [arm.get("task", base.get("task", ESConfig.task))] if data.get("grpo") is not None else []
    ev = _eval_spec(data.get("eval"), trained, base)
    runs = [_es_run(name, where, values, base) for name, where, values in named]
    if data.get("grpo") is not None:
        runs.append(_grpo_run(data["grpo"], base, ev))
    if not runs:
        raise _fail("", "no runs: give variants, grid or grpo")
    _check_names(runs)
    # As plain YAML types (a Python caller may pass tuples), for DIR/sweep.yaml.
    plain = json.loads(json.dumps(dict(data), default=str))
    return SweepSpec(runs, ev, plain, base.get("data_dir"), base.get("device", "auto"))


# ----------------------------------------------------------------- field values
@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """A YAML value as the field's type, or a ValueError naming the key.

    PyYAML reads `1e-3` as a string (YAML 1.1 wants `1.0e-3`), so numbers in strings are
    accepted where a float is expected, as `esft train --config` accepts them.
    """
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(hint)):
            return None
        if len(args) == 1:
            return _coerce(key, value, args[0])
        if float in args and _as_float(value) is not None and not isinstance(value, bool):
            return _as_float(value)  # `awd_lambda: 1e-1` is the number, `auto` stays the word
        return value  # a real union: the config checks it
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ValueError(f"{key}: expected one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if hint is bool and not isinstance(value, bool):
        raise ValueError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        number = _as_float(value)
        if number is None:
            raise ValueError(f"{key}: expected a number, got {value!r}")
        return number
    if hint is str and not isinstance(value, str):
        raise ValueError(f"{key}: expected a string, got {value!r}")
    return value


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)
    return None


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _fail(where, f"expected a mapping of field: value, got {type(value).__name__}")
    return dict(value)


def _es_fields(value: Any, where: str, extra: Sequence[str] = ()) -> dict[str, Any]:
    """ESConfig field values, type-checked; `extra` keys (a variant's name) pass through."""
    values = _mapping(value, where)
    hints = _hints(ESConfig)
    unknown = [k for k in values if k not in hints and k not in extra]
    if unknown:
        raise _fail(where, _unknown(unknown, list(hints), "ESConfig fields"))
    decided = [k for k in values if k in SWEEP_DECIDES]
    if decided:
        raise _fail(where, f"{', '.join(decided)}: the sweep decides it (each run's output_dir is DIR/<name>)")
    try:
        return {k: v if k in extra else _coerce(k, v, hints[k]) for k, v in values.items()}
    except ValueError as e:
        raise _fail(where, str(e)) from None


# --------------------------------------------------------------------- the runs
def _variants(value: Any, base: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _fail("variants", f"expected a list of mappings with a name, got {type(value).__name__}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise _fail(f"variants[{i}]", f"expected a mapping with a name and fields, got {item!r}")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise _fail(f"variants[{i}]", "name: every variant needs a name (its directory in DIR)")
        where = f"variants[{i}] ({name!r})"
        fields_ = _es_fields(item, where, extra=("name",))
        del fields_["name"]
        _check_lambda(fields_, base, where)
        out.append((name, where, fields_))
    return out


def _grid_runs(value: Any, base: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    if value is None:
        return []
    grids = [value] if isinstance(value, Mapping) else value
    if not isinstance(grids, list):
        raise _fail("grid", f"expected a mapping of field: [values] or a list of them, got {type(value).__name__}")
    if not grids:
        raise _fail("grid", "empty: give at least one field: [values] mapping")
    out = []
    for j, grid in enumerate(grids):
        where = "grid" if isinstance(value, Mapping) else f"grid[{j}]"
        for name, fields_ in expand_grid(grid, where):
            _check_lambda(fields_, base, f"{where} ({name!r})")
            out.append((name, f"{where} ({name!r})", fields_))
    return out


def expand_grid(grid: Any, where: str = "grid") -> list[tuple[str, dict[str, Any]]]:
    """(derived name, ESConfig field values) for every combination of one grid mapping's lists."""
    grid = _mapping(grid, where)
    if not grid:
        raise _fail(where, "empty: give at least one field: [values]")
    for key, values in grid.items():
        if key == "name":
            raise _fail(where, "name: grid runs are named from their values; use variants for named runs")
        if not isinstance(values, list):
            raise _fail(where, f"{key}: expected a list of values, got {values!r}")
        if not values:
            raise _fail(where, f"{key}: empty list, so the grid has no runs")
    # Typed before naming, so that `1e-3` (a string to PyYAML) is named as the number it is.
    runs = [_es_fields(dict(zip(grid, combo)), where) for combo in itertools.product(*grid.values())]
    return [(derived_name(values), values) for values in runs]


def derived_name(values: Mapping[str, Any]) -> str:
    """`{awd: l2, awd_lambda: 3}` -> `l2-lambda3`: readable, stable and filesystem-safe."""
    tokens = []
    for key, value in values.items():
        prefix = NAME_PREFIX.get(key, key)
        number = not isinstance(value, bool) and isinstance(value, (int, float))
        if number:
            text = f"{value:g}"
        elif isinstance(value, bool) or value is None:
            text = str(value).lower()
        else:
            text = str(value)
        tokens.append(f"{prefix}{text}" if number or not prefix else f"{prefix}-{text}")
    return re.sub(r"[^A-Za-z0-9._+-]", "_", "-".join(tokens))


def _check_lambda(fields_: dict[str, Any], base: dict[str, Any], where: str) -> None:
    """awd_lambda set for a run without AWD would be silently ignored: refuse it."""
    if "awd_lambda" in fields_ and fields_.get("awd", base.get("awd", "none")) == "none":
        raise _fail(where, "awd_lambda: set while awd is none for this run (set awd: l2, l1 or huber)")


def _es_run(name: str, where: str, values: dict[str, Any], base: dict[str, Any]) -> RunSpec:
    """The run's ESConfig, built now so that a bad value fails before anything runs."""
    try:
        config = ESConfig(**{**base, **values, "disable_tqdm": True})
    except ValueError as e:
        lines = [ln.strip().removeprefix("- ") for ln in str(e).splitlines()[1:]] or [str(e)]
        raise _fail(where, "; ".join(_locate(ln, values, base) for ln in lines)) from None
    if ":" not in config.task:  # a built-in task, not a `module:function` reward
        task = config.task.strip().lower()
        if task not in _builtin_tasks():
            key = "task (set in base)" if "task" not in values else "task"
            raise _fail(where, f"{key}: unknown task {config.task!r}; available: {', '.join(_builtin_tasks())}")
        # The name the trainer saves in config.yaml (`Conciseness` -> `conciseness`), so a
        # finished run compares equal to the variant that made it.
        config = dataclasses.replace(config, task=task)
    changes = {k: v for k, v in values.items() if base.get(k, getattr(ESConfig, k, None)) != v}
    return RunSpec(name, where, changes, config=config)


def _locate(line: str, values: dict[str, Any], base: dict[str, Any]) -> str:
    """Say when the field an ESConfig error is about comes from base, not from the run."""
    key = re.match(r"[a-z_]+", line)
    if key and key.group() not in values and key.group() in base:
        return f"{line} ({key.group()} set in base)"
    return line


def _builtin_tasks() -> list[str]:
    from esft.tasks import available_tasks

    return available_tasks()


def _grpo_run(value: Any, base: dict[str, Any], ev: EvalSpec) -> RunSpec:
    """The GRPO arm: base's model and data, esft's GRPO defaults, then the arm's fields."""
    given = _mapping(value, GRPO_NAME)
    decided = [k for k in given if k in ("output_dir", "resume_from_checkpoint")]
    if decided:
        raise _fail(GRPO_NAME, f"{', '.join(decided)}: the sweep decides it (the GRPO run is DIR/grpo)")
    values = _grpo_defaults(given, base, ev)
    try:
        values = {k: _coerce(k, v, _grpo_hints()[k]) if k in _grpo_hints() else v for k, v in values.items()}
        _, cfg = _build_grpo(values, GRPO_NAME)
    except ValueError as e:
        raise _fail(GRPO_NAME, str(e)) from None
    return RunSpec(GRPO_NAME, GRPO_NAME, {k: values[k] for k in given}, grpo_values=values, grpo_config=cfg)


def _grpo_defaults(given: dict[str, Any], base: dict[str, Any], ev: EvalSpec) -> dict[str, Any]:
    values = {k: base[k] for k in GRPO_INHERITS if k in base}
    # Resuming a GRPO run needs its optimizer state; model-only checkpoints cannot resume.
    values["save_only_model"] = False
    # Checkpoints are what evaluation reads: one at each evaluated step (at least the last).
    max_steps = _as_float(given.get("max_steps"))
    save_steps = ev.every or (int(max_steps) if max_steps and max_steps > 0 else None)
    if save_steps:
        values["save_steps"] = save_steps
    return {**values, **given, "disable_tqdm": True}


@functools.cache
def _grpo_hints() -> dict[str, Any]:
    from esft.grpo import GRPOTaskArgs, require_trl

    require_trl()  # before importing trl: its absence is a clear error naming the install command
    from trl import GRPOConfig

    return {**_hints(GRPOConfig), **_hints(GRPOTaskArgs)}


def _build_grpo(values: dict[str, Any], output_dir: str, resume_from: str | None = None) -> tuple[Any, Any]:
    """(GRPOTaskArgs, GRPOConfig) for the arm, writing into `output_dir`."""
    from esft.grpo import grpo_args_from_mapping

    mapping = {**values, "output_dir": output_dir}
    if resume_from:
        mapping["resume_from_checkpoint"] = resume_from
    with warnings.catch_warnings():
        # TRL's own defaults trip transformers' deprecation notes; they are not the user's doing.
        warnings.simplefilter("ignore", FutureWarning)
        return grpo_args_from_mapping(mapping)


def grpo_run_args(spec: SweepSpec, output_dir: str | Path, resume_from: str | None = None) -> tuple[Any, Any]:
    """(GRPOTaskArgs, trl.GRPOConfig) of the sweep's GRPO arm, run in `output_dir`/grpo."""
    arm = next((r for r in spec.runs if r.is_grpo), None)
    if arm is None:
        raise ValueError("the sweep spec has no grpo arm")
    return _build_grpo(arm.grpo_values or {}, str(Path(output_dir) / GRPO_NAME), resume_from)


def _check_names(runs: list[RunSpec]) -> None:
    seen: dict[str, str] = {}
    for run in runs:
        if run.name in RESERVED_NAMES or not _SAFE_NAME.match(run.name):
            raise _fail(run.where, f"name {run.name!r}: not usable as DIR/<name> (letters, digits and . _ + -, "
                                   f"starting with a letter or digit; not {', '.join(sorted(RESERVED_NAMES))})")
        if run.name in seen:
            raise _fail(run.where, f"name {run.name!r}: already used by {seen[run.name]}; every run needs its own name")
        seen[run.name] = run.where


# ------------------------------------------------------------------------- eval
def _eval_spec(value: Any, trained: list[str], base: dict[str, Any]) -> EvalSpec:
    """The eval section; without `tasks`, the runs' built-in training tasks (the report's target column)."""
    values = _mapping(value, "eval")
    known = [f.name for f in dataclasses.fields(EvalSpec)]
    unknown = [k for k in values if k not in known]
    if unknown:
        raise _fail("eval", _unknown(unknown, known, "eval keys") + f" (allowed: {', '.join(known)})")
    data_dir = base.get("data_dir")
    if "tasks" in values:
        tasks = _task_list(values.pop("tasks"), "eval", "tasks", data_dir)
    else:
        builtin = [t for t in dict.fromkeys(trained) if isinstance(t, str) and ":" not in t]
        tasks = _task_list(builtin, "base", "task", data_dir)
    kl_tasks = _task_list(values.pop("kl_tasks", None) or [], "eval", "kl_tasks", data_dir)
    limits = _limits(values.pop("limits", None) or {}, tasks)
    for key, v in values.items():
        optional = key in ("every", "limit", "drift_every")
        if not (optional and v is None) and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise _fail("eval", f"{key}: expected an integer >= 1{' or null' if optional else ''}, got {v!r}")
    values.setdefault("drift_every", values.get("every"))
    return EvalSpec(tasks=tasks, kl_tasks=kl_tasks, limits=limits, **values)


def _limits(value: Any, tasks: tuple[str, ...]) -> tuple[tuple[str, int | None], ...]:
    """`eval.limits`: {task: examples or null}, each task one of `eval.tasks`."""
    if not isinstance(value, dict):
        raise _fail("eval", f"limits: expected a mapping of task names to example counts, got {value!r}")
    out = []
    for key, n in value.items():
        task = str(key).strip().lower()
        if task not in tasks:
            raise _fail("eval", f"limits: {task!r} is not one of eval.tasks ({', '.join(tasks)})")
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise _fail("eval", f"limits.{task}: expected an integer >= 1 or null, got {n!r}")
        out.append((task, n))
    return tuple(out)


def _task_list(value: Any, where: str, key: str, data_dir: str | None) -> tuple[str, ...]:
    """Task names as evaluation writes them, each built once so a typo fails now."""
    from esft.tasks import get_task

    names = [t.strip() for t in value.split(",")] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(t, str) and t for t in names):
        raise _fail(where, f"{key}: expected a list of task names, got {value!r}")
    out = []
    for name in names:
        try:
            out.append(get_task(name, data_dir=data_dir).name)
        except ValueError as e:
            raise _fail(where, f"{key}: {e}") from None
    return tuple(dict.fromkeys(out))


# -------------------------------------------------------------------- planning
def chosen_iterations(available: Sequence[int], every: int | None) -> list[int]:
    """Iterations 0, K, 2K, ..., last of `available` (0 and last without K), as `esft eval` picks."""
    if not available:
        return []
    if every:
        return sorted({k for k in available if k % every == 0} | {available[-1]})
    return sorted({available[0], available[-1]})


def _available(run: RunSpec, run_dir: Path) -> list[int]:
    """The iterations whose weights exist, or (before training) will exist."""
    if _is_trained(run, run_dir):
        from esft.evaluation.runs import RunView

        return RunView.open(run_dir).iterations()
    if not run.is_grpo:
        return list(range(run.config.max_steps + 1))
    steps, every = _grpo_steps(run.grpo_config), run.grpo_config.save_steps
    every = math.ceil(every * steps) if every < 1 else int(every)
    return [0, *range(every, steps + 1, every)] if every else [0]


def _grpo_steps(cfg: Any) -> int:
    """GRPO steps to train: max_steps, or an epoch-based estimate (the progress bar's only)."""
    if cfg.max_steps > 0:
        return int(cfg.max_steps)
    per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps / cfg.num_generations
    return max(1, math.ceil(cfg.num_train_epochs * _UNKNOWN_TRAIN_PROMPTS / per_step))


def _check_existing_runs(spec: SweepSpec, out: Path) -> None:
    """Refuse, before anything runs, an ES run directory made with other settings than its
    variant now names: a finished one would be skipped and reported under the new settings,
    an unfinished one would be refused by its resume only after the runs before it."""
    stale = []
    for run in spec.runs:
        saved = out / run.name / "config.yaml"
        if run.is_grpo or not saved.exists() or _es_done(out / run.name) == 0:
            continue  # a start that logged no iteration is restarted afresh: nothing to protect
        diffs = run.config.differences(ESConfig.from_yaml(saved))
        if diffs:
            stale.append(f"{run.name} ({run.where}): " + "; ".join(diffs))
    if stale:
        raise ValueError(
            f"sweep {out}: these runs were made with other settings than the spec now gives them:\n  "
            + "\n  ".join(stale)
            + "\nmove or delete those run directories, or use another --output_dir"
        )


def _is_trained(run: RunSpec, run_dir: Path) -> bool:
    if not (run_dir / "final").is_dir():
        return False
    return run.is_grpo or _es_done(run_dir) == run.config.max_steps


def _es_done(run_dir: Path) -> int:
    """Iterations in the seed log (the commit points of an ES run)."""
    return len(read_jsonl(run_dir / "seedlog.jsonl")) if (run_dir / "config.yaml").exists() else 0


def _grpo_resume_point(run_dir: Path) -> str | None:
    """The checkpoint an interrupted GRPO run resumes from; None for a fresh run."""
    from esft.grpo import _resume_step

    if not (run_dir / "config.yaml").exists():
        return None
    try:
        step = _resume_step("last", run_dir)
    except ValueError:
        raise ValueError(
            f"sweep run 'grpo': {run_dir} stopped before its first checkpoint, so there is nothing to resume "
            f"from; delete {run_dir} and run the same command again to retrain it"
        ) from None
    checkpoint = run_dir / f"checkpoint-{step}"
    if not any(p.name.startswith("optimizer") for p in checkpoint.iterdir()):
        raise ValueError(
            f"sweep run 'grpo': {checkpoint} holds no optimizer state (save_only_model: true), so GRPO cannot "
            f"resume from it; delete {run_dir} to retrain it (without save_only_model: true in the grpo arm, "
            "a killed GRPO run resumes)"
        )
    return str(checkpoint)


def train_step_cost(run: RunSpec) -> float:
    """Work of one ES iteration or GRPO step (sequences × new tokens)."""
    if not run.is_grpo:
        c = run.config
        prompts = c.prompts_per_step or c.max_train_samples or _UNKNOWN_TRAIN_PROMPTS
        return float(c.population_size * prompts * c.max_new_tokens)
    c = run.grpo_config
    completions = c.per_device_train_batch_size * c.gradient_accumulation_steps
    # Generation, then a forward/backward over the completions and the reference model's forward.
    return completions * c.max_completion_length * (1 + 3 * _TEACHER_FORCED)


@dataclass
class Stage:
    """One step of the sweep for one run, with its estimated and its already-done work."""

    run: RunSpec
    kind: str  # train, eval, kl, drift
    units: float = 0.0
    done: float = 0.0


def _measure(stage: Stage, run_dir: Path, ev: EvalSpec, data_dir: str | None) -> Stage:
    """Set the stage's estimated and done work from the run directory as it is now."""
    run, kind = stage.run, stage.kind
    step = train_step_cost(run)
    if kind == "train":
        steps = _grpo_steps(run.grpo_config) if run.is_grpo else run.config.max_steps
        done = steps if _is_trained(run, run_dir) else _trained_steps(run, run_dir)
        stage.units, stage.done = steps * step, min(done, steps) * step
        return stage
    its = chosen_iterations(_available(run, run_dir), ev.drift_every if kind == "drift" else ev.every)
    # ES stages replay the seed log up to the last iteration; GRPO stages load checkpoints.
    load = (_REPLAY * max(its, default=0) if not run.is_grpo else _REPLAY * len(its)) * step
    if kind == "eval":
        # One unit per example and token; rows of different limits weigh differently.
        row = sum(ev.limit_for(t) or _UNKNOWN_EVAL_EXAMPLES for t in ev.tasks) / max(1, len(ev.tasks)) * ev.max_new_tokens
        done = _eval_rows_done(run_dir, ev, its, data_dir)
        total_rows = len(its) * len(ev.tasks)
        stage.units = load + total_rows * row
        stage.done = stage.units if done >= total_rows else done * row
    elif kind == "kl":
        sample = ev.kl_prompts * ev.kl_max_tokens
        stage.units = load + len(ev.kl_tasks) * sample * (1 + 2 * _TEACHER_FORCED * len(its))
        stage.done = stage.units if not _missing_kl(run_dir, ev, its) else 0.0
    else:
        stage.units = load + _REPLAY * step * len(its)
        stage.done = stage.units if not _missing_drift(run_dir, its) else 0.0
    return stage


def _trained_steps(run: RunSpec, run_dir: Path) -> int:
    if not run.is_grpo:
        return _es_done(run_dir)
    from esft.grpo import _resume_step

    if not (run_dir / "config.yaml").exists():
        return 0
    try:  # the step a resume starts from: the last checkpoint
        return _resume_step("last", run_dir) or 0
    except ValueError:
        return 0


def _eval_rows_done(run_dir: Path, ev: EvalSpec, its: Sequence[int], data_dir: str | None) -> int:
    """(iteration, task) rows of forgetting.jsonl at this eval's setting, as evaluate_run counts them."""
    from esft.evaluation.accuracy import FORGETTING_FILE, load_tasks, pending_tasks

    rows = read_jsonl(run_dir / "eval" / FORGETTING_FILE)
    if not rows:
        return 0
    done = 0
    for limit, names in ev.task_groups():
        tasks = load_tasks(names, data_dir)
        done += sum(len(tasks) - len(pending_tasks(rows, k, tasks, limit, ev.max_new_tokens)) for k in its)
    return done


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError:
        return []  # written atomically, so only a hand edit gets here: recompute
    return rows if isinstance(rows, list) else []


def _kl_rows(run_dir: Path, ev: EvalSpec) -> list[dict[str, Any]]:
    """kl.json rows made with this eval's prompts and token budget."""
    return [r for r in _read_rows(run_dir / KL_FILE)
            if r.get("num_prompts") == ev.kl_prompts and r.get("max_tokens") == ev.kl_max_tokens]


def _missing_kl(run_dir: Path, ev: EvalSpec, its: Sequence[int]) -> list[int]:
    have = {(r.get("iteration"), r.get("task")) for r in _kl_rows(run_dir, ev)}
    return [k for k in its if any((k, t) not in have for t in ev.kl_tasks)]


def _missing_drift(run_dir: Path, its: Sequence[int]) -> list[int]:
    have = {r.get("iteration") for r in _read_rows(run_dir / DRIFT_FILE)}
    return [k for k in its if k not in have]


# -------------------------------------------------------------------- console
class _Progress:
    """The sweep's one bar with an ETA (stderr), its stage lines (stdout and DIR/sweep.log)."""

    FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}"

    def __init__(self, total: float, done: float, log_path: Path, enabled: bool) -> None:
        # The console streams as they are now: stages redirect sys.stdout/err to their logs.
        self.out = sys.stdout
        self.log_path = log_path
        self.lock = threading.Lock()
        # smoothing=0: the rate is the average since the start, excluding work done before.
        self.bar = tqdm(total=total, initial=done, desc="sweep", file=sys.stderr, disable=not enabled,
                        smoothing=0, bar_format=self.FORMAT, mininterval=1.0, dynamic_ncols=True)

    def advance(self, units: float, status: str | None = None) -> None:
        with self.lock:
            # Estimates are floats: never past 100% by a rounding error (tqdm warns, the ETA turns negative).
            self.bar.update(max(0.0, min(units, self.bar.total - self.bar.n)))
            if status:
                self.bar.set_postfix_str(status, refresh=False)

    def replan(self, before: Stage, after: Stage) -> None:
        """A stage's estimate changed (its run exists now): move the total, count found work as done."""
        if self.bar.disable:
            return
        with self.lock:
            self.bar.total += after.units - before.units
            found = after.done - before.done
            self.bar.n += found
            self.bar.initial += found  # work found done is not work done now: keep it out of the rate

    def line(self, text: str) -> None:
        self.bar.write(text, file=self.out)
        with open(self.log_path, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")

    def finish(self) -> None:
        """Everything ran: whatever the estimates said, the bar ends full."""
        self.advance(self.bar.total - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def _console_handlers() -> list[tuple[logging.Logger, logging.Handler]]:
    """Logging handlers that write to the console (basicConfig's, transformers' own)."""
    streams = {sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__}
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    return [
        (lg, h) for lg in loggers for h in lg.handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
        and getattr(h, "stream", None) in streams
    ]


def _rebind_handlers(stream: Any, console: Any) -> None:
    """Handlers created during a stage (transformers makes its own lazily) hold the stage's log,
    which is closed next: point them at the console stream they would have taken."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for lg in loggers:
        for h in getattr(lg, "handlers", ()):
            if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is stream:
                h.setStream(console)


@contextlib.contextmanager
def _run_output(log_path: Path, title: str) -> Iterator[None]:
    """Everything a stage prints or logs goes to the run's log, appended; the console keeps the bar."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    root = logging.getLogger()
    level = root.level
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    swapped = _console_handlers()
    console = sys.stderr
    with open(log_path, "a", buffering=1) as f:
        f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {title}\n")
        for lg, h in swapped:
            lg.removeHandler(h)
        # Loggers that do not propagate (transformers') keep their records, now in the log.
        for lg in {lg for lg, _ in swapped} | {root}:
            lg.addHandler(handler)
        root.setLevel(min(level, logging.INFO))  # NOTSET (0) already lets everything through
        try:
            with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                yield
        except BaseException:
            traceback.print_exc(file=f)
            raise
        finally:
            for lg in {lg for lg, _ in swapped} | {root}:
                lg.removeHandler(handler)
            for lg, h in swapped:
                lg.addHandler(h)
            root.setLevel(level)
            handler.close()
            _rebind_handlers(f, console)


class _RowWatcher:
    """Advance the bar as evaluate_run appends rows (it has no callback); a thread polls the file."""

    def __init__(self, count: Any, progress: _Progress, per_row: float, status: str) -> None:
        self.count, self.progress, self.per_row, self.status = count, progress, per_row, status
        self.seen = count()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self.stop.wait(1.0):
            self._update()

    def _update(self) -> None:
        now = self.count()
        if now > self.seen:
            self.progress.advance((now - self.seen) * self.per_row, f"{self.status} {now}")
            self.seen = now

    def __enter__(self) -> _RowWatcher:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self._update()


# ----------------------------------------------------------------------- stages
def _seconds(t0: float) -> str:
    s = time.perf_counter() - t0
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def _iters(its: Sequence[int]) -> str:
    its = list(its)
    return ", ".join(map(str, its)) if len(its) <= 6 else f"{its[0]}, {its[1]}, ..., {its[-1]}"


def _train(stage: Stage, run_dir: Path, progress: _Progress) -> str:
    run = stage.run
    unit = "GRPO steps" if run.is_grpo else "iterations"
    if _is_trained(run, run_dir):
        return f"{run.name}: already trained ({_trained_steps(run, run_dir)} {unit}), skipped"
    t0 = time.perf_counter()
    start, bar_start = _trained_steps(run, run_dir), progress.bar.n
    with _run_output(run_dir / LOG_FILE, f"train {run.name}"):
        try:
            steps = _train_grpo(run, run_dir, progress) if run.is_grpo else _train_es(run, run_dir, progress)
        finally:
            gc.collect()
    # Estimates may be off (GRPO epochs): settle the stage's share of the bar.
    progress.advance(max(0.0, stage.units - stage.done - (progress.bar.n - bar_start)))
    resumed = f" (resumed at {start})" if start else ""
    return f"{run.name}: trained to {steps} {unit}{resumed} in {_seconds(t0)}"


def _train_es(run: RunSpec, run_dir: Path, progress: _Progress) -> int:
    from esft.callbacks import TrainerCallback
    from esft.trainer import ESTrainer

    step = train_step_cost(run)

    class IterationProgress(TrainerCallback):
        def on_iteration_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
            progress.advance(step, f"{run.name}: iteration {trainer.iteration}/{run.config.max_steps}")

    # resume only continues a run directory that holds one (config.yaml is its first file).
    resume = (run_dir / "config.yaml").exists()
    cfg = dataclasses.replace(run.config, output_dir=str(run_dir), resume=resume, disable_tqdm=True)
    try:
        trainer = ESTrainer(args=cfg, callbacks=[IterationProgress()])
        trainer.train()
    except ValueError as e:
        hint = f" (restore those settings in the spec, or delete {run_dir} to retrain it)" if "refused" in str(e) else ""
        raise ValueError(f"sweep run {run.name!r} ({run_dir}): {e}{hint}") from e
    steps = trainer.iteration
    del trainer
    return steps


def _train_grpo(run: RunSpec, run_dir: Path, progress: _Progress) -> int:
    from transformers import TrainerCallback

    from esft.grpo import run_grpo

    step = train_step_cost(run)
    total = _grpo_steps(run.grpo_config)

    class StepProgress(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            progress.advance(step, f"{run.name}: step {state.global_step}/{total}")

    resume = _grpo_resume_point(run_dir)
    task_args, cfg = _build_grpo(run.grpo_values or {}, str(run_dir), resume)
    trainer = run_grpo(task_args, cfg, callbacks=[StepProgress()])
    steps = int(trainer.state.global_step)
    del trainer
    return steps


def _evaluate(stage: Stage, run_dir: Path, spec: SweepSpec, progress: _Progress) -> str:
    with run_lock(run_dir, "evaluation"):  # the borrowed base rows are written into the run too
        return _evaluate_locked(stage, run_dir, spec, progress)


def _evaluate_locked(stage: Stage, run_dir: Path, spec: SweepSpec, progress: _Progress) -> str:
    from esft.evaluation.accuracy import evaluate_run

    run, ev = stage.run, spec.eval
    its = chosen_iterations(_available(run, run_dir), ev.every)
    if 0 in its:
        borrow_base_rows(run_dir)
    total_rows = len(its) * len(ev.tasks)
    done = _eval_rows_done(run_dir, ev, its, spec.data_dir)
    # evaluate_run resumes by itself, but is not called when nothing is left (no model to load).
    if done >= total_rows:
        return f"{run.name}: eval already done ({', '.join(ev.tasks)} at {_iters(its)}), skipped"
    t0 = time.perf_counter()
    per_row = (stage.units - stage.done) / (total_rows - done)
    with _run_output(run_dir / LOG_FILE, f"eval {run.name}"), _RowWatcher(
        lambda: _eval_rows_done(run_dir, ev, its, spec.data_dir), progress, per_row, f"{run.name}: eval rows"
    ):
        for limit, tasks in ev.task_groups():
            evaluate_run(run_dir, tasks, iterations=its, limit=limit, max_new_tokens=ev.max_new_tokens,
                         batch_size=ev.batch_size, data_dir=spec.data_dir, device=spec.device, progress=False)
    return f"{run.name}: evaluated {', '.join(ev.tasks)} at iterations {_iters(its)} in {_seconds(t0)}"


def _kl(stage: Stage, run_dir: Path, spec: SweepSpec, progress: _Progress) -> str:
    from esft.evaluation.kl import kl_report

    run, ev = stage.run, spec.eval
    its = chosen_iterations(_available(run, run_dir), ev.every)
    missing = _missing_kl(run_dir, ev, its)
    if not missing:
        return f"{run.name}: KL already in {KL_FILE}, skipped"
    t0 = time.perf_counter()
    progress.advance(0, f"{run.name}: KL")
    with run_lock(run_dir, "KL measurement"):
        borrow_kl_cache(run_dir)
        with _run_output(run_dir / LOG_FILE, f"kl {run.name}"):
            rows = kl_report(run_dir, list(ev.kl_tasks), iterations=missing, num_prompts=ev.kl_prompts,
                             max_tokens=ev.kl_max_tokens, data_dir=spec.data_dir, device=spec.device)
        # The settings travel with the rows, so a rerun with other settings recomputes them.
        rows = [{**r, "num_prompts": ev.kl_prompts, "max_tokens": ev.kl_max_tokens} for r in rows]
        fresh = {(r["iteration"], r["task"]) for r in rows}
        kept = [r for r in _kl_rows(run_dir, ev) if (r.get("iteration"), r.get("task")) not in fresh]
        merged = sorted(kept + rows, key=lambda r: (r["iteration"], str(r["task"])))
        write_text_atomic(run_dir / KL_FILE, json.dumps(merged, indent=1) + "\n")
    progress.advance(stage.units - stage.done)
    return f"{run.name}: KL on {', '.join(ev.kl_tasks)} at iterations {_iters(missing)} in {_seconds(t0)}"


def _drift(stage: Stage, run_dir: Path, spec: SweepSpec, progress: _Progress) -> str:
    from esft.evaluation.drift import drift_report

    run = stage.run
    its = chosen_iterations(_available(run, run_dir), spec.eval.drift_every)
    missing = _missing_drift(run_dir, its)
    if not missing:
        return f"{run.name}: drift already in {DRIFT_FILE}, skipped"
    t0 = time.perf_counter()
    progress.advance(0, f"{run.name}: drift")
    with run_lock(run_dir, "drift measurement"):
        with _run_output(run_dir / LOG_FILE, f"drift {run.name}"):
            rows = drift_report(run_dir, iterations=missing, device=spec.device)
        kept = [r for r in _read_rows(run_dir / DRIFT_FILE) if r.get("iteration") not in missing]
        merged = sorted(kept + rows, key=lambda r: r["iteration"])
        write_text_atomic(run_dir / DRIFT_FILE, json.dumps(merged, indent=1) + "\n")
    progress.advance(stage.units - stage.done)
    return f"{run.name}: drift at iterations {_iters(missing)} in {_seconds(t0)}"


# ------------------------------------------------------------------------ sweep
def _as_spec(spec: SweepSpec | Mapping[str, Any] | str | Path) -> SweepSpec:
    if isinstance(spec, SweepSpec):
        return spec
    if isinstance(spec, (str, Path)):
        return load_spec(spec)
    return parse_spec(spec)


def run_sweep(spec: SweepSpec | Mapping[str, Any] | str | Path, output_dir: str | Path, progress: bool = True) -> Path:
    """Train, evaluate and report every run of `spec` in `output_dir`; returns report.md's path.

    Validates the whole spec first (nothing is created for a bad one); rerunning after a
    crash finishes the work without redoing any.
    """
    spec = _as_spec(spec)
    out = Path(output_dir)
    _check_existing_runs(spec, out)
    with run_lock(out, "sweep"):  # two sweeps on one DIR would train the same runs at once
        return _run_sweep(spec, out, progress)


def _run_sweep(spec: SweepSpec, out: Path, progress: bool) -> Path:
    text = yaml.safe_dump(spec.data, sort_keys=False, allow_unicode=True)
    if not (out / SPEC_FILE).exists() or (out / SPEC_FILE).read_text() != text:
        write_text_atomic(out / SPEC_FILE, text)
    print(f"sweep: {len(spec.runs)} runs in {out}, report in {out / REPORT_DIR}", flush=True)
    kinds = ["eval"] + (["kl"] if spec.eval.kl_tasks else []) + ["drift"]
    stages = [Stage(r, "train") for r in spec.runs] + [Stage(r, k) for r in spec.runs for k in kinds]
    for s in stages:
        _measure(s, out / s.run.name, spec.eval, spec.data_dir)
    for run in spec.runs:
        if run.is_grpo and not _is_trained(run, out / run.name):
            _grpo_resume_point(out / run.name)  # a GRPO arm that cannot resume fails now, not after the ES runs
    bar = _Progress(sum(s.units for s in stages), sum(s.done for s in stages), out / LOG_FILE, progress)
    try:
        for s in stages:
            bar.line(_run_stage(s, out / s.run.name, spec, bar))
        with _run_output(out / LOG_FILE, "report"):
            from esft.report.runs import build_report

            report = build_report([out / r.name for r in spec.runs], out / REPORT_DIR)
        bar.finish()
    finally:
        bar.close()
    print(f"report: {report}", flush=True)
    return report


def _run_stage(stage: Stage, run_dir: Path, spec: SweepSpec, progress: _Progress) -> str:
    if stage.kind == "train":
        return _train(stage, run_dir, progress)
    # The run exists now: its real iterations (GRPO checkpoints) replace the estimate.
    before = dataclasses.replace(stage)
    progress.replan(before, _measure(stage, run_dir, spec.eval, spec.data_dir))
    step = {"eval": _evaluate, "kl": _kl, "drift": _drift}[stage.kind]
    return step(stage, run_dir, spec, progress)


def _show(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


def describe(spec: SweepSpec) -> str:
    """The runs, each with the fields that differ from base (what --dry_run prints)."""
    width = max(len(r.name) for r in spec.runs)
    lines = []
    for r in spec.runs:
        changes = " ".join(f"{k}={_show(v)}" for k, v in r.changes.items()) or "(base)"
        if r.is_grpo:
            inherited = [k for k in GRPO_INHERITS if k in (r.grpo_values or {}) and k not in r.changes]
            changes = f"GRPO: {changes if r.changes else 'esft grpo defaults'}"
            changes += f"; from base: {', '.join(inherited)}" if inherited else ""
        lines.append(f"  {r.name:<{width}}  {changes}")
    ev = spec.eval
    every = f"every {ev.every} iterations and the last" if ev.every else "iterations 0 and last"
    kl = f"; KL on {', '.join(ev.kl_tasks)} ({ev.kl_prompts} prompts x {ev.kl_max_tokens} tokens)" if ev.kl_tasks else ""
    exceptions = "".join(f", {t} {n or 'all'}" for t, n in ev.limits)
    lines.append(f"eval: {', '.join(ev.tasks)} at {every}, limit {ev.limit or 'all'}{exceptions}{kl}; "
                 f"drift {'every ' + str(ev.drift_every) if ev.drift_every else 'at 0 and last'}")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    """`esft sweep SPEC.yaml --output_dir DIR [--dry_run]`."""
    p = argparse.ArgumentParser(
        prog="esft sweep",
        description="Train a grid of runs from one YAML spec (base, variants, grid, grpo, eval), then "
                    "evaluate, measure KL and drift, and write one report. Rerun the same command to resume.",
    )
    p.add_argument("spec", help="YAML spec file")
    p.add_argument("--output_dir", default=None, help="sweep directory (default: runs/<spec file name>)")
    p.add_argument("--dry_run", action="store_true", help="validate and list the runs; run nothing")
    p.add_argument("--no_progress", action="store_true", help="no sweep progress bar (stage lines only)")
    a = p.parse_args(list(argv))
    spec = load_spec(a.spec)
    out = Path(a.output_dir or Path("runs") / Path(a.spec).stem)
    if a.dry_run:
        print(f"sweep: {len(spec.runs)} runs in {out}, report in {out / REPORT_DIR} (dry run: nothing runs)")
        print(describe(spec))
        return 0
    run_sweep(spec, out, progress=not a.no_progress)
    return 0


__all__ = [
    "EvalSpec", "RunSpec", "SweepSpec", "chosen_iterations", "derived_name", "describe", "expand_grid",
    "grpo_run_args", "load_spec", "main", "parse_spec", "run_sweep",
]
