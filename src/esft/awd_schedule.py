"""The AWD step of each iteration when it is decided during the run (DESIGN: adaptive AWD).

A fixed λ needs no schedule: every iteration applies α·λ. `--kl_budget X` and
`--awd_lambda auto` decide the step as the run goes; whatever they decide is written into
the iteration's seed-log record (`awd_step`, read back by `seedlog.record_awd_step`), so
replay, resume and Ray actors apply exactly what the driver applied, and the decisions
themselves only use what the log holds or what a replay reproduces bitwise.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Protocol

from esft.anchor import (
    drift_target_for_kl,
    expected_update_sq,
    l2_step_for_horizon,
    l2_step_for_target,
)
from esft.config import ESConfig
from esft.noise import tensor_seed
from esft.seedlog import AWD_STEP_KEY, IterationRecord

log = logging.getLogger(__name__)

#: Record keys of the KL-budget controller's state: the drift after the iteration's AWD,
#: the target drift its step aimed at (null: no target yet) and, on iterations that measured
#: it, the KL after the update (a resume recalibrates from it instead of measuring again).
DRIFT_KEY = "awd_drift"
TARGET_KEY = "awd_target_drift"
KL_KEY = "awd_kl"
#: The calibration before the first update: the KL at θ₀ + one random update-sized step
#: (`PROBE_DRIFT_KEY` its norm), so that update is damped like the rest.
PROBE_KL_KEY = "awd_probe_kl"
PROBE_DRIFT_KEY = "awd_probe_drift"


def final_check(cfg: ESConfig) -> int | None:
    """The iteration halfway through the run's last `kl_every` (`max_steps` − ⌊kl_every/2⌋, at
    least 1) where the KL budget measures once more, so that half of that stretch is left to
    correct; None when a `kl_every` measurement already leaves no more than that."""
    at = max(1, cfg.max_steps - cfg.kl_every // 2)
    last_regular = (cfg.max_steps - 1) // cfg.kl_every * cfg.kl_every  # before the end; 0: none
    return at if at > last_regular and at % cfg.kl_every else None


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

    Each measured KL gives a curvature, KL/‖θ − θ₀‖² (the KL grows like the squared
    distance near θ₀); their mean so far sets a target drift (`drift_target_for_kl`) and
    plans one constant step for the rest of the run: the s whose expected drift at
    `max_steps` equals that target (`l2_step_for_horizon`). Damping every update a little,
    as a fixed λ does, kept more target gain than letting plain ES run until the budget
    binds and then capping (measured, README). Each iteration applies the planned step, or
    the larger one that brings the drift back to the target (`l2_step_for_target`) should
    it run ahead of the plan between measurements.

    The first update is planned too: before it, the KL is measured at θ₀ plus one random
    step of the update's expected size (the members' own noise family), the probe. ES moves
    θ in random directions mostly, so the curvature along one is what the drift will meet
    (its KL/‖θ − θ₀‖² was 0.92–1.26 times the one measured after iteration 1 over nine runs,
    so that measurement is no longer taken). Every `kl_every` iterations the KL is measured
    again, and once halfway through the run's last stretch (`final_check`).

    Why the mean of every curvature read so far rather than the latest: one reading is
    noisy (the drift is a sum of few random directions, each with its own curvature), and
    planning the last iterations on the final check's reading alone moved the steps most
    where there was least time left to relearn what they took back (0.047 to 0.082 at one
    seed, whose KL then ended at 0.75·X). Over thirteen runs the mean of the probe and the
    readings up to the final check predicted the end's curvature with 6.5% rms error, the
    final check's reading alone with 9.2%; on thirteen more the other way, 6.4% against 4.5%
    (README). The price: the mean assumes the curvature holds still, so a steady late rise
    (one run's rose 45% between iterations 10 and 20) is corrected only by its share of the
    mean, about a fifth at the final check of a 20-iteration run; the plan aims at 0.9 of the
    budget, and the largest KL measured over 26 runs was 1.02·X.
    """

    def __init__(self, cfg: ESConfig, monitor: Any, num_params: int) -> None:
        self.cfg, self.monitor, self.num_params = cfg, monitor, num_params
        self.drift = 0.0
        self.done = 0  # iterations applied
        self.target = math.inf
        self.planned = 0.0
        self.curvatures: list[float] = []  # KL/‖θ − θ₀‖² of the probe and each measurement, in order
        self._probe_seconds = 0.0

    def measures_after(self, iteration: int) -> bool:
        """Whether the KL is measured once `iteration` is applied: every `kl_every`, the final
        check, and the first move while no target exists (the probe found no KL to scale)."""
        uncalibrated = not math.isfinite(self.target) and self.drift > 0.0
        return iteration % self.cfg.kl_every == 0 or iteration == final_check(self.cfg) or uncalibrated

    def resume(self, records: list[IterationRecord]) -> None:
        self.drift = float(records[-1].extra.get(DRIFT_KEY) or 0.0)
        self.done = records[-1].iteration
        # Every calibration of the uninterrupted run, in its order, from what the log kept: a
        # record's probe (taken at θ₀, before its update) comes before the target the record
        # logged, and that before the record's own measurement after its update.
        calibrated, same_plan = False, True
        for at in records:
            if at.extra.get(PROBE_KL_KEY) is not None:
                self._calibrate(float(at.extra[PROBE_KL_KEY]), float(at.extra[PROBE_DRIFT_KEY]), at.coefficients,
                                at.iteration - 1, 0.0)
                calibrated = True
            if TARGET_KEY in at.extra:
                same_plan = same_plan and _same_target(at.extra[TARGET_KEY], self.target)
            if at.extra.get(KL_KEY) is not None:
                drift = float(at.extra.get(DRIFT_KEY) or 0.0)
                self._calibrate(float(at.extra[KL_KEY]), drift, at.coefficients, at.iteration, drift)
                calibrated = True
        if not same_plan:
            log.warning("KL budget: the targets in this log differ from the ones this controller rebuilds from "
                        "it (a log written by another esft version, or resumed before from one without `awd_kl`); "
                        "the steps applied stay as logged, the remaining ones follow this controller's plan")
        if not calibrated and self.drift > 0.0:
            # A log from before `awd_kl` was kept: measure here once. The reading plans the steps
            # until the next measurement but joins no mean, since no record keeps it and a later
            # resume could not pool it.
            self._measure(records[-1], pooled=False)
        # else θ never moved (every update skipped): the first one to move it is probed for

    def record_fields(self, coefficients: list[float] | None) -> dict[str, Any]:
        cfg = self.cfg
        fields: dict[str, Any] = {}
        if coefficients is None:
            step = 0.0  # a skipped update applies no AWD either (`apply_record`): the record says so
        else:
            update_sq = expected_update_sq(coefficients, cfg.learning_rate, cfg.population_size, self.num_params)
            if self.drift == 0.0 and not math.isfinite(self.target):
                fields = self._probe(coefficients, update_sq)
            step = max(self.planned, l2_step_for_target(self.drift, update_sq, self.target))
        return {AWD_STEP_KEY: step, TARGET_KEY: None if math.isinf(self.target) else self.target, **fields}

    def after_update(self, record: IterationRecord, drift: float) -> dict[str, Any]:
        self.drift, self.done = drift, record.iteration
        record.extra[DRIFT_KEY] = drift
        step = float(record.extra[AWD_STEP_KEY])  # what record_fields decided for this iteration
        metrics: dict[str, Any] = {
            "kl/budget": self.cfg.kl_budget,
            "awd/step": step,
            "awd/lambda": self.cfg.lambda_for_step(step),
            "awd/target_drift": self.target if math.isfinite(self.target) else None,
        }
        if record.extra.get(PROBE_KL_KEY) is not None:
            metrics["kl/probe"] = record.extra[PROBE_KL_KEY]
            metrics["time/kl_probe"] = self._probe_seconds
        if self.measures_after(record.iteration):
            kl, seconds = self._measure(record)
            record.extra[KL_KEY] = kl
            metrics["kl/measured"] = kl
            metrics["time/kl"] = seconds
        return metrics

    def _probe(self, coefficients: list[float], update_sq: float) -> dict[str, Any]:
        """Calibrate at θ₀ before the first update: the KL at θ₀ + σ·ε, ‖σ·ε‖ the update's
        expected norm (a seed of its own: it moves no weights, so only the record keeps it)."""
        t0 = time.perf_counter()
        sigma = math.sqrt(update_sq / self.num_params)
        kl = self.monitor.measure(displaced=(tensor_seed(self.cfg.seed, PROBE_KL_KEY), sigma))
        self._probe_seconds = time.perf_counter() - t0
        self._calibrate(kl, math.sqrt(update_sq), coefficients, self.done, 0.0)
        return {PROBE_KL_KEY: kl, PROBE_DRIFT_KEY: math.sqrt(update_sq)}

    def _measure(self, record: IterationRecord, pooled: bool = True) -> tuple[float, float]:
        t0 = time.perf_counter()
        kl = self.monitor.measure()
        self._calibrate(kl, self.drift, record.coefficients, record.iteration, self.drift, pooled)
        return kl, time.perf_counter() - t0

    def _calibrate(self, kl: float, at_drift: float, coefficients: list[float] | None, done: int,
                   drift: float, pooled: bool = True) -> None:
        """Target and plan from the mean curvature of every reading so far and this one, the KL
        measured at drift `at_drift`, once `done` iterations are applied and θ sits at `drift`
        from θ₀ (the probe: at θ₀, 0). The coming updates are expected as large as one with
        `coefficients` (as Eq. 2's α²·d/N if it skipped). A KL of 0 (θ has not moved) adds no
        curvature; `pooled=False` plans on this reading without keeping it for later means."""
        cfg = self.cfg
        if not math.isfinite(kl):
            log.warning("KL budget: a KL measurement returned %r; it is ignored", kl)
        readings = self.curvatures
        if at_drift > 0.0 and math.isfinite(kl) and kl > 1e-12:
            readings = [*self.curvatures, kl / (at_drift * at_drift)]
            if pooled:
                self.curvatures = readings
        self.target = drift_target_for_kl(pooled_curvature(readings), cfg.kl_budget)
        update_sq = expected_update_sq(coefficients or [1.0] * cfg.population_size, cfg.learning_rate,
                                       cfg.population_size, self.num_params)
        self.planned = l2_step_for_horizon(drift, update_sq, self.target, cfg.max_steps - done)


def _same_target(logged: float | None, rebuilt: float) -> bool:
    """Whether a target the log holds (None: none yet) is the one the replay rebuilt."""
    if logged is None:
        return math.isinf(rebuilt)
    return math.isclose(float(logged), rebuilt, rel_tol=1e-12)


def pooled_curvature(curvatures: list[float]) -> float:
    """The curvature the plan assumes: the mean of those read so far (0: none yet)."""
    return math.fsum(curvatures) / len(curvatures) if curvatures else 0.0


__all__ = ["AWDSchedule", "DRIFT_KEY", "FixedStep", "KLBudget", "KL_KEY", "PROBE_DRIFT_KEY", "PROBE_KL_KEY", "TARGET_KEY",
           "final_check", "pooled_curvature"]
