"""The recursive-reasoning experiments end to end: what the ACT family logs, exact resume of its carry, HRM's
terms, ARC's submission, torchrun and bf16. (Every preset's CLI run and resume: tests/test_contract.py.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import pretrain
from tests.cli_helpers import CPU, assert_tensors_equal, load, paths, read_metrics, run
from tests.conftest import compose_config, remove_launcher_log_handlers

ARC_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "arc"

# Small enough for a few seconds on one core, big enough that the ACT carry halts and refills.
SMALL_SUDOKU = [
    "data.num_train_puzzles=100", "data.num_val_puzzles=20", "data.num_aug=1",
    "model.hidden_size=32", "model.halt_max_steps=3",
    "trainer.global_batch_size=16", "trainer.log_interval=1", CPU,
]


@pytest.fixture
def one_thread(single_process):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    remove_launcher_log_handlers()


def fit(tmp_path: Path, *overrides: str, run_name: str = "run"):
    cfg = compose_config(f"paths.root={tmp_path / 'ck'}", f"paths.data_root={tmp_path / 'ds'}", f"run_name={run_name}", *overrides)
    return pretrain.fit(cfg)


def test_trm_sudoku_debug_fast_from_the_cli_logs_every_act_term(tmp_path):
    """The CLI run and its resume are in tests/test_contract.py; this checks what the ACT family logs."""
    args = ["experiment=trm_sudoku", "debug=fast", *paths(tmp_path / "runs"), CPU]
    first = run("train.py", *args)
    assert first.returncode == 0, first
    run_dir = tmp_path / "runs" / "trm_sudoku"
    assert "Built dataset" in first.output or "Dataset" in first.output, first
    metrics = read_metrics(run_dir)
    val = [m for m in metrics if "val/exact_acc" in m]
    assert [m["step"] for m in val] == [3, 6]
    for key in ("val/exact_acc", "val/token_acc", "val/valid_grid", "val/lm", "val/q_halt"):
        assert key in val[-1], key
    train = [m for m in metrics if "train/lm" in m]
    for key in ("train/lm", "train/q_halt", "train/q_continue", "train/ponder", "train/act/steps", "train/act/halted_exact_acc"):
        assert key in train[-1], key
    ckpt = load(run_dir / "latest.pt")
    (carry,) = ckpt["carry_per_rank"]
    assert carry["z_H"].shape[0] == 32 and carry["halted"].dtype == torch.bool



def test_interrupted_act_run_resumes_bitwise_exactly(tmp_path, one_thread):
    common = ["experiment=trm_sudoku", *SMALL_SUDOKU, "trainer.eval_interval=4", "trainer.checkpoint.interval=4"]
    straight = fit(tmp_path, *common, "trainer.max_steps=8", run_name="straight")
    fit(tmp_path, *common, "trainer.max_steps=4", run_name="split")
    resumed = fit(tmp_path, *common, "trainer.max_steps=8", run_name="split")
    assert resumed.state.step == straight.state.step == 8
    a, b = load(straight.run_dir / "latest.pt"), load(resumed.run_dir / "latest.pt")
    for key in ("model", "optimizers", "carry_per_rank", "ema"):
        assert_tensors_equal(a[key], b[key], key)
    # the carry really carried something: some rows are mid-puzzle (not all freshly loaded)
    assert int(a["carry_per_rank"][0]["steps"].max()) >= 2


def test_hrm_sudoku_trains_q_continue_and_ramps_the_ponder_cost(tmp_path, one_thread):
    result = fit(
        tmp_path, "experiment=hrm_sudoku", *SMALL_SUDOKU, "trainer.max_steps=6", "trainer.eval_interval=6",
        "loss.terms.ponder.weight_schedule.start_step=2", "loss.terms.ponder.weight_schedule.end_step=4",
    )
    train = [m for m in read_metrics(result.run_dir) if "train/lm" in m]
    assert all(m["train/q_continue"] > 0 for m in train), "the bootstrapped Q-continue loss is on for HRM"
    assert [m["train/loss_weight/ponder"] for m in train] == pytest.approx([0.0, 0.0, 0.0, 0.005, 0.01, 0.01])  # weight(step) before step+1


@pytest.mark.skipif(not ARC_DIR.is_dir(), reason=f"ARC-AGI files not found at {ARC_DIR}")
def test_trm_arc_writes_a_submission_and_trains_puzzle_embeddings_with_sign_sgd(tmp_path, one_thread):
    result = fit(
        tmp_path, "experiment=trm_arc", f"data.arc_dir={ARC_DIR}", "data.max_tasks_per_subset=3", "data.num_aug=1",
        "model.hidden_size=32", "model.num_heads=2", "model.puzzle_emb_ndim=32", "model.H_cycles=1", "model.L_cycles=1",
        "model.halt_max_steps=2", "trainer.global_batch_size=8", "trainer.max_steps=4", "trainer.eval_interval=4",
        "trainer.log_interval=1", "trainer.precision=fp32", CPU,
    )
    assert 0.0 <= result.last_metrics["val/arc_pass@1"] <= result.last_metrics["val/arc_pass@2"] <= 1.0
    submission = json.loads((result.run_dir / "submission.json").read_text())
    assert len(submission) == 3 and all("attempt_1" in t[0] and "attempt_2" in t[0] for t in submission.values())
    train = [m for m in read_metrics(result.run_dir) if "train/lm" in m]
    assert train[-1]["lr/puzzle_emb"] > 0
    ckpt = load(result.run_dir / "latest.pt")
    assert ckpt["model"]["puzzle_emb.weight"].abs().sum() > 0, "sign-SGD moved the (zero-initialised) embeddings"


def test_trm_sudoku_under_torchrun_with_two_processes(tmp_path):
    args = ["experiment=trm_sudoku", "debug=fast", "trainer.nproc_per_node=2", *paths(tmp_path / "runs"), *SMALL_SUDOKU]
    result = run("train.py", *args)
    assert result.returncode == 0, result
    val = [m for m in read_metrics(tmp_path / "runs" / "trm_sudoku") if "val/exact_acc" in m]
    assert [m["step"] for m in val] == [3, 6]
    ckpt = load(tmp_path / "runs" / "trm_sudoku" / "latest.pt")
    carries = ckpt["carry_per_rank"]
    assert [c["z_H"].shape[0] for c in carries] == [8, 8], "each rank carries its own half of the global batch of 16"
    assert not torch.equal(carries[0]["inputs"], carries[1]["inputs"])


def test_bf16_autocast_on_cpu_keeps_the_carry_finite(tmp_path, one_thread):
    result = fit(tmp_path, "experiment=trm_sudoku", *SMALL_SUDOKU, "trainer.precision=bf16", "trainer.max_steps=4",
                 "trainer.eval_interval=4")
    assert result.state.total_nonfinite == 0 and math.isfinite(result.last_metrics["val/lm"])
