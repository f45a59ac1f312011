"""The seed's Python API for the ring attractor (models/ring_attractor/training.py), run for real.

`train_model_enhanced`, `quick_train`, `create_training_config` and `AdamCosineTrainer` on a 32/8 ring
with 60 ms trials (each run takes a second or two): histories, param_history, the best-validation
weights, the save/load round trip through the launcher's checkpoint files and a resume from one, and
the two example scripts (their own main(), here; in subprocesses with the slow tests) and the
notebook-style example of docs/families/ring_attractor.md.
"""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from models.ring_attractor import (
    AdamCosineTrainer,
    RingAttractorNetwork,
    create_training_config,
    quick_train,
    train_model_enhanced,
    training_preset,
)
from models.ring_attractor.training import TrainingConfig
from tests.cli_helpers import REPO_ROOT, assert_tensors_equal, load, run_parallel
from utils.config.errors import ConfigError
from utils.storage.checkpoint import CheckpointError

TINY_DATA = ("data.num_train=32", "data.num_val=16", "data.duration=0.06", "data.cue_duration=0.03",
             "data.settle_time=0.01")
TINY_RUN = {"batch_size": 16, "device": "cpu", "overrides": TINY_DATA}  # 2 steps per epoch
DOC_PAGE = REPO_ROOT / "docs" / "families" / "ring_attractor.md"


@pytest.fixture(autouse=True)
def headless_one_thread(single_process: None, monkeypatch) -> Any:
    # No display and a non-interactive matplotlib: plot_progress must list the PNGs, never open windows.
    for name in ("DISPLAY", "WAYLAND_DISPLAY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_ring() -> RingAttractorNetwork:
    return RingAttractorNetwork(n_exc=32, n_inh=8)


def test_train_model_enhanced_returns_the_model_its_history_and_the_trainer(tmp_path: Path, capsys) -> None:
    model = tiny_ring()
    trained, history, trainer = train_model_enhanced(model, learning_rate=1e-2, max_epochs=3, early_stopping=True,
                                                     plot_progress=True, run_dir=tmp_path / "run", **TINY_RUN)
    assert trained is model and trainer.epoch == 3
    assert history["epoch"] == [1, 2, 3] and history["step"] == [2, 4, 6]
    assert len(history["train_loss"]) == len(history["val_loss"]) == len(history["grad_norm"]) == 3
    assert "val_heading_error_deg" in history and "val_integration_final_error_deg" in history
    lrs = history["learning_rate"]  # cosine annealing over the 3 epochs, down to min_lr at the last step
    assert lrs[0] < 1e-2 and lrs == sorted(lrs, reverse=True) and lrs[-1] == pytest.approx(1e-6)
    params = trainer.param_history
    assert params["epoch"] == [0, 1, 2, 3] and params["g_ee"][0] == 5.0 and params["g_ee"][-1] != 5.0
    assert set(params) >= {"g_ee", "g_ei", "g_ie", "noise_rate_e", "noise_rate_i", "velocity_gain", "W_EI_mean"}
    best = load(tmp_path / "run" / "best.pt")  # restore_best: the model holds the best-validation weights
    assert_tensors_equal(dict(best["model"]), dict(model.state_dict()))
    plots = tmp_path / "run" / "plots"
    assert {"loss.png", "lr.png", "ring_parameters.png", "heading_traces.png"} <= {p.name for p in plots.iterdir()}
    assert f"Training plots (no display here): {plots / 'grad_norm.png'}" in capsys.readouterr().out


def test_quick_train_trains_with_the_seed_defaults(tmp_path: Path) -> None:
    model, history = quick_train(tiny_ring(), epochs=2, lr=1e-3, run_dir=tmp_path / "quick", **TINY_RUN)
    assert history["epoch"] == [1, 2]
    config = load(tmp_path / "quick" / "latest.pt")["config"]
    assert config["optim"]["weight_decay"] == 1e-4 and config["schedule"]["min_lr"] == 1e-6
    assert config["trainer"]["early_stopping"] == {**config["trainer"]["early_stopping"], "enabled": True, "patience": 20}


def test_create_training_config_has_the_seed_defaults_and_refuses_bad_values() -> None:
    config = create_training_config()
    assert (config.learning_rate, config.max_epochs, config.min_lr, config.weight_decay, config.batch_size,
            config.early_stopping, config.patience) == (1e-3, 100, 1e-6, 1e-4, 32, True, 20)
    assert create_training_config(learning_rate=1e-3, max_epochs=150).max_epochs == 150
    with pytest.raises(ConfigError, match=r"learning_rate=-1"):
        create_training_config(learning_rate=-1)
    with pytest.raises(ConfigError, match=r"min_lr=0.1 is above learning_rate=0.001"):
        create_training_config(min_lr=0.1)
    with pytest.raises(ConfigError, match=r"unknown settings \['epochs'\]"):
        create_training_config(epochs=3)
    # The seed's "Example Configurations", read from conf/ring/ (the presets of the CLI's ring=<name>).
    assert training_preset("conservative") == {"learning_rate": 5e-4, "max_epochs": 200, "min_lr": 1e-6,
                                               "weight_decay": 1e-3, "batch_size": 16, "early_stopping": True,
                                               "patience": 30}
    assert training_preset("aggressive") == {"learning_rate": 2e-3, "max_epochs": 50, "min_lr": 1e-6,
                                             "weight_decay": 1e-5, "batch_size": 64, "early_stopping": True,
                                             "patience": 10}
    assert create_training_config(**training_preset("default")) == create_training_config()
    with pytest.raises(ConfigError, match=r"data\.num_trian"):  # an override typo fails when the trainer is made
        AdamCosineTrainer(tiny_ring(), TrainingConfig(overrides=("+data.num_trian=3",)))


def test_save_and_load_checkpoint_round_trip_and_resume(tmp_path: Path) -> None:
    model = tiny_ring()
    trainer = AdamCosineTrainer(model, create_training_config(learning_rate=1e-2, max_epochs=2,
                                                              run_dir=tmp_path / "first", **TINY_RUN))
    trainer.train()
    path = trainer.save_checkpoint(trainer.epoch, tmp_path / "my_checkpoint.pth")
    assert (tmp_path / "my_checkpoint.pth.sha256").exists()  # the launcher's file: atomic, with its digest
    assert load(path)["ring_api"]["epoch"] == 2  # plain data: torch.load(weights_only=True) reads it

    other = tiny_ring()
    assert not torch.equal(other.g_ee, model.g_ee)
    second = AdamCosineTrainer(other, create_training_config(learning_rate=1e-2, max_epochs=3,
                                                             run_dir=tmp_path / "second", **TINY_RUN))
    assert second.load_checkpoint(path) == 2
    assert_tensors_equal(dict(other.state_dict()), dict(model.state_dict()))
    assert second.param_history == trainer.param_history and second.epoch == 2
    history = second.train()  # resumes at epoch 2 from the loaded checkpoint: one more epoch
    assert history["epoch"] == [1, 2, 3] and second.trainer.state.step == 6
    assert history["train_loss"][:2] == trainer.history["train_loss"]  # epochs 1-2 came with the checkpoint
    assert second.param_history["g_ee"][:3] == trainer.param_history["g_ee"] and len(second.param_history["g_ee"]) == 4

    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(path.read_bytes()[:-40] + bytes(40))
    (tmp_path / "corrupt.pth.sha256").write_text((tmp_path / "my_checkpoint.pth.sha256").read_text())
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        second.load_checkpoint(corrupt)


def test_each_trainer_gets_a_run_directory_of_its_own(tmp_path: Path) -> None:
    config = create_training_config(overrides=(f"paths.root={tmp_path}",), **{k: v for k, v in TINY_RUN.items() if k != "overrides"})
    first, second = AdamCosineTrainer(tiny_ring(), config), AdamCosineTrainer(tiny_ring(), config)
    assert first.run_dir != second.run_dir and first.run_dir.parent == second.run_dir.parent == tmp_path / "ring_attractor_api"


def test_a_checkpoint_saved_before_training_holds_the_weights(tmp_path: Path) -> None:
    model = tiny_ring()
    with torch.no_grad():
        model.g_ee.fill_(4.0)
    path = AdamCosineTrainer(model, create_training_config(run_dir=tmp_path / "r", **TINY_RUN)).save_checkpoint(
        0, tmp_path / "untrained.pth")
    other = tiny_ring()
    reader = AdamCosineTrainer(other, create_training_config(run_dir=tmp_path / "r2", **TINY_RUN))
    assert reader.load_checkpoint(path) == 0
    assert other.ring_parameters()["g_ee"] == 4.0 and reader.param_history["g_ee"] == [4.0]


def _doc_example() -> str:
    """The notebook-style example of docs/families/ring_attractor.md: the python block after its heading."""
    text = DOC_PAGE.read_text(encoding="utf-8")
    section = text.split("## A notebook-style example", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


SMALL = ["--n-exc", "32", "--n-inh", "8", "--epochs", "2", "--trials", "32", "--duration", "0.06"]
EXAMPLES = {"demo": ("examples/ring_attractor/demo_enhanced_training.py", ["--measure-trials", "4"]),
            "adam_cosine": ("examples/ring_attractor/train_with_adam_cosine.py", [])}


def _check_example_output(name: str, output: str) -> None:
    if name == "demo":
        assert "Trained 2 epochs" in output and "integration error after 2 s" in output, output
    else:
        assert "training would resume after epoch 2" in output, output
        assert re.search(r"Initial g_ee: 5\.0000\nFinal g_ee: \d", output), output


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_each_example_script_runs(name: str, tmp_path: Path, monkeypatch, capsys) -> None:
    script, extra = EXAMPLES[name]
    monkeypatch.setattr(sys, "argv", [script, *SMALL, *extra, "--run-dir", str(tmp_path / name)])
    runpy.run_path(str(REPO_ROOT / script), run_name="__main__")  # the script's own main(), in this process
    _check_example_output(name, capsys.readouterr().out)


def test_the_docs_notebook_example_runs(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(_doc_example(), str(DOC_PAGE), "exec"), {"__name__": "__main__"})  # noqa: S102 - the page's own code
    assert re.search(r"g_ee: 5\.0000 -> \d", capsys.readouterr().out)


@pytest.mark.slow
def test_the_examples_run_as_scripts_in_subprocesses(tmp_path: Path) -> None:
    no_windows = {"demo": ["--no-plots"], "adam_cosine": []}  # a subprocess may find a display: open no window
    results = run_parallel({name: [script, *SMALL, *extra, *no_windows[name], "--run-dir", str(tmp_path / name)]
                            for name, (script, extra) in EXAMPLES.items()}, max_parallel=2)
    for name, result in results.items():
        assert result.returncode == 0, result
        _check_example_output(name, result.output)
