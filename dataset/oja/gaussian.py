"""Zero-mean Gaussian vectors with a known covariance: the ground truth for principal components.

The covariance is R diag(variances) R^T with a random rotation R (from `seed`), so its eigenvectors are
the columns of R (`principal_components`, largest variance first: what a test checks the learned
weights against). `model_kwargs()` gives the model its input dimension. Everything is generated in
memory in a few milliseconds: there is nothing to build on disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dataset.tensors import TensorDictDataset, collate_tensor_dicts
from utils.config.errors import ConfigError


class GaussianData:
    def __init__(self, variances: Sequence[float] = (4.0, 1.0, 0.5, 0.25), num_train: int = 4096,
                 num_val: int = 1024, seed: int = 0) -> None:
        if len(variances) < 2 or any(v <= 0 for v in variances):
            raise ConfigError(f"data.variances must hold at least two positive numbers, got {list(variances)}")
        generator = torch.Generator().manual_seed(seed)
        dim = len(variances)
        rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator))
        order = torch.argsort(torch.tensor(list(variances)), descending=True)
        self.principal_components = rotation[:, order].T.contiguous()  # rows, largest variance first
        self.variances = torch.tensor(list(variances))[order]
        scale = rotation * torch.tensor(list(variances)).sqrt()  # x = R diag(sqrt(var)) z
        samples = torch.randn(num_train + num_val, dim, generator=generator) @ scale.T
        self.train_dataset = TensorDictDataset({"x": samples[:num_train]})
        self.val_dataset = TensorDictDataset({"x": samples[num_train:]})
        self.collate_fn = collate_tensor_dicts

    def prepare_data(self, rebuild: bool = False, incremental: bool = True) -> None:
        """Nothing on disk to build."""

    def setup(self) -> None:
        """The splits were made in __init__."""

    def model_kwargs(self) -> dict[str, Any]:
        return {"input_dim": len(self.variances)}
