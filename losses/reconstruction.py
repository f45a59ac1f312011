"""Reconstruction error terms for CompositeLoss (autoencoders, generative models, local learners)."""

from __future__ import annotations

import torch
from torch import nn


class MSETerm(nn.Module):
    """Mean squared error between `outputs[output_key]` and `batch[target_key]` (same shape)."""

    def __init__(self, output_key: str = "reconstruction", target_key: str = "x", weight: float = 1.0) -> None:
        super().__init__()
        self.output_key, self.target_key, self.weight = output_key, target_key, weight

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        prediction, target = outputs[self.output_key], batch[self.target_key]
        if prediction.shape != target.shape:
            raise ValueError(f"MSETerm: {self.output_key!r} has shape {list(prediction.shape)}, "
                             f"{self.target_key!r} has {list(target.shape)}")
        return torch.mean((prediction.float() - target.float()) ** 2)
