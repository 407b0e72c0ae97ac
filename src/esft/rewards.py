"""Scoring completions safely, the time limit on user rewards, and the TRL reward adapter.

Model output is untrusted and a reward function is user code: a reward must never stop a
run. ES training, evaluation and GRPO (through `as_reward_func`) all score with
`score_completions`, so a misbehaving reward costs the same everywhere: the completions
it failed on score 0 and are counted (`reward/errors`), with one warning per kind.

User functions (a `CustomTask`: `module:function` or `ESTrainer(reward_funcs=...)`) are
called one at a time, so one broken function never zeroes the others, and through a
`RewardGuard`: each call runs in a daemon thread that is abandoned once it passes the
time limit (`--reward_timeout`). Built-in task rewards are bounded pure functions and
keep the direct, thread-free path.
"""

from __future__ import annotations

import ctypes
import logging
import math
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from esft.tasks.base import Example, Task
from esft.tasks.custom import CustomTask, RewardOutputError

RewardFunc = Callable[..., list[float]]
T = TypeVar("T")

log = logging.getLogger(__name__)

#: Timed-out calls in a row after which the run stops: one hang may be a network blip,
#: three in a row is a broken function that would otherwise cost the limit on every call.
MAX_CONSECUTIVE_TIMEOUTS = 3


class RewardTimeoutError(RuntimeError):
    """User reward calls passed the time limit several times in a row: the run stops."""


class RewardCallTimeout(Exception):
    """One call of a user reward function passed the time limit and was abandoned."""

    def __init__(self, name: str, timeout: float, consecutive: int, limit: int, running: int) -> None:
        self.name, self.timeout = name, timeout
        stop = limit - consecutive
        still = f"; {_plural(running, 'abandoned call')} still running" if running else ""
        super().__init__(
            f"reward {name!r} did not return within {timeout:g} s (--reward_timeout): the call "
            f"is abandoned ({consecutive} in a row; {stop} more in a row {'stops' if stop == 1 else 'stop'} "
            f"the run{still})"
        )


class _Abandoned(BaseException):
    """Raised inside an abandoned reward thread, so a pure-Python loop there stops."""


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# --------------------------------------------------------------------- time limit
class _Call:
    """One user call on its own thread; the caller reads the outcome if it finished in time."""

    def __init__(self, thunk: Callable[[], Any]) -> None:
        self.thunk = thunk
        self.value: Any = None
        self.error: BaseException | None = None
        self.done = False
        self.lock = threading.Lock()  # orders "finished" against "abandoned"

    def run(self) -> None:
        try:
            try:
                self.value = self.thunk()
            except BaseException as e:  # noqa: BLE001 - handed to the caller, who decides
                self.error = e
            with self.lock:
                self.done = True
        except _Abandoned:  # the caller gave up on this call and asked it to stop
            pass

    def abandon(self, thread: threading.Thread) -> bool:
        """Give up on the call, unless it has just finished (then False)."""
        with self.lock:
            if self.done:
                return False
            # Still inside `run` (we hold the lock `run` needs to finish), so the thread
            # id is this thread's own: ask it to stop at its next bytecode. A loop in pure
            # Python ends there; a call blocked in C (sleep, a socket) only sees it once
            # that call returns, and until then costs no CPU.
            _raise_in(thread, _Abandoned)
        return True


def _raise_in(thread: threading.Thread, exc: type[BaseException]) -> None:
    if sys.implementation.name != "cpython" or thread.ident is None:
        return
    set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
    tid = ctypes.c_ulong(thread.ident)
    if set_async_exc(tid, ctypes.py_object(exc)) > 1:  # never expected: undo rather than guess
        set_async_exc(tid, None)


class RewardGuard:
    """Calls user reward functions under a time limit of `timeout` seconds per call.

    Each call runs on a fresh daemon thread (a ThreadPoolExecutor's workers are not
    daemons and would keep a hung interpreter from exiting); past the limit the caller
    stops waiting and the call raises `RewardCallTimeout`. A thread cannot be killed, so
    the abandoned one is asked to stop (which ends pure-Python loops) and otherwise left to
    finish on its own; its result is dropped. After `max_consecutive` timeouts in a row the
    call raises `RewardTimeoutError` instead; any call that finishes resets the count.
    `timeout` 0 calls directly, on the caller's thread. One guard per population (or Ray
    actor); it is thread-safe.
    """

    def __init__(self, timeout: float, max_consecutive: int = MAX_CONSECUTIVE_TIMEOUTS) -> None:
        self.timeout = float(timeout or 0.0)
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.timeouts = 0
        self._abandoned: list[threading.Thread] = []
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return 0.0 < self.timeout < math.inf

    def running(self) -> int:
        """Abandoned calls whose threads have not ended yet."""
        with self._lock:
            self._abandoned = [t for t in self._abandoned if t.is_alive()]
            return len(self._abandoned)

    def __call__(self, name: str, thunk: Callable[[], T]) -> T:
        if not self.enabled:
            return thunk()
        call = _Call(thunk)
        thread = threading.Thread(target=call.run, name=f"esft-reward-{name}", daemon=True)
        thread.start()
        thread.join(self.timeout)  # a Ctrl-C in the main thread interrupts this wait
        if thread.is_alive() and call.abandon(thread):
            with self._lock:
                self.consecutive += 1
                self.timeouts += 1
                consecutive = self.consecutive
                self._abandoned = [t for t in self._abandoned if t.is_alive()] + [thread]
                running = len(self._abandoned)
            if consecutive >= self.max_consecutive:
                raise RewardTimeoutError(
                    f"reward {name!r} did not return within {self.timeout:g} s on {consecutive} calls in a "
                    f"row (--reward_timeout {self.timeout:g}), so the run stops: is it waiting on a judge "
                    "model or an HTTP call that never answers, or stuck in a loop? The seed log is "
                    "intact: fix the function (or raise --reward_timeout), then rerun the same command "
                    "with --resume to continue."
                )
            raise RewardCallTimeout(name, self.timeout, consecutive, self.max_consecutive, running)
        thread.join()  # finished: only the thread's last bytecodes are left
        with self._lock:
            self.consecutive = 0
        if call.error is not None:
            raise call.error
        return call.value


# ----------------------------------------------------------------------- counting
@dataclass
class RewardStats:
    """Counts of completions that scored 0 because the reward misbehaved, and, for user
    reward functions, each function's (count, sum, sum of squares) over the values it
    returned (failed and "not applicable" completions left out)."""

    errors: int = 0
    nonfinite: int = 0
    _seen: set[str] = field(default_factory=set)
    functions: dict[str, tuple[int, float, float]] = field(default_factory=dict)

    def warn_once(self, kind: str, message: str) -> None:
        if kind not in self._seen:
            self._seen.add(kind)
            log.warning("%s (scored 0; further occurrences are only counted in metrics)", message)

    def record(self, name: str, values: Iterable[float]) -> None:
        c, s, q = self.functions.get(name, (0, 0.0, 0.0))
        for v in values:
            c, s, q = c + 1, s + v, q + v * v
        self.functions[name] = (c, s, q)


def function_metrics(moments: Iterable[Mapping[str, tuple[int, float, float]]]) -> dict[str, float]:
    """`rewards/<name>/mean` and `rewards/<name>/std` (sample std, n−1, as TRL's nanstd)
    from per-member (count, sum, sum of squares); a function with no value is left out."""
    total: dict[str, tuple[int, float, float]] = {}
    for member in moments:
        for name, (c, s, q) in member.items():
            c0, s0, q0 = total.get(name, (0, 0.0, 0.0))
            total[name] = (c0 + c, s0 + s, q0 + q)
    out: dict[str, float] = {}
    for name, (c, s, q) in total.items():
        if c:
            var = max(0.0, (q - s * s / c) / (c - 1)) if c > 1 else 0.0
            out[f"rewards/{name}/mean"] = s / c
            out[f"rewards/{name}/std"] = math.sqrt(var)
    return out


# ------------------------------------------------------------------------ scoring
def _clean(value: object, stats: RewardStats) -> float:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        stats.errors += 1
        stats.warn_once("type", f"reward returned a non-number: {value!r}")
        return 0.0
    if not math.isfinite(v):
        stats.nonfinite += 1
        stats.warn_once("nonfinite", f"reward returned {v}")
        return 0.0
    return v


def score_completions(
    task: Task, completions: list[str], examples: list[Example], stats: RewardStats, guard: RewardGuard | None = None,
) -> list[float]:
    """Rewards for a batch; whatever a reward does wrong scores the completions it hit 0.

    User functions (a `CustomTask`) are called one by one, each through `guard` (no time
    limit without one), and their values summed. Built-in tasks are tried as a batch
    first; if that raises, each completion is scored alone so one bad completion costs
    only itself. A Ctrl-C (KeyboardInterrupt) and `RewardTimeoutError` stop the run;
    nothing else does, not even `sys.exit` inside a reward.
    """
    if isinstance(task, CustomTask):
        return _score_functions(task, completions, examples, stats, guard)
    try:
        values = list(task.rewards(completions, examples))
        if len(values) != len(completions):
            raise ValueError(f"reward returned {len(values)} values for {len(completions)} completions")
        return [_clean(v, stats) for v in values]
    except KeyboardInterrupt:
        raise
    except BaseException:  # noqa: BLE001 - retried completion by completion below
        pass
    out = []
    for completion, example in zip(completions, examples):
        try:
            out.append(_clean(task.reward(completion, example), stats))
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001 - any failure of user code scores 0
            stats.errors += 1
            stats.warn_once(f"exc:{type(e).__name__}", f"reward raised {type(e).__name__}: {e}")
            out.append(0.0)
    return out


def _score_functions(
    task: CustomTask, completions: list[str], examples: list[Example], stats: RewardStats, guard: RewardGuard | None,
) -> list[float]:
    total = [0.0] * len(completions)
    for index, name in enumerate(task.func_names):
        values = _function_values(task, index, completions, examples, stats, guard)
        stats.record(name, (v for v in values if v is not None))
        total = [t + (0.0 if v is None else v) for t, v in zip(total, values)]
    return total


def _function_values(
    task: CustomTask, index: int, completions: list[str], examples: list[Example], stats: RewardStats,
    guard: RewardGuard | None,
) -> list[float | None]:
    """One function's finite values for a batch; None where it failed (counted) or had
    nothing to say (TRL's None, not counted)."""
    name, n = task.func_names[index], len(completions)
    try:
        values = task.call_function(index, completions, examples, guard)
    except RewardCallTimeout as e:
        # Waited the whole limit already: never retried completion by completion.
        stats.errors += n
        log.warning("%s; its %s score 0", e, _plural(n, "completion"))
        return [None] * n
    except RewardTimeoutError:
        raise
    except RewardOutputError as e:
        # Wrong count or type of values: a bug of the function, not of one completion.
        stats.errors += n
        stats.warn_once(f"{e.kind}:{name}", str(e))
        return [None] * n
    except KeyboardInterrupt:
        raise
    except Exception as e:
        if n > 1:  # maybe one completion's fault: score each alone
            return [v for i in range(n) for v in
                    _function_values(task, index, completions[i:i + 1], examples[i:i + 1], stats, guard)]
        stats.errors += 1
        stats.warn_once(f"exc:{name}:{type(e).__name__}", f"reward {name!r} raised {type(e).__name__}: {e}")
        return [None]
    except BaseException as e:  # noqa: BLE001 - sys.exit() and the like inside user code
        stats.errors += n
        stats.warn_once(f"exc:{name}:{type(e).__name__}", f"reward {name!r} raised {e!r}")
        return [None] * n
    out: list[float | None] = []
    for v in values:
        if v is not None and not math.isfinite(v):
            stats.nonfinite += 1
            stats.warn_once(f"nonfinite:{name}", f"reward {name!r} returned {v}")
            v = None
        out.append(v)
    return out


#: Keyword arguments TRL's GRPOTrainer passes to reward functions besides the dataset
#: columns; they are not example fields.
TRL_REWARD_EXTRAS = frozenset({"completion_ids", "trainer_state", "log_extra", "log_metric", "environments"})


def as_reward_func(task: Task) -> RewardFunc:
    """Adapt a task to TRL's signature `f(prompts, completions, **columns) -> list[float]`.

    The dataset columns are the example's fields, so `columns[k][i]` is example i's field k.
    Completions may be strings or TRL's conversational form (a list of messages). Scoring
    is ES training's own (`score_completions`): a reward that raises or returns NaN/inf
    scores that completion 0 instead of stopping the run.
    """
    stats = RewardStats()

    def reward_func(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
        n = len(completions)
        # TRL adds trainer_state, log_metric, ... beside the columns: only per-completion
        # lists can be example fields.
        fields = {
            k: v for k, v in columns.items()
            if k not in TRL_REWARD_EXTRAS and isinstance(v, (list, tuple)) and len(v) == n
        }
        texts = []
        for completion in completions:
            if isinstance(completion, list):
                completion = completion[-1]["content"] if completion else ""
            texts.append(completion)
        examples = [{k: v[i] for k, v in fields.items()} for i in range(n)]
        return score_completions(task, texts, examples, stats)

    reward_func.__name__ = f"{task.name}_reward"
    return reward_func
