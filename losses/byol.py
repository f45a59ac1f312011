"""BYOL's loss term for CompositeLoss: negative cosine similarity, online prediction vs target projection."""

from __future__ import annotations

import torch
from torch import nn


def negative_cosine(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-mean_b cos(prediction_b, target_b): in [-1, 1], -1 when every pair points the same way."""
    return -torch.nn.functional.cosine_similarity(prediction, target.detach(), dim=1).mean()


class NegativeCosineTerm(nn.Module):
    """Symmetrised: each view's online prediction against the other view's target projection."""

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return 0.5 * (negative_cosine(outputs["prediction_1"], outputs["target_2"])
                      + negative_cosine(outputs["prediction_2"], outputs["target_1"]))
