"""Weight drift ‖θ − θ₀‖ of a run, by layer, module type and group, iteration by iteration.

Forgetting is expected to follow how far, and where, the weights moved; this module
measures exactly that for ES seed logs and GRPO checkpoints alike (through RunView).
Everything streams tensor by tensor (and in chunks within a tensor) in float64, where
Δ of two fp32/bf16 weights is exact, and memory never holds a whole-model Δ.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

DEFAULT_TAUS: tuple[float, ...] = (1e-6, 1e-4)
# Elements per float64 chunk (32 MiB each for θ and θ₀): bounds memory for huge embeddings.
_CHUNK = 1 << 22

FINE_TYPES = ("attn_q", "attn_k", "attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_down", "norm", "embed", "other")
GROUPS = ("attention", "mlp", "norm", "embed", "other")
_PROJ = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_o",
    "gate_proj": "mlp_gate",
    "up_proj": "mlp_up",
    "down_proj": "mlp_down",
}
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


# ------------------------------------------------------------------ classification
def module_type(name: str) -> str:
    """Fine module type of a parameter name (Llama/Qwen/Mistral naming)."""
    parts = name.split(".")
    for part in parts:
        if part in _PROJ:
            return _PROJ[part]
    if any("norm" in p for p in parts[:-1]):
        return "norm"
    # An untied lm_head is the output embedding; tied models list it under embed_tokens.
    if any("embed" in p or p in ("wte", "wpe", "lm_head") for p in parts):
        return "embed"
    return "other"


def module_group(fine: str) -> str:
    """Coarse group of a fine type, so attention and MLP can be compared at a glance."""
    if fine.startswith("attn_"):
        return "attention"
    if fine.startswith("mlp_"):
        return "mlp"
    return fine


def layer_key(name: str) -> str:
    """`layers.<i>` for decoder blocks; embed / final_norm / lm_head / other outside them."""
    m = _LAYER.search(name)
    if m:
        return f"layers.{int(m.group(1))}"
    parts = name.split(".")
    if "lm_head" in parts:
        return "lm_head"
    if any("embed" in p or p in ("wte", "wpe") for p in parts):
        return "embed"
    if any("norm" in p for p in parts[:-1]):
        return "final_norm"
    return "other"


def _layer_order(key: str) -> tuple[int, int, str]:
    order = {"embed": 0, "final_norm": 2, "lm_head": 3, "other": 4}
    if key.startswith("layers."):
        return (1, int(key.split(".", 1)[1]), key)
    return (order.get(key, 5), 0, key)


# ------------------------------------------------------------------ accumulation
@dataclass
class _Acc:
    """Sufficient statistics of Δ over a set of tensors; groups add up exactly."""

    taus: tuple[float, ...]
    numel: int = 0
    sq_delta: float = 0.0
    sq_theta0: float = 0.0
    sum_abs: float = 0.0
    max_abs: float = 0.0
    below: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.below:
            self.below = [0] * len(self.taus)

    def add(self, other: _Acc) -> None:
        self.numel += other.numel
        self.sq_delta += other.sq_delta
        self.sq_theta0 += other.sq_theta0
        self.sum_abs += other.sum_abs
        self.max_abs = max(self.max_abs, other.max_abs)
        self.below = [a + b for a, b in zip(self.below, other.below)]

    def result(self) -> dict[str, Any]:
        norm = math.sqrt(self.sq_delta)
        theta0_norm = math.sqrt(self.sq_theta0)
        if theta0_norm > 0:
            relative: float | None = norm / theta0_norm
        else:
            relative = 0.0 if norm == 0 else None
        n = max(self.numel, 1)
        return {
            "norm": norm,
            "theta0_norm": theta0_norm,
            "relative": relative,
            "mean_abs": self.sum_abs / n,
            "max_abs": self.max_abs,
            "sparsity": {_tau_key(t): c / n for t, c in zip(self.taus, self.below)},
            "numel": self.numel,
        }


def _tau_key(tau: float) -> str:
    return f"{tau:g}"


def _tensor_acc(
    theta: torch.Tensor, theta0: torch.Tensor, taus: tuple[float, ...], theta0_sq: float | None = None
) -> _Acc:
    """Statistics of one tensor's Δ, formed chunk by chunk in float64 (Δ is exact there)."""
    if theta.shape != theta0.shape:
        raise ValueError(f"θ₀ has shape {tuple(theta0.shape)} but θ has {tuple(theta.shape)}")
    acc = _Acc(taus)
    theta, theta0 = theta.detach(), theta0.detach()
    if theta.dtype == theta0.dtype and theta.device == theta0.device and torch.equal(theta, theta0):
        # Frozen tensors (most of a partially trained model) cost one comparison, not ten passes.
        acc.numel = theta.numel()
        acc.below = [acc.numel] * len(taus)
        if theta0_sq is None:
            theta0_sq = float(torch.linalg.vector_norm(theta0, dtype=torch.float64)) ** 2
        acc.sq_theta0 = theta0_sq
        return acc
    flat, flat0 = theta.reshape(-1), theta0.reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        a = flat[start : start + _CHUNK].to(torch.float64)
        b = flat0[start : start + _CHUNK].to(a.device, torch.float64)
        d = (a - b).abs_()
        acc.numel += d.numel()
        acc.sq_delta += float(torch.dot(d, d))
        if theta0_sq is None:
            acc.sq_theta0 += float(torch.dot(b, b))
        acc.sum_abs += float(d.sum())
        acc.max_abs = max(acc.max_abs, float(d.max()))
        for i, tau in enumerate(taus):
            acc.below[i] += int((d <= tau).sum())
    if theta0_sq is not None:
        acc.sq_theta0 = theta0_sq
    return acc


def drift_stats(
    named_params: Iterable[tuple[str, torch.Tensor]],
    theta0: Callable[[str], torch.Tensor],
    taus: Iterable[float] = DEFAULT_TAUS,
    theta0_sq: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Drift of θ from θ₀ globally, per layer, per fine module type and per coarse group.

    Each entry holds norm ‖Δ‖, theta0_norm ‖θ₀‖, relative, mean_abs, max_abs, numel and
    sparsity {τ: fraction of weights with |Δ| ≤ τ}. `theta0(name)` is asked for one
    tensor at a time, so it can be a memory-mapped anchor. `theta0_sq`, a dict kept
    across calls, caches ‖θ₀[name]‖² so that later iterations need not recompute it.
    """
    taus = tuple(float(t) for t in taus)
    total = _Acc(taus)
    layers: dict[str, _Acc] = {}
    modules: dict[str, _Acc] = {}
    groups: dict[str, _Acc] = {}
    for name, theta in named_params:
        cached = theta0_sq.get(name) if theta0_sq is not None else None
        acc = _tensor_acc(theta, theta0(name), taus, cached)
        if theta0_sq is not None:
            theta0_sq[name] = acc.sq_theta0
        fine = module_type(name)
        for table, key in ((layers, layer_key(name)), (modules, fine), (groups, module_group(fine))):
            table.setdefault(key, _Acc(taus)).add(acc)
        total.add(acc)
    return {
        "global": total.result(),
        "per_layer": {k: layers[k].result() for k in sorted(layers, key=_layer_order)},
        "per_module": {k: modules[k].result() for k in FINE_TYPES if k in modules},
        "per_group": {k: groups[k].result() for k in GROUPS if k in groups},
    }


# ------------------------------------------------------------------------- runs
def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]


def drift_report(
    run_dir: str | Path,
    iterations: list[int] | None = None,
    every: int | None = None,
    taus: Iterable[float] = DEFAULT_TAUS,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """One drift_stats dict (plus "iteration" and "reference", what θ₀ is) per chosen iteration
    of an ES or GRPO run.

    θ₀ is the run's memory-mapped theta0.safetensors where it has the tensor, else the
    base model (for a GRPO stage of a sequence, the first stage's: `RunView.origin_model`),
    which is loaded on the host in the run model's dtype so that frozen tensors compare bit
    for bit and accelerator memory is not doubled.
    """
    from esft.anchor import AnchorFile
    from esft.evaluation.runs import RunView, drift_reference
    from esft.models import load_model, resolve_device, resolve_dtype
    from esft.seedlog import ANCHOR_FILE

    taus = tuple(taus)
    run = RunView.open(run_dir)
    chosen = run.select(iterations, every)
    anchor_path = run.run_dir / ANCHOR_FILE
    anchor = AnchorFile(anchor_path) if run.kind == "es" and anchor_path.exists() else None
    anchored = set(anchor.names()) if anchor is not None else set()
    dtype = resolve_dtype(run.config.get("torch_dtype", "auto"), resolve_device(device))
    base: dict[str, torch.Tensor] | None = None

    def theta0(name: str) -> torch.Tensor:
        nonlocal base
        if anchor is not None and name in anchored:
            return anchor.get(name)
        if base is None:  # loaded only once, and only if some tensor is not anchored
            model, _ = load_model(run.origin_model, _dtype_name(dtype), "cpu")
            base = {n: p.detach() for n, p in model.named_parameters()}
            del model
        if name not in base:
            raise ValueError(f"{name} is not a parameter of the base model {run.origin_model!r}")
        return base[name]

    # Rows name what they were measured against, so a sweep recomputes rows from before a change.
    reference = drift_reference(run.run_dir, run.config)
    report = []
    norms: dict[str, float] = {}
    # ES runs yield one model mutated in place: each is fully read before the next step.
    for k, model, _tok in run.models(chosen, device):
        report.append({"iteration": k, **drift_stats(model.named_parameters(), theta0, taus, norms),
                       "reference": reference})
    return report


# ------------------------------------------------------------------------ output
def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def format_drift_table(report: list[dict[str, Any]]) -> str:
    """A markdown table: one row per iteration, global statistics then per-group norms."""
    if not report:
        return "(no iterations)"
    taus = list(report[0]["global"]["sparsity"])
    groups = [g for g in GROUPS if any(g in r["per_group"] for r in report)]
    # No "|" inside a header: markdown would read it as a column border.
    head = ["iter", "‖Δ‖", "rel", "mean abs Δ", "max abs Δ", *(f"sparse≤{t}" for t in taus), *(f"‖Δ‖ {g}" for g in groups)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
    for r in report:
        g = r["global"]
        cells = [str(r["iteration"]), _fmt(g["norm"]), _fmt(g["relative"]), _fmt(g["mean_abs"]), _fmt(g["max_abs"])]
        cells += [f"{g['sparsity'][t]:.6g}" for t in taus]  # 0.999997 must not read as 1
        cells += [_fmt(r["per_group"][x]["norm"]) if x in r["per_group"] else "" for x in groups]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _float_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"thresholds must be finite and ≥ 0, got {text!r}")
    return values


def main(argv: list[str]) -> int:
    """`esft drift`: print the drift table and write the full report as JSON."""
    from esft.flags import int_list
    from esft.io import write_text_atomic

    parser = argparse.ArgumentParser(
        prog="esft drift", description="Weight drift ‖θ − θ₀‖ of a run (ES seed log or checkpoints)."
    )
    parser.add_argument("--run", required=True, help="the run's output_dir")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--iterations", type=int_list, default=None, help="e.g. 0,5,10 (default: all)")
    which.add_argument("--every", type=int, default=None, help="every K-th iteration, plus the last")
    parser.add_argument("--taus", type=_float_list, default=list(DEFAULT_TAUS), help="sparsity thresholds, e.g. 1e-6,1e-4")
    parser.add_argument("--output", default=None, help="JSON file (default: RUN/drift.json)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    args = parser.parse_args(argv)
    if args.every is not None and args.every < 1:
        parser.error("--every must be ≥ 1")

    from esft.runlock import writing_into

    out = Path(args.output) if args.output else Path(args.run) / "drift.json"
    with writing_into(args.run, out, "drift measurement"):
        report = drift_report(args.run, args.iterations, args.every, args.taus, args.device)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, json.dumps(report, indent=1) + "\n")
    print(format_drift_table(report))
    print(f"wrote {out}")
    return 0


__all__ = ["drift_report", "drift_stats", "format_drift_table", "layer_key", "main", "module_group", "module_type"]
