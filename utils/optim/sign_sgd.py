"""Sign-SGD with decoupled weight decay, updating only the embedding rows a batch used.

For learned per-puzzle embeddings (TRM/HRM): each puzzle's vector receives a gradient only in the
batches that contain it, so an Adam-style optimizer would decay and drift every other row through its
running moments. The update ``w <- w * (1 - lr * wd) - lr * sign(g)`` is applied to rows whose gradient
is non-zero and leaves the rest untouched — the sparse behaviour of TRM's puzzle-embedding optimizer on
an ordinary dense ``nn.Embedding`` (so DDP, clipping and checkpoints need nothing special). No torch
optimizer does this row-sparse sign update, hence this small class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer


class SignSGD(Optimizer):
    def __init__(self, params: Iterable[Any], lr: float = 1e-2, weight_decay: float = 0.0, rows_only: bool = True) -> None:
        if lr <= 0:
            raise ValueError(f"SignSGD: lr must be positive, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"SignSGD: weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "rows_only": rows_only})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["rows_only"] and p.ndim >= 2:
                    used = grad.flatten(1).ne(0).any(dim=1)  # rows this batch touched
                    rows = used.nonzero().squeeze(1)
                    if rows.numel() == 0:
                        continue
                    updated = p.index_select(0, rows) * (1 - lr * wd) - lr * grad.index_select(0, rows).sign()
                    p.index_copy_(0, rows, updated.to(p.dtype))
                else:
                    p.mul_(1 - lr * wd).add_(grad.sign(), alpha=-lr)
        return loss
