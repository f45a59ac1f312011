"""Random head-direction trajectories: the angular velocity is an Ornstein-Uhlenbeck process.

A rat turning its head changes direction smoothly and often: the angular velocity w(t) relaxes to 0
with time constant `speed_timescale` seconds and has standard deviation `speed_std` rad/s (1.5 rad/s is
about 86 deg/s). The heading is the integral of w, wrapped to [-pi, pi).
"""

from __future__ import annotations

import math

import torch

from models.ring_attractor.decoding import wrap_angle


def ornstein_uhlenbeck_velocity(num_trials: int, steps: int, dt: float, speed_std: float, speed_timescale: float,
                                generator: torch.Generator) -> torch.Tensor:
    """[num_trials, steps] angular velocities (rad/s), stationary from the first step."""
    decay = math.exp(-dt / speed_timescale)
    kick = speed_std * math.sqrt(1.0 - decay**2)  # keeps the variance at speed_std^2 at every step
    noise = torch.randn(num_trials, steps, generator=generator)
    velocity = torch.empty(num_trials, steps)
    current = speed_std * noise[:, 0]
    velocity[:, 0] = current
    for t in range(1, steps):
        current = decay * current + kick * noise[:, t]
        velocity[:, t] = current
    return velocity


def integrate_heading(initial: torch.Tensor, velocity: torch.Tensor, dt: float) -> torch.Tensor:
    """Heading after each step [N, T]: initial [N] plus the running sum of velocity * dt, wrapped."""
    return wrap_angle(initial[:, None] + torch.cumsum(velocity, dim=1) * dt)


def random_initial_heading(num_trials: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform on [-pi, pi)."""
    return torch.rand(num_trials, generator=generator) * (2.0 * math.pi) - math.pi
