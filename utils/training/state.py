"""The progress of a run that is not a module's state_dict: what a checkpoint needs besides weights."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from utils.training.trainer import Trainer


def is_improvement(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    """The rule for a new best evaluation (best.pt, early stopping, a stage's plateau, the report): a finite
    value that beats `best` by more than `min_delta` in the direction of `mode` (max | min)."""
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken (skipped non-finite steps included: they consumed a batch)
    epoch: int = 0  # passes over the training set finished
    batches_in_epoch: int = 0  # global batches of the current epoch already consumed
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    consecutive_nonfinite: int = 0
    total_nonfinite: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # one record per evaluation
    # Curriculum: the current stage, the step it started at, and its advance criterion's progress.
    stage: int = 0
    stage_start_step: int = 0
    stage_best: float | None = None
    stage_evals_without_improvement: int = 0
    stop_reason: str | None = None  # not checkpointed: every run decides anew why it stops

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("stop_reason")
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainState":
        known = {f.name for f in fields(cls)}
        state = cls(**{k: v for k, v in values.items() if k in known})
        state.history = list(state.history)
        return state


@dataclass
class FitResult:
    metric: float | None  # the monitored metric at the best evaluation (what sweeps optimise)
    last_metrics: dict[str, float]
    state: TrainState
    run_dir: Path
    trainer: "Trainer | None" = None  # the trainer that ran (the Python API returns it)
