"""Local, always-on records of a run: `train.log` (Python logging) and `metrics.jsonl`.

Experiment trackers (configured under `logger`) receive the same metric dicts; the JSONL file is what
plotting, reports and tests read, with no service involved. Only rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Protocol

from utils.storage.atomic import atomic_write_text

_FORMAT = "%(asctime)s [%(levelname)s] %(name)s: %(message)s"
# logging `extra` flag: a record for train.log only (e.g. the traceback behind a one-line user error).
FILE_ONLY = "file_only"


def _not_file_only(record: logging.LogRecord) -> bool:
    return not getattr(record, FILE_ONLY, False)


def setup_logging(run_dir: Path | None, rank: int = 0, level: int = logging.INFO) -> None:
    """Console on every rank (rank>0 warnings only, prefixed); `train.log` (appended on resume) on rank 0."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_launcher", False):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    fmt = _FORMAT if rank == 0 else f"[rank{rank}] {_FORMAT}"
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(fmt, "%H:%M:%S"))
    console.setLevel(level if rank == 0 else logging.WARNING)
    console.addFilter(_not_file_only)
    console._launcher = True  # type: ignore[attr-defined]
    root.addHandler(console)
    if run_dir is not None and rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(run_dir / "train.log", mode="a", encoding="utf-8")
        file_handler.setFormatter(logging.Formatter(_FORMAT))
        file_handler._launcher = True  # type: ignore[attr-defined]
        root.addHandler(file_handler)


class Tracker(Protocol):
    """What a `logger` backend implements (W&B, TensorBoard, ...)."""

    run_id: str | None

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def finish(self) -> None: ...

    # Optional: `log_images(images: dict[str, Path], step: int) -> None` (PNG files, see utils/monitoring/plots.py);
    # MetricsWriter.log_images calls it on the trackers that have it. Implementations: utils/monitoring/trackers.py.


class MetricsWriter:
    """Appends one JSON object per record to `metrics.jsonl` and fans out to trackers."""

    def __init__(self, run_dir: Path | None, trackers: dict[str, Tracker] | None = None, enabled: bool = True) -> None:
        self.enabled = enabled and run_dir is not None
        self.path = run_dir / "metrics.jsonl" if run_dir is not None else None
        self.trackers = trackers or {}
        self._file = open(self.path, "a", encoding="utf-8") if self.enabled and self.path else None

    def log(self, metrics: dict[str, Any], step: int, kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, **{k: _jsonable(v) for k, v in metrics.items()}}
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if kind == "event":  # start/stop markers are for local files (utils.monitoring.report), not dashboards
            return
        for tracker in self.trackers.values():
            tracker.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step)

    def log_images(self, images: dict[str, Path], step: int) -> None:
        """PNG files to the trackers that accept images (optional `log_images` method)."""
        if not self.enabled or not images:
            return
        for tracker in self.trackers.values():
            if callable(getattr(tracker, "log_images", None)):
                tracker.log_images(images, step)

    def run_ids(self) -> dict[str, str | None]:
        return {name: getattr(t, "run_id", None) for name, t in self.trackers.items()}

    def close(self) -> None:
        for tracker in self.trackers.values():
            tracker.finish()
        if self._file is not None:
            self._file.close()
            self._file = None


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep the information as text
    return value


def read_metrics(run_dir: Path | str, kind: str | None = None) -> list[dict[str, Any]]:
    """Records of a run's metrics.jsonl (optionally only one kind: train / val / event)."""
    path = Path(run_dir) / "metrics.jsonl"
    records = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line:
                rec = json.loads(line)
                if kind is None or rec.get("kind") == kind:
                    records.append(rec)
    return records


def truncate_metrics(run_dir: Path, after_step: int) -> None:
    """Drop records newer than a resumed checkpoint, so the resumed run does not log steps twice."""

    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return
    kept = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill mid-write
                continue
            if rec.get("step", 0) <= after_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    atomic_write_text(path, "".join(kept))
