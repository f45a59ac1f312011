"""The command line end to end: `python train.py ...` / `python pretrain.py ...` in subprocesses, real files.

Every run writes only below pytest's temporary directories (paths.root / paths.data_root overrides) and
uses a tiny model (tests/cli_helpers.py: TINY), so a run costs mostly the interpreter start.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tests.cli_helpers import (
    CPU,
    TINY,
    load,
    override,
    paths,
    read_metrics,
    run,
    run_parallel,
    step_files,
    train_steps,
)
from utils.storage.checkpoint import tensors_in

FAST = ["debug=fast", *TINY]  # debug=fast: 6 steps, eval + checkpoint every 3


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pt_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.pt")) if root.exists() else []


# ------------------------------------------------------------------------------------ train, then resume
@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """`train.py debug=fast` (6 steps), then the same command with trainer.max_steps=9 in the same run dir."""
    base = tmp_path_factory.mktemp("two_runs")
    root, data_root = base / "ck", base / "ds"
    run_dir = root / "default"
    first = run("train.py", *FAST, *paths(root, data_root))
    after_first = {
        "files": sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else [],
        "hydra": sorted(p.name for p in (run_dir / ".hydra").iterdir()) if (run_dir / ".hydra").exists() else [],
        "latest_step": load(run_dir / "latest.pt")["train_state"]["step"] if (run_dir / "latest.pt").exists() else None,
        "train_steps": train_steps(run_dir),
        "overrides": (run_dir / ".hydra" / "overrides.yaml").read_text() if (run_dir / ".hydra").exists() else "",
    }
    second = run("train.py", *FAST, *paths(root, data_root), "trainer.max_steps=9")
    return {"root": root, "data_root": data_root, "run_dir": run_dir, "first": first, "second": second,
            "after_first": after_first}


def test_first_run_writes_a_complete_run_dir(two_runs):
    first, after = two_runs["first"], two_runs["after_first"]
    assert first.returncode == 0, first
    for name in ("latest.pt", "best.pt", "train.log", "metrics.jsonl"):
        assert name in after["files"], f"{name} missing from the run dir: {after['files']}\n{first}"
    assert {"config.yaml", "overrides.yaml"} <= set(after["hydra"]), after["hydra"]
    assert after["latest_step"] == 6
    assert after["train_steps"] == [1, 2, 3, 4, 5, 6]
    # overrides.yaml records exactly what was passed, so the run can be reproduced
    recorded = yaml.safe_load(after["overrides"])
    assert recorded == [*FAST, *paths(two_runs["root"], two_runs["data_root"])]
    config = yaml.safe_load((two_runs["run_dir"] / ".hydra" / "config.yaml").read_text())
    assert config["model"]["width"] == 32 and config["data"]["p"] == 23
    log = (two_runs["run_dir"] / "train.log").read_text()
    assert "Training default on cpu x1: steps 0 -> 6" in log


def test_rerun_auto_resumes_and_continues_from_step_6(two_runs):
    second, run_dir = two_runs["second"], two_runs["run_dir"]
    assert second.returncode == 0, second
    assert f"Auto-resume: {run_dir / 'latest.pt'} is at step 6" in second.output, second
    assert "Resumed from" in second.output and "at step 6" in second.output, second
    steps = train_steps(run_dir)
    assert steps == list(range(1, 10)), f"train steps must continue 7, 8, 9 without repeats: {steps}"
    assert len(steps) == len(set(steps))
    starts = [r for r in read_metrics(run_dir, "event") if r["event"] == "start"]
    assert [s["resumed_from_step"] for s in starts] == [0, 6]
    assert load(run_dir / "latest.pt")["train_state"]["step"] == 9
    assert step_files(run_dir) == [3, 6, 9]


def test_fresh_moves_the_old_run_aside_and_starts_at_step_0(two_runs, tmp_path):
    root = tmp_path / "ck"
    shutil.copytree(two_runs["root"], root)
    old_latest = sha256(root / "default" / "latest.pt")
    result = run("train.py", "--fresh", *FAST, *paths(root, two_runs["data_root"]), "trainer.max_steps=3")
    assert result.returncode == 0, result
    aside = [p for p in root.iterdir() if p.name.startswith("default.before-fresh-")]
    assert len(aside) == 1, sorted(p.name for p in root.iterdir())
    assert "--fresh: moved the previous run to" in result.output and str(aside[0]) in result.output, result
    assert sha256(aside[0] / "latest.pt") == old_latest, "the old run must be kept intact"
    run_dir = root / "default"
    assert "Resumed from" not in result.output, result
    assert train_steps(run_dir) == [1, 2, 3]
    assert [r["resumed_from_step"] for r in read_metrics(run_dir, "event") if r["event"] == "start"] == [0]
    assert load(run_dir / "latest.pt")["train_state"]["step"] == 3


def test_checkpoint_of_another_model_is_refused(two_runs, tmp_path):
    root = tmp_path / "ck"
    shutil.copytree(two_runs["root"], root)
    run_dir = root / "default"
    before = {p.name: sha256(p) for p in run_dir.glob("*.pt")}
    result = run("pretrain.py", *override(FAST, "model.width=48"), *paths(root, two_runs["data_root"]))
    assert result.returncode == 2, result
    assert "another model" in result.output and "model.width: 32 -> 48" in result.output, result
    assert "--fresh" in result.output, result
    assert "Traceback" not in result.output, result
    assert {p.name: sha256(p) for p in run_dir.glob("*.pt")} == before, "the old checkpoints must be untouched"


# ------------------------------------------------------------------------------------------- dataset
def test_dataset_only_builds_without_training_and_rebuild_rebuilds(tmp_path):
    root, data_root = tmp_path / "ck", tmp_path / "ds"
    built = run("train.py", "--dataset-only", *FAST, *paths(root, data_root))
    assert built.returncode == 0, built
    marker = data_root / "modular_div_p23_f0.5_s0" / "COMPLETE"
    assert marker.is_file(), sorted(str(p) for p in data_root.rglob("*"))
    assert "--dataset-only: dataset ready, not training." in built.output, built
    assert pt_files(root) == [] and not (root / "default" / "train.log").exists(), "--dataset-only must not train"
    first_mtime, first_inode = marker.stat().st_mtime_ns, marker.parent.stat().st_ino

    rebuilt = run("train.py", "--dataset-only", "--rebuild-dataset", *FAST, *paths(root, data_root))
    assert rebuilt.returncode == 0, rebuilt
    assert "Built dataset" in rebuilt.output, rebuilt
    assert marker.is_file()
    assert marker.stat().st_mtime_ns > first_mtime or marker.parent.stat().st_ino != first_inode
    assert pt_files(root) == []


# -------------------------------------------------------------------------------------- run directories
GROKKING = ["experiment=grokking", "debug=fast", "model.width=32", "model.num_layers=1", "data.p=23", CPU]


@pytest.fixture(scope="module")
def grokking_runs(tmp_path_factory):
    """experiment=grokking through pretrain.py (two grad filters, one root) and through train.py (own root)."""
    base = tmp_path_factory.mktemp("grokking")
    data_root = base / "ds"
    results = run_parallel({
        "ema": ["pretrain.py", *GROKKING, *paths(base / "pre", data_root)],
        "none": ["pretrain.py", *GROKKING, "grad_filter=none", *paths(base / "pre", data_root)],
        "train_py": ["train.py", *GROKKING, *paths(base / "train", data_root)],
    })
    return {"base": base, **results}


def test_experiment_grokking_run_dir_is_named_after_op_and_grad_filter(grokking_runs):
    root = grokking_runs["base"] / "pre"
    for key, name in (("ema", "grokking_mul_grokfast_ema"), ("none", "grokking_mul_none")):
        result = grokking_runs[key]
        assert result.returncode == 0, result
        assert f"Training {name} on" in result.output, result
        ckpt = load(root / name / "latest.pt")
        assert ckpt["config"]["run_name"] == name
        assert ckpt["config"]["paths"]["run_dir"] == str(root / name)
    assert sorted(p.name for p in root.iterdir()) == ["grokking_mul_grokfast_ema", "grokking_mul_none"]


def test_train_py_runs_the_grokking_experiment_in_the_same_dir(grokking_runs):
    """The experiment's documented command (`python train.py experiment=grokking ...`): train.py, which looks
    for checkpoints to resume, must resolve the same run dir pretrain.py writes to."""
    result = grokking_runs["train_py"]
    run_dir = grokking_runs["base"] / "train" / "grokking_mul_grokfast_ema"
    assert result.returncode == 0, result
    assert f"No checkpoint in {run_dir}" in result.output, result
    assert load(run_dir / "latest.pt")["train_state"]["step"] == 6


def test_multirun_gives_each_job_its_own_deterministic_dir(tmp_path):
    root, data_root = tmp_path / "ck", tmp_path / "ds"
    result = run("pretrain.py", "-m", "debug=fast", "optim.lr=1e-3,3e-4", *TINY, *paths(root, data_root))
    assert result.returncode == 0, result
    sweep = root / "default_multirun"
    expected = {
        f"data.p=23,model.num_layers=1,model.width=32,optim.lr={lr},trainer.device=cpu,"
        "trainer.drop_last=True,trainer.global_batch_size=64":
        float(lr)
        for lr in ("0.001", "0.0003")
    }
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == sorted(expected), sorted(sweep.iterdir())
    for name, lr in expected.items():
        ckpt = load(sweep / name / "latest.pt")
        assert ckpt["train_state"]["step"] == 6
        assert ckpt["config"]["optim"]["lr"] == lr
        assert train_steps(sweep / name) == [1, 2, 3, 4, 5, 6], "each job must start from scratch in its own dir"
    assert not (root / "default").exists()


def test_every_optimizer_listed_by_help_trains(tmp_path):
    """`--help` offers these optimizer groups: each must compose, validate and train a step."""
    root, data_root = tmp_path / "ck", tmp_path / "ds"
    optims = ["adamw", "adam", "adam_atan2", "sgd"]
    result = run("pretrain.py", "-m", "debug=fast", f"optim={','.join(optims)}", "trainer.max_steps=1",
                 *TINY, *paths(root, data_root))
    assert result.returncode == 0, result
    for name in optims:
        run_dir = root / "default_multirun" / (
            f"data.p=23,model.num_layers=1,model.width=32,optim={name},"
            "trainer.device=cpu,trainer.drop_last=True,trainer.global_batch_size=64,trainer.max_steps=1"
        )
        assert load(run_dir / "latest.pt")["train_state"]["step"] == 1, name


# ---------------------------------------------------------------------------- cheap runs, all at once
@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """Invocations that end before training, started together (bad inputs: tests/test_reliability.py)."""
    base = tmp_path_factory.mktemp("quick")
    commands = {
        "cfg_job": ["pretrain.py", *paths(base / "cfg" / "ck"), "--cfg", "job"],
        "help": ["pretrain.py", "--help"],
    }
    return {"base": base, **run_parallel(commands)}


def test_cfg_job_prints_the_composed_config(quick):
    result = quick["cfg_job"]
    assert result.returncode == 0, result
    assert "_target_: models.grokking.transformer.DecoderTransformer" in result.output, result
    assert "run_name: default" in result.output
    assert not (quick["base"] / "cfg").exists(), "--cfg job must not create anything"


def test_help_lists_the_config_groups(quick):
    result = quick["help"]
    assert result.returncode == 0, result
    optim_lines = [ln for ln in result.output.splitlines() if ln.strip().startswith("optim:")]
    assert optim_lines, result
    offered = {name.strip() for name in optim_lines[0].split(":", 1)[1].split(",")}
    assert {"adamw", "adam", "adam_atan2", "sgd"} <= offered, optim_lines
    for group in ("model:", "data:", "trainer:", "grad_filter:", "experiment:", "debug:"):
        assert any(ln.strip().startswith(group) for ln in result.output.splitlines()), group


# ------------------------------------------------------------------------------------------ torchrun
def test_nproc_per_node_2_runs_torchrun_with_two_gloo_ranks(tmp_path):
    # `++`: conf/trainer/default.yaml does not list nproc_per_node (see test_every_schema_key_can_be_overridden...)
    root, data_root = tmp_path / "ck", tmp_path / "ds"
    result = run("train.py", *FAST, "++trainer.nproc_per_node=2", *paths(root, data_root))
    assert result.returncode == 0, result
    assert "torch.distributed.run" in result.output and "--nproc_per_node=2" in result.output, result
    assert "Training default on cpu x2" in result.output, result
    run_dir = root / "default"
    ckpt = load(run_dir / "latest.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng_per_rank"]) == 2
    # the two ranks draw different dropout/RNG streams, but only rank 0 writes files and logs
    assert not torch.equal(ckpt["rng_per_rank"][0]["torch"], ckpt["rng_per_rank"][1]["torch"])
    assert step_files(run_dir) == [3, 6]
    assert train_steps(run_dir) == [1, 2, 3, 4, 5, 6]
    events = [r["event"] for r in read_metrics(run_dir, "event")]
    assert events == ["start", "stop"], events
    log = (run_dir / "train.log").read_text()
    for step in (3, 6):
        assert log.count(f"Saved checkpoint {run_dir / f'step_{step:08d}.pt'}") == 1, log
    assert not [p for p in run_dir.iterdir() if ".tmp." in p.name]
    assert all(bool(torch.isfinite(t).all()) for t in tensors_in(ckpt["model"]))
