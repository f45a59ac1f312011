"""Modular arithmetic ("grokking") data: x <op> y mod p for all pairs (x, y).

Following Power et al. 2022 and Grokfast (Lee et al. 2024), every equation is the 4-token
sequence ``[x, op, y, =]`` with x, y in 0..p-1, ``op = p`` and ``= = p + 1`` (vocabulary p + 2);
the target is the answer in 0..p-1. Division leaves out y = 0, and so does any operation with
``nonzero_y=True``: Grokfast's reference task is x * y mod p for y in 1..p-1 (its script's docstring
says x / y, its code computes x * y). The full table is split once into train / validation with a
seeded permutation and stored as ``data.pt`` under
``<data_root>/modular_<op>_p<p>_f<train_fraction>_s<split_seed>`` (``..._y1`` with nonzero_y).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from dataset.base import BUILD_HINT, DiskDatasetBuilder
from dataset.errors import REBUILD_HINT, DatasetFileError, load_tensor_file
from dataset.tensors import TensorDictDataset, collate_tensor_dicts, describe_tensors
from utils.config.errors import ConfigError

log = logging.getLogger(__name__)

OPERATIONS = ("add", "sub", "mul", "div")
SEQ_LEN = 4
DATA_FILE = "data.pt"
DATA_KEYS = ("inputs", "targets", "train_idx", "val_idx")


class MalformedDatasetError(DatasetFileError):
    """``data.pt`` is missing, truncated or does not hold what the loader expects."""


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    d = 3
    while d * d <= n:
        if n % d == 0:
            return False
        d += 2
    return True


def validate_params(p: Any, operation: Any, train_fraction: Any, split_seed: Any, nonzero_y: Any = False) -> None:
    """Raise ConfigError naming the offending config key and what it accepts."""
    if not isinstance(nonzero_y, bool):
        raise ConfigError(f"data.nonzero_y must be true or false, got {nonzero_y!r}")
    if operation not in OPERATIONS:
        raise ConfigError(f"data.operation must be one of {list(OPERATIONS)}, got {operation!r}")
    if isinstance(p, bool) or not isinstance(p, int) or not is_prime(p):
        raise ConfigError(f"data.p must be a prime number (e.g. 97), got {p!r}")
    if isinstance(train_fraction, bool) or not isinstance(train_fraction, (int, float)) or not (
        0.0 < train_fraction < 1.0
    ):
        raise ConfigError(f"data.train_fraction must be a number in the open interval (0, 1), got {train_fraction!r}")
    if isinstance(split_seed, bool) or not isinstance(split_seed, int):
        raise ConfigError(f"data.split_seed must be an integer, got {split_seed!r}")


def y_starts_at_one(operation: str, nonzero_y: bool) -> bool:
    # Division always excludes y = 0, which has no inverse.
    return nonzero_y or operation == "div"


def num_equations(p: int, operation: str, nonzero_y: bool = False) -> int:
    return p * (p - 1) if y_starts_at_one(operation, nonzero_y) else p * p


def num_train(p: int, operation: str, train_fraction: float, nonzero_y: bool = False) -> int:
    n = num_equations(p, operation, nonzero_y)
    # Keep both splits non-empty even for tiny p.
    return min(max(round(train_fraction * n), 1), n - 1)


def dataset_dir_name(p: int, operation: str, train_fraction: float, split_seed: int, nonzero_y: bool = False) -> str:
    # repr() of the float is exact, so distinct fractions never share a directory.
    suffix = "_y1" if nonzero_y and operation != "div" else ""  # division's table is the same either way
    return f"modular_{operation}_p{p}_f{float(train_fraction)!r}_s{split_seed}{suffix}"


def make_equations(p: int, operation: str, nonzero_y: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """All equations in (x, y) order: inputs [N, 4] and answers [N], both int64."""
    xs = torch.arange(p, dtype=torch.long)
    ys = torch.arange(1 if y_starts_at_one(operation, nonzero_y) else 0, p, dtype=torch.long)
    x, y = torch.cartesian_prod(xs, ys).unbind(dim=1)
    if operation == "add":
        answers = (x + y) % p
    elif operation == "sub":
        answers = (x - y) % p  # torch's % follows the divisor's sign, so this is in 0..p-1
    elif operation == "mul":
        answers = (x * y) % p
    else:
        # Fermat's little theorem: y^(p-2) is the inverse of y mod a prime p.
        inverse = torch.tensor([0] + [pow(v, p - 2, p) for v in range(1, p)], dtype=torch.long)
        answers = (x * inverse[y]) % p
    inputs = torch.stack([x, torch.full_like(x, p), y, torch.full_like(x, p + 1)], dim=1)
    return inputs, answers


def check_data(
    data: Any, p: int, operation: str, train_fraction: float, path: Path | str, nonzero_y: bool = False
) -> None:
    """Check a loaded ``data.pt`` end to end; raise MalformedDatasetError naming the file."""

    def fail(problem: str) -> MalformedDatasetError:
        return MalformedDatasetError(f"{path} is malformed: {problem}; {REBUILD_HINT}")

    if not isinstance(data, dict):
        raise fail(f"expected a dict of tensors, got {type(data).__name__}")
    if set(data) != set(DATA_KEYS):
        raise fail(f"expected keys {sorted(DATA_KEYS)}, got {sorted(map(str, data))}")
    for key in DATA_KEYS:
        if not isinstance(data[key], torch.Tensor) or data[key].dtype != torch.long:
            raise fail(f"{key!r} must be an int64 tensor; contents: {describe_tensors(data)}")

    inputs, targets = data["inputs"], data["targets"]
    train_idx, val_idx = data["train_idx"], data["val_idx"]
    n = num_equations(p, operation, nonzero_y)
    n_train = num_train(p, operation, train_fraction, nonzero_y)
    expected_shapes = {"inputs": (n, SEQ_LEN), "targets": (n,), "train_idx": (n_train,), "val_idx": (n - n_train,)}
    for key, shape in expected_shapes.items():
        if tuple(data[key].shape) != shape:
            raise fail(f"{key!r} has shape {list(data[key].shape)}, expected {list(shape)}")

    # Token layout and ranges.
    x, op, y, eq = inputs.unbind(dim=1)
    if not (bool((op == p).all()) and bool((eq == p + 1).all())):
        raise fail(f"operator / '=' tokens must be {p} / {p + 1} in columns 1 / 3")
    y_low = 1 if y_starts_at_one(operation, nonzero_y) else 0
    if not (bool(((x >= 0) & (x < p)).all()) and bool(((y >= y_low) & (y < p)).all())):
        raise fail(f"operands must be in 0..{p - 1} (y >= {y_low})")
    if torch.unique(x * p + y).numel() != n:
        raise fail("operand pairs are not all distinct")

    # Re-check every answer by inverting the operation instead of recomputing it the same way.
    if not bool(((targets >= 0) & (targets < p)).all()):
        raise fail(f"targets must be in 0..{p - 1}")
    if operation == "add":
        ok = (targets - y) % p == x
    elif operation == "sub":
        ok = (targets + y) % p == x
    elif operation == "mul":
        ok = (x * y) % p == targets
    else:
        ok = (targets * y) % p == x
    if not bool(ok.all()):
        bad = int((~ok).nonzero()[0])
        raise fail(f"{int((~ok).sum())} wrong answers, e.g. row {bad}: {inputs[bad].tolist()} -> {int(targets[bad])}")

    # The split must be a partition of 0..n-1.
    seen = torch.zeros(n, dtype=torch.long)
    all_idx = torch.cat([train_idx, val_idx])
    if not bool(((all_idx >= 0) & (all_idx < n)).all()):
        raise fail(f"split indices must be in 0..{n - 1}")
    seen.index_add_(0, all_idx, torch.ones_like(all_idx))
    if not bool((seen == 1).all()):
        raise fail("train_idx and val_idx must be disjoint and together cover every equation")


class ModularArithmeticBuilder(DiskDatasetBuilder):
    """Writes ``data.pt`` with the equation table and its train / validation split."""

    def __init__(
        self,
        root: Path | str,
        p: int = 97,
        operation: str = "div",
        train_fraction: float = 0.5,
        split_seed: int = 0,
        nonzero_y: bool = False,
    ) -> None:
        validate_params(p, operation, train_fraction, split_seed, nonzero_y)
        super().__init__(root)
        self.p = p
        self.operation = operation
        self.train_fraction = float(train_fraction)
        self.split_seed = split_seed
        self.nonzero_y = nonzero_y

    def params(self) -> dict[str, Any]:
        params = {"p": self.p, "operation": self.operation, "train_fraction": self.train_fraction, "split_seed": self.split_seed}
        if self.nonzero_y:  # only when set: datasets built before this option keep their hash
            params["nonzero_y"] = True
        return params

    def dir_name(self) -> str:
        return dataset_dir_name(self.p, self.operation, self.train_fraction, self.split_seed, self.nonzero_y)

    def _build(self, tmp_dir: Path) -> dict:
        inputs, targets = make_equations(self.p, self.operation, self.nonzero_y)
        n = len(targets)
        generator = torch.Generator().manual_seed(self.split_seed)
        perm = torch.randperm(n, generator=generator)
        n_train = num_train(self.p, self.operation, self.train_fraction, self.nonzero_y)
        # Sorted indices give a stable, readable file; the order is irrelevant to training.
        data = {
            "inputs": inputs,
            "targets": targets,
            "train_idx": perm[:n_train].sort().values,
            "val_idx": perm[n_train:].sort().values,
        }
        path = tmp_dir / DATA_FILE
        torch.save(data, path)
        # Validate what is actually on disk, exactly as setup() will read it.
        check_data(load_data_file(path), self.p, self.operation, self.train_fraction, path, self.nonzero_y)
        return {
            "p": self.p,
            "operation": self.operation,
            "nonzero_y": self.nonzero_y,
            "train_fraction": self.train_fraction,
            "split_seed": self.split_seed,
            "num_equations": n,
            "num_train": n_train,
            "num_val": n - n_train,
            "vocab_size": self.p + 2,
            "seq_len": SEQ_LEN,
            "bytes": path.stat().st_size,
        }


def load_data_file(path: Path) -> Any:
    """torch.load with weights_only=True, turning missing or unreadable files into MalformedDatasetError."""
    return load_tensor_file(path, MalformedDatasetError)


class ModularArithmeticData:
    """Data module for x <op> y mod p. Batches: {"inputs": Long[B, 4], "target": Long[B]}."""

    def __init__(
        self,
        data_root: str = "datasets",
        p: int = 97,
        operation: str = "div",
        train_fraction: float = 0.5,
        split_seed: int = 0,
        nonzero_y: bool = False,
    ) -> None:
        self.builder = ModularArithmeticBuilder.for_data_root(
            data_root, p=p, operation=operation, train_fraction=train_fraction, split_seed=split_seed,
            nonzero_y=nonzero_y,
        )
        self.train_dataset: TensorDictDataset | None = None
        self.val_dataset: TensorDictDataset | None = None
        self.collate_fn = collate_tensor_dicts

    @property
    def root(self) -> Path:
        return self.builder.root

    @property
    def data_path(self) -> Path:
        return self.root / DATA_FILE

    def prepare_data(self, rebuild: bool = False, incremental: bool = True) -> None:
        """Build the table once (`incremental` does not apply: it is written in one go)."""
        self.builder.build(rebuild=rebuild)

    def setup(self) -> None:
        if not self.builder.is_complete():
            raise FileNotFoundError(f"dataset at {self.root} is not built; {BUILD_HINT}")
        path = self.data_path
        data = load_data_file(path)
        b = self.builder
        check_data(data, b.p, b.operation, b.train_fraction, path, b.nonzero_y)
        inputs, targets = data["inputs"], data["targets"]
        self.train_dataset = TensorDictDataset(
            {"inputs": inputs[data["train_idx"]], "target": targets[data["train_idx"]]}
        )
        self.val_dataset = TensorDictDataset({"inputs": inputs[data["val_idx"]], "target": targets[data["val_idx"]]})
        log.info(
            "Loaded %s: %d train / %d val equations", self.root, len(self.train_dataset), len(self.val_dataset)
        )

    def model_kwargs(self) -> dict[str, Any]:
        p = self.builder.p
        return {"vocab_size": p + 2, "seq_len": SEQ_LEN, "num_classes": p}
