"""RGM: a hierarchical generative model with a recognition and a generation pass (the seed's "RGM").

Levels 0..L: level 0 is the input (784 pixels), levels 1..L hold states (`level_sizes`, e.g. 256, 64, 16).
Between level l-1 and level l there are two maps, each a linear layer and a non-linearity:

    recognition  s_l     = f(R_l s_{l-1} + a_l)       bottom-up: input -> states, level by level
    generation   p_{l-1} = g_{l-1}(G_l s_l + b_l)     top-down: a state predicts the level below it

where f is `state_activation` (`top_activation` at the top level; conf/model/rgm/hierarchy.yaml makes the
top linear) and g_{l-1} is the activation of level l-1: f for a state level, `input_activation`
(sigmoid: pixels lie in [0, 1]) for the input. One forward pass gives what the four loss terms (losses/rgm.py) read:

    states        [x, s_1, ..., s_L]          the bottom-up pass (index = level)
    predictions   [p_0, ..., p_{L-1}]         p_l = what level l+1's state predicts for level l
    generated     [x^_0, ..., x^_{L-1}]       the top-down pass from the top state alone:
                                              x^_{L-1} = p_{L-1}, x^_{l-1} = g(G_l x^_l + b_l)
    reconstruction  x^_0                      the input generated from the top state

The prediction error at level l is s_l - p_l (one level at a time); the hierarchical consistency at
level l is s_l - x^_l (the whole top-down pass against the bottom-up one). `generate_from(level, state)`
runs the generative maps from any level down to pixels (the figures use it). The model is trained by
back-propagation of the weighted sum of the terms (conf/loss/rgm.yaml).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from utils.config.errors import ConfigError

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "softplus": nn.Softplus, "identity": nn.Identity,
}


def _activation(key: str, name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ConfigError(f"model.{key}={name!r} is not a known activation; pick one of {', '.join(ACTIVATIONS)}.")
    return ACTIVATIONS[name]()


class RGM(nn.Module):
    def __init__(self, input_dim: int, level_sizes: Sequence[int] = (256, 64, 16),
                 image_shape: Sequence[int] | None = None, state_activation: str = "relu",
                 top_activation: str | None = None, input_activation: str = "sigmoid") -> None:
        super().__init__()
        sizes = [int(input_dim), *(int(s) for s in level_sizes)]
        if len(sizes) < 2 or min(sizes) <= 0:
            raise ConfigError(f"model.level_sizes must list at least one positive size (e.g. [256, 64, 16]), "
                              f"got {list(level_sizes)}.")
        if image_shape is not None and int(image_shape[0]) * int(image_shape[1]) != sizes[0]:
            raise ConfigError(f"model.image_shape={list(image_shape)} does not hold input_dim={input_dim} pixels.")
        self.sizes = sizes
        self.image_shape = tuple(int(s) for s in image_shape) if image_shape is not None else None
        self.recognition = nn.ModuleList(nn.Linear(sizes[i], sizes[i + 1]) for i in range(len(sizes) - 1))
        self.generation = nn.ModuleList(nn.Linear(sizes[i + 1], sizes[i]) for i in range(len(sizes) - 1))
        self.state_activation = _activation("state_activation", state_activation)
        self.top_activation = _activation("top_activation", top_activation or state_activation)
        self.input_activation = _activation("input_activation", input_activation)

    @property
    def num_levels(self) -> int:
        """L: the number of state levels above the input."""
        return len(self.sizes) - 1

    def recognize(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The bottom-up pass: [x, s_1, ..., s_L]."""
        states = [x]
        for level, layer in enumerate(self.recognition, start=1):
            states.append(self._activation_of(level)(layer(states[-1])))
        return states

    def _activation_of(self, level: int) -> nn.Module:
        if level == 0:
            return self.input_activation
        return self.top_activation if level == self.num_levels else self.state_activation

    def predict_below(self, level: int, state: torch.Tensor) -> torch.Tensor:
        """What a state of `level` (1..L) generates for level - 1."""
        return self._activation_of(level - 1)(self.generation[level - 1](state))

    def generate_from(self, level: int, state: torch.Tensor) -> list[torch.Tensor]:
        """The top-down pass from a state of `level` alone: [x^_0, ..., x^_{level-1}] (x^_0: pixels)."""
        generated = [state]
        for below in range(level, 0, -1):
            generated.insert(0, self.predict_below(below, generated[0]))
        return generated[:-1]

    def forward(self, batch: dict[str, torch.Tensor], carry: Any = None) -> dict[str, Any]:
        states = self.recognize(batch["x"])
        predictions = [self.predict_below(level, states[level]) for level in range(1, self.num_levels + 1)]
        generated = self.generate_from(self.num_levels, states[-1])
        with torch.no_grad():  # logged as train/... and val/... (per level; the loss terms average them)
            metrics = {}
            for level in range(self.num_levels):
                error = torch.mean((states[level] - predictions[level]) ** 2)
                metrics[f"pred_error/level{level}"] = error
                # over the variance of the level's state across the batch (1 - R^2): states that grow or
                # shrink during training leave it comparable from start to end
                metrics[f"rel_pred_error/level{level}"] = error / states[level].var(dim=0).mean().clamp_min(1e-12)
            metrics.update({f"active/level{level}": (states[level] > 0).float().mean()  # fraction of units firing
                            for level in range(1, self.num_levels + 1)
                            if isinstance(self._activation_of(level), nn.ReLU)})
        return {"states": states, "predictions": predictions, "generated": generated,
                "reconstruction": generated[0], "metrics": metrics}
