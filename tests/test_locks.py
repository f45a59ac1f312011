"""utils.storage.locks: the flock that dataset builders (and the run directory) use, with real processes.

A lock held by another process is seen at once, a SIGKILL'ed holder frees it at once (the kernel drops
the flock), and probes never mistake each other for a holder.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from utils.storage.locks import FileLock, LockHolder, is_locked, lock_holder

REPO_ROOT = Path(__file__).resolve().parents[1]
HOLD = """
import sys, time
from utils.storage.locks import FileLock
lock = FileLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


def hold_in_child(path: Path, seconds: float) -> subprocess.Popen:
    """A process that takes the lock, says so on stdout, then sleeps (and exits without releasing)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), str(seconds)], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_in_this_process(tmp_path: Path) -> None:
    path = tmp_path / "sub" / ".lock"
    assert not is_locked(path) and lock_holder(path) is None  # no file yet
    lock = FileLock(path)
    assert lock.acquire(blocking=False) and lock.held
    assert is_locked(path)
    assert lock.holder() == LockHolder(os.getpid(), socket.gethostname())
    assert f"pid {os.getpid()} on " in str(lock.holder())
    other = FileLock(path)  # another open file: the flock excludes it even in the same process
    assert not other.acquire(blocking=False) and not other.held
    with pytest.raises(RuntimeError, match="already holds"):
        lock.acquire()
    lock.release()
    lock.release()  # a no-op
    assert not is_locked(path) and lock_holder(path) is None and path.exists()  # the file is kept
    with FileLock(path) as again:
        assert again.held and is_locked(path)
    assert not is_locked(path)


def test_a_killed_holder_frees_the_lock_at_once(tmp_path: Path) -> None:
    path = tmp_path / ".lock"
    proc = hold_in_child(path, 60)
    try:
        assert is_locked(path) and lock_holder(path) == LockHolder(proc.pid, socket.gethostname())
        start = time.monotonic()
        assert not FileLock(path).acquire(timeout=0.3)
        assert time.monotonic() - start >= 0.3
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert not is_locked(path)
        assert lock_holder(path) == LockHolder(proc.pid, socket.gethostname())  # stale text: for messages only
        lock = FileLock(path)
        assert lock.acquire(blocking=False)
        lock.release()
    finally:
        proc.kill()
        proc.wait()


def test_blocking_acquire_waits_for_the_holder_to_exit(tmp_path: Path) -> None:
    path = tmp_path / ".lock"
    proc = hold_in_child(path, 1.0)
    start = time.monotonic()  # the child is already in its 1 s sleep (it said "locked" before it)
    try:
        with FileLock(path) as lock:
            # Not "the child has exited": the kernel drops its flock while the interpreter is still shutting
            # down, so under load the lock can be free a moment before the process is gone (seen on 2 cores).
            waited = time.monotonic() - start
            assert waited >= 0.9, f"the lock was taken after {waited:.2f} s, while the child still held it"
            assert lock.holder() == LockHolder(os.getpid(), socket.gethostname())
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()


def test_probes_do_not_see_each_other_as_holders(tmp_path: Path) -> None:
    path = tmp_path / ".lock"
    path.touch()
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # what a probe in flight holds
        assert not is_locked(path)
        assert not FileLock(path).acquire(blocking=False)  # an acquirer can meet a probe: hence timeout=
    finally:
        os.close(fd)
    lock = FileLock(path)
    assert lock.acquire(timeout=1.0)
    lock.release()
