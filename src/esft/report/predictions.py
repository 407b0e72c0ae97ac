"""What ‖θ − θ₀‖ should be if ES updates were pure noise (Eq. 2 of arXiv 2605.30148).

An ES update u = (α/N)·Σ zᵢεᵢ with z-scored rewards (Σzᵢ² = N) and independent
Gaussian εᵢ of d entries has E‖u‖² = U = α²·d/N, whatever the rewards say. Without AWD
the updates add up like a random walk, E‖θ_T − θ₀‖² ≈ T·U; with AWD L2 each iteration
maps D ← (1−s)(D + u), whose second moment settles at X* = (1−s)²U / (1 − (1−s)²).
Measured drift far from these says the rewards, not the noise, steer the weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from esft.config import DEFAULT_AWD_LAMBDA


def update_sq(alpha: float, d: float, N: float) -> float:
    """U = α²·d/N, the expected squared norm of one ES update."""
    return alpha**2 * d / N


def random_walk_sq(T: float, alpha: float, d: float, N: float) -> float:
    """Eq. 2: E‖θ_T − θ₀‖² ≈ T·α²·d/N after T updates without AWD."""
    return T * alpha**2 * d / N


def l2_stationary_sq(alpha: float, d: float, N: float, s: float) -> float:
    """Fixed point X* = (1−s)²·U / (1 − (1−s)²) of E‖D‖² under D ← (1−s)(D + u)."""
    if not 0 < s <= 1:
        raise ValueError(f"an AWD L2 step s must be in (0, 1] (got {s})")
    q = (1 - s) ** 2
    return q * update_sq(alpha, d, N) / (1 - q)


def l2_transient_sq(alpha: float, d: float, N: float, steps: Sequence[float]) -> list[float]:
    """E‖D_t‖² for t = 0..T from D_0 = 0, with the AWD step steps[t−1] at iteration t.

    With every step 0 this is exactly the random walk t·U.
    """
    U = update_sq(alpha, d, N)
    out = [0.0]
    for s in steps:
        out.append((1 - s) ** 2 * (out[-1] + U))
    return out


def config_awd_step(config: dict[str, Any]) -> float:
    """The AWD step s of a run's config: α·λ, or λ when decoupled; 0 without AWD (or when
    the step adapts: a KL budget, then `awd/step` in metrics.jsonl says what was applied)."""
    awd = config.get("awd") or "none"
    if awd == "none" or config.get("kl_budget") is not None:
        return 0.0
    lam = config.get("awd_lambda")
    if lam == "auto":
        lam = config.get("awd_lambda_chosen")
        if lam is None:
            return 0.0
    lam = DEFAULT_AWD_LAMBDA.get(awd, 0.0) if lam is None else float(lam)
    return lam if config.get("awd_decoupled") else float(config.get("learning_rate", 0.0)) * lam


@dataclass(frozen=True)
class DriftPrediction:
    """Predicted E‖θ_t − θ₀‖² for t = 0..T of one run, and its L2 fixed point if any."""

    kind: str  # "random walk" or "AWD L2"
    alpha: float
    N: int
    d: int
    sq: list[float]
    stationary_sq: float | None = None

    def norm(self, t: int) -> float:
        return math.sqrt(self.sq[t])


def _trainable(metrics: Sequence[dict[str, Any]]) -> int | None:
    values = [m["params/trainable"] for m in metrics if m.get("params/trainable") is not None]
    return int(values[-1]) if values else None


def _steps(config: dict[str, Any], metrics: Sequence[dict[str, Any]], T: int) -> list[float]:
    """s at iterations 1..T: `awd/step` from metrics.jsonl when logged (it may vary), else the config's."""
    logged = {int(m["iteration"]): float(m["awd/step"]) for m in metrics if m.get("awd/step") is not None}
    default = config_awd_step(config)
    return [logged.get(t, default) for t in range(1, T + 1)]


def predict_drift(config: dict[str, Any], metrics: Sequence[dict[str, Any]], T: int) -> DriftPrediction | str:
    """The prediction for iterations 0..T, or the reason there is none (shown in report.md)."""
    if config.get("trainer") == "grpo":
        return "not an ES run"
    awd = "l2" if config.get("kl_budget") is not None else (config.get("awd") or "none")
    if awd not in ("none", "l2"):
        return f"no closed form for AWD {awd.upper()}"
    d = _trainable(metrics)
    if d is None:
        return "metrics.jsonl has no params/trainable (d)"
    alpha, N = config.get("learning_rate"), config.get("population_size")
    if alpha is None or N is None:
        return "config lacks learning_rate or population_size"
    alpha, N = float(alpha), int(N)
    if awd == "none":
        return DriftPrediction("random walk", alpha, N, d, [random_walk_sq(t, alpha, d, N) for t in range(T + 1)])
    steps = _steps(config, metrics, T)
    last = steps[-1] if steps else config_awd_step(config)
    stationary = l2_stationary_sq(alpha, d, N, last) if 0 < last <= 1 else None
    return DriftPrediction("AWD L2", alpha, N, d, l2_transient_sq(alpha, d, N, steps), stationary)
