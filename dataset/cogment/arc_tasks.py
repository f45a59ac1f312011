"""Stage 1 task source: ARC-style grid tasks given in context, generated or read from the ARC Prize files.

An example shows ``demos`` input/output pairs of one task, then a test input; the model fills the test
output's canvas (``<gridpad>`` outside the grid, so it also predicts the output's size). All grids sit
on ``side x side`` canvases (dataset/cogment/examples.py, grid blocks).

* Generated (the default): a pool of ``num_tasks`` tasks, each a transformation with fixed parameters
  (flips, rotation, transpose, recolouring, colour swaps, gravity, shifts, borders, background fill,
  keeping one colour, mirroring, upscaling), applied to fresh random grids.
* Real files: ``data.arc_dir`` points at the ARC Prize JSON files, read with dataset.reasoning.arc's
  loader (``arc-agi_<subset>_challenges.json`` and ``..._solutions.json``). Training examples come from
  the tasks of ``train_subsets`` that are not in ``eval_subset``, plus the demonstrations of the
  evaluation tasks; validation examples are the evaluation tasks' test pairs. Tasks with a grid larger
  than the canvas are left out (the build's summary counts them).

Augmentation (training only, with probability ``data.augmentation_rate``): one of the task's
``data.augmentations_per_task`` (transform, colour permutation) pairs, applied to every grid of the
example, so the example stays a consistent task (the seed's ``rotate_90``, ``flip_h``, ..., ``color_permute``).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dataset.cogment.examples import Example, canvas, grid_blocks
from dataset.cogment.tasks import TaskSource, augment_color_grid
from dataset.cogment.vocabulary import COLORS, GRIDPAD
from dataset.reasoning.arc import ArcTask, load_subset
from utils.config.errors import ConfigError

log = logging.getLogger(__name__)

GridFn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class GridTask:
    """One generated task: a transformation with its parameters, and the largest input it accepts."""

    kind: str
    params: tuple[int, ...]
    max_height: int
    max_width: int

    def apply(self, grid: np.ndarray) -> np.ndarray:
        return TRANSFORMS[self.kind](grid, *self.params)


def _gravity_down(g: np.ndarray) -> np.ndarray:
    out = np.zeros_like(g)
    for c in range(g.shape[1]):
        column = g[:, c][g[:, c] != 0]
        if column.size:
            out[-column.size:, c] = column
    return out


def _border(g: np.ndarray, color: int) -> np.ndarray:
    out = g.copy()
    out[0, :] = out[-1, :] = color
    out[:, 0] = out[:, -1] = color
    return out


TRANSFORMS: dict[str, Callable[..., np.ndarray]] = {
    "flip_lr": lambda g: g[:, ::-1].copy(),
    "flip_ud": lambda g: g[::-1, :].copy(),
    "rotate_180": lambda g: g[::-1, ::-1].copy(),
    "transpose": lambda g: g.T.copy(),
    "recolor": lambda g, a, b: np.where(g == a, b, g),
    "swap": lambda g, a, b: np.where(g == a, b, np.where(g == b, a, g)),
    "gravity_down": _gravity_down,
    "shift_right": lambda g: np.roll(g, 1, axis=1),
    "border": _border,
    "fill_background": lambda g, k: np.where(g == 0, k, g),
    "keep_color": lambda g, k: np.where(g == k, g, 0),
    "mirror_extend": lambda g: np.concatenate([g, g[:, ::-1]], axis=1),
    "upscale": lambda g: np.kron(g, np.ones((2, 2), dtype=g.dtype)),
}


def make_task_pool(count: int, side: int, seed: int) -> list[GridTask]:
    """``count`` generated tasks, the same for a given seed (kinds in turn, parameters drawn)."""
    rng = np.random.default_rng([seed, 2002])
    kinds = list(TRANSFORMS)
    pool = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        max_h, max_w = side, side
        if kind == "mirror_extend":
            max_w = side // 2
        elif kind == "upscale":
            max_h = max_w = side // 2
        if kind in ("recolor", "swap"):
            a, b = (int(v) for v in 1 + rng.choice(9, size=2, replace=False))
            params: tuple[int, ...] = (a, b)
        elif kind in ("border", "fill_background", "keep_color"):
            params = (int(1 + rng.integers(9)),)
        else:
            params = ()
        pool.append(GridTask(kind, params, max_h, max_w))
    return pool


class ArcTasks(TaskSource):
    name = "arc"
    OPTIONS = {"side": 6, "demos": 2, "num_tasks": 32, "min_side": 2, "density": 0.4,
               "arc_dir": None, "train_subsets": ["training"], "eval_subset": "evaluation", "max_tasks": None}

    def check_options(self) -> None:
        self.side = self.require_int("side", 3, 30)
        self.demos = self.require_int("demos", 1)
        self.min_side = self.require_int("min_side", 1, self.side)
        blocks = 2 * self.demos + 2
        needed = blocks * self.side * self.side + blocks - 1
        if needed > self.seq_len:
            raise self.too_long(needed, f"lower {self.option_key('side')} or {self.option_key('demos')}, or raise data.seq_len")
        self.color_tokens = np.array([self.vocab.id(c) for c in COLORS], dtype=np.int64)
        if self.options["arc_dir"] is None:
            self.pool = make_task_pool(self.require_int("num_tasks", 1), self.side, self.seed)
            self.real: dict[str, list[ArcTask]] | None = None
        else:
            self.real = self._load_real_tasks()

    # ------------------------------------------------------------------ real ARC files
    def _load_real_tasks(self) -> dict[str, list[ArcTask]]:
        subsets = list(self.options["train_subsets"])
        eval_subset = str(self.options["eval_subset"])
        max_tasks = self.options["max_tasks"]
        loaded: dict[str, list[ArcTask]] = {}
        for subset in dict.fromkeys(subsets + [eval_subset]):
            loaded[subset] = load_subset(self.options["arc_dir"], subset, max_tasks)
        fits = lambda t: all(max(g.shape) <= self.side for pair in t.train for g in pair) and all(  # noqa: E731
            max(g.shape) <= self.side for g in t.test_inputs + t.test_outputs)
        kept = {s: [t for t in tasks if fits(t)] for s, tasks in loaded.items()}
        self.skipped = {s: len(loaded[s]) - len(kept[s]) for s in loaded}
        if any(self.skipped.values()):
            log.info("ARC: tasks with a grid larger than the %dx%d canvas are left out: %s", self.side, self.side,
                     self.skipped)
        train = [t for s in subsets if s != eval_subset for t in kept[s]]
        evaluation = kept[eval_subset]
        if not evaluation or not (train or any(len(t.train) > self.demos for t in evaluation)):
            raise ConfigError(
                f"ARC files in {self.options['arc_dir']}: no task fits the {self.side}x{self.side} canvas "
                f"({self.skipped} left out); raise {self.option_key('side')} (up to 30) and data.seq_len with it")
        return {"train": train, "eval": evaluation}

    def _real_example(self, split: str, rng: np.random.Generator) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
        """(pairs: demos then the query pair, task key) from the real tasks."""
        assert self.real is not None
        if split == "val":
            task = self.real["eval"][int(rng.integers(len(self.real["eval"])))]
            j = int(rng.integers(len(task.test_inputs)))
            query = (task.test_inputs[j], task.test_outputs[j])
            demos = [task.train[i] for i in rng.permutation(len(task.train))[: self.demos]]
        else:
            candidates = self.real["train"] + [t for t in self.real["eval"] if len(t.train) > self.demos]
            task = candidates[int(rng.integers(len(candidates)))]
            pairs = list(task.train) + ([] if task in self.real["eval"] else list(zip(task.test_inputs, task.test_outputs)))
            order = rng.permutation(len(pairs))
            query = pairs[order[0]]
            demos = [pairs[i] for i in order[1: 1 + self.demos]]
        while len(demos) < self.demos:  # a task with fewer demonstrations repeats one
            demos.append(demos[-1] if demos else query)
        return demos + [query], zlib.crc32(task.task_id.encode("utf-8"))

    # ------------------------------------------------------------------ generated tasks
    def _random_grid(self, task: GridTask, rng: np.random.Generator) -> np.ndarray:
        h = int(rng.integers(self.min_side, max(self.min_side, task.max_height) + 1))
        w = int(rng.integers(self.min_side, max(self.min_side, task.max_width) + 1))
        colors = 1 + rng.choice(9, size=int(rng.integers(1, 5)), replace=False)
        if task.kind in ("recolor", "swap", "keep_color"):
            colors = np.union1d(colors, [task.params[0]])  # the colour the task acts on is there to see
        grid = rng.choice(colors, size=(h, w))
        return np.where(rng.random((h, w)) < float(self.options["density"]), grid, 0).astype(np.int64)

    def _generated_example(self, rng: np.random.Generator) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
        index = int(rng.integers(len(self.pool)))
        task = self.pool[index]
        pairs = []
        for _ in range(self.demos + 1):
            grid = self._random_grid(task, rng)
            pairs.append((grid, task.apply(grid)))
        return pairs, index

    # ------------------------------------------------------------------ examples
    def sample(self, split: str, rng: np.random.Generator) -> Example:
        pairs, task_key = self._real_example(split, rng) if self.real is not None else self._generated_example(rng)
        if self.augmentation.applies(rng, split):
            choices = self.augmentation.task_augmentations(task_key, self.seed)
            transform, colors = choices[int(rng.integers(len(choices)))]
            pairs = [(augment_color_grid(x, transform, colors), augment_color_grid(y, transform, colors)) for x, y in pairs]
        blocks = []
        for x, y in pairs:
            blocks += [canvas(self.color_tokens[x], self.side, GRIDPAD), canvas(self.color_tokens[y], self.side, GRIDPAD)]
        test = len(blocks) - 1
        return grid_blocks(blocks, answer_blocks={test}, cue_blocks={test - 1}, side=self.side)
