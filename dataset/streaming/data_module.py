"""Trainer-side data module of a streaming dataset: build or wait, then take in new shards at epoch starts.

Build or wait (``prepare_data``, called by train.py before it execs pretrain.py, and again by the
trainer):

* complete dataset (manifest says so) -> nothing to do;
* no builder alive (its ``.builder.lock`` flock is free) -> start one in the background,
  ``python -m dataset.streaming build --builder ... --config-json ...`` in a session of its own (it
  outlives train.py's ``os.execv`` and a Ctrl+C of the training), output appended to
  ``<dir>/builder.log``; a restarted builder resumes where the last one stopped;
* then wait: ``incremental=True`` (default) until the first ``val_files`` consolidated files exist,
  ``incremental=False`` (``--no-incremental``, ``--dataset-only``) until the dataset is complete. With
  ``incremental=False`` and no builder alive the build runs in this process (in the foreground: Ctrl+C
  stops it cleanly after the current file, exit 75, and the same command resumes it).
* While waiting, a builder that dies before the needed file exists raises RuntimeError naming
  ``builder.log`` at once (no endless wait); progress is logged every ``log_every_s`` seconds.

Data (``setup``): every consolidated file listed in the manifest is loaded; rows with ``is_val`` go to
validation, the others to training. Validation is the held-out rows of the first ``val_files``
consolidated files only: fixed for the run (and identical across ranks and resumes), so validation
metrics stay comparable while the training set grows. Held-out rows of later files are not used
(neither for training nor for validation).

Incremental pickup (a ``Callback``: ``on_train_epoch_start``, or ``refresh(epoch, sync)`` directly):
the number of consolidated files an epoch trains on is fixed at its start (rank 0's count, broadcast
to every rank) and recorded in ``state_dict()``, which the trainer checkpoints. A run resumed inside
epoch e uses exactly the count recorded for e, so the sampler's permutation is over the same rows and
the resume is exact; a new epoch takes in whatever the builder has finished since.

A family subclasses ``StreamingDataModule`` with its builder and its ``model_kwargs``.
"""

from __future__ import annotations

import abc
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dataset.base import require_int
from dataset.errors import load_tensor_file
from dataset.streaming.manifest import (
    MANIFEST_FILE,
    StreamingDatasetError,
    consolidated_name,
    describe,
    read_manifest,
)
from dataset.streaming.shards import BuilderBusyError, BuildInterrupted, StreamingDatasetBuilder, clear_dataset_dir
from dataset.tensors import TensorDictDataset, collate_tensor_dicts, describe_tensors
from utils.distributed import broadcast_from_rank0
from utils.signals import EXIT_INTERRUPTED
from utils.training.callbacks import Callback

if TYPE_CHECKING:
    from utils.training.trainer import Trainer

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILDER_START_TIMEOUT_S = 300  # the builder's imports (torch) take seconds on a loaded machine
VAL_KEY = "is_val"  # the bool column that marks held-out rows


def tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file, for error messages."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return f"(no {path.name})"
    return "\n".join(text[-lines:])


class StreamingDataModule(Callback, abc.ABC):
    """Data module over a streaming builder's directory (module docstring).

    ``builder_kwargs`` are the builder's keyword arguments (JSON-able: the background builder gets them
    on its command line); ``row_keys`` the columns every row must have besides ``is_val``;
    ``data_config`` the config option that selects this data (``multimodal/vision_unified``), for messages.
    """

    def __init__(
        self,
        builder: StreamingDatasetBuilder,
        builder_kwargs: Mapping[str, Any],
        row_keys: set[str],
        val_files: int = 1,
        poll_s: float = 1.0,
        log_every_s: float = 5.0,
        wait_timeout_s: float | None = None,
        data_config: str = "<this data config>",
    ) -> None:
        self.val_files = require_int("data.val_files", val_files, 1)
        self.builder = builder
        self.builder_kwargs = dict(builder_kwargs)
        self.row_keys = set(row_keys)
        self.poll_s = float(poll_s)
        self.log_every_s = float(log_every_s)
        self.wait_timeout_s = wait_timeout_s
        self.data_config = data_config
        self.rebuild_hint = f"rebuild with `python train.py data={data_config} --rebuild-dataset` (plus your other overrides)"
        self.train_dataset: TensorDictDataset | None = None
        self.val_dataset: TensorDictDataset | None = None
        self.collate_fn = collate_tensor_dicts
        self._manifest: dict[str, Any] | None = None
        self._train: dict[str, torch.Tensor] | None = None
        self._train_offsets: list[int] = [0]  # cumulative train rows per loaded consolidated file
        self._state: dict[str, Any] | None = None  # {"epoch", "num_consolidated", "params_hash"}
        self._warned_stalled_epoch: int | None = None
        self._builder_proc: subprocess.Popen | None = None

    @abc.abstractmethod
    def model_kwargs(self) -> dict[str, Any]:
        """Facts the model (and evaluators) may take as constructor arguments."""

    @property
    def root(self) -> Path:
        return self.builder.root

    @property
    def log_path(self) -> Path:
        return self.builder.log_path

    # ------------------------------------------------------------------------- build or wait
    def prepare_data(self, rebuild: bool = False, incremental: bool = True) -> None:
        """Make sure training can start (module docstring); builds in the background when needed."""
        self.root.mkdir(parents=True, exist_ok=True)
        if rebuild:
            self._clear_for_rebuild()
        manifest = read_manifest(self.root)
        self.builder.check_params(manifest)
        if manifest is not None and manifest["complete"]:
            # Only a check (train.py, then the trainer twice): the build itself logged the dataset.
            log.debug("Dataset %s is complete: %s", self.root, describe(manifest))
            return
        if not incremental:
            if self.builder.is_building():
                log.info("A dataset builder (%s) is running on %s: waiting for the complete dataset", self.builder.holder(), self.root)
                self._wait(lambda m: bool(m["complete"]), "the dataset was complete")
            else:
                self._build_here()
            built = read_manifest(self.root)
            if built is not None:
                log.info("Dataset %s: %s", self.root, describe(built))
            return
        if not self.builder.is_building():
            self._spawn_builder()
        if manifest is not None and self._ready(manifest):
            log.debug("Dataset %s: %s; the builder goes on in the background", self.root, describe(manifest))
            return
        manifest = self._wait(self._ready, f"{consolidated_name(self.val_files - 1)} was written")
        log.info("Dataset %s: %s; training can start, the builder goes on in the background", self.root, describe(manifest))

    def _ready(self, manifest: Mapping[str, Any]) -> bool:
        return bool(manifest["complete"]) or len(manifest["consolidated"]) >= self.val_files

    def _clear_for_rebuild(self) -> None:
        lock = self.builder.lock()
        if not lock.acquire(timeout=2.0):  # a liveness probe holds it for microseconds
            holder = self.builder.holder()
            pid = holder.pid if holder else "<pid>"
            raise RuntimeError(
                f"cannot rebuild {self.root}: a dataset builder ({holder or 'unknown pid'}) is still running on it; "
                f"stop it first (`kill {pid}` stops it cleanly after its current file), then rerun"
            )
        try:
            log.info("--rebuild-dataset: deleting the contents of %s", self.root)
            clear_dataset_dir(self.root)
        finally:
            lock.release()

    def _build_here(self) -> None:
        """The whole build in this process (foreground), its log also appended to builder.log."""
        handler = logging.FileHandler(self.log_path, mode="a", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        # The framework's loggers (dataset.streaming.*) and the builder's own module.
        loggers = {logging.getLogger("dataset.streaming"), logging.getLogger(type(self.builder).__module__)}
        for logger in loggers:
            logger.addHandler(handler)
        log.info("Building %s in this process (log also in %s)", self.root, self.log_path)
        try:
            self.builder.build()
        except BuilderBusyError:  # someone started a builder since we looked: wait for it instead
            self._wait(lambda m: bool(m["complete"]), "the dataset was complete")
        except BuildInterrupted as e:
            log.warning("%s after a complete file; run the same command again to resume the build", e)
            raise SystemExit(EXIT_INTERRUPTED) from None
        finally:
            for logger in loggers:
                logger.removeHandler(handler)
            handler.close()

    def builder_command(self) -> list[str]:
        """The command line of the background builder (``python -m dataset.streaming build``)."""
        builder_class = type(self.builder)
        config = {"root": str(self.root), **self.builder_kwargs}
        return [
            sys.executable, "-m", "dataset.streaming", "build",
            "--builder", f"{builder_class.__module__}.{builder_class.__qualname__}",
            "--config-json", json.dumps(config),
        ]

    def _died_message(self, what: str, code: int | None = None) -> str:
        """One message for a builder that is gone before ``what``: names its log, says to rerun."""
        how = f" (exit code {code})" if code is not None else ""
        return (
            f"dataset builder died before {what} in {self.root}{how}; see {self.log_path}; rerun to resume it. "
            f"Last lines of the log:\n{tail(self.log_path)}"
        )

    def _spawn_builder(self) -> None:
        cmd = self.builder_command()
        with open(self.log_path, "ab") as out:
            out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')}: builder started by pid {os.getpid()}\n".encode())
            out.flush()
            # A session of its own: the build goes on when the trainer is stopped with Ctrl+C, and
            # it survives train.py's os.execv (it is a separate process, not a thread).
            proc = subprocess.Popen(
                cmd,
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self._builder_proc = proc  # kept so it is reaped, not reported as a leaked process
        log.info("Started the dataset builder for %s in the background: pid %d, log %s", self.root, proc.pid, self.log_path)
        deadline = time.monotonic() + BUILDER_START_TIMEOUT_S
        while not self.builder.is_building():
            code = proc.poll()
            if code is not None:
                if code == 0:
                    return  # it found the dataset complete, or another builder took over
                raise RuntimeError(self._died_message("it started building", code))
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the dataset builder (pid {proc.pid}) did not start within {BUILDER_START_TIMEOUT_S} s; see {self.log_path}"
                )
            time.sleep(0.05)

    def _wait(self, ready: Callable[[Mapping[str, Any]], bool], what: str) -> dict[str, Any]:
        start = last_log = time.monotonic()
        while True:
            manifest = read_manifest(self.root)
            if manifest is not None and ready(manifest):
                return manifest
            if not self.builder.is_building():
                manifest = read_manifest(self.root)  # it may have written the file just before exiting
                if manifest is not None and ready(manifest):
                    return manifest
                raise RuntimeError(self._died_message(what))
            now = time.monotonic()
            if now - last_log >= self.log_every_s:
                done = manifest["batches_written"] if manifest else 0
                files = len(manifest["consolidated"]) if manifest else 0
                log.info(
                    "Waiting until %s: %d batch files written so far, %d consolidated (builder %s, log %s)",
                    what, done, files, self.builder.holder(), self.log_path,
                )
                last_log = now
            if self.wait_timeout_s is not None and now - start > self.wait_timeout_s:
                raise TimeoutError(f"waited {self.wait_timeout_s:g}s for {what} in {self.root}; see {self.log_path}")
            time.sleep(self.poll_s)

    # ------------------------------------------------------------------------------- loading
    def setup(self) -> None:
        """Load the consolidated files listed now (training) and the validation rows (fixed for the run)."""
        manifest = read_manifest(self.root)
        if manifest is None or not manifest["consolidated"]:
            raise FileNotFoundError(
                f"no consolidated files in {self.root} yet; build with `python train.py data={self.data_config} "
                "--dataset-only`, or let training start the builder (it waits for the first file)"
            )
        self.builder.check_params(manifest)
        self._manifest = manifest
        spec = manifest.get("row_spec") or {}
        expected = self.row_keys | {VAL_KEY}
        if set(spec) != expected:
            raise StreamingDatasetError(
                f"{self.root / MANIFEST_FILE} describes rows {sorted(spec)}, expected {sorted(expected)}; {self.rebuild_hint}"
            )
        available = len(manifest["consolidated"])
        first = {k: self._load_file(k) for k in range(min(self.val_files, available))}
        val_parts = [{n: t[d[VAL_KEY]] for n, t in d.items() if n != VAL_KEY} for d in first.values()]
        val = {n: torch.cat([p[n] for p in val_parts]) for n in val_parts[0]}
        if len(next(iter(val.values()))) == 0:
            raise StreamingDatasetError(
                f"the first {len(first)} consolidated file(s) of {self.root} hold no validation rows; "
                "lower data.val_every or raise data.val_files (then --rebuild-dataset if val_every changed)"
            )
        self.val_dataset = TensorDictDataset(val)
        self._train, self._train_offsets = None, [0]
        self._set_train_files(available, preloaded=first)
        log.info(
            "Loaded %s: %d train rows from %d consolidated files, %d validation rows from the first %d",
            self.root, len(self.train_dataset or []), available, len(self.val_dataset), len(first),
        )

    def _load_file(self, index: int) -> dict[str, torch.Tensor]:
        """Consolidated file ``index``, checked against the manifest (keys, dtypes, shapes, rows)."""
        assert self._manifest is not None
        entries = self._manifest["consolidated"]
        if index >= len(entries):  # a newer manifest lists it: re-read
            self._manifest = read_manifest(self.root) or self._manifest
            entries = self._manifest["consolidated"]
        if index >= len(entries):
            raise StreamingDatasetError(f"{self.root / consolidated_name(index)} is not in the manifest; {self.rebuild_hint}")
        entry = entries[index]
        path = self.root / entry["file"]
        data = load_tensor_file(path, StreamingDatasetError, self.rebuild_hint)
        spec = self._manifest["row_spec"]
        problems = []
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            problems.append(f"expected a dict of tensors, got {type(data).__name__}")
        else:
            if set(data) != set(spec):
                problems.append(f"keys {sorted(data)} instead of {sorted(spec)}")
            for key, want in spec.items():
                t = data.get(key)
                if t is None:
                    continue
                if str(t.dtype).removeprefix("torch.") != want["dtype"] or list(t.shape[1:]) != want["shape"]:
                    problems.append(f"{key!r} is {str(t.dtype).removeprefix('torch.')}{list(t.shape)}, expected {want['dtype']}[N, {want['shape']}]")
                elif len(t) != entry["rows"]:
                    problems.append(f"{key!r} has {len(t)} rows, the manifest says {entry['rows']}")
        if problems:
            contents = describe_tensors(data) if isinstance(data, dict) else type(data).__name__
            raise StreamingDatasetError(f"{path} is malformed: {'; '.join(problems)} (contents {contents}); {self.rebuild_hint}")
        return data

    def _set_train_files(self, count: int, preloaded: Mapping[int, dict[str, torch.Tensor]] | None = None) -> bool:
        """Train on the first ``count`` consolidated files; True when that changed the train set."""
        have = len(self._train_offsets) - 1
        if count == have and self._train is not None:
            return False
        if self._train is not None and count < have:
            rows = self._train_offsets[count]
            self._train = {k: v[:rows].clone() for k, v in self._train.items()}
            self._train_offsets = self._train_offsets[: count + 1]
        else:
            parts = [] if self._train is None else [self._train]
            for k in range(have, count):
                data = (preloaded or {}).get(k) or self._load_file(k)
                part = {n: t[~data[VAL_KEY]] for n, t in data.items() if n != VAL_KEY}
                parts.append(part)
                self._train_offsets.append(self._train_offsets[-1] + len(next(iter(part.values()))))
            self._train = {n: torch.cat([p[n] for p in parts]) for n in parts[0]}
        self.train_dataset = TensorDictDataset(self._train)
        return True

    # ----------------------------------------------------------------- incremental, resumable
    def num_available(self) -> int:
        """Consolidated files listed in the manifest right now."""
        manifest = read_manifest(self.root)
        return len(manifest["consolidated"]) if manifest else 0

    def on_train_epoch_start(self, trainer: Trainer) -> None:
        """Fix the files this epoch trains on (rank 0's count on every rank); rebuild the loader if they changed."""
        if self.refresh(trainer.state.epoch, sync=broadcast_from_rank0):
            trainer.reload_train_data()

    def refresh(self, epoch: int, sync: Callable[[int], int] = lambda n: n) -> bool:
        """Fix the files epoch ``epoch`` trains on (module docstring); True when the train set changed.

        ``sync`` turns this rank's count of available files into the count every rank uses.
        """
        if self._state is not None and int(self._state["epoch"]) == epoch:
            count = int(self._state["num_consolidated"])  # resumed inside this epoch: exactly what it used
            available = self.num_available()
            if available < count:
                raise StreamingDatasetError(
                    f"the checkpoint's epoch {epoch} trained on {count} consolidated files of {self.root}, "
                    f"but only {available} exist now (was the dataset rebuilt?); resume needs them, or start over with --fresh"
                )
        else:
            count = int(sync(self.num_available()))
            self._warn_if_stalled(epoch)
        self._state = {"epoch": epoch, "num_consolidated": count, "params_hash": self.builder.params_hash()}
        changed = self._set_train_files(count)
        if changed:
            log.info("Epoch %d trains on %d consolidated files of %s (%d rows)", epoch, count, self.root.name, len(self.train_dataset or []))
        return changed

    def _warn_if_stalled(self, epoch: int) -> None:
        manifest = read_manifest(self.root)
        if manifest is None or manifest["complete"] or self._warned_stalled_epoch is not None:
            return
        if not self.builder.is_building():
            self._warned_stalled_epoch = epoch
            log.warning(
                "The dataset %s is incomplete and no builder is running (see %s); training goes on with the "
                "%d consolidated files there are; rerun to resume the build.",
                self.root, self.log_path, len(manifest["consolidated"]),
            )

    def state_dict(self) -> dict[str, Any]:
        return dict(self._state) if self._state is not None else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        expected = self.builder.params_hash()
        if state.get("params_hash") != expected:
            raise StreamingDatasetError(
                f"the checkpoint was trained on a dataset with other parameters than {self.root} "
                "(data config changed?); restore the config or start over with --fresh"
            )
        self._state = {"epoch": int(state["epoch"]), "num_consolidated": int(state["num_consolidated"]), "params_hash": expected}
