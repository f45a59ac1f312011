"""Weight initialisation helpers shared by the model families."""

from __future__ import annotations

import torch
from torch import nn


def trunc_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """Fill ``tensor`` in place from N(0, std^2) truncated at +-2 std (TRM/HRM's init) and return it."""
    return nn.init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)
