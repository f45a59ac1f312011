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

import math
import random
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dataset.errors import not_utf8_message
from dataset.reasoning.grid_builder import GridPuzzleBuilder
from dataset.reasoning.puzzles import PuzzleData
from utils.config.errors import ConfigError

CHARS = "# SGo"
PAD, WALL, OPEN, START, GOAL, PATH = 0, 1, 2, 3, 4, 5
CHAR_TO_TOKEN: dict[str, int] = {ch: i + 1 for i, ch in enumerate(CHARS)}
TOKEN_TO_CHAR: dict[int, str] = {i + 1: ch for i, ch in enumerate(CHARS)}
VOCAB_SIZE = len(CHARS) + 1
NUM_DIHEDRAL = 8
# Bumped whenever the on-disk content for the same parameters changes, so old directories are not reused.
FORMAT_VERSION = 1
_MOVES = ((-1, 0), (1, 0), (0, -1), (0, 1))


class MazeGenerationError(ConfigError):
    """The generator cannot produce what the config asks for (path too long, too many distinct mazes)."""


class MazeFileError(ConfigError):
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
        raise ConfigError(f"data.size must be an integer >= {5 if generated else 2}, got {size!r}")
    if generated and size % 2 == 0:
        raise ConfigError(f"data.size: generated mazes need an odd size (walls on even, cells on odd coordinates), got {size}")


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
        f"attempts (longest seen: {longest}); lower data.min_path_length or raise data.size"
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
    except UnicodeDecodeError as e:
        raise MazeFileError(not_utf8_message(path)) from e
    except OSError as e:
        raise MazeFileError(f"{path}: cannot read maze file ({e.strerror}); fix the path") from e
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
        raise MazeFileError(f"{where}: G is not reachable from S in the maze starting here; open a path or delete the maze")
    if count[goal] > 1:
        raise MazeFileError(
            f"{where}: the maze starting here has several shortest S -> G paths of length {length}; "
            "the target would be ambiguous; add a wall or delete the maze"
        )
    labels = _mark_path(inputs, dist, start, goal)
    if marked.any() and not np.array_equal(labels == PATH, marked):
        # The shortest path is unique, so a marked path is right iff it is exactly that path.
        raise MazeFileError(
            f"{where}: the 'o' cells of the maze starting here ({int(marked.sum())}) are not the shortest "
            f"S -> G path ({length} moves, {length - 1} cells between S and G); fix the 'o' cells or remove them"
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
class MazeBuilder(GridPuzzleBuilder):
    """Writes ``train.pt`` / ``val.pt`` (see the module docstring for the token layout)."""

    NAME_PREFIX = "maze"
    FORMAT_VERSION = FORMAT_VERSION
    TITLE = "Maze"
    ITEM = "maze"
    FILE_KIND = "maze file"
    FILE_TAG = "file"
    COUNT_KEYS = ("num_train", "num_val")
    FILE_KEYS = ("train_file", "val_file")
    MAX_NUM_AUG = NUM_DIHEDRAL - 1
    FILE_ERROR = MazeFileError
    GENERATION_ERROR = MazeGenerationError

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
        validate_size(size, generated=train_file is None or val_file is None)
        super().__init__(root, size, num_train, num_val, num_aug, seed, train_file, val_file)
        if min_path_length is None:
            min_path_length = size
        if isinstance(min_path_length, bool) or not isinstance(min_path_length, int) or min_path_length < 1:
            raise ConfigError(f"data.min_path_length must be a positive integer (moves from S to G) or null, got {min_path_length!r}")
        self.min_path_length = min_path_length

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    def family_params(self) -> dict[str, Any]:
        return {"min_path_length": self.min_path_length}

    def generated_tag(self) -> str:
        return f"p{self.min_path_length}"

    def generation_hint(self) -> str:
        return "lower data.num_train / data.num_val or raise data.size"

    def generate_one(self, rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
        return generate_maze(self.size, self.min_path_length, rng)

    def load_file(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        return load_mazes(path, self.size)

    def augment(self, inputs: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
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

    def summary_stats(self, base: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
        def moves(labels: np.ndarray) -> dict[str, float]:
            counts = (labels == PATH).sum(axis=1) + 1
            return {"min": int(counts.min()), "mean": round(float(counts.mean()), 3), "max": int(counts.max())}

        return {"min_path_length": self.min_path_length, "path_length_train": moves(base[1]), "path_length_val": moves(val[1])}


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
