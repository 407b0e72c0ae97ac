"""Adaptive AWD: `--awd_lambda auto` (probes choose λ once) and `--kl_budget X` (the L2 step
adapts to hold a measured KL); both stay a pure function of the seed log."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import TINY, assert_bitwise_equal, copy_run

from esft.anchor import (
    drift_target_for_kl,
    expected_update_sq,
    l2_drift_after,
    l2_step_for_horizon,
    l2_step_for_target,
)
from esft.config import ESConfig
from esft.io import read_jsonl
from esft.seedlog import SEEDLOG, SeedLog, load_checkpoint_tensors, replay

# kl_every=2 over 4 iterations: the KL is probed before iteration 1 and measured after 2, 3 (the
# final check, halfway through the last 2) and 4, not after 1.
BUDGET = dict(kl_budget=2e-4, kl_tasks="conciseness", kl_num_prompts=2, kl_max_tokens=4, kl_every=2, max_steps=4)
AUTO = dict(awd="l2", awd_lambda="auto")


# ------------------------------------------------------------------ the controller
def test_the_l2_step_brings_the_expected_drift_to_the_target() -> None:
    assert l2_step_for_target(1.0, 0.0, math.inf) == 0.0
    assert l2_step_for_target(1.0, 0.0, 2.0) == 0.0  # under the target: no AWD
    s = l2_step_for_target(3.0, 16.0, 2.5)  # ‖d + u‖ ≈ √(9 + 16) = 5
    assert s == pytest.approx(0.5) and (1 - s) * 5.0 == pytest.approx(2.5)
    assert l2_step_for_target(100.0, 0.0, 1.0) == 0.5, "one step never removes more than half"


def _iterate_drift(drift: float, update_sq: float, step: float, iterations: int) -> list[float]:
    """The recursion D² ← (1 − s)²(D² + ‖u‖²) one iteration at a time."""
    out = []
    for _ in range(iterations):
        drift = (1.0 - step) * math.sqrt(drift * drift + update_sq)
        out.append(drift)
    return out


def test_the_closed_form_drift_equals_the_recursion() -> None:
    assert l2_drift_after(3.0, 4.0, 0.0, 5) == pytest.approx(math.sqrt(9.0 + 5 * 4.0))
    assert l2_drift_after(3.0, 4.0, 0.1, 7) == pytest.approx(_iterate_drift(3.0, 4.0, 0.1, 7)[-1])
    assert l2_drift_after(3.0, 4.0, 0.1, 0) == 3.0


def test_the_planned_step_reaches_the_target_at_the_horizon_and_not_before() -> None:
    drift, update_sq, target, horizon = 2.0, 1.0, 3.5, 19  # plain ES would end at √23 ≈ 4.8
    s = l2_step_for_horizon(drift, update_sq, target, horizon)
    path = _iterate_drift(drift, update_sq, s, horizon)
    assert 0.0 < s < 0.5
    assert path[-1] == pytest.approx(target, rel=1e-9)
    assert all(a < b for a, b in zip(path, path[1:])), "the drift climbs to the target, never past it"
    assert l2_step_for_horizon(drift, update_sq, 5.0, horizon) == 0.0, "plain ES stays under: no AWD"
    assert l2_step_for_horizon(drift, update_sq, target, 0) == 0.0, "nothing left to plan"
    assert l2_step_for_horizon(drift, update_sq, math.inf, horizon) == 0.0
    assert l2_step_for_horizon(100.0, 1.0, 0.1, 2) == 0.5, "out of reach: the largest step"


class _FakeMonitor:
    """KL = c·‖θ − θ₀‖², the quadratic law the controller assumes, read from the schedule
    (displaced by σ·ε from θ₀: ‖σ·ε‖² = σ²·d). `scales`: a curvature c for each reading in
    turn (the probe first), as when each reading sees other random directions."""

    def __init__(self, scale: float, scales: list[float] | None = None) -> None:
        self.scale, self.scales, self.schedule, self.calls, self.probes = scale, scales, None, 0, 0

    def _curvature(self) -> float:
        reading = self.calls + self.probes
        return self.scales[reading % len(self.scales)] if self.scales else self.scale

    def measure(self, displaced: tuple[int, float] | None = None) -> float:
        c = self._curvature()
        if displaced is None:
            self.calls += 1
            return c * self.schedule.drift**2
        self.probes += 1
        assert self.schedule.drift == 0.0, "the probe is taken at θ₀"
        return c * displaced[1] ** 2 * self.schedule.num_params


def _drive_budget(cfg: ESConfig, iterations: int, monitor: _FakeMonitor, records=None, start_drift: float = 0.0):
    """Run the KL-budget schedule on the expected drift recursion, as the trainer calls it."""
    from esft.awd_schedule import KLBudget
    from esft.seedlog import IterationRecord

    num_params = 1_000_000
    schedule = KLBudget(cfg, monitor, num_params)
    monitor.schedule = schedule
    records = list(records or [])
    if records:
        schedule.resume(records)
    drift = start_drift
    coefficients = [1.0] * cfg.population_size
    update_sq = expected_update_sq(coefficients, cfg.learning_rate, cfg.population_size, num_params)
    for k in range(len(records) + 1, iterations + 1):
        fields = schedule.record_fields(coefficients)
        drift = (1.0 - fields["awd_step"]) * math.sqrt(drift * drift + update_sq)
        record = IterationRecord(k, [k] * cfg.population_size, [0.0] * cfg.population_size, coefficients, dict(fields))
        schedule.after_update(record, drift)
        records.append(record)
    return records


def test_the_budget_plans_one_step_that_ends_the_run_at_the_budget() -> None:
    cfg = ESConfig(kl_budget=0.1, kl_tasks="conciseness", kl_every=5, max_steps=20, population_size=4,
                   learning_rate=0.01)
    monitor = _FakeMonitor(scale=0.1 / 15.0**2)  # the budget is reached at a drift of 15; plain ES ends at √20·5
    records = _drive_budget(cfg, 20, monitor)
    steps = [r.extra["awd_step"] for r in records]
    assert steps[0] > 0, "the probe at θ₀ plans the first update's step too"
    assert steps == pytest.approx([steps[0]] * 20, rel=1e-9), "an exact quadratic law: one step, never replanned"
    assert [r.iteration for r in records if "awd_probe_kl" in r.extra] == [1]
    assert records[0].extra["awd_probe_drift"] == pytest.approx(5.0), "the update's expected norm, √(α²·d/N·Σc²)"
    kls = [r.extra["awd_kl"] for r in records if "awd_kl" in r.extra]
    assert [r.iteration for r in records if "awd_kl" in r.extra] == [5, 10, 15, 18, 20], "18: the final check"
    assert max(kls) <= 0.1 and kls[-1] == pytest.approx(0.9 * 0.1, rel=1e-6), "at the budget's margin at the end"
    assert kls == sorted(kls), "the KL climbs to it rather than overshooting and being pulled back"
    assert (monitor.probes, monitor.calls) == (1, 5)


def test_the_plan_rests_on_the_mean_curvature_of_every_reading_so_far() -> None:
    from esft.awd_schedule import pooled_curvature

    cfg = ESConfig(kl_budget=0.1, kl_tasks="conciseness", kl_every=5, max_steps=20, population_size=4,
                   learning_rate=0.01)
    scales = [c / 15.0**2 for c in (0.1, 0.13, 0.08, 0.12, 0.1, 0.09)]  # a noisy curvature per reading
    records = _drive_budget(cfg, 20, _FakeMonitor(0.0, scales))
    readings = [(r.extra["awd_probe_kl"], r.extra["awd_probe_drift"]) for r in records if "awd_probe_kl" in r.extra]
    readings += [(r.extra["awd_kl"], r.extra["awd_drift"]) for r in records if "awd_kl" in r.extra]
    curvatures = [kl / drift**2 for kl, drift in readings]
    assert curvatures == pytest.approx(scales), "each reading sees its own curvature"
    targets = [r.extra["awd_target_drift"] for r in records]
    for k, after in [(1, 1), (6, 2), (11, 3), (16, 4), (19, 5)]:  # readings: probe, 5, 10, 15, 18 (the final check)
        pooled = sum(curvatures[:after]) / after
        assert targets[k - 1] == pytest.approx(math.sqrt(0.9 * 0.1 / pooled), rel=1e-12), \
            f"iteration {k} plans on the mean of the first {after} curvatures, not the latest alone"
    assert pooled_curvature([]) == 0.0 and pooled_curvature([1.0, 2.0]) == 1.5
    steps = [r.extra["awd_step"] for r in records]
    assert len(set(steps[15:18])) == 1 and steps[15] != steps[14], "a reading replans the steps after it"


def test_a_skipped_update_records_no_step_and_calibration_waits_for_a_move() -> None:
    from esft.awd_schedule import KLBudget
    from esft.seedlog import IterationRecord

    cfg = ESConfig(kl_budget=0.1, kl_tasks="conciseness", kl_every=5, max_steps=20, population_size=4,
                   learning_rate=0.01)
    monitor = _FakeMonitor(0.1 / 15.0**2)
    schedule = KLBudget(cfg, monitor, 1_000_000)
    monitor.schedule = schedule
    skipped = IterationRecord(1, [1] * 4, [0.0] * 4, None, dict(schedule.record_fields(None)))
    schedule.after_update(skipped, 0.0)  # all rewards equal: no update, θ still at θ₀
    assert skipped.extra["awd_step"] == 0.0 and (monitor.probes, monitor.calls) == (0, 0), "θ₀: nothing to measure"
    assert not math.isfinite(schedule.target)
    moved = IterationRecord(2, [2] * 4, [0.0] * 4, [1.0] * 4, dict(schedule.record_fields([1.0] * 4)))
    assert monitor.probes == 1 and moved.extra["awd_step"] > 0, "the first update to move θ is probed for"
    schedule.after_update(moved, 5.0)
    assert monitor.calls == 0 and "awd_kl" not in moved.extra, "calibrated: the next measurement is iteration 5's"
    assert math.isfinite(schedule.target) and schedule.planned > 0
    later = schedule.record_fields(None)
    assert later["awd_step"] == 0.0, "a skipped update applies no AWD, whatever the plan"
    resumed = KLBudget(cfg, monitor, 1_000_000)
    resumed.resume([skipped, moved])
    assert (resumed.target, resumed.planned) == (schedule.target, schedule.planned), "the log holds the state"


@pytest.mark.parametrize("kept", [5, 7, 10, 11], ids=["after-a-reading", "between-readings", "after-two",
                                                      "after-the-last"])
def test_a_resumed_budget_plans_the_same_steps_without_measuring(kept: int) -> None:
    cfg = ESConfig(kl_budget=0.1, kl_tasks="conciseness", kl_every=5, max_steps=12, population_size=4,
                   learning_rate=0.01)
    scales = [c / 12.0**2 for c in (0.1, 0.14, 0.08)]  # the probe, 5 and 10 (none at 12, and no final check)
    whole = _drive_budget(cfg, 12, _FakeMonitor(0.0, scales))
    assert all(r.extra["awd_step"] > 0 for r in whole[1:]), "the budget binds: an empty check otherwise"
    assert len({r.extra["awd_target_drift"] for r in whole}) == 3, "each reading moved the target"
    done = sum(1 for r in whole[:kept] for key in ("awd_probe_kl", "awd_kl") if key in r.extra)
    monitor = _FakeMonitor(0.0, scales[done:])  # the readings still to come see the same curvatures
    resumed = _drive_budget(cfg, 12, monitor, records=whole[:kept], start_drift=whole[kept - 1].extra["awd_drift"])
    assert [r.extra for r in resumed] == [r.extra for r in whole], "the log holds every curvature the plan pools"
    assert monitor.calls == len(scales) - done and monitor.probes == 0, "only the readings after the resume"


@pytest.mark.parametrize("kept", [1, 2, 3])
def test_a_resume_replays_a_records_probe_before_its_measurement(kept: int) -> None:
    cfg = ESConfig(kl_budget=0.1, kl_tasks="conciseness", kl_every=1, max_steps=5, population_size=4,
                   learning_rate=0.01)
    scales = [c / 6.0**2 for c in (0.1, 0.14, 0.08, 0.12, 0.09, 0.11)]  # the probe, then after 1, 2, ..., 5
    whole = _drive_budget(cfg, 5, _FakeMonitor(0.0, scales))
    assert {"awd_probe_kl", "awd_kl"} <= set(whole[0].extra), "iteration 1 holds both the probe and a measurement"
    monitor = _FakeMonitor(0.0, scales[kept + 1:])
    resumed = _drive_budget(cfg, 5, monitor, records=whole[:kept], start_drift=whole[kept - 1].extra["awd_drift"])
    assert [r.extra for r in resumed] == [r.extra for r in whole], "the probe plans from θ₀, the measurement after it"


def test_a_resume_warns_when_the_log_was_planned_otherwise(caplog) -> None:
    from esft.awd_schedule import KLBudget

    cfg = ESConfig(kl_budget=0.1, kl_tasks="conciseness", kl_every=5, max_steps=12, population_size=4,
                   learning_rate=0.01)
    records = _drive_budget(cfg, 7, _FakeMonitor(0.1 / 12.0**2))
    with caplog.at_level("WARNING", logger="esft.awd_schedule"):
        KLBudget(cfg, _FakeMonitor(0.0), 1_000_000).resume(records)
    assert not caplog.records, "this controller's own log rebuilds exactly"
    for r in records:  # as if an earlier version had planned on another target
        if r.extra["awd_target_drift"] is not None:
            r.extra["awd_target_drift"] *= 1.01
    with caplog.at_level("WARNING", logger="esft.awd_schedule"):
        KLBudget(cfg, _FakeMonitor(0.0), 1_000_000).resume(records)
    assert "targets in this log differ" in caplog.text


def test_a_log_without_kl_readings_is_measured_once_on_resume_and_kept_out_of_the_mean() -> None:
    from esft.awd_schedule import KLBudget

    cfg = ESConfig(kl_budget=0.1, kl_tasks="conciseness", kl_every=5, max_steps=12, population_size=4,
                   learning_rate=0.01)
    records = _drive_budget(cfg, 3, _FakeMonitor(0.1 / 12.0**2))
    for r in records:  # a log from before the controller kept its readings
        for key in ("awd_kl", "awd_probe_kl", "awd_probe_drift", "awd_target_drift"):
            r.extra.pop(key, None)
    monitor = _FakeMonitor(0.2 / 12.0**2)
    schedule = KLBudget(cfg, monitor, 1_000_000)
    monitor.schedule = schedule
    schedule.resume(records)
    assert (monitor.calls, monitor.probes) == (1, 0), "measured once, where θ is"
    assert schedule.curvatures == [], "no record keeps that reading: a later resume could not pool it"
    assert schedule.target == pytest.approx(drift_target_for_kl(0.2 / 12.0**2, 0.1)), "it plans until the next reading"


@pytest.mark.parametrize(
    ("max_steps", "kl_every", "expected"),
    [(20, 10, 15), (19, 10, 14), (22, 10, None), (25, 10, None), (15, 10, None), (5, 10, 1), (4, 2, 3),
     (20, 5, 18), (12, 5, None), (7, 1, None), (1, 10, 1)],
)
def test_the_final_check_leaves_half_of_the_last_stretch_to_correct(max_steps, kl_every, expected) -> None:
    from esft.awd_schedule import KLBudget, final_check

    cfg = ESConfig(kl_budget=0.1, kl_tasks="piqa", kl_every=kl_every, max_steps=max_steps)
    assert final_check(cfg) == expected
    schedule = KLBudget(cfg, monitor=None, num_params=1)
    measured = [k for k in range(1, max_steps + 1) if schedule.measures_after(k)]
    assert expected is None or expected in measured
    last_before_end = max([k for k in measured if k < max_steps], default=0)
    assert max_steps - last_before_end <= max(1, kl_every // 2), \
        "the last measurement that can still steer leaves at most half of kl_every"


def test_the_target_drift_is_the_root_of_budget_over_curvature() -> None:
    assert drift_target_for_kl(0.04 / 2.0**2, 0.01, margin=1.0) == pytest.approx(1.0)
    assert drift_target_for_kl(0.01, 0.01) == pytest.approx(math.sqrt(0.9)), "the margin: 0.9 of the budget"
    assert drift_target_for_kl(0.0, 0.01) == math.inf, "no curvature read yet: no target"
    assert drift_target_for_kl(math.inf, 0.01) == math.inf
    assert expected_update_sq([1.0, -1.0], learning_rate=0.1, population_size=2, num_params=10) == pytest.approx(0.05)
    assert expected_update_sq(None, 0.1, 2, 10) == 0.0


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kl_budget": 0.0, "kl_tasks": "piqa"}, "kl_budget must be > 0"),
        ({"kl_budget": -0.1, "kl_tasks": "piqa"}, "kl_budget must be > 0"),
        ({"kl_budget": 0.1}, "needs prompts to measure the KL on"),
        ({"kl_budget": 0.1, "kl_tasks": "piqa", "awd": "l1"}, "adapts the AWD L2 step"),
        ({"kl_budget": 0.1, "kl_tasks": "piqa", "awd": "l2", "awd_lambda": 3.0}, "leave --awd_lambda out"),
        ({"awd_lambda": "auto"}, "awd_lambda auto picks the strength of AWD"),
        ({"awd": "l2", "awd_lambda": "often"}, "a number or 'auto'"),
    ],
)
def test_bad_adaptive_settings_are_clear_errors(overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        ESConfig(**overrides)


def test_the_cli_reads_auto_and_numbers() -> None:
    from esft.cli import parse_train_args

    assert parse_train_args(["--awd", "l2", "--awd_lambda", "auto"]).awd_lambda == "auto"
    assert parse_train_args(["--awd", "l2", "--awd_lambda", "0.5"]).awd_lambda == 0.5


def test_prompt_files_in_text_and_json_lines(tmp_path) -> None:
    from esft.kl_budget import read_prompt_file

    (tmp_path / "p.txt").write_text("Describe the sea.\n\nName a bird.\n")
    assert [c[0]["content"] for c in read_prompt_file(tmp_path / "p.txt")] == ["Describe the sea.", "Name a bird."]
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "Hi"}) + "\n"
                                      + json.dumps({"prompt": [{"role": "user", "content": "Yo"}]}) + "\n")
    assert read_prompt_file(tmp_path / "p.jsonl") == [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Yo"}]]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(ValueError, match="line 2"):
        read_prompt_file(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="no such file"):
        read_prompt_file(tmp_path / "missing.txt")


# ------------------------------------------------------------------ a KL budget
def _trained_run(tmp_path_factory, name: str, settings: dict) -> Path:
    """A tiny run with these settings, trained once per module."""
    from esft.trainer import ESTrainer

    out = tmp_path_factory.mktemp(name) / "run"
    ESTrainer(args=ESConfig(**{**TINY, **settings}, output_dir=str(out))).train()
    return out


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory, embedded_dir) -> Path:
    return _trained_run(tmp_path_factory, "budget", BUDGET)


@pytest.mark.slow
def test_a_budget_run_logs_the_kl_and_the_step_it_applied(budget_run: Path) -> None:
    metrics = [m for m in read_jsonl(budget_run / "metrics.jsonl") if m["iteration"] > 0]
    assert all(m["kl/budget"] == BUDGET["kl_budget"] for m in metrics)
    measured = [m for m in metrics if "kl/measured" in m]
    assert [m["iteration"] for m in measured] == [2, 3, 4], "every kl_every, and the final check"
    assert all(m["time/kl"] > 0 for m in measured) and "time/kl" not in metrics[0]
    assert all((m["kl/measured"] > 0) == (m["drift/norm"] > 0) for m in measured), "KL > 0 exactly when θ moved"
    records = SeedLog(budget_run).records()
    assert [r.extra.get("awd_kl") for r in records] == [m.get("kl/measured") for m in metrics], \
        "the seed log keeps each measured KL (a resume recalibrates from it)"
    steps = [r.extra["awd_step"] for r in records]
    assert steps == [m["awd/step"] for m in metrics]
    first_move = next(r for r in records if r.coefficients is not None)
    assert [r.iteration for r in records if "awd_probe_kl" in r.extra] == [first_move.iteration], \
        "probed once, at θ₀, before the first update that moves θ"
    assert first_move.extra["awd_probe_kl"] > 0 and first_move.extra["awd_step"] > 0, \
        "a budget this tight damps the very first update"
    assert metrics[first_move.iteration - 1]["kl/probe"] == first_move.extra["awd_probe_kl"]
    assert metrics[first_move.iteration - 1]["time/kl_probe"] > 0
    assert all(r.extra["awd_step"] == 0.0 for r in records if r.coefficients is None), "no update, no AWD"
    assert [m["awd/lambda"] for m in metrics] == pytest.approx([s / TINY["learning_rate"] for s in steps])
    assert (budget_run / "kl_cache").is_dir(), "the base-model continuations are cached"


@pytest.mark.slow
def test_the_probe_measures_a_displaced_model_and_leaves_the_weights_bitwise(tmp_path, embedded_dir) -> None:
    from esft.anchor import AnchorFile
    from esft.kl_budget import CPU_SCORE_BATCH, KLMonitor
    from esft.trainer import ESTrainer

    trainer = ESTrainer(args=ESConfig(**{**TINY, **BUDGET}, output_dir=str(tmp_path / "run")))
    state = trainer.state
    anchor = AnchorFile.write(tmp_path / "anchor.safetensors", state.items())
    monitor = KLMonitor(trainer.args, state, trainer.engine, anchor, tmp_path / "run")
    before = state.checksum()
    assert monitor.measure() == 0.0, "at θ₀ the model is the base model"
    small, large = monitor.measure(displaced=(7, 1e-3)), monitor.measure(displaced=(7, 2e-3))
    assert state.checksum() == before and not state.perturbed
    assert small > 0 and large / small == pytest.approx(4.0, rel=0.15), "KL grows like the squared distance"
    assert monitor.measure(displaced=(7, 1e-3)) == small, "the same seed, the same displacement"
    assert monitor.measure() == 0.0, "the model computes with θ₀ again"
    cached, monitor._base_lp = monitor._base_lp, None  # as when the base log-probs do not fit in memory
    assert monitor.measure(displaced=(7, 1e-3)) == small and state.checksum() == before
    monitor._base_lp = cached
    six = dataclasses.replace(trainer.args, kl_num_prompts=6)
    narrow = KLMonitor(six, state, trainer.engine, anchor, tmp_path / "run")
    wide = KLMonitor(six, state, trainer.engine, anchor, tmp_path / "run", score_batch_size=8)
    assert [len(b.rows) for b in narrow.batches] == [CPU_SCORE_BATCH, 6 - CPU_SCORE_BATCH], "the CPU scores in small batches"
    assert [len(b.rows) for b in wide.batches] == [6]
    assert narrow.measure() == 0.0, "the base side is scored in the same batches"
    # A KL of ~3e-4 nats is a difference of nearly equal log-probs: fp32 rounding moves it by
    # ~1e-4 of itself, where a misplaced position or pad would move it entirely.
    assert wide.measure(displaced=(7, 1e-3)) == pytest.approx(narrow.measure(displaced=(7, 1e-3)), rel=1e-3), \
        "how the rows are batched changes only the rounding"
    assert state.checksum() == before


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 3])
def test_a_budget_run_replays_bitwise(budget_run: Path, k: int) -> None:
    state, _ = replay(budget_run, k, device="cpu")
    expected = load_checkpoint_tensors(budget_run / f"checkpoint-{k}")
    assert_bitwise_equal({n: t for n, t in state.state_dict().items() if n in expected}, expected, f"replay of {k}")


@pytest.mark.slow
@pytest.mark.parametrize("kept", [1, 2, 3])
def test_a_resumed_budget_run_makes_the_same_decisions(tmp_path, budget_run: Path, monkeypatch, kept: int) -> None:
    from esft.kl_budget import KLMonitor
    from esft.trainer import ESTrainer

    run = copy_run(budget_run, tmp_path / "run")
    shutil.rmtree(run / "final")
    for k in range(kept + 1, BUDGET["max_steps"] + 1):
        shutil.rmtree(run / f"checkpoint-{k}", ignore_errors=True)
    lines = (run / SEEDLOG).read_text().splitlines(keepends=True)
    (run / SEEDLOG).write_text("".join(lines[:kept]))  # as if killed during iteration kept + 1
    measured = []
    real_measure = KLMonitor.measure
    monkeypatch.setattr(KLMonitor, "measure", lambda self, **kw: measured.append(kw) or real_measure(self, **kw))
    ESTrainer(args=ESConfig(**{**TINY, **BUDGET}, output_dir=str(run), resume=True)).train()
    # The state comes from the log: the only forward passes over the KL prompts are the probe
    # and measurements the uninterrupted run made after `kept` (its probe before its update).
    still_to_come = [key for r in SeedLog(budget_run).records()[kept:] for key in ("awd_probe_kl", "awd_kl")
                     if key in r.extra]
    assert still_to_come, "an empty check otherwise"
    assert [("awd_probe_kl" if kw else "awd_kl") for kw in measured] == still_to_come, \
        "nothing measured again: the log holds the calibration"
    assert (run / SEEDLOG).read_bytes() == (budget_run / SEEDLOG).read_bytes()
    assert_bitwise_equal(load_checkpoint_tensors(run / "final"), load_checkpoint_tensors(budget_run / "final"),
                         "resumed vs uninterrupted budget run")


# ------------------------------------------------------------------ auto λ
@pytest.fixture(scope="module")
def auto_run(tmp_path_factory, embedded_dir) -> Path:
    return _trained_run(tmp_path_factory, "auto", AUTO)


def test_the_horizon_rule_takes_s_t_1_for_l2_and_the_same_plateau_for_l1() -> None:
    from esft.auto_lambda import evidence_for, horizon_step, predicted

    quick = ESConfig(awd="l2", awd_lambda="auto", max_steps=20, population_size=8, learning_rate=5e-3)
    assert horizon_step(quick) == 0.05 and quick.lambda_for_step(0.05) == 10.0  # the ladder's λ=10 rung
    assert horizon_step(dataclasses.replace(quick, max_steps=1)) == 0.5, "capped for very short runs"
    p = predicted(0.05, 20)
    # Σ_{k=1..20} 0.95^{2k} / 20 and Σ 0.95^k / 20, computed directly.
    assert p["kl_cut"] == pytest.approx(20 / sum(0.95 ** (2 * k) for k in range(1, 21)))
    assert p["kl_cut"] == pytest.approx(2.479, abs=1e-3) and p["coherent_share"] == pytest.approx(0.609, abs=1e-3)
    l1 = dataclasses.replace(quick, awd="l1")
    assert horizon_step(l1) == pytest.approx(5e-3 / math.sqrt(8 * 20))
    ev = evidence_for(quick)
    assert ev["rule"] == "horizon" and ev["chosen_lambda"] == 10.0 and ev["cost_fraction"] == 0.0


@pytest.mark.slow
def test_auto_lambda_records_its_choice_and_evidence(auto_run: Path) -> None:
    evidence = json.loads((auto_run / "auto_lambda.json").read_text())
    step = 1 / TINY["max_steps"]  # s·T = 1
    assert evidence["chosen_step"] == step and evidence["rule"] == "horizon"
    assert evidence["chosen_lambda"] == pytest.approx(step / TINY["learning_rate"])
    assert evidence["predicted_kl_cut"] > 1 and evidence["cost_fraction"] == 0.0
    chosen = evidence["chosen_lambda"]
    assert yaml.safe_load((auto_run / "config.yaml").read_text())["awd_lambda_chosen"] == chosen
    row0 = read_jsonl(auto_run / "metrics.jsonl")[0]
    assert row0["iteration"] == 0 and row0["awd/lambda"] == chosen and row0["awd/step"] == step
    assert [r.extra["awd_step"] for r in SeedLog(auto_run).records()] == [step] * TINY["max_steps"]
    state, _ = replay(auto_run, 3, device="cpu")
    final = load_checkpoint_tensors(auto_run / "final")
    assert_bitwise_equal({n: t for n, t in state.state_dict().items() if n in final}, final, "auto-λ replay")


@pytest.mark.slow
def test_a_kept_record_resumed_without_its_evidence_file_recovers_the_choice_from_the_log(
        tmp_path, auto_run: Path, monkeypatch) -> None:
    import esft.auto_lambda
    from esft.trainer import ESTrainer

    monkeypatch.setattr(esft.auto_lambda, "evidence_for", lambda cfg: pytest.fail("a resume must not choose again"))
    run = tmp_path / "kept"  # what benchmarks/keep_records.py kept before it kept auto_lambda.json
    run.mkdir()
    config = yaml.safe_load((auto_run / "config.yaml").read_text())
    chosen = config.pop("awd_lambda_chosen")
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "output_dir": str(run)}, sort_keys=False))
    for name in ("seedlog.jsonl", "metrics.jsonl"):
        (run / name).write_bytes((auto_run / name).read_bytes())
    ESTrainer(args=ESConfig(**{**TINY, **AUTO}, output_dir=str(run), resume=True)).train()
    assert yaml.safe_load((run / "config.yaml").read_text())["awd_lambda_chosen"] == pytest.approx(chosen)
    evidence = json.loads((run / "auto_lambda.json").read_text())
    assert evidence["rebuilt_from"] == "seed log" and evidence["chosen_step"] == 1 / TINY["max_steps"]
    assert [r["iteration"] for r in read_jsonl(run / "metrics.jsonl")].count(0) <= 1, "no second iteration-0 row"
    final = load_checkpoint_tensors(run / "final")
    assert_bitwise_equal(final, load_checkpoint_tensors(auto_run / "final"), "the rebuilt final")


@pytest.mark.slow
def test_a_resumed_auto_run_keeps_its_step_and_never_chooses_again(tmp_path, auto_run: Path, monkeypatch) -> None:
    import esft.auto_lambda
    from esft.trainer import ESTrainer

    def no_choice(cfg):
        raise AssertionError("a resume must not choose again")

    monkeypatch.setattr(esft.auto_lambda, "evidence_for", no_choice)
    run = copy_run(auto_run, tmp_path / "run")
    # A longer run keeps the step it started with (the rule would give 1/4 now).
    ESTrainer(args=ESConfig(**{**TINY, **AUTO, "max_steps": 4}, output_dir=str(run), resume=True)).train()
    records = SeedLog(run).records()
    assert len(records) == 4 and records[-1].extra["awd_step"] == records[0].extra["awd_step"]
