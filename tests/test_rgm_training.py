"""experiment=rgm_mnist trained for real, shrunk to seconds: its figures, the plateau schedule and early
stopping at epoch intervals, exact resume with checkpoint recovery, and the launcher's error handling
shown working for this family (exceptions reported in one line, anomaly detection, the non-finite
guard, memory in the metrics, two processes kept in step).

The runs use the embedded MNIST sample (256 training and 128 validation images, 4 steps per epoch) and
a smaller hierarchy (784 -> 32 -> 16 -> 4).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.cli_helpers import CPU, assert_tensors_equal, load, paths, read_metrics, run
from tests.test_rgm import digits, write_split
from utils.training.callbacks import Callback
from utils.training.runner import fit
from utils.training.trainer import NonFiniteError

TINY = ["experiment=rgm_mnist", "data.max_train=256", "data.max_val=128", "trainer.global_batch_size=64",
        "model.level_sizes=[32,16,4]", "trainer.eval_interval=1_epochs", "trainer.checkpoint.interval=1_epochs",
        "trainer.log_interval=1"]
NO_FIGURES = "callbacks=none"
SMALL_FIGURES = ["callbacks.rgm_figures.max_images=64", "callbacks.rgm_figures.num_features=8"]
FIGURES = ("rgm_reconstructions", "rgm_loss_components", "rgm_learning_rate", "rgm_state_activations",
           "rgm_features", "rgm_hierarchy", "rgm_error_distributions")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def rgm_cfg(make_cfg, tmp_path: Path, *overrides: str):
    return make_cfg(tmp_path, *TINY, *overrides, shrink_trainer=False, tiny_grokking=False)


class ImageRecorder:
    """A tracker (conf/logger) that keeps what it is given: the trainer logs every figure to its trackers."""

    last: "ImageRecorder | None" = None

    def __init__(self) -> None:
        self.run_id = None
        self.images: list[tuple[int, dict[str, Path]]] = []
        ImageRecorder.last = self

    def log(self, metrics: dict[str, float], step: int) -> None:
        return None

    def log_images(self, images: dict[str, Path], step: int) -> None:
        self.images.append((step, dict(images)))

    def finish(self) -> None:
        return None


class PoisonLoss(Callback):
    """Makes the loss NaN (the sparsity term's weight) at the given steps, and leaves it as it was elsewhere."""

    def __init__(self, steps: list[int]) -> None:
        self.steps = set(steps)
        self.weight: float | None = None

    def on_train_batch_start(self, trainer: Any, batch: Any) -> None:
        if self.weight is None:
            self.weight = trainer.loss_fn.weights["sparsity"]
        poisoned = trainer.state.step + 1 in self.steps
        trainer.loss_fn.set_weight("sparsity", math.nan if poisoned else self.weight)


def test_the_seven_figures_are_drawn_at_the_plot_interval_and_logged(make_cfg, tmp_path: Path) -> None:
    result = fit(rgm_cfg(make_cfg, tmp_path, *SMALL_FIGURES, "trainer.max_epochs=2", "trainer.plot_interval=1_epochs",
                         "+logger.rec={_target_:tests.test_rgm_training.ImageRecorder}"))
    plots = result.run_dir / "plots"
    for name in FIGURES:
        png = (plots / f"{name}.png").read_bytes()
        assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000, name
    logged = ImageRecorder.last.images
    assert [step for step, _ in logged] == [4, 8, 8]  # after epochs 1 and 2, and at the end
    assert all(set(FIGURES) <= set(images) for _, images in logged)
    train = read_metrics(result.run_dir, "train")
    # the learning rate at the start of every epoch (the callback), and the peak memory on logging steps
    assert [(r["step"], r["epoch"]) for r in train if "lr/main" in r and "train/loss" not in r] == [(0, 0), (4, 1)]
    assert all(r["memory/peak_rss_mib"] > 0 for r in train if "train/loss" in r)
    val = read_metrics(result.run_dir, "val")[-1]
    for key in ("val/loss", "val/reconstruction", "val/prediction_error", "val/sparsity", "val/consistency",
                "val/psnr_db", "val/pred_error/level0", "val/pred_error/level2", "val/rel_pred_error/level2",
                "val/active/level1"):
        assert math.isfinite(val[key]), key


def test_the_plateau_schedule_halves_the_lr_and_early_stopping_stops(make_cfg, tmp_path: Path) -> None:
    # No evaluation counts as an improvement after the first (a 90% gain for the schedule, 10 for early
    # stopping): the lr halves after every later evaluation and early stopping ends the run after 3 of them.
    result = fit(rgm_cfg(make_cfg, tmp_path, *SMALL_FIGURES, "trainer.max_epochs=10", "schedule.patience=0",
                         "schedule.threshold=0.9", "trainer.early_stopping.patience=3",
                         "trainer.early_stopping.min_delta=10"))
    assert result.state.epoch == 4 and "early stopping" in result.state.stop_reason
    lrs = [r["lr/main"] for r in read_metrics(result.run_dir, "train") if "lr/main" in r and "train/loss" not in r]
    assert lrs == pytest.approx([1e-3, 1e-3, 5e-4, 2.5e-4])  # at the start of epochs 0..3
    log = (result.run_dir / "train.log").read_text(encoding="utf-8")
    assert "Epoch 2: learning rate main 0.001 -> 0.0005" in log and "Epoch 3: learning rate main 0.0005 -> 0.00025" in log
    assert (result.run_dir / "best.pt").exists()


def test_resume_recovers_from_damaged_checkpoints_and_stays_bitwise_exact(make_cfg, tmp_path: Path) -> None:
    plateau = ["schedule.patience=0", "schedule.threshold=0.9"]  # the schedule's state changes at every evaluation
    straight = fit(rgm_cfg(make_cfg, tmp_path / "straight", NO_FIGURES, "trainer.max_epochs=4", *plateau))
    first = fit(rgm_cfg(make_cfg, tmp_path / "resumed", NO_FIGURES, "trainer.max_epochs=3", *plateau))
    # A crash while writing: latest.pt and the step-12 file are damaged; resume falls back to step 8.
    for name in ("latest.pt", "step_00000012.pt"):
        path = first.run_dir / name
        path.write_bytes(path.read_bytes()[:1000])
    resumed = fit(rgm_cfg(make_cfg, tmp_path / "resumed", NO_FIGURES, "trainer.max_epochs=4", *plateau))
    assert "Resumed from" in (log := (resumed.run_dir / "train.log").read_text(encoding="utf-8"))
    assert "step_00000008.pt at step 8 (epoch 2)" in log
    a, b = load(straight.run_dir / "latest.pt"), load(resumed.run_dir / "latest.pt")
    for ckpt in (a, b):
        ckpt.pop("logger_run_ids")
        ckpt["config"].pop("paths")
    assert_tensors_equal(a, b, "latest.pt")  # weights, Adam, the plateau schedule, RNG streams


def test_a_damaged_idx_file_stops_the_cli_with_one_message(tmp_path: Path) -> None:
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    write_split(raw, "t10k", *digits(40, seed=0))
    images = raw / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:5000])
    result = run("train.py", "experiment=rgm_mnist", f"data.root={tmp_path / 'mnist'}", CPU, *paths(tmp_path / "ck"),
                 timeout=120)
    assert result.returncode == 2, result
    assert f"{images} is truncated: 5000 bytes, but its header (40 x 28 x 28 bytes of data) needs 31376" in result.output
    assert "Traceback" not in result.output


def test_anomaly_detection_names_the_operation_that_made_the_nan(make_cfg, tmp_path: Path) -> None:
    cfg = rgm_cfg(make_cfg, tmp_path, NO_FIGURES, "debug=anomaly", "trainer.max_epochs=1",
                  "+callbacks.poison={_target_:tests.test_rgm_training.PoisonLoss,steps:[2]}")
    with pytest.warns(UserWarning) as warned, pytest.raises(RuntimeError, match=r"Function 'MulBackward0' returned nan values"):
        fit(cfg)
    # torch's anomaly mode also shows where the forward pass made it: the weighted sum of the loss terms
    forward = [str(w.message) for w in warned if "Traceback of forward call" in str(w.message)]
    assert forward and "losses/composite.py" in forward[0] and "term.weight * values[name]" in forward[0]


def test_a_nan_loss_is_skipped_and_a_streak_stops_naming_the_last_good_checkpoint(make_cfg, tmp_path: Path) -> None:
    once = fit(rgm_cfg(make_cfg, tmp_path / "once", NO_FIGURES, "trainer.max_epochs=2",
                       "+callbacks.poison={_target_:tests.test_rgm_training.PoisonLoss,steps:[3]}"))
    assert once.state.step == 8 and once.state.total_nonfinite == 1
    assert all(math.isfinite(r["val/loss"]) for r in read_metrics(once.run_dir, "val"))
    streak = rgm_cfg(make_cfg, tmp_path / "streak", NO_FIGURES, "trainer.max_epochs=4", "trainer.max_consecutive_nonfinite=3",
                     "+callbacks.poison={_target_:tests.test_rgm_training.PoisonLoss,steps:[6,7,8,9,10]}")
    with pytest.raises(NonFiniteError, match=r"3 consecutive non-finite .* The last good checkpoint is .*step_00000004.pt"):
        fit(streak)


@pytest.mark.slow
def test_two_processes_keep_their_weights_in_step(tmp_path: Path) -> None:
    """Device synchronisation: under torchrun (gloo) DDP averages the two processes' gradients every step, so
    the two-process run follows the one-process run with the same global batch (up to summation order)."""
    args = [*TINY, NO_FIGURES, CPU, "trainer.max_epochs=2"]
    one = run("train.py", *args, *paths(tmp_path / "one"))
    two = run("train.py", *args, "trainer.nproc_per_node=2", *paths(tmp_path / "two"))
    assert one.returncode == 0, one
    assert two.returncode == 0, two
    a = load(tmp_path / "one" / "rgm_mnist" / "latest.pt")["model"]
    b = load(tmp_path / "two" / "rgm_mnist" / "latest.pt")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
