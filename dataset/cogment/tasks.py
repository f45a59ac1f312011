"""What every Cogment task source has in common: options, augmentation, and the sampling interface.

A task source makes examples (dataset/cogment/examples.py) of one task type for one split. Generated
stand-ins draw a fresh example per call from the split's random stream; loaders of real files draw from
the file's rows (dataset/cogment/real_files.py). Options are per task (``data.task_options.<task>``) with
the defaults a source declares in ``OPTIONS``; an unknown option is a ConfigError naming the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from dataset.cogment.examples import Example
from dataset.cogment.vocabulary import Vocabulary
from dataset.reasoning.arc import NUM_COLORS, apply_colors, dihedral, random_color_permutation
from utils.config.errors import ConfigError

# Grid augmentations by name: a dihedral transform (dataset.reasoning.arc's numbering) or a colour change.
GRID_TRANSFORMS = {"rotate_90": 1, "rotate_180": 2, "rotate_270": 3, "flip_h": 4, "flip_v": 5, "transpose": 6,
                   "anti_transpose": 7}
COLOR_PERMUTE = "color_permute"
# Augmentations of the other task types: shuffle the arguments of ListOps' (commutative) operators,
# relabel Sudoku digits, list the facts of a multi-hop question in another order.
OTHER_AUGMENTATIONS = ("shuffle_ops", "permute_digits", "reorder_facts")
AUGMENTATION_TYPES = (*GRID_TRANSFORMS, COLOR_PERMUTE, *OTHER_AUGMENTATIONS)


@dataclass(frozen=True)
class Augmentation:
    """Which augmentations a training example may get, and how often (``data.augmentation_rate``)."""

    rate: float = 0.0
    types: tuple[str, ...] = ()
    per_task: int = 300  # ARC: distinct (transform, colours) pairs each task draws its augmentations from

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ConfigError(f"data.augmentation_rate must be in [0, 1], got {self.rate}")
        unknown = [t for t in self.types if t not in AUGMENTATION_TYPES]
        if unknown:
            raise ConfigError(f"data.augmentation_types: unknown {unknown}; known: {', '.join(AUGMENTATION_TYPES)}")
        if self.per_task < 1:
            raise ConfigError(f"data.augmentations_per_task must be >= 1, got {self.per_task}")

    def allows(self, kind: str) -> bool:
        return kind in self.types

    def applies(self, rng: np.random.Generator, split: str) -> bool:
        """Whether this example is augmented: training examples only, with probability ``rate``."""
        return split == "train" and self.rate > 0 and bool(rng.random() < self.rate)

    @property
    def grid_transforms(self) -> list[int]:
        return [GRID_TRANSFORMS[t] for t in self.types if t in GRID_TRANSFORMS]

    def random_grid_augmentation(self, rng: np.random.Generator) -> tuple[int, np.ndarray]:
        """A (dihedral transform, colour permutation) pair from the allowed types (identity where none)."""
        transforms = self.grid_transforms
        transform = int(transforms[rng.integers(len(transforms))]) if transforms else 0
        colors = random_color_permutation(rng) if self.allows(COLOR_PERMUTE) else np.arange(NUM_COLORS)
        return transform, colors

    def task_augmentations(self, task_key: int, seed: int) -> list[tuple[int, np.ndarray]]:
        """The ``per_task`` augmentations of one ARC task (fixed by the seed and the task), as TRM keeps a
        fixed set of augmented copies per task; an augmented example picks one of them."""
        rng = np.random.default_rng([seed, task_key, 7])
        return [self.random_grid_augmentation(rng) for _ in range(self.per_task)]


def augment_color_grid(grid: np.ndarray, transform: int, colors: np.ndarray) -> np.ndarray:
    """A grid of colours 0..9 turned by ``transform`` and recoloured (colour 0, the background, stays)."""
    return apply_colors(dihedral(grid, transform), colors)


class TaskSource:
    """Base class: a task type's examples for one split."""

    name: ClassVar[str]
    OPTIONS: ClassVar[dict[str, Any]] = {}

    def __init__(self, vocab: Vocabulary, seq_len: int, options: Mapping[str, Any] | None, augmentation: Augmentation,
                 seed: int) -> None:
        self.vocab, self.seq_len, self.augmentation, self.seed = vocab, seq_len, augmentation, seed
        self.options = resolve_options(self.name, self.OPTIONS, options)
        self.check_options()

    def check_options(self) -> None:
        """Raise a ConfigError naming ``data.task_options.<task>.<key>`` for a value the source cannot use."""

    def option_key(self, key: str) -> str:
        return f"data.task_options.{self.name}.{key}"

    def require_int(self, key: str, minimum: int, maximum: int | None = None) -> int:
        value = self.options[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum is not None and value > maximum):
            bounds = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
            raise ConfigError(f"{self.option_key(key)} must be an integer {bounds}, got {value!r}")
        return value

    def too_long(self, needed: int, fix: str) -> ConfigError:
        return ConfigError(f"{self.name} examples need {needed} tokens but data.seq_len is {self.seq_len}; {fix}")

    def sample(self, split: str, rng: np.random.Generator) -> Example:
        raise NotImplementedError


def resolve_options(task: str, defaults: Mapping[str, Any], given: Mapping[str, Any] | None) -> dict[str, Any]:
    unknown = sorted(set(given or {}) - set(defaults))
    if unknown:
        raise ConfigError(f"data.task_options.{task}: unknown option(s) {unknown}; the options of {task} are "
                          f"{', '.join(sorted(defaults)) or 'none'}")
    return {**defaults, **dict(given or {})}
