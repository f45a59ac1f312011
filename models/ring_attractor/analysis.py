"""Measurements of a ring attractor on fresh trials: cue tracking, bump stability, velocity integration.

Each function generates its own trials (dataset/ring_attractor/tasks.py, seeded), simulates them without
gradients in evaluation mode and returns plain numbers in degrees and seconds. bench/ring_attractor.py and
the examples report them; they are Python functions over the same network code the launcher trains.

- `measure_cue_tracking`: mean |decoded - true heading| while a cue follows a random trajectory, and the
  bump's shape (peak over mean E rate, resultant length), with the network's own (trained) noise.
- `measure_bump_stability`: a cue, then nothing for `free_duration` seconds. Drift: the mean
  |displacement| of the decoded heading per second, without noise. Diffusion: D = mean(d^2) / (2 T) of
  the displacement `d` that the trained noise adds to the noiseless one, in deg^2/s.
- `measure_integration`: a cue at the initial heading, then only angular velocity for
  `integration_time` seconds; the decoding error at the end against the error of holding the initial
  heading on the same trials.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dataset.ring_attractor.tasks import bump_stability_trials, cue_tracking_trials, velocity_integration_trials
from models.ring_attractor.decoding import circular_difference
from models.ring_attractor.network import RingAttractorNetwork, Simulation

DEGREES = 180.0 / math.pi


@dataclass(frozen=True)
class TrackingResult:
    error_deg: float  # mean over trials and the steps after settle_time
    peak_over_mean: float  # the bump's peak E rate over the mean E rate, averaged the same way
    concentration: float  # resultant length of the E activity


@dataclass(frozen=True)
class StabilityResult:
    drift_deg_per_s: float  # without noise: mean |displacement| / free_duration
    diffusion_deg2_per_s: float  # with the trained noise: mean(extra displacement^2) / (2 free_duration)
    rms_displacement_deg: float  # with the trained noise: sqrt(mean(displacement^2)) after free_duration
    bump_kept: float  # fraction of trials whose bump is still there (resultant length > 0.5) at the end


@dataclass(frozen=True)
class IntegrationResult:
    final_error_deg: float  # mean |decoded - true heading| at the end of the velocity input
    hold_error_deg: float  # the same for a decoder that keeps the initial heading
    mean_error_deg: float  # over every step after the cue


def _simulate(model: RingAttractorNetwork, trials: dict[str, torch.Tensor], noise: bool, seed: int) -> Simulation:
    was_training = model.training
    model.eval()
    device = model.preferred.device
    try:
        with torch.no_grad():
            return model.simulate(trials["cue_heading"].to(device), trials["cue_strength"].to(device),
                                  trials["velocity_input"].to(device), float(trials["dt"][0]), noise=noise,
                                  generator=torch.Generator(device=device).manual_seed(seed))
    finally:
        model.train(was_training)


def measure_cue_tracking(model: RingAttractorNetwork, num_trials: int = 64, duration: float = 1.0, dt: float = 0.002,
                         cue_strength: float = 2.0, speed_std: float = 1.5, noise: bool = True,
                         seed: int = 1000) -> TrackingResult:
    trials = cue_tracking_trials(num_trials, duration, dt, torch.Generator().manual_seed(seed), cue_strength=cue_strength,
                                 speed_std=speed_std)
    sim = _simulate(model, trials, noise, seed)
    mask = trials["loss_mask"].to(sim.decoded_heading.device)
    error = circular_difference(sim.decoded_heading, trials["heading"].to(mask.device)).abs() * DEGREES
    def masked_mean(values: torch.Tensor) -> float:
        return float((values * mask).sum() / mask.sum())

    return TrackingResult(masked_mean(error), masked_mean(sim.peak_over_mean), masked_mean(sim.concentration))


def measure_bump_stability(model: RingAttractorNetwork, num_trials: int = 64, cue_duration: float = 0.2,
                           free_duration: float = 1.0, dt: float = 0.002, cue_strength: float = 2.0,
                           seed: int = 2000) -> StabilityResult:
    trials = bump_stability_trials(num_trials, cue_duration, free_duration, dt, torch.Generator().manual_seed(seed),
                                   cue_strength=cue_strength)
    cue_off = round(cue_duration / dt) - 1
    clean, noisy = _simulate(model, trials, False, seed), _simulate(model, trials, True, seed)

    def displacement(sim: Simulation) -> torch.Tensor:
        return circular_difference(sim.decoded_heading[:, -1], sim.decoded_heading[:, cue_off]) * DEGREES

    clean_d, noisy_d = displacement(clean), displacement(noisy)
    extra = noisy_d - clean_d  # what the noise adds to the deterministic drift
    return StabilityResult(
        drift_deg_per_s=float(clean_d.abs().mean()) / free_duration,
        diffusion_deg2_per_s=float((extra**2).mean()) / (2.0 * free_duration),
        rms_displacement_deg=float(noisy_d.pow(2).mean().sqrt()),
        bump_kept=float((noisy.concentration[:, -1] > 0.5).float().mean()),
    )


def measure_integration(model: RingAttractorNetwork, num_trials: int = 64, cue_duration: float = 0.1,
                        integration_time: float = 2.0, dt: float = 0.002, cue_strength: float = 2.0,
                        speed_std: float = 1.5, noise: bool = True, seed: int = 3000) -> IntegrationResult:
    trials = velocity_integration_trials(num_trials, cue_duration + integration_time, dt,
                                         torch.Generator().manual_seed(seed), cue_duration=cue_duration,
                                         cue_strength=cue_strength, speed_std=speed_std)
    sim = _simulate(model, trials, noise, seed)
    heading = trials["heading"].to(sim.decoded_heading.device)
    error = circular_difference(sim.decoded_heading, heading).abs() * DEGREES
    hold = circular_difference(trials["cue_heading"][:, 0].to(heading.device), heading[:, -1]).abs() * DEGREES
    after_cue = round(cue_duration / dt)
    return IntegrationResult(final_error_deg=float(error[:, -1].mean()), hold_error_deg=float(hold.mean()),
                             mean_error_deg=float(error[:, after_cue:].mean()))
