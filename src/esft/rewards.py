"""Scoring completions safely, the limits on user rewards, and the TRL reward adapter.

Model output is untrusted and a reward function is user code: a reward must never stop a
run. ES training, evaluation, the `auto` probe and GRPO (through `as_reward_func`) all
score with `score_completions`, so a misbehaving reward costs the same everywhere: the
completions it failed on score 0 and are counted (`reward/errors`), with one warning per
kind.

User functions (a `CustomTask`: `module:function` or `ESTrainer(reward_funcs=...)`) are
called one at a time, so one broken function never zeroes the others, and through a
`RewardGuard`: each call runs in a worker process (`esft.reward_worker`) under a time limit
(`--reward_timeout`) and a memory limit (`--reward_memory_gb`). A call that hangs (in Python
or inside C), exits (`os._exit`), crashes (a segfault) or floods memory costs its worker,
which is replaced; `--reward_max_failures` such calls in a row stop the run with one line.
Built-in task rewards are bounded pure functions and keep the direct, process-free path.
"""

from __future__ import annotations

import logging
import math
import pickle
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from esft.es import LARGE_REWARD
from esft.tasks.base import Example, Task
from esft.tasks.custom import CustomTask, RewardOutputError

RewardFunc = Callable[..., list[float]]

log = logging.getLogger(__name__)

#: Failed calls (timed out, crashed, out of memory) in a row after which the run stops: one
#: may be a network blip or one pathological completion, three in a row is a broken
#: function that would otherwise cost the limit on every call.
MAX_CONSECUTIVE_FAILURES = 3
#: Memory a reward worker may allocate beyond what it holds when forked.
DEFAULT_MEMORY_GB = 8.0


class RewardFailureError(RuntimeError):
    """User reward calls failed (timed out, crashed, ran out of memory) several times in a
    row: the run stops, the seed log intact."""


class RewardCallFailed(Exception):
    """One call of a user reward function timed out, ended its worker or ran out of memory."""

    def __init__(self, name: str, what: str, consecutive: int, limit: int) -> None:
        self.name, self.what = name, what
        stop = limit - consecutive
        super().__init__(
            f"reward {name!r} {what}: its worker process was replaced ({consecutive} in a row; {stop} more in a "
            f"row {'stops' if stop == 1 else 'stop'} the run)"
        )


class RewardRaised(Exception):
    """The function raised in its worker: its type and message, re-raised here."""

    def __init__(self, type_name: str, message: str, is_exception: bool) -> None:
        self.type_name, self.message, self.is_exception = type_name, message, is_exception
        super().__init__(f"{type_name}: {message}" if message else type_name)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# ------------------------------------------------------------------------ limits
class RewardGuard:
    """Runs user reward functions in worker processes under a time and a memory limit.

    `timeout` seconds per call (0: no limit), `memory_gb` beyond the worker's size at fork
    (0: no limit); after `max_failures` failed calls of one function in a row a call raises
    `RewardFailureError`; a call of that function that returns resets its count. `isolation="none"`
    calls in this process instead, with no limits (a debugger, or a reward that needs this
    process's CUDA context). One supervisor process per task, started when the task is
    first guarded (`prepare`): build the guard before loading the model, so that neither it
    nor its workers share the model's pages. Thread-safe; `close()` ends the processes.
    """

    def __init__(
        self, timeout: float, max_failures: int = MAX_CONSECUTIVE_FAILURES, memory_gb: float = DEFAULT_MEMORY_GB,
        isolation: str = "process",
    ) -> None:
        from esft.reward_worker import supported

        self.timeout = float(timeout or 0.0)
        self.max_failures = max_failures
        self.memory_bytes = int(memory_gb * 2**30) if memory_gb and memory_gb > 0 else 0
        if isolation == "process" and not supported():
            log.warning("this platform has no fork(): user reward functions run in the trainer's process, "
                        "without a time or memory limit")
            isolation = "none"
        self.isolation = isolation
        self._in_a_row: dict[tuple[int, int], int] = {}  # (id(task), function index) -> failures in a row
        self.failures = 0
        self._processes: dict[int, tuple[Any, Any]] = {}  # id(task) -> (task, RewardProcess)
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg: Any) -> RewardGuard:
        """The guard an ESConfig (or anything with the same `reward_*` fields) asks for."""
        return cls(getattr(cfg, "reward_timeout", 60.0), getattr(cfg, "reward_max_failures", MAX_CONSECUTIVE_FAILURES),
                   getattr(cfg, "reward_memory_gb", DEFAULT_MEMORY_GB), getattr(cfg, "reward_isolation", "process"))

    @property
    def enabled(self) -> bool:
        return self.isolation == "process"

    def prepare(self, task: Task) -> None:
        """Start `task`'s supervisor now (custom tasks only): before the model is loaded."""
        if self.enabled and isinstance(task, CustomTask):
            self._process(task)

    def _process(self, task: CustomTask) -> Any:
        from esft.reward_worker import RewardProcess

        with self._lock:
            entry = self._processes.get(id(task))
            if entry is None:
                entry = (task, RewardProcess(task, self.memory_bytes))
                self._processes[id(task)] = entry
            return entry[1]

    def call(self, task: CustomTask, index: int, completions: list[str], examples: list[Example]) -> list[float | None]:
        """One checked call of function `index`; raises what `score_completions` sorts out."""
        if not self.enabled:
            return _direct(task, index, completions, examples)
        try:
            reply = self._process(task).call(index, task.function_kwargs(completions, examples), self.timeout)
        except (pickle.PicklingError, TypeError, AttributeError) as e:  # dataset columns that do not pickle
            raise RewardRaised(type(e).__name__, f"its arguments cannot be sent to the worker process: {e}", True) from e
        kind, key = reply[0], (id(task), index)
        if kind == "ok":
            self._returned(key)
            return reply[1]
        if kind == "output":
            self._returned(key)
            raise RewardOutputError(reply[1], reply[2])
        if kind == "raised":
            self._returned(key)
            # The worker ignores Ctrl-C (the trainer gets it), so a KeyboardInterrupt it reports
            # was raised by the function itself: scored like sys.exit, not obeyed.
            _, type_name, message, is_exception, _interrupt = reply
            raise RewardRaised(type_name, message, is_exception)
        self._failed(key, task.func_names[index], self._describe(reply))

    def _describe(self, reply: tuple) -> str:
        from esft.reward_worker import describe_exit

        if reply[0] == "timeout":
            return f"did not return within {self.timeout:g} s (--reward_timeout)"
        if reply[0] == "memory":
            return f"ran out of memory (--reward_memory_gb {self.memory_bytes / 2**30:g})"
        return f"ended its worker, which {describe_exit(reply[1])}"

    @property
    def consecutive(self) -> int:
        """The longest run of failures in a row of any one function."""
        with self._lock:
            return max(self._in_a_row.values(), default=0)

    def _returned(self, key: tuple[int, int]) -> None:
        with self._lock:
            self._in_a_row[key] = 0

    def _failed(self, key: tuple[int, int], name: str, what: str) -> None:
        # Counted per function: a healthy function called between a broken one's calls must
        # not reset the broken one's count, or a judge that always hangs would never stop.
        with self._lock:
            self._in_a_row[key] = consecutive = self._in_a_row.get(key, 0) + 1
            self.failures += 1
        if consecutive >= self.max_failures:
            raise RewardFailureError(
                f"reward {name!r} failed on {consecutive} calls in a row (the last {what}), so the run stops: "
                "is it waiting on a judge model or an HTTP call that never answers, stuck in a loop, crashing "
                "in a C library or allocating without bound? The seed log is intact: fix the function (or raise "
                "--reward_timeout / --reward_memory_gb), then rerun the same command with --resume to continue."
            )
        raise RewardCallFailed(name, what, consecutive, self.max_failures)

    def close(self) -> None:
        with self._lock:
            processes, self._processes = list(self._processes.values()), {}
        for _, process in processes:
            process.close()

    def __enter__(self) -> RewardGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------- counting
@dataclass
class RewardStats:
    """Counts of completions that scored 0 because the reward misbehaved, and, for user
    reward functions, each function's (count, sum, sum of squares) over the values it
    returned (failed and "not applicable" completions left out)."""

    errors: int = 0
    nonfinite: int = 0
    _seen: set[str] = field(default_factory=set)
    functions: dict[str, tuple] = field(default_factory=dict)  # name -> moments (see `_merge`)

    def warn_once(self, kind: str, message: str) -> None:
        if kind not in self._seen:
            self._seen.add(kind)
            log.warning("%s (scored 0; further occurrences are only counted in metrics)", message)

    def record(self, name: str, values: Iterable[float]) -> None:
        values = list(values)
        top = max((abs(v) for v in values), default=0.0)
        self.functions[name] = _merge(self.functions.get(name), (0, 0.0, 0.0, top if top > LARGE_REWARD else 1.0))
        c, s, q, scale = self.functions[name]
        for v in values:
            v /= scale  # exact (÷1) for ordinary rewards
            c, s, q = c + 1, s + v, q + v * v
        self.functions[name] = (c, s, q, scale)


Moments = tuple  # (count, sum, sum of squares[, scale]): the values divided by scale (1 unless huge)


def _merge(a: Moments | None, b: Moments) -> Moments:
    """Two (count, sum, sum of squares, scale) moments on the larger scale: values near
    ±1e308 are kept divided by their largest magnitude so that sums cannot overflow."""
    if a is None:
        return (*b[:3], b[3] if len(b) > 3 else 1.0)
    (ca, sa, qa, ma), (cb, sb, qb, mb) = (*a[:3], a[3] if len(a) > 3 else 1.0), (*b[:3], b[3] if len(b) > 3 else 1.0)
    m = max(ma, mb)
    ra, rb = ma / m, mb / m
    return (ca + cb, sa * ra + sb * rb, qa * ra * ra + qb * rb * rb, m)


def function_metrics(moments: Iterable[Mapping[str, Moments]]) -> dict[str, float]:
    """`rewards/<name>/mean` and `rewards/<name>/std` (sample std, n−1, as TRL's nanstd)
    from per-member (count, sum, sum of squares[, scale]); a function with no value is left out."""
    total: dict[str, Moments] = {}
    for member in moments:
        for name, m in member.items():
            total[name] = _merge(total.get(name), m)
    out: dict[str, float] = {}
    for name, (c, s, q, scale) in total.items():
        if c:
            # From the means, not s·s/c: s·s overflows first for values near 1e150.
            var = max(0.0, (q / c - (s / c) ** 2) * c / (c - 1)) if c > 1 else 0.0
            out[f"rewards/{name}/mean"] = s / c * scale
            out[f"rewards/{name}/std"] = math.sqrt(var) * scale
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

    User functions (a `CustomTask`) are called one by one, each through `guard` (in this
    process, with no limits, without one), and their values summed. Built-in tasks are
    tried as a batch first; if that raises, each completion is scored alone so one bad
    completion costs only itself. A Ctrl-C (KeyboardInterrupt) and `RewardFailureError`
    stop the run; nothing else does, not even `sys.exit` inside a reward.
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
    if len(task.func_names) > 1:
        # Finite values can sum past the float range (1e308 + 1e308): that completion has no score.
        for i, t in enumerate(total):
            if not math.isfinite(t):
                stats.nonfinite += 1
                stats.warn_once("nonfinite:sum", f"the reward functions' values sum to {t} (beyond the float range)")
                total[i] = 0.0
    return total


def _direct(task: CustomTask, index: int, completions: list[str], examples: list[Example]) -> list[float | None]:
    """An unguarded call, its exceptions reported as a worker would report them."""
    try:
        return task.call_function(index, completions, examples)
    except (RewardOutputError, KeyboardInterrupt):
        raise
    except BaseException as e:  # noqa: BLE001 - sys.exit() and the like inside user code
        raise RewardRaised(type(e).__name__, str(e), isinstance(e, Exception)) from e


def _function_values(
    task: CustomTask, index: int, completions: list[str], examples: list[Example], stats: RewardStats,
    guard: RewardGuard | None,
) -> list[float | None]:
    """One function's finite values for a batch; None where it failed (counted) or had
    nothing to say (TRL's None, not counted)."""
    name, n = task.func_names[index], len(completions)
    try:
        if guard is None:
            values = _direct(task, index, completions, examples)
        else:
            values = guard.call(task, index, completions, examples)
    except RewardCallFailed as e:
        # A hang waited the whole limit and a crash may recur: never retried completion by completion.
        stats.errors += n
        log.warning("%s; its %s score 0", e, _plural(n, "completion"))
        return [None] * n
    except RewardOutputError as e:
        # Wrong count or type of values: a bug of the function, not of one completion.
        stats.errors += n
        stats.warn_once(f"{e.kind}:{name}", str(e))
        return [None] * n
    except RewardRaised as e:
        if e.is_exception and n > 1:  # maybe one completion's fault: score each alone
            return [v for i in range(n) for v in
                    _function_values(task, index, completions[i:i + 1], examples[i:i + 1], stats, guard)]
        # sys.exit() and the like: the whole call; an Exception: this one completion.
        stats.errors += n
        detail = f"{e.type_name}: {e.message}" if e.is_exception else f"{e.type_name}({e.message})"
        stats.warn_once(f"exc:{name}:{e.type_name}", f"reward {name!r} raised {detail}")
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


def as_reward_func(task: Task, guard: RewardGuard | None = None) -> RewardFunc:
    """Adapt a task to TRL's signature `f(prompts, completions, **columns) -> list[float]`.

    The dataset columns are the example's fields, so `columns[k][i]` is example i's field k.
    Completions may be strings or TRL's conversational form (a list of messages). Scoring
    is ES training's own (`score_completions`, user functions through `guard`): a reward
    that raises, hangs, crashes or returns NaN/inf scores that completion 0 instead of
    stopping the run.
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
        return score_completions(task, texts, examples, stats, guard)

    reward_func.__name__ = f"{task.name}_reward"
    return reward_func
