"""The seed's training API for the ring attractor, as thin wrappers over the launcher's loop.

    from models.ring_attractor import RingAttractorNetwork, train_model_enhanced, quick_train

    model = RingAttractorNetwork(n_exc=800, n_inh=200, sigma_ee=0.3)
    trained_model, history, trainer = train_model_enhanced(model, learning_rate=1e-3, max_epochs=100)
    model, history = quick_train(model, epochs=50, lr=1e-3)
    trained_model, history, trainer = train_model_enhanced(model, **training_preset("conservative"))

    config = create_training_config(learning_rate=1e-3, max_epochs=150)
    trainer = AdamCosineTrainer(model, config)
    history = trainer.train()
    trainer.save_checkpoint(trainer.epoch, "my_checkpoint.pth")
    start_epoch = trainer.load_checkpoint("my_checkpoint.pth")
    trainer.param_history["g_ee"][0], trainer.param_history["g_ee"][-1]

There is no second training loop: `AdamCosineTrainer.train` composes `experiment=ring_attractor` with the
config's values as overrides and calls `utils.training.api.train` with the model instance, so the run
is the CLI's: AdamW, cosine annealing to `min_lr` over `max_epochs`, the biological constraints after
every step, early stopping on val/loss, `best.pt` and a checkpoint every epoch in the run directory,
exact resume, metrics.jsonl and plots. The checkpoints `save_checkpoint` writes are the launcher's
own (utils/storage/checkpoint.py: atomic, with a sha256 sidecar, read back with weights_only=True).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.ring_attractor.parameter_history import RingParameterHistory, current_values
from utils.config.errors import ConfigError
from utils.monitoring.plots import PLOTS_DIR, read_records
from utils.storage.checkpoint import CheckpointManager, load_checkpoint, save_with_sidecar
from utils.training.api import TrainResult, compose, train
from utils.training.trainer import Trainer

log = logging.getLogger(__name__)

EXPERIMENT = "ring_attractor"
API_RUNS = "ring_attractor_api"  # new run directories go to <paths.root>/ring_attractor_api/<time>
_PARAMETER_HISTORY = "callbacks/ring_parameters"  # where the launcher stores that callback's state


@dataclass(frozen=True)
class TrainingConfig:
    """What `create_training_config` returns: the seed's settings (its defaults) and where to train."""

    learning_rate: float = 1e-3
    max_epochs: int = 100
    min_lr: float = 1e-6
    weight_decay: float = 1e-4
    batch_size: int = 32
    early_stopping: bool = True
    patience: int = 20
    task: str = "mixed"  # cue_tracking | integration | mixed (dataset/ring_attractor/data_module.py)
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    run_dir: str | None = None  # None: a new directory under checkpoints/ring_attractor_api/
    overrides: tuple[str, ...] = field(default_factory=tuple)  # any other launcher override ("data.num_train=512")

    def to_overrides(self) -> list[str]:
        """The launcher overrides that make `experiment=ring_attractor` train with these settings."""
        return [
            f"optim.lr={self.learning_rate}", f"trainer.max_epochs={self.max_epochs}",
            f"schedule.min_lr={self.min_lr}", f"optim.weight_decay={self.weight_decay}",
            f"trainer.global_batch_size={self.batch_size}",
            f"trainer.early_stopping.enabled={str(self.early_stopping).lower()}",
            f"trainer.early_stopping.patience={self.patience}", f"data.task={self.task}",
            f"trainer.device={self.device}", f"seed={self.seed}", *self.overrides,
        ]


def create_training_config(
    learning_rate: float = 1e-3,
    max_epochs: int = 100,
    min_lr: float = 1e-6,
    weight_decay: float = 1e-4,
    batch_size: int = 32,
    early_stopping: bool = True,
    patience: int = 20,
    **more: Any,
) -> TrainingConfig:
    """A `TrainingConfig`; `more` takes its other fields (task, device, seed, run_dir, overrides)."""
    unknown = sorted(set(more) - {f.name for f in dataclasses.fields(TrainingConfig)})
    if unknown:
        known = ", ".join(f.name for f in dataclasses.fields(TrainingConfig))
        raise ConfigError(f"create_training_config got unknown settings {unknown}; the settings are: {known}.")
    for name, value, ok in (("learning_rate", learning_rate, learning_rate > 0), ("min_lr", min_lr, min_lr >= 0),
                            ("max_epochs", max_epochs, int(max_epochs) >= 1), ("batch_size", batch_size, int(batch_size) >= 1),
                            ("weight_decay", weight_decay, weight_decay >= 0), ("patience", patience, int(patience) >= 1)):
        if not ok:
            raise ConfigError(f"{name}={value!r} is out of range: learning_rate > 0, min_lr >= 0, weight_decay >= 0, "
                              "max_epochs, batch_size and patience >= 1.")
    if min_lr > learning_rate:
        raise ConfigError(f"min_lr={min_lr} is above learning_rate={learning_rate}: the cosine anneals down to min_lr.")
    overrides = tuple(more.pop("overrides", ()))
    run_dir = more.pop("run_dir", None)
    return TrainingConfig(float(learning_rate), int(max_epochs), float(min_lr), float(weight_decay), int(batch_size),
                          bool(early_stopping), int(patience), run_dir=None if run_dir is None else str(run_dir),
                          overrides=overrides, **more)


def training_preset(name: str) -> dict[str, Any]:
    """The seed's settings of the `ring=<name>` preset (conf/ring/<name>.yaml), for the functions below:

        train_model_enhanced(model, **training_preset("conservative"))
    """
    cfg = compose([f"experiment={EXPERIMENT}", f"ring={name}"])
    return {"learning_rate": float(cfg.optim.lr), "max_epochs": int(cfg.trainer.max_epochs),
            "min_lr": float(cfg.schedule.min_lr), "weight_decay": float(cfg.optim.weight_decay),
            "batch_size": int(cfg.trainer.global_batch_size), "early_stopping": bool(cfg.trainer.early_stopping.enabled),
            "patience": int(cfg.trainer.early_stopping.patience)}


def _as_config(config: TrainingConfig | Mapping[str, Any] | None) -> TrainingConfig:
    if config is None:
        return create_training_config()
    if isinstance(config, TrainingConfig):
        return config
    return create_training_config(**dict(config))


def _new_run_dir(root: Path) -> Path:
    """<root>/ring_attractor_api/<date-time>[-n], created now: every trainer trains in a directory of its own,
    even two made in the same second."""
    base = root / API_RUNS / time.strftime("%Y%m%d-%H%M%S")
    base.parent.mkdir(parents=True, exist_ok=True)
    candidate, n = base, 1
    while True:
        try:
            candidate.mkdir()  # atomic: the first trainer to create it owns it
            return candidate
        except FileExistsError:
            n += 1
            candidate = base.with_name(f"{base.name}-{n}")


def epoch_history(run_dir: Path, evaluations: Sequence[Mapping[str, float]],
                  earlier: Mapping[str, Sequence[float]] | None = None) -> dict[str, list[float]]:
    """Per evaluation (= per epoch here): the epoch, the mean train loss and gradient norm of the steps since
    the previous evaluation, the learning rate at its last step, and every validation metric (val/loss ->
    val_loss), read from the run's metrics.jsonl (the launcher logs every step of experiment=ring_attractor).

    `earlier`: the history saved with a checkpoint this run resumed from; its rows fill the evaluations
    whose steps were trained elsewhere (not in this run directory's metrics.jsonl).
    """
    train_records = [r for r in read_records(run_dir) if r.get("kind") == "train" and "train/loss" in r]
    history: dict[str, list[float]] = {"epoch": [], "step": [], "train_loss": [], "val_loss": [],
                                       "learning_rate": [], "grad_norm": []}
    earlier_steps = list(earlier["step"]) if earlier else []
    previous = 0
    for evaluation in evaluations:
        step = int(evaluation["step"])
        steps = [r for r in train_records if previous < r["step"] <= step]
        previous = step
        if not steps and step in earlier_steps:
            row = earlier_steps.index(step)
            for key, values in earlier.items():  # type: ignore[union-attr]
                history.setdefault(key, []).append(values[row])
            continue
        history["step"].append(step)
        history["epoch"].append(int(steps[-1]["epoch"]) + 1 if steps else math.nan)
        history["train_loss"].append(_mean(steps, "train/loss"))
        history["grad_norm"].append(_mean(steps, "train/grad_norm"))
        history["learning_rate"].append(steps[-1]["lr/main"] if steps else math.nan)
        for key, value in evaluation.items():
            if key.startswith("val/"):
                history.setdefault(f"val_{key.removeprefix('val/')}", []).append(value)
    return history


def _mean(records: list[dict[str, Any]], key: str) -> float:
    return sum(r[key] for r in records) / len(records) if records else math.nan


class AdamCosineTrainer:
    """Trains a RingAttractorNetwork with the launcher (see the module docstring); one run directory each."""

    def __init__(self, model: torch.nn.Module, config: TrainingConfig | Mapping[str, Any] | None = None) -> None:
        self.model = model
        self.config = _as_config(config)
        self.cfg = compose([f"experiment={EXPERIMENT}", *self.config.to_overrides()])  # a typo fails here, not later
        self.run_dir = Path(self.config.run_dir) if self.config.run_dir else _new_run_dir(Path(self.cfg.paths.root))
        self.result: TrainResult | None = None
        self.history: dict[str, list[float]] = {}
        self._loaded_param_history: dict[str, list[float]] | None = None
        self._loaded_history: dict[str, list[float]] | None = None  # the history saved with a loaded checkpoint
        self._loaded_epoch: int | None = None

    # ------------------------------------------------------------------ training
    def train(self) -> dict[str, list[float]]:
        """Train (or resume what this run directory holds) to the config's end; returns the per-epoch history."""
        self.result = train(self.cfg, model=self.model, run_dir=self.run_dir)
        self.run_dir = self.result.run_dir
        self.history = epoch_history(self.run_dir, self.result.history, earlier=self._loaded_history)
        return self.history

    @property
    def trainer(self) -> Trainer:
        """The launcher's Trainer of the last `train()` (its model, optimizers, state, callbacks)."""
        if self.result is None:
            raise RuntimeError("AdamCosineTrainer.trainer exists after train(); call train() first.")
        return self.result.trainer

    @property
    def epoch(self) -> int:
        """Epochs trained so far (0 before training)."""
        if self.result is not None:
            return self.result.trainer.state.epoch
        return self._loaded_epoch or 0

    @property
    def param_history(self) -> dict[str, list[float]]:
        """{name: [value at the start, after epoch 1, ...]} for the gains, noise rates, velocity gain and the
        E->I / I->E weight statistics (plus "step" and "epoch")."""
        if self.result is not None:
            for callback in self.result.trainer.callbacks:
                if isinstance(callback, RingParameterHistory):
                    return callback.param_history
            raise ConfigError("This run has no RingParameterHistory callback; keep callbacks=ring_attractor.")
        if self._loaded_param_history is not None:
            return self._loaded_param_history
        return {"step": [0], "epoch": [0], **{k: [v] for k, v in current_values(self.model).items()}}

    def load_best(self) -> float | None:
        """Load the best-validation weights (best.pt) into the model; returns their val/loss (None if none yet)."""
        best = self.run_dir / "best.pt"
        if not best.exists():
            return None
        state = load_checkpoint(best, map_location=_device_of(self.model))
        self.model.load_state_dict(state["model"])
        return float(state["metric"])

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, epoch: int, path: str | Path) -> Path:
        """Write a checkpoint to `path` (atomically, with a sha256 sidecar).

        After `train()` it is the launcher's complete checkpoint (weights, optimizer, schedule, RNG,
        param_history, epoch and step) plus the per-epoch history, so `load_checkpoint` + `train()` resume
        training from it; before training it holds the model's weights and `epoch`.
        """
        if self.result is not None:
            state = self.result.trainer.checkpoint_state()
        else:
            state = {"model": self.model.state_dict(), "param_history": self.param_history}
        state["ring_api"] = {"epoch": int(epoch), "history": {k: list(v) for k, v in self.history.items()}}
        path = Path(path)
        save_with_sidecar(state, path)
        return path

    def load_checkpoint(self, path: str | Path) -> int:
        """Load a checkpoint from `save_checkpoint` (or a launcher run's step file) into the model and return its
        epoch. A launcher checkpoint is also placed in this trainer's run directory, so `train()` resumes it."""
        state = load_checkpoint(Path(path), map_location=_device_of(self.model))
        self.model.load_state_dict(state["model"])
        train_state = state.get("train_state")
        if train_state is not None:
            CheckpointManager(self.run_dir).save(state, int(train_state["step"]))
            saved_history = (state.get("callbacks") or {}).get(_PARAMETER_HISTORY)
            self._loaded_param_history = saved_history["param_history"] if saved_history else None
        else:
            self._loaded_param_history = state.get("param_history")
        self.result = None  # the next train() continues from this checkpoint
        self._loaded_history = state.get("ring_api", {}).get("history") or None
        self.history = dict(self._loaded_history or {})
        epoch = state.get("ring_api", {}).get("epoch")
        self._loaded_epoch = int(epoch) if epoch is not None else int((train_state or {}).get("epoch", 0))
        return self._loaded_epoch


def _device_of(model: torch.nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


# ---------------------------------------------------------------------- the seed's functions
def train_model_enhanced(
    model: torch.nn.Module,
    learning_rate: float = 1e-3,
    max_epochs: int = 100,
    min_lr: float = 1e-6,
    weight_decay: float = 1e-4,
    batch_size: int = 32,
    early_stopping: bool = True,
    patience: int = 20,
    plot_progress: bool = True,
    restore_best: bool = True,
    **more: Any,
) -> tuple[torch.nn.Module, dict[str, list[float]], AdamCosineTrainer]:
    """Train `model` with Adam and cosine annealing; returns (model, per-epoch history, trainer).

    `restore_best`: the model comes back with its best-validation weights (best.pt), not the last epoch's.
    `plot_progress`: show the training plots (in a notebook or a window) or, without a display, say
    where their PNGs are. `more`: the other `create_training_config` settings (task, device, run_dir, ...).
    """
    config = create_training_config(learning_rate, max_epochs, min_lr, weight_decay, batch_size, early_stopping,
                                    patience, **more)
    trainer = AdamCosineTrainer(model, config)
    history = trainer.train()
    if restore_best:
        trainer.load_best()
    if plot_progress:
        show_training_plots(trainer.run_dir)
    return trainer.model, history, trainer


def quick_train(model: torch.nn.Module, epochs: int = 50, lr: float = 1e-3,
                **more: Any) -> tuple[torch.nn.Module, dict[str, list[float]]]:
    """`train_model_enhanced` for rapid prototyping: the seed's defaults, no plots; returns (model, history)."""
    more.setdefault("plot_progress", False)
    trained, history, _ = train_model_enhanced(model, learning_rate=lr, max_epochs=epochs, **more)
    return trained, history


# ---------------------------------------------------------------------- showing the plots
_NON_INTERACTIVE_BACKENDS = {"agg", "pdf", "pgf", "ps", "svg", "cairo", "template"}


def _in_notebook() -> bool:
    """True inside a Jupyter kernel (IPython already imported by it; never imported here)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None  # type: ignore[attr-defined]
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _has_display() -> bool:
    return sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def show_training_plots(run_dir: str | Path) -> list[Path]:
    """Show the PNGs of `run_dir`/plots in a notebook or a window; without either, print where they are."""
    images = sorted((Path(run_dir) / PLOTS_DIR).glob("*.png"))
    if not images:
        print(f"No training plots in {Path(run_dir) / PLOTS_DIR} yet.")
        return images
    if _in_notebook():
        from IPython.display import Image, display

        for image in images:
            display(Image(filename=str(image)))
        return images
    if _has_display():
        import matplotlib.pyplot as plt

        if plt.get_backend().lower() not in _NON_INTERACTIVE_BACKENDS:
            for image in images:
                fig = plt.figure(figsize=(10, 6))
                fig.canvas.manager.set_window_title(image.stem)  # type: ignore[union-attr]
                ax = fig.add_axes((0, 0, 1, 1))
                ax.imshow(plt.imread(image))
                ax.axis("off")
            plt.show()
            return images
    print(f"Training plots (no display here): {', '.join(str(p) for p in images)}")
    return images


__all__ = ["AdamCosineTrainer", "TrainingConfig", "create_training_config", "epoch_history", "quick_train",
           "show_training_plots", "train_model_enhanced", "training_preset"]
