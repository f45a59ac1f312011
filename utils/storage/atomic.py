"""Atomic file writes: a reader (or a crash at any instant) sees the old file or the new one, never a mix.

Every write goes to a temporary sibling, is fsync'ed, then `os.replace`d onto the real name, and the
directory is fsync'ed so the rename itself is durable. Checkpoints, dataset files, manifests and
submission files all go through here.

The default temporary name is hidden and carries the writer's pid, `.<name>.tmp.<pid>.<hex>`
(`TEMP_NAME_RE`), so a clean-up can tell a killed writer's leftovers from a save in flight. Callers
whose own clean-up recognises another pattern pass `temp_path`.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

# A default temporary name; group 1 is the writer's pid.
TEMP_NAME_RE = re.compile(r"^\..+\.tmp\.(\d+)\.[0-9a-f]+$")


def temp_path_for(path: Path) -> Path:
    """A fresh default temporary sibling of `path` (matches TEMP_NAME_RE)."""
    # Hidden (leading dot) so nothing globbing for the real files sees it; pid so stale ones can be recognised.
    return path.parent / f".{path.name}.tmp.{os.getpid()}.{secrets.token_hex(4)}"


def fsync_dir(directory: Path) -> None:
    """Persist a rename: the new name lives in the directory entry, not in the file."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        # A few filesystems (some network/FUSE mounts) cannot fsync a directory; the rename is still atomic.
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[BinaryIO], None], temp_path: Path | None = None) -> None:
    """Write `path` through `write(binary_file)` into a temp sibling, fsync, rename over `path`, fsync the directory.

    `temp_path` overrides the temp name for callers whose own clean-up recognises another pattern; such a
    name is not unique (a reused pid), so a leftover with it is overwritten instead of refused.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path if temp_path is not None else temp_path_for(path)
    try:
        with open(tmp, "xb" if temp_path is None else "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # also on KeyboardInterrupt: never leave our temp file behind
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, temp_path: Path | None = None) -> None:
    """Replace `path` with `data`; readers see the old content or the new, never a mix."""
    atomic_write(Path(path), lambda f: f.write(data), temp_path)


def atomic_write_text(path: Path, text: str, temp_path: Path | None = None) -> None:
    """UTF-8 text version of `atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"), temp_path)


class _HashingWriter:
    """File-like object that hashes what torch.save writes, so the digest costs no second pass over the file."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._sha = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self._sha.update(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def atomic_torch_save(
    obj: Any,
    path: Path,
    *,
    temp_path: Path | None = None,
    pause_before_replace_s: float = 0.0,
    before_replace: Callable[[Path], None] | None = None,
) -> str:
    """`torch.save(obj)` to `path` atomically; returns the sha256 of the bytes written.

    `pause_before_replace_s` (testing only) sleeps once the temporary file is complete, before the
    rename, so a test can SIGKILL the writer in the middle of a write. `before_replace` (testing only)
    is called at the same point with the temporary file's path: a test can hold the write there.
    """
    import torch  # here, not at the top: the text helpers above serve modules that must not pull in torch

    writer: _HashingWriter | None = None

    def write(f: BinaryIO) -> None:
        nonlocal writer
        writer = _HashingWriter(f)
        torch.save(obj, writer)
        if pause_before_replace_s > 0:
            f.flush()
            time.sleep(pause_before_replace_s)
        if before_replace is not None:
            f.flush()
            before_replace(Path(f.name))

    atomic_write(Path(path), write, temp_path)
    assert writer is not None
    return writer.hexdigest()
