"""The builder shared by square-grid puzzles with one solution each (Sudoku, Maze).

A grid-puzzle dataset is ``num_train`` training and ``num_val`` validation puzzles of ``size x size``
cells, each generated (distinct, and no validation puzzle equal to a training row) or read from a
file (a seeded subset when a count is given; validation puzzles that repeat a training row are
dropped). Training puzzles are followed by ``num_aug`` augmented copies of each; validation puzzles
are not augmented. Both splits are written in the ``dataset.reasoning.puzzles`` format with
``puzzle_identifiers`` all 0.

A family subclasses ``GridPuzzleBuilder`` and says what differs: how one puzzle is generated, how a
file is read, how a copy is augmented, its tokens and the extra fields of its summary. Puzzles are
handled as token arrays [count, size * size] (token 0 is padding and never occurs).

The directory is named after every parameter that changes the content: ``<prefix><size>_<source>_
n<train>-<val>_aug<num_aug>_s<seed>_<hash>``, where files enter the hash by path, size and
modification time (an edited file gets a new directory without being hashed).
"""

from __future__ import annotations

import abc
import logging
import random
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from dataset.base import DiskDatasetBuilder, params_digest, require_int
from dataset.reasoning.puzzles import SPLIT_FILES, write_split
from utils.config.errors import ConfigError

log = logging.getLogger(__name__)


def file_fingerprint(path: str | None, kind: str, key: str) -> dict | None:
    """Path, size and modification time of a source file (``kind`` and the config ``key`` name it in the error)."""
    if path is None:
        return None
    p = Path(path).expanduser().resolve()
    try:
        st = p.stat()
    except OSError as e:
        raise ConfigError(f"data.{key}: {kind} {p} not found ({e.strerror}); fix the path") from e
    return {"path": str(p), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def row_key(tokens: np.ndarray) -> bytes:
    # One byte per cell (grid tokens are small): a million training rows take ~150 MB of keys, not ~700.
    return np.ascontiguousarray(tokens, dtype=np.uint8).tobytes()


class GridPuzzleBuilder(DiskDatasetBuilder):
    """Writes ``train.pt`` / ``val.pt`` of a grid-puzzle family (module docstring)."""

    # ---- what a family sets
    NAME_PREFIX: ClassVar[str]  # directory names start with it ("sudoku", "maze")
    FORMAT_VERSION: ClassVar[int]  # bumped whenever the content for the same parameters changes
    TITLE: ClassVar[str]  # the family in log lines ("Sudoku")
    ITEM: ClassVar[str]  # one puzzle in messages ("puzzle", "maze")
    FILE_KIND: ClassVar[str]  # a source file in messages ("Sudoku CSV")
    FILE_TAG: ClassVar[str]  # <source> of a directory name built from files ("csv")
    COUNT_KEYS: ClassVar[tuple[str, str]]  # config keys of (num_train, num_val)
    FILE_KEYS: ClassVar[tuple[str, str]]  # config keys of (train_file, val_file)
    MAX_NUM_AUG: ClassVar[int | None] = None  # distinct non-identity augmentations, when they are few
    FILE_ERROR: ClassVar[type[ConfigError]] = ConfigError  # a source file is malformed
    GENERATION_ERROR: ClassVar[type[ConfigError]] = ConfigError  # too few distinct puzzles exist

    def __init__(
        self,
        root: Path | str,
        size: int,
        num_train: int | None,
        num_val: int | None,
        num_aug: int,
        seed: int,
        train_file: str | None = None,
        val_file: str | None = None,
    ) -> None:
        """Checks the parameters shared by every family (a family checks ``size`` before calling this)."""
        for key, value, file in zip(self.COUNT_KEYS, (num_train, num_val), (train_file, val_file)):
            if value is None and file is not None:
                continue  # with a file, None means "every puzzle in it"
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"data.{key} must be a positive integer, got {value!r}")
        if self.MAX_NUM_AUG is None:
            require_int("data.num_aug", num_aug, 0)
        elif isinstance(num_aug, bool) or not isinstance(num_aug, int) or not 0 <= num_aug <= self.MAX_NUM_AUG:
            raise ConfigError(
                f"data.num_aug must be an integer in 0..{self.MAX_NUM_AUG} (the distinct non-identity symmetries), got {num_aug!r}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"data.seed must be an integer, got {seed!r}")
        super().__init__(root)
        self.size = size
        self.num_train = num_train
        self.num_val = num_val
        self.num_aug = num_aug
        self.seed = seed
        self.train_file = train_file
        self.val_file = val_file

    # ------------------------------------------------------------------------ family hooks
    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Tokens 0..vocab_size-1 (0 is padding)."""

    @abc.abstractmethod
    def family_params(self) -> dict[str, Any]:
        """The family's own parameters that define the content (e.g. {"givens": 30})."""

    @abc.abstractmethod
    def generated_tag(self) -> str:
        """<source> of a directory name of generated puzzles (e.g. "g30")."""

    @abc.abstractmethod
    def generate_one(self, rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
        """One random puzzle: (inputs, labels) token grids."""

    @abc.abstractmethod
    def load_file(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        """Every puzzle of a file: (inputs, labels) token arrays [M, ...]."""

    @abc.abstractmethod
    def augment(self, inputs: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """The rows [count, size * size] followed by ``num_aug`` augmented copies of each."""

    @abc.abstractmethod
    def summary_stats(self, base: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
        """The family's fields of the summary, from the (inputs, labels) of the training puzzles before
        augmentation and of the validation puzzles (e.g. givens per puzzle)."""

    def generation_limit(self) -> str:
        """What bounds generation, for the "too few distinct puzzles" message (e.g. "with 30 givens")."""
        return ""

    def generation_hint(self) -> str:
        return f"lower data.{self.COUNT_KEYS[0]} / data.{self.COUNT_KEYS[1]}"

    # ------------------------------------------------------------------------------ identity
    @property
    def seq_len(self) -> int:
        return self.size * self.size

    def params(self) -> dict[str, Any]:
        (train_key, val_key), (train_file_key, val_file_key) = self.COUNT_KEYS, self.FILE_KEYS
        return {
            "version": self.FORMAT_VERSION,
            "size": self.size,
            train_key: self.num_train,
            val_key: self.num_val,
            "num_aug": self.num_aug,
            "seed": self.seed,
            train_file_key: file_fingerprint(self.train_file, self.FILE_KIND, train_file_key),
            val_file_key: file_fingerprint(self.val_file, self.FILE_KIND, val_file_key),
            **self.family_params(),
        }

    def dir_name(self) -> str:
        """Readable name plus a short hash of every parameter that changes the content (files included)."""
        digest = params_digest(self.params())[:8]
        source = self.FILE_TAG if self.train_file or self.val_file else self.generated_tag()
        return f"{self.NAME_PREFIX}{self.size}_{source}_n{self.num_train}-{self.num_val}_aug{self.num_aug}_s{self.seed}_{digest}"

    # ------------------------------------------------------------------------------ puzzles
    def file_subset(self, path: str, limit: int | None, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """The puzzles of a file as rows; a seeded random subset of ``limit`` of them, in file order."""
        inputs, labels = self.load_file(Path(path).expanduser())
        inputs, labels = inputs.reshape(len(inputs), -1), labels.reshape(len(labels), -1)
        if limit is not None and limit < len(inputs):
            # In file order: public files are often sorted by difficulty.
            keep = np.sort(rng.choice(len(inputs), size=limit, replace=False))
            inputs, labels = inputs[keep], labels[keep]
        elif limit is not None and limit > len(inputs):
            log.warning("%s has %d %ss, fewer than the %d requested; using all", path, len(inputs), self.ITEM, limit)
        return inputs, labels

    def generate_distinct(self, count: int, rng: random.Random, exclude: set[bytes], what: str) -> tuple[np.ndarray, np.ndarray]:
        """``count`` distinct puzzles as rows, none in ``exclude`` (row keys); adds them to ``exclude``."""
        inputs, labels = [], []
        max_tries = 20 * count + 100  # small grids have few distinct puzzles: fail instead of looping
        for _ in range(max_tries):
            if len(inputs) == count:
                break
            puzzle, solution = self.generate_one(rng)
            key = row_key(puzzle)
            if key in exclude:
                continue
            exclude.add(key)
            inputs.append(puzzle.reshape(-1))
            labels.append(solution.reshape(-1))
        if len(inputs) < count:
            limit = f" {self.generation_limit()}" if self.generation_limit() else ""
            raise self.GENERATION_ERROR(
                f"generated only {len(inputs)} distinct {what} {self.size}x{self.size} {self.ITEM}s{limit} out of "
                f"{count} requested in {max_tries} tries; {self.generation_hint()}"
            )
        return np.stack(inputs), np.stack(labels)

    def drop_seen(self, inputs: np.ndarray, labels: np.ndarray, seen: set[bytes]) -> tuple[np.ndarray, np.ndarray, int]:
        """Held out means held out: drop validation rows that occur among ``seen`` or repeat each other."""
        seen = set(seen)
        keep = []
        for row in inputs:
            key = row_key(row)
            keep.append(key not in seen)
            seen.add(key)
        keep_arr = np.asarray(keep)
        dropped = int((~keep_arr).sum())
        if dropped:
            log.warning("Dropped %d validation %ss of %s that repeat a training row or each other", dropped, self.ITEM, self.val_file)
        if not keep_arr.any():
            raise self.FILE_ERROR(
                f"{self.val_file}: every validation {self.ITEM} also occurs in the training set; use other {self.ITEM}s for validation"
            )
        return inputs[keep_arr], labels[keep_arr], dropped

    # ------------------------------------------------------------------------------ building
    def _build(self, tmp_dir: Path) -> dict:
        start = time.monotonic()
        # Separate streams: the generator's search (random.Random) and the augmentation / subsets (numpy).
        gen_rng = random.Random(self.seed)
        np_rng = np.random.default_rng(self.seed)

        if self.train_file is not None:
            base_in, base_lab = self.file_subset(self.train_file, self.num_train, np_rng)
        else:
            base_in, base_lab = self.generate_distinct(self.num_train, gen_rng, set(), "training")
        train_in, train_lab = self.augment(base_in, base_lab, np_rng)
        train_keys = {row_key(row) for row in train_in}

        dropped = 0
        if self.val_file is not None:
            val_in, val_lab = self.file_subset(self.val_file, self.num_val, np_rng)
            val_in, val_lab, dropped = self.drop_seen(val_in, val_lab, train_keys)
        else:
            val_in, val_lab = self.generate_distinct(self.num_val, gen_rng, set(train_keys), "validation")

        total_bytes = 0
        for split, (inputs, labels) in {"train": (train_in, train_lab), "val": (val_in, val_lab)}.items():
            tensors = {
                "inputs": torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.int64)),
                "labels": torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
                "puzzle_identifiers": torch.zeros(len(inputs), dtype=torch.long),
            }
            total_bytes += write_split(tmp_dir / SPLIT_FILES[split], tensors, self.vocab_size, self.seq_len, 1)

        summary = {
            "size": self.size,
            "vocab_size": self.vocab_size,
            "seq_len": self.seq_len,
            "num_puzzle_identifiers": 1,
            "source_train": str(self.train_file) if self.train_file else "generated",
            "source_val": str(self.val_file) if self.val_file else "generated",
            f"num_base_{self.ITEM}s": len(base_in),
            "num_aug": self.num_aug,
            "num_train": len(train_in),
            "num_val": len(val_in),
            "num_val_dropped_overlap": dropped,
            "seed": self.seed,
            "bytes": total_bytes,
            **self.summary_stats((base_in, base_lab), (val_in, val_lab)),
            "build_seconds": round(time.monotonic() - start, 3),
        }
        log.debug(  # the summary, logged by DiskDatasetBuilder once the dataset is in place, has these counts
            "%s %dx%d: %d base training %ss x %d (augmented) = %d train rows, %d val %ss",
            self.TITLE, self.size, self.size, len(base_in), self.ITEM, self.num_aug + 1, len(train_in), len(val_in), self.ITEM,
        )
        return summary
