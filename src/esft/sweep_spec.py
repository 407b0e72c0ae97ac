"""The `esft sweep` spec: parsing and validating it completely before anything runs.

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
- `grpo`: one GRPO run in `DIR/grpo` (with `seeds: [0, 1, 2]`, one per training seed in
  `DIR/grpo-seed0`, ...). It inherits `model`, `task`, `dataset`, `data_dir`,
  `max_train_samples`, `assistant_prefill`, `num_threads` and `seed` from base where base sets
  them and it does not; never `max_steps` (a GRPO step is not an ES iteration). Defaults on
  top of `esft grpo`'s: `save_only_model: false` (a checkpoint with optimizer state is what a
  killed GRPO run resumes from; it costs ~3x the disk of a model-only one) and `save_steps`
  = eval `every` (else `max_steps`), so that the GRPO run is evaluated at the same steps.
- `eval`: `tasks` (default: the runs' built-in training tasks), `every` K (iterations 0, K,
  2K, ..., last; default: 0 and last), `limit` (default: the whole eval set), `limits`
  (per-task exceptions to `limit`), `max_new_tokens` (tokens per answer), `batch_size` (32),
  `kl_tasks` (default: none, no KL), `kl_num_prompts` (prompts per KL task; `kl_prompts`, its
  old name, is read too), `kl_max_tokens` (tokens per KL continuation), `drift_every`
  (default: `every`). Drift is always measured. The three caps default to 1024, 50 and 256,
  and scale with `limit` when one is given (`scaled_defaults`: `limit: 2` evaluates 2
  examples of up to 64 tokens and 2 KL prompts of 64 tokens). `harness: lm-eval` also scores
  the tasks that have a harness formulation (HellaSwag, PIQA, ARC-Challenge, MMLU-Pro) with
  lm-evaluation-harness at the same iterations (`RUN/eval/harness.jsonl`).
- The sweep decides `output_dir` (`DIR/<name>`), `resume` and `disable_tqdm` (true: the
  console shows one sweep bar); the spec may not set the first two.

The whole spec is validated here, before anything runs (no directory, no model): unknown
keys, types and ranges (every run's ESConfig is built up front), names, grids, eval tasks.
`esft.sweep` runs a validated spec.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fnmatch
import functools
import itertools
import json
import re
import types
import typing
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from esft.config import ESConfig
from esft.io import read_text

TOP_LEVEL_KEYS = ("base", "variants", "grid", "stages", "grpo", "eval")
#: A variant's key with `stages:`: `anchor: stage` re-anchors AWD at each stage's start.
ANCHOR_KEY = "anchor"
#: `kl_tasks: previous`: the KL budget is measured on the earlier stages' tasks.
PREVIOUS = "previous"
GRPO_NAME = "grpo"
REPORT_DIR = "report"
SPEC_FILE = "sweep.yaml"
LOG_FILE = "sweep.log"
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
    kl_num_prompts: int = 50
    kl_max_tokens: int = 256
    drift_every: int | None = None
    # "lm-eval": the tasks with a harness formulation are also scored by lm-evaluation-harness.
    harness: str | None = None

    @property
    def harness_tasks(self) -> list[str]:
        from esft.evaluation.harness import FORMULATIONS

        return [t for t in self.tasks if t in FORMULATIONS] if self.harness else []

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
    # A stage of a task sequence: its arm, its number (1-based) and the run it starts from.
    arm: str | None = None
    stage: int | None = None
    previous: str | None = None

    @property
    def is_grpo(self) -> bool:
        return self.config is None

    def resolved(self, out: Path) -> ESConfig:
        """The ES config as it runs in sweep directory `out`: its output_dir, and for a stage
        the previous stage's run directory as `init_from`."""
        assert self.config is not None
        init = str((Path(out) / self.previous).resolve()) if self.previous else None
        return dataclasses.replace(self.config, output_dir=str(Path(out) / self.name), init_from=init)


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
    sequence = "stages" in data
    extra = (ANCHOR_KEY,) if sequence else ()
    named = _variants(data.get("variants"), base, extra) + _grid_runs(data.get("grid"), base)
    arm = data.get("grpo") if isinstance(data.get("grpo"), Mapping) else {}
    if sequence:
        stages = _stages(data.get("stages"))
        trained = [values["task"] for values, _ in stages]
    else:
        trained = [values.get("task", base.get("task", ESConfig.task)) for _, _, values in named]
        trained += [arm.get("task", base.get("task", ESConfig.task))] if data.get("grpo") is not None else []
    ev = _eval_spec(data.get("eval"), trained, base)
    if sequence:
        runs = _sequence_runs(named or [("es", "base", {})], stages, base, ev)
        if data.get("grpo") is not None:
            runs += _grpo_sequence(data["grpo"], stages, base, ev)
    else:
        runs = [_es_run(name, where, values, base) for name, where, values in named]
        if data.get("grpo") is not None:
            runs += _grpo_runs(data["grpo"], base, ev)
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
def _stages(value: Any) -> list[tuple[dict[str, Any], str]]:
    """`stages:` an ordered, non-empty list of mappings, each a `task` and ESConfig overrides."""
    if not isinstance(value, list) or not value:
        raise _fail("stages", "expected a non-empty list of stages, each {task: NAME, ...ESConfig fields}")
    out = []
    for k, item in enumerate(value):
        where = f"stages[{k}]"
        if not isinstance(item, Mapping):
            raise _fail(where, f"expected a mapping with a task and ESConfig fields, got {item!r}")
        fields_ = _es_fields(item, where)
        if "task" not in fields_:
            raise _fail(where, "task: every stage names the task it trains on")
        task = str(fields_["task"]).strip()
        if ":" not in task:
            if task.lower() not in _builtin_tasks():
                raise _fail(where, f"task: unknown task {task!r}; available: {', '.join(_builtin_tasks())}")
            fields_["task"] = task.lower()
        out.append((fields_, where))
    return out


def _stage_name(arm: str, k: int, task: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", f"{arm}.s{k}-{task}")


def _sequence_runs(
    arms: list[tuple[str, str, dict[str, Any]]], stages: list[tuple[dict[str, Any], str]], base: dict[str, Any],
    ev: EvalSpec,
) -> list[RunSpec]:
    """Every arm through every stage, in order: stage k of an arm starts from its stage k−1."""
    runs = []
    for arm, arm_where, values in arms:
        values = dict(values)
        anchor = values.pop(ANCHOR_KEY, "base")
        if anchor not in ("base", "stage"):
            raise _fail(arm_where, f"{ANCHOR_KEY}: expected base (θ₀ = the base model) or stage (re-anchored at each "
                                   f"stage's start), got {anchor!r}")
        previous = None
        for k, (stage, stage_where) in enumerate(stages, start=1):
            both = sorted((set(values) & set(stage)) - {"task"})
            if both:  # a stage's field would silently overrule the arm's (two arms becoming one)
                raise _fail(arm_where, f"{', '.join(both)}: set by this arm and by {stage_where}; set it in one place")
            merged = {**values, **stage}
            if anchor == "stage":
                merged["anchor_at"] = "start"
            if "noise_stream" not in stage and k > 1:
                # The same seed would redraw stage k−1's perturbations iteration by iteration, and a
                # stage rewarding the opposite would step straight back along them: a fresh stream.
                merged["noise_stream"] = int(values.get("noise_stream", base.get("noise_stream", 0))) + k - 1
            if merged.get("kl_tasks") == PREVIOUS:
                earlier = [s["task"] for s, _ in stages[: k - 1]]
                priors = [t for t in ev.tasks if t not in {s["task"] for s, _ in stages}]
                if not (earlier or priors):
                    raise _fail(arm_where, "kl_tasks: previous needs an earlier stage or a prior task in eval.tasks")
                merged["kl_tasks"] = ",".join(earlier or priors)
            name = _stage_name(arm, k, merged["task"])
            run = _es_run(name, f"{arm_where} {stage_where}", merged, base)
            runs.append(dataclasses.replace(run, arm=arm, stage=k, previous=previous))
            previous = name
    return runs


def _grpo_sequence(value: Any, stages: list[tuple[dict[str, Any], str]], base: dict[str, Any],
                   ev: EvalSpec) -> list[RunSpec]:
    """The GRPO arm through every stage (with `seeds: [..]`, one arm per seed): each stage's
    GRPO run starts from the previous one's final model."""
    given = _mapping(value, GRPO_NAME)
    seeds = given.pop("seeds", None)
    if seeds is not None and (not isinstance(seeds, list) or not seeds):
        raise _fail(GRPO_NAME, f"seeds: expected a non-empty list of integers, got {seeds!r}")
    arms = [(GRPO_NAME, given)] if seeds is None else [(f"{GRPO_NAME}-seed{x}", {**given, "seed": x}) for x in seeds]
    runs = []
    for arm, values in arms:
        previous = None
        for k, (stage, _) in enumerate(stages, start=1):
            picks = {key: v for key, v in stage.items() if key in GRPO_INHERITS}
            name = _stage_name(arm, k, stage["task"])
            run = _grpo_run({**values, **picks}, base, ev, name)
            runs.append(dataclasses.replace(run, arm=arm, stage=k, previous=previous))
            previous = name
    return runs


def _variants(value: Any, base: dict[str, Any], extra: Sequence[str] = ()) -> list[tuple[str, str, dict[str, Any]]]:
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
        fields_ = _es_fields(item, where, extra=("name", *extra))
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


def _grpo_runs(value: Any, base: dict[str, Any], ev: EvalSpec) -> list[RunSpec]:
    """The GRPO arm: one run in DIR/grpo, or with `seeds: [0, 1, 2]` one per training seed
    (DIR/grpo-seed0, ...), which the report then summarises over seeds."""
    given = _mapping(value, GRPO_NAME)
    seeds = given.pop("seeds", None)
    if seeds is None:
        return [_grpo_run(given, base, ev, GRPO_NAME)]
    if "seed" in given:
        raise _fail(GRPO_NAME, "seed and seeds: give one (seeds makes one GRPO run per seed)")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds):
        raise _fail(GRPO_NAME, f"seeds: expected a non-empty list of integers, got {seeds!r}")
    return [_grpo_run({**given, "seed": x}, base, ev, f"{GRPO_NAME}-seed{x}") for x in seeds]


def _grpo_run(given: dict[str, Any], base: dict[str, Any], ev: EvalSpec, name: str) -> RunSpec:
    """One GRPO run: base's model and data, esft's GRPO defaults, then the arm's fields."""
    where = GRPO_NAME if name == GRPO_NAME else f"{GRPO_NAME} ({name!r})"
    decided = [k for k in given if k in ("output_dir", "resume_from_checkpoint")]
    if decided:
        raise _fail(where, f"{', '.join(decided)}: the sweep decides it (the GRPO run is DIR/{name})")
    values = _grpo_defaults(given, base, ev)
    try:
        values = {k: _coerce(k, v, _grpo_hints()[k]) if k in _grpo_hints() else v for k, v in values.items()}
        _, cfg = build_grpo(values, name)
    except ValueError as e:
        raise _fail(where, str(e)) from None
    return RunSpec(name, where, {k: values[k] for k in given}, grpo_values=values, grpo_config=cfg)


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


def build_grpo(values: dict[str, Any], output_dir: str, resume_from: str | None = None) -> tuple[Any, Any]:
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
    """(GRPOTaskArgs, trl.GRPOConfig) of the sweep's (first) GRPO run, in `output_dir`/<its name>."""
    arm = next((r for r in spec.runs if r.is_grpo), None)
    if arm is None:
        raise ValueError("the sweep spec has no grpo arm")
    return build_grpo(arm.grpo_values or {}, str(Path(output_dir) / arm.name), resume_from)


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
    unknown = [k for k in values if k not in known and k != "kl_prompts"]
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
    harness = values.pop("harness", None)
    if harness not in (None, "lm-eval"):
        raise _fail("eval", f"harness: expected lm-eval or null, got {harness!r}")
    if harness:
        from esft.evaluation.harness import FORMULATIONS

        if not any(t in FORMULATIONS for t in tasks):
            raise _fail("eval", f"harness: none of eval.tasks ({', '.join(tasks)}) has a harness formulation "
                                f"(those that do: {', '.join(FORMULATIONS)})")
    for key, v in values.items():
        optional = key in ("every", "limit", "drift_every")
        if not (optional and v is None) and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise _fail("eval", f"{key}: expected an integer >= 1{' or null' if optional else ''}, got {v!r}")
    if "kl_prompts" in values:  # the key's name before 2026-12: the number of KL prompts per task
        if "kl_num_prompts" in values:
            raise _fail("eval", "kl_prompts and kl_num_prompts: give one (kl_prompts is kl_num_prompts' old name)")
        values["kl_num_prompts"] = values.pop("kl_prompts")
    values.setdefault("drift_every", values.get("every"))
    return EvalSpec(tasks=tasks, kl_tasks=kl_tasks, limits=limits, harness=harness,
                    **{**scaled_defaults(values.get("limit")), **values})


#: The cost caps of evaluation, at full scale (no `limit`).
FULL_SCALE = {"max_new_tokens": 1024, "kl_num_prompts": 50, "kl_max_tokens": 256}


def scaled_defaults(limit: int | None) -> dict[str, int]:
    """Defaults of the eval caps: the full ones without `limit`; with one, a smaller
    evaluation: at most `limit` KL prompts per task and 32·`limit` tokens per answer and
    per KL continuation. A sweep with `limit: 2` is a smoke test and should run like one
    (an answer used to run to 1024 tokens and KL to sample 50 prompts whatever `limit`
    said); from `limit: 32` on the caps are the full ones."""
    if limit is None:
        return dict(FULL_SCALE)
    return {"max_new_tokens": min(1024, 32 * limit), "kl_num_prompts": min(50, limit),
            "kl_max_tokens": min(256, 32 * limit)}


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


def as_spec(spec: SweepSpec | Mapping[str, Any] | str | Path) -> SweepSpec:
    if isinstance(spec, SweepSpec):
        return spec
    if isinstance(spec, (str, Path)):
        return load_spec(spec)
    return parse_spec(spec)



def select(spec: SweepSpec, patterns: Sequence[str]) -> SweepSpec:
    """The spec cut down to the runs whose name (or, in a task sequence, arm) matches one of the
    shell-style `patterns`, plus the earlier stages a chosen stage starts from; a pattern that
    matches nothing is an error naming it, so a typo never runs an empty sweep."""
    chosen: set[str] = set()
    for pattern in patterns:
        hits = {r.name for r in spec.runs if fnmatch.fnmatchcase(r.name, pattern)
                or (r.arm is not None and fnmatch.fnmatchcase(r.arm, pattern))}
        if not hits:
            names = ", ".join(r.name for r in spec.runs)
            raise ValueError(f"sweep --only {pattern!r}: matches no run of the spec (its runs: {names})")
        chosen |= hits
    by_name = {r.name: r for r in spec.runs}
    for name in list(chosen):  # a stage needs the stages before it
        previous = by_name[name].previous
        while previous is not None and previous in by_name:
            chosen.add(previous)
            previous = by_name[previous].previous
    return dataclasses.replace(spec, runs=[r for r in spec.runs if r.name in chosen])


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
    kl = f"; KL on {', '.join(ev.kl_tasks)} ({ev.kl_num_prompts} prompts x {ev.kl_max_tokens} tokens)" if ev.kl_tasks else ""
    exceptions = "".join(f", {t} {n or 'all'}" for t, n in ev.limits)
    harness = f"; lm-evaluation-harness on {', '.join(ev.harness_tasks)}" if ev.harness else ""
    lines.append(f"eval: {', '.join(ev.tasks)} at {every}, limit {ev.limit or 'all'}{exceptions}, "
                 f"answers of up to {ev.max_new_tokens} tokens{kl}{harness}; "
                 f"drift {'every ' + str(ev.drift_every) if ev.drift_every else 'at 0 and last'}")
    return "\n".join(lines)



__all__ = [
    "EvalSpec", "GRPO_NAME", "LOG_FILE", "REPORT_DIR", "RunSpec", "SPEC_FILE", "SweepSpec", "as_spec", "build_grpo",
    "derived_name",
    "describe", "expand_grid", "grpo_run_args", "load_spec", "parse_spec", "select",
]
