"""Stage 0 and 2 task sources: synthetic linear maps, mazes and Sudoku.

* ``linear_map``: a fixed map y = A x + b over Z_10 with A a monomial matrix (a permutation of the
  positions times units 1, 3, 7, 9), so every output digit is an affine function of one input digit.
  The map is drawn once from the data seed; examples are random x. ``x <query> y <eos>``.
* ``maze``: perfect mazes from dataset.reasoning.maze (shortest S -> G path, every cell scored).
* ``sudoku``: puzzles with a unique solution from dataset.reasoning.sudoku (every cell scored).

Mazes and Sudoku (4x4 and 9x9, whose boxes are square) stay valid puzzles under a rotation, so they
carry a rotation map for the consistency loss and may be augmented by the grid transforms.
"""

from __future__ import annotations

import random

import numpy as np

from dataset.cogment.examples import Example, question_answer, solved_in_place
from dataset.cogment.tasks import GRID_TRANSFORMS, TaskSource
from dataset.cogment.vocabulary import BLANK, MAZE_CELLS
from dataset.reasoning import maze as maze_lib
from dataset.reasoning import sudoku as sudoku_lib
from dataset.reasoning.arc import dihedral
from utils.config.errors import ConfigError


def python_rng(rng: np.random.Generator) -> random.Random:
    """A ``random.Random`` seeded from ``rng`` (the reasoning generators take one)."""
    return random.Random(int(rng.integers(2**63)))


class LinearMap(TaskSource):
    name = "linear_map"
    OPTIONS = {"length": 6}
    UNITS = (1, 3, 7, 9)  # the invertible elements of Z_10

    def check_options(self) -> None:
        self.length = self.require_int("length", 1, 32)
        needed = 2 * self.length + 2
        if needed > self.seq_len:
            raise self.too_long(needed, f"lower {self.option_key('length')} or raise data.seq_len")
        rng = np.random.default_rng([self.seed, 1001])
        self.permutation = rng.permutation(self.length)
        self.scale = rng.choice(self.UNITS, size=self.length)
        self.shift = rng.integers(0, 10, size=self.length)

    def apply(self, x: np.ndarray) -> np.ndarray:
        return (self.scale * x[self.permutation] + self.shift) % 10

    def sample(self, split: str, rng: np.random.Generator) -> Example:
        x = rng.integers(0, 10, size=self.length)
        return question_answer([], [self.vocab.id(str(d)) for d in x], [self.vocab.id(str(d)) for d in self.apply(x)],
                               slots=self.length + 1)


class Maze(TaskSource):
    name = "maze"
    OPTIONS = {"size": 7, "min_path_length": 4}

    def check_options(self) -> None:
        size = self.options["size"]
        try:
            maze_lib.validate_size(size)
        except ConfigError as err:
            raise ConfigError(str(err).replace("data.size", self.option_key("size"))) from None
        if size * size > self.seq_len:
            raise self.too_long(size * size, f"lower {self.option_key('size')} or raise data.seq_len")
        self.size = size
        self.min_path_length = self.require_int("min_path_length", 1)
        # The generator's tokens (0 pad, 1 wall, 2 open, 3 S, 4 G, 5 path) in this vocabulary.
        self.token_map = np.array([0] + [self.vocab.id(c) for c in MAZE_CELLS], dtype=np.int64)

    def sample(self, split: str, rng: np.random.Generator) -> Example:
        try:
            inputs, labels = maze_lib.generate_maze(self.size, self.min_path_length, python_rng(rng))
        except maze_lib.MazeGenerationError as err:
            raise ConfigError(str(err).replace("data.min_path_length", self.option_key("min_path_length"))
                              .replace("data.size", self.option_key("size"))) from None
        if self.augmentation.applies(rng, split) and self.augmentation.grid_transforms:
            transforms = self.augmentation.grid_transforms
            k = int(transforms[rng.integers(len(transforms))])
            inputs, labels = dihedral(inputs, k), dihedral(labels, k)
        return solved_in_place(self.token_map[inputs], self.token_map[labels], rotatable=True)


class Sudoku(TaskSource):
    name = "sudoku"
    OPTIONS = {"size": 4, "givens": None}

    def check_options(self) -> None:
        n = self.options["size"]
        if n not in sudoku_lib.BOX_SHAPES:
            raise ConfigError(f"{self.option_key('size')} must be one of {sorted(sudoku_lib.BOX_SHAPES)}, got {n!r}")
        if n * n > self.seq_len:
            raise self.too_long(n * n, f"lower {self.option_key('size')} or raise data.seq_len")
        self.size = n
        self.givens = self.options["givens"] if self.options["givens"] is not None else sudoku_lib.DEFAULT_GIVENS[n]
        try:
            sudoku_lib.validate_givens(n, self.givens)
        except ConfigError as err:
            raise ConfigError(str(err).replace("data.givens", self.option_key("givens"))) from None
        rows, cols = sudoku_lib.BOX_SHAPES[n]
        self.square_boxes = rows == cols  # a rotation keeps square boxes, so the rotated grid is a Sudoku
        self.digit_tokens = np.array([BLANK] + [self.vocab.id(str(d)) for d in range(1, 10)], dtype=np.int64)

    def sample(self, split: str, rng: np.random.Generator) -> Example:
        puzzle, solution = sudoku_lib.generate_puzzle(self.size, self.givens, python_rng(rng))
        if self.augmentation.applies(rng, split):
            if self.augmentation.allows("permute_digits"):
                relabel = np.concatenate([[0], 1 + rng.permutation(self.size)])  # blank (0) stays blank
                puzzle, solution = relabel[puzzle], relabel[solution]
            transforms = [k for k in self.augmentation.grid_transforms if self.square_boxes or k in (GRID_TRANSFORMS["rotate_180"],)]
            if transforms:
                k = int(transforms[rng.integers(len(transforms))])
                puzzle, solution = dihedral(puzzle, k), dihedral(solution, k)
        return solved_in_place(self.digit_tokens[puzzle], self.digit_tokens[solution], rotatable=self.square_boxes)
