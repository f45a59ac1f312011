"""Schedules for loss-term weights: callables `schedule(step) -> weight`.

A loss term's config may carry a `weight_schedule` node, e.g. to ramp an ACT ponder cost in:

    ponder:
      _target_: losses.reasoning.PonderCostTerm
      weight: 0.0
      weight_schedule: {_target_: losses.weight_schedules.LinearRamp, start_value: 0.0, end_value: 0.01, end_step: 2000}

The value depends only on the step, so a resumed run gets exactly the weights it would have had.
"""

from __future__ import annotations

import math


class LinearRamp:
    """`start_value` until `start_step`, linear to `end_value` at `end_step`, flat after."""

    def __init__(self, start_value: float = 0.0, end_value: float = 1.0, start_step: int = 0, end_step: int = 1000) -> None:
        if end_step < start_step:
            raise ValueError(f"LinearRamp: end_step ({end_step}) must be >= start_step ({start_step})")
        self.start_value, self.end_value = float(start_value), float(end_value)
        self.start_step, self.end_step = int(start_step), int(end_step)

    def __call__(self, step: int) -> float:
        if step <= self.start_step:
            return self.start_value
        if step >= self.end_step:
            return self.end_value
        frac = (step - self.start_step) / (self.end_step - self.start_step)
        return self.start_value + self.ease(frac) * (self.end_value - self.start_value)

    def ease(self, frac: float) -> float:
        """The ramp's shape: how far from start to end (0..1) at a fraction ``frac`` (0..1) of its steps."""
        return frac

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.start_value} -> {self.end_value}, steps {self.start_step}..{self.end_step})"


class CosineRamp(LinearRamp):
    """Like LinearRamp but with a half-cosine shape (smooth at both ends)."""

    def ease(self, frac: float) -> float:
        return 0.5 * (1.0 - math.cos(math.pi * frac))


class StepValues:
    """Piecewise constant: `values[i]` from `boundaries[i-1]` on (values has one more entry than boundaries)."""

    def __init__(self, boundaries: list[int], values: list[float]) -> None:
        if len(values) != len(boundaries) + 1:
            raise ValueError(f"StepValues: need len(values) == len(boundaries) + 1, got {len(values)} and {len(boundaries)}")
        if list(boundaries) != sorted(boundaries):
            raise ValueError(f"StepValues: boundaries must be increasing, got {list(boundaries)}")
        self.boundaries, self.values = [int(b) for b in boundaries], [float(v) for v in values]

    def __call__(self, step: int) -> float:
        for boundary, value in zip(self.boundaries, self.values):
            if step < boundary:
                return value
        return self.values[-1]
