"""Parameter counts of a model, per top-level submodule, without allocating its weights."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters per top-level submodule (or parameter) name, plus ``total`` and ``trainable``
    (frozen ones, e.g. a DQN's target network, count in their submodule and in ``total`` only)."""
    groups: dict[str, int] = {}
    for name, param in model.named_parameters():
        top = name.split(".")[0]
        groups[top] = groups.get(top, 0) + param.numel()
    groups["total"] = sum(p.numel() for p in model.parameters())
    groups["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return groups


def count_parameters(factory: Callable[[], nn.Module]) -> dict[str, int]:
    """``parameter_counts`` of the model ``factory`` builds, built on the meta device (no memory for the
    weights, so a preset of any size is counted in a moment)."""
    with torch.device("meta"):
        model = factory()
    return parameter_counts(model)
