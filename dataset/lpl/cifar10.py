"""CIFAR-10 from its standard python-pickle batches, as pairs of weak augmentations of each image.

`data.root` is the directory the user downloaded and unpacked (`cifar-10-batches-py/`): it holds
`data_batch_1` ... `data_batch_5` (50,000 training images) and `test_batch` (10,000, the validation
split here), each a pickled dict with b"data" (N, 3072) uint8 rows in channel-major order (1024 red,
1024 green, 1024 blue values of a 32x32 image) and b"labels" (N ints in 0-9). Nothing is downloaded.

`data.root=sample` is for smoke runs and tests on machines without CIFAR-10 (`debug=fast` uses it):
`prepare_data` writes a small generated dataset in exactly that format to `data.sample_dir` (once,
atomically) and the same reader reads it. Its images are random colour blobs, not CIFAR-10.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dataset.base import DiskDatasetBuilder
from dataset.errors import short_reason
from dataset.lpl.pairs import AugmentedPairs, PairData, WeakAugmentation
from utils.config.errors import ConfigError
from utils.storage.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
SAMPLE = "sample"
FORMAT_HINT = ("point data.root at the unpacked cifar-10-batches-py directory (data_batch_1..5, test_batch), "
               "or use data.root=sample for a small generated stand-in")


class CIFAR10FileError(ConfigError):
    """A CIFAR-10 batch file that is missing or not in the python-pickle format."""


def read_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, 32, 32) uint8 images and (N,) labels of one pickled CIFAR-10 batch file."""
    try:
        with open(path, "rb") as f:
            content = pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise CIFAR10FileError(f"{path} is missing; {FORMAT_HINT}.") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError) as err:
        raise CIFAR10FileError(f"{path} is not a CIFAR-10 python batch ({short_reason(err)}); {FORMAT_HINT}.") from None
    if not isinstance(content, dict):
        raise CIFAR10FileError(f"{path} holds a {type(content).__name__}, not a CIFAR-10 batch dict; {FORMAT_HINT}.")
    data = content.get(b"data", content.get("data"))
    labels = content.get(b"labels", content.get("labels"))
    if data is None or labels is None:
        keys = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in content)
        raise CIFAR10FileError(f"{path} has no 'data' and 'labels' entries (keys: {keys}); {FORMAT_HINT}.")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise CIFAR10FileError(
            f"{path}: 'data' is {data.dtype} {list(data.shape)}, expected uint8 rows of 3072 values (3x32x32); "
            f"{FORMAT_HINT}."
        )
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(data) or (len(labels) and (labels.min() < 0 or labels.max() > 9)):
        raise CIFAR10FileError(f"{path}: expected {len(data)} labels in 0-9; {FORMAT_HINT}.")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def write_batch(path: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Write (N, 3, 32, 32) uint8 images as a CIFAR-10 python batch (the format `read_batch` reads), atomically."""
    content = {b"batch_label": path.name.encode(), b"labels": [int(y) for y in labels],
               b"data": images.reshape(len(images), 3072).numpy().astype(np.uint8),
               b"filenames": [f"{i:05d}.png".encode() for i in range(len(images))]}
    atomic_write_bytes(path, pickle.dumps(content, protocol=2))


def generated_images(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stand-in images: a coloured blob per class on a noisy background (nothing like real CIFAR-10)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (count,), generator=generator)
    coords = torch.linspace(-1, 1, 32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    centre = torch.rand(count, 2, generator=generator) * 1.2 - 0.6
    blob = torch.exp(-((xx - centre[:, 0, None, None]) ** 2 + (yy - centre[:, 1, None, None]) ** 2) / 0.1)
    palette = torch.rand(10, 3, generator=torch.Generator().manual_seed(1234))
    images = 0.3 * torch.rand(count, 3, 32, 32, generator=generator) + 0.7 * blob[:, None] * palette[labels][..., None, None]
    return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels


class SampleCIFAR10Builder(DiskDatasetBuilder):
    """A small generated dataset in the CIFAR-10 python format (`data.root=sample`), built once."""

    def __init__(self, root: Path | str, per_file: int = 200, seed: int = 0) -> None:
        super().__init__(root)
        self.per_file, self.seed = per_file, seed

    def params(self) -> dict[str, Any]:
        return {"kind": "cifar10_sample", "per_file": self.per_file, "seed": self.seed}

    def _build(self, tmp_dir: Path) -> dict:
        for index, name in enumerate((*TRAIN_FILES, TEST_FILE)):
            images, labels = generated_images(self.per_file, self.seed * 100 + index)
            write_batch(tmp_dir / name, images, labels)
        return {"files": len(TRAIN_FILES) + 1, "images_per_file": self.per_file}


class CIFAR10Data(PairData):
    """Pairs of two weak augmentations (shift <= 2 px, horizontal flip, brightness +-10%) of CIFAR-10 images.

    `num_train` / `num_val` keep the first that many images of the training / test batches (None: all).
    """

    name = "cifar10"
    image_shape = (3, 32, 32)

    def __init__(self, root: str | None = None, sample_dir: str = "datasets/cifar10_sample",
                 num_train: int | None = None, num_val: int | None = 2000, max_shift: int = 2,
                 flip_prob: float = 0.5, brightness: float = 0.1, seed: int = 0) -> None:
        self.root, self.sample_dir = root, Path(sample_dir)
        self.num_train, self.num_val, self.seed = num_train, num_val, seed
        self.augmentation = WeakAugmentation(max_shift, flip_prob, brightness)
        self.num_classes = 10

    def directory(self) -> Path:
        if self.root is None or str(self.root).strip() == "":
            raise ConfigError(
                "data.root is not set: CIFAR-10 is not downloaded by the launcher; set data.root=/path/to/cifar-10-batches-py "
                "(the unpacked python version: data_batch_1..5, test_batch), or data.root=sample for a small "
                "generated stand-in."
            )
        return self.sample_dir if str(self.root) == SAMPLE else Path(self.root).expanduser()

    def prepare_data(self, rebuild: bool = False, incremental: bool = True) -> None:
        directory = self.directory()
        if str(self.root) == SAMPLE:
            SampleCIFAR10Builder(directory).build(rebuild=rebuild)
            return
        if not directory.is_dir():
            raise ConfigError(f"data.root={self.root}: no such directory; {FORMAT_HINT}.")
        missing = [name for name in (*TRAIN_FILES, TEST_FILE) if not (directory / name).is_file()]
        if missing:
            raise ConfigError(f"data.root={self.root} lacks {', '.join(missing)}; {FORMAT_HINT}.")

    def setup(self) -> None:
        directory = self.directory()
        train = [read_batch(directory / name) for name in TRAIN_FILES]
        train_images, train_labels = torch.cat([t[0] for t in train]), torch.cat([t[1] for t in train])
        val_images, val_labels = read_batch(directory / TEST_FILE)
        if self.num_train is not None:
            train_images, train_labels = train_images[: self.num_train], train_labels[: self.num_train]
        if self.num_val is not None:
            val_images, val_labels = val_images[: self.num_val], val_labels[: self.num_val]
        self.train_dataset = AugmentedPairs(train_images, train_labels, self.augmentation)
        self.val_dataset = AugmentedPairs(val_images, val_labels, self.augmentation, fixed_seed=self.seed)
        log.debug("CIFAR-10 from %s: %d training, %d validation images", directory, len(train_images), len(val_images))
