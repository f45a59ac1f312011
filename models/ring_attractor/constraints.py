"""Biological constraints of the ring attractor, applied after every optimizer step (a callback).

    gains        g_ee, g_ei, g_ie         in gain_range        ([0.1, 10.0])
    noise rates  noise_rate_e, _i         in noise_rate_range  ([0.1, 20.0] events/s)
    I->E         W_IE                     <= w_ie_max          (0.5)
    E->I         W_EI                     in w_ei_range        ([-0.5, 2.0])
    Dale's law   a neuron's outgoing weights keep its sign: E->I >= 0 and I->E <= 0

The bounds on W_IE and W_EI are the seed's; they allow slightly wrong-signed weights, which Dale's law
then forbids, so with `dale=True` (the default) the weights live in W_EI in [0, 2.0] and W_IE <= 0.
The callback runs in `on_after_optimizer_step`, after the optimizer and before the EMA, so the EMA and
every checkpoint only ever see constrained weights; it also runs once at the start of a fit, so a model
passed in from Python starts inside the bounds. It counts the entries it had to move (checkpointed) and
logs the counts as `constraints/<parameter>_clamped` at every evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from utils.config.errors import ConfigError
from utils.training.callbacks import Callback

if TYPE_CHECKING:
    from utils.training.trainer import Trainer

GAINS = ("g_ee", "g_ei", "g_ie")
NOISE_RATES = ("noise_rate_e", "noise_rate_i")
CONSTRAINED = (*GAINS, *NOISE_RATES, "W_EI", "W_IE")


@dataclass(frozen=True)
class ConstraintBounds:
    gain_range: tuple[float, float] = (0.1, 10.0)
    noise_rate_range: tuple[float, float] = (0.1, 20.0)
    w_ie_max: float = 0.5
    w_ei_range: tuple[float, float] = (-0.5, 2.0)
    dale: bool = True

    def interval(self, name: str) -> tuple[float, float]:
        """The closed interval parameter `name` must lie in (Dale's law included)."""
        if name in GAINS:
            return self.gain_range
        if name in NOISE_RATES:
            return self.noise_rate_range
        if name == "W_EI":  # E->I: excitatory, so >= 0 under Dale's law
            low, high = self.w_ei_range
            return (max(low, 0.0) if self.dale else low, high)
        if name == "W_IE":  # I->E: inhibitory, so <= 0 under Dale's law
            return (-float("inf"), min(self.w_ie_max, 0.0) if self.dale else self.w_ie_max)
        raise KeyError(f"no constraint on {name!r}; the constrained parameters are {', '.join(CONSTRAINED)}")


def apply_constraints(model: torch.nn.Module, bounds: ConstraintBounds) -> dict[str, int]:
    """Clamp every constrained parameter of `model` into its interval, in place; entries moved, by name."""
    moved = {}
    with torch.no_grad():
        for name in CONSTRAINED:
            param: torch.Tensor = getattr(model, name)
            low, high = bounds.interval(name)
            outside = (param < low) | (param > high)
            moved[name] = int(outside.sum())
            if moved[name]:
                param.clamp_(min=low, max=high)
    return moved


def constraint_violations(model: torch.nn.Module, bounds: ConstraintBounds) -> dict[str, float]:
    """How far each constrained parameter lies outside its interval (0.0 everywhere inside)."""
    out = {}
    with torch.no_grad():
        for name in CONSTRAINED:
            param = getattr(model, name).detach()
            low, high = bounds.interval(name)
            out[name] = float(torch.clamp(low - param, min=0).max().maximum(torch.clamp(param - high, min=0).max()))
    return out


def _pair(value: Sequence[float], key: str) -> tuple[float, float]:
    if len(value) != 2 or not float(value[0]) < float(value[1]):
        raise ConfigError(f"callbacks.ring_constraints.{key}={list(value)} must be [low, high] with low < high.")
    return float(value[0]), float(value[1])


class BiologicalConstraints(Callback):
    def __init__(self, gain_range: Sequence[float] = (0.1, 10.0), noise_rate_range: Sequence[float] = (0.1, 20.0),
                 w_ie_max: float = 0.5, w_ei_range: Sequence[float] = (-0.5, 2.0), dale: bool = True) -> None:
        self.bounds = ConstraintBounds(_pair(gain_range, "gain_range"), _pair(noise_rate_range, "noise_rate_range"),
                                       float(w_ie_max), _pair(w_ei_range, "w_ei_range"), bool(dale))
        if self.bounds.gain_range[0] <= 0 or self.bounds.noise_rate_range[0] <= 0:
            raise ConfigError("callbacks.ring_constraints: gain_range and noise_rate_range must stay positive "
                              f"(got {list(gain_range)}, {list(noise_rate_range)}); e.g. [0.1, 10.0].")
        self.clamped = {name: 0 for name in CONSTRAINED}  # entries moved back inside, over the whole run

    def _apply(self, trainer: "Trainer") -> None:
        missing = [name for name in CONSTRAINED if not hasattr(trainer.model, name)]
        if missing:
            raise ConfigError(
                f"callbacks.ring_constraints constrains a ring attractor, but {type(trainer.model).__name__} has no "
                f"{', '.join(missing)}; use it with model=ring_attractor/network (or drop the callback)."
            )
        for name, count in apply_constraints(trainer.model, self.bounds).items():
            self.clamped[name] += count

    def on_fit_start(self, trainer: "Trainer") -> None:
        self._apply(trainer)

    def on_after_optimizer_step(self, trainer: "Trainer", batch: Any, outputs: dict[str, Any]) -> None:
        self._apply(trainer)

    def on_validation_end(self, trainer: "Trainer", metrics: dict[str, float]) -> None:
        trainer.log_metrics({f"constraints/{name}_clamped": float(count) for name, count in self.clamped.items()})

    def state_dict(self) -> dict[str, Any]:
        return {"clamped": dict(self.clamped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clamped = {name: int(state["clamped"].get(name, 0)) for name in CONSTRAINED}
