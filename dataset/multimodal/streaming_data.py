"""Trainer-side data module of the streaming vision_unified dataset (``data=multimodal/vision_unified``).

Build or wait (``prepare_data``, called by train.py before it execs pretrain.py, and again by the
trainer):

* complete dataset (manifest says so) -> nothing to do;
* no builder alive (the ``.builder.lock`` flock is free) -> start one in the background,
  ``python -m dataset.streaming build --config-json ...`` in a session of its own (it outlives train.py's
  ``os.execv`` and a Ctrl+C of the training), output appended to ``<dir>/builder.log``; a restarted
  builder resumes where the last one stopped;
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

Incremental pickup (``refresh(epoch, sync)``, called by the trainer at the start of every epoch):
the number of consolidated files the epoch trains on is fixed at its start (rank 0's count, via
``sync``) and recorded in ``state_dict()``, which the trainer checkpoints. A run resumed inside epoch e
uses exactly the count recorded for e, so the sampler's permutation is over the same rows and the
resume is exact; a new epoch takes in whatever the builder has finished since.

Batches (``collate_fn = collate_tensor_dicts``): ``images`` uint8 [B, 1, H, W] (0..255; the model
scales them) or ``capsules`` float16 [B, num_capsules, D] when pre-encoded, ``target`` int64
[B, target_len] (byte b -> b + 2, EOS 1, -100 after it), ``source`` int64 [B] (0 arc, 1 text, 2 code),
``task_index`` / ``test_index`` int64 [B] (ARC rows: the task in ``arc_tasks.json`` and its test input,
-1 for demonstration pairs and other sources; read by ``dataset.reasoning.arc_evaluator.MultimodalArcEvaluator``,
ignored by the model). ``model_kwargs()`` adds ``arc_tasks_path`` when the dataset has that file.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dataset.tensors import TensorDictDataset, collate_tensor_dicts, describe_tensors
from dataset.streaming import (
    ARC_TASKS_FILE,
    BYTE_OFFSET,
    EOS_TOKEN,
    LOG_FILE,
    PAD_TOKEN,
    REPO_ROOT,
    SOURCE_IDS,
    VOCAB_SIZE,
    BuilderBusyError,
    BuilderLock,
    BuildInterrupted,
    StreamingDatasetError,
    VisionUnifiedBuilder,
    builder_alive,
    builder_pid,
    clear_dataset_dir,
    consolidated_name,
    read_manifest,
)
from utils.signals import EXIT_INTERRUPTED

log = logging.getLogger(__name__)

REBUILD_HINT = "rebuild with `python train.py data=multimodal/vision_unified --rebuild-dataset` (plus your other overrides)"
PRE_ENCODE_KEYS = (
    "encoder_factory",
    "encoder_kwargs",
    "encoder_checkpoint",
    "encoder_state_prefix",
    "encoder_batch_size",
    "encoder_device",
)


def _plain(value: Any) -> Any:
    """OmegaConf containers (Hydra passes them) to plain lists/dicts, recursively."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency of the launcher
        pass
    return value


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return "(no builder.log)"
    return "\n".join(text[-lines:])


class StreamingData:
    """Data module over a ``VisionUnifiedBuilder`` directory ``<data_root>/<name>`` (module docstring)."""

    def __init__(
        self,
        data_root: str = "datasets",
        name: str = "vision_unified",
        arc_dir: str | None = None,
        arc_subsets: Sequence[str] = ("training",),
        arc_max_tasks: int | None = None,
        arc_demos: int = 0,
        text_dirs: Sequence[str] = (),
        text_globs: Sequence[str] = ("*.txt", "*.jsonl"),
        generate_stories: int = 1000,
        stories_per_file: int = 100,
        code_dirs: Sequence[str] = ("models", "utils", "dataset"),
        code_globs: Sequence[str] = ("*.py",),
        snapshot_code: bool = True,
        image_size: Sequence[int] = (64, 128),
        font_size: int = 8,
        context_chars: int = 128,
        text_stride: int = 64,
        context_lines: int = 8,
        target_len: int = 64,
        examples_per_batch: int = 32,
        batches_per_consolidated: int = 100,
        val_every: int = 10,
        val_files: int = 1,
        max_examples: int | None = None,
        seed: int = 0,
        pre_encode: Mapping[str, Any] | None = None,
        throttle_s: float = 0.0,
        poll_s: float = 1.0,
        log_every_s: float = 5.0,
        wait_timeout_s: float | None = None,
    ) -> None:
        if not name or "/" in str(name) or str(name).startswith("."):
            raise ValueError(f"data.name must be a plain directory name, got {name!r}")
        if isinstance(val_files, bool) or not isinstance(val_files, int) or val_files < 1:
            raise ValueError(f"data.val_files must be an integer >= 1, got {val_files!r}")
        # data_root is relative to the working directory like every other dataset's; made absolute here
        # so the background builder (started in the repository root) writes to the same place.
        self.root = (Path(data_root).expanduser() / str(name)).resolve()
        self.val_files = val_files
        self.poll_s = float(poll_s)
        self.log_every_s = float(log_every_s)
        self.wait_timeout_s = wait_timeout_s
        pre = _plain(pre_encode)
        if pre is not None:
            if not isinstance(pre, dict):
                raise TypeError(f"data.pre_encode must be null or a mapping, got {pre!r}")
            unknown = sorted(set(pre) - set(PRE_ENCODE_KEYS))
            if unknown:
                raise ValueError(f"data.pre_encode: unknown keys {unknown}; accepted: {', '.join(PRE_ENCODE_KEYS)}")
            if not isinstance(pre.get("encoder_factory"), str):
                raise ValueError("data.pre_encode.encoder_factory must be a dotted path, e.g. models.multimodal.multimodal_trm.CapsuleEncoder")
        # Everything the background builder needs, JSON-able (it gets it on its command line).
        self.builder_kwargs: dict[str, Any] = {
            "arc_dir": str(arc_dir) if arc_dir else None,
            "arc_subsets": list(_plain(arc_subsets) or []),
            "arc_max_tasks": arc_max_tasks,
            "arc_demos": arc_demos,
            "text_dirs": [str(p) for p in _plain(text_dirs) or []],
            "text_globs": list(_plain(text_globs) or []),
            "generate_stories": generate_stories,
            "stories_per_file": stories_per_file,
            "code_dirs": [str(p) for p in _plain(code_dirs) or []],
            "code_globs": list(_plain(code_globs) or []),
            "snapshot_code": snapshot_code,
            "image_size": [int(s) for s in _plain(image_size)],
            "font_size": font_size,
            "context_chars": context_chars,
            "text_stride": text_stride,
            "context_lines": context_lines,
            "target_len": target_len,
            "val_every": val_every,
            "seed": seed,
            "examples_per_batch": examples_per_batch,
            "batches_per_consolidated": batches_per_consolidated,
            "max_examples": max_examples,
            "throttle_s": throttle_s,
            **(pre or {}),
        }
        self.builder = VisionUnifiedBuilder(self.root, **self.builder_kwargs)  # validates every value
        self.train_dataset: TensorDictDataset | None = None
        self.val_dataset: TensorDictDataset | None = None
        self.collate_fn = collate_tensor_dicts
        self._manifest: dict[str, Any] | None = None
        self._train: dict[str, torch.Tensor] | None = None
        self._train_offsets: list[int] = [0]  # cumulative train rows per loaded consolidated file
        self._state: dict[str, Any] | None = None  # {"epoch", "num_consolidated", "params_hash"}
        self._warned_stalled_epoch: int | None = None
        self._builder_proc: subprocess.Popen | None = None

    # ------------------------------------------------------------------------------- paths
    @property
    def log_path(self) -> Path:
        return self.root / LOG_FILE

    @property
    def pre_encoded(self) -> bool:
        return self.builder.pre_encoded

    @property
    def data_key(self) -> str:
        return "capsules" if self.pre_encoded else "images"

    # ------------------------------------------------------------------------- build or wait
    def prepare_data(self, rebuild: bool = False, incremental: bool = True) -> None:
        """Make sure training can start (module docstring); builds in the background when needed."""
        self.root.mkdir(parents=True, exist_ok=True)
        if rebuild:
            self._clear_for_rebuild()
        manifest = read_manifest(self.root)
        self.builder.check_params(manifest)
        if manifest is not None and manifest["complete"]:
            log.info("Dataset %s is complete: %s", self.root, self._describe(manifest))
            return
        if not incremental:
            if builder_alive(self.root):
                log.info("A dataset builder (pid %s) is running on %s: waiting for the complete dataset", builder_pid(self.root), self.root)
                self._wait(lambda m: bool(m["complete"]), "the dataset was complete")
            else:
                self._build_here()
            return
        if not builder_alive(self.root):
            self._spawn_builder()
        if manifest is not None and self._ready(manifest):
            log.info("Dataset %s: %s; the builder goes on in the background", self.root, self._describe(manifest))
            return
        manifest = self._wait(self._ready, f"{consolidated_name(self.val_files - 1)} was written")
        log.info("Dataset %s: %s; training can start, the builder goes on in the background", self.root, self._describe(manifest))

    def _ready(self, manifest: Mapping[str, Any]) -> bool:
        return bool(manifest["complete"]) or len(manifest["consolidated"]) >= self.val_files

    @staticmethod
    def _describe(manifest: Mapping[str, Any]) -> str:
        rows = sum(int(c["rows"]) for c in manifest["consolidated"])
        return (
            f"{len(manifest['consolidated'])} consolidated files ({rows} rows), "
            f"{manifest['batches_written']} batch files written, complete={manifest['complete']}"
        )

    def _clear_for_rebuild(self) -> None:
        lock = BuilderLock(self.root)
        if not lock.acquire():
            pid = builder_pid(self.root)
            raise RuntimeError(
                f"cannot rebuild {self.root}: a dataset builder (pid {pid}) is still running on it; "
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
        builder_log = logging.getLogger("dataset.streaming")
        builder_log.addHandler(handler)
        log.info("Building %s in this process (log also in %s)", self.root, self.log_path)
        try:
            self.builder.build()
        except BuilderBusyError:  # someone started a builder since we looked: wait for it instead
            self._wait(lambda m: bool(m["complete"]), "the dataset was complete")
        except BuildInterrupted as e:
            log.warning("%s after a complete file; run the same command again to resume the build", e)
            raise SystemExit(EXIT_INTERRUPTED) from None
        finally:
            builder_log.removeHandler(handler)
            handler.close()

    def builder_command(self) -> list[str]:
        config = {"root": str(self.root), **self.builder_kwargs}
        return [sys.executable, "-m", "dataset.streaming", "build", "--config-json", json.dumps(config)]

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
        deadline = time.monotonic() + 300  # its imports (torch) take seconds on a loaded machine
        while not builder_alive(self.root):
            code = proc.poll()
            if code is not None:
                if code == 0:
                    return  # it found the dataset complete, or another builder took over
                raise RuntimeError(
                    f"the dataset builder exited with code {code} before it started building; see {self.log_path}:\n"
                    f"{_tail(self.log_path)}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"the dataset builder (pid {proc.pid}) did not start within 300 s; see {self.log_path}")
            time.sleep(0.05)

    def _wait(self, ready: Callable[[Mapping[str, Any]], bool], what: str) -> dict[str, Any]:
        start = last_log = time.monotonic()
        while True:
            manifest = read_manifest(self.root)
            if manifest is not None and ready(manifest):
                return manifest
            if not builder_alive(self.root):
                manifest = read_manifest(self.root)  # it may have written the file just before exiting
                if manifest is not None and ready(manifest):
                    return manifest
                raise RuntimeError(
                    f"dataset builder died before {what} in {self.root}; see {self.log_path}; rerun to resume it. "
                    f"Last lines of the log:\n{_tail(self.log_path)}"
                )
            now = time.monotonic()
            if now - last_log >= self.log_every_s:
                done = manifest["batches_written"] if manifest else 0
                files = len(manifest["consolidated"]) if manifest else 0
                log.info(
                    "Waiting until %s: %d batch files written so far, %d consolidated (builder pid %s, log %s)",
                    what, done, files, builder_pid(self.root), self.log_path,
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
                f"no consolidated files in {self.root} yet; build with `python train.py data=multimodal/vision_unified "
                "--dataset-only`, or let training start the builder (it waits for the first file)"
            )
        self.builder.check_params(manifest)
        self._manifest = manifest
        spec = manifest.get("row_spec") or {}
        expected = {self.data_key, "target", "source", "is_val", "task_index", "test_index"}
        if set(spec) != expected:
            raise StreamingDatasetError(f"{self.root / 'manifest.json'} describes rows {sorted(spec)}, expected {sorted(expected)}; {REBUILD_HINT}")
        available = len(manifest["consolidated"])
        first = {k: self._load_file(k) for k in range(min(self.val_files, available))}
        val_parts = [{n: t[d["is_val"]] for n, t in d.items() if n != "is_val"} for d in first.values()]
        val = {n: torch.cat([p[n] for p in val_parts]) for n in val_parts[0]}
        if len(val["target"]) == 0:
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
            raise StreamingDatasetError(f"{self.root / consolidated_name(index)} is not in the manifest; {REBUILD_HINT}")
        entry = entries[index]
        path = self.root / entry["file"]
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # whatever the reason, the file is unusable
            first_line = (str(e).strip().splitlines() or [""])[0]
            raise StreamingDatasetError(f"{path} could not be loaded ({type(e).__name__}: {first_line}); {REBUILD_HINT}") from e
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
            raise StreamingDatasetError(f"{path} is malformed: {'; '.join(problems)} (contents {contents}); {REBUILD_HINT}")
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
                part = {n: t[~data["is_val"]] for n, t in data.items() if n != "is_val"}
                parts.append(part)
                self._train_offsets.append(self._train_offsets[-1] + len(part["target"]))
            self._train = {n: torch.cat([p[n] for p in parts]) for n in parts[0]}
        self.train_dataset = TensorDictDataset(self._train)
        return True

    # ----------------------------------------------------------------- incremental, resumable
    def num_available(self) -> int:
        """Consolidated files listed in the manifest right now."""
        manifest = read_manifest(self.root)
        return len(manifest["consolidated"]) if manifest else 0

    def refresh(self, epoch: int, sync: Callable[[int], int] = lambda n: n) -> bool:
        """Fix the files epoch ``epoch`` trains on (module docstring); True when the train set changed."""
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
        if not builder_alive(self.root):
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
                f"the checkpoint was trained on a vision_unified dataset with other parameters than {self.root} "
                "(data config changed?); restore the config or start over with --fresh"
            )
        self._state = {"epoch": int(state["epoch"]), "num_consolidated": int(state["num_consolidated"]), "params_hash": expected}

    # ---------------------------------------------------------------------------- model facts
    def model_kwargs(self) -> dict[str, Any]:
        """Facts the model (and evaluators) may take as constructor arguments."""
        b = self.builder
        facts: dict[str, Any] = {
            "vocab_size": VOCAB_SIZE,
            "target_len": b.target_len,
            "image_size": list(b.image_size),
            "in_channels": 1,
            "sources": b.source_names,
            "num_sources": len(SOURCE_IDS),
            "pad_token_id": PAD_TOKEN,
            "eos_token_id": EOS_TOKEN,
            "byte_offset": BYTE_OFFSET,
        }
        if self.pre_encoded:
            manifest = self._manifest or read_manifest(self.root)
            spec = (manifest or {}).get("row_spec") or {}
            if "capsules" not in spec:
                raise StreamingDatasetError(f"{self.root} has no pre-encoded rows yet: run prepare_data() first")
            facts["num_capsules"], facts["capsule_dim"] = spec["capsules"]["shape"]
        arc_tasks = self.root / ARC_TASKS_FILE
        if arc_tasks.is_file():  # the ARC scorer's task list (written before the first batch)
            facts["arc_tasks_path"] = str(arc_tasks)
        return facts
