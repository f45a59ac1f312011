"""ARC-AGI (Abstraction and Reasoning Corpus) as a puzzle dataset, encoded the TRM/HRM way.

Source files are the ARC Prize JSON files in ``arc_dir``: ``arc-agi_<subset>_challenges.json``
(``{task_id: {"train": [{"input": grid, "output": grid}, ...], "test": [{"input": grid}, ...]}}``)
and ``arc-agi_<subset>_solutions.json`` (``{task_id: [output grid per test input]}``).

Encoding: a grid h x w is placed top-left in a 30 x 30 canvas flattened row-major (seq_len 900);
tokens are 0 padding, 1 EOS, 2..11 colours 0..9 (vocab 12). EOS fills the row right below the grid
(cells (h, 0..w-1)) and the column right after it (cells (0..h-1, w)), where those fit in the
canvas, so a model that predicts the labels also predicts the output's size. Labels use the same
encoding with padding replaced by IGNORE_LABEL (EOS positions are scored).

Splits (as in TRM): train rows are every demonstration pair of every task, plus the test pairs of
the tasks that are not in ``eval_subset``; val rows are the test pairs of the ``eval_subset`` tasks.
Every task also appears under ``num_aug`` random augmentations (one of the 8 dihedral transforms
combined with a permutation of colours 1..9; 0, the background, stays fixed). Each (task,
augmentation) has its own ``puzzle_identifiers`` value, shared by its train and val rows: that is
how the learned per-puzzle embedding carries from the demonstrations to the test input.

Extra per-row tensors (both splits), used by ``dataset.reasoning.arc_evaluator.ArcEvaluator`` to undo the
augmentation: ``task_index`` (index into ``tasks.json``), ``test_index`` (-1 for demonstration
pairs), ``aug_transform`` (0..7) and ``aug_colors`` [N, 10] (new colour = aug_colors[old colour]).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dataset.base import DiskDatasetBuilder, params_digest
from dataset.errors import REBUILD_HINT, DatasetFileError, not_utf8_message
from dataset.reasoning.puzzles import IGNORE_LABEL, SPLIT_FILES, PuzzleData, write_split
from utils.config.errors import ConfigError

log = logging.getLogger(__name__)

GRID_SIZE = 30
SEQ_LEN = GRID_SIZE * GRID_SIZE
PAD_TOKEN = 0
EOS_TOKEN = 1
COLOR_OFFSET = 2  # colour c is token c + 2
NUM_COLORS = 10
VOCAB_SIZE = COLOR_OFFSET + NUM_COLORS
NUM_TRANSFORMS = 8
# Bump when the on-disk layout or encoding changes, so old dataset directories are not reused.
FORMAT_VERSION = 1
TASKS_FILE = "tasks.json"
SET_ARC_DIR_HINT = (
    "set data.arc_dir=/path/to/arc-prize-files (a directory holding the ARC Prize files "
    "arc-agi_<subset>_challenges.json and arc-agi_<subset>_solutions.json)"
)
_SUBSET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# Which transform undoes transform k: rotations by 90 and 270 degrees undo each other, the rest
# (identity, 180 degrees, the two flips and the two transposes) are their own inverse.
_INVERSE_TRANSFORM = (0, 3, 2, 1, 4, 5, 6, 7)


class ArcFormatError(ConfigError):
    """An ARC source file is unreadable or does not follow the ARC Prize format."""


# ------------------------------------------------------------------------------- augmentations
def dihedral(grid: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 symmetries of the square (TRM's numbering): 0 identity, 1-3 rotations by
    90/180/270 degrees counter-clockwise, 4 left-right flip, 5 up-down flip, 6 transpose,
    7 anti-transpose."""
    if k == 0:
        out = grid
    elif k in (1, 2, 3):
        out = np.rot90(grid, k=k)
    elif k == 4:
        out = np.fliplr(grid)
    elif k == 5:
        out = np.flipud(grid)
    elif k == 6:
        out = grid.T
    elif k == 7:
        out = np.fliplr(np.rot90(grid, k=1))
    else:
        raise ValueError(f"dihedral transform index must be in 0..{NUM_TRANSFORMS - 1}, got {k!r}")
    return np.ascontiguousarray(out)


def inverse_dihedral(grid: np.ndarray, k: int) -> np.ndarray:
    """Undo ``dihedral(grid, k)``."""
    if not 0 <= k < NUM_TRANSFORMS:
        raise ValueError(f"dihedral transform index must be in 0..{NUM_TRANSFORMS - 1}, got {k!r}")
    return dihedral(grid, _INVERSE_TRANSFORM[k])


def identity_colors() -> np.ndarray:
    return np.arange(NUM_COLORS, dtype=np.int64)


def random_color_permutation(rng: np.random.Generator) -> np.ndarray:
    """A permutation of 0..9 that keeps 0 (the background) fixed: ``new = perm[old]``."""
    return np.concatenate([[0], 1 + rng.permutation(NUM_COLORS - 1)]).astype(np.int64)


def _check_color_permutation(perm: np.ndarray) -> np.ndarray:
    perm = np.asarray(perm, dtype=np.int64)
    if perm.shape != (NUM_COLORS,) or sorted(perm.tolist()) != list(range(NUM_COLORS)):
        raise ValueError(f"a colour permutation must be a permutation of 0..{NUM_COLORS - 1}, got {perm.tolist()}")
    return perm


def apply_colors(grid: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """Recolour a grid of colours 0..9: each cell c becomes ``perm[c]``."""
    return _check_color_permutation(perm)[grid].astype(grid.dtype, copy=False)


def invert_colors(grid: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """Undo ``apply_colors(grid, perm)``."""
    inverse = np.argsort(_check_color_permutation(perm))
    return inverse[grid].astype(grid.dtype, copy=False)


def augment_grid(grid: np.ndarray, transform: int, perm: np.ndarray) -> np.ndarray:
    return apply_colors(dihedral(grid, transform), perm)


def unaugment_grid(grid: np.ndarray, transform: int, perm: np.ndarray) -> np.ndarray:
    """Undo ``augment_grid``: inverse colours first, then the inverse transform."""
    return inverse_dihedral(invert_colors(grid, perm), transform)


def task_augmentations(task_id: str, num_aug: int, seed: int) -> list[tuple[int, np.ndarray]]:
    """The identity followed by ``num_aug`` distinct random (transform, colour permutation) pairs.

    Seeded by (seed, task id) rather than the task's position, so a task keeps its augmentations
    whichever other tasks are selected (``max_tasks_per_subset``)."""
    task_key = int.from_bytes(hashlib.sha256(task_id.encode("utf-8")).digest()[:8], "little")
    rng = np.random.default_rng([seed, task_key])
    augs = [(0, identity_colors())]
    seen = {(0, identity_colors().tobytes())}
    while len(augs) < num_aug + 1:
        transform, perm = int(rng.integers(NUM_TRANSFORMS)), random_color_permutation(rng)
        key = (transform, perm.tobytes())
        if key not in seen:
            seen.add(key)
            augs.append((transform, perm))
    return augs


# ------------------------------------------------------------------------------------ encoding
def _write_grid(canvas: np.ndarray, grid: np.ndarray) -> None:
    """Draw colour tokens and the EOS border into a [30, 30] canvas that already holds padding."""
    h, w = grid.shape
    canvas[:h, :w] = grid.astype(np.int64) + COLOR_OFFSET
    if h < GRID_SIZE:
        canvas[h, :w] = EOS_TOKEN
    if w < GRID_SIZE:
        canvas[:h, w] = EOS_TOKEN


def _check_grid_shape(grid: np.ndarray) -> None:
    if grid.ndim != 2 or not (1 <= grid.shape[0] <= GRID_SIZE and 1 <= grid.shape[1] <= GRID_SIZE):
        raise ValueError(f"an ARC grid must be 2-D with sides in 1..{GRID_SIZE}, got shape {list(grid.shape)}")


def encode_grid(grid: np.ndarray) -> np.ndarray:
    """Tokens Long[900] of a grid of colours 0..9 (padding 0, EOS border 1, colour c -> c + 2)."""
    grid = np.asarray(grid)
    _check_grid_shape(grid)
    canvas = np.full((GRID_SIZE, GRID_SIZE), PAD_TOKEN, dtype=np.int64)
    _write_grid(canvas, grid)
    return canvas.reshape(-1)


def encode_label(grid: np.ndarray) -> np.ndarray:
    """Like ``encode_grid`` with padding replaced by IGNORE_LABEL (EOS cells stay scored)."""
    grid = np.asarray(grid)
    _check_grid_shape(grid)
    canvas = np.full((GRID_SIZE, GRID_SIZE), IGNORE_LABEL, dtype=np.int64)
    _write_grid(canvas, grid)
    return canvas.reshape(-1)


def decode_grid(tokens: np.ndarray | Sequence[int]) -> np.ndarray | None:
    """Crop a predicted (or label) sequence back to a grid of colours 0..9; None when invalid.

    The width is the run of colour tokens at the start of row 0, the height the run at the start
    of column 0 (both end at the first EOS, padding or ignored cell); every cell of that rectangle
    must be a colour, otherwise the prediction has no well-defined grid."""
    canvas = np.asarray(tokens).reshape(GRID_SIZE, GRID_SIZE)
    is_color = (canvas >= COLOR_OFFSET) & (canvas < VOCAB_SIZE)
    w = GRID_SIZE if is_color[0].all() else int(np.argmin(is_color[0]))
    h = GRID_SIZE if is_color[:, 0].all() else int(np.argmin(is_color[:, 0]))
    if h == 0 or w == 0 or not is_color[:h, :w].all():
        return None
    return (canvas[:h, :w] - COLOR_OFFSET).astype(np.uint8)


# ---------------------------------------------------------------------------------- source files
@dataclass
class ArcTask:
    """One task of one subset, grids as uint8 arrays; ``test_outputs`` aligned with ``test_inputs``."""

    task_id: str
    subset: str
    train: list[tuple[np.ndarray, np.ndarray]]
    test_inputs: list[np.ndarray]
    test_outputs: list[np.ndarray]


def subset_files(arc_dir: Path | str, subset: str) -> tuple[Path, Path]:
    """(challenges, solutions) paths of a subset."""
    arc_dir = Path(arc_dir)
    return arc_dir / f"arc-agi_{subset}_challenges.json", arc_dir / f"arc-agi_{subset}_solutions.json"


def _load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"ARC file {path} does not exist; {SET_ARC_DIR_HINT}") from e
    except json.JSONDecodeError as e:
        raise ArcFormatError(
            f"{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno} (character {e.pos}); "
            "fix it or download the file again"
        ) from e
    except UnicodeDecodeError as e:
        raise ArcFormatError(not_utf8_message(path)) from e


def parse_grid(value: Any, where: str) -> np.ndarray:
    """Check an ARC grid (non-empty rectangular list of lists of ints 0..9, sides <= 30).

    ``where`` names the file, task and pair for the error message."""
    if not isinstance(value, list) or not value:
        raise ArcFormatError(f"{where}: a grid must be a non-empty list of rows, got {_short(value)}")
    width = None
    for r, row in enumerate(value):
        if not isinstance(row, list) or not row:
            raise ArcFormatError(f"{where}: row {r} must be a non-empty list of ints, got {_short(row)}")
        if width is None:
            width = len(row)
        elif len(row) != width:
            raise ArcFormatError(
                f"{where}: row {r} has {len(row)} cells but row 0 has {width} (a grid must be rectangular)"
            )
        for c, cell in enumerate(row):
            # bool is an int subclass; JSON true/false in a grid is a format error, not colour 1/0.
            if type(cell) is not int or not 0 <= cell < NUM_COLORS:
                raise ArcFormatError(
                    f"{where}: cell ({r}, {c}) is {cell!r}; colours must be ints 0..{NUM_COLORS - 1}"
                )
    assert width is not None
    if len(value) > GRID_SIZE or width > GRID_SIZE:
        raise ArcFormatError(
            f"{where}: grid is {len(value)}x{width}, larger than the {GRID_SIZE}x{GRID_SIZE} the encoding holds"
        )
    return np.asarray(value, dtype=np.uint8)


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict, str, int, float, bool, type(None))) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_subset(arc_dir: Path | str, subset: str, max_tasks: int | None = None) -> list[ArcTask]:
    """The tasks of one subset, sorted by id (the first ``max_tasks`` when given), fully validated.

    Every task of the files is checked, not just the selected ones, so whether a file is accepted
    does not depend on ``max_tasks``."""
    challenges_path, solutions_path = subset_files(arc_dir, subset)
    challenges = _load_json(challenges_path)
    solutions = _load_json(solutions_path)
    for path, data in ((challenges_path, challenges), (solutions_path, solutions)):
        if not isinstance(data, dict) or not data:
            raise ArcFormatError(f"{path}: expected a non-empty JSON object {{task_id: ...}}, got {_short(data)}")

    tasks = []
    for task_id in sorted(challenges):
        task = challenges[task_id]
        where = f"{challenges_path}: task {task_id!r}"
        if not isinstance(task, dict):
            raise ArcFormatError(f"{where}: expected an object with 'train' and 'test', got {_short(task)}")
        for key in ("train", "test"):
            if not isinstance(task.get(key), list) or not task[key]:
                raise ArcFormatError(f"{where}: '{key}' must be a non-empty list of pairs, got {_short(task.get(key))}")
        train = []
        for i, pair in enumerate(task["train"]):
            if not isinstance(pair, dict) or "input" not in pair or "output" not in pair:
                raise ArcFormatError(f"{where}, train pair {i}: expected {{'input': grid, 'output': grid}}")
            train.append(
                (
                    parse_grid(pair["input"], f"{where}, train pair {i}, input"),
                    parse_grid(pair["output"], f"{where}, train pair {i}, output"),
                )
            )
        test_inputs = []
        for i, pair in enumerate(task["test"]):
            if not isinstance(pair, dict) or "input" not in pair:
                raise ArcFormatError(f"{where}, test pair {i}: expected {{'input': grid}}")
            test_inputs.append(parse_grid(pair["input"], f"{where}, test pair {i}, input"))

        answers = solutions.get(task_id)
        sol_where = f"{solutions_path}: task {task_id!r}"
        if answers is None:
            raise ArcFormatError(f"{sol_where}: no solutions for this task ({len(test_inputs)} test inputs)")
        if not isinstance(answers, list):
            raise ArcFormatError(f"{sol_where}: expected a list of output grids, got {_short(answers)}")
        if len(answers) < len(test_inputs):
            raise ArcFormatError(
                f"{sol_where}, test pair {len(answers)}: no solution (the task has {len(test_inputs)} test "
                f"inputs but {len(answers)} solutions)"
            )
        if len(answers) > len(test_inputs):
            raise ArcFormatError(
                f"{sol_where}: {len(answers)} solutions for {len(test_inputs)} test inputs"
            )
        test_outputs = [parse_grid(g, f"{sol_where}, test pair {i}, output") for i, g in enumerate(answers)]
        tasks.append(ArcTask(task_id, subset, train, test_inputs, test_outputs))
    return tasks[:max_tasks] if max_tasks is not None else tasks


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_arc_tasks(path: Path | str) -> dict[str, Any]:
    """Read and check ``tasks.json`` (written by the builder): task ids and test counts in index order."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise DatasetFileError(f"ARC task list {path} does not exist; {REBUILD_HINT}") from e
    except UnicodeDecodeError as e:
        raise DatasetFileError(not_utf8_message(path, fix=REBUILD_HINT)) from e
    except json.JSONDecodeError as e:
        raise DatasetFileError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); {REBUILD_HINT}") from e
    tasks = data.get("tasks") if isinstance(data, dict) else None
    if not isinstance(tasks, list) or not all(
        isinstance(t, dict)
        and isinstance(t.get("id"), str)
        and isinstance(t.get("num_test"), int)
        and isinstance(t.get("eval"), bool)
        for t in tasks
    ):
        raise DatasetFileError(
            f"{path}: expected {{'tasks': [{{'id': str, 'num_test': int, 'eval': bool, ...}}, ...]}}; {REBUILD_HINT}"
        )
    return data


# --------------------------------------------------------------------------------------- builder
def _validate_params(
    arc_dir: Any, train_subsets: Any, eval_subset: Any, num_aug: Any, max_tasks_per_subset: Any, seed: Any
) -> tuple[Path, list[str], str]:
    """Raise naming the config key; return (arc_dir, train_subsets, eval_subset) normalised."""
    if arc_dir is None or (isinstance(arc_dir, str) and not arc_dir.strip()):
        raise ConfigError(f"data.arc_dir is not set: {SET_ARC_DIR_HINT}")
    if isinstance(train_subsets, str) or not isinstance(train_subsets, Sequence):
        raise ConfigError(f"data.train_subsets must be a list of subset names, got {train_subsets!r}")
    train_subsets = [str(s) for s in train_subsets]
    eval_subset = str(eval_subset)
    for name in (*train_subsets, eval_subset):
        if not _SUBSET_NAME.match(name):
            raise ConfigError(
                f"data.train_subsets / data.eval_subset: ARC subset names are file-name parts like 'training' or "
                f"'evaluation', got {name!r}"
            )
    if len(set(train_subsets)) != len(train_subsets):
        raise ConfigError(f"data.train_subsets lists a subset twice: {train_subsets}")
    for key, value, low in (("num_aug", num_aug, 0), ("seed", seed, None)):
        if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
            raise ConfigError(f"data.{key} must be an integer{' >= 0' if low is not None else ''}, got {value!r}")
    if max_tasks_per_subset is not None and (
        isinstance(max_tasks_per_subset, bool) or not isinstance(max_tasks_per_subset, int) or max_tasks_per_subset < 1
    ):
        raise ConfigError(f"data.max_tasks_per_subset must be null or an integer >= 1, got {max_tasks_per_subset!r}")
    arc_dir = Path(arc_dir).expanduser()
    subsets = train_subsets + ([eval_subset] if eval_subset not in train_subsets else [])
    missing = [str(p) for s in subsets for p in subset_files(arc_dir, s) if not p.is_file()]
    if missing:
        raise ConfigError(f"ARC files missing: {', '.join(missing)}; {SET_ARC_DIR_HINT}")
    return arc_dir, train_subsets, eval_subset


class ArcBuilder(DiskDatasetBuilder):
    """Writes ``train.pt``, ``val.pt`` (dataset.reasoning.puzzles format) and ``tasks.json``."""

    def __init__(
        self,
        root: Path | str,
        arc_dir: Path | str,
        train_subsets: Sequence[str] = ("training", "evaluation"),
        eval_subset: str = "evaluation",
        num_aug: int = 7,
        max_tasks_per_subset: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(root)
        self.arc_dir, self.train_subsets, self.eval_subset = _validate_params(
            arc_dir, train_subsets, eval_subset, num_aug, max_tasks_per_subset, seed
        )
        self.num_aug = num_aug
        self.max_tasks_per_subset = max_tasks_per_subset
        self.seed = seed

    @property
    def subsets(self) -> list[str]:
        """Every subset read: the training ones, then the evaluation one if it is not among them."""
        extra = [self.eval_subset] if self.eval_subset not in self.train_subsets else []
        return self.train_subsets + extra

    def params(self) -> dict[str, Any]:
        # Content hashes, not paths or mtimes: a copy of the same files elsewhere reuses the dataset,
        # an edited file never does.
        sources = {p.name: file_sha256(p) for s in self.subsets for p in subset_files(self.arc_dir, s)}
        return {
            "format": FORMAT_VERSION,
            "train_subsets": self.train_subsets,
            "eval_subset": self.eval_subset,
            "num_aug": self.num_aug,
            "max_tasks_per_subset": self.max_tasks_per_subset,
            "seed": self.seed,
            "sources": sources,
        }

    def dir_name(self) -> str:
        """Derived from every parameter and the source files' content."""
        digest = params_digest(self.params())[:10]
        limit = "all" if self.max_tasks_per_subset is None else f"max{self.max_tasks_per_subset}"
        subsets = "+".join(self.train_subsets) or "none"
        return f"arc_{subsets}_eval-{self.eval_subset}_aug{self.num_aug}_{limit}_s{self.seed}_{digest}"

    def load_tasks(self) -> list[ArcTask]:
        """All selected tasks in index order (subsets in order, ids sorted within a subset)."""
        tasks: list[ArcTask] = []
        first_seen: dict[str, str] = {}
        for subset in self.subsets:
            for task in load_subset(self.arc_dir, subset, self.max_tasks_per_subset):
                if task.task_id in first_seen:
                    raise ArcFormatError(
                        f"task {task.task_id!r} is in both {subset_files(self.arc_dir, first_seen[task.task_id])[0]} "
                        f"and {subset_files(self.arc_dir, subset)[0]}; task ids must be unique across subsets"
                    )
                first_seen[task.task_id] = subset
                tasks.append(task)
        return tasks

    def _build(self, tmp_dir: Path) -> dict:
        tasks = self.load_tasks()
        n_aug = self.num_aug + 1
        is_eval = [t.subset == self.eval_subset for t in tasks]

        # Pairs per task and split: (input, output, test_index).
        train_pairs: list[list[tuple[np.ndarray, np.ndarray, int]]] = []
        val_pairs: list[list[tuple[np.ndarray, np.ndarray, int]]] = []
        for task, evaluated in zip(tasks, is_eval):
            demos = [(x, y, -1) for x, y in task.train]
            tests = [(x, y, j) for j, (x, y) in enumerate(zip(task.test_inputs, task.test_outputs))]
            train_pairs.append(demos if evaluated else demos + tests)
            val_pairs.append(tests if evaluated else [])

        sizes = {}
        for split, pairs in (("train", train_pairs), ("val", val_pairs)):
            n_rows = n_aug * sum(len(p) for p in pairs)
            if n_rows == 0:
                raise ArcFormatError(
                    f"the {split} split would be empty (subsets {self.subsets}, eval_subset {self.eval_subset!r})"
                )
            # One split at a time, freed before it is loaded back for checking: peak memory ~ one split.
            write_split(tmp_dir / SPLIT_FILES[split], self._encode_split(tasks, pairs, n_rows), VOCAB_SIZE, SEQ_LEN,
                        len(tasks) * n_aug + 1)
            sizes[split] = n_rows

        task_list = {
            "format": FORMAT_VERSION,
            "eval_subset": self.eval_subset,
            "tasks": [
                {
                    "id": t.task_id,
                    "subset": t.subset,
                    "num_train": len(t.train),
                    "num_test": len(t.test_inputs),
                    "eval": e,
                }
                for t, e in zip(tasks, is_eval)
            ],
        }
        (tmp_dir / TASKS_FILE).write_text(json.dumps(task_list, indent=1) + "\n", encoding="utf-8")

        per_subset = {}
        for subset in self.subsets:
            chosen = [t for t in tasks if t.subset == subset]
            per_subset[subset] = {
                "tasks": len(chosen),
                "demonstration_pairs": sum(len(t.train) for t in chosen),
                "test_pairs": sum(len(t.test_inputs) for t in chosen),
            }
        file_bytes = {p.name: p.stat().st_size for p in sorted(tmp_dir.iterdir())}
        return {
            "arc_dir": str(self.arc_dir),
            "train_subsets": self.train_subsets,
            "eval_subset": self.eval_subset,
            "max_tasks_per_subset": self.max_tasks_per_subset,
            "seed": self.seed,
            "subsets": per_subset,
            "num_tasks": len(tasks),
            "num_eval_tasks": sum(is_eval),
            "num_aug": self.num_aug,
            "augmentations_per_task": n_aug,
            "train_rows": sizes["train"],
            "val_rows": sizes["val"],
            "vocab_size": VOCAB_SIZE,
            "seq_len": SEQ_LEN,
            "num_puzzle_identifiers": len(tasks) * n_aug + 1,
            "file_bytes": file_bytes,
            "bytes": sum(file_bytes.values()),
        }

    def _encode_split(
        self, tasks: list[ArcTask], pairs: list[list[tuple[np.ndarray, np.ndarray, int]]], n_rows: int
    ) -> dict[str, torch.Tensor]:
        n_aug = self.num_aug + 1
        # Preallocated int64 (the contract's dtype); torch.from_numpy below shares the memory.
        inputs = np.full((n_rows, GRID_SIZE, GRID_SIZE), PAD_TOKEN, dtype=np.int64)
        labels = np.full((n_rows, GRID_SIZE, GRID_SIZE), IGNORE_LABEL, dtype=np.int64)
        puzzle_ids = np.zeros(n_rows, dtype=np.int64)
        task_index = np.zeros(n_rows, dtype=np.int64)
        test_index = np.zeros(n_rows, dtype=np.int64)
        aug_transform = np.zeros(n_rows, dtype=np.int64)
        aug_colors = np.zeros((n_rows, NUM_COLORS), dtype=np.int64)
        row = 0
        for t, (task, task_pairs) in enumerate(zip(tasks, pairs)):
            if not task_pairs:
                continue
            for a, (transform, perm) in enumerate(task_augmentations(task.task_id, self.num_aug, self.seed)):
                for x, y, j in task_pairs:
                    _write_grid(inputs[row], augment_grid(x, transform, perm))
                    _write_grid(labels[row], augment_grid(y, transform, perm))
                    # Id 0 is the blank puzzle; (task t, augmentation a) is 1 + t * n_aug + a in both splits.
                    puzzle_ids[row] = 1 + t * n_aug + a
                    task_index[row], test_index[row], aug_transform[row] = t, j, transform
                    aug_colors[row] = perm
                    row += 1
        assert row == n_rows, (row, n_rows)
        return {
            "inputs": torch.from_numpy(inputs.reshape(n_rows, SEQ_LEN)),
            "labels": torch.from_numpy(labels.reshape(n_rows, SEQ_LEN)),
            "puzzle_identifiers": torch.from_numpy(puzzle_ids),
            "task_index": torch.from_numpy(task_index),
            "test_index": torch.from_numpy(test_index),
            "aug_transform": torch.from_numpy(aug_transform),
            "aug_colors": torch.from_numpy(aug_colors),
        }


# ----------------------------------------------------------------------------------- data module
class ArcData(PuzzleData):
    """ARC-AGI data module: batches hold ``inputs``, ``labels``, ``puzzle_identifiers`` [B, 900]/[B]
    plus ``task_index``, ``test_index``, ``aug_transform``, ``aug_colors`` for the ARC evaluator."""

    def __init__(
        self,
        data_root: str = "datasets",
        arc_dir: str | None = None,
        train_subsets: Sequence[str] = ("training", "evaluation"),
        eval_subset: str = "evaluation",
        num_aug: int = 7,
        max_tasks_per_subset: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.builder = ArcBuilder.for_data_root(
            data_root,
            arc_dir=arc_dir,  # None is rejected with a hint by the builder
            train_subsets=list(train_subsets) if not isinstance(train_subsets, str) else train_subsets,
            eval_subset=eval_subset,
            num_aug=num_aug,
            max_tasks_per_subset=max_tasks_per_subset,
            seed=seed,
        )

    @property
    def tasks_path(self) -> Path:
        return self.root / TASKS_FILE

    def model_kwargs(self) -> dict[str, Any]:
        """The base facts plus ``arc_tasks_path`` (task ids in index order, for the ARC evaluator)."""
        return {**super().model_kwargs(), "arc_tasks_path": str(self.tasks_path)}
