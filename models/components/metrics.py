"""How right a model's token answers are, per row: what halting heads learn from and what losses and
metrics score. Labels follow the convention of the losses: ``IGNORE_INDEX`` marks a token not scored."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def rows_correct(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Bool[B]: every scored token of the row is predicted exactly (``logits`` [B, ..., V], ``labels`` [B, ...])."""
    scored = labels != ignore_index
    return ((logits.argmax(-1) == labels) | ~scored).flatten(1).all(dim=1)


def row_token_accuracy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Float[B]: the fraction of each row's scored tokens predicted exactly (0 for a row with none scored);
    ``logits`` [B, T, V], ``labels`` [B, T]."""
    scored = labels != ignore_index
    right = ((logits.argmax(-1) == labels) & scored).sum(-1).float()
    return right / scored.sum(-1).clamp(min=1).float()
