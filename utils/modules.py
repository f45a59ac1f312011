"""Small helpers about nn.Module wrappers and parameter names, shared by optim, grad filters and EMA."""

from __future__ import annotations

import torch


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / torch.compile wrappers so parameter names match the bare model's."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def matches_prefix(name: str, prefix: str) -> bool:
    """True when parameter `name` lies in the submodule `prefix` (or is it)."""
    return name == prefix or name.startswith(prefix + ".")
