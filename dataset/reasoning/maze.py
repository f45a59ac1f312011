"""Maze shortest paths: generator, text loader, dihedral augmentation and data module.

A maze is an N x N grid of characters ``'#'`` wall, ``' '`` open, ``'S'`` start, ``'G'`` goal and
``'o'`` path. Tokens (0 is padding and never occurs):

    0 pad, 1 '#', 2 ' ', 3 'S', 4 'G', 5 'o'        (vocab_size 6, seq_len N * N)

``inputs`` is the maze without the path, ``labels`` the same maze with the cells of the shortest
S -> G path (strictly between S and G) set to ``'o'``; every cell is scored.

Generated mazes are perfect mazes (randomised depth-first search on the odd-coordinate lattice): the
open cells form a tree, so the shortest path is the only simple path and the target is unambiguous.
Mazes read from a file must have a unique shortest path too. Path lengths are counted in moves
(BFS distance from S to G): a path of length d has d - 1 ``'o'`` cells.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dataset.base import DiskDatasetBuilder
from dataset.reasoning.puzzles import PuzzleData, check_split, load_split, save_split

log = logging.getLogger(__name__)

CHARS = "# SGo"
PAD, WALL, OPEN, START, GOAL, PATH = 0, 1, 2, 3, 4, 5
CHAR_TO_TOKEN: dict[str, int] = {ch: i + 1 for i, ch in enumerate(CHARS)}
TOKEN_TO_CHAR: dict[int, str] = {i + 1: ch for i, ch in enumerate(CHARS)}
VOCAB_SIZE = len(CHARS) + 1
NUM_DIHEDRAL = 8
# Bumped whenever the on-disk content for the same parameters changes, so old directories are not reused.
FORMAT_VERSION = 1
_MOVES = ((-1, 0), (1, 0), (0, -1), (0, 1))


class MazeGenerationError(RuntimeError):
    """The generator could not produce what was asked for (path too long, too many distinct mazes)."""


class MazeFileError(ValueError):
    """A maze file is malformed; the message names the file and line."""


# ---------------------------------------------------------------------------------- search
def _neighbours(size: int, r: int, c: int) -> list[tuple[int, int]]:
    return [(r + dr, c + dc) for dr, dc in _MOVES if 0 <= r + dr < size and 0 <= c + dc < size]


def _bfs_flat(passable: list[bool], size: int, start: int) -> tuple[list[int], list[int]]:
    # Flat Python lists: per-cell numpy indexing would make BFS several times slower.
    dist = [-1] * (size * size)
    count = [0] * (size * size)
    dist[start], count[start] = 0, 1
    queue = deque([start])
    while queue:
        p = queue.popleft()
        r, c = divmod(p, size)
        for q in (p - size if r else -1, p + size if r < size - 1 else -1, p - 1 if c else -1, p + 1 if c < size - 1 else -1):
            if q < 0 or not passable[q]:
                continue
            if dist[q] == -1:
                dist[q] = dist[p] + 1
                count[q] = count[p]
                queue.append(q)
            elif dist[q] == dist[p] + 1:
                # Another shortest route into q; the cap keeps the numbers small on open grids.
                count[q] = min(2, count[q] + count[p])
    return dist, count


def bfs(grid: np.ndarray, start: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """BFS over non-wall cells of a token grid [N, N]: (distance, number of shortest paths capped at 2).

    Unreachable cells have distance -1 and count 0.
    """
    size = grid.shape[0]
    passable = ((grid != WALL) & (grid != PAD)).reshape(-1).tolist()
    dist, count = _bfs_flat(passable, size, start[0] * size + start[1])
    return np.asarray(dist, dtype=np.int64).reshape(size, size), np.asarray(count, dtype=np.int64).reshape(size, size)


def _walk_back(dist: np.ndarray, start: tuple[int, int], goal: tuple[int, int]) -> list[tuple[int, int]]:
    # From the goal, step to any neighbour one move closer to the start (the only one if the path is unique).
    path = [goal]
    while path[-1] != start:
        r, c = path[-1]
        path.append(next(nb for nb in _neighbours(dist.shape[0], r, c) if dist[nb] == dist[r, c] - 1))
    return path[::-1]


def shortest_path(grid: np.ndarray, start: tuple[int, int], goal: tuple[int, int]) -> list[tuple[int, int]] | None:
    """Cells of a shortest path from ``start`` to ``goal`` (both included), or None if unreachable."""
    dist, _ = bfs(grid, start)
    return None if dist[goal] < 0 else _walk_back(dist, start, goal)


def _find(grid: np.ndarray, token: int) -> tuple[int, int]:
    r, c = np.argwhere(grid == token)[0]
    return int(r), int(c)


def _mark_path(inputs: np.ndarray, dist: np.ndarray, start: tuple[int, int], goal: tuple[int, int]) -> np.ndarray:
    labels = inputs.copy()
    for cell in _walk_back(dist, start, goal)[1:-1]:
        labels[cell] = PATH
    return labels


def solve(inputs: np.ndarray) -> np.ndarray:
    """Labels for a maze (tokens [N, N] with one S and one G): the unique shortest path marked 'o'.

    Raises ValueError when G is unreachable or the shortest path is not unique.
    """
    start, goal = _find(inputs, START), _find(inputs, GOAL)
    dist, count = bfs(inputs, start)
    if dist[goal] < 0:
        raise ValueError("G is not reachable from S")
    if count[goal] > 1:
        raise ValueError(f"the shortest path from S to G (length {int(dist[goal])}) is not unique")
    return _mark_path(inputs, dist, start, goal)


# ------------------------------------------------------------------------------- generation
def validate_size(size: Any, generated: bool = True) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < (5 if generated else 2):
        raise ValueError(f"size must be an integer >= {5 if generated else 2}, got {size!r}")
    if generated and size % 2 == 0:
        raise ValueError(f"generated mazes need an odd size (walls on even, cells on odd coordinates), got {size}")


def generate_grid(size: int, rng: random.Random) -> np.ndarray:
    """A perfect maze (tokens: walls and open cells only) by randomised depth-first search."""
    validate_size(size)
    grid = np.full((size, size), WALL, dtype=np.int64)
    m = (size - 1) // 2  # lattice cells per side, at odd coordinates
    visited = [[False] * m for _ in range(m)]
    cell = (rng.randrange(m), rng.randrange(m))
    visited[cell[0]][cell[1]] = True
    grid[2 * cell[0] + 1, 2 * cell[1] + 1] = OPEN
    stack = [cell]
    while stack:
        i, j = stack[-1]
        options = [
            (i + di, j + dj) for di, dj in _MOVES if 0 <= i + di < m and 0 <= j + dj < m and not visited[i + di][j + dj]
        ]
        if not options:
            stack.pop()
            continue
        ni, nj = options[rng.randrange(len(options))]
        visited[ni][nj] = True
        grid[i + ni + 1, j + nj + 1] = OPEN  # the wall between the two lattice cells
        grid[2 * ni + 1, 2 * nj + 1] = OPEN
        stack.append((ni, nj))
    return grid


def generate_maze(
    size: int, min_path_length: int, rng: random.Random, max_attempts: int = 100
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) token grids [N, N] of a maze whose S -> G shortest path has >= ``min_path_length`` moves.

    S is an open cell; G is drawn among the open cells at least that far from S. When no such cell
    exists another S (then another maze) is tried, ``max_attempts`` times in all.
    """
    longest = 0
    for attempt in range(max_attempts):
        if attempt % 4 == 0:
            grid = generate_grid(size, rng)
            open_cells = [tuple(int(v) for v in rc) for rc in np.argwhere(grid == OPEN)]
        start = open_cells[rng.randrange(len(open_cells))]
        dist, _ = bfs(grid, start)
        longest = max(longest, int(dist.max()))
        far = [tuple(int(v) for v in rc) for rc in np.argwhere(dist >= min_path_length)]
        if not far:
            continue
        goal = far[rng.randrange(len(far))]
        inputs = grid.copy()
        inputs[start], inputs[goal] = START, GOAL
        # The open cells form a tree, so the path is unique and the BFS from S above already finds it.
        return inputs, _mark_path(inputs, dist, start, goal)
    raise MazeGenerationError(
        f"no {size}x{size} maze with an S -> G path of at least {min_path_length} moves in {max_attempts} "
        f"attempts (longest seen: {longest}); lower min_path_length or use a larger size"
    )


# ----------------------------------------------------------------------------------- text I/O
def maze_to_text(grid: np.ndarray) -> str:
    """N lines of N characters (no trailing newline) for a token grid [N, N] (or flat [N*N])."""
    arr = np.asarray(grid)
    if arr.ndim == 1:
        size = math.isqrt(arr.size)
        arr = arr.reshape(size, size)
    return "\n".join("".join(TOKEN_TO_CHAR[int(t)] for t in row) for row in arr)


def write_mazes(path: Path | str, grids: np.ndarray) -> None:
    """Write mazes separated by blank lines; the inverse of :func:`load_mazes`."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("\n\n".join(maze_to_text(g) for g in grids) + "\n")


def load_mazes(path: Path | str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) token grids [M, N, N] from a text file of mazes separated by empty lines.

    Each maze is N lines of N characters from ``'# SGo'`` with exactly one S and one G. A line of
    spaces is a maze row, only an empty line separates mazes. If the maze marks a path with 'o', it
    must be a shortest S -> G path; otherwise the path is computed. A maze whose shortest path is not
    unique is rejected (its target would be ambiguous). Errors name the file and line.
    """
    path = Path(path)
    validate_size(size, generated=False)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise MazeFileError(f"{path}: cannot read maze file ({e})") from e
    blocks: list[tuple[int, list[str]]] = []  # (first line number, rows)
    current: list[str] = []
    first_line = 0
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if line == "":
            if current:
                blocks.append((first_line, current))
                current = []
            continue
        if not current:
            first_line = number
        current.append(line)
    if current:
        blocks.append((first_line, current))
    if not blocks:
        raise MazeFileError(f"{path}: no mazes found")
    inputs, labels = [], []
    for first_line, rows in blocks:
        maze_in, maze_lab = _parse_maze(path, first_line, rows, size)
        inputs.append(maze_in)
        labels.append(maze_lab)
    return np.stack(inputs), np.stack(labels)


def _parse_maze(path: Path, first_line: int, rows: list[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    where = f"{path}:{first_line}"
    if len(rows) != size:
        raise MazeFileError(f"{where}: the maze starting here has {len(rows)} rows, expected {size}")
    grid = np.empty((size, size), dtype=np.int64)
    for i, row in enumerate(rows):
        line_where = f"{path}:{first_line + i}"
        if len(row) != size:
            raise MazeFileError(f"{line_where}: maze row has {len(row)} characters, expected {size}")
        for j, ch in enumerate(row):
            if ch not in CHAR_TO_TOKEN:
                raise MazeFileError(f"{line_where}: unexpected character {ch!r} at column {j + 1}; allowed: {list(CHARS)}")
            grid[i, j] = CHAR_TO_TOKEN[ch]
    for token, name in ((START, "S"), (GOAL, "G")):
        cells = np.argwhere(grid == token)
        if len(cells) == 0:
            raise MazeFileError(f"{where}: the maze starting here has no '{name}' cell, expected exactly 1")
        if len(cells) > 1:
            r, c = (int(v) for v in cells[1])
            raise MazeFileError(
                f"{path}:{first_line + r}: second '{name}' at column {c + 1} (the maze starting at line "
                f"{first_line} has {len(cells)}), expected exactly 1"
            )
    marked = grid == PATH
    inputs = np.where(marked, OPEN, grid)
    start, goal = _find(inputs, START), _find(inputs, GOAL)
    dist, count = bfs(inputs, start)
    length = int(dist[goal])
    if length < 0:
        raise MazeFileError(f"{where}: G is not reachable from S in the maze starting here")
    if count[goal] > 1:
        raise MazeFileError(
            f"{where}: the maze starting here has several shortest S -> G paths of length {length}; "
            "the target would be ambiguous"
        )
    labels = _mark_path(inputs, dist, start, goal)
    if marked.any() and not np.array_equal(labels == PATH, marked):
        # The shortest path is unique, so a marked path is right iff it is exactly that path.
        raise MazeFileError(
            f"{where}: the 'o' cells of the maze starting here ({int(marked.sum())}) are not the shortest "
            f"S -> G path ({length} moves, {length - 1} cells between S and G)"
        )
    return inputs, labels


# ------------------------------------------------------------------------------- augmentation
@dataclass(frozen=True)
class MazeAugmentation:
    """One of the 8 symmetries of the square: ``k % 4`` quarter turns, then a transpose if ``k >= 4``."""

    size: int
    k: int

    def __post_init__(self) -> None:
        if not 0 <= self.k < NUM_DIHEDRAL:
            raise ValueError(f"dihedral index must be in 0..{NUM_DIHEDRAL - 1}, got {self.k}")

    def _as_grid(self, grid: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
        arr = np.asarray(grid)
        n = self.size
        if arr.ndim >= 1 and arr.shape[-1] == n * n:
            return arr.reshape(*arr.shape[:-1], n, n), arr.shape
        if arr.ndim >= 2 and arr.shape[-2:] == (n, n):
            return arr, arr.shape
        raise ValueError(f"expected a [..., {n}, {n}] or [..., {n * n}] array, got shape {list(arr.shape)}")

    def apply(self, grid: np.ndarray) -> np.ndarray:
        """Transform a grid ([..., N, N] or [..., N*N], same shape back)."""
        arr, shape = self._as_grid(grid)
        out = np.rot90(arr, self.k % 4, axes=(-2, -1))
        if self.k >= 4:
            out = np.swapaxes(out, -1, -2)
        return np.ascontiguousarray(out).reshape(shape)

    def invert(self, grid: np.ndarray) -> np.ndarray:
        """Undo :meth:`apply`: ``invert(apply(x)) == x``."""
        arr, shape = self._as_grid(grid)
        if self.k >= 4:
            arr = np.swapaxes(arr, -1, -2)
        out = np.rot90(arr, -(self.k % 4), axes=(-2, -1))
        return np.ascontiguousarray(out).reshape(shape)


# ------------------------------------------------------------------------------------ builder
def _file_fingerprint(path: str | None) -> dict | None:
    # Path, size and modification time: an edited file gets a new dataset directory without hashing it.
    if path is None:
        return None
    p = Path(path).expanduser().resolve()
    try:
        st = p.stat()
    except OSError as e:
        raise FileNotFoundError(f"maze file {p} not found ({e})") from e
    return {"path": str(p), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def validate_params(
    size: Any, num_train: Any, num_val: Any, num_aug: Any, min_path_length: Any, seed: Any,
    train_file: Any = None, val_file: Any = None,
) -> int:
    """Check the builder parameters, naming the offending key; returns the effective ``min_path_length``."""
    validate_size(size, generated=train_file is None or val_file is None)
    for key, value, file in (("num_train", num_train, train_file), ("num_val", num_val, val_file)):
        if value is None and file is not None:
            continue  # with a file, None means "every maze in it"
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    if isinstance(num_aug, bool) or not isinstance(num_aug, int) or not 0 <= num_aug <= NUM_DIHEDRAL - 1:
        raise ValueError(
            f"num_aug must be an integer in 0..{NUM_DIHEDRAL - 1} (the distinct non-identity symmetries), got {num_aug!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    if min_path_length is None:
        min_path_length = size
    if isinstance(min_path_length, bool) or not isinstance(min_path_length, int) or min_path_length < 1:
        raise ValueError(f"min_path_length must be a positive integer (moves from S to G) or null, got {min_path_length!r}")
    return min_path_length


def dataset_dir_name(
    size: int, num_train: int | None, num_val: int | None, num_aug: int, min_path_length: int, seed: int,
    train_file: str | None = None, val_file: str | None = None,
) -> str:
    """Readable name plus a short hash of every parameter that changes the content (files included)."""
    params = {
        "version": FORMAT_VERSION,
        "size": size,
        "num_train": num_train,
        "num_val": num_val,
        "num_aug": num_aug,
        "min_path_length": min_path_length,
        "seed": seed,
        "train_file": _file_fingerprint(train_file),
        "val_file": _file_fingerprint(val_file),
    }
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
    source = "file" if train_file or val_file else f"p{min_path_length}"
    return f"maze{size}_{source}_n{num_train}-{num_val}_aug{num_aug}_s{seed}_{digest}"


def _key(tokens: np.ndarray) -> bytes:
    # One byte per cell (tokens are < 6): keeps the set of training rows small.
    return np.ascontiguousarray(tokens, dtype=np.uint8).tobytes()


def _path_stats(labels: np.ndarray) -> dict[str, float]:
    moves = (labels.reshape(len(labels), -1) == PATH).sum(axis=1) + 1
    return {"min": int(moves.min()), "mean": round(float(moves.mean()), 3), "max": int(moves.max())}


class MazeBuilder(DiskDatasetBuilder):
    """Writes ``train.pt`` / ``val.pt`` (see the module docstring for the token layout)."""

    def __init__(
        self,
        root: Path | str,
        size: int = 15,
        num_train: int | None = 1000,
        num_val: int | None = 500,
        num_aug: int = 3,
        min_path_length: int | None = None,
        seed: int = 0,
        train_file: str | None = None,
        val_file: str | None = None,
    ) -> None:
        self.min_path_length = validate_params(size, num_train, num_val, num_aug, min_path_length, seed, train_file, val_file)
        super().__init__(root)
        self.size = size
        self.num_train = num_train
        self.num_val = num_val
        self.num_aug = num_aug
        self.seed = seed
        self.train_file = train_file
        self.val_file = val_file

    @classmethod
    def for_data_root(cls, data_root: Path | str, **params: Any) -> MazeBuilder:
        """The builder for ``params`` under ``data_root``, in a directory named after the parameters."""
        p = {
            "size": 15, "num_train": 1000, "num_val": 500, "num_aug": 3, "min_path_length": None, "seed": 0,
            "train_file": None, "val_file": None, **params,
        }
        min_path_length = validate_params(**p)
        name = dataset_dir_name(**{**p, "min_path_length": min_path_length})
        return cls(Path(data_root) / name, **p)

    def _file_subset(self, path: str, limit: int | None, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        inputs, labels = load_mazes(Path(path).expanduser(), self.size)
        if limit is not None and limit < len(inputs):
            keep = np.sort(rng.choice(len(inputs), size=limit, replace=False))  # seeded subset, file order
            inputs, labels = inputs[keep], labels[keep]
        elif limit is not None and limit > len(inputs):
            log.warning("%s has %d mazes, fewer than the %d requested; using all", path, len(inputs), limit)
        return inputs, labels

    def _generate(self, count: int, rng: random.Random, exclude: set[bytes], what: str) -> tuple[np.ndarray, np.ndarray]:
        """``count`` distinct mazes not in ``exclude`` (input bytes); adds them to ``exclude``."""
        inputs, labels = [], []
        max_tries = 20 * count + 100  # tiny sizes have few distinct mazes: fail instead of looping
        for _ in range(max_tries):
            if len(inputs) == count:
                break
            maze_in, maze_lab = generate_maze(self.size, self.min_path_length, rng)
            key = _key(maze_in)
            if key in exclude:
                continue
            exclude.add(key)
            inputs.append(maze_in)
            labels.append(maze_lab)
        if len(inputs) < count:
            raise MazeGenerationError(
                f"generated only {len(inputs)} distinct {what} {self.size}x{self.size} mazes out of {count} requested "
                f"in {max_tries} tries; ask for fewer mazes or use a larger size"
            )
        return np.stack(inputs), np.stack(labels)

    def _augment(self, inputs: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Originals followed by ``num_aug`` copies, each maze under distinct non-identity symmetries."""
        if self.num_aug == 0:
            return inputs, labels
        # Row i of `ks` holds the symmetries of maze i: distinct, so no copy repeats another.
        ks = np.argsort(rng.random((len(inputs), NUM_DIHEDRAL - 1)), axis=1)[:, : self.num_aug] + 1
        out_in, out_lab = [inputs], [labels]
        for copy in range(self.num_aug):
            aug_in, aug_lab = np.empty_like(inputs), np.empty_like(labels)
            for k in range(1, NUM_DIHEDRAL):
                rows = ks[:, copy] == k
                aug = MazeAugmentation(self.size, k)
                aug_in[rows] = aug.apply(inputs[rows])
                aug_lab[rows] = aug.apply(labels[rows])
            out_in.append(aug_in)
            out_lab.append(aug_lab)
        return np.concatenate(out_in), np.concatenate(out_lab)

    def _build(self, tmp_dir: Path) -> dict:
        start = time.monotonic()
        gen_rng = random.Random(self.seed)
        np_rng = np.random.default_rng(self.seed)

        if self.train_file is not None:
            train_in, train_lab = self._file_subset(self.train_file, self.num_train, np_rng)
        else:
            train_in, train_lab = self._generate(self.num_train, gen_rng, set(), "training")
        num_base = len(train_in)
        train_in, train_lab = self._augment(train_in, train_lab, np_rng)
        train_keys = {row.tobytes() for row in train_in.astype(np.uint8)}

        dropped = 0
        if self.val_file is not None:
            val_in, val_lab = self._file_subset(self.val_file, self.num_val, np_rng)
            # Held out means held out: drop validation mazes that occur among the training rows.
            seen = set(train_keys)
            keep = []
            for maze in val_in:
                key = _key(maze)
                keep.append(key not in seen)
                seen.add(key)
            keep_arr = np.asarray(keep)
            dropped = int((~keep_arr).sum())
            if dropped:
                log.warning("Dropped %d validation mazes of %s that repeat a training row or each other", dropped, self.val_file)
            if not keep_arr.any():
                raise MazeFileError(f"{self.val_file}: every validation maze also occurs in the training set")
            val_in, val_lab = val_in[keep_arr], val_lab[keep_arr]
        else:
            val_in, val_lab = self._generate(self.num_val, gen_rng, set(train_keys), "validation")

        seq_len = self.size * self.size
        total_bytes = 0
        for split, (inputs, labels) in {"train": (train_in, train_lab), "val": (val_in, val_lab)}.items():
            path = tmp_dir / f"{split}.pt"
            save_split(
                path,
                {
                    "inputs": torch.from_numpy(inputs.reshape(len(inputs), seq_len)),
                    "labels": torch.from_numpy(labels.reshape(len(labels), seq_len)),
                    "puzzle_identifiers": torch.zeros(len(inputs), dtype=torch.long),
                },
            )
            # Validate what is actually on disk, exactly as setup() will read it.
            check_split(load_split(path), path, VOCAB_SIZE, seq_len, 1)
            total_bytes += path.stat().st_size

        summary = {
            "size": self.size,
            "vocab_size": VOCAB_SIZE,
            "seq_len": seq_len,
            "num_puzzle_identifiers": 1,
            "source_train": str(self.train_file) if self.train_file else "generated",
            "source_val": str(self.val_file) if self.val_file else "generated",
            "min_path_length": self.min_path_length,
            "num_base_mazes": num_base,
            "num_aug": self.num_aug,
            "num_train": len(train_in),
            "num_val": len(val_in),
            "num_val_dropped_overlap": dropped,
            "path_length_train": _path_stats(train_lab[:num_base]),
            "path_length_val": _path_stats(val_lab),
            "seed": self.seed,
            "bytes": total_bytes,
            "build_seconds": round(time.monotonic() - start, 3),
        }
        log.info(
            "Maze %dx%d: %d base training mazes x %d (augmented) = %d train rows, %d val mazes, path lengths %s / %s",
            self.size, self.size, num_base, self.num_aug + 1, len(train_in), len(val_in),
            summary["path_length_train"], summary["path_length_val"],
        )
        return summary


class MazeData(PuzzleData):
    """Maze data module: batches of ``inputs`` / ``labels`` Long[B, N*N] and ``puzzle_identifiers``."""

    def __init__(
        self,
        data_root: str = "datasets",
        size: int = 15,
        num_train: int | None = 1000,
        num_val: int | None = 500,
        num_aug: int = 3,
        min_path_length: int | None = None,
        seed: int = 0,
        train_file: str | None = None,
        val_file: str | None = None,
    ) -> None:
        super().__init__()
        self.builder = MazeBuilder.for_data_root(
            data_root,
            size=size,
            num_train=num_train,
            num_val=num_val,
            num_aug=num_aug,
            min_path_length=min_path_length,
            seed=seed,
            train_file=train_file,
            val_file=val_file,
        )
