"""Reading the head direction out of a ring's activity, and comparing angles on the circle.

The decoded heading is the population vector (Georgopoulos 1986): each excitatory neuron votes for its
preferred direction with its rate, and the heading is the angle of the sum,

    decoded = atan2(sum_i r_i sin(theta_i), sum_i r_i cos(theta_i)).

The length of that sum divided by the total rate (the resultant length, in [0, 1]) says how concentrated
the activity is: 0 for a flat or silent ring, close to 1 for a narrow bump.
"""

from __future__ import annotations

import math

import torch

_SILENT = 1e-6  # total rate below which a ring counts as silent (no bump, resultant length 0)


def preferred_directions(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """n angles evenly spaced on [0, 2 pi): neuron i prefers 2 pi i / n."""
    return torch.arange(n, device=device, dtype=torch.float32) * (2.0 * math.pi / n)


def wrap_angle(angle: torch.Tensor) -> torch.Tensor:
    """The same angle in (-pi, pi]."""
    return torch.remainder(angle + math.pi, 2.0 * math.pi) - math.pi


def circular_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a - b on the circle, in (-pi, pi]: the signed error of `a` as an estimate of `b`."""
    return wrap_angle(a - b)


def population_vector(rates: torch.Tensor, preferred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(decoded heading in [-pi, pi], resultant length in [0, 1]) of `rates` [..., n] over the last axis."""
    x = rates @ torch.cos(preferred)
    y = rates @ torch.sin(preferred)
    total = rates.sum(dim=-1)
    heading = torch.atan2(y, x)
    length = torch.sqrt(x * x + y * y + 1e-12) / total.clamp_min(_SILENT)
    return heading, torch.where(total > _SILENT, length, torch.zeros_like(length))


def peak_over_mean(rates: torch.Tensor) -> torch.Tensor:
    """The bump's shape: the highest rate over the mean rate along the last axis (1 for a flat ring).

    A silent ring (all rates ~0) gives 1, not a division by zero: it has no bump either.
    """
    mean = rates.mean(dim=-1)
    peak = rates.amax(dim=-1)
    return torch.where(mean > _SILENT, peak / mean.clamp_min(_SILENT), torch.ones_like(mean))
