"""The contract between the launcher core (utils/) and a model family (models/, dataset/, losses/).

A family is a folder of code plus config groups; the training loop has no family-specific code. Each
part is a `_target_` node in conf/ and must satisfy the matching protocol below. docs/families.md
walks through a complete family; `models/oja/` + `dataset/oja/` is a working one under 100 lines.

Batches are whatever the data module's `collate_fn` returns, usually a `dict[str, Tensor]`; the loop
only moves them to the device.

    model       Model or LocalLearner      conf/model/<family>/...
    loss        Loss                       conf/loss/...
    evaluators  Evaluator, by name         conf/evaluators/...
    data        DataModule                 conf/data/<family>/...
    callbacks   Callback, by name          conf/callbacks/...  (and any of the four above may be one too)

Constructor arguments that a model or evaluator shares with the data (a vocabulary size, a sequence
length) are filled from `data.model_kwargs()` when the config leaves them unset.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch.utils.data import Dataset

from utils.training.callbacks import Callback

__all__ = ["Callback", "DataModule", "Evaluator", "LocalLearner", "Loss", "Model"]

Batch = Any
Outputs = dict[str, Any]


class Model(Protocol):
    """An `nn.Module` trained by back-propagation of the loss.

    `forward(batch, carry=None) -> outputs`: a dict with what the loss and evaluators read, plus optionally
    - "carry": state carried to the next training batch (a dict of tensors; ACT's latents). The loop
      detaches it, feeds it back, resets it after a skipped step and stores it per rank in checkpoints.
      Evaluation always passes carry=None.
    - "metrics": scalar tensors logged as train/<name> and val/<name> (e.g. ACT's mean steps).
    Runtime knobs that a curriculum stage may set (`model: {refinement_steps: 4}` in a stage) are plain
    attributes of the model.
    """

    def __call__(self, batch: Batch, carry: dict[str, torch.Tensor] | None = None) -> Outputs: ...


@runtime_checkable
class LocalLearner(Protocol):
    """A model that learns with a local rule instead of back-propagation (Oja, Hebbian, LPL...).

    The loop runs `forward` under torch.no_grad(), computes the loss for logging only, then calls
    `local_update(batch, outputs)` (also under no_grad), which writes each trainable parameter's update into `p.grad` as a
    descent direction: the configured optimizer applies it (`optim=sgd optim.lr=1` applies it as is,
    `p -= grad`). Everything after that is the same as for back-propagation: under torchrun the updates
    are averaged across ranks (as DDP averages gradients, so the ranks stay identical), the non-finite
    guard checks them, gradient clipping bounds their norm, grad filters, frozen stages, schedules,
    EMA and callbacks apply, and checkpoints resume exactly. A rule that needs autograd for its own
    layer-local objective may use `torch.enable_grad()` inside `local_update`.
    """

    def local_update(self, batch: Batch, outputs: Outputs) -> None: ...


class Loss(Protocol):
    """`loss(outputs, batch) -> {"loss": total, "<term>": value, ...}`; every value is logged.

    `losses.composite.CompositeLoss` builds one from named, weighted terms (weights may follow a
    schedule of the step, and a curriculum stage may set them).
    """

    def __call__(self, outputs: Outputs, batch: Batch) -> dict[str, torch.Tensor]: ...


class Evaluator(Protocol):
    """Validation metrics accumulated over the validation set (`utils.evaluators.SumEvaluator`).

    `reset()` before an evaluation, `update(outputs, batch)` per batch, `sync()` to sum across ranks
    (exactly: ranks see disjoint shards), then `compute() -> {name: value}` (logged as val/<name>).
    """

    def reset(self) -> None: ...

    def update(self, outputs: Outputs, batch: Batch) -> None: ...

    def sync(self) -> None: ...

    def compute(self) -> dict[str, float]: ...


class DataModule(Protocol):
    """Builds (or waits for) a dataset on disk and serves its two splits.

    - `prepare_data(rebuild, incremental)`: make the dataset exist: build it once (see
      `dataset.base.DiskDatasetBuilder`), or wait for a builder that is running; train.py calls it before
      training, so a dataset is built once even for many ranks. `incremental=False` waits for a
      streaming builder to finish instead of returning at its first shard.
    - `setup()`: load the splits into `train_dataset` / `val_dataset` (map-style datasets).
    - `collate_fn`: how a list of items (or a `__getitems__` batch) becomes a batch; None for torch's.
    - `model_kwargs()`: facts for the model's and evaluators' constructors (vocab_size, seq_len...).
    """

    train_dataset: Dataset
    val_dataset: Dataset
    collate_fn: Any

    def prepare_data(self, rebuild: bool = False, incremental: bool = True) -> None: ...

    def setup(self) -> None: ...

    def model_kwargs(self) -> dict[str, Any]: ...
