"""Dataset builders: the common base and the build-once-and-swap builder.

Every dataset on disk is written by a `DatasetBuilder`: a root directory, the JSON-able parameters that
define its content (`params()`, hashed by `params_hash()`), and a `FileLock` held for as long as a
process builds, which is also how other processes tell whether a builder is alive (`is_building()`).
There are two kinds:

* `DiskDatasetBuilder` (below): the whole directory at once. It is built in a temporary sibling
  directory, the `COMPLETE` marker (a JSON summary) is written last, and the directory is then renamed
  into place, so a directory is either absent or complete and readers only check for the marker.
  Sudoku, Maze, ARC and modular arithmetic.
* `dataset.streaming.shards.StreamingDatasetBuilder`: shard files one by one plus a manifest, so that
  training can start on the first shards; resumable after any kill. The vision-unified data.
"""

from __future__ import annotations

import abc
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Self

from dataset.errors import REBUILD_HINT, DatasetFileError, not_utf8_message
from utils.config.errors import ConfigError
from utils.storage.locks import FileLock, LockHolder, is_locked, lock_holder

log = logging.getLogger(__name__)

BUILD_HINT = "build it with `python train.py --dataset-only` (add `--rebuild-dataset` to force a rebuild)"


def require_int(key: str, value: Any, minimum: int) -> int:
    """`value` when it is an integer >= `minimum` (a bool is not), else ConfigError naming `key`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def params_digest(params: Mapping[str, Any]) -> str:
    """sha256 of the parameters as sorted JSON: the same values give the same digest on every machine."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode("utf-8")).hexdigest()


class DatasetBuilder(abc.ABC):
    """A dataset directory `root`, the parameters that define it, and the lock of whoever builds it."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    @property
    @abc.abstractmethod
    def lock_path(self) -> Path:
        """The file a building process holds `flock`-ed (never deleted)."""

    @abc.abstractmethod
    def params(self) -> dict[str, Any]:
        """JSON-able parameters that define the dataset's content."""

    @abc.abstractmethod
    def is_complete(self) -> bool:
        """Whether the dataset on disk is finished."""

    @abc.abstractmethod
    def build(self, rebuild: bool = False) -> dict[str, Any]:
        """Build what is missing (everything with `rebuild`); return a summary of the dataset."""

    def params_hash(self) -> str:
        return params_digest(self.params())

    def lock(self) -> FileLock:
        """A new handle on the build lock (`with builder.lock():` waits for it)."""
        return FileLock(self.lock_path)

    def is_building(self) -> bool:
        """Whether some process (this one included) holds the build lock right now."""
        return is_locked(self.lock_path)

    def holder(self) -> LockHolder | None:
        """Who holds (or last held) the build lock, for messages."""
        return lock_holder(self.lock_path)


class DiskDatasetBuilder(DatasetBuilder):
    """Builds a dataset directory exactly once, safely across concurrent processes.

    Subclasses implement `_build`, which writes the dataset files into a fresh directory and returns a
    JSON-serialisable summary (counts, sizes). That summary is stored in the `COMPLETE` marker and
    returned by `build` on later calls without rebuilding. Subclasses that name their directory after
    their parameters implement `dir_name` and are made with `for_data_root(data_root, **params)`.
    """

    MARKER_NAME = "COMPLETE"

    @classmethod
    def for_data_root(cls, data_root: Path | str, **params: Any) -> Self:
        """The builder for `params`, in the directory of `data_root` named after them (`dir_name`)."""
        builder = cls(Path(data_root), **params)  # the constructor validates the parameters
        builder.root = Path(data_root) / builder.dir_name()
        return builder

    def dir_name(self) -> str:
        """Directory name under the data root: readable, and different for every content."""
        raise NotImplementedError(f"{type(self).__name__} does not name its directory: pass its root explicitly")

    # ----------------------------------------------------------------------------------- paths
    @property
    def marker_path(self) -> Path:
        return self.root / self.MARKER_NAME

    @property
    def lock_path(self) -> Path:
        # The lock lives next to the root, not inside it, because the root is swapped out by rename.
        return self.root.parent / f".{self.root.name}.lock"

    def _scratch_prefix(self, kind: str) -> str:
        return f".{self.root.name}.{kind}-"

    # ------------------------------------------------------------------------------- interface
    @abc.abstractmethod
    def _build(self, tmp_dir: Path) -> dict:
        """Write the dataset files into `tmp_dir` (which exists and is empty); return a summary."""

    def is_complete(self) -> bool:
        return self.marker_path.is_file()

    def read_summary(self) -> dict:
        """The summary stored in the marker of a complete dataset."""
        path = self.marker_path
        try:
            with open(path, encoding="utf-8") as f:
                summary = json.load(f)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"dataset at {self.root} is not built; {BUILD_HINT}") from e
        except UnicodeDecodeError as e:
            raise DatasetFileError(not_utf8_message(path, fix=REBUILD_HINT)) from e
        except json.JSONDecodeError as e:
            raise DatasetFileError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); {REBUILD_HINT}") from e
        if not isinstance(summary, dict):
            raise DatasetFileError(f"{path}: expected a JSON object, got {type(summary).__name__}; {REBUILD_HINT}")
        return summary

    def build(self, rebuild: bool = False) -> dict:
        """Build the dataset unless it is already complete; return its summary.

        Concurrent callers (torchrun ranks, several jobs sharing a data root) serialise on the build
        lock; whoever gets it second finds the dataset complete and just returns.
        """
        if not rebuild and self.is_complete():
            return self.read_summary()

        self.root.parent.mkdir(parents=True, exist_ok=True)
        requested_ns = time.time_ns()
        with self.lock():
            if self.is_complete():
                if not rebuild:
                    log.info("Dataset at %s was built by another process", self.root)
                    return self.read_summary()
                # Another process rebuilt it while we waited for the lock: that rebuild is as
                # fresh as ours would be, so don't do it twice.
                if self.marker_path.stat().st_mtime_ns >= requested_ns:
                    log.info("Dataset at %s was rebuilt by another process", self.root)
                    return self.read_summary()
            self._remove_stale_scratch()
            return self._build_and_swap()

    def wait_until_complete(
        self,
        timeout_s: float,
        poll_s: float = 0.5,
        is_builder_alive: Callable[[], bool] | None = None,
    ) -> dict:
        """Block until another process has finished building; return the summary.

        Raises TimeoutError after `timeout_s` seconds, or RuntimeError as soon as `is_builder_alive`
        reports that the building process is gone (e.g. `builder.is_building`, once it has started).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            if self.is_complete():
                return self.read_summary()
            if is_builder_alive is not None and not is_builder_alive():
                # The builder may have finished right before exiting; check once more.
                if self.is_complete():
                    return self.read_summary()
                raise RuntimeError(
                    f"dataset builder died before finishing {self.root} (no {self.MARKER_NAME} "
                    f"marker); {BUILD_HINT}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"dataset at {self.root} was not complete after waiting {timeout_s:g}s "
                    f"(no {self.MARKER_NAME} marker); {BUILD_HINT}"
                )
            time.sleep(min(poll_s, remaining))

    # ------------------------------------------------------------------------------- internals
    def _remove_stale_scratch(self) -> None:
        """Delete temp/old siblings left by a crashed builder (safe: we hold the lock)."""
        prefixes = tuple(self._scratch_prefix(kind) for kind in ("tmp", "old"))
        for path in self.root.parent.iterdir():
            if path.name.startswith(prefixes):
                log.warning("Removing leftover %s from an interrupted build", path)
                shutil.rmtree(path, ignore_errors=True)

    def _build_and_swap(self) -> dict:
        tmp_dir = self.root.parent / (self._scratch_prefix("tmp") + uuid.uuid4().hex[:8])
        tmp_dir.mkdir()
        start = time.monotonic()
        try:
            summary = self._build(tmp_dir)
            if not isinstance(summary, dict):
                raise TypeError(f"{type(self).__name__}._build must return a dict, got {type(summary).__name__}")
            self._write_marker(tmp_dir / self.MARKER_NAME, summary)
            self._swap_into_place(tmp_dir)
        except BaseException:
            # Includes KeyboardInterrupt: never leave a half-written directory behind.
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        log.info("Built dataset %s in %.1fs: %s", self.root, time.monotonic() - start, summary)
        return summary

    @staticmethod
    def _write_marker(path: Path, summary: dict) -> None:
        # fsync so the marker cannot reach the disk before the data files it vouches for.
        with open(path, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

    def _swap_into_place(self, tmp_dir: Path) -> None:
        old_dir = None
        if self.root.exists():
            # rename() cannot replace a non-empty directory, so move the old one aside first.
            old_dir = self.root.parent / (self._scratch_prefix("old") + uuid.uuid4().hex[:8])
            os.rename(self.root, old_dir)
        try:
            os.rename(tmp_dir, self.root)
        except OSError:
            if old_dir is not None:
                os.rename(old_dir, self.root)  # put the previous dataset back
            raise
        if old_dir is not None:
            shutil.rmtree(old_dir, ignore_errors=True)
