"""Validation metrics accumulated as sums, so they can be all-reduced across ranks exactly.

Protocol used by the training loop: ``reset()``, ``update(outputs, batch)`` per batch, then
``sync()`` and ``compute() -> dict[str, float]``.
"""

from __future__ import annotations

import abc
import math

import torch
import torch.distributed as dist


class SumEvaluator(abc.ABC):
    """Base class: keeps named float64 sums in ``self.sums`` and knows how to all-reduce them.

    Subclasses list their sum names in ``sum_names`` and implement ``update`` and ``compute``.
    """

    sum_names: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.reset()

    def reset(self) -> None:
        self.sums = {name: torch.zeros((), dtype=torch.float64) for name in self.sum_names}

    def add(self, name: str, value: torch.Tensor | float) -> None:
        """Add to a sum, staying on the value's device so updates don't force a GPU->CPU sync."""
        value = torch.as_tensor(value)
        current = self.sums[name]
        if current.device != value.device:
            current = current.to(value.device)
        self.sums[name] = current + value.detach().to(torch.float64)

    def sync(self) -> None:
        """Sum ``self.sums`` over all ranks (no-op unless torch.distributed is initialised)."""
        if not (dist.is_available() and dist.is_initialized()) or not self.sums:
            return
        # NCCL only reduces CUDA tensors; other backends (gloo) take CPU tensors.
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        names = sorted(self.sums)  # same order on every rank
        packed = torch.stack([self.sums[n].to(device) for n in names])  # one collective, not one per sum
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        for name, value in zip(names, packed.unbind()):
            self.sums[name] = value

    @abc.abstractmethod
    def update(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> None: ...

    @abc.abstractmethod
    def compute(self) -> dict[str, float]: ...

    def _set_keys(self, logits_key: str, target_key: str, name: str, ignore_index: int) -> None:
        """Where predictions and targets live in outputs/batch, the metric's name, the ignored label."""
        self.logits_key, self.target_key, self.name, self.ignore_index = logits_key, target_key, name, ignore_index

    def _ratio(self, numerator: str, denominator: str) -> float:
        den = float(self.sums[denominator])
        # NaN rather than 0 when nothing was counted, so an empty evaluation isn't mistaken for a bad one.
        return float(self.sums[numerator]) / den if den > 0 else math.nan


def predictions_and_targets(
    evaluator_name: str, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], logits_key: str, target_key: str
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = outputs[logits_key]
    target = batch[target_key]
    if logits.shape[:-1] != target.shape:
        raise ValueError(
            f"{evaluator_name}: {logits_key!r} has shape {list(logits.shape)} but {target_key!r} has shape "
            f"{list(target.shape)}; expected logits [..., V] and targets [...]"
        )
    return logits.argmax(dim=-1), target


class Accuracy(SumEvaluator):
    """Fraction of non-ignored targets where ``argmax(logits) == target``."""

    sum_names = ("correct", "count")

    def __init__(
        self, logits_key: str = "logits", target_key: str = "target", name: str = "acc", ignore_index: int = -100
    ) -> None:
        super().__init__()
        self._set_keys(logits_key, target_key, name, ignore_index)

    def update(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> None:
        pred, target = predictions_and_targets(type(self).__name__, outputs, batch, self.logits_key, self.target_key)
        valid = target != self.ignore_index
        self.add("correct", ((pred == target) & valid).sum())
        self.add("count", valid.sum())

    def compute(self) -> dict[str, float]:
        return {self.name: self._ratio("correct", "count")}


class ExactMatch(SumEvaluator):
    """Fraction of rows (dim 0) whose every non-ignored target is predicted correctly.

    Rows with no non-ignored target are not counted.
    """

    sum_names = ("correct_rows", "rows")

    def __init__(
        self,
        logits_key: str = "logits",
        target_key: str = "target",
        name: str = "exact_match",
        ignore_index: int = -100,
    ) -> None:
        super().__init__()
        self._set_keys(logits_key, target_key, name, ignore_index)

    def update(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> None:
        pred, target = predictions_and_targets(type(self).__name__, outputs, batch, self.logits_key, self.target_key)
        rows = target.shape[0] if target.ndim > 0 else 1
        pred, target = pred.reshape(rows, -1), target.reshape(rows, -1)
        valid = target != self.ignore_index
        row_ok = ((pred == target) | ~valid).all(dim=1)
        counted = valid.any(dim=1)
        self.add("correct_rows", (row_ok & counted).sum())
        self.add("rows", counted.sum())

    def compute(self) -> dict[str, float]:
        return {self.name: self._ratio("correct_rows", "rows")}
