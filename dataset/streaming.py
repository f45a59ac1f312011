"""Streaming dataset builder: shards written while training already reads the first ones.

A builder walks its examples in a fixed, deterministic order and writes them to ``<data_root>/<name>/``:

    batch_00000.pt, batch_00001.pt, ...   ``examples_per_batch`` examples each (the last may hold fewer)
    consolidated_000.pt, ...              every ``batches_per_consolidated`` batch files concatenated
                                          (rows in order); those batch files are then deleted. The
                                          final group may hold fewer batches.
    manifest.json                         progress and identity of the build (below)
    arc_tasks.json                        (builders with ARC) the task list rows' ``task_index`` points into
    builder.log                           the background builder's output
    .builder.lock                         ``fcntl.flock``-ed (exclusive) by the builder while it runs

Every ``.pt`` file, the manifest and ``arc_tasks.json`` are written as ``<name>.<pid>.tmp`` + fsync + ``os.replace`` + fsync
of the directory, so a visible file is always complete. ``manifest.json`` is rewritten after every file:

    {
      "format": 2,
      "builder": "dataset.streaming.VisionUnifiedBuilder",
      "params": {...}, "params_hash": "<sha256 of params>",   # config that defines the content
      "sources": {...},                                       # fingerprint of the source files
      "examples_per_batch": 32, "batches_per_consolidated": 100,
      "batches_written": 230,            # batch files ever written (consolidated ones included)
      "examples_written": 7360,          # examples in them: a restart skips this many
      "consolidated": [{"file": "consolidated_000.pt", "rows": 3200, "first_batch": 0,
                        "num_batches": 100, "val_rows": 311}, ...],
      "row_spec": {"images": {"dtype": "uint8", "shape": [1, 64, 128]}, ...},   # per-row tensor layout
      "stats": {...},                    # per-source counts (builder-specific)
      "complete": false
    }

Crash safety and resume (SIGKILL at any instant): the manifest only ever records files that are fully
on disk, and files are only deleted after the manifest no longer needs them. A restarted builder
removes stray ``*.tmp`` files, batch files outside ``[consolidated batches, batches_written)`` and
consolidated files the manifest does not list, skips ``examples_written`` examples of its
(deterministic) iteration and continues; the result is identical to an uninterrupted build.
SIGTERM / SIGINT let the current file and manifest update finish, then the builder stops (the CLI exits
0 for SIGTERM, 130 for SIGINT; a second SIGINT aborts at once, which is still safe).

A dataset directory whose manifest ``params_hash`` differs from the config is refused with a message
telling to use ``--rebuild-dataset``; so is resuming an incomplete build whose source files changed.
The params include ``format`` (``FORMAT_VERSION``), so a directory written by an older format (e.g.
format 1, rows without ``task_index`` / ``test_index``) is refused the same way ("differing: format").

``VisionUnifiedBuilder`` (the seed's "vision_unified" pipeline) renders a context (text, code or an
ARC grid) to an image and stores the target as byte tokens; see its docstring. CLI:

    python -m dataset.streaming build --config-json '{"root": ..., ...}'   # what StreamingData starts
    python -m dataset.streaming status DATASET_DIR
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import errno
import fcntl
import hashlib
import importlib
import itertools
import json
import logging
import os
import random
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from dataset.reasoning.arc import ArcTask, file_sha256, load_subset, subset_files
from dataset.multimodal.story_generator import STORY_SEPARATOR, write_stories
from dataset.multimodal.text_renderer import render_grid, render_grid_panel, render_text
from utils.storage.atomic import atomic_write, fsync_dir
from utils.config.validation import ConfigError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
# 2: rows gained ``task_index`` / ``test_index`` and ARC builds write arc_tasks.json.
FORMAT_VERSION = 2
MANIFEST_FILE = "manifest.json"
ARC_TASKS_FILE = "arc_tasks.json"
LOCK_FILE = ".builder.lock"
LOG_FILE = "builder.log"
STORIES_DIR = "stories"
CODE_SNAPSHOT_DIR = "code_snapshot"
BATCH_RE = re.compile(r"^batch_(\d{5,})\.pt$")
CONSOLIDATED_RE = re.compile(r"^consolidated_(\d{3,})\.pt$")
REBUILD_HINT = "rebuild it with `python train.py data=<this data config> --rebuild-dataset`"

# Token ids of the targets: PAD and EOS first, then the 256 byte values (byte b -> b + 2).
PAD_TOKEN = 0
EOS_TOKEN = 1
BYTE_OFFSET = 2
VOCAB_SIZE = BYTE_OFFSET + 256
IGNORE_INDEX = -100
SOURCE_IDS: dict[str, int] = {"arc": 0, "text": 1, "code": 2}


def batch_name(index: int) -> str:
    return f"batch_{index:05d}.pt"


def consolidated_name(index: int) -> str:
    return f"consolidated_{index:03d}.pt"


# ------------------------------------------------------------------------------------------- errors
class StreamingDatasetError(RuntimeError):
    """A dataset directory or source file is not what the builder/loader expects (message names it)."""


class DatasetMismatchError(ConfigError):
    """The directory holds a dataset built from other parameters or sources (a config problem: exit 2)."""


class BuilderBusyError(RuntimeError):
    """Another process holds the builder lock of this directory."""


class BuildInterrupted(Exception):
    """SIGTERM / SIGINT stopped the build after a complete file; running it again resumes."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.exit_code = 130 if signum == signal.SIGINT else 0
        super().__init__(f"dataset build stopped by {signal.Signals(signum).name}")


# ------------------------------------------------------------------------------- atomic file writes
def _tmp_path(path: Path) -> Path:
    # `<name>.<pid>.tmp`: the `.tmp` suffix is what `_remove_strays` deletes after a killed build.
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def atomic_torch_save(path: Path, obj: Any, pause_before_replace_s: float = 0.0) -> None:
    """``torch.save`` to a temporary sibling, fsync, rename over ``path``: never a half-written ``path``.

    ``pause_before_replace_s`` (testing only) sleeps once the temporary file is written, before the
    rename, so a test can SIGKILL a builder in the middle of a write.
    """

    def write(f: BinaryIO) -> None:
        torch.save(obj, f)
        if pause_before_replace_s > 0:
            f.flush()
            time.sleep(pause_before_replace_s)

    atomic_write(path, write, temp_path=_tmp_path(path))


def atomic_write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")), temp_path=_tmp_path(path))


def read_manifest(root: Path | str) -> dict[str, Any] | None:
    """The manifest of a dataset directory, or None when there is none yet."""
    path = Path(root) / MANIFEST_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise StreamingDatasetError(f"{path} is not valid JSON (line {e.lineno}: {e.msg}); {REBUILD_HINT}") from e
    required = ("format", "params_hash", "batches_written", "examples_written", "consolidated", "complete")
    missing = [k for k in required if k not in data] if isinstance(data, dict) else list(required)
    if missing:
        raise StreamingDatasetError(f"{path} lacks {missing}; {REBUILD_HINT}")
    return data


def params_hash(params: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------ builder lock
class BuilderLock:
    """Exclusive ``flock`` on ``<dir>/.builder.lock``, held by the builder for as long as it runs.

    The kernel drops the lock when the process dies, however it dies, so "can I take it without
    blocking?" is an exact liveness test. The file is never deleted (deleting it would let two
    processes lock two different inodes). It holds the owner's pid, for messages only.
    """

    def __init__(self, root: Path | str) -> None:
        self.path = Path(root) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, wait_s: float = 2.0) -> bool:
        """Try for ``wait_s`` seconds (liveness probes hold it for microseconds); True when acquired."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() >= deadline:
                    os.close(fd)
                    if e.errno in (errno.EAGAIN, errno.EACCES):
                        return False
                    raise
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def builder_alive(root: Path | str) -> bool:
    """Whether a process holds the builder lock of ``root`` right now."""
    path = Path(root) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return True
        raise
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def builder_pid(root: Path | str) -> int | None:
    """The pid written by the last builder that took the lock (may be stale: check ``builder_alive``)."""
    try:
        return int((Path(root) / LOCK_FILE).read_text().strip() or 0) or None
    except (FileNotFoundError, ValueError):
        return None


def clear_dataset_dir(root: Path) -> None:
    """Delete everything in ``root`` except the lock file (the caller holds the lock)."""
    import shutil

    for path in root.iterdir():
        if path.name == LOCK_FILE:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    fsync_dir(root)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[dict[str, int | None]]:
    """SIGTERM/SIGINT set a flag the build loop checks after each file; a second SIGINT aborts at once."""
    state: dict[str, int | None] = {"signum": None}
    if threading.current_thread() is not threading.main_thread():
        yield state  # signal handlers can only be installed from the main thread
        return

    def handler(signum: int, frame: Any) -> None:
        if state["signum"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl+C: files are written atomically, so this is safe too
        state["signum"] = signum
        log.warning("%s received: finishing the current file, then stopping", signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield state
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ------------------------------------------------------------------------------------ base builder
class StreamingDatasetBuilder(abc.ABC):
    """Writes batch / consolidated shards and a manifest; resumable after any kill (module docstring).

    Subclasses implement :meth:`iter_examples` (a deterministic order: resume relies on it) and
    :meth:`encode` (a list of examples to a dict of tensors with one row per example), and extend
    :meth:`params` with everything that defines the content. Optional hooks: :meth:`prepare_sources`
    (runs under the lock before iterating), :meth:`source_fingerprint`, :meth:`example_stats`,
    :meth:`consolidated_info`.
    """

    def __init__(
        self,
        root: Path | str,
        examples_per_batch: int = 32,
        batches_per_consolidated: int = 100,
        max_examples: int | None = None,
        throttle_s: float = 0.0,
        fault_pause_s: float = 0.0,
    ) -> None:
        for key, value in (("examples_per_batch", examples_per_batch), ("batches_per_consolidated", batches_per_consolidated)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
        if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1):
            raise ValueError(f"max_examples must be null or an integer >= 1, got {max_examples!r}")
        self.root = Path(root)
        self.examples_per_batch = examples_per_batch
        self.batches_per_consolidated = batches_per_consolidated
        self.max_examples = max_examples
        self.throttle_s = float(throttle_s)  # testing/debugging: sleep after each batch file
        self.fault_pause_s = float(fault_pause_s)  # testing: pause inside each atomic write (see atomic_torch_save)

    # ------------------------------------------------------------------------------ interface
    @abc.abstractmethod
    def iter_examples(self) -> Iterator[Any]:
        """Every example, always in the same order."""

    @abc.abstractmethod
    def encode(self, examples: list[Any]) -> dict[str, torch.Tensor]:
        """One batch: a dict of tensors whose first dimension is ``len(examples)``."""

    def params(self) -> dict[str, Any]:
        """JSON-able parameters that define the dataset's content (hashed into the manifest)."""
        return {
            "format": FORMAT_VERSION,
            "builder": f"{type(self).__module__}.{type(self).__qualname__}",
            "examples_per_batch": self.examples_per_batch,
            "batches_per_consolidated": self.batches_per_consolidated,
            "max_examples": self.max_examples,
        }

    def params_hash(self) -> str:
        return params_hash(self.params())

    def prepare_sources(self, fresh: bool) -> None:
        """Create generated or snapshotted sources (under the lock, before fingerprinting and iterating).

        ``fresh`` is True when the build starts from nothing (no manifest), False when it resumes.
        """

    def write_metadata(self) -> None:
        """Write side files describing the content (under the lock, after the source check, before the
        first batch; again on every resume, so they must be deterministic). Written atomically."""

    def source_fingerprint(self) -> dict[str, Any]:
        """A JSON-able digest of the source files; a resumed incomplete build requires it unchanged."""
        return {}

    def example_stats(self, examples: list[Any]) -> dict[str, int]:
        """Counts to add to the manifest's ``stats`` for one batch."""
        return {}

    def consolidated_info(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Extra fields of a consolidated file's manifest entry."""
        return {}

    # -------------------------------------------------------------------------------- building
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_FILE

    def check_params(self, manifest: Mapping[str, Any] | None) -> None:
        """Raise DatasetMismatchError when ``manifest`` belongs to a dataset with other parameters."""
        if manifest is None:
            return
        if manifest.get("params_hash") != self.params_hash():
            old, new = manifest.get("params") or {}, self.params()
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise DatasetMismatchError(
                f"{self.manifest_path} was built with other parameters (differing: {', '.join(changed) or 'unknown'}); "
                "use --rebuild-dataset to delete it and build with the current config, or point "
                "data.name / paths.data_root elsewhere."
            )

    def build(self, rebuild: bool = False, stop_after_batches: int | None = None) -> dict[str, Any]:
        """Build (or resume) the dataset; return the final manifest.

        ``stop_after_batches`` stops, incomplete, once that many batch files exist (a later call
        resumes). Raises BuilderBusyError if another builder holds the lock, BuildInterrupted after a
        SIGTERM/SIGINT (the directory is consistent and resumable).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        lock = BuilderLock(self.root)
        if not lock.acquire():
            raise BuilderBusyError(
                f"another dataset builder (pid {builder_pid(self.root)}) is running on {self.root}; "
                f"its log is {self.root / LOG_FILE}"
            )
        try:
            with _stop_on_signals() as stop:
                return self._build_locked(rebuild, stop, stop_after_batches)
        finally:
            lock.release()

    def _build_locked(self, rebuild: bool, stop: dict[str, int | None], stop_after_batches: int | None) -> dict[str, Any]:
        if rebuild:
            log.info("Rebuild: deleting the contents of %s", self.root)
            clear_dataset_dir(self.root)
        manifest = read_manifest(self.root)
        self.check_params(manifest)
        if manifest is not None and manifest["complete"]:
            log.info("Dataset %s is already complete (%d consolidated files)", self.root, len(manifest["consolidated"]))
            return manifest
        self.prepare_sources(fresh=manifest is None)
        fingerprint = self.source_fingerprint()
        if manifest is None:
            manifest = {
                "format": FORMAT_VERSION,
                "builder": f"{type(self).__module__}.{type(self).__qualname__}",
                "params": self.params(),
                "params_hash": self.params_hash(),
                "sources": fingerprint,
                "examples_per_batch": self.examples_per_batch,
                "batches_per_consolidated": self.batches_per_consolidated,
                "batches_written": 0,
                "examples_written": 0,
                "consolidated": [],
                "row_spec": None,
                "stats": {},
                "complete": False,
            }
        elif manifest.get("sources") != fingerprint:
            raise DatasetMismatchError(
                f"the source files changed since the incomplete build in {self.root} started, so resuming it "
                "would mix two versions of the data; use --rebuild-dataset (or restore the sources)."
            )
        else:
            log.info(
                "Resuming %s: %d examples in %d batch files already written (%d consolidated files)",
                self.root, manifest["examples_written"], manifest["batches_written"], len(manifest["consolidated"]),
            )
        self._remove_strays(manifest)
        atomic_write_json(self.manifest_path, manifest)
        self.write_metadata()

        def check_signal() -> None:  # after every completed file (and manifest update)
            if stop["signum"] is not None:
                raise BuildInterrupted(stop["signum"])

        def reached_stop() -> bool:
            return stop_after_batches is not None and manifest["batches_written"] >= stop_after_batches

        examples = self.iter_examples()
        skip = manifest["examples_written"]
        if skip:
            skipped = sum(1 for _ in itertools.islice(examples, skip))
            if skipped < skip:
                raise StreamingDatasetError(
                    f"{self.manifest_path} records {skip} examples but the sources now yield only {skipped}; {REBUILD_HINT}"
                )
        if self.max_examples is not None:
            examples = itertools.islice(examples, max(0, self.max_examples - skip))
        start = time.monotonic()
        pending: list[Any] = []
        # a group of batch files completed before a kill: consolidate it now, readers may be waiting for it
        while self._consolidated_batches(manifest) + self.batches_per_consolidated <= manifest["batches_written"]:
            self._consolidate(manifest)
            check_signal()
        if reached_stop():
            return manifest
        for example in examples:
            pending.append(example)
            if len(pending) < self.examples_per_batch:
                continue
            self._write_batch(manifest, pending)
            pending = []
            check_signal()
            if self._consolidated_batches(manifest) + self.batches_per_consolidated <= manifest["batches_written"]:
                self._consolidate(manifest)
                check_signal()
            if reached_stop():
                return manifest
            if self.throttle_s > 0:
                time.sleep(self.throttle_s)
        if pending:
            self._write_batch(manifest, pending)
            check_signal()
        while self._consolidated_batches(manifest) < manifest["batches_written"]:  # the final, partial group
            self._consolidate(manifest)
            check_signal()
        if manifest["batches_written"] == 0:
            raise StreamingDatasetError(f"the sources of {self.root} yielded no examples; check the data config")
        manifest["complete"] = True
        atomic_write_json(self.manifest_path, manifest)
        rows = sum(c["rows"] for c in manifest["consolidated"])
        log.info(
            "Dataset %s complete: %d rows in %d consolidated files (%.1fs this session)",
            self.root, rows, len(manifest["consolidated"]), time.monotonic() - start,
        )
        return manifest

    @staticmethod
    def _consolidated_batches(manifest: Mapping[str, Any]) -> int:
        return sum(int(c["num_batches"]) for c in manifest["consolidated"])

    def _remove_strays(self, manifest: Mapping[str, Any]) -> None:
        """Delete what a killed builder left that the manifest does not vouch for; check what it does."""
        first, end = self._consolidated_batches(manifest), int(manifest["batches_written"])
        listed = {c["file"] for c in manifest["consolidated"]}
        for path in sorted(self.root.iterdir()):
            name = path.name
            stray = name.endswith(".tmp")
            if (m := BATCH_RE.match(name)) is not None:
                stray = not first <= int(m.group(1)) < end
            elif CONSOLIDATED_RE.match(name) is not None:
                stray = name not in listed
            if stray and path.is_file():
                log.warning("Removing %s left by an interrupted build", path)
                path.unlink()
        missing = [batch_name(i) for i in range(first, end) if not (self.root / batch_name(i)).is_file()]
        missing += [name for name in sorted(listed) if not (self.root / name).is_file()]
        if missing:
            raise StreamingDatasetError(
                f"{self.manifest_path} lists files that are missing from {self.root}: {missing[:5]}; {REBUILD_HINT}"
            )
        fsync_dir(self.root)

    def _write_batch(self, manifest: dict[str, Any], examples: list[Any]) -> None:
        index = int(manifest["batches_written"])
        tensors = self.encode(examples)
        spec = _row_spec(tensors, len(examples), f"{type(self).__name__}.encode (batch {index})")
        if manifest["row_spec"] is None:
            manifest["row_spec"] = spec
        elif spec != manifest["row_spec"]:
            raise StreamingDatasetError(
                f"{type(self).__name__}.encode returned {spec} for batch {index}, but earlier batches had "
                f"{manifest['row_spec']}"
            )
        atomic_torch_save(self.root / batch_name(index), {k: v.contiguous() for k, v in tensors.items()}, self.fault_pause_s)
        manifest["batches_written"] = index + 1
        manifest["examples_written"] = int(manifest["examples_written"]) + len(examples)
        stats = manifest.setdefault("stats", {})
        for key, value in self.example_stats(examples).items():
            stats[key] = stats.get(key, 0) + int(value)
        atomic_write_json(self.manifest_path, manifest)
        if (index + 1) % 50 == 0:
            log.info("%s: %d batch files, %d examples", self.root.name, index + 1, manifest["examples_written"])

    def _consolidate(self, manifest: dict[str, Any]) -> None:
        first = self._consolidated_batches(manifest)
        count = min(self.batches_per_consolidated, int(manifest["batches_written"]) - first)
        parts = []
        for i in range(first, first + count):
            path = self.root / batch_name(i)
            try:
                parts.append(torch.load(path, map_location="cpu", weights_only=True))
            except Exception as e:  # any failure means the file is unusable
                first_line = (str(e).strip().splitlines() or [""])[0]
                raise StreamingDatasetError(f"{path} could not be loaded ({type(e).__name__}: {first_line}); {REBUILD_HINT}") from e
        tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        index = len(manifest["consolidated"])
        name = consolidated_name(index)
        atomic_torch_save(self.root / name, tensors, self.fault_pause_s)
        rows = len(next(iter(tensors.values())))
        entry = {"file": name, "rows": rows, "first_batch": first, "num_batches": count, **self.consolidated_info(tensors)}
        manifest["consolidated"].append(entry)
        atomic_write_json(self.manifest_path, manifest)
        for i in range(first, first + count):  # only now: the manifest no longer needs them
            (self.root / batch_name(i)).unlink()
        fsync_dir(self.root)
        log.info("%s: wrote %s (%d rows, batches %d..%d)", self.root.name, name, rows, first, first + count - 1)


def _row_spec(tensors: Any, n: int, where: str) -> dict[str, dict[str, Any]]:
    if not isinstance(tensors, dict) or not tensors or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise TypeError(f"{where} must return a non-empty dict of tensors, got {type(tensors).__name__}")
    bad = {k: list(v.shape) for k, v in tensors.items() if v.dim() == 0 or v.shape[0] != n}
    if bad:
        raise ValueError(f"{where}: every tensor needs {n} rows (one per example), got shapes {bad}")
    return {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape[1:])} for k, v in sorted(tensors.items())}


# ------------------------------------------------------------------------------ vision_unified
@dataclass(frozen=True)
class Example:
    """One vision_unified example before rendering.

    ``context`` is the text to render, or for ARC a tuple of (input, output-or-None) grids (one row of
    the panel each). ``target`` is the token list before padding (bytes + 2, maybe EOS). ARC only:
    ``task_index`` (into arc_tasks.json) and ``test_index`` (which test input; -1 for a demonstration
    pair); both -1 for the other sources.
    """

    source: str
    doc_id: str
    context: str | tuple[tuple[np.ndarray, np.ndarray | None], ...]
    target: tuple[int, ...]
    is_val: bool
    task_index: int = -1
    test_index: int = -1


def target_tokens(content: bytes, ended: bool, target_len: int) -> tuple[int, ...]:
    """The first ``target_len`` tokens of ``content`` bytes (+ EOS when the content ends there)."""
    tokens = [b + BYTE_OFFSET for b in content[:target_len]]
    if ended and len(tokens) < target_len:
        tokens.append(EOS_TOKEN)
    return tuple(tokens)


def decode_target(row: Sequence[int] | torch.Tensor) -> tuple[bytes, bool]:
    """(bytes, ended) from a target row: the inverse of ``target_tokens`` + padding."""
    out = bytearray()
    for t in (row.tolist() if isinstance(row, torch.Tensor) else row):
        if t == EOS_TOKEN:
            return bytes(out), True
        if t == IGNORE_INDEX or t == PAD_TOKEN:
            break
        out.append(int(t) - BYTE_OFFSET)
    return bytes(out), False


def serialize_grid(grid: np.ndarray) -> str:
    """An ARC grid as digit rows separated by newlines (``"012\\n340"``)."""
    return "\n".join("".join(str(int(c)) for c in row) for row in np.asarray(grid))


def _resolve(path: str | Path) -> Path:
    """Relative source paths are relative to the repository root (not the working directory)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


def _as_list(value: Any, key: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (str, Path)):
        return [value]
    try:
        return list(value)
    except TypeError:
        raise TypeError(f"{key} must be a list, got {value!r}") from None


def _dir_files(root: Path, patterns: Sequence[str], key: str) -> list[Path]:
    """Files under ``root`` (recursively) matching any glob pattern, sorted; hidden dirs skipped."""
    if not root.is_dir():
        raise FileNotFoundError(f"{key}: {root} is not a directory")
    found: set[Path] = set()
    for pattern in patterns:
        for path in root.rglob(pattern):
            rel = path.relative_to(root)
            if path.is_file() and not any(part.startswith(".") or part == "__pycache__" for part in rel.parts[:-1]):
                found.add(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _import_callable(dotted: str) -> Callable[..., Any]:
    module_name, _, attr = dotted.rpartition(".")
    if not module_name:
        raise ValueError(f"encoder_factory must be a dotted path like 'models.multimodal.multimodal_trm.CapsuleEncoder', got {dotted!r}")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ImportError(f"encoder_factory {dotted!r} cannot be imported: {e}") from e


class VisionUnifiedBuilder(StreamingDatasetBuilder):
    """Images of a context + byte-token targets from ARC grids, text/stories and source code.

    Sources (each optional, at least one needed), interleaved round-robin (one example from each
    source in turn, exhausted sources drop out) so every shard mixes all of them:

    * ``arc`` (``arc_dir``): every pair (demonstration and test) of every task of ``arc_subsets``.
      Context: the pair's input grid rendered over the whole image (``render_grid``); with
      ``arc_demos=k > 0`` a panel instead: up to k other demonstration pairs of the task as rows of
      (input | output), then the pair's input with an empty output half (``render_grid_panel``).
      Target: the output grid as digit rows separated by newlines, then EOS (truncated, without EOS,
      when longer than ``target_len``: a 30x30 grid needs ``target_len >= 930``). A task's examples
      come in a seeded shuffle of the tasks.
    * ``text`` (``text_dirs`` + ``generate_stories`` generated stories): ``.txt`` files (documents
      separated by lines ``<|endoftext|>``; a file without one is one document) and ``.jsonl`` files
      (one document per line, its ``"text"`` field). A document yields windows every ``text_stride``
      characters: context = the ``context_chars`` characters before the position, target = the bytes
      from there (EOS if the document ends within ``target_len`` tokens).
    * ``code`` (``code_dirs``, files matching ``code_globs``): for each non-blank line after the first,
      context = up to ``context_lines`` preceding lines, target = that line's bytes then EOS (exact line
      completion; a line longer than ``target_len`` bytes is truncated and gets no EOS). With
      ``snapshot_code`` (default) the files are copied into ``<dir>/code_snapshot/`` when a build
      starts and read from there, so editing the repository cannot break the resume of a build.

    Targets are ``target_len`` tokens: byte b -> b + 2 (PAD 0, EOS 1, vocab 258), -100 after the end.
    Text is rendered with ``render_text(keep="end")`` (the end of the context, next to the target,
    always visible). File order within a source is a seeded shuffle of the sorted paths.

    Validation split: a document is held out when ``sha256(f"{seed}:{doc_id}") mod val_every == 0``;
    all its examples get ``is_val = True``. Per document, not per window, because windows of one
    document overlap. Document ids: ``arc:<subset>:<task id>``, ``text:<dir name>/<file>:<index in
    file>``, ``code:<dir name>/<file>`` (directory names, not paths: the split is the same wherever
    the sources live).

    Rows: ``images`` uint8 [N, 1, H, W] (0..255; or ``capsules`` float16 [N, K, D] when pre-encoding),
    ``target`` int64 [N, target_len], ``source`` int64 [N] (0 arc, 1 text, 2 code), ``is_val`` bool [N],
    ``task_index`` int64 [N] (ARC: index of the task in ``arc_tasks.json``; -1 for other sources) and
    ``test_index`` int64 [N] (ARC: which test input of the task; -1 for demonstration pairs and other
    sources). For the ARC scorer (``dataset.reasoning.arc_evaluator.MultimodalArcEvaluator``).

    ``arc_tasks.json`` (written when ARC is a source): ``{"format": 2, "tasks": [{"id", "subset",
    "num_test", "eval"}, ...]}``, the tasks of every subset sorted by (id, subset), in ``task_index``
    order; ``num_test`` counts the task's test inputs that appear as rows (fewer than the task has
    when ``max_examples`` cuts the build short), ``eval`` is True for a held-out task (its rows are
    ``is_val``). A task id must be unique across ``arc_subsets``.

    Pre-encoding (``encoder_factory`` set): images go through a frozen encoder, a module mapping float
    images [B, 1, H, W] in [0, 1] to [B, num_capsules, D], built by ``encoder_factory(**encoder_kwargs)``
    (a callable or a dotted import path) and loaded from ``encoder_checkpoint`` (``torch.load`` with
    ``weights_only=True``; a plain state dict, or a trainer checkpoint whose ``"model"`` entry is used;
    ``encoder_state_prefix`` selects and strips a submodule's keys, e.g. ``"encoder."``).
    """

    def __init__(
        self,
        root: Path | str,
        *,
        arc_dir: str | Path | None = None,
        arc_subsets: Sequence[str] = ("training",),
        arc_max_tasks: int | None = None,
        arc_demos: int = 0,
        text_dirs: Sequence[str | Path] = (),
        text_globs: Sequence[str] = ("*.txt", "*.jsonl"),
        generate_stories: int = 0,
        stories_per_file: int = 100,
        code_dirs: Sequence[str | Path] = (),
        code_globs: Sequence[str] = ("*.py",),
        snapshot_code: bool = True,
        image_size: Sequence[int] = (64, 128),
        font_size: int = 8,
        context_chars: int = 128,
        text_stride: int = 64,
        context_lines: int = 8,
        target_len: int = 64,
        val_every: int = 10,
        seed: int = 0,
        encoder_factory: str | Callable[..., torch.nn.Module] | None = None,
        encoder_kwargs: Mapping[str, Any] | None = None,
        encoder_checkpoint: str | Path | None = None,
        encoder_state_prefix: str = "",
        encoder_batch_size: int = 256,
        encoder_device: str = "cpu",
        examples_per_batch: int = 32,
        batches_per_consolidated: int = 100,
        max_examples: int | None = None,
        throttle_s: float = 0.0,
        fault_pause_s: float = 0.0,
    ) -> None:
        super().__init__(root, examples_per_batch, batches_per_consolidated, max_examples, throttle_s, fault_pause_s)

        def positive(key: str, value: Any, low: int = 1) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")
            return value

        size = [int(s) for s in _as_list(image_size, "image_size")]
        if len(size) != 2 or min(size) < 8:
            raise ValueError(f"image_size must be [H, W] with sides >= 8, got {image_size!r}")
        self.image_size = (size[0], size[1])
        self.font_size = positive("font_size", font_size, 4)
        self.context_chars = positive("context_chars", context_chars)
        self.text_stride = positive("text_stride", text_stride)
        self.context_lines = positive("context_lines", context_lines)
        self.target_len = positive("target_len", target_len)
        self.val_every = positive("val_every", val_every, 2)
        self.arc_demos = positive("arc_demos", arc_demos, 0)
        self.generate_stories = positive("generate_stories", generate_stories, 0)
        self.stories_per_file = positive("stories_per_file", stories_per_file)
        self.encoder_batch_size = positive("encoder_batch_size", encoder_batch_size)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an integer, got {seed!r}")
        self.seed = seed
        if arc_max_tasks is not None:
            positive("arc_max_tasks", arc_max_tasks)
        self.arc_max_tasks = arc_max_tasks
        self.arc_dir = _resolve(arc_dir) if arc_dir not in (None, "") else None
        self.arc_subsets = [str(s) for s in _as_list(arc_subsets, "arc_subsets")]
        if self.arc_dir is not None:
            missing = [str(p) for s in self.arc_subsets for p in subset_files(self.arc_dir, s) if not p.is_file()]
            if missing or not self.arc_subsets:
                raise FileNotFoundError(
                    f"arc_dir={self.arc_dir}: ARC files missing: {', '.join(missing) or 'no arc_subsets given'} "
                    "(expected arc-agi_<subset>_challenges.json and arc-agi_<subset>_solutions.json)"
                )
        self.text_dirs = [_resolve(p) for p in _as_list(text_dirs, "text_dirs")]
        self.text_globs = [str(g) for g in _as_list(text_globs, "text_globs")]
        self.code_dirs = [_resolve(p) for p in _as_list(code_dirs, "code_dirs")]
        self.code_globs = [str(g) for g in _as_list(code_globs, "code_globs")]
        self.snapshot_code = bool(snapshot_code)
        for key, dirs in (("text_dirs", self.text_dirs), ("code_dirs", self.code_dirs)):
            for d in dirs:
                if not d.is_dir():
                    raise FileNotFoundError(f"{key}: {d} is not a directory (relative paths are relative to {REPO_ROOT})")
        if not (self.arc_dir or self.text_dirs or self.generate_stories or self.code_dirs):
            raise ValueError("vision_unified needs at least one source: arc_dir, text_dirs, generate_stories or code_dirs")

        self.encoder_factory = encoder_factory
        self.encoder_kwargs = dict(encoder_kwargs or {})
        self.encoder_state_prefix = str(encoder_state_prefix or "")
        self.encoder_device = str(encoder_device)
        self.encoder_checkpoint = _resolve(encoder_checkpoint) if encoder_checkpoint else None
        if encoder_factory is not None and (self.encoder_checkpoint is None or not self.encoder_checkpoint.is_file()):
            raise FileNotFoundError(
                f"pre-encoding needs the frozen encoder's weights: encoder_checkpoint={encoder_checkpoint!r} is not a "
                "file (a randomly initialised frozen encoder would store random features)"
            )
        self._encoder: torch.nn.Module | None = None
        self._checkpoint_sha: str | None = None

    # ----------------------------------------------------------------------------- identity
    @property
    def pre_encoded(self) -> bool:
        return self.encoder_factory is not None

    @property
    def stories_dir(self) -> Path:
        return self.root / STORIES_DIR

    @property
    def source_names(self) -> list[str]:
        names = []
        if self.arc_dir is not None:
            names.append("arc")
        if self.text_dirs or self.generate_stories:
            names.append("text")
        if self.code_dirs:
            names.append("code")
        return names

    def _rel(self, path: Path) -> str:
        """Paths in params as written relative to the repository when inside it (machine independent)."""
        try:
            return path.relative_to(REPO_ROOT).as_posix()
        except ValueError:
            return str(path)

    def params(self) -> dict[str, Any]:
        factory = self.encoder_factory
        if factory is not None and not isinstance(factory, str):
            factory = f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', repr(factory))}"
        if self.pre_encoded and self._checkpoint_sha is None:
            assert self.encoder_checkpoint is not None
            self._checkpoint_sha = file_sha256(self.encoder_checkpoint)
        return {
            **super().params(),
            "arc_dir": self._rel(self.arc_dir) if self.arc_dir else None,
            "arc_subsets": self.arc_subsets if self.arc_dir else None,
            "arc_max_tasks": self.arc_max_tasks,
            "arc_demos": self.arc_demos,
            "text_dirs": [self._rel(p) for p in self.text_dirs],
            "text_globs": self.text_globs,
            "generate_stories": self.generate_stories,
            "stories_per_file": self.stories_per_file,
            "code_dirs": [self._rel(p) for p in self.code_dirs],
            "code_globs": self.code_globs,
            "snapshot_code": self.snapshot_code,
            "image_size": list(self.image_size),
            "font_size": self.font_size,
            "context_chars": self.context_chars,
            "text_stride": self.text_stride,
            "context_lines": self.context_lines,
            "target_len": self.target_len,
            "val_every": self.val_every,
            "seed": self.seed,
            "pre_encode": None
            if not self.pre_encoded
            else {
                "encoder_factory": factory,
                "encoder_kwargs": self.encoder_kwargs,
                "encoder_checkpoint_sha256": self._checkpoint_sha,
                "encoder_state_prefix": self.encoder_state_prefix,
            },
        }

    def prepare_sources(self, fresh: bool) -> None:
        if self.generate_stories:
            write_stories(self.stories_dir, self.generate_stories, self.seed, self.stories_per_file)
        if self.code_dirs and self.snapshot_code:
            self._snapshot_code(fresh)

    def _snapshot_code(self, fresh: bool) -> None:
        """Copy the code sources into the dataset directory when a build starts; a resumed build reads the copy.

        The default code source is this repository, which changes while people work on it: reading a
        frozen copy keeps a resumed build identical to an uninterrupted one.
        """
        import shutil

        snapshot = self.root / CODE_SNAPSHOT_DIR
        for stale in self.root.glob(f"{CODE_SNAPSHOT_DIR}.tmp-*"):
            shutil.rmtree(stale)
        if not fresh:
            if not snapshot.is_dir():
                raise StreamingDatasetError(f"{snapshot} (the code sources of this build) is missing; {REBUILD_HINT}")
            return
        tmp = self.root / f"{CODE_SNAPSHOT_DIR}.tmp-{os.getpid()}"
        for k, root in enumerate(self.code_dirs):
            for path in _dir_files(root, self.code_globs, "code_dirs"):
                dest = tmp / str(k) / path.relative_to(root)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, dest)
            (tmp / str(k)).mkdir(parents=True, exist_ok=True)
        if snapshot.exists():
            shutil.rmtree(snapshot)
        os.replace(tmp, snapshot)
        fsync_dir(self.root)

    # Document ids start with the source directory's *name*, not its path, so the validation split
    # does not depend on where the sources live on a machine.
    def _code_roots(self) -> list[tuple[str, Path, Path]]:
        """(key used in document ids, configured directory, directory read) per code dir."""
        if self.snapshot_code:
            return [(d.name, d, self.root / CODE_SNAPSHOT_DIR / str(k)) for k, d in enumerate(self.code_dirs)]
        return [(d.name, d, d) for d in self.code_dirs]

    def _text_roots(self) -> list[tuple[str, Path, Path]]:
        """(key used in document ids, configured directory, directory read) per text dir."""
        roots = [(d.name, d, d) for d in self.text_dirs]
        return roots + ([(STORIES_DIR, self.stories_dir, self.stories_dir)] if self.generate_stories else [])

    def source_fingerprint(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.arc_dir is not None:
            out["arc"] = {p.name: file_sha256(p) for s in self.arc_subsets for p in subset_files(self.arc_dir, s)}
        for kind, roots, globs in (("text", self._text_roots(), self.text_globs), ("code", self._code_roots(), self.code_globs)):
            for _, configured, root in roots:
                digest = hashlib.sha256()
                files = _dir_files(root, globs, f"{kind}_dirs")
                for path in files:
                    digest.update(path.relative_to(root).as_posix().encode() + b"\0" + file_sha256(path).encode())
                name = STORIES_DIR if root == self.stories_dir else self._rel(configured)
                out.setdefault(kind, []).append({"dir": name, "files": len(files), "sha256": digest.hexdigest()})
        return out

    # ------------------------------------------------------------------------------ examples
    def _is_val(self, doc_id: str) -> bool:
        digest = hashlib.sha256(f"{self.seed}:{doc_id}".encode()).digest()
        return int.from_bytes(digest[:8], "little") % self.val_every == 0

    def _shuffled(self, items: list[Any], salt: str) -> list[Any]:
        rng = random.Random(f"{self.seed}:{salt}")  # str seeds are hashed with SHA-512: reproducible everywhere
        items = list(items)
        rng.shuffle(items)
        return items

    def iter_examples(self) -> Iterator[Example]:
        streams: list[Iterator[Example]] = []
        if self.arc_dir is not None:
            streams.append(self._arc_examples())
        if self.text_dirs or self.generate_stories:
            streams.append(self._text_examples())
        if self.code_dirs:
            streams.append(self._code_examples())
        while streams:  # round-robin; an exhausted stream drops out, the others go on in the same order
            alive = []
            for stream in streams:
                example = next(stream, None)
                if example is not None:
                    alive.append(stream)
                    yield example
            streams = alive

    def _arc_tasks(self) -> tuple[list[ArcTask], dict[tuple[str, str], int]]:
        """(tasks in subset order, then sorted ids; (subset, id) -> task index in (id, subset) order)."""
        assert self.arc_dir is not None
        tasks = [t for s in self.arc_subsets for t in load_subset(self.arc_dir, s, self.arc_max_tasks)]
        ordered = sorted(tasks, key=lambda t: (t.task_id, t.subset))
        dup = sorted({a.task_id for a, b in itertools.pairwise(ordered) if a.task_id == b.task_id})
        if dup:
            raise StreamingDatasetError(
                f"ARC task ids {dup[:5]} occur in more than one of arc_subsets={self.arc_subsets}; the ARC "
                "scorer and submission.json name tasks by id: list each subset once"
            )
        return tasks, {(t.subset, t.task_id): i for i, t in enumerate(ordered)}

    def write_metadata(self) -> None:
        """``arc_tasks.json`` (class docstring) when ARC is a source."""
        if self.arc_dir is None:
            return
        tasks, index = self._arc_tasks()
        ordered = sorted(tasks, key=lambda t: index[(t.subset, t.task_id)])
        if self.max_examples is None:
            num_test = [len(t.test_inputs) for t in ordered]
        else:  # the test inputs among the first max_examples examples (iterating does not render)
            num_test = [0] * len(ordered)
            for ex in itertools.islice(self.iter_examples(), self.max_examples):
                if ex.test_index >= 0:
                    num_test[ex.task_index] = max(num_test[ex.task_index], ex.test_index + 1)
        atomic_write_json(self.root / ARC_TASKS_FILE, {
            "format": FORMAT_VERSION,
            "tasks": [
                {"id": t.task_id, "subset": t.subset, "num_test": n, "eval": self._is_val(f"arc:{t.subset}:{t.task_id}")}
                for t, n in zip(ordered, num_test)
            ],
        })

    def _arc_examples(self) -> Iterator[Example]:
        tasks, index = self._arc_tasks()
        for task in self._shuffled(tasks, "arc"):
            doc_id = f"arc:{task.subset}:{task.task_id}"
            is_val = self._is_val(doc_id)
            task_index = index[(task.subset, task.task_id)]
            pairs = list(task.train) + list(zip(task.test_inputs, task.test_outputs))
            for j, (x, y) in enumerate(pairs):
                context: tuple[tuple[np.ndarray, np.ndarray | None], ...]
                if self.arc_demos:
                    demos = [p for i, p in enumerate(task.train) if i != j][: self.arc_demos]
                    context = (*((dx, dy) for dx, dy in demos), (x, None))
                else:
                    context = ((x, None),)
                target = target_tokens(serialize_grid(y).encode("ascii"), True, self.target_len)
                test_index = j - len(task.train) if j >= len(task.train) else -1
                yield Example("arc", doc_id, context, target, is_val, task_index, test_index)

    def _documents(self, path: Path) -> Iterator[tuple[int, str]]:
        """(index, text) of the documents in a .txt or .jsonl file."""
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                index = 0
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise StreamingDatasetError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
                    text = record.get("text") if isinstance(record, dict) else None
                    if not isinstance(text, str):
                        raise StreamingDatasetError(f"{path}:{lineno}: expected an object with a string field 'text'")
                    yield index, text
                    index += 1
            return
        with open(path, encoding="utf-8", errors="strict") as f:
            lines: list[str] = []
            index = 0
            try:
                for line in f:
                    if line.strip() == STORY_SEPARATOR:
                        if "".join(lines).strip():
                            yield index, "".join(lines).strip()
                            index += 1
                        lines = []
                    else:
                        lines.append(line)
            except UnicodeDecodeError as e:
                raise StreamingDatasetError(f"{path}: not UTF-8 text ({e})") from e
            if "".join(lines).strip():
                yield index, "".join(lines).strip()

    def _text_examples(self) -> Iterator[Example]:
        c, s, t = self.context_chars, self.text_stride, self.target_len
        files = []
        for key, _, root in self._text_roots():
            files += [(f"{key}/{p.relative_to(root).as_posix()}", p) for p in _dir_files(root, self.text_globs, "text_dirs")]
        for rel, path in self._shuffled(files, "text"):
            for index, doc in self._documents(path):
                if len(doc) < 2:
                    continue
                doc_id = f"text:{rel}:{index}"
                is_val = self._is_val(doc_id)
                for p in range(min(c, len(doc) - 1), len(doc), s):
                    chunk = doc[p : p + t]
                    target = target_tokens(chunk.encode("utf-8"), p + t >= len(doc), t)
                    yield Example("text", doc_id, doc[max(0, p - c) : p], target, is_val)

    def _code_examples(self) -> Iterator[Example]:
        files = []
        for key, _, root in self._code_roots():
            files += [(f"{key}/{p.relative_to(root).as_posix()}", p) for p in _dir_files(root, self.code_globs, "code_dirs")]
        for rel, path in self._shuffled(files, "code"):
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError:
                log.warning("Skipping %s: not UTF-8", path)
                continue
            doc_id = f"code:{rel}"
            is_val = self._is_val(doc_id)
            for i in range(1, len(lines)):
                if not lines[i].strip():
                    continue
                context = "\n".join(lines[max(0, i - self.context_lines) : i])
                target = target_tokens(lines[i].encode("utf-8"), True, self.target_len)
                yield Example("code", doc_id, context, target, is_val)

    # ------------------------------------------------------------------------------- encoding
    def render(self, example: Example) -> np.ndarray:
        """The context image, uint8 [H, W]."""
        if isinstance(example.context, str):
            return render_text(example.context, self.image_size, self.font_size, keep="end")
        if len(example.context) == 1 and not self.arc_demos:
            return render_grid(example.context[0][0], self.image_size)
        return render_grid_panel(example.context, self.image_size)

    def encode(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        n, (h, w) = len(examples), self.image_size
        images = np.zeros((n, 1, h, w), dtype=np.uint8)
        target = torch.full((n, self.target_len), IGNORE_INDEX, dtype=torch.long)
        for i, ex in enumerate(examples):
            images[i, 0] = self.render(ex)
            target[i, : len(ex.target)] = torch.tensor(ex.target, dtype=torch.long)
        out: dict[str, torch.Tensor] = {}
        if self.pre_encoded:
            out["capsules"] = self._pre_encode(torch.from_numpy(images))
        else:
            out["images"] = torch.from_numpy(images)
        out["target"] = target
        out["source"] = torch.tensor([SOURCE_IDS[ex.source] for ex in examples], dtype=torch.long)
        out["is_val"] = torch.tensor([ex.is_val for ex in examples], dtype=torch.bool)
        out["task_index"] = torch.tensor([ex.task_index for ex in examples], dtype=torch.long)
        out["test_index"] = torch.tensor([ex.test_index for ex in examples], dtype=torch.long)
        return out

    def _load_encoder(self) -> torch.nn.Module:
        assert self.encoder_factory is not None and self.encoder_checkpoint is not None
        factory = _import_callable(self.encoder_factory) if isinstance(self.encoder_factory, str) else self.encoder_factory
        module = factory(**self.encoder_kwargs)
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"encoder_factory returned {type(module).__name__}, not a torch.nn.Module")
        path = self.encoder_checkpoint
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # any failure means the checkpoint is unusable
            raise StreamingDatasetError(f"encoder checkpoint {path} could not be loaded ({type(e).__name__}: {e})") from e
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]  # a trainer checkpoint (latest.pt / best.pt)
        if not isinstance(state, dict):
            raise StreamingDatasetError(f"encoder checkpoint {path} holds {type(state).__name__}, not a state dict")
        if self.encoder_state_prefix:
            prefix = self.encoder_state_prefix
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if not state:
                raise StreamingDatasetError(f"encoder checkpoint {path} has no keys starting with {prefix!r}")
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise StreamingDatasetError(f"encoder checkpoint {path} does not fit the encoder: {e}") from e
        module.eval().requires_grad_(False)
        return module.to(self.encoder_device)

    @torch.inference_mode()
    def _pre_encode(self, images: torch.Tensor) -> torch.Tensor:
        if self._encoder is None:
            self._encoder = self._load_encoder()
        outs = []
        for start in range(0, len(images), self.encoder_batch_size):
            x = images[start : start + self.encoder_batch_size].to(self.encoder_device, torch.float32) / 255.0
            y = self._encoder(x)
            if not isinstance(y, torch.Tensor) or y.dim() != 3 or y.shape[0] != x.shape[0]:
                got = list(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise StreamingDatasetError(f"the encoder must map [B, 1, H, W] to [B, num_capsules, D], got {got}")
            outs.append(y.to("cpu", torch.float16))
        return torch.cat(outs)

    # --------------------------------------------------------------------------------- stats
    def example_stats(self, examples: list[Example]) -> dict[str, int]:
        stats: dict[str, int] = {}
        for ex in examples:
            key = f"{ex.source}_{'val' if ex.is_val else 'train'}"
            stats[key] = stats.get(key, 0) + 1
            if EOS_TOKEN not in ex.target:
                stats[f"{ex.source}_truncated"] = stats.get(f"{ex.source}_truncated", 0) + 1
        return stats

    def consolidated_info(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        return {"val_rows": int(tensors["is_val"].sum())}


# ------------------------------------------------------------------------------------------- CLI
def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dataset.streaming", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build (or resume) a vision_unified dataset")
    build.add_argument("--config-json", required=True, help="VisionUnifiedBuilder keyword arguments as JSON (with 'root')")
    build.add_argument("--rebuild", action="store_true", help="delete the directory's contents first")
    build.add_argument("--throttle-s", type=float, default=None, help="sleep after each batch file (testing)")
    status = sub.add_parser("status", help="print a dataset directory's progress")
    status.add_argument("root")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.command == "status":
        manifest = read_manifest(args.root)
        if manifest is None:
            print(f"{args.root}: no manifest")
            return 1
        rows = sum(c["rows"] for c in manifest["consolidated"])
        print(json.dumps({
            "complete": manifest["complete"], "batches_written": manifest["batches_written"],
            "examples_written": manifest["examples_written"], "consolidated_files": len(manifest["consolidated"]),
            "consolidated_rows": rows, "builder_alive": builder_alive(args.root), "stats": manifest.get("stats"),
        }, indent=1))
        return 0

    kwargs = json.loads(args.config_json)
    if args.throttle_s is not None:
        kwargs["throttle_s"] = args.throttle_s
    root = kwargs.pop("root")
    log.info("Dataset builder pid %d for %s", os.getpid(), root)
    try:
        VisionUnifiedBuilder(root, **kwargs).build(rebuild=args.rebuild)
    except BuilderBusyError as e:
        log.info("%s: nothing to do", e)
        return 0
    except BuildInterrupted as e:
        log.warning("%s; run it again to resume", e)
        return e.exit_code
    return 0


if __name__ == "__main__":
    # Run the copy imported under its real name, so class paths in the manifest ("builder") and logger
    # names are dataset.streaming.*, the same as when the trainer builds in-process.
    from dataset.streaming import _main as main

    sys.exit(main())
