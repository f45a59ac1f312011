"""Intervals in steps or epochs (utils/training/intervals.py) and the Python API (utils/training/api.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.oja.network import OjaNetwork
from tests.cli_helpers import read_metrics, step_files
from utils.config.errors import ConfigError
from utils.training.api import compose, train
from utils.training.intervals import Interval, parse_interval
from utils.training.runner import fit


@pytest.mark.parametrize(
    ("value", "expected"),
    [(100, Interval(100, "step")), ("100", Interval(100, "step")), ("100 steps", Interval(100, "step")),
     ("1 step", Interval(1, "step")), ("5 epochs", Interval(5, "epoch")), ("1 epoch", Interval(1, "epoch")),
     ("5_epochs", Interval(5, "epoch")), ("2epochs", Interval(2, "epoch"))],
)
def test_interval_spellings(value, expected) -> None:
    assert parse_interval(value, "trainer.eval_interval") == expected


@pytest.mark.parametrize("value", [0, -3, "5 minutes", "epochs", True, "1.5 epochs"])
def test_bad_intervals_name_the_key(value) -> None:
    with pytest.raises(ConfigError, match=r"trainer\.eval_interval"):
        parse_interval(value, "trainer.eval_interval")


def test_evaluation_checkpoint_and_plot_intervals_in_epochs(make_cfg, tmp_path: Path) -> None:
    # 253 train equations / batch 64: 3 steps per epoch; 6 epochs = 18 steps.
    cfg = make_cfg(tmp_path, "trainer.max_steps=1000", "trainer.max_epochs=6", "trainer.eval_interval=2_epochs",
                   "trainer.checkpoint.interval=1_epoch", "trainer.checkpoint.keep_last=10", "trainer.plot_interval=3_epochs")
    result = fit(cfg)
    run_dir = tmp_path / "ck" / "test"
    assert result.state.step == 18 and result.state.epoch == 6
    assert [r["step"] for r in read_metrics(run_dir, "val")] == [6, 12, 18]
    assert step_files(run_dir) == [3, 6, 9, 12, 15, 18]
    assert (run_dir / "plots" / "loss.png").exists()


def test_a_schedule_spans_max_epochs_when_they_end_the_run_before_max_steps(make_cfg, tmp_path: Path) -> None:
    # 3 steps per epoch, 4 epochs: the cosine reaches min_lr at step 12 (the run's end), not at max_steps=1000.
    cfg = make_cfg(tmp_path, "schedule=cosine_annealing", "schedule.min_lr=1e-5", "optim.lr=1e-3",
                   "trainer.max_steps=1000", "trainer.max_epochs=4")
    fit(cfg)
    lr = {r["step"]: r["lr/main"] for r in read_metrics(tmp_path / "ck" / "test", "train")}
    assert lr[6] == pytest.approx((1e-3 + 1e-5) / 2) and lr[12] == pytest.approx(1e-5)


def test_drop_last_false_keeps_the_short_batch_and_resumes_exactly(make_cfg, tmp_path: Path) -> None:
    # 253 train equations / batch 64: 3 full batches and one of 61 per epoch.
    common = ("trainer.drop_last=false", "trainer.max_steps=1000", "trainer.max_epochs=3", "trainer.eval_interval=100")
    straight = fit(make_cfg(tmp_path / "a", *common))
    assert straight.state.step == 12 and straight.state.epoch == 3
    for stop in (3, 4):  # just before the short batch, and right after it (the epoch's end)
        fit(make_cfg(tmp_path / f"b{stop}", *common, f"trainer.max_steps={stop}"))
        resumed = fit(make_cfg(tmp_path / f"b{stop}", *common))
        assert resumed.state.step == 12
        for name, tensor in straight.trainer.model.state_dict().items():
            assert torch.equal(tensor, resumed.trainer.model.state_dict()[name]), (stop, name)


def test_a_typo_fails_in_compose_as_on_the_command_line() -> None:
    with pytest.raises(Exception, match="max_stepz"):
        compose(["trainer.max_stepz=3"])
    with pytest.raises(ConfigError, match=r"model\.widht"):
        compose(["+model.widht=3"])


def test_train_returns_the_metric_the_history_and_the_trainer_and_resumes(tmp_path: Path, single_process) -> None:
    overrides = ["experiment=oja_pca", "trainer.max_steps=200", "trainer.early_stopping.enabled=false",
                 f"paths.root={tmp_path}", "trainer.device=cpu"]
    result = train(overrides)
    assert result.run_dir == (tmp_path / "oja_pca").resolve()
    assert [h["step"] for h in result.history] == [100, 200]
    assert result.metric == min(h["val/loss"] for h in result.history)
    assert result.trainer.state.step == 200 and result.model is result.trainer.model
    again = train(overrides)  # the same run directory: resumed, nothing left to do
    assert again.trainer.state.step == 200 and again.history == result.history
    fresh = train(overrides, fresh=True)  # moved aside, trained from scratch
    assert fresh.trainer.state.step == 200
    assert len(list(tmp_path.glob("oja_pca.before-fresh-*"))) == 1


def test_train_accepts_a_model_instance(tmp_path: Path, single_process) -> None:
    model = OjaNetwork(input_dim=4, num_components=2)
    cfg = compose(["experiment=oja_pca", "trainer.max_steps=50", f"paths.root={tmp_path}", "trainer.device=cpu"])
    result = train(cfg, model=model, run_dir=tmp_path / "mine")
    assert result.model is model and result.run_dir == (tmp_path / "mine").resolve()
    assert model.weight.shape == (2, 4)
