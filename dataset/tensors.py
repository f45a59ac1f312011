"""Datasets of equally long tensors held in memory, and the collate function their batches need."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset


class TensorDictDataset(Dataset):
    """Map-style dataset over equally long tensors; items and batches are ``dict[str, Tensor]``."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if not tensors:
            raise ValueError("TensorDictDataset needs at least one tensor")
        lengths = {name: len(t) for name, t in tensors.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"all tensors must have the same length, got {lengths}")
        self.tensors = dict(tensors)
        self._length = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: t[index] for name, t in self.tensors.items()}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        # One fancy-indexing op per tensor instead of B __getitem__ calls plus a stack.
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {name: t[idx] for name, t in self.tensors.items()}


def collate_tensor_dicts(
    batch: Mapping[str, torch.Tensor] | Sequence[Mapping[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Collate for datasets with ``__getitems__``: pass a ready batch through, stack a list of items."""
    if isinstance(batch, Mapping):
        return dict(batch)
    if isinstance(batch, Sequence) and batch and all(isinstance(item, Mapping) for item in batch):
        keys = batch[0].keys()
        return {k: torch.stack([torch.as_tensor(item[k]) for item in batch]) for k in keys}
    raise TypeError(
        f"expected a dict of tensors or a non-empty list of such dicts, got {type(batch).__name__}"
    )


def describe_tensors(tensors: Mapping[str, Any]) -> str:
    """Short ``name: dtype[shape]`` listing, for error messages."""
    parts = []
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor):
            parts.append(f"{name}: {str(value.dtype).removeprefix('torch.')}{list(value.shape)}")
        else:
            parts.append(f"{name}: {type(value).__name__}")
    return "{" + ", ".join(parts) + "}"
