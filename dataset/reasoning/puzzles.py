"""Shared storage format and data module for grid-puzzle datasets (Sudoku, Maze, ARC).

A puzzle dataset directory (built once by a ``DiskDatasetBuilder`` subclass: Sudoku and Maze through
``dataset.reasoning.grid_builder.GridPuzzleBuilder``, ARC directly) holds ``train.pt`` and
``val.pt``, each a dict of tensors with at least

* ``inputs``             Long[N, L]  puzzle tokens (0 is padding),
* ``labels``             Long[N, L]  target tokens; ``IGNORE_LABEL`` (-100) where nothing is scored,
* ``puzzle_identifiers`` Long[N]     which learned puzzle embedding a row uses (0 when unused),

plus any extra per-row tensors a family's evaluator needs (ARC stores its augmentation there). The
``COMPLETE`` marker summary must contain ``vocab_size``, ``seq_len`` and ``num_puzzle_identifiers``:
they become constructor arguments of the model (``model_kwargs``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from dataset.base import BUILD_HINT, DiskDatasetBuilder
from dataset.errors import REBUILD_HINT, DatasetFileError, load_tensor_file
from dataset.tensors import TensorDictDataset, collate_tensor_dicts, describe_tensors

log = logging.getLogger(__name__)

IGNORE_LABEL = -100
SPLIT_FILES = {"train": "train.pt", "val": "val.pt"}
REQUIRED_KEYS = ("inputs", "labels", "puzzle_identifiers")
SUMMARY_KEYS = ("vocab_size", "seq_len", "num_puzzle_identifiers")


class MalformedPuzzleDataError(DatasetFileError):
    """A puzzle dataset file is missing, truncated or does not hold what the loader expects."""


def save_split(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write one split; callers write into the builder's temporary directory (made visible atomically)."""
    torch.save({k: v.contiguous() for k, v in tensors.items()}, path)


def write_split(path: Path, tensors: dict[str, torch.Tensor], vocab_size: int, seq_len: int, num_puzzle_identifiers: int) -> int:
    """Save one split, then check what is actually on disk exactly as `setup()` will read it; returns its bytes."""
    save_split(path, tensors)
    check_split(load_split(path), path, vocab_size, seq_len, num_puzzle_identifiers)
    return path.stat().st_size


def load_split(path: Path) -> dict[str, torch.Tensor]:
    return load_tensor_file(path, MalformedPuzzleDataError)


def check_split(data: Any, path: Path | str, vocab_size: int, seq_len: int, num_puzzle_identifiers: int) -> None:
    """Shapes, dtypes and token ranges of one split; raises MalformedPuzzleDataError naming the file."""

    def fail(problem: str) -> MalformedPuzzleDataError:
        return MalformedPuzzleDataError(f"{path} is malformed: {problem}; {REBUILD_HINT}")

    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise fail(f"expected a dict of tensors, got {type(data).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise fail(f"missing keys {missing}; contents: {describe_tensors(data)}")
    inputs, labels, ids = data["inputs"], data["labels"], data["puzzle_identifiers"]
    n = len(inputs)
    if n == 0:
        raise fail("no rows")
    for key in REQUIRED_KEYS:
        if data[key].dtype != torch.long:
            raise fail(f"{key!r} must be int64; contents: {describe_tensors(data)}")
    if tuple(inputs.shape) != (n, seq_len) or tuple(labels.shape) != (n, seq_len) or tuple(ids.shape) != (n,):
        raise fail(f"expected inputs/labels [N, {seq_len}] and puzzle_identifiers [N]; contents: {describe_tensors(data)}")
    if any(len(v) != n for v in data.values()):
        raise fail(f"all tensors must have {n} rows; contents: {describe_tensors(data)}")
    if bool(((inputs < 0) | (inputs >= vocab_size)).any()):
        raise fail(f"input tokens must be in 0..{vocab_size - 1}")
    scored = labels != IGNORE_LABEL
    if bool(((labels < 0) & scored).any()) or bool(((labels >= vocab_size) & scored).any()):
        raise fail(f"label tokens must be in 0..{vocab_size - 1} or {IGNORE_LABEL} (ignored)")
    if not bool(scored.any(dim=1).all()):
        raise fail("some rows have no scored label")
    if bool(((ids < 0) | (ids >= max(num_puzzle_identifiers, 1))).any()):
        raise fail(f"puzzle_identifiers must be in 0..{max(num_puzzle_identifiers, 1) - 1}")


class PuzzleData:
    """Data module over a puzzle dataset directory; subclasses set ``self.builder`` in ``__init__``.

    Batches are dicts of ``inputs``, ``labels``, ``puzzle_identifiers`` (and the extra tensors);
    the model's vocabulary, sequence length and number of puzzle embeddings come from the summary.
    """

    builder: DiskDatasetBuilder

    def __init__(self) -> None:
        self.train_dataset: TensorDictDataset | None = None
        self.val_dataset: TensorDictDataset | None = None
        self.collate_fn = collate_tensor_dicts
        self.summary: dict[str, Any] = {}

    @property
    def root(self) -> Path:
        return self.builder.root

    def prepare_data(self, rebuild: bool = False, incremental: bool = True) -> None:
        """Build the dataset once (`incremental` does not apply: it is written in one go).

        The build logs the summary; train.py and the trainer call this again to check, quietly."""
        self.builder.build(rebuild=rebuild)

    def setup(self) -> None:
        if not self.builder.is_complete():
            raise FileNotFoundError(f"dataset at {self.root} is not built; {BUILD_HINT}")
        self.summary = self.builder.read_summary()
        missing = [k for k in SUMMARY_KEYS if k not in self.summary]
        if missing:
            raise MalformedPuzzleDataError(f"{self.builder.marker_path} lacks {missing}; {REBUILD_HINT}")
        splits = {}
        for split, name in SPLIT_FILES.items():
            path = self.root / name
            data = load_split(path)
            check_split(data, path, *(int(self.summary[k]) for k in SUMMARY_KEYS))
            splits[split] = data
        self.train_dataset = TensorDictDataset(splits["train"])
        self.val_dataset = TensorDictDataset(splits["val"])
        log.info("Loaded %s: %d train / %d val rows", self.root, len(self.train_dataset), len(self.val_dataset))

    def model_kwargs(self) -> dict[str, Any]:
        """Facts about the data for the model (and evaluators) constructors: vocabulary, length, puzzles."""
        summary = self.summary or self.builder.read_summary()
        return {k: int(summary[k]) for k in SUMMARY_KEYS}
