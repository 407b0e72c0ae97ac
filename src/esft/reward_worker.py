"""User reward functions in child processes, so that nothing they do can end a run.

A reward is user code fed untrusted model output. In the trainer's own process a call of
`os._exit`, a segfault in a C extension, a hang inside a C call or an allocation without
bound ends (or freezes) the run, and a thread can only abandon such a call, never stop it.
So every call runs in a worker process:

    trainer ──call──> supervisor ──call──> worker (runs the function)
            <─reply──            <─reply──

- The **supervisor** is forked once, when the guard is built: the trainer builds it before
  it loads the model, so neither it nor the workers it forks hold a copy-on-write share of
  the model's pages (a worker forked later would keep every page the trainer rewrites:
  the whole model over a few iterations). It never runs user code, so it never crashes.
- The **worker** is forked by the supervisor and runs the calls one after another
  (module-level state of the function persists between calls, as in-process; it is reset
  when a worker is replaced). It ignores Ctrl-C (the trainer handles it) and exits when
  its parent is gone.
- Per call the supervisor waits `timeout` seconds; past it, or when the worker dies (an
  exit, a signal) or runs out of its memory limit (`RLIMIT_AS`: its address space at fork
  plus `memory_bytes`, so a flood is a MemoryError or a failed allocation, not the OOM
  killer choosing the trainer), the worker is killed and the next call gets a new one.

Replies are tuples, forwarded by the supervisor as bytes without unpickling:
`("ok", values)`, `("output", kind, message)` (wrong count or type, `RewardOutputError`),
`("raised", type name, message, is Exception, is KeyboardInterrupt)`, and from the
supervisor `("timeout",)`, `("died", exit code)`, `("memory",)`.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import threading
import time
import warnings
from typing import Any

#: The worker's reply when the function ran out of memory, compared as bytes by the supervisor.
MEMORY_REPLY = pickle.dumps(("memory",))
#: How often an idle child checks that its parent is alive (seconds).
_PARENT_CHECK_S = 1.0
#: Extra time the trainer gives the supervisor beyond the call's own limit before it
#: treats the supervisor itself as stuck.
_SUPERVISOR_GRACE_S = 30.0


def supported() -> bool:
    """Workers are forked (the functions need not be picklable: closures and lambdas work),
    so isolation needs `os.fork` (Linux, macOS)."""
    return hasattr(os, "fork")


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies. The supervisor forks workers from
    its only thread, so a worker cannot outlive it even inside a call that never returns."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _fork(target: Any, *args: Any, close: tuple[Any, ...] = ()) -> tuple[int, Any]:
    """(child pid, the parent's end of a pipe to it); the child runs `target(conn, *args)`
    and never returns. Plain os.fork, not multiprocessing.Process: a supervisor must fork
    workers of its own, which multiprocessing forbids its daemonic children, and a
    non-daemonic one would be waited for at the trainer's exit."""
    ours, theirs = multiprocessing.Pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns about fork() in a threaded process; the children only unpickle,
        # call the function and pickle, and never wait on a lock another thread held.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        try:
            ours.close()
            for conn in close:  # the parent's other pipe ends: its parent must see EOF when it dies
                conn.close()
            target(theirs, *args)
        finally:
            os._exit(0)
    theirs.close()
    return pid, ours


def _reap(pid: int, kill: bool) -> int | None:
    """Kill (if asked) and wait for a child; its exit code as multiprocessing gives them
    (negative: the signal), None if it was already reaped."""
    if kill:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return None
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _ignore_interrupts() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle


def _limit_memory(memory_bytes: int) -> None:
    """Cap the address space at its size now plus `memory_bytes` (Linux; elsewhere no cap)."""
    if memory_bytes <= 0:
        return
    try:
        import resource

        with open("/proc/self/statm") as f:
            size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = size + memory_bytes
        if hard != resource.RLIM_INFINITY:
            cap = min(cap, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    except (ImportError, OSError, ValueError):
        pass


def _wait(conn: Any, parent: int) -> bool:
    """Block until `conn` has something (True) or the parent is gone (False)."""
    while not conn.poll(_PARENT_CHECK_S):
        if os.getppid() != parent:
            return False
    return True


def _safe_str(e: BaseException) -> str:
    try:
        return str(e)
    except Exception:  # noqa: BLE001 - a user exception whose __str__ raises
        return f"<{type(e).__name__} whose message cannot be shown>"


def _worker_main(conn: Any, task: Any, memory_bytes: int, parent: int) -> None:
    """Run `task.run_function(index, kwargs)` for each request; reply with the outcome."""
    from esft.tasks.custom import RewardOutputError

    _ignore_interrupts()
    _die_with_parent()
    if os.getppid() != parent:  # the supervisor died before the line above took effect
        return
    _limit_memory(memory_bytes)
    while _wait(conn, parent):
        try:
            index, kwargs = conn.recv()
        except (EOFError, OSError):
            break
        try:
            reply: tuple = ("ok", task.run_function(index, kwargs))
        except RewardOutputError as e:
            reply = ("output", e.kind, str(e))
        except MemoryError:
            reply = ("memory",)
        except BaseException as e:  # noqa: BLE001 - sys.exit() and the like, reported not obeyed
            reply = ("raised", type(e).__name__, _safe_str(e), isinstance(e, Exception), isinstance(e, KeyboardInterrupt))
        try:
            conn.send_bytes(MEMORY_REPLY if reply[0] == "memory" else pickle.dumps(reply))
        except MemoryError:
            conn.send_bytes(MEMORY_REPLY)
            break
        except Exception:  # noqa: BLE001 - values that do not pickle (or whose str() fails)
            conn.send_bytes(pickle.dumps(("output", "type", "its values could not be sent back from the worker")))
        if reply[0] == "memory":
            break  # a fresh worker rather than a fragmented heap


class _Worker:
    """The supervisor's view of one worker process."""

    def __init__(self, task: Any, memory_bytes: int, supervisor_conn: Any) -> None:
        self.pid, self.conn = _fork(_worker_main, task, memory_bytes, os.getpid(), close=(supervisor_conn,))

    def kill(self, grace: float = 0.0) -> int | None:
        """Its exit code (None when unknown). A worker whose pipe closed is exiting: it gets
        `grace` seconds to finish, so its own exit code (or signal) is what is reported."""
        code = None
        deadline = time.monotonic() + grace
        while grace > 0:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                break
            if time.monotonic() >= deadline:
                break
            time.sleep(0.005)
        if code is None:
            code = _reap(self.pid, kill=True)
        self.conn.close()
        return code


def _await_reply(conn: Any, timeout: float, parent: int) -> tuple[bytes | None, str]:
    """(the worker's reply, "ok"), or (None, why): "timeout" past `timeout` (0: no limit),
    "closed" when the worker's end closed (it died), "orphan" when the trainer is gone."""
    deadline = time.monotonic() + timeout if timeout > 0 else None
    while True:
        wait = _PARENT_CHECK_S if deadline is None else min(_PARENT_CHECK_S, deadline - time.monotonic())
        if wait <= 0:
            return None, "timeout"
        try:
            if conn.poll(wait):
                return conn.recv_bytes(), "ok"
        except (EOFError, OSError):
            return None, "closed"
        if os.getppid() != parent:
            return None, "orphan"


def _supervisor_main(conn: Any, task: Any, memory_bytes: int, parent: int) -> None:
    """Forward each request to a worker, enforce the time limit, replace dead workers."""
    _ignore_interrupts()
    worker: _Worker | None = None
    while _wait(conn, parent):
        try:
            timeout, request = conn.recv()
        except (EOFError, OSError):
            break
        if worker is None:
            worker = _Worker(task, memory_bytes, conn)
        try:
            worker.conn.send_bytes(request)
            reply, why = _await_reply(worker.conn, timeout, parent)
        except (EOFError, OSError):  # the worker was gone before the request reached it
            reply, why = None, "closed"
        if reply is None:
            code = worker.kill(grace=1.0 if why == "closed" else 0.0)
            worker = None
            reply = pickle.dumps(("timeout",) if why == "timeout" else ("died", code))
        elif reply == MEMORY_REPLY:  # the worker exits after it: reap it now
            worker.kill()
            worker = None
        conn.send_bytes(reply)
    if worker is not None:
        worker.kill()


class RewardProcess:
    """The trainer's handle on a supervisor: `call(index, kwargs, timeout)` -> a reply tuple.

    Thread-safe (calls are serialised: one worker runs one call at a time). A supervisor
    that dies or stops answering is replaced; its call is reported as `("died", None)`.
    """

    def __init__(self, task: Any, memory_bytes: int) -> None:
        self.task, self.memory_bytes = task, memory_bytes
        self._lock = threading.Lock()
        self._conn: Any = None
        self._pid: int | None = None
        self._start()

    def _start(self) -> None:
        self._pid, self._conn = _fork(_supervisor_main, self.task, self.memory_bytes, os.getpid())

    def _alive(self) -> bool:
        if self._pid is None:
            return False
        try:
            if os.waitpid(self._pid, os.WNOHANG)[0] == 0:
                return True
        except ChildProcessError:
            pass
        self._pid = None  # reaped: its pid may be another process's by now, never signal it
        return False

    def _stop(self) -> None:
        if self._pid is not None:
            _reap(self._pid, kill=True)
        if self._conn is not None:
            self._conn.close()
        self._pid = self._conn = None

    def call(self, index: int, kwargs: dict[str, Any], timeout: float) -> tuple:
        request = pickle.dumps((index, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            if not self._alive():
                self._stop()
                self._start()
            finished = False
            try:
                self._conn.send((timeout, request))
                grace = timeout + _SUPERVISOR_GRACE_S if timeout > 0 else None
                if not self._conn.poll(grace):
                    raise EOFError("the reward supervisor did not answer")
                reply = pickle.loads(self._conn.recv_bytes())
                finished = True
                return reply
            except (EOFError, OSError):
                finished = True
                self._stop()
                return ("died", None)
            finally:
                if not finished:  # interrupted mid-call (Ctrl-C): the pipe is out of step
                    self._stop()

    def close(self) -> None:
        with self._lock:
            self._stop()

    def __del__(self) -> None:  # a guard dropped without close() still ends its processes
        try:
            self._stop()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def describe_exit(code: int | None) -> str:
    """'exited with code 0' / 'was killed by signal 11 (SIGSEGV)' for a worker's exit code."""
    if code is None:
        return "stopped answering"
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = "unknown"
    return f"was killed by signal {-code} ({name})"


__all__ = ["RewardProcess", "describe_exit"]
