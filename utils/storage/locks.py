"""An advisory file lock that dies with its holder: who builds a dataset, who writes a run directory.

`FileLock(path)` takes an exclusive `flock` on `path` (created if missing). The kernel releases a flock
when the holding process exits, however it exits (SIGKILL included), so "is anybody holding it?" has
an exact answer: `is_locked(path)` asks the kernel without blocking and without waiting for timeouts
or checking pids. While it holds the lock, the holder writes `<pid> <host>` into the file so that
messages can name it (`lock_holder(path)`); that text is for people only, never for deciding.

Rules that keep it exact:
- The lock file is never deleted: a process that opened the old inode and one that created a new
  file would both "hold the lock".
- A flock belongs to an open file, not to a process: a second `FileLock` on the same path in the same
  process does not get it, and `is_locked` reports the first one's lock.
- A probe (`is_locked`) holds a shared lock for microseconds; an acquirer that must not mistake a
  probe for a holder passes a short `timeout` instead of `blocking=False`.
- flock is local to a machine on most network filesystems: locks on NFS do not exclude other hosts.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

RETRY_INTERVAL_S = 0.05
_BUSY = (errno.EAGAIN, errno.EACCES)  # what a non-blocking flock raises when someone else holds the lock


@dataclass(frozen=True)
class LockHolder:
    """Who wrote the lock file last: for messages (it may be stale once `is_locked` says False)."""

    pid: int
    host: str

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host}"


class FileLock:
    """Exclusive flock on `path`; `with FileLock(path):` waits for it, `acquire(timeout=...)` gives up."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """Take the lock; True once held, False when another process kept it.

        `blocking=False` tries once; `timeout=s` retries for up to s seconds; neither waits as long as
        it takes.
        """
        if self._fd is not None:
            raise RuntimeError(f"{self.path}: this FileLock already holds the lock")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if blocking and timeout is None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            elif not _try_lock(fd, fcntl.LOCK_EX, deadline=time.monotonic() + (timeout if blocking else 0.0)):
                os.close(fd)
                return False
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        except BaseException:
            os.close(fd)  # closing the file also drops a lock taken just before the failure
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        """Give the lock up (a no-op when not held); the file stays, emptied of the holder's name."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # releases the flock

    def holder(self) -> LockHolder | None:
        """Who holds (or last held) the lock, as written in the file."""
        return lock_holder(self.path)

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def _try_lock(fd: int, operation: int, deadline: float) -> bool:
    """Non-blocking flock attempts until `deadline` (at least one); True when taken."""
    while True:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno not in _BUSY:
                raise
        if time.monotonic() >= deadline:
            return False
        time.sleep(RETRY_INTERVAL_S)


def is_locked(path: Path | str) -> bool:
    """Whether some process holds the lock on `path` right now (a missing file is not locked).

    A shared lock is tried and dropped at once: it conflicts with a holder's exclusive lock but not
    with other probes, so two processes polling the same file never see each other as the holder.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        return not _try_lock(fd, fcntl.LOCK_SH, deadline=0.0)
    finally:
        os.close(fd)  # drops the probe's shared lock, if it got one


def lock_holder(path: Path | str) -> LockHolder | None:
    """The `<pid> <host>` written by the holder of `path`'s lock; None for a missing or empty file."""
    try:
        fields = Path(path).read_text(encoding="utf-8", errors="replace").split()
    except FileNotFoundError:
        return None
    if not fields or not fields[0].isdigit():
        return None
    return LockHolder(pid=int(fields[0]), host=fields[1] if len(fields) > 1 else "unknown host")
