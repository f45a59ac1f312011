"""Per-layer gradient-flow monitoring: vanishing and exploding gradients.

``GradientMonitor.observe(model, step)`` is meant to be called by the training loop after backward and
before the optimizer step (after unscaling, for fp16). It measures the gradient norm of every
*layer* -- every module that owns parameters directly (``recurse=False``), named by its module path --
flags layers whose norm is below ``vanishing_threshold`` (vanishing) or above ``exploding_threshold``
(exploding), logs a warning naming them (at most once per ``warn_interval`` steps, so a persistent
problem does not flood the log), counts them, and returns metrics for the loop to log::

    grad_monitor/vanishing_layers, grad_monitor/exploding_layers   layers flagged at this step
    grad_monitor/min_norm, grad_monitor/max_norm, grad_monitor/median_norm
    grad_monitor/vanishing_total, grad_monitor/exploding_total     flags since the start (or load_state_dict)

Layers whose trainable parameters all have no gradient at this step (not in the graph, e.g. a
switched-off branch) are skipped, not flagged. Norms are computed on the device with one
``torch._foreach_norm`` and read back with a single host sync.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from utils.modules import unwrap_model

log = logging.getLogger(__name__)


class GradientMonitor:
    def __init__(
        self,
        vanishing_threshold: float = 1e-7,
        exploding_threshold: float = 1e3,
        warn_interval: int = 100,
        max_names_in_warning: int = 10,
    ) -> None:
        if vanishing_threshold < 0 or exploding_threshold <= vanishing_threshold:
            raise ValueError(
                f"grad_monitor thresholds must satisfy 0 <= vanishing_threshold < exploding_threshold, got "
                f"vanishing_threshold={vanishing_threshold}, exploding_threshold={exploding_threshold}"
            )
        if warn_interval < 1:
            raise ValueError(f"grad_monitor.warn_interval must be >= 1, got {warn_interval}")
        self.vanishing_threshold, self.exploding_threshold = float(vanishing_threshold), float(exploding_threshold)
        self.warn_interval, self.max_names_in_warning = warn_interval, max_names_in_warning
        self.vanishing_total = 0
        self.exploding_total = 0
        self.last_vanishing: list[str] = []
        self.last_exploding: list[str] = []
        self._layers: list[tuple[str, list[nn.Parameter]]] | None = None
        self._layers_of: int | None = None  # id() of the model the cached layer list belongs to
        self._last_warning_step: int | None = None

    # ------------------------------------------------------------------ measuring
    def _layer_params(self, model: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
        if self._layers is None or self._layers_of != id(model):
            layers = []
            for name, module in model.named_modules():
                params = [p for p in module.parameters(recurse=False) if p.requires_grad]
                if params:
                    layers.append((name or "<root>", params))
            self._layers, self._layers_of = layers, id(model)
        return self._layers

    @torch.no_grad()
    def layer_norms(self, model: nn.Module) -> dict[str, float]:
        """Gradient norm per parameter-owning module (modules without any gradient are left out)."""
        model = unwrap_model(model)
        names: list[str] = []
        grads: list[torch.Tensor] = []
        owners: list[int] = []
        for name, params in self._layer_params(model):
            present = [p.grad for p in params if p.grad is not None]
            if not present:
                continue
            names.append(name)
            for grad in present:
                grads.append(grad.detach())
                owners.append(len(names) - 1)
        if not grads:
            return {}
        devices: dict[torch.device, list[int]] = {}
        for i, grad in enumerate(grads):
            devices.setdefault(grad.device, []).append(i)
        squares = torch.zeros(len(names), dtype=torch.float64)
        for index in devices.values():  # _foreach_norm wants one device per call
            norms = torch._foreach_norm([grads[i].float() for i in index], 2.0)
            per_grad = torch.stack(norms).double().pow(2).cpu()  # the one host sync (per device)
            owner = torch.tensor([owners[i] for i in index], dtype=torch.long)
            squares.index_add_(0, owner, per_grad)
        return dict(zip(names, squares.sqrt().tolist()))

    def observe(self, model: nn.Module, step: int) -> dict[str, float]:
        """Measure and flag; returns the metrics to log."""
        norms = self.layer_norms(model)
        vanishing = [n for n, v in norms.items() if v < self.vanishing_threshold]
        exploding = [n for n, v in norms.items() if v > self.exploding_threshold or not math.isfinite(v)]
        self.vanishing_total += len(vanishing)
        self.exploding_total += len(exploding)
        self.last_vanishing, self.last_exploding = vanishing, exploding
        if (vanishing or exploding) and self._warning_due(step):
            self._last_warning_step = step
            parts = []
            if vanishing:
                parts.append(f"{len(vanishing)} vanishing (< {self.vanishing_threshold:g}): {self._names(vanishing, norms)}")
            if exploding:
                parts.append(f"{len(exploding)} exploding (> {self.exploding_threshold:g}): {self._names(exploding, norms)}")
            log.warning("Gradient monitor, step %d: %s", step, "; ".join(parts))
        values = sorted(v for v in norms.values() if math.isfinite(v))
        metrics = {
            "grad_monitor/vanishing_layers": float(len(vanishing)),
            "grad_monitor/exploding_layers": float(len(exploding)),
            "grad_monitor/vanishing_total": float(self.vanishing_total),
            "grad_monitor/exploding_total": float(self.exploding_total),
        }
        if values:
            metrics.update({
                "grad_monitor/min_norm": values[0],
                "grad_monitor/max_norm": values[-1],
                "grad_monitor/median_norm": values[len(values) // 2],
            })
        return metrics

    def _warning_due(self, step: int) -> bool:
        return self._last_warning_step is None or step - self._last_warning_step >= self.warn_interval

    def _names(self, names: list[str], norms: dict[str, float]) -> str:
        shown = ", ".join(f"{n}={norms[n]:.3g}" for n in names[: self.max_names_in_warning])
        more = len(names) - self.max_names_in_warning
        return shown + (f" (+{more} more)" if more > 0 else "")

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The counters (ints)."""
        return {"vanishing_total": self.vanishing_total, "exploding_total": self.exploding_total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.vanishing_total = int(state.get("vanishing_total", 0))
        self.exploding_total = int(state.get("exploding_total", 0))
