"""KL(p_base ‖ p_iteration) on evaluation prompts: how far a run moved the model's outputs.

Accuracy can stay flat while the output distribution drifts; KL to the base model
measures the drift directly. Continuations are sampled once from the base model and
cached in the run directory, so every iteration (and every later call) is scored on the
same tokens and the estimates are comparable across iterations. Two estimators:

- Monte-Carlo: log p_base(y) − log p_model(y) on the sampled tokens y (unbiased, noisy);
- exact per position: Σ_v p_base(v)·(log p_base(v) − log p_model(v)) at each sampled
  position (same prefixes, no sampling noise over the next token, always ≥ 0).
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from esft.io import write_text_atomic

log = logging.getLogger(__name__)

CACHE_DIR = "kl_cache"
KL_FILE = "kl.json"
STAT_KEYS = ("kl_mc_prompt", "kl_mc_token", "kl_exact_prompt", "kl_exact_token", "n_prompts", "n_tokens")
# Positions per slice when turning two log-softmax tensors into per-position KL: bounds
# the temporaries to a slice instead of batch × length × vocab.
_KL_CHUNK = 64


# ------------------------------------------------------------------------- helpers
def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _eos_ids(model: torch.nn.Module, tokenizer: Any) -> set[int]:
    """The ids that end a continuation, chosen as HFEngine does so sampling stops alike."""
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return set(eos if isinstance(eos, list) else [eos])


def _pad_id(tokenizer: Any, eos_ids: set[int]) -> int:
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return min(eos_ids) if eos_ids else 0


def _supports_logits_to_keep(model: torch.nn.Module) -> bool:
    # Keeping only the needed positions avoids a batch × length × vocab logits tensor.
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _cache_argument(model: torch.nn.Module) -> str:
    """The keyword that feeds the KV cache back: `cache` in recent transformers (which warn
    on, and will drop, `past_key_values`), `past_key_values` in older ones (≥ 4.56 allowed)."""
    try:
        return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    except (TypeError, ValueError):
        return "past_key_values"


def _prompt_generator(seed: int, index: int) -> torch.Generator:
    """One stream per prompt, so a prompt's sample does not depend on how it was batched."""
    state = int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(state & 0x7FFF_FFFF_FFFF_FFFF)


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    # Left padding must not shift positions: the first real token is position 0, as in
    # `generate`, so scoring sees exactly the conditions sampling saw.
    return (mask.cumsum(-1) - 1).clamp(min=0)


# ------------------------------------------------------------------------ sampling
@torch.inference_mode()
def sample_continuations(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[list[int]],
    max_tokens: int = 256,
    seed: int = 0,
    batch_size: int = 8,
) -> list[list[int]]:
    """Pure temperature-1 samples (no top-k/top-p), up to and including EOS.

    A hand-written decoding loop rather than `generate`, so that no generation-config
    default (top_k=50, repetition penalty, ...) distorts p_base: the Monte-Carlo
    estimator is only unbiased for samples from p_base itself. Each prompt draws from its
    own generator seeded by (seed, index), which makes the result reproducible and
    independent of batch size, order and the global torch RNG.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be ≥ 1, got {max_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    if any(not p for p in prompts):
        raise ValueError("empty prompt: every prompt needs at least one token")
    device = _device(model)
    eos = _eos_ids(model, tokenizer)
    pad = _pad_id(tokenizer, eos)
    keep_arg = {"logits_to_keep": 1} if _supports_logits_to_keep(model) else {}
    cache_arg = _cache_argument(model)
    out: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        gens = [_prompt_generator(seed, i) for i in idx]
        ids, mask = _left_pad([prompts[i] for i in idx], pad)
        ids, mask = ids.to(device), mask.to(device)
        pos = _positions(mask)
        res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **keep_arg)
        done = torch.zeros(len(idx), dtype=torch.bool)
        next_pos = pos[:, -1:] + 1
        for step in range(max_tokens):
            probs = torch.softmax(res.logits[:, -1].double(), dim=-1)
            cdf = probs.cumsum(-1)
            u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in gens]).to(device)
            # Inverse-CDF draw; `right=True` never lands on a zero-probability token.
            tok = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True)
            tok = tok.clamp(max=cdf.shape[-1] - 1).squeeze(1).cpu()
            for row, i in enumerate(idx):
                if not done[row]:
                    t = int(tok[row])
                    out[i].append(t)
                    done[row] = t in eos
            if bool(done.all()) or step == max_tokens - 1:
                break
            feed = torch.where(done, torch.full_like(tok, pad), tok).unsqueeze(1).to(device)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            cache = res.cache if cache_arg == "cache" else res.past_key_values
            res = model(input_ids=feed, attention_mask=mask, position_ids=next_pos, use_cache=True, **{cache_arg: cache})
            next_pos = next_pos + 1
    return out


# ---------------------------------------------------------------------- estimation
def _continuation_logprobs(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, width: int, keep: bool
) -> torch.Tensor:
    """fp32 log-softmax at the positions that predict the `width` continuation columns."""
    kwargs = {"logits_to_keep": width + 1} if keep else {}
    logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), **kwargs).logits
    # Position t predicts token t+1: the last prompt position predicts continuation 0,
    # and the final position predicts nothing we sampled.
    logits = logits[:, -(width + 1) : -1]
    return torch.log_softmax(logits.float(), dim=-1)


def _per_position_kl(base_lp: torch.Tensor, model_lp: torch.Tensor) -> torch.Tensor:
    """Σ_v p_base(v)·(log p_base(v) − log p_model(v)), sliced over positions to bound memory."""
    parts = []
    for s in range(0, base_lp.shape[1], _KL_CHUNK):
        b, m = base_lp[:, s : s + _KL_CHUNK], model_lp[:, s : s + _KL_CHUNK]
        p = b.exp()
        # Where p_base is 0 the term is 0, even if a log-prob is -inf (0·inf would be NaN).
        term = torch.where(p > 0, p * (b - m), torch.zeros_like(p))
        parts.append(term.sum(-1, dtype=torch.float64))
    return torch.cat(parts, dim=1)


@dataclass
class ContinuationBatch:
    """Prompts (left-padded) + continuations (right-padded) of a few samples, ready to score."""

    rows: list[int]  # which samples, in batch order
    ids: torch.Tensor
    mask: torch.Tensor
    targets: torch.Tensor  # the continuation tokens (batch × width)
    valid: torch.Tensor  # bool: which target positions are real tokens
    width: int


def continuation_batches(
    prompts: list[list[int]], continuations: list[list[int]], batch_size: int = 8, pad_id: int = 0,
) -> list[ContinuationBatch]:
    """The batches every model scores identically (same order, padding and positions), so a
    model with the base model's weights scores exactly 0 KL against it."""
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    scored = [i for i, c in enumerate(continuations) if c]
    # Longest first: the largest batch (the one most likely to run out of memory) fails fast.
    scored.sort(key=lambda i: -(len(prompts[i]) + len(continuations[i])))
    batches = []
    for start in range(0, len(scored), batch_size):
        idx = scored[start : start + batch_size]
        p_ids, p_mask = _left_pad([prompts[i] for i in idx], pad_id)
        width = max(len(continuations[i]) for i in idx)
        c_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        c_mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(continuations[i])
            c_ids[row, :n] = torch.tensor(continuations[i], dtype=torch.long)
            c_mask[row, :n] = 1
        ids, mask = torch.cat([p_ids, c_ids], 1), torch.cat([p_mask, c_mask], 1)
        batches.append(ContinuationBatch(idx, ids, mask, c_ids, c_mask.bool(), width))
    return batches


def batch_logprobs(model: torch.nn.Module, batch: ContinuationBatch) -> torch.Tensor:
    """fp32 log-softmax of `model` at the positions predicting the batch's continuation tokens."""
    dev = _device(model)
    return _continuation_logprobs(model, batch.ids.to(dev), batch.mask.to(dev), batch.width,
                                  _supports_logits_to_keep(model))


def batch_kl(batch: ContinuationBatch, base_lp: torch.Tensor, model_lp: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-row sums over the continuation of (Monte-Carlo, exact per-position) KL, float64."""
    model_lp = model_lp.to(base_lp.device)
    target = batch.targets.to(base_lp.device).unsqueeze(-1)
    valid = batch.valid.to(base_lp.device)
    mc = (base_lp.gather(-1, target) - model_lp.gather(-1, target)).squeeze(-1).double()
    exact = _per_position_kl(base_lp, model_lp)
    mc_rows = torch.where(valid, mc, torch.zeros_like(mc)).sum(-1).cpu().numpy()
    ex_rows = torch.where(valid, exact, torch.zeros_like(exact)).sum(-1).cpu().numpy()
    return mc_rows, ex_rows


@torch.inference_mode()
def kl_on_continuations(
    base_model: torch.nn.Module,
    model: torch.nn.Module,
    prompts: list[list[int]],
    continuations: list[list[int]],
    batch_size: int = 8,
    pad_id: int = 0,
) -> dict[str, float | int]:
    """KL(p_base ‖ p_model) on fixed continuations, both estimators, both averages.

    Both models see byte-identical batches (same order, padding and positions), so a
    model with the base model's weights scores exactly 0. `pad_id` only fills masked
    slots and cannot change the result.
    """
    mc_sum = np.zeros(len(prompts))
    ex_sum = np.zeros(len(prompts))
    for batch in continuation_batches(prompts, continuations, batch_size, pad_id):
        mc_rows, ex_rows = batch_kl(batch, batch_logprobs(base_model, batch), batch_logprobs(model, batch))
        for row, i in enumerate(batch.rows):
            mc_sum[i], ex_sum[i] = mc_rows[row], ex_rows[row]
    return kl_summary(mc_sum, ex_sum, continuations)


def kl_summary(mc_sum: np.ndarray, ex_sum: np.ndarray, continuations: list[list[int]]) -> dict[str, float | int]:
    """Prompt-averaged and token-weighted means of per-prompt KL sums."""
    counts = np.array([len(c) for c in continuations], dtype=np.float64)
    n_tokens = int(counts.sum())
    has = counts > 0

    def prompt_mean(sums: np.ndarray) -> float:
        return float(np.mean(sums[has] / counts[has])) if has.any() else float("nan")

    def token_mean(sums: np.ndarray) -> float:
        return float(sums.sum() / n_tokens) if n_tokens else float("nan")

    return {
        "kl_mc_prompt": prompt_mean(mc_sum),
        "kl_mc_token": token_mean(mc_sum),
        "kl_exact_prompt": prompt_mean(ex_sum),
        "kl_exact_token": token_mean(ex_sum),
        "n_prompts": int(has.sum()),
        "n_tokens": n_tokens,
    }


# --------------------------------------------------------------------------- cache
def cache_path(run_dir: str | Path, task: str, num_prompts: int, max_tokens: int, seed: int) -> Path:
    """RUN/kl_cache/<task>-n<N>-t<T>-s<S>.json (odd characters of custom task names → _)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", task)
    return Path(run_dir) / CACHE_DIR / f"{safe}-n{num_prompts}-t{max_tokens}-s{seed}.json"


def _load_cache(path: Path, base_model: str, prompts: list[list[int]]) -> list[list[int]] | None:
    """Cached continuations, or None when absent or made for other prompts / another base."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        log.warning("ignoring unreadable KL cache %s (%s); sampling again", path, e)
        return None
    if data.get("base_model") != base_model or data.get("prompts") != prompts:
        log.warning("KL cache %s was made for other prompts or another base model; sampling again", path)
        return None
    conts = data.get("continuations")
    if not isinstance(conts, list) or len(conts) != len(prompts):
        log.warning("KL cache %s is malformed; sampling again", path)
        return None
    return conts


def base_continuations(
    run_dir: Path, task_name: str, base_name: str, model: torch.nn.Module, tokenizer: Any,
    prompts: list[list[int]], num_prompts: int, max_tokens: int, seed: int, batch_size: int,
) -> list[list[int]]:
    path = cache_path(run_dir, task_name, num_prompts, max_tokens, seed)
    cached = _load_cache(path, base_name, prompts)
    if cached is not None:
        return cached
    log.info("sampling %d base-model continuations for %s (once; cached in %s)", len(prompts), task_name, path)
    conts = sample_continuations(model, tokenizer, prompts, max_tokens, seed, batch_size)
    payload = {
        "task": task_name, "base_model": base_name, "num_prompts": num_prompts,
        "max_tokens": max_tokens, "seed": seed, "prompts": prompts, "continuations": conts,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(payload) + "\n")
    return conts


# -------------------------------------------------------------------------- report
def kl_report(
    run_dir: str | Path,
    tasks: list[str],
    iterations: list[int] | None = None,
    every: int | None = None,
    num_prompts: int = 50,
    max_tokens: int = 256,
    seed: int = 0,
    batch_size: int = 8,
    data_dir: str | None = None,
    device: str = "cpu",
    progress: bool = False,
    dataset: str | None = None,
) -> list[dict[str, Any]]:
    """One row per (iteration, task): KL of the iteration's model from the base model (for a
    GRPO stage of a sequence, the first stage's: `RunView.origin_model`).

    A `module:function` task's prompts come from `dataset`, or the run's own when the run
    trained on that task.

    The base model is loaded once as its own instance (ES replay mutates the iteration
    model in place), in the run's dtype so that iteration 0 computes identical logits.
    """
    from esft.engine.hf import HFEngine
    from esft.evaluation.runs import RunView
    from esft.models import load_model
    from esft.tasks import get_task

    if not tasks:
        raise ValueError("no tasks given: pass at least one task name")
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be ≥ 1, got {num_prompts}")
    view = RunView.open(run_dir)
    chosen = view.select(iterations, every)
    # Build every task before loading any model, so a typo fails in a second.
    if dataset is None and view.config.get("task") in tasks:
        dataset = view.config.get("dataset")
    task_objs = [get_task(name, data_dir=data_dir, dataset=dataset) for name in tasks]
    origin = view.origin_model  # a GRPO stage's KL is to the sequence's base, not its own start
    base, tokenizer = load_model(origin, str(view.config.get("torch_dtype", "auto")), device)
    engine = HFEngine(base, tokenizer)
    pad = engine.pad_id
    samples: dict[str, tuple[list[list[int]], list[list[int]]]] = {}
    for name, task in zip(tasks, task_objs):
        examples = task.load("test", limit=num_prompts)
        if not examples:
            raise ValueError(f"task {name!r} has no test examples")
        prompts = engine.encode([task.messages(e) for e in examples])
        conts = base_continuations(
            view.run_dir, name, origin, base, tokenizer, prompts,
            num_prompts, max_tokens, seed, batch_size,
        )
        samples[name] = (prompts, conts)
    rows: list[dict[str, Any]] = []
    # ES runs hand back one model mutated in place: finish every task before advancing.
    from tqdm.auto import tqdm

    bar = tqdm(total=len(chosen) * len(tasks), desc="KL", unit="task", disable=not progress, leave=False)
    for k, model, _tok in view.models(chosen, device):
        for name in tasks:
            prompts, conts = samples[name]
            stats = kl_on_continuations(base, model, prompts, conts, batch_size, pad_id=pad)
            log.info("iteration %d %s: KL exact %.4g, MC %.4g", k, name, stats["kl_exact_token"], stats["kl_mc_token"])
            rows.append({"iteration": k, "task": name, **stats, "reference": origin})
            bar.update(1)
    bar.close()
    return rows


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.4g}"


def format_kl_table(rows: Sequence[dict[str, Any]], average: str = "prompt") -> str:
    """Markdown: one row per iteration, exact and MC columns per task.

    `average` is "prompt" (mean of per-prompt means) or "token" (pooled over tokens).
    """
    if average not in ("prompt", "token"):
        raise ValueError(f"average must be 'prompt' or 'token', got {average!r}")
    if not rows:
        return "(no rows)"
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    iters = sorted({int(r["iteration"]) for r in rows})
    cell = {(int(r["iteration"]), r["task"]): r for r in rows}
    head = ["iter", *(f"{t} {est}" for t in tasks for est in ("exact", "MC"))]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
    for k in iters:
        cells = [str(k)]
        for t in tasks:
            r = cell.get((k, t))
            cells += [_fmt(r[f"kl_exact_{average}"]) if r else "", _fmt(r[f"kl_mc_{average}"]) if r else ""]
        lines.append("| " + " | ".join(cells) + " |")
    unit = "mean over prompts of per-token KL" if average == "prompt" else "KL per token, pooled over all tokens"
    return "\n".join(lines) + f"\n\nKL(base ‖ iteration) in nats: {unit}."


def main(argv: list[str]) -> int:
    """`esft kl`: print the KL table and write every row as JSON."""
    from esft.flags import int_list, name_list

    parser = argparse.ArgumentParser(
        prog="esft kl",
        description="KL(p_base ‖ p_iteration) on base-model samples of each task's test prompts.",
    )
    parser.add_argument("--run", required=True, help="the run's output_dir")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--iterations", type=int_list, default=None, help="e.g. 0,5,10 (default: all)")
    which.add_argument("--every", type=int, default=None, help="every K-th iteration, plus the last")
    parser.add_argument("--tasks", type=name_list, required=True, help="e.g. hellaswag,piqa")
    parser.add_argument("--num_prompts", type=int, default=50, help="first N test examples per task")
    parser.add_argument("--max_tokens", type=int, default=256, help="new tokens sampled per prompt")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (part of the cache key)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--data_dir", default=None, help="shared data folder (default: $ESFT_DATA_DIR or the hub)")
    parser.add_argument("--dataset", default=None,
                        help="prompts of a module:function task (a file or hub id with a 'prompt' column; default: the run's)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--output", default=None, help=f"JSON file (default: RUN/{KL_FILE})")
    args = parser.parse_args(argv)
    for flag in ("every", "num_prompts", "max_tokens", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag} must be ≥ 1")

    from esft.runlock import run_lock

    # The base continuations are cached inside the run (kl_cache/): a writer of the run.
    with run_lock(args.run, "KL measurement"):
        rows = kl_report(
            args.run, args.tasks, args.iterations, args.every, args.num_prompts, args.max_tokens,
            args.seed, args.batch_size, args.data_dir, args.device, progress=True, dataset=args.dataset,
        )
        out = Path(args.output) if args.output else Path(args.run) / KL_FILE
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, json.dumps(rows, indent=1) + "\n")
    print(format_kl_table(rows))
    print(f"wrote {out}")
    return 0


__all__ = ["cache_path", "format_kl_table", "kl_on_continuations", "kl_report", "main", "sample_continuations"]
