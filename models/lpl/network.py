"""LPL networks: one layer (3072 -> 128 on CIFAR-10) or a stack (1024 -> 128 -> 64 on shapes), no backprop.

Every layer learns with its own local rule (models/lpl/rule.py) from the pair of frames
(x(t - dt), x(t)) = (batch["x1"], batch["x2"]): layer l + 1 sees layer l's outputs for both frames and
no gradient or error signal flows between layers. All layers are updated at every step, each from
the forward pass before the step. The model is a `LocalLearner` (utils/contract.py): `local_update`
writes minus the rule's update into `weight.grad`, so `optim=sgd optim.lr=1 optim.momentum=0` applies
the rule as it is (the learning rates live in the rule: lr_pred, lr_hebb, lr_stab).

Stability, as the seed asks: the activation is squashed, f(a) = 5 tanh(a / 5) (`squash_scale`);
inputs must be float32 in [0, 1] (a ConfigError otherwise); the update norm is clipped by
`trainer.grad_clip`, weights by the weight_clip callback (conf/callbacks/lpl/stability.yaml), and a
non-finite update stops the run through the launcher's non-finite guard.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from models.lpl.inputs import flatten_images, validate_unit_interval
from models.lpl.rule import TERMS, LayerStatistics, lpl_losses, lpl_weight_updates, squash


class LPLLayer(nn.Module):
    """z = f(W x); f is the squashing tanh, or the identity when `squash_scale` is None."""

    def __init__(self, input_dim: int, output_dim: int, squash_scale: float | None, init_std: float | None) -> None:
        super().__init__()
        std = init_std if init_std is not None else 1.0 / math.sqrt(input_dim)
        self.weight = nn.Parameter(torch.randn(output_dim, input_dim) * std)
        self.squash_scale = squash_scale

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = inputs @ self.weight.T
        return pre, (pre if self.squash_scale is None else squash(pre, self.squash_scale))


class LPLNetwork(nn.Module):
    """Layers of sizes `layer_sizes` on inputs of `input_dim` (from the data), each learning with LPL.

    `lr_pred`, `lr_hebb`, `lr_stab`: learning rates of the predictive, Hebbian and decorrelation
    (stabilisation) terms; 0 switches a term off (the ablations). `epsilon` keeps 1/sigma^2 finite.
    """

    def __init__(
        self,
        input_dim: int,
        layer_sizes: Sequence[int] = (128,),
        lr_pred: float = 0.001,
        lr_hebb: float = 0.001,
        lr_stab: float = 0.0005,
        squash_scale: float | None = 5.0,
        epsilon: float = 1e-4,
        init_std: float | None = None,
    ) -> None:
        super().__init__()
        if not layer_sizes:
            raise ValueError("layer_sizes must name at least one layer")
        sizes = [int(input_dim), *map(int, layer_sizes)]
        self.layers = nn.ModuleList(
            LPLLayer(d_in, d_out, squash_scale, init_std) for d_in, d_out in zip(sizes[:-1], sizes[1:])
        )
        self.learning_rates = {"predictive": float(lr_pred), "hebbian": float(lr_hebb), "decorrelation": float(lr_stab)}
        self.squash_scale = squash_scale
        self.epsilon = epsilon

    def forward(self, batch: dict[str, torch.Tensor], carry: Any = None) -> dict[str, Any]:
        previous = flatten_images(validate_unit_interval(batch["x1"], "x1"))
        current = flatten_images(validate_unit_interval(batch["x2"], "x2"))
        inputs, pres, outs, prev_outs = [], [], [], []
        for layer in self.layers:
            _, previous_out = layer(previous)
            pre, out = layer(current)
            inputs.append(current)
            pres.append(pre)
            outs.append(out)
            prev_outs.append(previous_out)
            # The next layer learns from this layer's outputs; detached, so no gradient can flow between them.
            previous, current = previous_out.detach(), out.detach()
        terms = {name: [] for name in TERMS}
        metrics: dict[str, torch.Tensor] = {}
        for index, (out, prev_out) in enumerate(zip(outs, prev_outs), start=1):
            losses = lpl_losses(out, prev_out, self.epsilon)
            for name, value in losses.items():
                terms[name].append(value)
                if len(self.layers) > 1:  # one layer: the loss terms are already these
                    metrics[f"layer{index}/{name}"] = value.detach()
            metrics[f"layer{index}/activity_std"] = LayerStatistics.of(out).variance.sqrt().mean()
        return {
            "layer_inputs": inputs,
            "pre_activations": pres,
            "layer_outputs": outs,
            "previous_outputs": prev_outs,
            "lpl_terms": {name: torch.stack(values).sum() for name, values in terms.items()},
            "metrics": metrics,
        }

    def local_update(self, batch: dict[str, torch.Tensor], outputs: dict[str, Any]) -> None:
        for layer, inputs, pre, out, prev_out in zip(
            self.layers, outputs["layer_inputs"], outputs["pre_activations"], outputs["layer_outputs"],
            outputs["previous_outputs"],
        ):
            updates = lpl_weight_updates(inputs, pre, out, prev_out, self.squash_scale, self.epsilon)
            step = sum(self.learning_rates[name] * update for name, update in updates.items())
            layer.weight.grad = -step  # a descent direction: SGD with lr 1 adds the rule's update

    @torch.no_grad()
    def representations(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The exported activations of one frame: `activations` for one layer, `layer<k>_activations` for a stack."""
        current = flatten_images(validate_unit_interval(images, "images"))
        outs = []
        for layer in self.layers:
            _, current = layer(current)
            outs.append(current)
        if len(outs) == 1:
            return {"activations": outs[0]}
        return {f"layer{k}_activations": out for k, out in enumerate(outs, start=1)}
