"""A loss made of named, weighted terms."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn


class CompositeLoss(nn.Module):
    """Weighted sum of named loss terms.

    Each term is an ``nn.Module`` called as ``term(outputs, batch) -> scalar`` with a float
    ``weight`` attribute. ``forward`` returns ``{"loss": sum_i weight_i * term_i, "<name>": term_i}``
    where the per-term values are unweighted and detached (for logging).
    Terms may also be given as Hydra configs (mappings with ``_target_``); they are instantiated here
    (the loss configs set ``_recursive_: false`` for that), and a term config's ``weight_schedule`` node
    (losses/weight_schedules.py) makes its weight a function of the training step.
    """

    def __init__(
        self, terms: Mapping[str, Any], weight_schedules: Mapping[str, Callable[[int], float]] | None = None
    ) -> None:
        super().__init__()
        if not terms:
            raise ValueError("CompositeLoss needs at least one term, e.g. terms={'ce': CrossEntropyTerm()}")
        built: dict[str, nn.Module] = {}
        schedules: dict[str, Callable[[int], float]] = dict(weight_schedules or {})
        for name, term in terms.items():
            name = str(name)
            if name == "loss":
                raise ValueError("a loss term cannot be named 'loss': that key holds the weighted total")
            if isinstance(term, Mapping):
                term, schedule = _instantiate(name, term)
                if schedule is not None:
                    schedules[name] = schedule
            if not isinstance(term, nn.Module):
                raise TypeError(f"loss term {name!r} must be an nn.Module, got {type(term).__name__}")
            if not hasattr(term, "weight"):
                raise TypeError(f"loss term {name!r} ({type(term).__name__}) has no 'weight' attribute")
            term.weight = float(term.weight)
            built[name] = term
        self.terms = nn.ModuleDict(built)
        unknown = sorted(set(schedules) - set(built))
        if unknown:
            raise ValueError(f"weight schedules for unknown loss terms {unknown}; terms are {list(built)}")
        self.weight_schedules = schedules

    def update_weights(self, step: int) -> None:
        """Set every scheduled term's weight for this training step."""
        for name, schedule in self.weight_schedules.items():
            self.set_weight(name, schedule(step))

    @property
    def weights(self) -> dict[str, float]:
        return {name: term.weight for name, term in self.terms.items()}

    def set_weight(self, name: str, value: float) -> None:
        """Change a term's weight (used by weight schedules)."""
        if name not in self.terms:
            raise KeyError(f"unknown loss term {name!r}; terms are {list(self.terms)}")
        self.terms[name].weight = float(value)

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        values = {name: term(outputs, batch) for name, term in self.terms.items()}
        # A zero-weight term is still reported but left out of the total, so a NaN/inf in a
        # switched-off term can't poison the loss.
        # A weight of 1 is not multiplied in: x * 1.0 == x bitwise (and so is its gradient), and on a small
        # model the extra autograd op is a measurable share of the step (bench/peers.py).
        weighted = [values[name] if term.weight == 1.0 else term.weight * values[name]
                    for name, term in self.terms.items() if term.weight != 0.0]
        if weighted:
            total = sum(weighted[1:], start=weighted[0])  # not stack: terms may differ in dtype
        else:
            # Every weight is zero: a graph-connected zero keeps backward() working.
            zeros = [torch.nan_to_num(v) * 0.0 for v in values.values()]
            total = sum(zeros[1:], start=zeros[0])
        return {"loss": total, **{name: v.detach() for name, v in values.items()}}


def _instantiate(name: str, config: Mapping[str, Any]) -> tuple[nn.Module, Callable[[int], float] | None]:
    """Build a term from its config; its optional `weight_schedule` node becomes a `step -> weight` callable."""
    if "_target_" not in config:
        raise ValueError(f"loss term {name!r} is a mapping without '_target_': {dict(config)}")
    # Imported lazily so the module works without Hydra when terms are passed as objects.
    from hydra.utils import instantiate

    config = dict(config.items())
    schedule_cfg = config.pop("weight_schedule", None)
    schedule = instantiate(schedule_cfg) if schedule_cfg is not None else None
    if schedule is not None and not callable(schedule):
        raise TypeError(f"loss term {name!r}: weight_schedule must build a callable step -> weight, got {schedule!r}")
    return instantiate(config), schedule
