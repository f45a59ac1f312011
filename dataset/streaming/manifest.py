"""What is on disk in a streaming dataset directory, and how it is read and written.

    batch_00000.pt, batch_00001.pt, ...   ``examples_per_batch`` examples each (the last may hold fewer)
    consolidated_000.pt, ...              every ``batches_per_consolidated`` batch files concatenated
                                          (rows in order); those batch files are then deleted. The
                                          final group may hold fewer batches.
    manifest.json                         progress and identity of the build (below)
    builder.log                           the background builder's output
    .builder.lock                         ``flock``-ed by the builder while it runs (utils.storage.locks)
    (plus the side files of a builder, e.g. vision_unified's arc_tasks.json)

Every ``.pt`` file, the manifest and the side files are written as ``<name>.<pid>.tmp`` + fsync +
``os.replace`` + fsync of the directory, so a visible file is always complete (``write_shard`` /
``write_json``). ``manifest.json`` is rewritten after every file:

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
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dataset.errors import REBUILD_HINT, not_utf8_message
from utils.config.errors import ConfigError
from utils.storage.atomic import atomic_torch_save, atomic_write_text

MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".builder.lock"
LOG_FILE = "builder.log"
TEMP_SUFFIX = ".tmp"
BATCH_RE = re.compile(r"^batch_(\d{5,})\.pt$")
CONSOLIDATED_RE = re.compile(r"^consolidated_(\d{3,})\.pt$")
MANIFEST_KEYS = ("format", "params_hash", "batches_written", "examples_written", "consolidated", "complete")


class StreamingDatasetError(ConfigError):
    """A dataset directory or source file is not what the builder/loader expects (message names it and the fix)."""


class DatasetMismatchError(ConfigError):
    """The directory holds a dataset built from other parameters or sources (a config problem: exit 2)."""


def batch_name(index: int) -> str:
    return f"batch_{index:05d}.pt"


def consolidated_name(index: int) -> str:
    return f"consolidated_{index:03d}.pt"


def temp_path(path: Path) -> Path:
    """`<name>.<pid>.tmp`: the `.tmp` suffix is what a restarted builder deletes after a killed build."""
    return path.with_name(f"{path.name}.{os.getpid()}{TEMP_SUFFIX}")


def write_shard(path: Path, tensors: Mapping[str, torch.Tensor], pause_before_replace_s: float = 0.0) -> None:
    """A batch or consolidated file, atomically (`pause_before_replace_s`: testing, see atomic_torch_save)."""
    atomic_torch_save(dict(tensors), path, temp_path=temp_path(path), pause_before_replace_s=pause_before_replace_s)


def write_json(path: Path, data: Any) -> None:
    """The manifest or a side file, atomically."""
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n", temp_path=temp_path(path))


def read_manifest(root: Path | str) -> dict[str, Any] | None:
    """The manifest of a dataset directory, or None when there is none yet."""
    path = Path(root) / MANIFEST_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as e:
        raise StreamingDatasetError(not_utf8_message(path, fix=REBUILD_HINT)) from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise StreamingDatasetError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); {REBUILD_HINT}") from e
    missing = [k for k in MANIFEST_KEYS if k not in data] if isinstance(data, dict) else list(MANIFEST_KEYS)
    if missing:
        raise StreamingDatasetError(f"{path} lacks {missing}; {REBUILD_HINT}")
    return data


def consolidated_batches(manifest: Mapping[str, Any]) -> int:
    """Batch files already merged into consolidated files."""
    return sum(int(c["num_batches"]) for c in manifest["consolidated"])


def describe(manifest: Mapping[str, Any]) -> str:
    """One line of progress, for logs."""
    rows = sum(int(c["rows"]) for c in manifest["consolidated"])
    return (
        f"{len(manifest['consolidated'])} consolidated files ({rows} rows), "
        f"{manifest['batches_written']} batch files written, complete={manifest['complete']}"
    )
