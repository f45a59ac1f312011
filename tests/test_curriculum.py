"""Curriculum stages (utils/training/curriculum.py) in real runs of the tiny grokking job.

In process: what each stage changes (data, batch size, grad filter, learning rate, frozen modules, loss
weights, model knobs), the three ways a stage ends (budget, threshold, plateau), the events and errors.
In subprocesses: the toy curriculum killed with SIGKILL at a random step and right at a stage boundary,
then rerun, ends bitwise identical to an uninterrupted run.
"""

from __future__ import annotations

import random
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.cli_helpers import (
    TINY,
    assert_tensors_equal,
    finish,
    load,
    paths,
    read_metrics,
    run,
    start,
    step_files,
    wait_for,
)
from tests.test_callbacks import CallbackTransformer
from utils.config.errors import ConfigError
from utils.monitoring.plots import read_records
from utils.training.callbacks import Callback
from utils.training.runner import fit

# The toy curriculum (conf/curriculum/toy.yaml) shrunk: 253 train equations; addition for 6 steps at
# batch 32, division until val/acc plateaus (3 evaluations, every 3 steps) or 30 steps, then 6 steps of
# fine-tuning at batch 128 and half the learning rate.
TOY = [
    "curriculum=toy",
    "curriculum.stages.0.max_steps=6", "curriculum.stages.0.batch_size=32",
    "curriculum.stages.1.max_steps=30", "curriculum.stages.1.advance.patience=3",
    "curriculum.stages.2.max_steps=6", "curriculum.stages.2.batch_size=128",
    "trainer.eval_interval=3", "trainer.max_steps=100", "schedule.warmup_steps=0",
    "trainer.early_stopping.enabled=false",
]


class StageRecorder(Callback):
    """What the trainer looks like at every stage start."""

    seen: list[dict[str, Any]] = []

    def on_stage_start(self, trainer: Any, stage: Any) -> None:
        StageRecorder.seen.append({
            "step": trainer.state.step,
            "name": stage.name,
            "batch": trainer.global_batch_size,
            "operation": trainer.data.builder.operation,
            "filter_on": trainer.grad_filter_active,
            "lr": trainer.optimizers[0].optimizer.param_groups[0]["lr"],
        })


class HeadSnapshots(Callback):
    """The head's weights at every stage start (to see what a frozen stage left unchanged)."""

    snapshots: dict[str, torch.Tensor] = {}

    def on_stage_start(self, trainer: Any, stage: Any) -> None:
        HeadSnapshots.snapshots[stage.name] = trainer.model.head.weight.detach().clone()


@pytest.fixture(autouse=True)
def _clear() -> None:
    StageRecorder.seen = []
    HeadSnapshots.snapshots = {}


def test_toy_curriculum_applies_each_stage_and_ends_with_the_last(make_cfg, tmp_path: Path) -> None:
    result = fit(make_cfg(tmp_path, *TOY, "+callbacks.stages={_target_:tests.test_curriculum.StageRecorder}"))
    seen = StageRecorder.seen
    assert [s["name"] for s in seen] == ["addition", "division", "finetune"]
    assert [s["batch"] for s in seen] == [32, 64, 128]  # division: trainer.global_batch_size (64)
    assert [s["operation"] for s in seen] == ["add", "div", "div"]
    assert [s["filter_on"] for s in seen] == [False, True, True]
    assert seen[2]["lr"] == pytest.approx(0.5 * seen[1]["lr"])
    division_end = seen[2]["step"]
    assert seen[1]["step"] == 6 and 6 < division_end <= 36 and division_end % 3 == 0
    assert result.state.step == division_end + 6
    assert result.state.stop_reason.startswith("curriculum finished")

    records = read_records(tmp_path / "ck" / "test")
    ends = [r for r in records if r.get("event") == "stage_end"]
    assert [e["name"] for e in ends] == ["addition", "division", "finetune"]
    assert "budget" in ends[0]["reason"] and "plateaued" in ends[1]["reason"]
    starts = [(r["step"], r["name"]) for r in records if r.get("event") == "stage"]
    assert starts == [(0, "addition"), (6, "division"), (division_end, "finetune")]
    stage_of_step = {r["step"]: r["stage"] for r in records if r.get("kind") == "train"}
    assert stage_of_step[6] == 0 and stage_of_step[7] == 1 and stage_of_step[result.state.step] == 2
    evaluated = {r["step"] for r in records if r.get("kind") == "val"}
    assert {6, division_end, result.state.step} <= evaluated  # every stage ends with an evaluation
    assert (tmp_path / "ck" / "test" / "plots" / "loss.png").exists()


def test_a_threshold_ends_a_stage_at_the_first_evaluation_that_reaches_it(make_cfg, tmp_path: Path) -> None:
    stages = ("+curriculum={stages:[{name:warm,max_steps:50,advance:{monitor:val/loss,mode:min,threshold:100.0}},"
              "{name:rest,max_steps:3}]}")
    result = fit(make_cfg(tmp_path, stages, "trainer.eval_interval=4"))
    ends = [r for r in read_records(tmp_path / "ck" / "test") if r.get("event") == "stage_end"]
    assert [(e["step"], e["name"]) for e in ends] == [(4, "warm"), (7, "rest")]
    assert "val/loss <= 100.0" in ends[0]["reason"]
    assert result.state.step == 7


def test_freeze_loss_weights_and_model_knobs_last_for_their_stage(make_cfg, tmp_path: Path) -> None:
    stages = ("+curriculum={stages:[{name:frozen,max_steps:4,freeze:[head],loss_weights:{ce:0.5},model:{knob:2.0}},"
              "{name:free,max_steps:4}]}")
    result = fit(make_cfg(
        tmp_path, stages, "model._target_=tests.test_callbacks.CallbackTransformer", "grad_filter=none",
        "+callbacks.heads={_target_:tests.test_curriculum.HeadSnapshots}",
    ))
    model: CallbackTransformer = result.trainer.model
    assert model.knob_at_step == {1: 2.0, 2: 2.0, 3: 2.0, 4: 2.0, 5: 1.0, 6: 1.0, 7: 1.0, 8: 1.0}
    snaps = HeadSnapshots.snapshots
    assert torch.equal(snaps["frozen"], snaps["free"])  # not updated while frozen
    assert not torch.equal(snaps["free"], model.head.weight.detach())  # updated afterwards
    train = {r["step"]: r for r in read_metrics(tmp_path / "ck" / "test", "train")}
    for step in (1, 4):
        assert train[step]["train/loss"] == pytest.approx(0.5 * train[step]["train/ce"], rel=1e-6)
    for step in (5, 8):
        assert train[step]["train/loss"] == pytest.approx(train[step]["train/ce"], rel=1e-6)


@pytest.mark.parametrize(
    ("curriculum", "message"),
    [
        ("{stages:[{name:a,model:{no_such_knob:1}}]}", "has no plain attribute 'no_such_knob'"),
        ("{stages:[{name:a,loss_weights:{nope:1.0}}]}", "unknown loss terms ['nope']"),
        ("{stages:[{name:a,freeze:[encoder]}]}", "freeze names 'encoder'"),
        ("{stages:[{name:a,lr_scale:{memory:0.5}}]}", "lr_scale names unknown optimizers ['memory']"),
        ("{stages:[{name:a},{name:b}]}", "never ends"),
        ("{stages:[{name:a,max_steps:2,advance:{threshold:1.0,patience:2}},{name:b}]}", "exactly one of"),
        ("{stages:[{name:a,max_steps:2},{name:a}]}", "names must be unique"),
        ("{stages:[{name:a,data:{pp:5}}]}", "curriculum.stages[0].data"),
    ],
)
def test_stage_mistakes_are_config_errors_naming_the_key(make_cfg, tmp_path: Path, curriculum: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        fit(make_cfg(tmp_path, f"+curriculum={curriculum}"))
    assert message in str(info.value)


# ------------------------------------------------------------------------ SIGKILL mid-stage / at a boundary
def _comparable(ckpt: dict) -> dict:
    out = {k: v for k, v in ckpt.items() if k not in ("config", "logger_run_ids")}
    out["config"] = {k: v for k, v in ckpt["config"].items() if k != "paths"}
    return out


@pytest.fixture(scope="module")
def toy_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], Path]:
    """The uninterrupted toy curriculum (checkpoint every step, so a kill can land anywhere)."""
    base = tmp_path_factory.mktemp("curriculum")
    data = base / "ds"
    args = [*TINY, *TOY, "trainer.checkpoint.interval=1", "model.dropout=0.1", "trainer.ema.enabled=true"]
    root = base / "reference"
    result = run("pretrain.py", *args, *paths(root, data))
    assert result.returncode == 0, result
    return root / "default", args, data


def _kill_and_rerun(tmp_path: Path, args: list[str], data: Path, kill_when_step_file: int) -> Path:
    root = tmp_path / "ck"
    run_dir = root / "default"
    proc = start("pretrain.py", *args, *paths(root, data))
    wait_for(lambda: kill_when_step_file in step_files(run_dir), timeout=180,
             what=f"the checkpoint of step {kill_when_step_file}", proc=proc, poll_s=0.001)
    proc.send_signal(signal.SIGKILL)
    killed = finish(proc)
    assert killed.returncode == -signal.SIGKILL, f"finished before the kill\n{killed}"
    rerun = run("pretrain.py", *args, *paths(root, data))
    assert rerun.returncode == 0, rerun
    assert "Resumed from" in rerun.output, rerun
    return run_dir


@pytest.mark.parametrize("where", ["mid_stage", "stage_boundary"])
def test_sigkill_in_a_stage_or_at_its_boundary_resumes_bitwise(toy_reference, tmp_path: Path, where: str) -> None:
    reference, args, data = toy_reference
    boundaries = [r["step"] for r in read_records(reference) if r.get("event") == "stage" and r["stage"] > 0]
    assert boundaries[0] == 6 and len(boundaries) == 2
    # Mid-stage: a random step of the division stage (printed on failure); boundary: the step that ended it.
    kill_at = random.Random(20261201).randint(boundaries[0] + 1, boundaries[1] - 1) if where == "mid_stage" else boundaries[1]
    run_dir = _kill_and_rerun(tmp_path, args, data, kill_at)
    final_ref, final = load(reference / "latest.pt"), load(run_dir / "latest.pt")
    assert final["train_state"]["stage"] == 2, f"killed at step {kill_at}"
    assert assert_tensors_equal(_comparable(final_ref), _comparable(final), f"latest.pt (killed at step {kill_at})") > 20
    stages_ref = [(r["step"], r["name"]) for r in read_records(reference) if r.get("event") == "stage"]
    stages = [(r["step"], r["name"]) for r in read_records(run_dir) if r.get("event") == "stage"]
    assert stages[-2:] == stages_ref[-2:]
