"""Callbacks (utils/training/callbacks.py) in real in-process runs of the tiny grokking job.

The recording callbacks below are configured like any user's: a `_target_` node in the `callbacks`
group, or a model class that subclasses Callback (called without any config).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from models.grokking.transformer import DecoderTransformer
from pretrain import run
from tests.cli_helpers import read_metrics
from utils.config.errors import ConfigError
from utils.training.callbacks import Callback
from utils.training.runner import fit

RECORDER = "+callbacks.rec={_target_:tests.test_callbacks.Recorder}"


class Recorder(Callback):
    """Records every hook call and counts the optimizer steps it saw (its checkpointed state)."""

    instances: list["Recorder"] = []

    def __init__(self, nan_loss_at_step: int | None = None) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.steps_seen = 0
        self.nan_loss_at_step = nan_loss_at_step
        Recorder.instances.append(self)

    def on_fit_start(self, trainer: Any) -> None:
        self.calls.append(("fit_start", trainer.state.step))

    def on_stage_start(self, trainer: Any, stage: Any) -> None:
        self.calls.append(("stage_start", trainer.state.step, stage.name))

    def on_train_epoch_start(self, trainer: Any) -> None:
        self.calls.append(("epoch_start", trainer.state.epoch))

    def on_train_batch_start(self, trainer: Any, batch: Any) -> None:
        self.calls.append(("batch_start", trainer.state.step))
        if self.nan_loss_at_step is not None:  # a NaN loss at exactly one step: the guard skips that step
            nan = trainer.state.step + 1 == self.nan_loss_at_step
            trainer.loss_fn.set_weight("ce", math.nan if nan else 1.0)

    def on_after_optimizer_step(self, trainer: Any, batch: Any, outputs: dict[str, Any]) -> None:
        self.calls.append(("after_step", trainer.state.step))
        self.steps_seen += 1

    def on_validation_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        self.calls.append(("validation_end", trainer.state.step, "val/loss" in metrics))

    def on_fit_end(self, trainer: Any) -> None:
        self.calls.append(("fit_end", trainer.state.step))

    def state_dict(self) -> dict[str, Any]:
        return {"steps_seen": self.steps_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_seen = state["steps_seen"]


class StepLogger(Callback):
    """Logs a value of its own at every step taken."""

    def on_after_optimizer_step(self, trainer: Any, batch: Any, outputs: dict[str, Any]) -> None:
        trainer.log_metrics({"custom/step": float(trainer.state.step)})


class CallbackTransformer(DecoderTransformer, Callback):
    """The grokking model as a callback of its own (no config needed), with a runtime knob."""

    def __init__(self, vocab_size: int, seq_len: int, num_classes: int | None = None, **kwargs: Any) -> None:
        super().__init__(vocab_size, seq_len, num_classes, **kwargs)
        self.knob = 1.0
        self.knob_at_step: dict[int, float] = {}
        self.after_steps = 0

    def on_after_optimizer_step(self, trainer: Any, batch: Any, outputs: dict[str, Any]) -> None:
        self.after_steps += 1
        self.knob_at_step[trainer.state.step] = self.knob


@pytest.fixture(autouse=True)
def _forget_recorders() -> None:
    Recorder.instances.clear()


def test_hooks_run_in_order_and_only_for_steps_taken(make_cfg, tmp_path: Path) -> None:
    # 253 train equations / batch 64 = 3 steps per epoch; 7 steps, evaluated at 5 and at the end;
    # the loss is NaN at step 4 only: that step is skipped, so no after_step for it.
    cfg = make_cfg(tmp_path, "+callbacks.rec={_target_:tests.test_callbacks.Recorder,nan_loss_at_step:4}",
                   "trainer.max_steps=7", "trainer.eval_interval=5")
    result = fit(cfg)
    (rec,) = Recorder.instances
    assert result.state.total_nonfinite == 1
    assert rec.calls == [
        ("stage_start", 0, "main"), ("fit_start", 0),
        ("epoch_start", 0),
        ("batch_start", 0), ("after_step", 1), ("batch_start", 1), ("after_step", 2), ("batch_start", 2), ("after_step", 3),
        ("epoch_start", 1),
        ("batch_start", 3),  # step 4: non-finite, skipped
        ("batch_start", 4), ("after_step", 5), ("validation_end", 5, True), ("batch_start", 5), ("after_step", 6),
        ("epoch_start", 2),
        ("batch_start", 6), ("after_step", 7), ("validation_end", 7, True),
        ("fit_end", 7),
    ]
    assert rec.steps_seen == 6


def test_callback_state_is_checkpointed_and_restored(make_cfg, tmp_path: Path) -> None:
    fit(make_cfg(tmp_path, RECORDER, "trainer.max_steps=10"))
    resumed = fit(make_cfg(tmp_path, RECORDER, "trainer.max_steps=20"))
    first, second = Recorder.instances
    assert first.steps_seen == 10
    assert second.calls[:2] == [("stage_start", 10, "main"), ("fit_start", 10)]
    assert second.steps_seen == 20  # 10 restored from the checkpoint + 10 seen now
    assert resumed.state.step == 20


def test_a_model_that_is_a_callback_is_called_without_config(make_cfg, tmp_path: Path) -> None:
    result = fit(make_cfg(tmp_path, "model._target_=tests.test_callbacks.CallbackTransformer", "trainer.max_steps=5"))
    assert result.trainer.model.after_steps == 5


def test_a_configured_callback_must_be_a_callback(make_cfg, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"callbacks\.bad .* is not a Callback"):
        fit(make_cfg(tmp_path, "+callbacks.bad={_target_:collections.OrderedDict}"))


def test_log_metrics_writes_a_callbacks_values_at_the_current_step(make_cfg, tmp_path: Path) -> None:
    run(make_cfg(tmp_path, "+callbacks.logs={_target_:tests.test_callbacks.StepLogger}", "trainer.max_steps=3"))
    logged = [r for r in read_metrics(tmp_path / "ck" / "test", "train") if "custom/step" in r]
    assert [(r["step"], r["custom/step"]) for r in logged] == [(1, 1.0), (2, 2.0), (3, 3.0)]
