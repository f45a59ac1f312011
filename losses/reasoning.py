"""Loss terms for recursive reasoning with ACT (models/reasoning/recursive_reasoning.py).

Each is a ``CompositeLoss`` term ``term(outputs, batch) -> scalar`` with its own ``weight``; the
composite logs every term separately. Labels are read from ``outputs`` when the model returns them
(with a carried ACT state the rows being solved are the carry's, not the batch's), else from the batch.
Token losses are averaged per row over its scored tokens, then over rows, so a puzzle counts the
same whatever its size (TRM/HRM normalise the same way).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.components.act_halting import HALT_POLICIES
from models.components.metrics import IGNORE_INDEX, rows_correct


def from_outputs_or_batch(outputs: dict[str, Any], batch: dict[str, Any], key: str) -> torch.Tensor:
    """``outputs[key]`` if the model returned it (an ACT carry's labels), else ``batch[key]``."""
    value = outputs.get(key)
    if value is None:
        value = batch.get(key)
    if value is None:
        raise KeyError(f"neither the model outputs nor the batch have {key!r} (outputs: {sorted(outputs)})")
    return value


def _stablemax_transform(x: torch.Tensor) -> torch.Tensor:
    # s(x) = x + 1 for x >= 0, 1 / (1 - x) below: positive, monotone, but only linear growth, so
    # confident logits cannot blow up the way exp does ("softmax collapse", Prieto et al. 2025).
    # Each branch only sees its own half: torch.where back-propagates into both, and 1 / (1 - x) at
    # x = 1 (common with bf16 logits) would turn the discarded branch's inf into a NaN gradient.
    return torch.where(x >= 0, x.clamp(min=0) + 1, 1 / (1 - x.clamp(max=0)))


def log_stablemax(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    s = _stablemax_transform(logits)
    return torch.log(s / s.sum(dim=dim, keepdim=True))


def stablemax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-token stablemax cross-entropy (0 where the label is ignored), computed in float64."""
    log_probs = log_stablemax(logits.to(torch.float64))
    scored = labels != ignore_index
    safe = torch.where(scored, labels, torch.zeros_like(labels))
    picked = torch.gather(log_probs, -1, safe.unsqueeze(-1).long()).squeeze(-1)
    return -torch.where(scored, picked, torch.zeros_like(picked))


def softmax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-token softmax cross-entropy (0 where ignored), in float32."""
    flat = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten().long(), ignore_index=ignore_index, reduction="none")
    return flat.view(labels.shape)


# Per-token cross-entropies by name (the `kind` of the token loss terms).
TOKEN_LOSSES = {"stablemax": stablemax_cross_entropy, "softmax": softmax_cross_entropy}


def check_token_loss_kind(kind: str, owner: str) -> None:
    """Raise unless ``kind`` names a per-token cross-entropy of ``TOKEN_LOSSES``; ``owner`` names the term."""
    if kind not in TOKEN_LOSSES:
        raise ValueError(f"{owner}.kind must be 'stablemax' or 'softmax', got {kind!r}")


def mean_over_rows(per_token: torch.Tensor, labels: torch.Tensor, ignore_index: int, row_dims: int = 1) -> torch.Tensor:
    """Each row's mean over its scored tokens, then the mean over rows (a row: the first ``row_dims`` dims),
    so a row counts the same whatever its number of scored tokens."""
    counts = (labels != ignore_index).flatten(row_dims).sum(dim=-1).clamp(min=1)
    return (per_token.flatten(row_dims).sum(dim=-1) / counts).mean().float()


class TokenCrossEntropyTerm(nn.Module):
    """Token cross-entropy, ``kind="stablemax"`` (TRM/HRM default) or ``"softmax"``."""

    def __init__(
        self, weight: float = 1.0, kind: str = "stablemax", logits_key: str = "logits", labels_key: str = "labels",
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        super().__init__()
        check_token_loss_kind(kind, "TokenCrossEntropyTerm")
        self.weight, self.kind = float(weight), kind
        self.logits_key, self.labels_key, self.ignore_index = logits_key, labels_key, ignore_index

    def forward(self, outputs: dict[str, Any], batch: dict[str, Any]) -> torch.Tensor:
        logits, labels = outputs[self.logits_key], from_outputs_or_batch(outputs, batch, self.labels_key)
        if logits.shape[:-1] != labels.shape:
            raise ValueError(f"{self.logits_key!r} has shape {list(logits.shape)}, {self.labels_key!r} {list(labels.shape)}")
        return mean_over_rows(TOKEN_LOSSES[self.kind](logits, labels, self.ignore_index), labels, self.ignore_index)


class QHaltTerm(nn.Module):
    """Binary cross-entropy of ``q_halt_logits`` against "the current answer is exactly right"."""

    def __init__(self, weight: float = 0.5, labels_key: str = "labels", ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.weight, self.labels_key, self.ignore_index = float(weight), labels_key, ignore_index

    def forward(self, outputs: dict[str, Any], batch: dict[str, Any]) -> torch.Tensor:
        target = rows_correct(outputs["logits"].detach(), from_outputs_or_batch(outputs, batch, self.labels_key), self.ignore_index)
        q = outputs["q_halt_logits"].float()
        return F.binary_cross_entropy_with_logits(q, target.to(q.dtype))


class QContinueTerm(nn.Module):
    """Bootstrapped Q-learning loss for "continue" (HRM): BCE against the model's ``target_q_continue``.

    The target, sigmoid(max(Q_halt, Q_continue) at the next step) — or Q_halt at the last step — is the
    DQN-style one-step lookahead the model computes without gradients. Zero when the model did not
    compute it (evaluation, or ``bootstrap_q_continue: false``).
    """

    def __init__(self, weight: float = 0.5) -> None:
        super().__init__()
        self.weight = float(weight)

    def forward(self, outputs: dict[str, Any], batch: dict[str, Any]) -> torch.Tensor:
        target = outputs.get("target_q_continue")
        q = outputs["q_continue_logits"].float()
        if target is None:
            return q.sum() * 0.0  # graph-connected zero
        return F.binary_cross_entropy_with_logits(q, target.detach().to(q.dtype))


class PonderCostTerm(nn.Module):
    """ACT ponder cost (Graves 2016) in the per-step form of a carried ACT state.

    Every reasoning step that a row takes beyond the current one costs 1; with the halting policy's
    probability of continuing p_t = sigmoid(-q_halt) (policy ``q_halt``) or sigmoid(q_continue - q_halt)
    (``q_halt_vs_continue``), the expected extra computation this step commits to is mean_t p_t, whose
    gradient pushes the Q-head towards halting sooner. Usually given a small weight that is ramped in
    with a ``weight_schedule`` once the answers are learned.
    """

    def __init__(self, weight: float = 0.0, policy: str = "q_halt") -> None:
        super().__init__()
        if policy not in HALT_POLICIES:
            raise ValueError(f"PonderCostTerm.policy must be 'q_halt' or 'q_halt_vs_continue', got {policy!r}")
        self.weight, self.policy = float(weight), policy

    def forward(self, outputs: dict[str, Any], batch: dict[str, Any]) -> torch.Tensor:
        q_halt = outputs["q_halt_logits"].float()
        if self.policy == "q_halt":
            p_continue = torch.sigmoid(-q_halt)
        else:
            p_continue = torch.sigmoid(outputs["q_continue_logits"].float() - q_halt)
        return p_continue.mean()


class DeepSupervisionTerm(nn.Module):
    """Applies ``term`` to every supervised reasoning step of a forward and averages.

    The model returns ``step_outputs`` (one outputs dict per step) when it runs several supervised
    steps in one forward (``model.supervision_steps > 1``); otherwise — a carried ACT state trains one
    step per batch, and evaluation reports the final step — ``term`` applies to the outputs as they are.
    ``step_weighting="linear"`` weights step t by t (later, more refined answers count more).
    """

    def __init__(self, term: nn.Module, weight: float = 1.0, step_weighting: str = "uniform") -> None:
        super().__init__()
        if step_weighting not in ("uniform", "linear"):
            raise ValueError(f"DeepSupervisionTerm.step_weighting must be 'uniform' or 'linear', got {step_weighting!r}")
        if not isinstance(term, nn.Module):
            raise TypeError(f"DeepSupervisionTerm.term must be a loss term module, got {type(term).__name__}")
        self.term, self.weight, self.step_weighting = term, float(weight), step_weighting

    def forward(self, outputs: dict[str, Any], batch: dict[str, Any]) -> torch.Tensor:
        steps = outputs.get("step_outputs") or [outputs]
        weights = [1.0] * len(steps) if self.step_weighting == "uniform" else [float(t + 1) for t in range(len(steps))]
        total = sum(w * self.term(step, batch) for w, step in zip(weights, steps))
        return total / sum(weights)
