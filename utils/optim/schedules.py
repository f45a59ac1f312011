"""Learning-rate schedule factories.

Configured as `_partial_: true` nodes and called by the trainer as `factory(optimizer, total_steps=N)`.
All return stock torch schedulers, so `state_dict()` / `load_state_dict()` give an exact resume. The
multiplier functions are module-level and bound with functools.partial (not lambdas) so the schedulers
stay picklable.
"""

from __future__ import annotations

import math
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    LambdaLR,
    LinearLR,
    LRScheduler,
    ReduceLROnPlateau,
    SequentialLR,
)

# LinearLR cannot start at exactly 0; this is as close as matters (lr_0 ~ 1e-8 * base lr).
_LINEAR_WARMUP_START = 1e-8


def _check(total_steps: int, warmup_steps: int) -> None:
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    # warmup_steps > total_steps is allowed: shrunk runs (debug=fast) keep the preset's warm-up.
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")


def _warmup_then_cosine(step: int, total_steps: int, warmup_steps: int, lr_min_ratio: float) -> float:
    if step < warmup_steps:
        return step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)  # clamped: flat after total_steps
    return lr_min_ratio + (1.0 - lr_min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _warmup_then_constant(step: int, warmup_steps: int) -> float:
    if step < warmup_steps:
        return step / warmup_steps
    return 1.0


def cosine_with_warmup(
    optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, lr_min_ratio: float = 0.0
) -> LambdaLR:
    """Linear warmup 0 -> base lr over `warmup_steps`, cosine to base lr * lr_min_ratio at `total_steps`, flat after."""
    _check(total_steps, warmup_steps)
    if not 0.0 <= lr_min_ratio <= 1.0:
        raise ValueError(f"lr_min_ratio must be in [0, 1], got {lr_min_ratio}")
    fn = partial(
        _warmup_then_cosine, total_steps=total_steps, warmup_steps=warmup_steps, lr_min_ratio=lr_min_ratio
    )
    return LambdaLR(optimizer, fn)


def cosine_annealing(
    optimizer: Optimizer, total_steps: int, min_lr: float = 0.0, warmup_steps: int = 0
) -> LRScheduler:
    """torch CosineAnnealingLR down to `min_lr`, preceded by a LinearLR warmup when warmup_steps > 0.

    Note CosineAnnealingLR is periodic: past `total_steps` the lr climbs again, so size total_steps
    to the whole run (use `cosine_with_warmup` for a schedule that stays flat at the end).
    """
    _check(total_steps, warmup_steps)
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps), eta_min=min_lr)
    if warmup_steps == 0:
        return cosine
    warmup = LinearLR(optimizer, start_factor=_LINEAR_WARMUP_START, end_factor=1.0, total_iters=warmup_steps)
    return SequentialLR(optimizer, schedulers=[warmup, cosine], milestones=[warmup_steps])


def constant(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0) -> LambdaLR:
    """Linear warmup 0 -> base lr over `warmup_steps`, then the base lr."""
    _check(total_steps, warmup_steps)
    return LambdaLR(optimizer, partial(_warmup_then_constant, warmup_steps=warmup_steps))


def reduce_on_plateau(
    optimizer: Optimizer,
    total_steps: int,
    mode: str = "min",
    factor: float = 0.5,
    patience: int = 5,
    threshold: float = 1e-4,
    min_lr: float = 0.0,
) -> ReduceLROnPlateau:
    """Multiply the lr by `factor` after `patience` evaluations without improvement.

    `total_steps` is accepted for a uniform factory signature but unused: the trainer calls
    `.step(metric)` at each evaluation (see `steps_per_call`).
    """
    del total_steps
    return ReduceLROnPlateau(
        optimizer, mode=mode, factor=factor, patience=patience, threshold=threshold, min_lr=min_lr
    )


def scale_learning_rate(optimizer: Optimizer, scheduler: LRScheduler | ReduceLROnPlateau | None, ratio: float) -> None:
    """Multiply an optimizer's learning rates by `ratio` from now on, schedule included (a curriculum stage's
    lr_scale). Closed-form schedules (LambdaLR, the cosines' base) scale exactly; the state lands in the
    optimizer's and scheduler's state dicts, so a resume continues with the scaled rates."""
    for group in optimizer.param_groups:
        group["lr"] *= ratio
        if "initial_lr" in group:
            group["initial_lr"] *= ratio
    pending = [scheduler] if scheduler is not None else []
    while pending:
        current = pending.pop()
        if isinstance(current, SequentialLR):
            pending.extend(current._schedulers)
        if isinstance(current, LRScheduler):
            current.base_lrs = [lr * ratio for lr in current.base_lrs]
            current._last_lr = [group["lr"] for group in optimizer.param_groups]


def steps_per_call(scheduler: LRScheduler | ReduceLROnPlateau) -> str:
    """Return "eval" for schedulers stepped with a metric after each evaluation, else "step"."""
    if isinstance(scheduler, ReduceLROnPlateau):
        return "eval"
    return "step"
