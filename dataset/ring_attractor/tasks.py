"""The trials of the ring attractor's tasks, generated in memory (all tensors [num_trials, steps]).

Every trial is a dict the network reads (`cue_heading`, `cue_strength`, `velocity_input`, `dt`) plus
what the loss and the evaluators compare with (`heading`, the true heading after each step;
`loss_mask`, the steps that count; `task`, which task the trial belongs to):

- cue tracking (task 0): a cue of strength `cue_strength` sits at the current heading all the time while
  the heading follows a random trajectory; the network gets no velocity input and its bump must follow
  the cue.
- angular-velocity integration (task 1, Zhang 1996): the heading stays put while the cue shows it for
  `cue_duration` seconds; then the cue is gone, the head turns along a random trajectory and the network
  gets only the angular velocity; its bump must keep track of the heading.
- bump stability (task 2, for measurements): the cue shows a heading for `cue_duration` seconds, then
  nothing at all: neither cue nor velocity; the heading stays where it was.

The first `settle_time` seconds of every trial (the bump forming) are left out of `loss_mask`.
"""

from __future__ import annotations

import torch

from dataset.ring_attractor.trajectories import integrate_heading, ornstein_uhlenbeck_velocity, random_initial_heading

CUE_TRACKING, INTEGRATION, BUMP_STABILITY = 0, 1, 2
TASK_NAMES = {CUE_TRACKING: "cue_tracking", INTEGRATION: "integration", BUMP_STABILITY: "bump_stability"}


def _steps(duration: float, dt: float, what: str) -> int:
    steps = round(duration / dt)
    if steps < 1:
        raise ValueError(f"{what}={duration} s is shorter than one time step (dt={dt} s)")
    return steps


def _trial_dict(cue_heading: torch.Tensor, cue_strength: torch.Tensor, velocity_input: torch.Tensor,
                heading: torch.Tensor, settle_steps: int, task: int, dt: float) -> dict[str, torch.Tensor]:
    num_trials, steps = heading.shape
    loss_mask = torch.ones(num_trials, steps)
    loss_mask[:, :settle_steps] = 0.0
    return {
        "cue_heading": cue_heading.contiguous(),
        "cue_strength": cue_strength.contiguous(),
        "velocity_input": velocity_input.contiguous(),
        "heading": heading.contiguous(),
        "loss_mask": loss_mask,
        "task": torch.full((num_trials,), task, dtype=torch.long),
        "dt": torch.full((num_trials,), dt),
    }


def cue_tracking_trials(num_trials: int, duration: float, dt: float, generator: torch.Generator,
                        cue_strength: float = 2.0, speed_std: float = 1.5, speed_timescale: float = 0.3,
                        settle_time: float = 0.05) -> dict[str, torch.Tensor]:
    steps = _steps(duration, dt, "duration")
    velocity = ornstein_uhlenbeck_velocity(num_trials, steps, dt, speed_std, speed_timescale, generator)
    heading = integrate_heading(random_initial_heading(num_trials, generator), velocity, dt)
    return _trial_dict(cue_heading=heading, cue_strength=torch.full((num_trials, steps), cue_strength),
                       velocity_input=torch.zeros(num_trials, steps), heading=heading,
                       settle_steps=_steps(settle_time, dt, "settle_time"), task=CUE_TRACKING, dt=dt)


def velocity_integration_trials(num_trials: int, duration: float, dt: float, generator: torch.Generator,
                                cue_duration: float = 0.1, cue_strength: float = 2.0, speed_std: float = 1.5,
                                speed_timescale: float = 0.3, settle_time: float = 0.05) -> dict[str, torch.Tensor]:
    steps, cue_steps = _steps(duration, dt, "duration"), _steps(cue_duration, dt, "cue_duration")
    velocity = ornstein_uhlenbeck_velocity(num_trials, steps, dt, speed_std, speed_timescale, generator)
    velocity[:, :cue_steps] = 0.0  # the head is still while the cue shows where it points
    initial = random_initial_heading(num_trials, generator)
    heading = integrate_heading(initial, velocity, dt)
    strength = torch.zeros(num_trials, steps)
    strength[:, :cue_steps] = cue_strength
    return _trial_dict(cue_heading=initial[:, None].expand(num_trials, steps), cue_strength=strength,
                       velocity_input=velocity, heading=heading,
                       settle_steps=_steps(settle_time, dt, "settle_time"), task=INTEGRATION, dt=dt)


def bump_stability_trials(num_trials: int, cue_duration: float, free_duration: float, dt: float,
                          generator: torch.Generator, cue_strength: float = 2.0) -> dict[str, torch.Tensor]:
    cue_steps = _steps(cue_duration, dt, "cue_duration")
    steps = cue_steps + _steps(free_duration, dt, "free_duration")
    initial = random_initial_heading(num_trials, generator)
    heading = initial[:, None].expand(num_trials, steps)
    strength = torch.zeros(num_trials, steps)
    strength[:, :cue_steps] = cue_strength
    return _trial_dict(cue_heading=heading, cue_strength=strength, velocity_input=torch.zeros(num_trials, steps),
                       heading=heading, settle_steps=cue_steps, task=BUMP_STABILITY, dt=dt)
