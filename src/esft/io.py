"""Crash-safe file writes: nothing half-written is ever trusted by a resume, nothing of the
user's is ever deleted, and files keep the permissions the user's umask asks for.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: Written into every model directory esft saves (checkpoints, final/, replays, the
#: embedded-model cache): only a directory holding it may be replaced by a later save.
MODEL_MARKER = "esft_state.json"
#: Files that make a directory a run directory, which a model save never replaces.
RUN_FILES = ("seedlog.jsonl", "config.yaml", "metrics.jsonl")
#: Infix of every temporary name esft writes beside its target (see `remove_temp_files`).
TMP_INFIX = ".tmp-"

_umask_lock = threading.Lock()


class DiskFullError(OSError):
    """No space left while writing: named with the file and the fix, never a traceback."""


def _umask() -> int:
    # os.umask can only be read by setting it; the lock keeps two threads from racing.
    with _umask_lock:
        mask = os.umask(0)
        os.umask(mask)
    return mask


def _chmod_as_created(path: Path, directory: bool) -> None:
    """mkstemp/mkdtemp create 0600/0700; give the file what open()/mkdir() would have."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextmanager
def disk_errors(path: str | Path) -> Iterator[None]:
    """Turn 'no space left on device' (from the OS or a library) into one clear error."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:  # noqa: BLE001 - libraries (safetensors) wrap ENOSPC in their own types
        full = isinstance(e, OSError) and e.errno == errno.ENOSPC
        full = full or "No space left on device" in str(e) or "StorageFull" in str(e)
        if not full:
            raise
        raise DiskFullError(
            errno.ENOSPC,
            f"no space left on the device while writing {path}: free some space (or choose a folder on "
            "another disk) and run the same command again; nothing half-written is kept",
        ) from None


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_INFIX}", dir=path.parent)
    try:
        with disk_errors(path), os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _chmod_as_created(Path(tmp), directory=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_replaceable(path: str | Path) -> None:
    """Refuse to replace anything but a model directory esft wrote (or an empty folder).

    A save over a run directory, the current directory or any folder of the user's would
    delete their files; only directories holding `MODEL_MARKER` (and no run files) are
    esft's own to replace.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir() or path.is_symlink():
        raise ValueError(f"{path} exists and is not a directory: choose another output path")
    names = {p.name for p in path.iterdir()}
    run_files = sorted(names & set(RUN_FILES))
    if run_files:
        raise ValueError(
            f"{path} is a run directory ({', '.join(run_files)}): a model saved there would delete the run; "
            f"save it to a new folder, e.g. {path / 'model'}"
        )
    if names and MODEL_MARKER not in names:
        raise ValueError(
            f"{path} is a non-empty folder that esft did not write ({len(names)} entries, no {MODEL_MARKER}): "
            "refusing to replace it; choose a new output folder or remove it yourself"
        )


def write_dir_atomic(path: str | Path, fill: Callable[[Path], None], *, replace: bool = False) -> None:
    """Build a directory under a temp name with `fill(tmp)`, then rename it into place.

    An existing `path` is replaced only if `check_replaceable` allows it (`replace=True`
    skips the check: esft's own cache directories).
    """
    path = Path(path)
    if not replace:
        check_replaceable(path)  # fail before the (possibly long) fill
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{TMP_INFIX}", dir=path.parent))
    try:
        _chmod_as_created(tmp, directory=True)
        with disk_errors(path):
            fill(tmp)
        if path.exists():
            if not replace:
                check_replaceable(path)
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files and folders esft's atomic writes left in `folder` after
    a kill (names `.<target>.tmp-*`); returns what was removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if p.name.startswith(".") and TMP_INFIX in p.name:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def read_text(path: str | Path, what: str) -> str:
    """A text file's contents; a file that is not UTF-8 is one line naming it and the byte."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{what} {path}: not UTF-8 text (byte {e.start}, 0x{e.object[e.start]:02x}, cannot be decoded): "
            "is it the right file? save it as UTF-8"
        ) from None


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line and fsync; a torn last line is dropped by `read_jsonl`."""
    try:
        line = json.dumps(record, allow_nan=False) + "\n"
    except ValueError:  # NaN/inf: JSON has none, and a resume must never read one back
        raise ValueError(
            f"{path}: not written, because {', '.join(_nonfinite_keys(record)) or 'a value'} is not a finite number"
        ) from None
    with disk_errors(path), open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _nonfinite_keys(value: Any, where: str = "") -> list[str]:
    """Paths (`rewards[3]`, `awd_kl`) of the NaN/inf floats inside a JSON-like value."""
    import math

    if isinstance(value, float):
        return [f"{where or 'the value'} ({value})"] if not math.isfinite(value) else []
    if isinstance(value, dict):
        return [k for key, v in value.items() for k in _nonfinite_keys(v, f"{where}.{key}" if where else str(key))]
    if isinstance(value, (list, tuple)):
        return [k for i, v in enumerate(value) for k in _nonfinite_keys(v, f"{where}[{i}]")]
    return []


def read_jsonl(path: str | Path, repair: bool = False) -> list[dict[str, Any]]:
    """All records. Only a torn *last* line (a crash mid-append) is dropped.

    A line that is not JSON with valid lines after it is not a crash's trace but damage:
    dropping it would silently discard every record after it, so it is an error naming
    the line. With `repair=True` a torn tail is also cut from the file, so that the next
    append starts on a clean line.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    # Every line but the last is followed by a newline; the last never finished being written.
    complete = data.split(b"\n")[:-1]
    records: list[dict[str, Any]] = []
    good_end = 0
    for number, line in enumerate(complete, start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                later = sum(1 for rest in complete[number:] if rest.strip())
                if later:
                    raise ValueError(
                        f"{path}: line {number} is not valid JSON ({e}) but {later} line(s) after it are: that is "
                        f"damage, not a crash mid-write, so nothing is dropped; repair or delete line {number} by hand"
                    ) from None
                break  # a torn last line
        good_end += len(line) + 1
    if repair and good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return records


def ensure_writable_dir(path: str | Path) -> Path:
    """Create `path` and prove we can write into it, with an error that says where."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".esft-write-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"output_dir {str(path)!r} is not writable: {e.strerror or e}") from None
    return path
