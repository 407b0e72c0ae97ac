"""User reward functions: worker processes under a time and a memory limit, errors that
never crash a run, and per-function reward metrics (rewards/<name>/mean|std)."""

from __future__ import annotations

import ctypes
import dataclasses
import importlib
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from itertools import count
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY, tiny_cli_args

from esft import es
from esft.config import ESConfig
from esft.engine import Generation
from esft.io import read_jsonl
from esft.population import PopulationResult, score_group
from esft.rewards import (
    RewardFailureError,
    RewardGuard,
    RewardStats,
    function_metrics,
    score_completions,
)
from esft.seedlog import SEEDLOG, SeedLog
from esft.tasks.base import BaseTask
from esft.tasks.custom import CustomTask

ROWS = [{"prompt": "Say hi."}, {"prompt": "Name a fruit."}]
TEXTS = ["hello", "apple"]
HANG = ["hang", "hang"]
_names = count()


@pytest.fixture(autouse=True)
def _warnings(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="esft.rewards")


def lengths(prompts, completions, **kw):
    return [float(len(c)) for c in completions]


def stuck_on_hang(prompts, completions, **kw):
    """Sleeps 10**6 s inside a C call (libc sleep: no bytecode to interrupt) when asked to."""
    if completions[0] == "hang":
        ctypes.CDLL(None).sleep(10**6)
    return [float(len(c)) for c in completions]


def calls_in(path: Path) -> int:
    """Calls counted by `count_call` (a file, since worker processes share no memory)."""
    return path.stat().st_size if path.exists() else 0


def count_call(path: Path) -> int:
    with open(path, "ab") as f:
        f.write(b".")
    return calls_in(path)


# ------------------------------------------------------------------ time limit
def test_a_call_hanging_inside_c_is_cut_off_at_the_limit_and_its_completions_score_zero(caplog) -> None:
    task = CustomTask.from_functions([stuck_on_hang], ROWS)
    with RewardGuard(0.3) as guard:
        stats = RewardStats()
        t0 = time.perf_counter()
        assert score_completions(task, HANG, ROWS, stats, guard) == [0.0, 0.0]
        waited = time.perf_counter() - t0
        assert 0.3 <= waited < 2.5, f"waited {waited:.2f} s for a 0.3 s limit"
        assert stats.errors == 2, "a timed-out batch is counted once per completion, never retried one by one"
        assert "reward 'stuck_on_hang' did not return within 0.3 s" in caplog.text
        # Training goes on: the next call gets a new worker and resets the count of failures in a row.
        assert score_completions(task, TEXTS, ROWS, RewardStats(), guard) == [5.0, 5.0]
        assert guard.consecutive == 0 and guard.failures == 1


def test_three_failures_in_a_row_stop_with_a_message_that_says_how_to_resume() -> None:
    task = CustomTask.from_functions([stuck_on_hang], ROWS)
    with RewardGuard(0.2) as guard:
        for texts in (HANG, HANG, TEXTS, HANG, HANG):  # a call that returns resets the count
            score_completions(task, texts, ROWS, RewardStats(), guard)
        with pytest.raises(RewardFailureError) as err:
            score_completions(task, HANG, ROWS, RewardStats(), guard)
    message = str(err.value)
    for part in ("'stuck_on_hang'", "0.2 s", "3 calls in a row", "--reward_timeout", "seed log is intact", "--resume"):
        assert part in message, f"{part!r} missing from: {message}"


def test_the_number_of_failures_that_stops_the_run_is_configurable() -> None:
    task = CustomTask.from_functions([stuck_on_hang], ROWS)
    with RewardGuard(0.2, max_failures=1) as guard, pytest.raises(RewardFailureError, match="1 calls in a row"):
        score_completions(task, HANG, ROWS, RewardStats(), guard)


def test_a_busy_loop_in_c_is_cut_off_too() -> None:
    def backtracks(prompts, completions, **kw):  # catastrophic backtracking: minutes inside the C regex engine
        return [float(bool(re.match(r"(a+)+$", "a" * 40 + "b"))) for _ in completions]

    with RewardGuard(0.3) as guard:
        stats = RewardStats()
        t0 = time.perf_counter()
        assert score_completions(CustomTask.from_functions([backtracks], ROWS), TEXTS, ROWS, stats, guard) == [0.0, 0.0]
        assert time.perf_counter() - t0 < 2.5 and stats.errors == 2


def _exits(prompts, completions, **kw):
    os._exit(0)


def _segfaults(prompts, completions, **kw):
    ctypes.string_at(0)


def _floods(prompts, completions, **kw):
    hoard = []
    while True:
        hoard.append(bytearray(10**8))


ENDINGS = [
    (_exits, "ended its worker, which exited with code 0"),
    (_segfaults, "ended its worker, which was killed by signal 11 (SIGSEGV)"),
    (_floods, "ran out of memory (--reward_memory_gb 0.25)"),
]


@pytest.mark.parametrize(("func", "warning"), ENDINGS, ids=[e[0].__name__ for e in ENDINGS])
def test_a_reward_that_ends_its_process_costs_only_its_call(caplog, func, warning) -> None:
    task = CustomTask.from_functions([func, lengths], ROWS)
    with RewardGuard(10, memory_gb=0.25) as guard:
        stats = RewardStats()
        # The other function still scores, and this process is untouched.
        assert score_completions(task, TEXTS, ROWS, stats, guard) == [5.0, 5.0]
        assert stats.errors == 2 and guard.failures == 1
        assert f"reward '{func.__name__}' {warning}" in caplog.text, caplog.text
        assert score_completions(CustomTask.from_functions([lengths], ROWS), TEXTS, ROWS, RewardStats(), guard) == [5.0, 5.0]


def test_calls_run_in_a_worker_process_and_in_this_one_without_isolation() -> None:
    def pid(prompts, completions, **kw):
        return [float(os.getpid())] * len(completions)

    task = CustomTask.from_functions([pid], ROWS)
    with RewardGuard(5) as guarded, RewardGuard(5, isolation="none") as inline:
        worker = score_completions(task, TEXTS, ROWS, RewardStats(), guarded)
        assert worker[0] != os.getpid()
        assert score_completions(task, TEXTS, ROWS, RewardStats(), guarded) == worker, "one worker serves every call"
        assert score_completions(task, TEXTS, ROWS, RewardStats(), inline) == [float(os.getpid())] * 2
    assert score_completions(task, TEXTS, ROWS, RewardStats()) == [float(os.getpid())] * 2


def test_builtin_task_rewards_never_start_a_process() -> None:
    class Builtin(BaseTask):
        name = "builtin"

        def reward(self, completion, example):
            return float(os.getpid())

    with RewardGuard(5) as guard:
        guard.prepare(Builtin())
        assert score_completions(Builtin(), TEXTS, ROWS, RewardStats(), guard) == [float(os.getpid())] * 2
        assert not guard._processes


def test_closing_the_guard_ends_its_processes() -> None:
    task = CustomTask.from_functions([lengths], ROWS)
    guard = RewardGuard(5)
    guard.prepare(task)
    (process,) = [p for _, p in guard._processes.values()]
    pid = process._pid
    guard.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


# ---------------------------------------------------------- errors never crash
def _raises(prompts, completions, **kw):
    raise RuntimeError("judge unreachable")


def _nan(prompts, completions, **kw):
    return [math.nan] * len(completions)


def _too_many(prompts, completions, **kw):
    return [1.0] * (len(completions) + 1)


def _strings(prompts, completions, **kw):
    return ["high"] * len(completions)


def _a_string(prompts, completions, **kw):
    return "high"


def _exits(prompts, completions, **kw):
    sys.exit(3)


MISBEHAVIOURS = [
    (_raises, "reward '_raises' raised RuntimeError: judge unreachable", 2),  # retried one by one
    (_nan, "reward '_nan' returned nan", 1),
    (_too_many, "reward '_too_many' returned 3 values for 2 completions", 1),
    (_strings, "reward '_strings' returned a non-number: 'high'", 1),
    (_a_string, "reward '_a_string' returned a str, not a list", 1),
    (_exits, "reward '_exits' raised SystemExit(3)", 1),
]


@pytest.mark.parametrize("isolation", ["none", "process"])
@pytest.mark.parametrize(("func", "warning", "calls"), MISBEHAVIOURS, ids=[m[0].__name__ for m in MISBEHAVIOURS])
def test_a_misbehaving_reward_scores_zero_is_counted_and_warns_once(caplog, tmp_path, func, warning, calls, isolation) -> None:
    made = tmp_path / "calls"

    def counted(prompts, completions, **kw):
        count_call(made)
        return func(prompts, completions, **kw)

    counted.__name__ = func.__name__
    task = CustomTask.from_functions([counted, lengths], ROWS)
    warned: set[str] = set()
    with RewardGuard(5, isolation=isolation) as guard:
        for _ in range(2):
            stats = RewardStats(_seen=warned)
            # The other function still scores: one broken function never zeroes the rest.
            assert score_completions(task, TEXTS, ROWS, stats, guard) == [5.0, 5.0]
            assert stats.errors + stats.nonfinite == 2
        assert guard.failures == 0, "an exception or a bad value is the function's answer, not a failure of its worker"
    assert caplog.text.count(warning) == 1, caplog.text
    # Wrong counts and types are bugs of the function: one call, no retry per completion.
    assert calls_in(made) == 2 * (1 + (len(TEXTS) if calls == 2 else 0))


def test_an_exception_costs_only_the_completion_it_came_from(caplog) -> None:
    def picky(prompts, completions, **kw):
        if "apple" in completions:
            raise ValueError("no fruit")
        return [1.0] * len(completions)

    stats = RewardStats()
    with RewardGuard(5) as guard:
        assert score_completions(CustomTask.from_functions([picky], ROWS), TEXTS, ROWS, stats, guard) == [1.0, 0.0]
    assert stats.errors == 1 and "reward 'picky' raised ValueError: no fruit" in caplog.text


def test_keyboard_interrupt_in_this_process_still_stops_the_run() -> None:
    def interrupted(prompts, completions, **kw):
        raise KeyboardInterrupt

    with RewardGuard(5, isolation="none") as guard, pytest.raises(KeyboardInterrupt):
        score_completions(CustomTask.from_functions([interrupted], ROWS), TEXTS, ROWS, RewardStats(), guard)


def test_a_keyboard_interrupt_raised_by_a_worker_reward_is_its_failure_not_a_stop() -> None:
    def interrupted(prompts, completions, **kw):  # Ctrl-C reaches the trainer, not the worker (it ignores SIGINT)
        raise KeyboardInterrupt

    stats = RewardStats()
    with RewardGuard(5) as guard:
        assert score_completions(CustomTask.from_functions([interrupted], ROWS), TEXTS, ROWS, stats, guard) == [0.0, 0.0]
    assert stats.errors == 2


def test_failures_in_a_row_are_counted_per_function() -> None:
    # A healthy function between the broken one's calls must not reset its count.
    task = CustomTask.from_functions([lengths, stuck_on_hang], ROWS)
    with RewardGuard(0.2) as guard:
        score_completions(task, HANG, ROWS, RewardStats(), guard)
        score_completions(task, HANG, ROWS, RewardStats(), guard)
        with pytest.raises(RewardFailureError, match="'stuck_on_hang' failed on 3 calls in a row"):
            score_completions(task, HANG, ROWS, RewardStats(), guard)


def test_huge_finite_values_of_several_functions_that_sum_past_the_float_range_score_zero(caplog) -> None:
    def huge(prompts, completions, **kw):
        return [1e308] * len(completions)

    stats = RewardStats()
    with RewardGuard(5) as guard:
        values = score_completions(CustomTask.from_functions([huge, huge], ROWS), TEXTS, ROWS, stats, guard)
    assert values == [0.0, 0.0] and stats.nonfinite == 2
    assert "sum to inf" in caplog.text


# ---------------------------------------------------------- per-function metrics
def test_population_metrics_hold_each_functions_mean_and_std_over_all_completions() -> None:
    def alternating(prompts, completions, **kw):
        return [float(i % 2) for i in range(len(completions))]

    def sometimes(prompts, completions, **kw):  # None: not applicable (TRL); left out of its stats
        return [None if "x" in c else float(len(c)) for c in completions]

    def constant(prompts, completions, **kw):
        return [2.0] * len(completions)

    def constant_too(prompts, completions, **kw):
        return [3.0] * len(completions)

    constant_too.__name__ = "constant"  # two functions sharing a name
    task = CustomTask.from_functions([alternating, sometimes, constant, constant_too], ROWS * 2)
    assert task.func_names == ["alternating", "sometimes", "constant", "constant_2"]
    members = [["ab", "xyz", "abcd", "a"], ["abc", "b", "x", "abcdef"], ["x", "x", "x", "x"]]
    examples = task.load("train")
    results = []
    with RewardGuard(5) as guard:
        for i, texts in enumerate(members):
            per_member = [[Generation(t, 1) for t in texts]]
            results += score_group(task, [i], per_member, examples, 0.0, 0.0, guard=guard)
    metrics = PopulationResult.from_members(results).metrics
    # Against a direct computation over every completion of the iteration, NaN-aware, n-1 as TRL.
    values = {
        "alternating": [i % 2 for texts in members for i in range(len(texts))],
        "sometimes": [np.nan if "x" in t else len(t) for texts in members for t in texts],
        "constant": [2.0] * 12, "constant_2": [3.0] * 12,
    }
    for name, v in values.items():
        assert metrics[f"rewards/{name}/mean"] == pytest.approx(np.nanmean(v)), name
        assert metrics[f"rewards/{name}/std"] == pytest.approx(np.nanstd(v, ddof=1)), name
    assert [r.reward for r in results][2] == pytest.approx(0.5 + 0 + 2 + 3)


def test_function_metrics_leave_out_a_function_with_no_value() -> None:
    assert function_metrics([{"broken": (0, 0.0, 0.0), "one": (1, 4.0, 16.0)}]) == {
        "rewards/one/mean": 4.0, "rewards/one/std": 0.0,
    }


# ------------------------------------------------------------------------ Ray
class _Remote:
    def remote(self, *args):
        return object()  # a distinct "object ref" per call


class _Actor:
    run_members = _Remote()


def _fake_population(get_error: BaseException):
    ray = pytest.importorskip("ray")
    from esft import distributed

    class FakeRay:
        exceptions = ray.exceptions

        def wait(self, refs, num_returns=1, timeout=None):
            return refs[:1], refs[1:]

        def get(self, ref):
            raise get_error

        def kill(self, actor):
            pass

    pop = distributed.RayPopulation.__new__(distributed.RayPopulation)
    pop.ray, pop.cfg, pop.num_prompts, pop.hooks = FakeRay(), ESConfig(workers=1), 2, []
    pop.failures = pop.restarts = 0
    pop.workers = {"worker-0": distributed.WorkerHandle("worker-0", _Actor(), info={"pid": 1, "node": "n"})}
    return pop


def test_a_reward_failure_inside_a_ray_actor_reaches_the_driver_as_itself() -> None:
    ray = pytest.importorskip("ray")
    cause = RewardFailureError("reward 'stuck' failed on 3 calls in a row")
    wrapped = ray.exceptions.RayTaskError(
        "ESWorker.run_members", "Traceback (most recent call last): ...", cause, proctitle="w", pid=1, ip="127.0.0.1",
    ).as_instanceof_cause()
    pop = _fake_population(wrapped)
    with pytest.raises(RewardFailureError) as err:
        pop.score(es.plan_iteration(7, 2, 2, False, 2, None))
    assert type(err.value) is RewardFailureError, "the driver should raise the actor's error, not Ray's wrapper"
    assert str(err.value) == str(cause)


def test_a_lost_actor_is_reported_in_its_iteration_and_replaced_from_the_one_before(caplog, monkeypatch) -> None:
    ray = pytest.importorskip("ray")
    from esft.distributed import WorkersLostError

    caplog.set_level(logging.WARNING, logger="esft.distributed")
    pop = _fake_population(ray.exceptions.RayActorError())
    spawned: list[int] = []
    monkeypatch.setattr(pop, "_spawn", spawned.append)
    with pytest.raises(WorkersLostError):  # no actor left (the fake replacement never joins)
        pop.score(es.plan_iteration(7, 2, 2, False, 2, None))
    assert "lost during iteration 2" in caplog.text, caplog.text
    assert spawned == [1], "the replacement must start from the weights after iteration 1"


# ------------------------------------------------------------- tiny model runs
def make_flaky(state: Path):
    """A reward (the completions' non-blank characters) that hangs, once per run, on the
    first call whose completions are all blank. That call scores 0 whether it hangs or
    not, so an in-process run and a Ray run, where either actor may take it, log the same
    seeds. A local function, so Ray ships it to the actors by value."""

    def flaky(prompts, completions, **kw):
        values = [float(len("".join(c.split()))) for c in completions]
        if not any(values):
            try:
                os.close(os.open(state / "hung", os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return values
            time.sleep(10**6)
        return values

    return flaky


@pytest.fixture(scope="module")
def hung_run(tmp_path_factory, embedded_dir) -> tuple[Path, list[dict]]:
    """TINY in-process run whose reward hangs once (on iteration 1's first member), limit 1 s."""
    from esft.trainer import ESTrainer

    root = tmp_path_factory.mktemp("hung")
    history = ESTrainer(
        reward_funcs=make_flaky(root), train_dataset=ROWS,
        args=ESConfig(**{**TINY, "save_steps": 0, "reward_timeout": 1}, output_dir=str(root / "run")),
    ).train()
    assert (root / "hung").exists(), "no call had only blank completions: the reward never hung; adjust the test"
    return root / "run", history


@pytest.mark.slow
def test_a_hanging_reward_is_cut_off_and_the_run_finishes(hung_run) -> None:
    out, history = hung_run
    assert len(SeedLog(out).records()) == TINY["max_steps"]
    # The hung call was one member's two completions: scored 0 and counted, nothing else.
    assert [m["reward/errors"] for m in history] == [2, 0, 0]
    assert all(m["time/iteration"] < 30 for m in history), "an iteration waited for the hung call"
    assert "rewards/flaky/mean" in history[0]


@pytest.mark.slow
def test_ray_actors_time_out_too_and_log_the_same_seeds(hung_run, tmp_path) -> None:
    ray = pytest.importorskip("ray")
    from esft import distributed
    from esft.trainer import ESTrainer

    out, history = hung_run
    env = {k: os.environ[k] for k in distributed.FORWARDED_ENV if k in os.environ}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env} if env else None)
    try:
        ray_history = ESTrainer(
            reward_funcs=make_flaky(tmp_path), train_dataset=ROWS,
            args=ESConfig(**{**TINY, "save_steps": 0, "reward_timeout": 1, "workers": 2}, output_dir=str(tmp_path / "ray")),
        ).train()
    finally:
        ray.shutdown()
    assert (tmp_path / "hung").exists(), "the reward never hung on an actor"
    assert (tmp_path / "ray" / SEEDLOG).read_bytes() == (out / SEEDLOG).read_bytes()
    assert sum(m["reward/errors"] for m in ray_history) == 2
    for key in ("rewards/flaky/mean", "rewards/flaky/std"):
        assert [m[key] for m in ray_history] == pytest.approx([m[key] for m in history]), key


HANGS_FROM_ITERATION_2 = """
import os, time
COUNTER = os.path.join(os.path.dirname(__file__), "calls")  # on disk: workers share no memory
def reward(prompts, completions, **kw):
    with open(COUNTER, "ab") as f:
        f.write(b".")
    if os.path.getsize(COUNTER) > 4:  # iteration 1's 4 members score; every call after that hangs
        time.sleep(10**6)
    return [float(len(c)) for c in completions]
"""
FIXED = """
def reward(prompts, completions, **kw):
    return [float(len(c)) for c in completions]
"""


def _reward_module(tmp_path: Path, monkeypatch, source: str) -> str:
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # a rewritten module must not load a stale .pyc
    monkeypatch.syspath_prepend(str(tmp_path))
    name = f"guarded_rewards_{next(_names)}"
    (tmp_path / f"{name}.py").write_text(source)
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return name


@pytest.mark.slow
def test_three_hangs_stop_the_run_and_resume_continues_with_the_fixed_function(tmp_path, monkeypatch, embedded_dir) -> None:
    from esft.trainer import ESTrainer

    name = _reward_module(tmp_path, monkeypatch, HANGS_FROM_ITERATION_2)
    cfg = ESConfig(**{**TINY, "task": f"{name}:reward", "save_steps": 0, "reward_timeout": 1},
                   dataset=str(tmp_path / "data.jsonl"), output_dir=str(tmp_path / "run"))
    with pytest.raises(RewardFailureError, match=r"'reward' failed on 3 calls in a row \(the last did not return within 1 s.*--resume"):
        ESTrainer(args=cfg).train()
    assert len(SeedLog(tmp_path / "run").records()) == 1, "iteration 1 is committed, iteration 2 is not"

    (tmp_path / f"{name}.py").write_text(FIXED)
    importlib.invalidate_caches()
    monkeypatch.delitem(sys.modules, name)
    ESTrainer(args=dataclasses.replace(cfg, resume=True)).train()
    records = SeedLog(tmp_path / "run").records()
    assert [r.iteration for r in records] == [1, 2, 3]
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 3


HOSTILE = """
import ctypes, os, sys
COUNTER = os.path.join(os.path.dirname(__file__), "calls")
def reward(prompts, completions, **kw):
    with open(COUNTER, "ab") as f:
        f.write(b".")
    call = os.path.getsize(COUNTER)
    if call == 1:
        os._exit(0)                       # ends the worker without a word
    if call == 3:
        ctypes.CDLL(None).sleep(10**6)    # hangs inside C: only a kill stops it
    if call == 5:
        hoard = []
        while True:                       # allocates without bound
            hoard.append(bytearray(10**8))
    if call == 7:
        sys.exit(3)                       # would end an in-process run
    if call == 8:
        ctypes.string_at(0)               # segfaults
    return [float(len(c)) for c in completions]
"""


@pytest.mark.slow
def test_rewards_that_exit_hang_in_c_flood_memory_or_segfault_are_cut_off_and_the_run_finishes(
    tmp_path, monkeypatch, embedded_dir, caplog,
) -> None:
    from esft.trainer import ESTrainer

    name = _reward_module(tmp_path, monkeypatch, HOSTILE)
    cfg = ESConfig(**{**TINY, "task": f"{name}:reward", "save_steps": 0, "reward_timeout": 3, "reward_memory_gb": 0.5},
                   dataset=str(tmp_path / "data.jsonl"), output_dir=str(tmp_path / "run"))
    history = ESTrainer(args=cfg).train()
    assert [r.iteration for r in SeedLog(tmp_path / "run").records()] == [1, 2, 3]
    assert (tmp_path / "run" / "final").is_dir()
    # Calls 1 and 3 (iteration 1), 5, 7 and 8 (iteration 2) of 12 (4 members x 3 iterations) scored their 2
    # completions 0.
    assert [m["reward/errors"] for m in history] == [4, 6, 0], [m["reward/errors"] for m in history]
    for said in ("exited with code 0", "did not return within 3 s", "ran out of memory", "raised SystemExit(3)",
                 "signal 11 (SIGSEGV)"):
        assert said in caplog.text, f"{said!r} not logged"


ALWAYS_EXITS = """
import os
def reward(prompts, completions, **kw):
    os._exit(0)
"""


@pytest.mark.slow
def test_a_reward_that_always_exits_stops_the_cli_with_one_line_and_a_nonzero_code(tmp_path, monkeypatch, embedded_dir) -> None:
    name = _reward_module(tmp_path, monkeypatch, ALWAYS_EXITS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    args = tiny_cli_args(task=f"{name}:reward", dataset=str(tmp_path / "data.jsonl"), output_dir=str(tmp_path / "run"),
                         save_steps=0)
    proc = subprocess.run([sys.executable, "-m", "esft.cli", "train", *args], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("esft train: error:")]
    assert len(errors) == 1 and "failed on 3 calls in a row" in errors[0] and "exited with code 0" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / SEEDLOG).exists() or not SeedLog(tmp_path / "run").records()


@pytest.mark.slow
def test_per_function_metrics_reach_metrics_jsonl_and_sys_exit_in_a_reward_scores_zero(tmp_path, embedded_dir) -> None:
    from esft.trainer import ESTrainer, _format_metrics

    exits: list[int] = []

    def exits_once(prompts, completions, **kw):
        if not exits:
            exits.append(1)
            sys.exit(3)
        return [5.0] * len(completions)

    def alternating(prompts, completions, **kw):
        return [float(i % 2) for i in range(len(completions))]

    def constant(prompts, completions, **kw):
        return [2.0] * len(completions)

    # reward_timeout=0: no time limit; sys.exit still only ends the call, in the worker process.
    cfg = ESConfig(**{**TINY, "max_steps": 1, "save_steps": 0, "reward_timeout": 0}, output_dir=str(tmp_path / "run"))
    ESTrainer(reward_funcs=[constant, alternating, exits_once], args=cfg, train_dataset=ROWS).train()
    (m,) = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert m["reward/errors"] == 2, "sys.exit scored its call's two completions 0"
    n = TINY["population_size"] * TINY["prompts_per_step"]
    assert m["rewards/constant/mean"] == 2.0 and m["rewards/constant/std"] == 0.0
    assert m["rewards/alternating/mean"] == 0.5
    assert m["rewards/alternating/std"] == pytest.approx(math.sqrt(n * 0.25 / (n - 1)))
    assert m["rewards/exits_once/mean"] == 5.0 and m["rewards/exits_once/std"] == 0.0  # the failed call left out
    assert m["reward/mean"] == pytest.approx(2.0 + 0.5 + 5.0 * (n - 2) / n)
    assert "constant=2 alternating=0.5 exits_once=5" in _format_metrics(m)
