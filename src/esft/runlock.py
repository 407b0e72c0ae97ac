"""One writer per run directory: an exclusive lock held for the life of the writing process.

Two `esft train --output_dir X` at once used to interleave their seed-log records (1, 1, 2,
2) and leave a run that neither `--resume` nor `replay` would read. Every command that writes
into a directory (train and resume, `eval --run`, `kl`, `drift`, `replay` into a run, a
sweep) holds `run_lock(dir)`; a second process is refused at once with one line naming the
holder.

The lock is `flock` on `DIR/.esft-lock`: the kernel releases it when the holder dies, even
by kill -9, so a stale lock is taken over without a timeout or a guess about pids (the file
is left in place: deleting it would race with a process opening it). Within one process the
lock is re-entrant (a sweep evaluates the run it just trained; a trainer's eval callback
writes into its own run). Child processes never inherit it: a forked reward worker closes
the descriptor, so a worker outliving a killed trainer cannot keep the run locked.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = ".esft-lock"

_held: dict[str, tuple[int, int]] = {}  # realpath -> (fd, depth)
_lock = threading.Lock()


class RunLockedError(RuntimeError):
    """Another process is writing into this directory."""


def _close_in_child() -> None:
    for fd, _ in _held.values():
        try:
            os.close(fd)  # the parent's descriptor keeps the lock; this one only leaked by fork
        except OSError:
            pass
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


def _holder(path: Path) -> dict:
    try:
        info = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _describe(info: dict) -> str:
    if not info:
        return "another process (it has not written its name yet)"
    since = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')} since {when} ({info.get('command', '?')})"


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _acquire(directory: Path, what: str) -> int:
    import fcntl

    path = directory / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        raise RunLockedError(
            f"{path} cannot be opened for writing (its owner or the file system forbids it), so this {what} cannot "
            f"hold {directory}'s writer lock: use a directory of your own"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunLockedError(
            f"{directory} is in use by {_describe(_holder(path))}: one process writes a run at a time, so "
            f"this {what} stops before touching it; wait for that one to finish (or stop it), then run the "
            "same command again"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    previous = _holder(path)
    if previous and previous.get("host") == socket.gethostname() and previous.get("pid") != os.getpid():
        if not _pid_alive(previous.get("pid")):
            log.info("%s: took over the lock of pid %s, which is no longer running", directory, previous.get("pid"))
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
            "command": " ".join(["esft", *sys.argv[1:3]]) if sys.argv and "esft" in sys.argv[0] else what}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    return fd


@contextmanager
def run_lock(directory: str | Path, what: str = "command") -> Iterator[Path]:
    """Hold `directory`'s writer lock (creating the directory) for the block; re-entrant in
    one process. Raises `RunLockedError` at once when another process holds it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(directory)
    with _lock:
        if key in _held:
            fd, depth = _held[key]
            _held[key] = (fd, depth + 1)
        else:
            _held[key] = (_acquire(directory, what), 1)
    try:
        yield directory
    finally:
        with _lock:
            entry = _held.pop(key, None)  # absent in a forked child, whose copy was closed at fork
            if entry is not None:
                fd, depth = entry
                if depth > 1:
                    _held[key] = (fd, depth - 1)
                else:
                    os.close(fd)  # closing the last descriptor releases the flock


def writing_into(run_dir: str | Path, output: str | Path | None, what: str, output_is_dir: bool = False):
    """The lock to hold while writing `output` (None: the run's default place) for a run.

    Inside `run_dir`: the run's lock. Elsewhere, a folder (`output_is_dir`, e.g. an
    evaluation's rows) is locked itself; a single file written elsewhere needs nothing (an
    atomic replace of one file cannot interleave with anything).
    """
    from contextlib import nullcontext

    if output is not None:
        inside = (os.path.realpath(output) + os.sep).startswith(os.path.realpath(run_dir) + os.sep)
        if not inside:
            return run_lock(output, what) if output_is_dir else nullcontext(Path(output))
    return run_lock(run_dir, what)


def is_locked_here(directory: str | Path) -> bool:
    """Whether this process holds `directory`'s lock."""
    return os.path.realpath(directory) in _held


__all__ = ["LOCK_FILE", "RunLockedError", "is_locked_here", "run_lock", "writing_into"]
