"""Work that runs of one base model share: iteration 0 is the same model in all of them.

Runs side by side in one folder (a sweep, the quickstart) evaluate the base model at
iteration 0 and sample base-model continuations for KL; both are deterministic and the
same for every run of that base (same model name and dtype), so they are computed once and
copied to the siblings, each copied row marked `copied_from`. A stage of a task sequence
starts from the previous stage's final weights, so its iteration 0 takes that run's last rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from esft.io import read_jsonl


def saved_config(run_dir: Path) -> dict[str, Any]:
    """A run directory's config.yaml as a dict; {} where there is none (not started yet)."""
    import yaml

    path = run_dir / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def same_base_siblings(run_dir: Path, same_start: bool = True) -> list[Path]:
    """Other runs beside this one on the same base model and data (base model, dtype and
    data folder); with `same_start`, also starting from the same weights: a stage of a task
    sequence starts from its previous stage's final weights (`init_from`), so its iteration
    0 is not the base model's. The base model's KL samples are shared either way: without
    `same_start` the model is the sequence's origin, since a GRPO stage loads the previous
    stage's `final/` as its `model` yet measures KL against the first stage's base."""
    import yaml

    from esft.evaluation.runs import origin_of

    def base(d: Path) -> tuple[Any, ...] | None:
        path = d / "config.yaml"
        if not path.is_file():
            return None
        cfg = yaml.safe_load(path.read_text()) or {}
        # The data folder too: the same task name over another data pack is other examples.
        if same_start:
            return (cfg.get("model"), cfg.get("torch_dtype", "auto"), cfg.get("data_dir"), cfg.get("init_from"))
        try:
            origin = origin_of(d, cfg) if cfg.get("model") else None
        except ValueError:  # a chain of stages that loops: that run's own KL says so
            return None
        return (origin, cfg.get("torch_dtype", "auto"), cfg.get("data_dir"))

    mine = base(run_dir)
    return [d for d in sorted(run_dir.parent.iterdir())
            if d != run_dir and d.is_dir() and mine is not None and base(d) == mine]


def borrow_base_rows(run_dir: Path) -> int:
    """Copy the iteration-0 evaluation rows of sibling runs that this run lacks. Returns rows copied."""
    from esft.evaluation.accuracy import FORGETTING_FILE, row_key
    from esft.io import append_jsonl

    path = run_dir / "eval" / FORGETTING_FILE
    have = {row_key(r) for r in read_jsonl(path)} if path.exists() else set()
    copied = 0
    for sibling in same_base_siblings(run_dir, same_start=True):
        for row in read_jsonl(sibling / "eval" / FORGETTING_FILE):
            if row.get("iteration") == 0 and row_key(row) not in have:
                path.parent.mkdir(parents=True, exist_ok=True)
                append_jsonl(path, {**row, "copied_from": row.get("copied_from", sibling.name)})
                have.add(row_key(row))
                copied += 1
    return copied


def stage_start(run_dir: Path) -> tuple[Path, int] | None:
    """(previous run, its last iteration) for a stage of a task sequence: its iteration 0 is
    that run's final weights, bit for bit (`init_from`), so what was measured there holds here.
    None for a run that starts from the base model, or whose previous run is on another base
    or data folder."""
    mine = saved_config(run_dir)
    if not mine.get("init_from"):
        return None
    parent = Path(mine["init_from"])
    theirs = saved_config(parent)
    same = ("model", "torch_dtype", "data_dir")
    if not theirs or theirs.get("trainer") == "grpo" or any(mine.get(k) != theirs.get(k) for k in same):
        return None
    return parent, int(theirs["max_steps"])


def borrow_start_rows(run_dir: Path) -> int:
    """Copy the previous stage's evaluation rows of its last iteration as this stage's
    iteration 0 (marked `copied_from: <run>@<iteration>`). Returns rows copied."""
    from esft.evaluation.accuracy import FORGETTING_FILE, row_key
    from esft.io import append_jsonl

    start = stage_start(run_dir)
    if start is None:
        return 0
    parent, last = start
    path = run_dir / "eval" / FORGETTING_FILE
    have = {row_key(r) for r in read_jsonl(path)} if path.exists() else set()
    copied = 0
    for row in read_jsonl(parent / "eval" / FORGETTING_FILE):
        moved = {**row, "iteration": 0, "copied_from": f"{parent.name}@{last}"}
        if row.get("iteration") == last and row_key(moved) not in have:
            path.parent.mkdir(parents=True, exist_ok=True)
            append_jsonl(path, moved)
            have.add(row_key(moved))
            copied += 1
    return copied


def borrow_kl_cache(run_dir: Path) -> None:
    """Copy sibling runs' cached base-model continuations this run lacks, or holds for another
    base model (a GRPO stage's cache from before its KL was to the sequence's base). Each file
    names its base model and prompts, and is checked again when read."""
    import json
    import shutil

    from esft.evaluation.kl import CACHE_DIR
    from esft.evaluation.runs import origin_of

    def base_of(f: Path) -> object:
        try:
            return json.loads(f.read_text()).get("base_model")
        except (OSError, ValueError, AttributeError):
            return None

    if not (run_dir / "config.yaml").is_file():
        return
    origin = origin_of(run_dir, saved_config(run_dir))
    held: dict[str, object] = {}  # file name → the base model this run's copy is for (read once)
    for sibling in same_base_siblings(run_dir, same_start=False):
        for f in sorted((sibling / CACHE_DIR).glob("*.json")):
            target = run_dir / CACHE_DIR / f.name
            if f.name not in held:
                held[f.name] = base_of(target) if target.exists() else None
            if held[f.name] != origin and base_of(f) == origin:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, target)
                held[f.name] = origin


__all__ = ["borrow_base_rows", "borrow_kl_cache", "borrow_start_rows", "same_base_siblings", "saved_config", "stage_start"]
