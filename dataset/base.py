"""Shared pieces for datasets: a build-once-on-disk builder and a dict-of-tensors dataset.

A dataset directory is either absent or complete: it is built in a temporary sibling directory,
the ``COMPLETE`` marker (a JSON summary) is written last, and the directory is then renamed into
place. Readers therefore only ever have to check for the marker.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

BUILD_HINT = "build it with `python train.py --dataset-only` (add `--rebuild-dataset` to force a rebuild)"


class DiskDatasetBuilder(abc.ABC):
    """Builds a dataset directory exactly once, safely across concurrent processes.

    Subclasses implement :meth:`_build`, which writes the dataset files into a fresh directory
    and returns a JSON-serialisable summary (counts, sizes). That summary is stored in the
    ``COMPLETE`` marker and returned by :meth:`build` on later calls without rebuilding.
    """

    MARKER_NAME = "COMPLETE"

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

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
        """Write the dataset files into ``tmp_dir`` (which exists and is empty); return a summary."""

    def is_complete(self) -> bool:
        return self.marker_path.is_file()

    def read_summary(self) -> dict:
        """The summary stored in the marker of a complete dataset."""
        try:
            with open(self.marker_path, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"dataset at {self.root} is not built; {BUILD_HINT}") from e
        except json.JSONDecodeError as e:
            raise RuntimeError(
                f"marker {self.marker_path} is not valid JSON ({e}); "
                "rebuild the dataset with `python train.py --dataset-only --rebuild-dataset`"
            ) from e

    def build(self, rebuild: bool = False) -> dict:
        """Build the dataset unless it is already complete; return its summary.

        Concurrent callers (torchrun ranks, several jobs sharing a data root) serialise on an
        exclusive lock; whoever gets it second finds the dataset complete and just returns.
        """
        if not rebuild and self.is_complete():
            return self.read_summary()

        self.root.parent.mkdir(parents=True, exist_ok=True)
        requested_ns = time.time_ns()
        with self._exclusive_lock():
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

        Raises TimeoutError after ``timeout_s`` seconds, or RuntimeError as soon as
        ``is_builder_alive`` reports that the building process is gone.
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
    @contextlib.contextmanager
    def _exclusive_lock(self) -> Iterator[None]:
        # The lock file is never deleted: unlinking it could let two processes lock different inodes.
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

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


class TensorDictDataset(Dataset):
    """Map-style dataset over equally long tensors; items and batches are ``dict[str, Tensor]``."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if not tensors:
            raise ValueError("TensorDictDataset needs at least one tensor")
        lengths = {name: len(t) for name, t in tensors.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"all tensors must have the same length, got {lengths}")
        self.tensors = dict(tensors)
        self._length = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: t[index] for name, t in self.tensors.items()}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        # One fancy-indexing op per tensor instead of B __getitem__ calls plus a stack.
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {name: t[idx] for name, t in self.tensors.items()}


def collate_tensor_dicts(
    batch: Mapping[str, torch.Tensor] | Sequence[Mapping[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Collate for datasets with ``__getitems__``: pass a ready batch through, stack a list of items."""
    if isinstance(batch, Mapping):
        return dict(batch)
    if isinstance(batch, Sequence) and batch and all(isinstance(item, Mapping) for item in batch):
        keys = batch[0].keys()
        return {k: torch.stack([torch.as_tensor(item[k]) for item in batch]) for k in keys}
    raise TypeError(
        f"expected a dict of tensors or a non-empty list of such dicts, got {type(batch).__name__}"
    )


def describe_tensors(tensors: Mapping[str, Any]) -> str:
    """Short ``name: dtype[shape]`` listing, for error messages."""
    parts = []
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor):
            parts.append(f"{name}: {str(value.dtype).removeprefix('torch.')}{list(value.shape)}")
        else:
            parts.append(f"{name}: {type(value).__name__}")
    return "{" + ", ".join(parts) + "}"
