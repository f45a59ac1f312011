"""Exponential moving average of model weights (and buffers), for evaluation.

Built on torch.optim.swa_utils.AveragedModel with `get_ema_multi_avg_fn`, so the update is one fused
`lerp` per device/dtype group: `ema = decay * ema + (1 - decay) * weights`.

The first `update()` copies the model's weights (AveragedModel's convention); averaging starts with
the second. Buffers are averaged too (`use_buffers=True`, e.g. BatchNorm running statistics), except
integer buffers such as `num_batches_tracked`, which are copied: averaging an integer truncates it.

Buffers a model lists in `_ddp_params_and_buffers_to_ignore` (per-process state that DDP must not sync
either, e.g. a DQN replay buffer) are not averaged: averaging stored experiences means nothing and
would cost a pass over the whole storage every step.

"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from utils.modules import unwrap_model


class _EMAUpdate:
    """multi_avg_fn for AveragedModel: torch's EMA lerp for float tensors, a plain copy for integer ones."""

    def __init__(self, decay: float) -> None:
        self._float_update = get_ema_multi_avg_fn(decay)
        self.skip: set[int] = set()  # data_ptr() of EMA-side tensors left alone

    def __call__(self, ema: list[torch.Tensor], current: list[torch.Tensor], n_averaged: Any) -> None:
        if self.skip:
            # AveragedModel hands over fresh detached views each call, so storage pointers identify them.
            pairs = [(e, c) for e, c in zip(ema, current) if e.data_ptr() not in self.skip]
            if not pairs:
                return
            ema, current = [e for e, _ in pairs], [c for _, c in pairs]
        # AveragedModel groups tensors by dtype, so checking the first of a group is enough.
        if torch.is_floating_point(ema[0]) or torch.is_complex(ema[0]):
            self._float_update(ema, current, n_averaged)
        else:
            torch._foreach_copy_(ema, current)


class ModelEMA:
    def __init__(self, model: torch.nn.Module, decay: float = 0.999) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.decay = decay
        self._update_fn = _EMAUpdate(decay)
        self._avg = AveragedModel(unwrap_model(model), multi_avg_fn=self._update_fn, use_buffers=True)
        # The copy is only ever evaluated; keeping autograd off it avoids building graphs by accident.
        self._avg.requires_grad_(False)
        not_averaged = set(getattr(unwrap_model(model), "_ddp_params_and_buffers_to_ignore", ()))
        self._update_fn.skip = {t.data_ptr() for n, t in self._avg.module.named_buffers() if n in not_averaged}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Fold the model's current weights and buffers into the average (call after optimizer.step())."""
        self._avg.update_parameters(unwrap_model(model))

    @property
    def module(self) -> torch.nn.Module:
        """The averaged copy of the model (use for evaluation)."""
        return self._avg.module

    def state_dict(self) -> dict[str, Any]:
        return self._avg.state_dict()  # "module.<name>" entries plus "n_averaged"

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._avg.load_state_dict(state)
