"""Loss terms of the multimodal TRM (models/multimodal/model.py), for ``CompositeLoss``.

The token loss is ``losses.reasoning.TokenCrossEntropyTerm`` with ``labels_key: target``. The terms
here read what the model's optional features put in its outputs:

* ``MTPTerm``  multi-token prediction: ``mtp_logits`` [B, K, T, V], head k scored against the target
  shifted left by k (``mtp_targets``), averaged over the heads;
* ``VQTerm``   ``vq_loss`` (codebook + beta * commitment, computed by the model's quantizer);
* ``DQNTerm``  ``dqn_loss`` (the halting DQN's TD loss; the model emits a zero while warm-starting).

Switched-off features: one loss preset (conf/loss/multimodal.yaml) serves every combination of the
model's switches. A feature that is off leaves its key out of the outputs (so does the DQN in
evaluation), and its term then returns an exact, graph-connected zero: it is still logged (as 0) but
adds nothing to the total or the gradients. ``active_terms(outputs)`` names the terms that have
something to score.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from losses.reasoning import TOKEN_LOSSES, check_token_loss_kind, from_outputs_or_batch, mean_over_rows
from models.components.metrics import IGNORE_INDEX

# Term name -> the output key it needs (the token loss needs only `logits`, always present).
FEATURE_OUTPUT_KEYS = {"mtp": "mtp_logits", "vq": "vq_loss", "dqn": "dqn_loss"}


def _connected_zero(outputs: dict[str, Any]) -> torch.Tensor:
    # Tied to the logits so that a total made only of zeros still back-propagates (to zero gradients);
    # abs() turns a -0.0 (negative logit sum) into the 0 one expects in the logs.
    return (outputs["logits"].sum() * 0.0).abs()


def active_terms(outputs: dict[str, Any]) -> set[str]:
    """The loss terms with something to score in these outputs (``lm`` always)."""
    return {"lm"} | {term for term, key in FEATURE_OUTPUT_KEYS.items() if outputs.get(key) is not None}


def mtp_targets(target: torch.Tensor, num_heads: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Targets of the MTP heads, [B, K, T]: head k (k = 1..K) at slot i predicts ``target[:, i + k]``;
    positions past the end are ``ignore_index``."""
    if num_heads < 1:
        raise ValueError(f"mtp_targets: num_heads must be >= 1, got {num_heads}")
    rows, length = target.shape
    out = target.new_full((rows, num_heads, length), ignore_index)
    for k in range(1, num_heads + 1):
        if k < length:
            out[:, k - 1, : length - k] = target[:, k:]
    return out


class MTPTerm(nn.Module):
    """Mean token cross-entropy of the multi-token-prediction heads (per row over its scored tokens, then
    over rows, then over heads, as ``TokenCrossEntropyTerm`` normalises)."""

    def __init__(self, weight: float = 0.3, kind: str = "softmax", logits_key: str = "mtp_logits", labels_key: str = "target",
                 ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        check_token_loss_kind(kind, "MTPTerm")
        self.weight, self.kind = float(weight), kind
        self.logits_key, self.labels_key, self.ignore_index = logits_key, labels_key, ignore_index

    def forward(self, outputs: dict[str, Any], batch: dict[str, Any]) -> torch.Tensor:
        logits = outputs.get(self.logits_key)
        if logits is None:
            return _connected_zero(outputs)
        if isinstance(logits, (list, tuple)):
            logits = torch.stack(list(logits), dim=1)
        labels = from_outputs_or_batch(outputs, batch, self.labels_key)
        if logits.ndim != 4 or logits.shape[0] != labels.shape[0] or logits.shape[2] != labels.shape[1]:
            raise ValueError(f"{self.logits_key!r} has shape {list(logits.shape)}, expected [B, K, T, V] with "
                             f"{self.labels_key!r} [B, T] = {list(labels.shape)}")
        targets = mtp_targets(labels, logits.shape[1], self.ignore_index)
        per_token = TOKEN_LOSSES[self.kind](logits, targets, self.ignore_index)  # [B, K, T]
        return mean_over_rows(per_token, targets, self.ignore_index, row_dims=2)  # a row: one head of one example


class _OutputScalarTerm(nn.Module):
    key = ""

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = float(weight)

    def forward(self, outputs: dict[str, Any], batch: dict[str, Any]) -> torch.Tensor:
        value = outputs.get(self.key)
        if value is None:
            return _connected_zero(outputs)
        return value.float()


class VQTerm(_OutputScalarTerm):
    """The quantizer's loss ``vq_loss`` = codebook loss (0 with EMA codebooks) + beta * commitment loss."""

    key = "vq_loss"


class DQNTerm(_OutputScalarTerm):
    """The halting DQN's TD loss ``dqn_loss`` (only the Q-network receives its gradient; the model
    returns a graph-connected zero until ``dqn_warmstart_steps`` transitions are stored)."""

    key = "dqn_loss"
