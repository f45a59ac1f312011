"""`trainer.strategy=fsdp` for real: FSDP2 (fully_shard) with torchrun, gloo on CPU, 2 processes.

* A 2-process FSDP run follows a 2-process DDP run of the same config (losses within the tolerance that
  1 vs 2 DDP processes are held to in tests/test_distributed.py, the same validation accuracy).
* Its checkpoints are the launcher's one-file format with full (unsharded) tensors, as a DDP run writes them.
* Killed mid-run (SIGKILL of the torchrun agent's process group: the workers get SIGTERM and save a
  checkpoint, which under FSDP gathers the shards), it resumes and ends bitwise equal to an uninterrupted run.
* A typo in trainer.strategy, and what FSDP does not support yet, are refused with one line (exit 2).

The torchrun runs start together in a module fixture (60-85 s on 2 shared cores): those tests are slow.
"""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch

from tests.cli_helpers import (
    assert_tensors_equal,
    finish,
    load,
    output_so_far,
    paths,
    read_metrics,
    run,
    step_files,
    train_steps,
    wait_for,
)
from tests.test_distributed import (
    ATOL, RTOL, TINY, TORCHRUN, Run, _alive, _children, _start, _stop_runs, resume_state,
)

# Dropout (per-rank RNG streams), batch 32 = 2 x 16: 7 steps per epoch, 42 steps = 6 epochs; checkpoints every
# 5 steps and at the evaluations (10). No grad filter and no EMA: FSDP does not support them yet.
# Evaluation batches of 9: the ranks' validation shards (127 and 126 examples) take 15 and 14 batches, which
# FSDP (every forward gathers from all ranks) must even out.
PLAIN = [*TINY, "model.dropout=0.1", "grad_filter=none", "trainer.global_batch_size=32", "trainer.max_steps=42",
         "trainer.checkpoint.interval=5", "trainer.eval_interval=10", "trainer.eval_batch_size=9"]
FSDP = [*PLAIN, "trainer.strategy=fsdp"]
FINAL_STEP = 42
KILL_AT = 12  # SIGKILL the agent's process group once a checkpoint at or after this step exists


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("fsdp")
    data_root = base / "ds"
    prep = finish(_start("train.py", "--dataset-only", *TINY, *paths(base / "prep", data_root)))
    assert prep.returncode == 0, prep
    started = {
        "ddp": Run(base / "ddp", data_root, *TORCHRUN, "pretrain.py", *PLAIN),
        "fsdp": Run(base / "fsdp", data_root, *TORCHRUN, "pretrain.py", *FSDP),
        "killed": Run(base / "killed", data_root, *TORCHRUN, "pretrain.py", *FSDP),
    }
    victim = started["killed"]
    try:
        wait_for(lambda: [s for s in step_files(victim.run_dir) if s >= KILL_AT], timeout=180,
                 what=f"a checkpoint at step {KILL_AT} or later", proc=victim.proc, poll_s=0.001)
        victim.workers = _children(victim.proc.pid)
        os.killpg(victim.proc.pid, signal.SIGKILL)
        killed = finish(victim.proc)
        wait_for(lambda: not any(_alive(p) for p in victim.workers), timeout=60, what="the workers to exit")
        killed.output = output_so_far(victim.proc)  # with what the workers printed after their agent died
        victim.killed = (killed, resume_state(victim.run_dir))
        victim.rerun_proc = _start(*victim.args)
        yield started
    finally:
        _stop_runs(started.values())


@pytest.mark.slow  # the module's 3 torchruns and a rerun: 60-85 s on 2 shared cores
def test_fsdp_follows_ddp_with_two_processes(runs):
    ddp, fsdp = runs["ddp"].result(), runs["fsdp"].result()
    assert ddp.returncode == 0, ddp
    assert fsdp.returncode == 0, fsdp
    assert "Training default on cpu x2: steps 0 -> 42, batch 16 per rank" in fsdp.output, fsdp
    report = []
    for kind, key in (("train", "train/loss"), ("train", "train/grad_norm"), ("val", "val/loss"), ("val", "val/acc")):
        a = {r["step"]: r[key] for r in read_metrics(runs["ddp"].run_dir, kind)}
        b = {r["step"]: r[key] for r in read_metrics(runs["fsdp"].run_dir, kind)}
        assert sorted(a) == sorted(b) == (list(range(1, 43)) if kind == "train" else [10, 20, 30, 40, 42]), (a, b)
        report.append(f"{key}: max |ddp - fsdp| = {max(abs(a[s] - b[s]) for s in a):.2e}")
        bad = [s for s in a if not math.isclose(a[s], b[s], rel_tol=RTOL, abs_tol=ATOL)]
        assert not bad, f"{key} differs at steps {bad[:5]}: {[(a[s], b[s]) for s in bad[:5]]}"
    print("\n".join(report))  # shown with `-n0 -s`; docs/distributed.md quotes these numbers
    # the one-file format of a DDP run: full tensors of the same shapes, the optimizer state numbered the same way
    a, b = load(runs["ddp"].run_dir / "latest.pt"), load(runs["fsdp"].run_dir / "latest.pt")
    assert {k: v.shape for k, v in a["model"].items()} == {k: v.shape for k, v in b["model"].items()}
    assert type(next(iter(b["model"].values()))) is torch.Tensor
    oa, ob = a["optimizers"]["main"], b["optimizers"]["main"]
    assert sorted(oa["state"]) == sorted(ob["state"]) and oa["param_groups"] == ob["param_groups"]
    assert {i: {k: v.shape for k, v in s.items()} for i, s in oa["state"].items()} == \
        {i: {k: v.shape for k, v in s.items()} for i, s in ob["state"].items()}
    assert max(float((a["model"][k] - b["model"][k]).abs().max()) for k in a["model"]) < 1e-3
    best = load(runs["fsdp"].run_dir / "best.pt")["model"]
    assert {k: v.shape for k, v in best.items()} == {k: v.shape for k, v in b["model"].items()}


@pytest.mark.slow
def test_fsdp_run_resumes_exactly_after_sigkill(runs):
    run_ = runs["killed"]
    killed, state = run_.killed
    assert len(run_.workers) == 2, run_.workers
    assert killed.returncode == -signal.SIGKILL, killed
    assert "interrupted by SIGTERM: checkpoint saved" in killed.output, killed  # saved while sharded
    resume_step = state["train_state"]["step"]
    assert KILL_AT - 5 <= resume_step < FINAL_STEP, resume_step
    rerun = run_.result()
    assert rerun.returncode == 0, rerun
    assert f"at step {resume_step} (epoch" in rerun.output and "Resumed from" in rerun.output, rerun
    ref = runs["fsdp"].result()
    assert ref.returncode == 0, ref
    final_ref, final = load(runs["fsdp"].run_dir / "latest.pt"), load(run_.run_dir / "latest.pt")
    assert final_ref["train_state"]["step"] == final["train_state"]["step"] == FINAL_STEP
    n = assert_tensors_equal({k: v for k, v in final_ref.items() if k != "config"},
                             {k: v for k, v in final.items() if k != "config"}, "latest.pt")
    assert train_steps(run_.run_dir) == list(range(1, FINAL_STEP + 1))
    ref_losses = {r["step"]: r["train/loss"] for r in read_metrics(runs["fsdp"].run_dir, "train")}
    assert {r["step"]: r["train/loss"] for r in read_metrics(run_.run_dir, "train")} == ref_losses
    print(f"fsdp: killed with a checkpoint at step {resume_step}; the rerun ends bitwise equal ({n} tensors)")


def test_a_strategy_typo_fails_with_one_line(tmp_path):
    result = run("pretrain.py", *TINY, "trainer.strategy=fsdpp", *paths(tmp_path / "ck", tmp_path / "ds"))
    assert result.returncode == 2, result
    assert "trainer.strategy must be one of ddp, fsdp, got 'fsdpp' (did you mean fsdp?)." in result.output, result
    assert "Traceback" not in result.output, result
    assert not (tmp_path / "ck").exists() or not list((tmp_path / "ck").rglob("*.pt"))


@pytest.mark.parametrize(("overrides", "message"), [
    (["grad_filter=grokfast_ema"], "trainer.strategy=fsdp does not support grad filters yet (grad_filter is "
     "utils.optim.grad_filters.GrokfastEMA); use grad_filter=none, or trainer.strategy=ddp."),
    (["grad_filter=none", "trainer.ema.enabled=true"], "trainer.strategy=fsdp does not support trainer.ema yet"),
    (["grad_filter=none", "trainer.precision=fp16"], "trainer.strategy=fsdp does not support trainer.precision=fp16"),
], ids=["grad_filter", "ema", "fp16"])
def test_what_fsdp_does_not_support_yet_is_refused(tmp_path, make_cfg, overrides, message):
    from utils.config.errors import ConfigError
    from utils.config.validation import validate_config

    with pytest.raises(ConfigError) as err:
        validate_config(make_cfg(tmp_path, "trainer.strategy=fsdp", *overrides))
    assert message in str(err.value)
    validate_config(make_cfg(tmp_path, "trainer.strategy=fsdp", "grad_filter=none"))  # the supported set
