"""`esft sweep`: many runs from one YAML spec, then evaluation, KL, drift and one report.

    esft sweep SPEC.yaml --output_dir DIR [--dry_run]

The spec and its checks live in `esft.sweep_spec`; this module runs a validated spec.

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
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import math
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from esft.config import ESConfig
from esft.evaluation.sharing import (
    borrow_base_rows,
    borrow_kl_cache,
    borrow_start_rows,
    saved_config,
    stage_start,
)
from esft.io import read_jsonl, write_text_atomic
from esft.runlock import run_lock
from esft.sweep_spec import (
    LOG_FILE,
    REPORT_DIR,
    SPEC_FILE,
    EvalSpec,
    RunSpec,
    SweepSpec,
    as_spec,
    build_grpo,
    derived_name,
    describe,
    expand_grid,
    grpo_run_args,
    load_spec,
    parse_spec,
    select,
)

KL_FILE = "kl.json"
DRIFT_FILE = "drift.json"
# The progress bar's unit is one generated token of one sequence: what a training step, an
# evaluation row or a KL row costs is estimated in it, so one ETA spans unlike stages.
_UNKNOWN_TRAIN_PROMPTS = 200  # the paper's tasks train on 200 examples
_UNKNOWN_EVAL_EXAMPLES = 1000  # the prior tasks' eval sets hold 1000-2000 examples
_REPLAY = 0.025  # replaying an ES iteration regenerates its noise once: DESIGN keeps that < 5% of it
_TEACHER_FORCED = 0.125  # scoring a continuation in one forward pass vs sampling it token by token


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
        diffs = run.resolved(out).differences(ESConfig.from_yaml(saved))
        if diffs:
            stale.append(f"{run.name} ({run.where}): " + "; ".join(diffs))
    if stale:
        hint = ("\n(a sequence's stage k draws noise_stream k−1 since 2026-12-06; a stage made before drew stream 0, "
                "the noise of the stage before it: retrain it, or give that stage noise_stream: 0 to keep the old run)"
                if any("noise_stream" in line for line in stale) else "")
        raise ValueError(
            f"sweep {out}: these runs were made with other settings than the spec now gives them:\n  "
            + "\n  ".join(stale)
            + "\nmove or delete those run directories, or use another --output_dir" + hint
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
            f"sweep run {run_dir.name!r}: {run_dir} stopped before its first checkpoint, so there is nothing to resume "
            f"from; delete {run_dir} and run the same command again to retrain it"
        ) from None
    checkpoint = run_dir / f"checkpoint-{step}"
    if not any(p.name.startswith("optimizer") for p in checkpoint.iterdir()):
        raise ValueError(
            f"sweep run {run_dir.name!r}: {checkpoint} holds no optimizer state (save_only_model: true), so GRPO cannot "
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
    elif kind == "harness":
        # Scoring each answer choice is one forward pass, not token-by-token sampling.
        names = ev.harness_tasks
        row = sum(ev.limit_for(t) or _UNKNOWN_EVAL_EXAMPLES for t in names) / max(1, len(names)) * 64 * _TEACHER_FORCED
        stage.units = load + len(its) * len(names) * row
        stage.done = stage.units if not _missing_harness(run_dir, ev, its) else 0.0
    elif kind == "kl":
        sample = ev.kl_num_prompts * ev.kl_max_tokens
        stage.units = load + len(ev.kl_tasks) * sample * (1 + 2 * _TEACHER_FORCED * len(its))
        stage.done = stage.units if not _missing_kl(run_dir, ev, its) else 0.0
    else:
        stage.units = load + _REPLAY * step * len(its)
        stage.done = stage.units if not _missing_drift(run_dir, its) else 0.0
    return stage


def _evaluated(run: RunSpec, run_dir: Path, spec: SweepSpec) -> bool:
    """A run left out by --only that the report can show: trained, with every evaluation row the
    spec's eval asks for (a run killed mid-training or scored under an older eval is not)."""
    if not _is_trained(run, run_dir):
        return False
    its = chosen_iterations(_available(run, run_dir), spec.eval.every)
    return _eval_rows_done(run_dir, spec.eval, its, spec.data_dir) >= len(its) * len(spec.eval.tasks)


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
    """kl.json rows made with this eval's prompts and token budget, against the run's origin."""
    from esft.evaluation.runs import measured_against, origin_of  # torch: not at import time

    config = saved_config(run_dir)
    origin = origin_of(run_dir, config)
    return [r for r in _read_rows(run_dir / KL_FILE)
            if r.get("num_prompts") == ev.kl_num_prompts and r.get("max_tokens") == ev.kl_max_tokens
            and measured_against(r, config, origin)]


def _borrow_start_kl(run_dir: Path, ev: EvalSpec) -> bool:
    """A stage's iteration-0 KL rows from the previous stage's last iteration (the same weights,
    the same base-model continuations); True when rows were added."""
    start = stage_start(run_dir)
    if start is None:
        return False
    parent, last = start
    have = {(r.get("iteration"), r.get("task")) for r in _kl_rows(run_dir, ev)}
    rows = [{**r, "iteration": 0, "copied_from": f"{parent.name}@{last}"} for r in _kl_rows(parent, ev)
            if r.get("iteration") == last and r.get("task") in ev.kl_tasks and (0, r.get("task")) not in have]
    if not rows:
        return False
    write_text_atomic(run_dir / KL_FILE, json.dumps(sorted(_read_rows(run_dir / KL_FILE) + rows,
                                                           key=lambda r: (r["iteration"], str(r["task"]))), indent=1) + "\n")
    return True


def _missing_kl(run_dir: Path, ev: EvalSpec, its: Sequence[int]) -> list[int]:
    have = {(r.get("iteration"), r.get("task")) for r in _kl_rows(run_dir, ev)}
    return [k for k in its if any((k, t) not in have for t in ev.kl_tasks)]


def _missing_harness(run_dir: Path, ev: EvalSpec, its: Sequence[int]) -> list[tuple[int | None, list[str]]]:
    """(limit, tasks) groups with a harness row missing at one of `its`."""
    from esft.evaluation.harness import HARNESS_FILE

    rows = read_jsonl(run_dir / "eval" / HARNESS_FILE)
    have = {(r.get("iteration"), r.get("task"), r.get("limit")) for r in rows}
    groups: dict[int | None, list[str]] = {}
    for task in ev.harness_tasks:
        if any((k, task, ev.limit_for(task)) not in have for k in its):
            groups.setdefault(ev.limit_for(task), []).append(task)
    return list(groups.items())


def _drift_rows(run_dir: Path) -> list[dict[str, Any]]:
    """drift.json rows measured against what `esft drift` compares this run with now."""
    from esft.evaluation.runs import drift_reference, measured_against

    config = saved_config(run_dir)
    reference = drift_reference(run_dir, config)
    return [r for r in _read_rows(run_dir / DRIFT_FILE) if measured_against(r, config, reference)]


def _missing_drift(run_dir: Path, its: Sequence[int]) -> list[int]:
    have = {r.get("iteration") for r in _drift_rows(run_dir)}
    return [k for k in its if k not in have]


# -------------------------------------------------------------------- console
class StageRates:
    """Seconds per unit of work, learned per stage kind as stages finish.

    The units (generated tokens) of unlike stages cost unlike seconds: on 2 CPU cores a
    training token cost about 2.5 times an evaluation token in a tiny sweep, so one rate
    since the start gave an ETA that leapt between 11 and 46 minutes as the stages changed.
    Each kind's own rate (any kind's, until that kind has finished once) is what the ETA
    multiplies its remaining units by.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.units: dict[str, float] = {}

    def record(self, kind: str, units: float, seconds: float) -> None:
        if units > 0 and seconds > 0:
            self.units[kind] = self.units.get(kind, 0.0) + units
            self.seconds[kind] = self.seconds.get(kind, 0.0) + seconds

    def rate(self, kind: str) -> float | None:
        if self.units.get(kind):
            return self.seconds[kind] / self.units[kind]
        total = sum(self.units.values())
        return sum(self.seconds.values()) / total if total else None

    def eta(self, remaining: Sequence[tuple[str, float]], current: tuple[str, float, float, float] | None = None,
            ) -> float | None:
        """Seconds left: `remaining` (kind, units) of stages not begun, and `current` (kind,
        units left, seconds spent, units done) of the running one. A kind no stage has
        finished yet takes the pace of all that have, or before any has, the running one's.
        None while nothing has been timed."""
        pace = None
        if current is not None and current[3] > 0:
            pace = current[2] / current[3]
        seconds = 0.0
        stages = ([(current[0], current[1], True)] if current is not None else []) + [(k, u, False) for k, u in remaining]
        for kind, units, running in stages:
            rate = self.rate(kind) if self.units.get(kind) else (pace if running and pace else self.rate(kind) or pace)
            if rate is None:
                return None
            seconds += units * rate
        return seconds


class _Progress:
    """The sweep's one bar with an ETA (stderr), its stage lines (stdout and DIR/sweep.log)."""

    FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {elapsed}{postfix}"

    def __init__(self, stages: list[Stage], log_path: Path, enabled: bool) -> None:
        # The console streams as they are now: stages redirect sys.stdout/err to their logs.
        self.out = sys.stdout
        self.log_path = log_path
        self.lock = threading.Lock()
        self.stages = stages
        self.rates = StageRates()
        self.current: Stage | None = None
        self._began = 0.0
        self._advanced: dict[int, float] = {}  # id(stage) -> units advanced by it in this session
        self._status = ""
        self.bar = tqdm(total=sum(s.units for s in stages), initial=sum(s.done for s in stages), desc="sweep",
                        file=sys.stderr, disable=not enabled, bar_format=self.FORMAT, mininterval=1.0,
                        dynamic_ncols=True)

    def begin(self, stage: Stage) -> None:
        with self.lock:
            self.current, self._began = stage, time.perf_counter()

    def end(self, stage: Stage) -> None:
        with self.lock:
            self.rates.record(stage.kind, self._advanced.get(id(stage), 0.0), time.perf_counter() - self._began)
            self.current = None
            self._refresh()

    def _left(self, stage: Stage) -> float:
        return max(0.0, stage.units - stage.done - self._advanced.get(id(stage), 0.0))

    def eta(self) -> float | None:
        """Seconds left by `StageRates`; the stages are in run order, so those after the
        current one (or all unfinished ones between stages) have not begun."""
        current = self.current
        running = None
        if current is not None:
            running = (current.kind, self._left(current), time.perf_counter() - self._began,
                       self._advanced.get(id(current), 0.0))
        later = [(s.kind, self._left(s)) for s in self.stages if s is not current and self._left(s) > 0]
        return self.rates.eta(later, running)

    def _refresh(self) -> None:
        eta = self.eta()
        when = "ETA ?" if eta is None else f"ETA {_clock(eta)}"
        self.bar.set_postfix_str(f"{when} | {self._status}" if self._status else when, refresh=False)

    def advance(self, units: float, status: str | None = None) -> None:
        with self.lock:
            # Estimates are floats: never past 100% by a rounding error (tqdm warns).
            step = max(0.0, min(units, self.bar.total - self.bar.n))
            if self.current is not None:
                self._advanced[id(self.current)] = self._advanced.get(id(self.current), 0.0) + step
            if status:
                self._status = status
            self._refresh()
            self.bar.update(step)

    def replan(self, before: Stage, after: Stage) -> None:
        """A stage's estimate changed (its run exists now): move the total, count found work as done."""
        with self.lock:
            self.bar.total += after.units - before.units
            self.bar.n += after.done - before.done

    def line(self, text: str) -> None:
        self.bar.write(text, file=self.out)
        with open(self.log_path, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")

    def finish(self) -> None:
        """Everything ran: whatever the estimates said, the bar ends full."""
        self.advance(self.bar.total - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


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
    # A stage of a sequence starts from its previous stage's run (`init_from`).
    cfg = dataclasses.replace(run.resolved(run_dir.parent), resume=resume, disable_tqdm=True)
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
    values = dict(run.grpo_values or {})
    if run.previous:  # a GRPO stage starts from the previous GRPO stage's final model
        values["model"] = str(run_dir.parent / run.previous / "final")
    task_args, cfg = build_grpo(values, str(run_dir), resume)
    trainer = run_grpo(task_args, cfg, callbacks=[StepProgress()])
    steps = int(trainer.state.global_step)
    del trainer
    return steps


def _evaluate(stage: Stage, run_dir: Path, spec: SweepSpec, progress: _Progress) -> str:
    run, ev = stage.run, spec.eval
    its = chosen_iterations(_available(run, run_dir), ev.every)
    # A finished evaluation is skipped without taking the run's lock (a rerun touches nothing).
    if _eval_rows_done(run_dir, ev, its, spec.data_dir) >= len(its) * len(ev.tasks):
        return f"{run.name}: eval already done ({', '.join(ev.tasks)} at {_iters(its)}), skipped"
    with run_lock(run_dir, "evaluation"):  # the borrowed base rows are written into the run too
        return _evaluate_locked(stage, run_dir, spec, progress, its)


def _evaluate_locked(stage: Stage, run_dir: Path, spec: SweepSpec, progress: _Progress, its: list[int]) -> str:
    from esft.evaluation.accuracy import evaluate_run

    run, ev = stage.run, spec.eval
    if 0 in its:
        borrow_base_rows(run_dir)
        borrow_start_rows(run_dir)
    total_rows = len(its) * len(ev.tasks)
    done = _eval_rows_done(run_dir, ev, its, spec.data_dir)
    # evaluate_run resumes by itself, but is not called when nothing is left (no model to load).
    if done >= total_rows:
        return f"{run.name}: eval done with the base model's rows of another run ({_iters(its)})"
    t0 = time.perf_counter()
    per_row = (stage.units - stage.done) / (total_rows - done)
    with _run_output(run_dir / LOG_FILE, f"eval {run.name}"), _RowWatcher(
        lambda: _eval_rows_done(run_dir, ev, its, spec.data_dir), progress, per_row, f"{run.name}: eval rows"
    ):
        for limit, tasks in ev.task_groups():
            evaluate_run(run_dir, tasks, iterations=its, limit=limit, max_new_tokens=ev.max_new_tokens,
                         batch_size=ev.batch_size, data_dir=spec.data_dir, device=spec.device, progress=False)
    return f"{run.name}: evaluated {', '.join(ev.tasks)} at iterations {_iters(its)} in {_seconds(t0)}"


def _harness(stage: Stage, run_dir: Path, spec: SweepSpec, progress: _Progress) -> str:
    from esft.evaluation import harness

    run, ev = stage.run, spec.eval
    its = chosen_iterations(_available(run, run_dir), ev.every)
    missing = _missing_harness(run_dir, ev, its)
    if not missing:
        return f"{run.name}: lm-evaluation-harness already done, skipped"
    t0 = time.perf_counter()
    progress.advance(0, f"{run.name}: lm-evaluation-harness")
    with _run_output(run_dir / LOG_FILE, f"harness {run.name}"):
        for limit, tasks in missing:
            harness.evaluate_run(run_dir, tasks, iterations=its, limit=limit, data_dir=spec.data_dir,
                                 device=spec.device, progress=False)
    progress.advance(stage.units - stage.done)
    return f"{run.name}: lm-evaluation-harness on {', '.join(ev.harness_tasks)} at iterations {_iters(its)} in {_seconds(t0)}"


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
        if 0 in missing and _borrow_start_kl(run_dir, ev):
            missing = _missing_kl(run_dir, ev, its)
            if not missing:
                progress.advance(stage.units - stage.done)
                return f"{run.name}: KL at iteration 0 taken from the previous stage's last"
        with _run_output(run_dir / LOG_FILE, f"kl {run.name}"):
            rows = kl_report(run_dir, list(ev.kl_tasks), iterations=missing, num_prompts=ev.kl_num_prompts,
                             max_tokens=ev.kl_max_tokens, data_dir=spec.data_dir, device=spec.device)
        # The settings travel with the rows, so a rerun with other settings recomputes them.
        rows = [{**r, "num_prompts": ev.kl_num_prompts, "max_tokens": ev.kl_max_tokens} for r in rows]
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
        kept = [r for r in _drift_rows(run_dir) if r.get("iteration") not in missing]
        merged = sorted(kept + rows, key=lambda r: r["iteration"])
        write_text_atomic(run_dir / DRIFT_FILE, json.dumps(merged, indent=1) + "\n")
    progress.advance(stage.units - stage.done)
    return f"{run.name}: drift at iterations {_iters(missing)} in {_seconds(t0)}"


# ------------------------------------------------------------------------ sweep
def run_sweep(spec: SweepSpec | Mapping[str, Any] | str | Path, output_dir: str | Path, progress: bool = True,
              only: Sequence[str] | None = None) -> Path:
    """Train, evaluate and report every run of `spec` in `output_dir`; returns report.md's path.

    Validates the whole spec first (nothing is created for a bad one); rerunning after a
    crash finishes the work without redoing any. `only`: shell-style patterns of the run
    names (or sequence arms) to train and measure now; the report still covers every run of
    the spec already evaluated in `output_dir`.
    """
    spec = as_spec(spec)
    chosen = select(spec, only) if only else spec
    out = Path(output_dir)
    _check_existing_runs(spec, out)
    with run_lock(out, "sweep"):  # two sweeps on one DIR would train the same runs at once
        return _run_sweep(chosen, out, progress, reported=spec.runs)


def _run_sweep(spec: SweepSpec, out: Path, progress: bool, reported: Sequence[RunSpec] | None = None) -> Path:
    text = yaml.safe_dump(spec.data, sort_keys=False, allow_unicode=True)
    if not (out / SPEC_FILE).exists() or (out / SPEC_FILE).read_text() != text:
        write_text_atomic(out / SPEC_FILE, text)
    print(f"sweep: {len(spec.runs)} runs in {out}, report in {out / REPORT_DIR}", flush=True)
    kinds = ["eval"] + (["harness"] if spec.eval.harness else []) + (["kl"] if spec.eval.kl_tasks else []) + ["drift"]
    stages = [Stage(r, "train") for r in spec.runs] + [Stage(r, k) for r in spec.runs for k in kinds]
    for s in stages:
        _measure(s, out / s.run.name, spec.eval, spec.data_dir)
    for run in spec.runs:
        if run.is_grpo and not _is_trained(run, out / run.name):
            _grpo_resume_point(out / run.name)  # a GRPO arm that cannot resume fails now, not after the ES runs
    bar = _Progress(stages, out / LOG_FILE, progress)
    try:
        for s in stages:
            bar.begin(s)
            line = _run_stage(s, out / s.run.name, spec, bar)
            bar.end(s)
            bar.line(line)
        with _run_output(out / LOG_FILE, "report"):
            from esft.report.runs import build_report

            ran = {r.name for r in spec.runs}
            report = build_report([out / r.name for r in (reported or spec.runs)
                                   if r.name in ran or _evaluated(r, out / r.name, spec)], out / REPORT_DIR)
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
    step = {"eval": _evaluate, "harness": _harness, "kl": _kl, "drift": _drift}[stage.kind]
    return step(stage, run_dir, spec, progress)


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
    p.add_argument("--only", default=None, metavar="PATTERNS",
                   help="comma-separated shell-style patterns of run names (or sequence arms) to run now, e.g. "
                        "'t40-*,grpo-seed1'; a chosen stage brings the stages before it; the report covers every "
                        "run of the spec already evaluated in the directory (default: every run)")
    a = p.parse_args(list(argv))
    full = load_spec(a.spec)
    only = None
    if a.only is not None:
        only = [x.strip() for x in a.only.split(",") if x.strip()]
        if not only:
            p.error("--only: expected at least one run name or pattern")
    spec = select(full, only) if only else full  # a pattern matching nothing fails here, before anything runs
    out = Path(a.output_dir or Path("runs") / Path(a.spec).stem)
    if a.dry_run:
        print(f"sweep: {len(spec.runs)} runs in {out}, report in {out / REPORT_DIR} (dry run: nothing runs)")
        print(describe(spec))
        return 0
    run_sweep(full, out, progress=not a.no_progress, only=only)
    return 0


__all__ = [
    "EvalSpec", "RunSpec", "SweepSpec", "chosen_iterations", "derived_name", "describe", "expand_grid",
    "grpo_run_args", "load_spec", "main", "parse_spec", "run_sweep",
]
