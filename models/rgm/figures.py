"""The RGM's figures as a Callback: the trainer calls `make_figures(run_dir, step)` with its standard plots.

At `trainer.plot_interval` (experiment=rgm_mnist: every 5 epochs) and at the end, seven PNGs go to
`<run_dir>/plots/` and to the trackers (W&B, TensorBoard):

    rgm_reconstructions      1. validation digits, level 1's prediction of them, the top-down generation
    rgm_loss_components      2. every loss term, training and validation, per epoch
    rgm_learning_rate        3. the learning rate per epoch with the validation loss the plateau schedule watches
    rgm_state_activations    4. the states of each level on validation images, and how often each unit is on
    rgm_features             5. the generative weights of each level as images
    rgm_hierarchy            6. what each level's state generates on its own, down to pixels
    rgm_error_distributions  7. the prediction errors of each level

It also logs the learning rate at the start of every epoch (`lr/<optimizer>`; the trainer logs it only
every `log_interval` steps) and says in the log when it changes. The images are a fixed subset of the
validation set (the first `max_images`); drawing reads the model without gradients and leaves the RNG
and the model's mode as they were, so a run with figures trains exactly like one without.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from models.rgm import plots
from models.rgm.model import RGM
from utils.config.errors import ConfigError
from utils.monitoring.plots import PLOTS_DIR, read_records, series_of
from utils.training.callbacks import Callback

if TYPE_CHECKING:
    from utils.training.trainer import Trainer

log = logging.getLogger(__name__)


class RGMFigures(Callback):
    def __init__(self, num_examples: int = 10, num_features: int = 32, max_images: int = 512) -> None:
        self.num_examples, self.num_features, self.max_images = num_examples, num_features, max_images
        self.trainer: Trainer | None = None
        self.images: dict[str, torch.Tensor] = {}
        self.last_lrs: dict[str, float] = {}

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: "Trainer") -> None:
        if not isinstance(trainer.model, RGM):
            raise ConfigError(f"callbacks.rgm_figures draws the figures of an RGM (models.rgm.model.RGM), and this run "
                              f"trains a {type(trainer.model).__name__}; leave it out with callbacks=none.")
        self.trainer = trainer
        val = trainer.data.val_dataset
        batch = trainer.data.collate_fn([val[i] for i in range(min(self.max_images, len(val)))])
        self.images = {k: v.to(trainer.device) for k, v in batch.items()}

    def on_train_epoch_start(self, trainer: "Trainer") -> None:
        lrs = {}
        for named in trainer.optimizers:
            for i, group in enumerate(named.optimizer.param_groups):
                suffix = "" if len(named.optimizer.param_groups) == 1 else f"/group{i}"
                lrs[f"lr/{named.name}{suffix}"] = float(group["lr"])
        for key, lr in lrs.items():
            before = self.last_lrs.get(key)
            if before is not None and lr != before:
                log.info("Epoch %d: learning rate %s %.3g -> %.3g", trainer.state.epoch, key.removeprefix("lr/"), before, lr)
        self.last_lrs = lrs
        trainer.log_metrics({**lrs, "epoch": trainer.state.epoch})

    def state_dict(self) -> dict[str, Any]:
        return {"last_lrs": dict(self.last_lrs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_lrs = dict(state.get("last_lrs", {}))

    # ------------------------------------------------------------------ figures
    def make_figures(self, run_dir: Path, step: int) -> dict[str, Path]:
        if self.trainer is None:
            return {}
        t = self.trainer
        steps_per_epoch = max(1, len(t.data.train_dataset) // t.global_batch_size)
        weights = dict(getattr(t.loss_fn, "weights", {}) or {})
        return draw_figures(t.model, self.images, read_records(run_dir), Path(run_dir) / PLOTS_DIR, step,
                            epoch=t.state.epoch, steps_per_epoch=steps_per_epoch, loss_weights=weights,
                            num_examples=self.num_examples, num_features=self.num_features)


def pick_examples(labels: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of `count` images: the first of each digit in turn (0, 1, ..., 9, then again), as far as there are."""
    picked: list[int] = []
    remaining = {int(d): (labels == d).nonzero().flatten().tolist() for d in labels.unique()}
    while len(picked) < min(count, len(labels)):
        for digit in sorted(remaining):
            if remaining[digit] and len(picked) < count:
                picked.append(remaining[digit].pop(0))
    return torch.tensor(picked, dtype=torch.long)


@torch.no_grad()
def draw_figures(model: RGM, batch: dict[str, torch.Tensor], records: list[dict[str, Any]], out_dir: Path,
                 step: int, epoch: int, steps_per_epoch: int, loss_weights: dict[str, float] | None = None,
                 num_examples: int = 10, num_features: int = 32) -> dict[str, Path]:
    """The seven figures of `model` on the images of `batch` ({"x", "label"}) and the run's metrics records."""
    was_training = model.training
    model.eval()
    try:
        outputs = model(batch)
    finally:
        model.train(was_training)
    shape = model.image_shape or (1, model.sizes[0])
    suffix = f" (step {step}, epoch {epoch})"
    labels = batch["label"].cpu()
    states = [s.float().cpu() for s in outputs["states"]]
    examples = pick_examples(labels, num_examples)

    def as_images(pixels: torch.Tensor) -> np.ndarray:
        return pixels[examples].reshape(len(examples), *shape).clamp(0, 1).numpy()

    figures: dict[str, Any] = {}
    figures["rgm_reconstructions"] = plots.draw_reconstructions(
        as_images(states[0]), as_images(outputs["predictions"][0].cpu()), as_images(outputs["reconstruction"].cpu()),
        labels[examples].tolist(), suffix)

    train, val = _series(records, "train", steps_per_epoch), _series(records, "val", steps_per_epoch)
    figures["rgm_loss_components"] = plots.draw_loss_components(
        {k.removeprefix("train/"): v for k, v in train.items() if k.startswith("train/")},
        {k.removeprefix("val/"): v for k, v in val.items() if k.startswith("val/")},
        loss_weights or {}, suffix)
    lr_key = next((k for k in sorted(train) if k.startswith("lr/")), None)
    if lr_key is not None:
        figures["rgm_learning_rate"] = plots.draw_learning_rate(train[lr_key], val.get("val/loss"), suffix)

    figures["rgm_state_activations"] = plots.draw_state_activations([s.numpy() for s in states[1:]], labels.numpy(), suffix)

    # Level l's generative weights in pixel space: the columns of G_1 G_2 ... G_l, for its most active units.
    fields, units, projection = [], [], None
    for level in range(1, model.num_levels + 1):
        weight = model.generation[level - 1].weight.detach().float().cpu()  # [size below, size of level]
        projection = weight if projection is None else projection @ weight
        most_active = torch.argsort(states[level].mean(dim=0), descending=True)[:num_features]
        fields.append(projection[:, most_active].T.reshape(len(most_active), *shape).numpy())
        units.append(most_active.numpy())
    figures["rgm_features"] = plots.draw_features(fields, units, suffix)

    by_level = [model.generate_from(level, outputs["states"][level])[0].cpu() for level in range(1, model.num_levels + 1)]
    figures["rgm_hierarchy"] = plots.draw_hierarchy(as_images(states[0]), [as_images(p) for p in by_level],
                                                    labels[examples].tolist(), suffix)

    errors = [(outputs["states"][level] - p).float().cpu().numpy() for level, p in enumerate(outputs["predictions"])]
    figures["rgm_error_distributions"] = plots.draw_error_distributions(errors, model.sizes, suffix)
    return {name: plots.save(fig, out_dir / f"{name}.png") for name, fig in figures.items()}


def _series(records: list[dict[str, Any]], kind: str, steps_per_epoch: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{key: (epochs, values)} of the numeric values in records of `kind`, in step order, one value per step."""
    out = {}
    for key, (steps, values) in series_of(records, kind).items():
        points = dict(zip(steps, values))  # the last value of a step, as in the file
        order = sorted(points)
        out[key] = (np.array(order) / steps_per_epoch, np.array([points[s] for s in order]))
    return out
