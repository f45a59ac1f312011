"""Callbacks: code that runs at fixed points of the training loop, with checkpointed state.

The hook names follow Lightning's where they mean the same thing. Every hook is a no-op by default, so
a callback overrides only the ones it needs:

    on_fit_start(trainer)                       once, after resume, before the first step
    on_stage_start(trainer, stage)              when a curriculum stage begins (also stage 0, also on resume)
    on_train_epoch_start(trainer)               before the sampler of a new (or resumed) epoch starts
    on_train_batch_start(trainer, batch)        before the forward of every training step
                                                (trainer.state.step: the steps done so far)
    on_after_optimizer_step(trainer, batch, outputs)
                                                after the optimizer step (or a local learner's update) of a
                                                step that was taken, which trainer.state.step already counts;
                                                never for a step the non-finite guard skipped. EMA is updated
                                                after all of these (it averages the weights the callbacks
                                                leave, e.g. after constraints).
    on_validation_end(trainer, metrics)         after every evaluation, with the metrics (`val/...`)
    on_fit_end(trainer)                         once, when training stops (not after a pre-emption signal)
    make_figures(run_dir, step) -> {name: png}  with the training-curve plots (rank 0 only, no collectives)
    state_dict() / load_state_dict(state)       saved in every checkpoint, restored on resume

Where callbacks come from:
- the model, the loss, the data module and each evaluator, when they subclass `Callback`: called
  without any config (a model refreshes its DQN target network, a data module takes in new shards);
- the `callbacks` config group: `_target_` nodes by name, e.g. `callbacks=[clamp_weights]`.

Order: model, loss, data module, evaluators (in config order), then the `callbacks` group (in config
order). Checkpoint state: a callback that is an `nn.Module` (a model, a loss) already travels in that
module's own state_dict, so only the others are stored, under the names `data`, `evaluators/<name>`,
`callbacks/<name>`.

`trainer` is the running `utils.training.trainer.Trainer`; what callbacks may use of it is listed in
its class docstring (model, state, optimizers, run_dir, dist, device, log_metrics, reload_train_data).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from utils.training.curriculum import Stage
    from utils.training.trainer import Trainer


@runtime_checkable
class Callback(Protocol):
    """Subclass this (alone or next to nn.Module) and override the hooks you need."""

    def on_fit_start(self, trainer: "Trainer") -> None:
        return None

    def on_stage_start(self, trainer: "Trainer", stage: "Stage") -> None:
        return None

    def on_train_epoch_start(self, trainer: "Trainer") -> None:
        return None

    def on_train_batch_start(self, trainer: "Trainer", batch: Any) -> None:
        return None

    def on_after_optimizer_step(self, trainer: "Trainer", batch: Any, outputs: dict[str, Any]) -> None:
        return None

    def on_validation_end(self, trainer: "Trainer", metrics: dict[str, float]) -> None:
        return None

    def on_fit_end(self, trainer: "Trainer") -> None:
        return None

    def make_figures(self, run_dir: Path, step: int) -> dict[str, Path]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class CallbackList:
    """The callbacks of one run, by name, called in order."""

    def __init__(self, named: Iterable[tuple[str, Callback]]) -> None:
        self.named: list[tuple[str, Callback]] = list(named)
        names = [name for name, _ in self.named]
        if len(set(names)) != len(names):
            raise ValueError(f"callback names must be unique, got {names}")
        hooks = [name for name in vars(Callback) if name.startswith("on_")]
        self._implemented = {h for h in hooks if any(getattr(type(cb), h) is not getattr(Callback, h) for cb in self)}

    def __iter__(self) -> Iterator[Callback]:
        return (cb for _, cb in self.named)

    def __len__(self) -> int:
        return len(self.named)

    def call(self, hook: str, *args: Any) -> None:
        for cb in self:
            getattr(cb, hook)(*args)

    def implements(self, hook: str) -> bool:
        """Whether any callback overrides `hook` (the loop skips what it must do before a hook nobody uses)."""
        return hook in self._implemented

    def state_dict(self) -> dict[str, Any]:
        """State of every callback that is not an nn.Module (modules are saved with their own state)."""
        return {name: cb.state_dict() for name, cb in self.named if not isinstance(cb, torch.nn.Module)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, cb in self.named:
            if isinstance(cb, torch.nn.Module):
                continue
            if name in state:
                cb.load_state_dict(state[name])
