"""User reward functions: a time limit per call, errors that never crash a run, and
per-function reward metrics (rewards/<name>/mean|std)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import os
import sys
import threading
import time
from itertools import count
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY

from esft import es
from esft.config import ESConfig
from esft.engine import Generation
from esft.io import read_jsonl
from esft.population import PopulationResult, score_group
from esft.rewards import (
    RewardGuard,
    RewardStats,
    RewardTimeoutError,
    function_metrics,
    score_completions,
)
from esft.seedlog import SEEDLOG, SeedLog
from esft.tasks.base import BaseTask
from esft.tasks.custom import CustomTask

ROWS = [{"prompt": "Say hi."}, {"prompt": "Name a fruit."}]
TEXTS = ["hello", "apple"]
_names = count()


@pytest.fixture(autouse=True)
def _warnings(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="esft.rewards")


def lengths(prompts, completions, **kw):
    return [float(len(c)) for c in completions]


def hangs_on_call(*which: int):
    """A reward that sleeps 10**6 s on the given calls (1-based) and returns lengths otherwise."""
    calls: list[int] = []

    def stuck(prompts, completions, **kw):
        calls.append(len(completions))
        if len(calls) in which:
            time.sleep(10**6)
        return [float(len(c)) for c in completions]

    return stuck, calls


def reward_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("esft-reward-")]


# ------------------------------------------------------------------ time limit
def test_a_hanging_call_is_abandoned_at_the_limit_and_its_completions_score_zero(caplog) -> None:
    stuck, calls = hangs_on_call(1)
    task, guard = CustomTask.from_functions([stuck], ROWS), RewardGuard(0.3)
    stats = RewardStats()
    t0 = time.perf_counter()
    assert score_completions(task, TEXTS, ROWS, stats, guard) == [0.0, 0.0]
    waited = time.perf_counter() - t0
    assert 0.3 <= waited < 2.0, f"waited {waited:.2f} s for a 0.3 s limit"
    assert stats.errors == 2
    assert calls == [2], "a timed-out batch must not be retried completion by completion"
    assert "reward 'stuck' did not return within 0.3 s" in caplog.text
    # Training goes on: the next call finishes and resets the count of timeouts in a row.
    assert score_completions(task, TEXTS, ROWS, RewardStats(), guard) == [5.0, 5.0]
    assert guard.consecutive == 0 and guard.timeouts == 1


def test_three_timeouts_in_a_row_stop_with_a_message_that_says_how_to_resume() -> None:
    stuck, _ = hangs_on_call(1, 2, 4, 5, 6)
    task, guard = CustomTask.from_functions([stuck], ROWS), RewardGuard(0.2)
    for _ in range(4):  # hang, hang, a call that finishes (resets the count), hang
        score_completions(task, TEXTS, ROWS, RewardStats(), guard)
    score_completions(task, TEXTS, ROWS, RewardStats(), guard)  # the second in a row
    with pytest.raises(RewardTimeoutError) as err:
        score_completions(task, TEXTS, ROWS, RewardStats(), guard)
    message = str(err.value)
    for part in ("'stuck'", "0.2 s", "3 calls in a row", "--reward_timeout", "seed log is intact", "--resume"):
        assert part in message, f"{part!r} missing from: {message}"


def test_an_abandoned_thread_spinning_in_python_is_stopped() -> None:
    def spins(prompts, completions, **kw):
        while True:
            pass

    guard = RewardGuard(0.2)
    stats = RewardStats()
    score_completions(CustomTask.from_functions([spins], ROWS), TEXTS, ROWS, stats, guard)
    assert stats.errors == 2
    deadline = time.time() + 5
    while any(t.name == "esft-reward-spins" for t in reward_threads()) and time.time() < deadline:
        time.sleep(0.01)
    assert not [t for t in reward_threads() if t.name == "esft-reward-spins"], "the spinning thread kept running"
    assert guard.running() == 0


def test_calls_run_on_a_daemon_thread_under_a_limit_and_directly_without_one() -> None:
    seen: list[threading.Thread] = []

    def where(prompts, completions, **kw):
        seen.append(threading.current_thread())
        return [1.0] * len(completions)

    task = CustomTask.from_functions([where], ROWS)
    score_completions(task, TEXTS, ROWS, RewardStats(), RewardGuard(5))
    score_completions(task, TEXTS, ROWS, RewardStats(), RewardGuard(0))
    score_completions(task, TEXTS, ROWS, RewardStats())
    assert seen[0] is not threading.current_thread() and seen[0].daemon
    assert seen[1] is threading.current_thread() and seen[2] is threading.current_thread()


def test_builtin_task_rewards_never_start_a_thread() -> None:
    class Builtin(BaseTask):
        name = "builtin"

        def reward(self, completion, example):
            seen.append(threading.current_thread())
            return 1.0

    seen: list[threading.Thread] = []
    assert score_completions(Builtin(), TEXTS, ROWS, RewardStats(), RewardGuard(5)) == [1.0, 1.0]
    assert seen == [threading.current_thread()] * 2


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


@pytest.mark.parametrize("timeout", [0, 5], ids=["direct", "guarded"])
@pytest.mark.parametrize(("func", "warning", "calls"), MISBEHAVIOURS, ids=[m[0].__name__ for m in MISBEHAVIOURS])
def test_a_misbehaving_reward_scores_zero_is_counted_and_warns_once(caplog, func, warning, calls, timeout) -> None:
    made: list[int] = []

    def counted(prompts, completions, **kw):
        made.append(len(completions))
        return func(prompts, completions, **kw)

    counted.__name__ = func.__name__
    task, guard = CustomTask.from_functions([counted, lengths], ROWS), RewardGuard(timeout)
    warned: set[str] = set()
    for _ in range(2):
        stats = RewardStats(_seen=warned)
        # The other function still scores: one broken function never zeroes the rest.
        assert score_completions(task, TEXTS, ROWS, stats, guard) == [5.0, 5.0]
        assert stats.errors + stats.nonfinite == 2
    assert caplog.text.count(warning) == 1, caplog.text
    # Wrong counts and types are bugs of the function: one call, no retry per completion.
    assert len(made) == 2 * (1 + (len(TEXTS) if calls == 2 else 0))


def test_an_exception_costs_only_the_completion_it_came_from(caplog) -> None:
    def picky(prompts, completions, **kw):
        if "apple" in completions:
            raise ValueError("no fruit")
        return [1.0] * len(completions)

    stats = RewardStats()
    assert score_completions(CustomTask.from_functions([picky], ROWS), TEXTS, ROWS, stats, RewardGuard(5)) == [1.0, 0.0]
    assert stats.errors == 1 and "reward 'picky' raised ValueError: no fruit" in caplog.text


@pytest.mark.parametrize("timeout", [0, 5], ids=["direct", "guarded"])
def test_keyboard_interrupt_still_stops_the_run(timeout) -> None:
    def interrupted(prompts, completions, **kw):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        score_completions(CustomTask.from_functions([interrupted], ROWS), TEXTS, ROWS, RewardStats(), RewardGuard(timeout))


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
    for i, texts in enumerate(members):
        per_member = [[Generation(t, 1) for t in texts]]
        results += score_group(task, [i], per_member, examples, 0.0, 0.0, guard=RewardGuard(5))
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


def test_a_reward_timeout_inside_a_ray_actor_reaches_the_driver_as_itself() -> None:
    ray = pytest.importorskip("ray")
    cause = RewardTimeoutError("reward 'stuck' did not return within 1 s on 3 calls in a row")
    wrapped = ray.exceptions.RayTaskError(
        "ESWorker.run_members", "Traceback (most recent call last): ...", cause, proctitle="w", pid=1, ip="127.0.0.1",
    ).as_instanceof_cause()
    pop = _fake_population(wrapped)
    with pytest.raises(RewardTimeoutError) as err:
        pop.score(es.plan_iteration(7, 2, 2, False, 2, None))
    assert type(err.value) is RewardTimeoutError, "the driver should raise the actor's error, not Ray's wrapper"
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
import time
CALLS = []
def reward(prompts, completions, **kw):
    CALLS.append(1)
    if len(CALLS) > 4:  # iteration 1's 4 members score; every call after that hangs
        time.sleep(10**6)
    return [float(len(c)) for c in completions]
"""
FIXED = """
def reward(prompts, completions, **kw):
    return [float(len(c)) for c in completions]
"""


@pytest.mark.slow
def test_three_hangs_stop_the_run_and_resume_continues_with_the_fixed_function(tmp_path, monkeypatch, embedded_dir) -> None:
    from esft.trainer import ESTrainer

    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # the rewritten module must not load a stale .pyc
    monkeypatch.syspath_prepend(str(tmp_path))
    name = f"hanging_rewards_{next(_names)}"
    (tmp_path / f"{name}.py").write_text(HANGS_FROM_ITERATION_2)
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = ESConfig(**{**TINY, "task": f"{name}:reward", "save_steps": 0, "reward_timeout": 1},
                   dataset=str(tmp_path / "data.jsonl"), output_dir=str(tmp_path / "run"))
    with pytest.raises(RewardTimeoutError, match=r"'reward' did not return within 1 s on 3 calls in a row.*--resume"):
        ESTrainer(args=cfg).train()
    assert len(SeedLog(tmp_path / "run").records()) == 1, "iteration 1 is committed, iteration 2 is not"

    (tmp_path / f"{name}.py").write_text(FIXED)
    importlib.invalidate_caches()
    monkeypatch.delitem(sys.modules, name)
    ESTrainer(args=dataclasses.replace(cfg, resume=True)).train()
    records = SeedLog(tmp_path / "run").records()
    assert [r.iteration for r in records] == [1, 2, 3]
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 3


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

    # reward_timeout=0: user code runs on the main thread, where SystemExit would end the process.
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
