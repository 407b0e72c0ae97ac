"""The AWD step of each iteration when it is decided during the run (DESIGN: adaptive AWD).

A fixed λ needs no schedule: every iteration applies α·λ. `--kl_budget X` and
`--awd_lambda auto` decide the step as the run goes; whatever they decide is written into
the iteration's seed-log record (`awd_step`, read back by `seedlog.record_awd_step`), so
replay, resume and Ray actors apply exactly what the driver applied, and the decisions
themselves only use what the log holds or what a replay reproduces bitwise.
"""

from __future__ import annotations

import math
import time
from typing import Any, Protocol

from esft.anchor import drift_target_for_kl, expected_update_sq, l2_step_for_target
from esft.config import ESConfig
from esft.seedlog import AWD_STEP_KEY, IterationRecord

#: Record keys of the KL-budget controller's state: the drift after the iteration's AWD,
#: the target drift its step aimed at (null: no target yet) and, on iterations that measured
#: it, the KL after the update (a resume recalibrates from it instead of measuring again).
DRIFT_KEY = "awd_drift"
TARGET_KEY = "awd_target_drift"
KL_KEY = "awd_kl"


class AWDSchedule(Protocol):
    """Decides each iteration's AWD step and logs why."""

    def resume(self, records: list[IterationRecord]) -> None:
        """Take up the state an uninterrupted run would hold after `records`."""

    def record_fields(self, coefficients: list[float] | None) -> dict[str, Any]:
        """Fields of the coming iteration's record (its `awd_step` first of all)."""
        ...

    def after_update(self, record: IterationRecord, drift: float) -> dict[str, Any]:
        """Called once the iteration's update and AWD are applied, before its record is
        appended (it may add fields to it); returns metrics."""
        ...


class FixedStep:
    """One step for the whole run, decided before it (`--awd_lambda auto`)."""

    def __init__(self, cfg: ESConfig, step: float) -> None:
        self.cfg, self.step = cfg, step

    def resume(self, records: list[IterationRecord]) -> None: ...

    def record_fields(self, coefficients: list[float] | None) -> dict[str, Any]:
        return {AWD_STEP_KEY: self.step}

    def after_update(self, record: IterationRecord, drift: float) -> dict[str, Any]:
        return {"awd/step": self.step, "awd/lambda": self.cfg.lambda_for_step(self.step)}


class KLBudget:
    """Holds KL(base ‖ model) on the KL prompts at or under `kl_budget` with the L2 step.

    After iteration 1 and every `kl_every` iterations the measured KL recalibrates a target
    drift ‖θ − θ₀‖ (`drift_target_for_kl`: the KL grows like the squared distance near θ₀);
    each iteration's step is the one that brings the drift to that target after its update
    (`l2_step_for_target`), 0 while the drift is under it. So the target learns as fast as
    plain ES until the budget binds, then AWD holds the distance the budget allows. Between
    measurements the drift cap holds the KL near where the last one put it, which is why the
    KL need not be measured every iteration (it costs forward passes over every KL prompt).
    """

    def __init__(self, cfg: ESConfig, monitor: Any, num_params: int) -> None:
        self.cfg, self.monitor, self.num_params = cfg, monitor, num_params
        self.drift = 0.0
        self.target = math.inf

    def measures_after(self, iteration: int) -> bool:
        """Whether the KL is measured once `iteration` is applied: the first one calibrates."""
        return iteration == 1 or iteration % self.cfg.kl_every == 0

    def resume(self, records: list[IterationRecord]) -> None:
        last = records[-1]
        self.drift = float(last.extra.get(DRIFT_KEY) or 0.0)
        target = last.extra.get(TARGET_KEY)
        self.target = math.inf if target is None else float(target)
        if last.extra.get(KL_KEY) is not None:
            # The uninterrupted run measured here: the recorded KL sets the same target.
            self._calibrate(float(last.extra[KL_KEY]))
        elif self.measures_after(last.iteration):
            self._measure()  # a log without the KL: the weights are restored bitwise, so is it

    def record_fields(self, coefficients: list[float] | None) -> dict[str, Any]:
        cfg = self.cfg
        update_sq = expected_update_sq(coefficients, cfg.learning_rate, cfg.population_size, self.num_params)
        step = l2_step_for_target(self.drift, update_sq, self.target)
        return {AWD_STEP_KEY: step, TARGET_KEY: None if math.isinf(self.target) else self.target}

    def after_update(self, record: IterationRecord, drift: float) -> dict[str, Any]:
        self.drift = drift
        record.extra[DRIFT_KEY] = drift
        step = float(record.extra[AWD_STEP_KEY])  # what record_fields decided for this iteration
        metrics: dict[str, Any] = {
            "kl/budget": self.cfg.kl_budget,
            "awd/step": step,
            "awd/lambda": self.cfg.lambda_for_step(step),
            "awd/target_drift": self.target if math.isfinite(self.target) else None,
        }
        if self.measures_after(record.iteration):
            kl, seconds = self._measure()
            record.extra[KL_KEY] = kl
            metrics["kl/measured"] = kl
            metrics["time/kl"] = seconds
        return metrics

    def _measure(self) -> tuple[float, float]:
        t0 = time.perf_counter()
        kl = self.monitor.measure()
        self._calibrate(kl)
        return kl, time.perf_counter() - t0

    def _calibrate(self, kl: float) -> None:
        self.target = drift_target_for_kl(self.drift, kl, self.cfg.kl_budget)


__all__ = ["AWDSchedule", "DRIFT_KEY", "FixedStep", "KLBudget", "KL_KEY", "TARGET_KEY"]
