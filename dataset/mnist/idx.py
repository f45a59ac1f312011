"""MNIST's IDX files (LeCun's format), found in torchvision's layout and read with torchvision's reader.

An IDX file is a big-endian header, then the data: the magic number `0x0000TTDD` (TT the element type,
0x08 for unsigned bytes; DD the number of dimensions), one 32-bit size per dimension, then the bytes.
MNIST's images are `0x00000803` (N x 28 x 28) and its labels `0x00000801` (N).

`torchvision.datasets.mnist.read_image_file` / `read_label_file` parse the data, but they assert on a
bad header and read a truncated file into a wrong shape. So each file is checked here first (magic
number, length against the header's sizes), and a problem is a `ConfigError` naming the file. The `.gz`
files torchvision downloads are unpacked into a scratch directory first (torchvision's reader takes
plain files only); the original directory is only read (it may be read-only, like ../shared/data).
"""

from __future__ import annotations

import math
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.datasets.mnist import read_image_file, read_label_file
from torchvision.datasets.utils import extract_archive

from utils.config.errors import ConfigError

IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
SPLITS = {  # torchvision's file names: <split>-images-idx3-ubyte, <split>-labels-idx1-ubyte
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "t10k": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FIX = "Fix: download the file again (torchvision.datasets.MNIST(root, download=True) writes this layout)."


@dataclass(frozen=True)
class IdxPair:
    """The image and label files of one MNIST split (each a plain or a .gz file)."""

    split: str
    images: Path
    labels: Path


def raw_dir(root: Path | str) -> Path:
    """Where torchvision's `MNIST(root)` keeps the IDX files."""
    return Path(root) / "MNIST" / "raw"


def _find(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def find_splits(root: Path | str) -> dict[str, IdxPair]:
    """The splits present under `root` (torchvision's layout), e.g. {"t10k": IdxPair(...)}.

    A split with one of its two files missing, or a root without any split, is a ConfigError.
    """
    directory = raw_dir(root)
    if not Path(root).is_dir():
        raise ConfigError(f"data.root={root} is not a directory. Fix: point data.root at a directory holding "
                          "MNIST/raw/*-ubyte[.gz] (torchvision's layout), or leave it null for the embedded sample.")
    found: dict[str, IdxPair] = {}
    for split, (images_name, labels_name) in SPLITS.items():
        images, labels = _find(directory, images_name), _find(directory, labels_name)
        if images is None and labels is None:
            continue
        if images is None or labels is None:
            missing = images_name if images is None else labels_name
            raise ConfigError(f"{directory / missing} (or {missing}.gz) is missing, but the other file of the "
                              f"'{split}' split is there. {FIX}")
        found[split] = IdxPair(split, images, labels)
    if not found:
        expected = ", ".join(f"{name}[.gz]" for names in SPLITS.values() for name in names)
        raise ConfigError(f"No MNIST IDX files in {directory} (data.root={root}); expected {expected} there "
                          "(torchvision's layout). Fix: point data.root at the directory that holds MNIST/raw/.")
    return found


def check_idx_file(path: Path, magic: int, shown_as: Path | None = None) -> tuple[int, ...]:
    """The dimensions an IDX file's header gives, after checking its magic number and its length.

    `shown_as`: the name to put in messages (the .gz file a scratch copy came from).
    """
    name = shown_as or path
    ndim = magic & 0xFF
    header_len = 4 + 4 * ndim
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(header_len)
    if len(header) < 4:
        raise ConfigError(f"{name} is not an IDX file: it has only {size} bytes, not even a magic number. {FIX}")
    found = int.from_bytes(header[:4], "big")
    if found != magic:
        kind = "images (N x rows x columns)" if magic == IMAGES_MAGIC else "labels (N)"
        raise ConfigError(f"{name} has the wrong magic number 0x{found:08X}; MNIST {kind} start with 0x{magic:08X}. "
                          f"Is it the right file (images and labels swapped, or not MNIST)? {FIX}")
    if len(header) < header_len:
        raise ConfigError(f"{name} is truncated: {size} bytes, shorter than its {header_len}-byte header. {FIX}")
    dims = tuple(int.from_bytes(header[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header_len + math.prod(dims)
    if size < expected:
        raise ConfigError(f"{name} is truncated: {size} bytes, but its header ({' x '.join(map(str, dims))} bytes of "
                          f"data) needs {expected}. {FIX}")
    if size > expected:
        raise ConfigError(f"{name} has {size - expected} bytes more than its header ({' x '.join(map(str, dims))}) "
                          f"describes: not a well-formed IDX file. {FIX}")
    return dims


def _plain_copy(path: Path, scratch: Path) -> Path:
    """`path` itself, or for a .gz file its unpacked copy in `scratch` (torchvision's extract_archive)."""
    if path.suffix != ".gz":
        return path
    try:
        return Path(extract_archive(str(path), str(scratch)))
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError; a cut .gz raises EOFError
        raise ConfigError(f"{path} cannot be unpacked ({type(err).__name__}: {err}): a damaged or truncated "
                          f"gzip file. {FIX}") from None


def read_pair(pair: IdxPair) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, rows, columns], labels int64 [N]) of one split, every file checked first."""
    with tempfile.TemporaryDirectory(prefix="mnist-idx-") as scratch:
        images_file = _plain_copy(pair.images, Path(scratch))
        labels_file = _plain_copy(pair.labels, Path(scratch))
        image_dims = check_idx_file(images_file, IMAGES_MAGIC, shown_as=pair.images)
        (num_labels,) = check_idx_file(labels_file, LABELS_MAGIC, shown_as=pair.labels)
        if image_dims[0] != num_labels:
            raise ConfigError(f"{pair.images} holds {image_dims[0]} images but {pair.labels} holds {num_labels} "
                              f"labels: the two files of the '{pair.split}' split do not belong together. {FIX}")
        images = read_image_file(str(images_file))
        labels = read_label_file(str(labels_file))
    return images, labels


def read_all(root: Path | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image and label under `root`, the splits concatenated (training set first): a pool to split."""
    pairs = find_splits(root)
    parts = [read_pair(pairs[split]) for split in SPLITS if split in pairs]
    return torch.cat([images for images, _ in parts]), torch.cat([labels for _, labels in parts])
