"""Adaptive computation time with a Q-head (TRM/HRM): a head that scores halting against continuing,
and the rule that turns its scores into "this row stops now"."""

from __future__ import annotations

import torch
from torch import nn

# q_halt: halt when Q(halt) > 0 (TRM); q_halt_vs_continue: halt when Q(halt) > Q(continue) (HRM).
HALT_POLICIES = ("q_halt", "q_halt_vs_continue")


class QHaltHead(nn.Linear):
    """``state`` [..., D] -> (q_halt, q_continue) logits [...] in float32.

    Starts with zero weights and both biases at ``initial_logit``: with the default -5 it almost never
    halts (sigmoid(-5) ~ 0.7%), so early training explores every step, as TRM and HRM do.
    """

    def __init__(self, hidden_size: int, initial_logit: float = -5.0) -> None:
        super().__init__(hidden_size, 2, bias=True)
        with torch.no_grad():
            self.weight.zero_()
            self.bias.fill_(initial_logit)

    def forward(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        q = super().forward(state).float()
        return q[..., 0], q[..., 1]


@torch.no_grad()
def act_halted(
    steps: torch.Tensor,
    max_steps: int,
    q_halt: torch.Tensor,
    q_continue: torch.Tensor,
    policy: str,
    exploration_prob: float,
    training: bool,
) -> torch.Tensor:
    """Bool[B]: the rows that stop after their ``steps`` (Long[B], counting the step just run).

    A row stops at ``max_steps``; in training (with more than one step allowed) also when the policy says
    so, unless exploration holds it: with probability ``exploration_prob`` a row must first run a random
    number of steps in ``2 .. max_steps``, so the Q-head also sees (and learns the value of) longer
    computations. Evaluation runs every row for ``max_steps``.
    """
    halted = steps >= max_steps
    if training and max_steps > 1:
        wants_halt = q_halt > 0 if policy == "q_halt" else q_halt > q_continue
        halted = halted | wants_halt
        explore = torch.rand_like(q_halt) < exploration_prob
        min_steps = torch.randint_like(steps, 2, max_steps + 1) * explore
        halted = halted & (steps >= min_steps)
    return halted


@torch.no_grad()
def q_halt_accuracy(q_halt: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """How often ``q_halt > 0`` agrees with "the answer is exactly right" (``correct`` Bool[B])."""
    return ((q_halt > 0) == correct).float().mean()
