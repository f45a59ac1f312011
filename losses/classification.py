"""Classification loss terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossEntropyTerm(nn.Module):
    """Mean cross-entropy of ``outputs[logits_key]`` (``[..., V]``) against ``batch[target_key]`` (``[...]``).

    Any leading dims (batch, sequence) are flattened; targets equal to ``ignore_index`` are skipped.
    """

    def __init__(
        self,
        weight: float = 1.0,
        logits_key: str = "logits",
        target_key: str = "target",
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        self.weight = float(weight)
        self.logits_key = logits_key
        self.target_key = target_key
        self.ignore_index = ignore_index

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = outputs[self.logits_key]
        target = batch[self.target_key]
        if logits.shape[:-1] != target.shape:
            raise ValueError(
                f"CrossEntropyTerm: {self.logits_key!r} has shape {list(logits.shape)} but {self.target_key!r} "
                f"has shape {list(target.shape)}; expected logits [..., V] and targets [...]"
            )
        flat_logits = logits.reshape(-1, logits.shape[-1]).float()  # float32 for a stable log-softmax
        flat_target = target.reshape(-1).long()
        total = F.cross_entropy(flat_logits, flat_target, ignore_index=self.ignore_index, reduction="sum")
        # Dividing by max(count, 1) instead of reduction="mean" gives 0 (not NaN) for an all-ignored batch.
        count = (flat_target != self.ignore_index).sum().clamp(min=1)
        return total / count

    def extra_repr(self) -> str:
        return f"weight={self.weight}, logits_key={self.logits_key!r}, target_key={self.target_key!r}"
