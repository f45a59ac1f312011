"""Adaptive computation time as Graves (2016) defines it, for a fixed budget of refinement steps.

Each step n of a row emits a halting probability h_n. The row halts at the first step N whose
cumulative sum reaches 1 - epsilon (or at the last step of the budget). Its steps are weighted
``p_n = h_n`` for n < N and ``p_N = R = 1 - sum_{n<N} h_n`` (the remainder), 0 after N; the output is the
p-weighted mixture of the steps' outputs. The ponder cost ``N + R`` is differentiable through R, so
penalising it teaches the halting head to stop earlier.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Halting:
    """The ACT decision of every row of a batch."""

    weights: torch.Tensor  # [B, T] p_n: the step weights (sum to 1 per row)
    steps: torch.Tensor  # [B] N, as float (no gradient)
    remainder: torch.Tensor  # [B] R (differentiable)

    @property
    def ponder_cost(self) -> torch.Tensor:
        """[B] N + R (Graves 2016, eq. 11)."""
        return self.steps + self.remainder


def graves_halting(halt_probs: torch.Tensor, epsilon: float = 0.01) -> Halting:
    """ACT weights of ``halt_probs`` [B, T] (each in [0, 1]); the last step always closes the sum."""
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"ACT epsilon must be in [0, 1), got {epsilon}")
    halt_probs = halt_probs.float()
    batch, budget = halt_probs.shape
    cumulative = halt_probs.cumsum(dim=1)
    reached = cumulative >= 1.0 - epsilon
    reached[:, -1] = True  # the budget ends the computation
    halt_step = reached.float().argmax(dim=1)  # 0-based N - 1: the first step that reached the threshold
    positions = torch.arange(budget, device=halt_probs.device).unsqueeze(0)
    before = positions < halt_step.unsqueeze(1)
    remainder = 1.0 - (halt_probs * before).sum(dim=1)
    at_halt = positions == halt_step.unsqueeze(1)
    weights = halt_probs * before + remainder.unsqueeze(1) * at_halt
    return Halting(weights=weights, steps=(halt_step + 1).float(), remainder=remainder)
