"""One writer per run directory: a second process is refused at once, a dead holder's lock
is taken over, and two trainings into one directory can no longer interleave their records."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import tiny_cli_args

from esft.runlock import LOCK_FILE, RunLockedError, is_locked_here, run_lock, writing_into
from esft.seedlog import SeedLog

HOLD = textwrap.dedent("""
    import sys, time
    from esft.runlock import run_lock
    with run_lock(sys.argv[1], "test holder"):
        print("held", flush=True)
        time.sleep(600)
""")


TRY = textwrap.dedent("""
    import sys
    from esft.runlock import RunLockedError, run_lock
    try:
        with run_lock(sys.argv[1], "probe"):
            print("got it")
    except RunLockedError:
        print("refused")
""")


def hold_in_another_process(directory: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_is_refused_at_once_with_the_holders_pid_host_and_start(tmp_path) -> None:
    holder = hold_in_another_process(tmp_path / "run")
    try:
        t0 = time.perf_counter()
        with pytest.raises(RunLockedError) as err, run_lock(tmp_path / "run", "training"):
            pass
        assert time.perf_counter() - t0 < 1.0, "refused only after waiting"
        message = str(err.value)
        for part in (f"pid {holder.pid}", socket.gethostname(), "since 20", "test holder", "one process writes a run"):
            assert part in message, f"{part!r} missing from: {message}"
        assert "\n" not in message
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path, caplog) -> None:
    holder = hold_in_another_process(tmp_path / "run")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    caplog.set_level(logging.INFO, logger="esft.runlock")
    with run_lock(tmp_path / "run", "training"):
        assert is_locked_here(tmp_path / "run")
    assert f"took over the lock of pid {holder.pid}, which is no longer running" in caplog.text
    assert not is_locked_here(tmp_path / "run")


def test_the_lock_is_reentrant_in_one_process_and_released_by_the_outermost_block(tmp_path) -> None:
    with run_lock(tmp_path, "sweep"), run_lock(tmp_path, "evaluation"):
        assert is_locked_here(tmp_path)
    assert not is_locked_here(tmp_path)
    holder = hold_in_another_process(tmp_path)  # released: another process gets it
    holder.kill()
    holder.wait()


def test_a_forked_child_does_not_keep_the_lock_after_its_parent_lets_go(tmp_path) -> None:
    with run_lock(tmp_path, "training"):
        pid = os.fork()
        if pid == 0:  # a reward worker, say: it outlives the block
            time.sleep(30)
            os._exit(0)
    try:
        holder = hold_in_another_process(tmp_path)
        holder.kill()
        holder.wait()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_a_lock_file_that_cannot_be_opened_is_one_line_not_a_traceback(tmp_path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root opens any file")
    (tmp_path / LOCK_FILE).write_text("{}")
    (tmp_path / LOCK_FILE).chmod(0o444)
    with pytest.raises(RunLockedError, match="cannot be opened for writing"), run_lock(tmp_path, "training"):
        pass


def test_a_forked_child_leaving_the_block_releases_nothing_and_does_not_fail(tmp_path) -> None:
    block = run_lock(tmp_path, "training")
    block.__enter__()
    try:
        pid = os.fork()
        if pid == 0:  # a child forked inside the block leaves it: no error, the parent's lock stays
            try:
                block.__exit__(None, None, None)
                os._exit(0)
            except BaseException:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0, "leaving the block in a forked child failed"
        assert is_locked_here(tmp_path)
        probe = subprocess.run([sys.executable, "-c", TRY, str(tmp_path)], capture_output=True, text=True)
        assert probe.stdout.strip() == "refused", "another process got the lock the parent still holds"
    finally:
        block.__exit__(None, None, None)


def test_writing_outside_the_run_locks_only_an_output_folder(tmp_path) -> None:
    run, elsewhere = tmp_path / "run", tmp_path / "out"
    run.mkdir()
    with writing_into(run, run / "eval", "evaluation", output_is_dir=True):
        assert is_locked_here(run)
    with writing_into(run, elsewhere, "evaluation", output_is_dir=True):
        assert is_locked_here(elsewhere) and not is_locked_here(run)
    with writing_into(run, elsewhere / "drift.json", "drift"):
        assert not is_locked_here(run) and not is_locked_here(elsewhere / "drift.json")


def test_two_sweeps_on_one_directory_the_second_is_refused(tmp_path) -> None:
    from esft.sweep import run_sweep

    spec = {"base": {"max_steps": 1, "population_size": 2}, "variants": [{"name": "es"}],
            "eval": {"tasks": ["conciseness"]}}
    holder = hold_in_another_process(tmp_path / "sweep")
    try:
        with pytest.raises(RunLockedError, match=f"in use by pid {holder.pid}"):
            run_sweep(spec, tmp_path / "sweep", progress=False)
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == [LOCK_FILE], "the refused sweep wrote nothing"


@pytest.mark.slow
def test_two_trainings_into_one_directory_one_is_refused_and_the_seed_log_stays_resumable(tmp_path, embedded_dir) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "esft.cli", "train", *tiny_cli_args(output_dir=str(out), max_steps=4, save_steps=0)]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while f'"pid": {first.pid}' not in ((out / LOCK_FILE).read_text() if (out / LOCK_FILE).exists() else ""):
            assert first.poll() is None and time.time() < deadline, "the first training never took the lock"
            time.sleep(0.1)
        t0 = time.perf_counter()
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        refused_in = time.perf_counter() - t0
        assert second.returncode == 2, second.stderr
        errors = [ln for ln in second.stderr.splitlines() if ln.startswith("esft train: error:")]
        assert len(errors) == 1 and f"in use by pid {first.pid}" in errors[0], second.stderr
        assert refused_in < 30, f"refused after {refused_in:.0f} s: it loaded the model first"
        assert first.wait(timeout=600) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            first.kill()
    assert [r.iteration for r in SeedLog(out).records()] == [1, 2, 3, 4]
    resumed = subprocess.run([*cmd, "--max_steps", "5", "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert [r.iteration for r in SeedLog(out).records()] == [1, 2, 3, 4, 5]
