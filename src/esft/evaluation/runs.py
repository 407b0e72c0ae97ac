"""The weights of a run at any iteration, whether it is an ES seed log or HF checkpoints.

ES runs are replayed from their seed log (nothing needs to have been saved); other runs
(GRPO, any trainer writing `checkpoint-<step>/`) are read from their checkpoints. Both
look the same to evaluation, so ES and GRPO results share one format.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from esft.seedlog import CONFIG_FILE, SEEDLOG, SeedLog, checkpoint_steps, open_replay, restore


@dataclass
class RunView:
    """Read-only access to a run directory's models, iteration by iteration."""

    run_dir: Path
    kind: str  # "es" (seed log) or "checkpoints"
    base_model: str
    config: dict

    @classmethod
    def open(cls, run_dir: str | Path) -> RunView:
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise ValueError(f"run directory {run_dir} does not exist")
        cfg_path = run_dir / CONFIG_FILE
        config = yaml.safe_load(cfg_path.read_text()) if cfg_path.exists() else {}
        if (run_dir / SEEDLOG).exists() and config:
            return cls(run_dir, "es", str(config.get("model", "embedded")), config)
        if checkpoint_steps(run_dir):
            base = config.get("model") or _base_from_checkpoints(run_dir)
            if base is None:
                raise ValueError(
                    f"{run_dir} has checkpoints but no config.yaml naming the base model "
                    "(write `model: <base model id or path>` into config.yaml)"
                )
            return cls(run_dir, "checkpoints", str(base), config)
        raise ValueError(
            f"{run_dir} is neither an ES run (config.yaml + seedlog.jsonl) nor a directory of "
            "HF checkpoints (checkpoint-<step>/); point --run at the run's --output_dir"
        )

    @property
    def origin_model(self) -> str:
        """θ₀ of the sequence this run belongs to, the model KL and drift compare against.

        An ES stage replays from its `model` (the sequence's base) already. A GRPO stage loads
        the previous GRPO stage's `final/` as its `model`; measured against that, its KL and
        drift would be the stage's own movement, not the sequence's. So follow such stages back
        to the first one's model (only their config.yaml is read: a stage whose checkpoints
        were deleted still links). A plain run's origin is its base model, and so is that of
        a GRPO run trained on top of an ES run's `final/`.
        """
        return origin_of(self.run_dir, self.config, self.base_model)

    # ---------------------------------------------------------------- iterations
    def iterations(self) -> list[int]:
        """All iterations whose weights can be produced (0 = the base model)."""
        if self.kind == "es":
            return list(range(len(SeedLog(self.run_dir).records()) + 1))
        return [0, *checkpoint_steps(self.run_dir)]

    def select(self, iterations: list[int] | None = None, every: int | None = None) -> list[int]:
        """Validated iterations: explicit ones, or 0, K, 2K, ..., last."""
        if every is not None and every < 1:
            raise ValueError(f"every must be >= 1 (got {every}): it picks iterations 0, K, 2K, ..., last")
        available = self.iterations()
        last = available[-1]
        if iterations:
            bad = [k for k in iterations if k not in available]
            if bad:
                raise ValueError(
                    f"iterations {bad} are not in {self.run_dir} (it has 0..{last}"
                    + ("" if self.kind == "es" else f", checkpoints {available[1:]}")
                    + ")"
                )
            return sorted(set(iterations))
        if every:
            chosen = [k for k in available if k % every == 0]
            return sorted(set(chosen) | {last})
        return available

    # -------------------------------------------------------------------- models
    def models(self, iterations: list[int], device: str = "auto") -> Iterator[tuple[int, torch.nn.Module, object]]:
        """Yield (iteration, model, tokenizer) in increasing order.

        ES runs replay forward incrementally, so visiting K iterations costs one pass
        over the log rather than K replays from the base.
        """
        from esft.models import load_model

        iterations = sorted(iterations)
        if not iterations:
            return
        if self.kind == "es":
            cfg, state, tokenizer, records, anchor = open_replay(self.run_dir, iterations[-1], device=device)
            done = 0
            for k in iterations:
                # Checkpoints are a cache of the log (bitwise equal to its replay): `restore`
                # jumps to the latest one on the way instead of regenerating its K·N noise tensors.
                restore(state, self.run_dir, k, records, cfg, anchor, current=done)
                done = k
                yield k, state.model, tokenizer
            return
        cfg_dtype = self.config.get("torch_dtype", "auto")
        for k in iterations:
            path = self.base_model if k == 0 else str(self.run_dir / f"checkpoint-{k}")
            model, tokenizer = load_model(path, cfg_dtype, device)
            if k:
                check_same_architecture(self.base_model, model)
            yield k, model, tokenizer



def origin_of(run_dir: Path, config: dict, model: str | None = None) -> str:
    """θ₀ of the sequence a run belongs to, from config.yaml files alone (`RunView.origin_model`
    explains why); usable before the run has trained, e.g. to find the siblings that share it."""
    if model is None:  # as RunView.open reads it
        model = config.get("model") or _base_from_checkpoints(Path(run_dir)) or "embedded"
    model = str(model)
    start = run_dir
    seen = {Path(run_dir).resolve()}
    while (parent := grpo_parent(config, model)) is not None:
        if not (parent / CONFIG_FILE).exists():
            # `model:` is relative to where the sweep ran; its stages are siblings.
            parent = Path(run_dir).parent / parent.name
        if not (parent / CONFIG_FILE).exists():
            break
        parent_config = yaml.safe_load((parent / CONFIG_FILE).read_text()) or {}
        if parent_config.get("trainer") != "grpo":
            break
        if parent.resolve() in seen:
            raise ValueError(f"{start}: its chain of stages loops back to {parent}")
        seen.add(parent.resolve())
        parent_model = parent_config.get("model") or _base_from_checkpoints(parent)
        if parent_model is None:
            break
        model, config, run_dir = str(parent_model), parent_config, parent
    return model


def drift_reference(run_dir: Path, config: dict) -> str:
    """What `esft drift` measures a run against: an ES stage re-anchored at its start
    (`anchor_at: start`) against that start, held in its θ₀ file; any other run (or one whose
    θ₀ file is gone) against its origin. An ES run is one with a seed log, as `RunView.open` has it."""
    from esft.seedlog import ANCHOR_FILE

    es = (Path(run_dir) / SEEDLOG).exists()
    restaged = es and config.get("init_from") and config.get("anchor_at") == "start"
    if restaged and (Path(run_dir) / ANCHOR_FILE).exists():
        return str(config["init_from"])
    return origin_of(run_dir, config)


def measured_against(row: dict, config: dict, reference: str) -> bool:
    """Whether a kl.json / drift.json row was measured against `reference`. Rows carry their
    `reference`; older rows do not, and only a GRPO stage's reference has changed since
    (it was the stage's own start, its `model`), so those are read as measured against that."""
    if "reference" in row:
        return row["reference"] == reference
    return config.get("model") == reference if config.get("trainer") == "grpo" else True


def grpo_parent(config: dict, model: str | None = None) -> Path | None:
    """The run directory a GRPO stage started from, or None: a stage of a GRPO sequence loads
    the previous stage's `final/` as its model (`model`: the run's base model, when config.yaml
    does not name it). The one rule that links GRPO stages, for evaluation and the report."""
    model = str(model if model is not None else config.get("model") or "")
    return Path(model).parent if config.get("trainer") == "grpo" and Path(model).name == "final" else None


def _base_from_checkpoints(run_dir: Path) -> str | None:
    for p in sorted(run_dir.glob("checkpoint-*/config.json")):
        name = json.loads(p.read_text()).get("_name_or_path")
        if name:
            return name
    return None


def check_same_architecture(base: str, model: torch.nn.Module) -> None:
    """Refuse a checkpoint whose tensors do not fit the base model (another base model)."""
    from transformers import AutoConfig

    from esft.models import resolve_model_path

    base_cfg = AutoConfig.from_pretrained(resolve_model_path(base))
    keys = ("hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size")
    diffs = [
        f"{k}: base {getattr(base_cfg, k, None)} != checkpoint {getattr(model.config, k, None)}"
        for k in keys
        if getattr(base_cfg, k, None) != getattr(model.config, k, None)
    ]
    if diffs:
        raise ValueError(
            f"this checkpoint does not come from base model {base!r} ({'; '.join(diffs)}); "
            "set `model:` in the run's config.yaml to the model it was trained from"
        )
