"""Loss terms of Cogment (models/cogment/model.py), each a ``CompositeLoss`` term logged on its own.

* ``AnswerTerm``: cross-entropy of the ACT mixture of the steps' predictions (the model's answer).
* ``StepSupervisionTerm`` (deep supervision): the cross-entropy of every refinement step's prediction,
  step n of T weighted ``decay ** (T - n)``: the last step counts most, earlier ones exponentially less.
* ``ResidualImprovementTerm``: ``relu(CE_n - CE_{n-1} + margin)`` averaged over steps 2..T, with the
  previous step's CE detached: a step that does not improve on the one before is penalised, and the
  penalty pushes that step down rather than the previous one up.
* ``ConsistencyTerm``: on grid rows, the symmetric KL divergence between the prediction and the
  prediction for the input turned by 90 degrees (turned back): augmentation equivariance.
* ``PonderTerm``: the ACT ponder cost N + R (Graves 2016); its weight is the stage's ponder cost.

Token losses are per-row means over the scored tokens, then means over rows (losses/reasoning.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from losses.reasoning import mean_over_rows, softmax_cross_entropy
from models.components.metrics import IGNORE_INDEX


def row_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B]: each row's mean softmax cross-entropy over its scored tokens (0 for a row with none)."""
    per_token = softmax_cross_entropy(logits, labels, IGNORE_INDEX)
    counts = (labels != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return per_token.sum(dim=1) / counts


class AnswerTerm(nn.Module):
    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = float(weight)

    def forward(self, outputs: dict[str, Any], batch: dict[str, Any]) -> torch.Tensor:
        labels = outputs["labels"]
        return mean_over_rows(softmax_cross_entropy(outputs["logits"], labels, IGNORE_INDEX), labels, IGNORE_INDEX)


class StepSupervisionTerm(nn.Module):
    def __init__(self, weight: float = 1.0, decay: float = 0.5) -> None:
        super().__init__()
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"StepSupervisionTerm.decay must be in (0, 1], got {decay}")
        self.weight, self.decay = float(weight), float(decay)

    def forward(self, outputs: dict[str, Any], batch: dict[str, Any]) -> torch.Tensor:
        steps, labels = outputs["step_logits"], outputs["labels"]
        count = len(steps)
        weights = [self.decay ** (count - 1 - n) for n in range(count)]
        total = sum(w * row_cross_entropy(step, labels).mean() for w, step in zip(weights, steps))
        return total / sum(weights)


class ResidualImprovementTerm(nn.Module):
    def __init__(self, weight: float = 0.1, margin: float = 0.0) -> None:
        super().__init__()
        self.weight, self.margin = float(weight), float(margin)

    def forward(self, outputs: dict[str, Any], batch: dict[str, Any]) -> torch.Tensor:
        steps, labels = outputs["step_logits"], outputs["labels"]
        if len(steps) < 2:
            return steps[0].sum() * 0.0  # one step: nothing to improve on (a graph-connected zero)
        losses = [row_cross_entropy(step, labels) for step in steps]
        penalties = [F.relu(now - before.detach() + self.margin).mean() for before, now in zip(losses, losses[1:])]
        return sum(penalties) / len(penalties)


class ConsistencyTerm(nn.Module):
    def __init__(self, weight: float = 0.1) -> None:
        super().__init__()
        self.weight = float(weight)

    def forward(self, outputs: dict[str, Any], batch: dict[str, Any]) -> torch.Tensor:
        rotated = outputs.get("consistency_logits")
        if rotated is None:
            return outputs["logits"].sum() * 0.0  # no grid rows, or the knob is off (evaluation): exact zero
        rows = outputs["consistency_rows"]
        original = outputs["logits"][rows]
        scored = (outputs["labels"][rows] != IGNORE_INDEX).float()
        log_p, log_q = F.log_softmax(original.float(), dim=-1), F.log_softmax(rotated.float(), dim=-1)
        symmetric_kl = ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(dim=-1)  # KL(p||q) + KL(q||p)
        per_row = (symmetric_kl * scored).sum(dim=1) / scored.sum(dim=1).clamp(min=1)
        return per_row.mean()


class PonderTerm(nn.Module):
    def __init__(self, weight: float = 0.01) -> None:
        super().__init__()
        self.weight = float(weight)

    def forward(self, outputs: dict[str, Any], batch: dict[str, Any]) -> torch.Tensor:
        return outputs["ponder_cost"].mean()
