"""Loss terms of the ring attractor (models/ring_attractor/), for CompositeLoss.

- `CircularErrorTerm`: 1 - cos(decoded - true heading), averaged over the steps of `loss_mask`. It is
  the squared chord between the two points on the unit circle over 2: ~ error^2 / 2 for small errors,
  smooth everywhere, and blind to the wrap at +-pi (which a squared angle difference is not).
- `BumpShapeTerm`: keeps a bump well formed. The population vector reads a heading out of any activity,
  even a flat or silent ring, so the circular error alone would not stop training from dissolving the
  bump. This term is (min_concentration - concentration)^2 where the resultant length of the E activity
  falls below `min_concentration` (a silent ring has length 0), and 0 where the bump is there.
"""

from __future__ import annotations

import torch
from torch import nn


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


class CircularErrorTerm(nn.Module):
    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        error = outputs["decoded_heading"] - batch["heading"]
        return _masked_mean(1.0 - torch.cos(error), batch["loss_mask"])


class BumpShapeTerm(nn.Module):
    def __init__(self, weight: float = 1.0, min_concentration: float = 0.5) -> None:
        super().__init__()
        if not 0.0 < min_concentration < 1.0:
            raise ValueError(f"min_concentration is a resultant length in (0, 1), got {min_concentration}")
        self.weight, self.min_concentration = weight, min_concentration

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        shortfall = torch.relu(self.min_concentration - outputs["concentration"])
        return _masked_mean(shortfall**2, batch["loss_mask"])
