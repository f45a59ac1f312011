"""The streaming shard builder: shards written while training already reads the first ones.

A builder walks its examples in a fixed, deterministic order and writes them to ``<data_root>/<name>/``
as batch files, merged into consolidated files, with a manifest (layout in ``dataset.streaming.manifest``).

Crash safety and resume (SIGKILL at any instant): the manifest only ever records files that are fully
on disk, and files are only deleted after the manifest no longer needs them. A restarted builder
removes stray ``*.tmp`` files, batch files outside ``[consolidated batches, batches_written)`` and
consolidated files the manifest does not list, skips ``examples_written`` examples of its
(deterministic) iteration and continues; the result is identical to an uninterrupted build.
SIGTERM / SIGINT let the current file and manifest update finish, then the builder stops
(``BuildInterrupted``; the CLI exits 0 for SIGTERM, 130 for SIGINT; a second SIGINT aborts at once,
which is still safe).

A dataset directory whose manifest ``params_hash`` differs from the config is refused with a message
telling to use ``--rebuild-dataset``; so is resuming an incomplete build whose source files changed.
The params include ``format`` (the builder's ``FORMAT_VERSION``), so a directory written by an older
format is refused the same way ("differing: format").
"""

from __future__ import annotations

import abc
import itertools
import logging
import shutil
import signal
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch

from dataset.base import DatasetBuilder, require_int
from dataset.errors import REBUILD_HINT, load_tensor_file
from dataset.streaming.manifest import (
    BATCH_RE,
    CONSOLIDATED_RE,
    LOCK_FILE,
    LOG_FILE,
    MANIFEST_FILE,
    TEMP_SUFFIX,
    DatasetMismatchError,
    StreamingDatasetError,
    batch_name,
    consolidated_batches,
    consolidated_name,
    read_manifest,
    write_json,
    write_shard,
)
from utils.config.errors import ConfigError
from utils.signals import GracefulShutdown
from utils.storage.atomic import fsync_dir

log = logging.getLogger(__name__)

# How long `build` tries for the lock: a liveness probe holds it for microseconds, a builder for good.
LOCK_TIMEOUT_S = 2.0


class BuilderBusyError(RuntimeError):
    """Another process holds the builder lock of this directory."""


class BuildInterrupted(Exception):
    """SIGTERM / SIGINT stopped the build after a complete file; running it again resumes."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.exit_code = 130 if signum == signal.SIGINT else 0
        super().__init__(f"dataset build stopped by {signal.Signals(signum).name}")


def clear_dataset_dir(root: Path) -> None:
    """Delete everything in ``root`` except the lock file (the caller holds the lock)."""
    for path in root.iterdir():
        if path.name == LOCK_FILE:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    fsync_dir(root)


def row_spec(tensors: Any, n: int, where: str) -> dict[str, dict[str, Any]]:
    """The per-row layout (dtype, shape without the row dimension) of a batch, checked to hold ``n`` rows."""
    if not isinstance(tensors, dict) or not tensors or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise TypeError(f"{where} must return a non-empty dict of tensors, got {type(tensors).__name__}")
    bad = {k: list(v.shape) for k, v in tensors.items() if v.dim() == 0 or v.shape[0] != n}
    if bad:
        raise ValueError(f"{where}: every tensor needs {n} rows (one per example), got shapes {bad}")
    return {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape[1:])} for k, v in sorted(tensors.items())}


class StreamingDatasetBuilder(DatasetBuilder):
    """Writes batch / consolidated shards and a manifest; resumable after any kill (module docstring).

    Subclasses implement :meth:`iter_examples` (a deterministic order: resume relies on it) and
    :meth:`encode` (a list of examples to a dict of tensors with one row per example), set
    ``FORMAT_VERSION`` and extend :meth:`params` with everything that defines the content. Optional
    hooks: :meth:`prepare_sources` (runs under the lock before iterating), :meth:`write_metadata`,
    :meth:`source_fingerprint`, :meth:`example_stats`, :meth:`consolidated_info`.
    """

    # Stored in the manifest and hashed with the params: bump it when the content for the same params changes.
    FORMAT_VERSION: ClassVar[int] = 1
    # The builder's name in the manifest, hashed with the params (None: the class's module.qualname). A
    # builder that moves to another module pins its old name here, or every dataset it built is refused.
    BUILDER_ID: ClassVar[str | None] = None

    def __init__(
        self,
        root: Path | str,
        examples_per_batch: int = 32,
        batches_per_consolidated: int = 100,
        max_examples: int | None = None,
        throttle_s: float = 0.0,
        fault_pause_s: float = 0.0,
    ) -> None:
        require_int("data.examples_per_batch", examples_per_batch, 1)
        require_int("data.batches_per_consolidated", batches_per_consolidated, 1)
        if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1):
            raise ConfigError(f"data.max_examples must be null or an integer >= 1, got {max_examples!r}")
        super().__init__(root)
        self.examples_per_batch = examples_per_batch
        self.batches_per_consolidated = batches_per_consolidated
        self.max_examples = max_examples
        self.throttle_s = float(throttle_s)  # testing/debugging: sleep after each batch file
        self.fault_pause_s = float(fault_pause_s)  # testing: pause inside each shard write (see write_shard)

    # ------------------------------------------------------------------------------ interface
    @abc.abstractmethod
    def iter_examples(self) -> Iterator[Any]:
        """Every example, always in the same order."""

    @abc.abstractmethod
    def encode(self, examples: list[Any]) -> dict[str, torch.Tensor]:
        """One batch: a dict of tensors whose first dimension is ``len(examples)``."""

    @classmethod
    def builder_id(cls) -> str:
        return cls.BUILDER_ID or f"{cls.__module__}.{cls.__qualname__}"

    def params(self) -> dict[str, Any]:
        """JSON-able parameters that define the dataset's content (hashed into the manifest)."""
        return {
            "format": self.FORMAT_VERSION,
            "builder": self.builder_id(),
            "examples_per_batch": self.examples_per_batch,
            "batches_per_consolidated": self.batches_per_consolidated,
            "max_examples": self.max_examples,
        }

    def prepare_sources(self, fresh: bool) -> None:
        """Create generated or snapshotted sources (under the lock, before fingerprinting and iterating).

        ``fresh`` is True when the build starts from nothing (no manifest), False when it resumes.
        """

    def write_metadata(self) -> None:
        """Write side files describing the content (under the lock, after the source check, before the
        first batch; again on every resume, so they must be deterministic). Written with ``write_json``."""

    def source_fingerprint(self) -> dict[str, Any]:
        """A JSON-able digest of the source files; a resumed incomplete build requires it unchanged."""
        return {}

    def example_stats(self, examples: list[Any]) -> dict[str, int]:
        """Counts to add to the manifest's ``stats`` for one batch."""
        return {}

    def consolidated_info(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Extra fields of a consolidated file's manifest entry."""
        return {}

    # ---------------------------------------------------------------------------------- state
    @property
    def lock_path(self) -> Path:
        return self.root / LOCK_FILE  # inside the root: the directory is never swapped out

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_FILE

    @property
    def log_path(self) -> Path:
        return self.root / LOG_FILE

    def is_complete(self) -> bool:
        manifest = read_manifest(self.root)
        return manifest is not None and bool(manifest["complete"])

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

    def busy_message(self) -> str:
        """Why a second builder cannot start here, naming the running one and its log."""
        return f"another dataset builder ({self.holder() or 'unknown pid'}) is running on {self.root}; its log is {self.log_path}"

    # -------------------------------------------------------------------------------- building
    def build(self, rebuild: bool = False, stop_after_batches: int | None = None) -> dict[str, Any]:
        """Build (or resume) the dataset; return the final manifest.

        ``stop_after_batches`` stops, incomplete, once that many batch files exist (a later call
        resumes). Raises BuilderBusyError if another builder holds the lock, BuildInterrupted after a
        SIGTERM/SIGINT (the directory is consistent and resumable).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        lock = self.lock()
        if not lock.acquire(timeout=LOCK_TIMEOUT_S):
            raise BuilderBusyError(self.busy_message())
        try:
            stop = GracefulShutdown(signals=(signal.SIGTERM, signal.SIGINT), action="finishing the current file, then stopping")
            with stop:
                return self._build_locked(rebuild, stop, stop_after_batches)
        finally:
            lock.release()

    def _build_locked(self, rebuild: bool, stop: GracefulShutdown, stop_after_batches: int | None) -> dict[str, Any]:
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
                "format": self.FORMAT_VERSION,
                "builder": self.builder_id(),
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
        write_json(self.manifest_path, manifest)
        self.write_metadata()

        def check_signal() -> None:  # after every completed file (and manifest update)
            if stop.signum is not None:
                raise BuildInterrupted(stop.signum)

        def reached_stop() -> bool:
            return stop_after_batches is not None and manifest["batches_written"] >= stop_after_batches

        def group_ready() -> bool:  # a full group of batch files waits to be consolidated
            return consolidated_batches(manifest) + self.batches_per_consolidated <= manifest["batches_written"]

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
        while group_ready():
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
            if group_ready():
                self._consolidate(manifest)
                check_signal()
            if reached_stop():
                return manifest
            if self.throttle_s > 0:
                time.sleep(self.throttle_s)
        if pending:
            self._write_batch(manifest, pending)
            check_signal()
        while consolidated_batches(manifest) < manifest["batches_written"]:  # the final, partial group
            self._consolidate(manifest)
            check_signal()
        if manifest["batches_written"] == 0:
            raise StreamingDatasetError(f"the sources of {self.root} yielded no examples; check the data config")
        manifest["complete"] = True
        write_json(self.manifest_path, manifest)
        rows = sum(c["rows"] for c in manifest["consolidated"])
        log.info(
            "Dataset %s complete: %d rows in %d consolidated files (%.1fs this session)",
            self.root, rows, len(manifest["consolidated"]), time.monotonic() - start,
        )
        return manifest

    def _remove_strays(self, manifest: Mapping[str, Any]) -> None:
        """Delete what a killed builder left that the manifest does not vouch for; check what it does."""
        first, end = consolidated_batches(manifest), int(manifest["batches_written"])
        listed = {c["file"] for c in manifest["consolidated"]}
        for path in sorted(self.root.iterdir()):
            name = path.name
            stray = name.endswith(TEMP_SUFFIX)
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
        spec = row_spec(tensors, len(examples), f"{type(self).__name__}.encode (batch {index})")
        if manifest["row_spec"] is None:
            manifest["row_spec"] = spec
        elif spec != manifest["row_spec"]:
            raise RuntimeError(  # a bug of the builder, not of the config: keep the traceback
                f"{type(self).__name__}.encode returned {spec} for batch {index}, but earlier batches had "
                f"{manifest['row_spec']}"
            )
        write_shard(self.root / batch_name(index), {k: v.contiguous() for k, v in tensors.items()}, self.fault_pause_s)
        manifest["batches_written"] = index + 1
        manifest["examples_written"] = int(manifest["examples_written"]) + len(examples)
        stats = manifest.setdefault("stats", {})
        for key, value in self.example_stats(examples).items():
            stats[key] = stats.get(key, 0) + int(value)
        write_json(self.manifest_path, manifest)
        if (index + 1) % 50 == 0:
            log.info("%s: %d batch files, %d examples", self.root.name, index + 1, manifest["examples_written"])

    def _consolidate(self, manifest: dict[str, Any]) -> None:
        first = consolidated_batches(manifest)
        count = min(self.batches_per_consolidated, int(manifest["batches_written"]) - first)
        parts = []
        for i in range(first, first + count):
            parts.append(load_tensor_file(self.root / batch_name(i), StreamingDatasetError))
        tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        index = len(manifest["consolidated"])
        name = consolidated_name(index)
        write_shard(self.root / name, tensors, self.fault_pause_s)
        rows = len(next(iter(tensors.values())))
        entry = {"file": name, "rows": rows, "first_batch": first, "num_batches": count, **self.consolidated_info(tensors)}
        manifest["consolidated"].append(entry)
        write_json(self.manifest_path, manifest)
        for i in range(first, first + count):  # only now: the manifest no longer needs them
            (self.root / batch_name(i)).unlink()
        fsync_dir(self.root)
        log.info("%s: wrote %s (%d rows, batches %d..%d)", self.root.name, name, rows, first, first + count - 1)
