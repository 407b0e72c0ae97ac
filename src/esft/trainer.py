"""ESTrainer: the ES loop, its run directory, checkpoints and callbacks.

The arithmetic lives elsewhere (es.py: the plan and the coefficients; population.py:
scoring; seedlog.py: applying and replaying records; anchor.py and awd_schedule.py: AWD
and its step); this file only orders the steps and records them, so that a run is fully
described by its seed log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from esft import es
from esft.anchor import AnchorFile
from esft.awd_schedule import AWDSchedule, FixedStep, KLBudget
from esft.callbacks import EvalCallback, TrainerCallback
from esft.config import AUTO, ESConfig
from esft.engine import HFEngine
from esft.io import ensure_writable_dir, read_jsonl, remove_temp_files, write_text_atomic
from esft.metric_sinks import MetricsWriter
from esft.params import WeightState
from esft.population import LocalPopulation, Population
from esft.rewards import RewardGuard
from esft.runlock import run_lock
from esft.seedlog import (
    ANCHOR_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    IterationRecord,
    SeedLog,
    apply_record,
    checked_anchor,
    checkpoint_steps,
    discard_temporary,
    prepare_start,
    restore,
    save_hf_dir,
)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------ trainer
def _warn_on_shared_noise(cfg: ESConfig) -> None:
    """A run that starts from another with the same seed and noise stream perturbs along that
    run's directions, iteration by iteration: a reward opposite to the earlier one then steps
    straight back along them. Legal (and reproducible), rarely meant."""
    earlier = ESConfig.from_yaml(Path(cfg.init_from) / CONFIG_FILE)
    if (earlier.seed, earlier.noise_stream) == (cfg.seed, cfg.noise_stream):
        log.warning("this run draws the same noise seeds as the run it starts from (%s: seed %d, noise_stream %d); "
                    "set --noise_stream %d (what esft sweep gives a sequence's next stage) for fresh directions",
                    cfg.init_from, cfg.seed, cfg.noise_stream, cfg.noise_stream + 1)


class ESTrainer:
    """Fine-tune a causal LM with Evolution Strategies (+ optional Anchored Weight Decay).

    Either `task` (a name or a Task object) or `reward_funcs` (TRL signature
    `f(prompts, completions, **columns) -> list[float]`, with `train_dataset` holding a
    `prompt` column) defines the reward.
    """

    def __init__(
        self,
        model: str | torch.nn.Module | None = None,
        reward_funcs: Callable[..., list[float]] | Sequence[Callable[..., list[float]]] | None = None,
        args: ESConfig | None = None,
        train_dataset: Any = None,
        task: Any = None,
        processing_class: Any = None,
        callbacks: Sequence[TrainerCallback] = (),
    ) -> None:
        self.args = dataclasses.replace(args) if args is not None else ESConfig()
        cfg = self.args
        if cfg.init_from:  # config.yaml names it absolutely: it is read from other directories
            cfg.init_from = str(Path(cfg.init_from).resolve())
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        # Inputs that need no model are checked before the run directory is created, so a
        # bad KL prompt file or task leaves nothing behind (it once left 514 MB).
        self._kl_conversations = self._checked_kl_inputs(cfg)
        self.callbacks = list(callbacks)
        if cfg.eval_tasks:
            self.callbacks.append(EvalCallback(
                [t.strip() for t in cfg.eval_tasks.split(",") if t.strip()], cfg.eval_steps, cfg.eval_limit,
                cfg.eval_max_new_tokens, cfg.generation_batch_size, cfg.data_dir,
            ))
        self.run_dir = ensure_writable_dir(cfg.output_dir)
        # One writer per run directory, from now (before the model loads, so a second process
        # is refused at once) to the end of train().
        self._held = contextlib.ExitStack()
        self._held.enter_context(run_lock(self.run_dir, "training"))
        self.reward_guard: RewardGuard | None = None
        try:
            self._build(model, reward_funcs, train_dataset, task, processing_class)
        except BaseException:
            self.close()
            raise

    def _build(self, model: Any, reward_funcs: Any, train_dataset: Any, task: Any, processing_class: Any) -> None:
        from esft.models import load_model, load_tokenizer
        from esft.tasks import get_task

        cfg = self.args
        # The reward: a built-in/custom task, or TRL-style functions over a dataset.
        if reward_funcs is not None:
            from esft.tasks.custom import CustomTask

            funcs = list(reward_funcs) if isinstance(reward_funcs, Sequence) else [reward_funcs]
            if train_dataset is None:
                raise ValueError("reward_funcs need a train_dataset with a 'prompt' column")
            self.task = CustomTask.from_functions(funcs, train_dataset)
            train_dataset = None
        elif task is None or isinstance(task, str):
            self.task = get_task(
                task or cfg.task, data_dir=cfg.data_dir, dataset=cfg.dataset, seed=cfg.seed,
                prefill=cfg.assistant_prefill,
            )
        else:
            self.task = task
        # User reward functions run in worker processes forked now, before the model loads,
        # so that they never hold a copy-on-write share of its pages.
        self.reward_guard = RewardGuard.from_config(cfg)
        self.reward_guard.prepare(self.task)
        self.train_examples = list(train_dataset) if train_dataset is not None else self.task.load("train")
        if cfg.max_train_samples is not None:
            self.train_examples = self.train_examples[: cfg.max_train_samples]
        if not self.train_examples:
            raise ValueError(f"task {self.task.name!r} has no training examples")

        if model is None or isinstance(model, str):
            name = model or cfg.model
            self.model, self.tokenizer = load_model(name, cfg.torch_dtype, cfg.device)
            # What Ray actors load: by name when the model has one, else the object itself.
            self.model_source: str | torch.nn.Module = name
        else:
            self.model = model.eval().requires_grad_(False)
            self.tokenizer = processing_class or load_tokenizer(getattr(model, "name_or_path", ""))
            name = getattr(model.config, "_name_or_path", "") or ""
            self.model_source = name if _loadable(name) else self.model
            name = name or f"<in-memory {type(model).__name__}>"
        if processing_class is not None:
            self.tokenizer = processing_class
        # config.yaml must name what was really trained, or replay would rebuild another
        # model (on the caller's own copy of the config: theirs is never changed).
        cfg.model = name
        cfg.task = self.task.name

        self.state = WeightState.from_config(self.model, cfg)
        # A stage of a task sequence starts from the previous stage's final weights.
        # (θ₀ of a resumed run is its file; a fresh start writes it anew, whatever a failed start left.)
        resumed = cfg.resume and bool(SeedLog(self.run_dir).records())
        self._base_anchor = prepare_start(cfg, self.state, self.run_dir / ANCHOR_FILE if resumed else None)
        if cfg.init_from and not resumed:
            _warn_on_shared_noise(cfg)
        self.engine = HFEngine(self.model, self.tokenizer, cfg.max_new_tokens, cfg.generation_batch_size)
        self.seedlog = SeedLog(self.run_dir)
        self.anchor: AnchorFile | None = None
        self.iteration = 0
        self.history: list[dict[str, Any]] = []
        self.schedule: AWDSchedule | None = None
        self._last_kl: float | None = None

    @staticmethod
    def _checked_kl_inputs(cfg: ESConfig) -> Any:
        if cfg.kl_budget is None:
            return None
        from esft.kl_budget import kl_conversations

        if cfg.awd == "none":
            log.info("--kl_budget %g drives an AWD L2 step: the run applies L2 anchored weight decay "
                     "(as --awd l2 would) with the step the budget plans", cfg.kl_budget)
        return kl_conversations(cfg)

    # ------------------------------------------------------------- run directory
    def _prepare_run_dir(self) -> list[IterationRecord]:
        """Write or check config.yaml and θ₀; return the records to resume from."""
        cfg = self.args
        config_path = self.run_dir / CONFIG_FILE
        removed = remove_temp_files(self.run_dir)
        if removed:
            log.info("removed %d temporary file(s) an interrupted save left in %s", len(removed), self.run_dir)
        records = self.seedlog.records(repair=True)
        if records and not cfg.resume:
            raise ValueError(
                f"{self.run_dir} already holds a run ({len(records)} iterations logged); "
                "pass --resume to continue it or choose another --output_dir"
            )
        if records:
            if not config_path.exists():
                raise ValueError(f"--resume: {config_path} is missing, so there is no run to resume")
            diffs = cfg.differences(ESConfig.from_yaml(config_path))
            if diffs:
                raise ValueError(
                    "--resume refused: the config differs from the run's config.yaml in:\n  "
                    + "\n  ".join(diffs)
                )
        elif config_path.exists():
            # A start that failed before its first iteration was logged: nothing to lose.
            log.info("%s holds no logged iteration: starting it afresh", self.run_dir)
        if len(records) > cfg.max_steps:
            raise ValueError(f"the run already has {len(records)} iterations > max_steps={cfg.max_steps}")
        saved_dict = cfg.to_dict()
        saved_dict["resume"] = False
        write_text_atomic(config_path, yaml.safe_dump(saved_dict, sort_keys=False))
        anchor_path = self.run_dir / ANCHOR_FILE
        self.anchor = checked_anchor(anchor_path, self.state) if records else None
        if self.anchor is None:
            # θ₀ = the weights the model holds before any replay (the base model, or the run's
            # start with init_from), or the base kept aside when a stage is anchored at it.
            theta0 = ((n, self._base_anchor.get(n)) for n in self.state.names) if self._base_anchor else self.state.items()
            self.anchor = AnchorFile.write(anchor_path, theta0)
        discard_temporary(self._base_anchor)  # copied into the run (or not needed): free /tmp now
        self._base_anchor = None
        self._theta0_norm = self.anchor.norm(self.state.names)
        return records

    def _restore_from(self, records: list[IterationRecord]) -> list[dict[str, Any]]:
        """Rebuild the weights after the last logged iteration: checkpoint + replay.

        A kill can lose a checkpoint being written or the metrics line after a logged
        iteration: those iterations are replayed (from the latest good checkpoint before
        the first gap), their checkpoints rewritten and their metrics rebuilt from the
        seed log (without timings, marked `metrics/rebuilt`). Returns the metrics rows.
        """
        cfg, n = self.args, len(records)
        history = [m for m in read_jsonl(self.run_dir / METRICS_FILE, repair=True) if m.get("iteration", 0) <= n]
        logged = {m.get("iteration") for m in history}
        saved = set(checkpoint_steps(self.run_dir))
        missing_ckpt = {k for k in range(cfg.save_steps, n + 1, cfg.save_steps) if k not in saved} if cfg.save_steps else set()
        missing_metrics = {k for k in range(1, n + 1) if k not in logged}
        first_gap = min(missing_ckpt | missing_metrics, default=n + 1)

        def replayed(rec: IterationRecord, update_norm: float, drift: float | None) -> None:
            if rec.iteration in missing_ckpt:
                save_hf_dir(self.run_dir / f"checkpoint-{rec.iteration}", self.state, self.tokenizer,
                            {"iteration": rec.iteration})
            if rec.iteration in missing_metrics:
                history.append(self._rebuilt_metrics(rec, update_norm, drift))

        count = restore(self.state, self.run_dir, n, records, cfg, self.anchor, progress=not cfg.disable_tqdm,
                        start_at_most=first_gap - 1, on_replayed=replayed if first_gap <= n else None)
        self.iteration = n
        log.info("resumed after iteration %d (checkpoint %d + %d replayed; %d checkpoint(s) rewritten, "
                 "%d metrics line(s) rebuilt)", n, n - count, count, len(missing_ckpt), len(missing_metrics))
        return sorted(history, key=lambda m: m.get("iteration", 0))

    def _rebuilt_metrics(self, rec: IterationRecord, update_norm: float, drift: float | None) -> dict[str, Any]:
        """What the seed log and a replay tell of an iteration whose metrics line was lost."""
        drift = float(drift or 0.0)
        return {
            "iteration": rec.iteration,
            **es.reward_summary(rec.rewards),
            "es/skipped": rec.skipped, "es/update_norm": update_norm,
            "drift/norm": drift, "drift/relative": drift / self._theta0_norm if self._theta0_norm else 0.0,
            "params/trainable": self.state.num_parameters,
            "metrics/rebuilt": True,
        }

    # --------------------------------------------------------------------- train
    def train(self) -> list[dict[str, Any]]:
        """Run (or resume) to `max_steps`. The run directory is locked from the trainer's
        construction to the end, so a second process writing into it is refused at once
        instead of interleaving records."""
        try:
            with run_lock(self.run_dir, "training"):
                return self._train()
        finally:
            self.close()

    def close(self) -> None:
        """End the reward workers and release the run directory (train() does both when it
        ends; call it for a trainer that is built and never trained)."""
        if self.reward_guard is not None:
            self.reward_guard.close()  # a later train() (or evaluation) starts new workers
        self._held.close()

    def _train(self) -> list[dict[str, Any]]:
        cfg = self.args
        self.prompts = self.engine.encode([self.task.messages(ex) for ex in self.train_examples])
        # Connect to Ray (if asked) before the run directory is written: a wrong address
        # or a missing extra must not leave a half-created run behind.
        self.population = self._make_population(self.prompts)
        try:
            records = self._prepare_run_dir()
            self.history = self._restore_from(records) if records else []
            self.schedule = self._awd_schedule(records)
            self.population.start(self.iteration)
        except BaseException:
            self.population.close()
            raise
        log.info("run directory %s: seedlog.jsonl, metrics.jsonl, checkpoints, final/ (%d of %d iterations done)",
                 self.run_dir, self.iteration, cfg.max_steps)
        # A fresh run starts an empty metrics file; a resumed one keeps (and completes) its lines.
        write_text_atomic(self.run_dir / METRICS_FILE, "".join(_json_line(m) for m in self.history))
        writer = MetricsWriter(self.run_dir, cfg.report_to, cfg.to_dict())
        for cb in self.callbacks:
            cb.on_train_begin(self)
        bar = tqdm(
            total=cfg.max_steps, initial=self.iteration, desc="ES", unit="it", disable=cfg.disable_tqdm,
            dynamic_ncols=True,
        )
        kl_cost_logged = False  # said once, at the first KL measurement
        try:
            while self.iteration < cfg.max_steps:
                metrics = self._iteration(self.iteration + 1)
                self.iteration += 1
                writer.log(metrics)
                self.history.append(metrics)
                bar.update(1)
                bar.set_postfix(_postfix(metrics, self._last_kl))
                self._last_kl = metrics.get("kl/measured", self._last_kl)
                if "time/kl" in metrics and not kl_cost_logged:
                    _log_kl_cost(metrics, cfg.kl_every)
                    kl_cost_logged = True
                if cfg.logging_steps and self.iteration % cfg.logging_steps == 0:
                    bar.write(_format_metrics(metrics))
                if cfg.save_steps and self.iteration % cfg.save_steps == 0:
                    self.save_checkpoint()
                for cb in self.callbacks:
                    cb.on_iteration_end(self, metrics)
        finally:
            bar.close()
            writer.close()
            self.population.close()
        self.save_model(self.run_dir / "final")
        for cb in self.callbacks:
            cb.on_train_end(self)
        return self.history

    def _make_population(self, prompts: list[list[int]]) -> Population:
        """In-process scoring, or Ray actors when `--workers` is set."""
        if self.args.workers:
            from esft.distributed import RayPopulation

            return RayPopulation(
                self.args, self.state, self.model_source, self.tokenizer, self.task, self.train_examples, prompts,
                anchor_path=self.run_dir / ANCHOR_FILE,
            )
        return LocalPopulation(self.args, self.state, self.engine, self.task, self.train_examples, prompts,
                               guard=self.reward_guard)

    def plan(self, iteration: int, num_prompts: int, population: Population) -> es.IterationPlan:
        """The iteration's seeds, members, prompt subset and member groups, decided once."""
        cfg = self.args
        return es.plan_iteration(
            cfg.seed, iteration, cfg.num_seeds, cfg.mirror_sampling, num_prompts, cfg.prompts_per_step,
            population.max_group(), cfg.noise_stream,
        )

    def evaluate_population(
        self, iteration: int, prompts: list[list[int]]
    ) -> tuple[list[int], list[float], dict[str, Any]]:
        """Score every member of `iteration` in-process; weights end bitwise as they began.

        Returns (seeds, one mean reward per member, timing/throughput stats).
        """
        population = LocalPopulation(self.args, self.state, self.engine, self.task, self.train_examples, prompts,
                                     guard=self.reward_guard)
        plan = self.plan(iteration, len(prompts), population)
        res = population.score(plan)
        return plan.seeds, res.rewards, {"subset": plan.subset, **res.stats}

    def _iteration(self, iteration: int) -> dict[str, Any]:
        cfg = self.args
        t_start = time.perf_counter()
        plan = self.plan(iteration, len(self.prompts), self.population)
        res = self.population.score(plan)
        rewards = res.rewards
        t_gen, t_perturb, tokens = res.stats["generation"], res.stats["perturb_restore"], res.stats["tokens"]
        t_score_end = time.perf_counter()
        coeffs = es.coefficients(rewards, cfg.mirror_sampling)
        # The seed log holds only what decides the weights (no timings), so two runs of
        # one config, in-process or on Ray workers, write the same file.
        extra = {"prompts": plan.subset if cfg.prompts_per_step else None}
        if self.schedule is not None:
            extra.update(self.schedule.record_fields(coeffs))  # the AWD step this iteration applies
        record = IterationRecord(iteration, plan.seeds, rewards, coeffs, extra=extra)
        self.population.begin_update(record)  # Ray replicas update while the driver does
        update_norm, drift = apply_record(self.state, record, cfg, self.anchor)
        t_update = time.perf_counter() - t_score_end
        schedule_metrics = self.schedule.after_update(record, float(drift or 0.0)) if self.schedule is not None else {}
        # The log line is the commit point: once written, a resume trusts this iteration.
        self.seedlog.append(record)
        worker_metrics = self.population.after_update(record)
        t_total = time.perf_counter() - t_start
        drift = float(drift or 0.0)
        return {
            "iteration": iteration,
            **es.reward_summary(rewards),
            "reward/errors": res.reward_errors,
            "es/skipped": coeffs is None,
            "es/update_norm": update_norm,
            "drift/norm": drift,
            "drift/relative": drift / self._theta0_norm if self._theta0_norm else 0.0,
            # d, the number of trained weights: the report's random-walk prediction needs it.
            "params/trainable": self.state.num_parameters,
            "time/generation": t_gen,
            "time/perturb_restore": t_perturb,
            "time/update": t_update,
            "time/iteration": t_total,
            "tokens/generated": tokens,
            "tokens/per_second": tokens / t_gen if t_gen else 0.0,
            "completions/mean_tokens": tokens / res.stats["completions"],
            **schedule_metrics,
            **res.metrics,
            **worker_metrics,
        }

    def _awd_schedule(self, records: list[IterationRecord]) -> AWDSchedule | None:
        """Who decides each iteration's AWD step when it is not a fixed α·λ."""
        cfg = self.args
        schedule: AWDSchedule | None = None
        if cfg.kl_budget is not None:
            from esft.kl_budget import KLMonitor

            monitor = KLMonitor(cfg, self.state, self.engine, self.anchor, self.run_dir,
                                conversations=self._kl_conversations)
            schedule = KLBudget(cfg, monitor, self.state.num_parameters)
        elif cfg.awd_lambda == AUTO:
            from esft.auto_lambda import choose_step

            schedule = FixedStep(cfg, choose_step(self, records))
        if schedule is not None and records:
            schedule.resume(records)
        return schedule

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        path = self.run_dir / f"checkpoint-{self.iteration}"
        save_hf_dir(path, self.state, self.tokenizer, {"iteration": self.iteration})
        return path

    def save_model(self, output_dir: str | Path | None = None) -> Path:
        path = Path(output_dir or self.run_dir / "final")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_hf_dir(path, self.state, self.tokenizer, {"iteration": self.iteration})
        return path


def _json_line(d: dict[str, Any]) -> str:
    import json

    return json.dumps(d) + "\n"


def _postfix(m: dict[str, Any], last_kl: float | None) -> dict[str, str]:
    """The progress bar's numbers: reward, drift and, with a KL budget, the KL and AWD step."""
    out = {"reward": f"{m['reward/mean']:.3g}", "max": f"{m['reward/max']:.3g}", "drift": f"{m['drift/norm']:.3g}"}
    kl = m.get("kl/measured", last_kl)
    if "kl/budget" in m:
        out["kl"] = f"{kl:.3g}/{m['kl/budget']:.3g}" if kl is not None else f"–/{m['kl/budget']:.3g}"
    if "awd/step" in m:
        out["awd"] = f"{m['awd/step']:.2g}"
    return out


def _log_kl_cost(m: dict[str, Any], every: int) -> None:
    """What the KL budget's measurements cost, once the first one is timed: so a user can
    pick `--kl_every` before the overhead adds up."""
    rest = m["time/iteration"] - m["time/kl"] - m.get("time/kl_probe", 0.0)  # the iteration's own work
    share = m["time/kl"] / rest if rest > 0 else 0.0
    log.info("KL measurement: %.1f s = %.0f%% of an iteration's own time; at --kl_every %d it adds about %.0f%% "
             "to training, and the probe and the final check one measurement each (each is one forward pass over "
             "every KL prompt)", m["time/kl"], 100 * share, every, 100 * share / every)


def _format_metrics(m: dict[str, Any]) -> str:
    skipped = " (update skipped: equal rewards)" if m["es/skipped"] else ""
    errs = f" reward_errors={m['reward/errors']}" if m["reward/errors"] else ""
    # One term per reward function when there are several (rewards/<name>/mean).
    parts = "".join(
        f" {k.split('/')[1]}={v:.4g}" for k, v in m.items() if k.startswith("rewards/") and k.endswith("/mean")
    )
    if "kl/measured" in m:
        parts += f"  KL={m['kl/measured']:.4g}/{m['kl/budget']:.3g}"
    if "awd/step" in m:
        parts += f"  awd_step={m['awd/step']:.3g}"
    return (
        f"iter {m['iteration']:>4}  reward mean={m['reward/mean']:.4g} max={m['reward/max']:.4g} "
        f"std={m['reward/std']:.3g}{parts}  |Δθ|={m['es/update_norm']:.3g}  |θ−θ₀|={m['drift/norm']:.4g} "
        f"gen={m['time/generation']:.1f}s es={m['time/perturb_restore'] + m['time/update']:.1f}s "
        f"{m['tokens/per_second']:.0f} tok/s{errs}{skipped}"
    )


def _loadable(name: str) -> bool:
    """Whether a model can be loaded again by `name` (Ray actors, replay)."""
    return bool(name) and (name == "embedded" or Path(name).exists() or "/" in name)


__all__ = ["ESTrainer"]
