"""A run is its seed log (DESIGN.md, principle 1): the run directory and its replay.

Each finished iteration appends one record: `iteration`, `seeds`, `rewards`,
`coefficients` (null when the update was skipped) and the prompt subset; timings
live in metrics.jsonl, so the log is a pure function of the config. The weights after
iteration k are base weights + the updates of records 1..k (+ AWD after each), which is
all that replay, resume, evaluation and distributed catch-up ever need: they all go
through `apply_record` and `restore` here, and checkpoints are only a cache of the log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from tqdm.auto import tqdm

from esft import es
from esft.anchor import AnchorFile, DamagedAnchorError, anchor_and_drift
from esft.config import ESConfig
from esft.io import MODEL_MARKER, append_jsonl, read_jsonl, write_dir_atomic, write_text_atomic

if TYPE_CHECKING:
    from esft.params import WeightState

log = logging.getLogger(__name__)

SEEDLOG = "seedlog.jsonl"
#: Key of the AWD step an adaptive run applied at an iteration (part of its record).
AWD_STEP_KEY = "awd_step"
CONFIG_FILE = "config.yaml"
ANCHOR_FILE = "theta0.safetensors"
METRICS_FILE = "metrics.jsonl"
STATE_FILE = MODEL_MARKER  # in every saved model directory: its iteration (and the marker saves check)


@dataclass
class IterationRecord:
    iteration: int
    seeds: list[int]
    rewards: list[float]
    coefficients: list[float] | None  # None: all rewards equal, update skipped
    extra: dict[str, Any]

    @property
    def skipped(self) -> bool:
        return self.coefficients is None

    def to_json(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "seeds": self.seeds,
            "rewards": self.rewards,
            "coefficients": self.coefficients,
            "skipped": self.skipped,
            **self.extra,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> IterationRecord:
        known = {"iteration", "seeds", "rewards", "coefficients", "skipped"}
        return cls(
            iteration=int(d["iteration"]),
            seeds=[int(s) for s in d["seeds"]],
            rewards=[float(r) for r in d["rewards"]],
            coefficients=None if d.get("coefficients") is None else [float(c) for c in d["coefficients"]],
            extra={k: v for k, v in d.items() if k not in known},
        )


class SeedLog:
    """The append-only log file of a run directory."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / SEEDLOG

    def records(self, repair: bool = False) -> list[IterationRecord]:
        recs = [IterationRecord.from_json(d) for d in read_jsonl(self.path, repair=repair)]
        for expected, rec in enumerate(recs, start=1):
            if rec.iteration != expected:
                raise ValueError(
                    f"{self.path} is out of order: record {expected} says iteration {rec.iteration}"
                )
        return recs

    def append(self, record: IterationRecord) -> None:
        append_jsonl(self.path, record.to_json())


# ------------------------------------------------------------------------ weights
def apply_record(
    state: WeightState, record: IterationRecord, config: ESConfig, anchor: AnchorFile | None,
    compute_drift: bool = True,
) -> tuple[float, float | None]:
    """Apply one logged iteration to the weights: the update, then AWD.

    Training, replay and Ray workers all call this, so a replay repeats the same
    operations in the same order and reaches the same bits. Returns (‖Δθ‖, ‖θ − θ₀‖ or None).
    """
    update_norm = 0.0
    if record.coefficients is not None:
        scale = es.update_scale(config.learning_rate, config.population_size)
        update_norm = state.apply_update(record.seeds, record.coefficients, scale)
    step = record_awd_step(record, config)
    # No update, or a zero step (an adaptive run below its budget): no AWD pass, plain ES bits.
    penalty = config.awd_penalty if record.coefficients is not None and step > 0 else "none"
    drift = None
    if anchor is not None and (compute_drift or penalty != "none"):
        # A host master is anchored where its tensors compute, so its bits are a device master's.
        devices = dict(zip(state.names, state.devices)) if state.host_master else None
        drift = anchor_and_drift(state.items(), anchor, penalty, step, config.awd_huber_delta, devices)
        state.sync_rest()
    return update_norm, drift


def record_awd_step(record: IterationRecord, config: ESConfig) -> float:
    """The AWD step of an iteration: the one its record holds (adaptive runs: auto λ, a KL
    budget), else the config's fixed α·λ. Replay, resume and Ray actors all read it here."""
    step = record.extra.get(AWD_STEP_KEY)
    if step is not None:
        return float(step)
    if config.adaptive_awd:
        raise ValueError(f"record {record.iteration} of an adaptive-AWD run lacks its '{AWD_STEP_KEY}'")
    return config.awd_step if config.awd != "none" else 0.0


# -------------------------------------------------------------------- checkpoints
def checkpoint_steps(run_dir: str | Path) -> list[int]:
    """Iterations of the complete `checkpoint-<k>/` directories (written atomically, so present = complete)."""
    steps = []
    for p in Path(run_dir).iterdir():
        name, _, k = p.name.partition("-")
        if name == "checkpoint" and k.isdigit() and p.is_dir():
            steps.append(int(k))
    return sorted(steps)


def load_checkpoint_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {path}")
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def save_hf_dir(path: str | Path, state: WeightState, tokenizer: Any, extra: dict[str, Any]) -> None:
    """An HF directory (loadable by from_pretrained) holding the fp32 masters, atomically.

    Its STATE_FILE records the masters' checksum, so a restore can tell a damaged
    checkpoint from a good one; it also marks the folder as esft's own model, which a
    later save may replace (and nothing else: `io.check_replaceable`).
    """
    extra = {**extra, "checksum": state.checksum()}

    def fill(tmp: Path) -> None:
        state.model.save_pretrained(tmp, state_dict=state.state_dict())
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_text_atomic(tmp / STATE_FILE, yaml.safe_dump(extra))

    write_dir_atomic(path, fill)


def verified_checkpoint(path: Path, names: list[str]) -> dict[str, torch.Tensor] | None:
    """The trainable tensors of a checkpoint if they hold the bits recorded at save time.

    None (with a warning) for a checkpoint that cannot be read, lacks a tensor or fails its
    checksum: the seed log rebuilds what it held. Checkpoints saved before checksums were
    recorded are trusted as they are.
    """
    from esft.params import tensors_checksum

    try:
        tensors = load_checkpoint_tensors(path)
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ValueError(f"it lacks trainable tensors {missing[:3]}")
        tensors = {n: tensors[n].to(torch.float32) for n in names}
        state_file = path / STATE_FILE
        recorded = (yaml.safe_load(state_file.read_text()) or {}).get("checksum") if state_file.exists() else None
        if recorded is not None and tensors_checksum(tensors.items()) != recorded:
            raise ValueError("its tensors do not hold the bits recorded when it was saved (checksum mismatch)")
        return tensors
    except Exception as e:  # noqa: BLE001 - any damage (truncation, bad header, flips) means: do not trust it
        log.warning("checkpoint %s is damaged (%s); using an earlier checkpoint and the seed log instead", path, e)
        return None


# ------------------------------------------------------------------------- replay
def restore(
    state: WeightState, run_dir: str | Path, upto: int, records: list[IterationRecord], config: ESConfig,
    anchor: AnchorFile | None, current: int = 0, use_checkpoints: bool = True, progress: bool = False,
    start_at_most: int | None = None, on_replayed: Callable[[IterationRecord, float, float | None], None] | None = None,
) -> int:
    """Bring `state` from the weights after iteration `current` to those after `upto`.

    Jumps to the latest good checkpoint in (current, min(upto, start_at_most)] (a cache of
    the log, bitwise equal to its replay; a damaged one is skipped with a warning) unless
    `use_checkpoints` is off, then replays the remaining records, calling
    `on_replayed(record, ‖Δθ‖, ‖θ − θ₀‖)` after each. Resume, `esft replay`, evaluation and
    drift all rebuild weights through here. Returns the number of records replayed.
    """
    if not current <= upto <= len(records):
        raise ValueError(f"cannot restore iteration {upto} from iteration {current} with {len(records)} records")
    last = upto if start_at_most is None else min(upto, start_at_most)
    usable = [k for k in checkpoint_steps(run_dir) if current < k <= last] if use_checkpoints else []
    for k in reversed(usable):
        tensors = verified_checkpoint(Path(run_dir) / f"checkpoint-{k}", state.names)
        if tensors is not None:
            state.load_masters(tensors)
            current = k
            break
    todo = records[current:upto]
    for rec in tqdm(todo, desc="replaying seed log", disable=not progress or not todo, leave=False):
        update_norm, drift = apply_record(state, rec, config, anchor, compute_drift=on_replayed is not None)
        if on_replayed is not None:
            on_replayed(rec, update_norm, drift)
    return len(todo)


def checked_anchor(path: Path, state: WeightState) -> AnchorFile | None:
    """θ₀ from `path` if it is intact, else None (with a warning that says why)."""
    if not path.exists():
        return None
    try:
        anchor = AnchorFile(path)
        anchor.verify(state.names)
        return anchor
    except DamagedAnchorError as e:
        log.warning("%s; rebuilding θ₀ from the base model", e)
        return None


def temporary_anchor(state: WeightState) -> AnchorFile:
    """θ₀ written from the weights `state` holds now (the base model) into a private temp
    folder removed at exit: for readers that must not write into a run directory."""
    import atexit
    import shutil
    import tempfile

    tmp = tempfile.mkdtemp(prefix="esft-theta0-")
    atexit.register(shutil.rmtree, tmp, True)
    return AnchorFile.write(Path(tmp) / ANCHOR_FILE, state.items())


def final_weights(run_dir: str | Path, names: list[str], device: str = "auto") -> dict[str, torch.Tensor]:
    """The trainable tensors after the last iteration of the finished run in `run_dir`: its
    `final/` when it holds the recorded bits, else a replay of its seed log (through its own
    `init_from`, if it has one), so a stage's start is a function of the logs before it."""
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_FILE
    if not config_path.exists():
        raise ValueError(f"init_from {run_dir}: not an esft run directory (no {CONFIG_FILE})")
    cfg = ESConfig.from_yaml(config_path)
    records = SeedLog(run_dir).records()
    if len(records) < cfg.max_steps:
        raise ValueError(f"init_from {run_dir}: the run is not finished ({len(records)} of {cfg.max_steps} "
                         "iterations); finish it (--resume) first")
    final = run_dir / "final"
    state_file = final / STATE_FILE
    saved_at = (yaml.safe_load(state_file.read_text()) or {}).get("iteration") if state_file.exists() else None
    # final/ is a cache of the last iteration: one a longer resume has not rewritten yet is not.
    cached = verified_checkpoint(final, names) if final.is_dir() and saved_at == len(records) else None
    if cached is not None:
        return cached
    state, _ = replay(run_dir, len(records), device=device)
    return {n: t.detach().to("cpu").clone() for n, t in state.items()}


def prepare_start(cfg: ESConfig, state: WeightState, anchor_path: Path | None = None) -> AnchorFile | None:
    """For a run with `init_from`: put that run's final weights into `state` (which holds the
    base model). Returns θ₀ as a temporary anchor (`discard_temporary` it once copied) when
    θ₀ is the base model (`anchor_at: base`) and `anchor_path` does not already hold an intact
    θ₀, written before the weights change; None otherwise."""
    if not cfg.init_from:
        return None
    needed = cfg.anchor_at == "base" and (anchor_path is None or checked_anchor(anchor_path, state) is None)
    base = temporary_anchor(state) if needed else None
    state.load_masters(final_weights(cfg.init_from, state.names))
    return base


def discard_temporary(anchor: AnchorFile | None) -> None:
    """Remove a `temporary_anchor`'s folder now rather than at exit (a sweep makes many)."""
    import shutil

    if anchor is not None and anchor.path.parent.name.startswith("esft-theta0-"):
        shutil.rmtree(anchor.path.parent, ignore_errors=True)


def open_replay(
    run_dir: str | Path, upto: int, model: str | None = None, device: str = "auto"
) -> tuple[ESConfig, WeightState, Any, list[IterationRecord], AnchorFile | None]:
    """The base model of an ES run (with `init_from`, the weights it started from), ready to
    replay its records up to iteration `upto`.

    Returns (config, weight state at iteration 0, tokenizer, records, anchor); shared by
    `replay` and evaluation's forward walk so both rebuild weights the same way.
    """
    from esft.models import load_model
    from esft.params import WeightState

    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_FILE
    if not config_path.exists():
        raise ValueError(f"{run_dir} is not an esft run directory (no {CONFIG_FILE})")
    cfg = ESConfig.from_yaml(config_path)
    records = SeedLog(run_dir).records()
    if not 0 <= upto <= len(records):
        raise ValueError(f"iteration {upto} is out of range: {run_dir} has iterations 0..{len(records)}")
    net, tokenizer = load_model(model or cfg.model, cfg.torch_dtype, device if device != "auto" else cfg.device)
    state = WeightState.from_config(net, cfg)
    base_anchor = prepare_start(cfg, state, run_dir / ANCHOR_FILE)  # a stage starts where the previous ended
    anchor = checked_anchor(run_dir / ANCHOR_FILE, state)
    if anchor is None and cfg.awd_penalty != "none" and upto > 0:
        # θ₀ is the base model's weights (or the run's start), which `state` holds right now
        # (or `prepare_start` kept): rebuild it aside.
        anchor = base_anchor or temporary_anchor(state)
    elif base_anchor is not None and anchor is not base_anchor:
        discard_temporary(base_anchor)
    return cfg, state, tokenizer, records, anchor


def replay(
    run_dir: str | Path, iteration: int, model: str | None = None, device: str = "auto", use_checkpoints: bool = False,
) -> tuple[WeightState, Any]:
    """Weights after `iteration` (0 = base) rebuilt from the base model and the seed log.

    By default every record is replayed from the base model, which is what makes a replay
    an audit of the checkpoints; `use_checkpoints` starts from the latest one instead.
    """
    cfg, state, tokenizer, records, anchor = open_replay(run_dir, iteration, model, device)
    restore(state, run_dir, iteration, records, cfg, anchor, use_checkpoints=use_checkpoints, progress=True)
    return state, tokenizer
