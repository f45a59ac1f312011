"""An excitatory/inhibitory ring attractor for head direction (Zhang 1996), simulated with Euler steps.

`n_exc` excitatory (E) neurons prefer directions evenly spaced on the circle; `n_inh` inhibitory (I)
neurons pool the E activity and inhibit it back. Each population is a rate model in its input u
(time in seconds, rates r = phi(u) = tanh(relu(u)) in [0, 1)):

    tau_e du_e/dt = -u_e + g_ee (K * r_e)  +  g_ie W_IE r_i / n_inh  +  cue  +  poisson(noise_rate_e)
    tau_i du_i/dt = -u_i + g_ei W_EI r_e / n_exc                      +  poisson(noise_rate_i)

- `K * r_e` is the E->E recurrence: a circular convolution with a Gaussian of the angular distance
  (width `sigma_ee`, summing to 1), so neighbours excite each other and a bump of activity sustains
  itself. It is fixed; `g_ee` scales it. The convolution is done with an FFT (the kernel is circulant).
- Angular velocity w (rad/s) shifts the recurrence by s = velocity_gain * tau_e * w radians per step
  (Zhang's asymmetric weights, to first order: K(d - s) ~ K(d) - s K'(d)), which moves the bump along
  the ring at about w; the network learns `velocity_gain` so that it moves at exactly w.
- `W_EI` (E->I, [n_inh, n_exc]) and `W_IE` (I->E, [n_exc, n_inh]) are trainable and start uniform:
  global inhibition, which keeps the ring rotation-invariant (a bump at any angle is a fixed point).
  Dale's law holds by sign: E->I weights are >= 0, I->E weights <= 0 (`constraints.py` keeps it so).
- The cue is a von Mises bump of input centred on `cue_heading` (width `cue_width` radians), scaled by
  `cue_strength` (0: no cue).
- Noise: every neuron receives Poisson background input at `noise_rate_e` / `noise_rate_i` events per
  second, of size `noise_amplitude`, in its diffusion approximation (mean a*rate, white-noise intensity
  a^2*rate), so the rates are trainable by back-propagation. It is drawn from torch's global generator
  in training (checkpointed: resume stays exact) and, in evaluation, from a generator seeded by the
  batch's first trial number (the validation loss does not jitter between evaluations).

The head direction is decoded from r_e by population vector (`decoding.py`). `simulate` runs a batch
of trials at once: the loop is over time steps only, never over the batch or the neurons.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models.ring_attractor.decoding import peak_over_mean, population_vector, preferred_directions
from utils.config.errors import ConfigError

# The trainable scalars, in display order: the parameter history records them all, constraints.py bounds all
# but velocity_gain.
RING_PARAMETERS = ("g_ee", "g_ei", "g_ie", "noise_rate_e", "noise_rate_i", "velocity_gain")


def rate(u: torch.Tensor) -> torch.Tensor:
    """Firing rate from input: zero below threshold, saturating at 1 (so activity can never run away)."""
    return torch.tanh(torch.relu(u))


def ring_kernel(n: int, sigma: float) -> torch.Tensor:
    """Gaussian of the wrapped angular distance from neuron 0, summing to 1: the first row of K."""
    angles = preferred_directions(n)
    distance = torch.remainder(angles + math.pi, 2.0 * math.pi) - math.pi
    kernel = torch.exp(-0.5 * (distance / sigma) ** 2)
    return kernel / kernel.sum()


def _scalar(value: float) -> nn.Parameter:
    return nn.Parameter(torch.tensor(float(value)))


@dataclass
class RingState:
    """The inputs u of both populations, [batch, n_exc] and [batch, n_inh]."""

    u_e: torch.Tensor
    u_i: torch.Tensor


@dataclass
class Simulation:
    """What `simulate` returns: per trial and time step, what the decoder read out of the E rates."""

    decoded_heading: torch.Tensor  # [B, T] radians in [-pi, pi]
    concentration: torch.Tensor  # [B, T] resultant length of r_e in [0, 1]
    peak_over_mean: torch.Tensor  # [B, T] max(r_e) / mean(r_e)
    mean_rate_e: torch.Tensor  # [B, T]
    final_state: RingState
    rates_e: torch.Tensor | None = None  # [B, T, n_exc] when simulate(record_rates=True)


class RingAttractorNetwork(nn.Module):
    def __init__(
        self,
        n_exc: int = 800,
        n_inh: int = 200,
        sigma_ee: float = 0.3,
        tau_e: float = 0.01,
        tau_i: float = 0.005,
        g_ee: float = 5.0,
        g_ei: float = 5.0,
        g_ie: float = 2.5,
        noise_rate_e: float = 5.0,
        noise_rate_i: float = 5.0,
        noise_amplitude: float = 0.003,
        w_ei_init: float = 1.0,
        w_ie_init: float = -1.0,
        velocity_gain: float = 0.7,
        cue_width: float = 0.3,
        noise_in_eval: bool = True,
    ) -> None:
        super().__init__()
        if n_exc < 8 or n_inh < 1:
            raise ConfigError(f"model.n_exc={n_exc}, model.n_inh={n_inh}: a ring needs n_exc >= 8 and n_inh >= 1 neurons.")
        if not 0.0 < sigma_ee < math.pi:
            raise ConfigError(f"model.sigma_ee={sigma_ee} is not an angular width: give radians in (0, pi), e.g. 0.3.")
        if tau_e <= 0 or tau_i <= 0:
            raise ConfigError(f"model.tau_e={tau_e}, model.tau_i={tau_i}: time constants are seconds > 0, e.g. 0.01.")
        if noise_amplitude < 0 or cue_width <= 0:
            raise ConfigError(f"model.noise_amplitude={noise_amplitude}, model.cue_width={cue_width}: the noise's event "
                              "size must be >= 0 and the cue's width (radians) > 0, e.g. 0.003 and 0.3.")
        if w_ei_init < 0 or w_ie_init > 0:
            raise ConfigError(
                f"model.w_ei_init={w_ei_init}, model.w_ie_init={w_ie_init} break Dale's law: E->I weights start >= 0 "
                "and I->E weights <= 0 (e.g. 1.0 and -1.0)."
            )
        self.n_exc, self.n_inh, self.sigma_ee = n_exc, n_inh, sigma_ee
        self.tau_e, self.tau_i = tau_e, tau_i
        self.noise_amplitude, self.cue_width = noise_amplitude, cue_width
        self.noise_in_eval = noise_in_eval  # whether evaluation (val/...) runs with the noise; a runtime knob
        self.g_ee, self.g_ei, self.g_ie = _scalar(g_ee), _scalar(g_ei), _scalar(g_ie)
        self.noise_rate_e, self.noise_rate_i = _scalar(noise_rate_e), _scalar(noise_rate_i)
        self.velocity_gain = _scalar(velocity_gain)  # in units of tau_e (1: the first-order estimate)
        self.W_EI = nn.Parameter(torch.full((n_inh, n_exc), float(w_ei_init)))
        self.W_IE = nn.Parameter(torch.full((n_exc, n_inh), float(w_ie_init)))
        self.register_buffer("preferred", preferred_directions(n_exc))
        self.register_buffer("ee_kernel", ring_kernel(n_exc, sigma_ee))
        # Derived from ee_kernel once (it is fixed): its spectrum and the harmonic numbers 0..n/2 of the ring.
        self.register_buffer("ee_spectrum", torch.fft.rfft(self.ee_kernel), persistent=False)
        self.register_buffer("harmonics", torch.arange(n_exc // 2 + 1, dtype=torch.float32), persistent=False)

    # ------------------------------------------------------------------ inspection
    @property
    def W_EE(self) -> torch.Tensor:
        """The E->E weight matrix [n_exc, n_exc] (before g_ee): row i is the kernel centred on neuron i."""
        return torch.stack([torch.roll(self.ee_kernel, i) for i in range(self.n_exc)])

    def ring_parameters(self) -> dict[str, float]:
        """The trainable scalars (gains, noise rates, velocity gain) as plain floats."""
        return {name: float(getattr(self, name).detach()) for name in RING_PARAMETERS}

    def initial_state(self, batch_size: int, device: torch.device | None = None) -> RingState:
        """A silent ring (u = 0): the cue starts the bump."""
        device = device if device is not None else self.preferred.device
        return RingState(torch.zeros(batch_size, self.n_exc, device=device),
                         torch.zeros(batch_size, self.n_inh, device=device))

    def cue_input(self, heading: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
        """[B, n_exc]: a von Mises bump of height `strength` [B] centred on `heading` [B] (radians)."""
        concentration = 1.0 / self.cue_width**2
        shape = torch.exp(concentration * (torch.cos(self.preferred - heading[:, None]) - 1.0))
        return strength[:, None] * shape

    # ------------------------------------------------------------------ dynamics
    def euler_step(self, state: RingState, cue: torch.Tensor, angular_velocity: torch.Tensor, dt: float,
                   noise_e: torch.Tensor | None = None, noise_i: torch.Tensor | None = None) -> RingState:
        """One Euler(-Maruyama) step of dt seconds for a batch: `cue` [B, n_exc], `angular_velocity` [B] rad/s,
        `noise_e` [B, n_exc] / `noise_i` [B, n_inh] standard normal draws (None: no noise)."""
        r_e, r_i = rate(state.u_e), rate(state.u_i)
        recurrent_e = self.g_ee * self._shifted_recurrence(r_e, self.velocity_gain * self.tau_e * angular_velocity)
        inhibition_e = self.g_ie * (r_i @ self.W_IE.T) / self.n_inh
        excitation_i = self.g_ei * (r_e @ self.W_EI.T) / self.n_exc
        a = self.noise_amplitude
        drive_e = recurrent_e + inhibition_e + cue + a * self.noise_rate_e
        drive_i = excitation_i + a * self.noise_rate_i
        u_e = state.u_e + (dt / self.tau_e) * (drive_e - state.u_e)
        u_i = state.u_i + (dt / self.tau_i) * (drive_i - state.u_i)
        if noise_e is not None and noise_i is not None:
            # Poisson input in the diffusion approximation: white noise of intensity a^2 * rate, filtered by tau.
            u_e = u_e + (a * math.sqrt(dt) / self.tau_e) * torch.sqrt(self.noise_rate_e) * noise_e
            u_i = u_i + (a * math.sqrt(dt) / self.tau_i) * torch.sqrt(self.noise_rate_i) * noise_i
        return RingState(u_e, u_i)

    def _shifted_recurrence(self, r_e: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """K * r_e with the kernel shifted by `shift` [B] radians (first order), via the FFT of the ring."""
        # f(theta - s) has Fourier coefficients f_k e^{-iks} ~ f_k (1 - i k s): the input pattern moves by +s.
        rotation = torch.complex(torch.ones_like(self.harmonics).expand(len(shift), -1), -self.harmonics * shift[:, None])
        return torch.fft.irfft(torch.fft.rfft(r_e) * (self.ee_spectrum * rotation), n=self.n_exc)

    def simulate(
        self,
        cue_heading: torch.Tensor,
        cue_strength: torch.Tensor,
        angular_velocity: torch.Tensor,
        dt: float,
        noise: bool = True,
        generator: torch.Generator | None = None,
        initial_state: RingState | None = None,
        record_rates: bool = False,
    ) -> Simulation:
        """Run trials [B, T] (cue heading and strength, angular-velocity input in rad/s) for T steps of dt s.

        `generator`: where the noise comes from (None: torch's global generator). The loop is over time
        steps; each step is one batched update of every neuron of every trial.
        """
        batch, steps = cue_heading.shape
        state = initial_state if initial_state is not None else self.initial_state(batch, cue_heading.device)
        headings, lengths, shapes, means, recorded = [], [], [], [], []
        for t in range(steps):
            noise_e = noise_i = None
            if noise:
                noise_e = torch.randn(batch, self.n_exc, generator=generator, device=state.u_e.device)
                noise_i = torch.randn(batch, self.n_inh, generator=generator, device=state.u_e.device)
            cue = self.cue_input(cue_heading[:, t], cue_strength[:, t])
            state = self.euler_step(state, cue, angular_velocity[:, t], dt, noise_e, noise_i)
            r_e = rate(state.u_e)
            heading, length = population_vector(r_e, self.preferred)
            headings.append(heading)
            lengths.append(length)
            shapes.append(peak_over_mean(r_e))
            means.append(r_e.mean(dim=-1))
            if record_rates:
                recorded.append(r_e.detach())
        return Simulation(
            decoded_heading=torch.stack(headings, dim=1),
            concentration=torch.stack(lengths, dim=1),
            peak_over_mean=torch.stack(shapes, dim=1),
            mean_rate_e=torch.stack(means, dim=1),
            final_state=state,
            rates_e=torch.stack(recorded, dim=1) if record_rates else None,
        )

    # ------------------------------------------------------------------ the launcher's contract
    def forward(self, batch: dict[str, torch.Tensor], carry: Any = None) -> dict[str, torch.Tensor]:
        """A batch of trials (dataset/ring_attractor/): what the loss and the evaluators read."""
        noise = self.training or self.noise_in_eval
        generator = None
        if noise and not self.training:  # the same noise at every evaluation: a steady validation loss
            generator = torch.Generator(device=batch["cue_heading"].device).manual_seed(int(batch["trial"][0]))
        sim = self.simulate(batch["cue_heading"], batch["cue_strength"], batch["velocity_input"],
                            dt=float(batch["dt"][0]), noise=noise, generator=generator)
        return {
            "decoded_heading": sim.decoded_heading,
            "concentration": sim.concentration,
            "peak_over_mean": sim.peak_over_mean,
            "mean_rate_e": sim.mean_rate_e,
        }
