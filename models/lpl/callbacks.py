"""Callbacks of the LPL family (conf/callbacks/lpl/): weight clipping, BYOL's target EMA, diagnostics and exports.

* `WeightClip` keeps every trainable weight in [-max_abs, max_abs] after each step (the seed's clamp to [-5, 5]).
* `BYOLTargetEMA` moves the target network towards the online one after each step (tau = 0.99).
* `Diagnostics` logs and prints, every `every` steps, each layer's weight norm and activation variance,
  and stops the run (NonFiniteError, exit 3) when a weight or activation is NaN or infinite.
* `ExportRepresentations` writes the model's representations of a fixed set of validation pairs to
  `<run_dir>/outputs/activations/<stem>_before.pt` when a run starts at step 0 and `<stem>_after.pt` when
  training ends, atomically, on rank 0. The file holds exactly what the seed specifies (e.g.
  {'activations': (N, 128), 'labels': (N,)}); the second frames' representations, for the invariance
  score of `python -m models.lpl.analysis`, go to a sibling `<stem>_<when>_second_frame.pt`.
* `TrainingLogJSON` writes the training and validation metrics so far to `<run_dir>/outputs/<name>.json`
  at every evaluation and at the end (BYOL's `byol_training_logs.json`).

Stems and names may depend on the data (`by_data`: {data name: stem}), so that `experiment=byol data=shapes`
writes `byol_shapes_embeddings_*.pt` as the seed names them.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from utils.rng import capture_rng_state, restore_rng_state
from utils.storage.atomic import atomic_torch_save, atomic_write_text
from utils.training.callbacks import Callback

if TYPE_CHECKING:
    from utils.training.trainer import Trainer

log = logging.getLogger(__name__)

OUTPUT_DIR = Path("outputs")
ACTIVATIONS_DIR = OUTPUT_DIR / "activations"


def name_for_data(default: str, by_data: Mapping[str, str] | None, data: Any) -> str:
    """`by_data[data.name]` when given, else `default`."""
    return dict(by_data or {}).get(getattr(data, "name", ""), default)


class WeightClip(Callback):
    """Clamp every trainable parameter to [-max_abs, max_abs] after each optimizer step."""

    def __init__(self, max_abs: float = 5.0) -> None:
        if not max_abs > 0:
            raise ValueError(f"max_abs must be positive, got {max_abs}")
        self.max_abs = float(max_abs)

    def on_after_optimizer_step(self, trainer: "Trainer", batch: Any, outputs: dict[str, Any]) -> None:
        with torch.no_grad():
            for parameter in trainer.model.parameters():
                if parameter.requires_grad:
                    parameter.clamp_(-self.max_abs, self.max_abs)


class BYOLTargetEMA(Callback):
    """target <- tau * target + (1 - tau) * online, for the pairs of `model.target_pairs()`; no gradient."""

    def __init__(self, tau: float = 0.99) -> None:
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"tau must be in [0, 1], got {tau}")
        self.tau = float(tau)

    def on_after_optimizer_step(self, trainer: "Trainer", batch: Any, outputs: dict[str, Any]) -> None:
        with torch.no_grad():
            for target, online in trainer.model.target_pairs():
                for t, o in zip(target.parameters(), online.parameters()):
                    t.lerp_(o, 1.0 - self.tau)


class Diagnostics(Callback):
    """Every `every` steps: weight norm and activation variance per layer, logged and printed; NaN checks."""

    def __init__(self, every: int = 500) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = int(every)

    def measure(self, model: torch.nn.Module, outputs: dict[str, Any]) -> dict[str, float]:
        values: dict[str, float] = {}
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                values[f"diagnostics/weight_norm/{name}"] = float(parameter.detach().norm())
        for index, out in enumerate(outputs.get("layer_outputs") or [], start=1):
            values[f"diagnostics/activation_var/layer{index}"] = float(out.detach().var(dim=0).mean())
        return values

    def on_after_optimizer_step(self, trainer: "Trainer", batch: Any, outputs: dict[str, Any]) -> None:
        step = trainer.state.step
        if step % self.every:
            return
        values = self.measure(trainer.model, outputs)
        bad = sorted(name for name, value in values.items() if not math.isfinite(value))
        if bad:
            from utils.training.trainer import NonFiniteError  # here: the trainer imports the callbacks module

            log.warning("Step %d: NaN or inf in %s", step, ", ".join(bad))
            raise NonFiniteError(
                f"NaN or inf at step {step} in {', '.join(bad)}; stopped. Lower the learning rates "
                "(model.lr_pred / lr_hebb / lr_stab), check that inputs are in [0, 1], or run "
                "`python -m models.lpl.sanity_check` to test the rule alone."
            )
        trainer.log_metrics(values)
        if trainer.dist.is_main:
            text = "  ".join(f"{k.removeprefix('diagnostics/')}={v:.4g}" for k, v in values.items())
            log.info("step %d diagnostics: %s  (no NaN)", step, text)


class ExportRepresentations(Callback):
    """Representations of the first `num_samples` validation pairs before and after training."""

    def __init__(self, stem: str = "activations", by_data: Mapping[str, str] | None = None,
                 num_samples: int = 2000, batch_size: int = 500) -> None:
        self.stem, self.by_data = stem, dict(by_data or {})
        self.num_samples, self.batch_size = int(num_samples), int(batch_size)

    def paths(self, trainer: "Trainer", when: str) -> tuple[Path, Path]:
        stem = name_for_data(self.stem, self.by_data, trainer.data)
        directory = Path(trainer.run_dir) / ACTIVATIONS_DIR
        return directory / f"{stem}_{when}.pt", directory / f"{stem}_{when}_second_frame.pt"

    def on_fit_start(self, trainer: "Trainer") -> None:
        if trainer.state.step == 0:
            self.export(trainer, "before")
        elif not self.paths(trainer, "before")[0].exists():
            log.warning("Resumed at step %d without %s: the representations before training were not exported.",
                        trainer.state.step, self.paths(trainer, "before")[0].name)

    def on_fit_end(self, trainer: "Trainer") -> None:
        self.export(trainer, "after")

    def export(self, trainer: "Trainer", when: str) -> None:
        if not trainer.dist.is_main:
            return
        first, second = self.representations(trainer)
        main_path, pair_path = self.paths(trainer, when)
        atomic_torch_save(first, main_path)
        atomic_torch_save(second, pair_path)
        shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in first.items())
        log.info("Exported %s (%s)", main_path, shapes)

    def representations(self, trainer: "Trainer") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """({name: (N, dim), 'labels': (N,)} of the first frames, the same of the second frames), on the CPU."""
        model, data = trainer.model, trainer.data
        dataset = data.val_dataset
        count = min(self.num_samples, len(dataset))
        first: dict[str, list[torch.Tensor]] = {}
        second: dict[str, list[torch.Tensor]] = {}
        rng = capture_rng_state()  # an export must not shift the training RNG streams (exact resume)
        was_training = model.training
        model.eval()
        try:
            for start in range(0, count, self.batch_size):
                indices = list(range(start, min(start + self.batch_size, count)))
                batch = data.collate_fn(dataset.__getitems__(indices))
                for frame, store in (("x1", first), ("x2", second)):
                    reps = model.representations(batch[frame].to(trainer.device))
                    for key, value in {**reps, "labels": batch["label"]}.items():
                        store.setdefault(key, []).append(value.detach().cpu())
        finally:
            model.train(was_training)
            restore_rng_state(rng)
        return ({k: torch.cat(v) for k, v in first.items()}, {k: torch.cat(v) for k, v in second.items()})


class TrainingLogJSON(Callback):
    """`<run_dir>/outputs/<name>`: {'train': [...], 'val': [...]} metric records so far, written atomically."""

    def __init__(self, name: str = "training_logs.json", by_data: Mapping[str, str] | None = None) -> None:
        self.name, self.by_data = name, dict(by_data or {})

    def on_validation_end(self, trainer: "Trainer", metrics: dict[str, float]) -> None:
        self.write(trainer)

    def on_fit_end(self, trainer: "Trainer") -> None:
        self.write(trainer)

    def write(self, trainer: "Trainer") -> None:
        if not trainer.dist.is_main:
            return
        records: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
        metrics_file = Path(trainer.run_dir) / "metrics.jsonl"
        if metrics_file.exists():
            for line in metrics_file.read_text("utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line being written right now
                    continue
                if record.get("kind") in records:
                    records[record["kind"]].append(record)
        path = Path(trainer.run_dir) / OUTPUT_DIR / name_for_data(self.name, self.by_data, trainer.data)
        atomic_write_text(path, json.dumps(records, indent=1))
