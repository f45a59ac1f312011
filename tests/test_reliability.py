"""Nothing lost, every bad input a clear error: the real CLI in subprocesses, real files, real signals.

- A table of bad inputs: each exits with its code (2 for a user error) and one message that names the
  key or file and the fix, with no traceback, and leaves an existing run directory as it was.
- Two processes on one run directory: the second is refused (exit 2, naming the holder); after a
  kill -9 of the holder, a restart gets the lock and resumes.
- A non-finite (or diverging) streak writes no checkpoint; the message names the last good one, and a
  rerun with a saner learning rate resumes from it.
- A full disk (a small tmpfs as paths.root) is an exit-2 message naming the space needed; the previous
  checkpoint stays loadable.
- Config changes on resume: refused when they cannot be honoured, applied (with a warning) otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from tests.cli_helpers import (
    TINY,
    finish,
    load,
    paths,
    read_metrics,
    run,
    run_parallel,
    start,
    step_files,
    wait_for,
)
from utils.config.errors import ConfigError
from utils.storage.checkpoint import CheckpointManager
from utils.training.runner import fit
from utils.training.trainer import NonFiniteError

FAST = ["debug=fast", *TINY]
NO_GPU = not torch.cuda.is_available()

# (script, overrides, exit code, phrases the message must contain). Every row runs against a copy of a
# finished run directory (run_name=base), which must be left exactly as it was.
BAD_INPUTS = [
    ("train.py", ["optim.lr=-1"], 2, ["optim", "Invalid learning rate: -1"]),
    ("train.py", ["trainer.ema.decay=1.5"], 2, ["trainer.ema.decay", "[0, 1]"]),
    ("train.py", ["optim.betas=[0.9]"], 2, ["optim", "betas=(0.9,)"]),
    *([("train.py", ["trainer.device=cuda"], 2, ["trainer.device=cuda", "no CUDA GPU"])] if NO_GPU else []),
    ("train.py", ["trainer.nproc_per_node=2", "trainer.global_batch_size=33"], 2,
     ["trainer.global_batch_size=33", "not divisible", "nproc_per_node=2"]),
    ("train.py", ["trainer.eval_batch_size=0"], 2, ["trainer.eval_batch_size", "positive"]),
    ("train.py", ["trainer.monitor=val/accuracy"], 2, ["trainer.monitor='val/accuracy'", "did you mean val/acc"]),
    ("pretrain.py", ["model=nonexistent"], 2, ["model/nonexistent", "grokking/transformer"]),
    ("train.py", ["model=nonexistent"], 2, ["model/nonexistent", "grokking/transformer"]),
    ("pretrain.py", ["trainer.max_stepz=3"], 2, ["trainer.max_stepz", "did you mean max_steps"]),
    ("train.py", ["trainer.ema.decayy=0.5"], 2, ["trainer.ema.decayy", "did you mean decay"]),
    ("pretrain.py", ["optim.lrr=1"], 2, ["optim.lrr", "did you mean lr"]),
    ("train.py", ["+model.widht=3"], 2, ["model.widht", "did you mean width", "Accepted keys"]),
    ("train.py", ["trainer.max_steps=abc"], 2, ["trainer.max_steps", "abc"]),
    ("train.py", ["trainer.precision=fp8"], 2, ["trainer.precision", "fp8"]),
    ("train.py", ["optim=sgd"], 2, ["optim._target_", "--fresh", "run_name"]),
    ("train.py", ["model.width=64"], 2, ["model.width", "--fresh"]),
    ("train.py", ["data.p=29"], 2, ["data.p", "--fresh"]),
    ("pretrain.py", ["data.p=91"], 2, ["data.p must be a prime"]),
    # Bad data files ({files}: written by the fixture; {data}: a data root of this row's own).
    ("train.py", ["experiment=trm_sudoku", "data.size=4", "data.train_csv={files}/bad_row.csv",
                  "data.val_csv={files}/good.csv"], 2, ["bad_row.csv:3:", "expected 1..4"]),
    ("train.py", ["experiment=trm_sudoku", "data.size=4", "data.train_csv={files}/latin1.csv",
                  "data.val_csv={files}/good.csv"], 2, ["latin1.csv:2:", "not UTF-8", "save the file as UTF-8"]),
    ("train.py", ["experiment=trm_arc", "data.arc_dir={files}/arc_ragged"], 2,
     ["arc-agi_training_challenges.json", "row 1 has 1 cells but row 0 has 2"]),
    ("train.py", ["experiment=trm_arc", "data.arc_dir={files}/arc_colour"], 2,
     ["arc-agi_training_challenges.json", "is 11", "colours must be ints 0..9"]),
    ("train.py", ["paths.data_root={data}"], 2, ["data.pt is truncated or damaged", "--rebuild-dataset"]),
]


GOOD_4X4 = ("1234341221434321", "1234341221434321")  # puzzle (all given) and solution


def _write_bad_files(files: Path) -> None:
    files.mkdir()
    good = "puzzle,solution\n" + "\n".join(",".join(GOOD_4X4) for _ in range(3)) + "\n"
    (files / "good.csv").write_text(good)
    (files / "bad_row.csv").write_text(good.replace("1234341221434321,1234341221434321\n1234",
                                                    "1234341221434321,1234341221434321\n1239", 1))
    (files / "latin1.csv").write_bytes(b"puzzle,solution\n12343412214343\xe921,1234341221434321\n")
    task = {"train": [{"input": [[1, 2], [3, 4]], "output": [[4, 3], [2, 1]]}], "test": [{"input": [[1, 2], [3, 4]]}]}
    for name, broken_output in (("arc_ragged", [[4, 3], [2]]), ("arc_colour", [[4, 3], [11, 1]])):
        arc = files / name
        arc.mkdir()
        bad = {"t0": {**task, "train": [{"input": [[1, 2], [3, 4]], "output": broken_output}]}}
        for subset in ("training", "evaluation"):
            (arc / f"arc-agi_{subset}_challenges.json").write_text(json.dumps(bad if subset == "training" else {"t1": task}))
            (arc / f"arc-agi_{subset}_solutions.json").write_text(json.dumps({"t0" if subset == "training" else "t1": [[[4, 3], [2, 1]]]}))


def _snapshot(run_dir: Path) -> dict[str, str]:
    """Every file's content digest, except the records of the attempt itself: train.log (the error and its
    traceback are appended on purpose), .hydra/ (Hydra's record of the last command) and the lock file."""
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name not in ("train.log", ".run.lock") and ".hydra" not in p.parts
    }


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[object, Path, dict[str, str]]]:
    base = tmp_path_factory.mktemp("bad_inputs")
    data = base / "ds"
    first = run("train.py", *FAST, "run_name=base", *paths(base / "ck", data))
    assert first.returncode == 0, first
    _write_bad_files(base / "files")
    commands, snapshots = {}, {}
    for i, (script, overrides, _, _) in enumerate(BAD_INPUTS):
        root = base / f"case{i}"
        shutil.copytree(base / "ck", root)
        own_data = base / f"data{i}"
        if any("{data}" in o for o in overrides):  # a built dataset with its data.pt cut in half
            shutil.copytree(data, own_data)
            (table,) = own_data.rglob("data.pt")
            table.write_bytes(table.read_bytes()[: table.stat().st_size // 2])
        snapshots[i] = _snapshot(root / "base")
        filled = [o.format(files=base / "files", data=own_data) for o in overrides]
        # Another experiment's rows leave out the tiny grokking model (its keys do not exist there).
        shrink = ["debug=fast", "trainer.device=cpu"] if any(o.startswith("experiment=") for o in overrides) else FAST
        commands[i] = [script, *shrink, "run_name=base", *paths(root, data), *filled]
    results = run_parallel(commands, timeout=180, max_parallel=3)
    return {i: (results[i], base / f"case{i}" / "base", snapshots[i]) for i in commands}


@pytest.mark.parametrize("index", range(len(BAD_INPUTS)), ids=[f"{s}:{' '.join(o)}" for s, o, _, _ in BAD_INPUTS])
def test_bad_input_is_one_message_with_its_exit_code_and_changes_nothing(bad_input_runs, index: int) -> None:
    _, _, code, phrases = BAD_INPUTS[index]
    result, run_dir, before = bad_input_runs[index]
    assert result.returncode == code, result
    assert "Traceback" not in result.output, result
    errors = [ln for ln in result.output.splitlines() if "[ERROR]" in ln]
    assert len(errors) == 1, result
    for phrase in phrases:
        assert phrase in errors[0], f"the message should contain {phrase!r}: {errors[0]}"
    assert _snapshot(run_dir) == before, "a refused command must not change the run directory"


def test_cfg_job_through_train_py_prints_the_config(tmp_path: Path) -> None:
    result = run("train.py", "--cfg", "job", "debug=fast", *paths(tmp_path))
    assert result.returncode == 0, result
    assert "_target_: models.grokking.transformer.DecoderTransformer" in result.output, result
    assert "max_steps: 6" in result.output


# ------------------------------------------------------------------------------------------- run-dir lock
def test_a_second_run_on_the_same_run_directory_is_refused_and_a_kill_frees_it(tmp_path: Path) -> None:
    args = [*TINY, "run_name=dup", "trainer.max_steps=100000", "trainer.eval_interval=1000",
            "trainer.checkpoint.interval=5", *paths(tmp_path / "ck")]
    run_dir = tmp_path / "ck" / "dup"
    holder = start("pretrain.py", *args)
    try:
        wait_for(lambda: step_files(run_dir), timeout=120, what="the first run's first checkpoint", proc=holder)
        for script in ("train.py", "pretrain.py"):
            second = run(script, *args)
            assert second.returncode == 2, second
            assert f"pid {holder.pid} on " in second.output and "in use by another run" in second.output, second
            assert "run_name=" in second.output and "Traceback" not in second.output, second
        assert holder.poll() is None, "the first run must go on undisturbed"
    finally:
        holder.send_signal(signal.SIGKILL)
        finish(holder)
    # the newest complete checkpoint (a kill can land between a step file and its digest file)
    last = CheckpointManager(run_dir).load_latest()[0]["train_state"]["step"]
    again = run("pretrain.py", *[a for a in args if a != "trainer.max_steps=100000"], f"trainer.max_steps={last + 3}")
    assert again.returncode == 0, again
    assert f"at step {last}" in again.output and "Resumed from" in again.output, again


# ------------------------------------------------------------------------------------- non-finite streaks
def test_a_nonfinite_streak_writes_no_checkpoint_and_names_the_last_good_one(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    run_dir = root / "default"
    good = run("train.py", *FAST, "trainer.checkpoint.interval=1", *paths(root))
    assert good.returncode == 0, good
    # Resume the finished 6-step run with an exploding learning rate: every later step is non-finite.
    bad = run("train.py", *FAST, "trainer.checkpoint.interval=1", "optim.lr=1e30", "trainer.max_steps=30",
              "trainer.max_consecutive_nonfinite=4", *paths(root))
    assert bad.returncode == 3, bad
    # Step 7's loss is still finite, but its update leaves exploded weights: step 8 is the first non-finite
    # one, so the checkpoint of step 7 is discarded and step 6 is the last good checkpoint.
    assert step_files(run_dir)[-1] == 6, "no checkpoint of the streak (or of the step that caused it) may stay"
    assert f"The last good checkpoint is {run_dir / 'step_00000006.pt'} (step 6)" in bad.output, bad
    assert load(run_dir / "latest.pt")["train_state"]["step"] == 6
    best = load(run_dir / "best.pt")
    assert best["step"] <= 6 and all(bool(torch.isfinite(t).all()) for t in best["model"].values())
    saner = run("train.py", *FAST, "trainer.checkpoint.interval=1", "trainer.max_steps=9", *paths(root))
    assert saner.returncode == 0, saner
    assert "Resumed from" in saner.output and "at step 6" in saner.output, saner
    assert load(run_dir / "latest.pt")["train_state"]["step"] == 9


def test_a_diverging_loss_counts_as_nonfinite(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, "trainer.divergence.max_loss=1.0", "trainer.max_consecutive_nonfinite=3")
    with pytest.raises(NonFiniteError, match="diverging loss .* > trainer.divergence.max_loss=1.0"):
        fit(cfg)
    assert step_files(tmp_path / "ck" / "test") == []


# -------------------------------------------------------------------------------------------- full disk
def _mount_tmpfs(where: Path, size: str) -> str | None:
    """Mount a tmpfs of `size` at `where`; the reason it cannot be done here, or None."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root (CI runs as root)"
    where.mkdir(parents=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True)
    return None if proc.returncode == 0 else f"mount -t tmpfs failed: {proc.stderr.strip()}"


def test_a_full_disk_is_a_clear_error_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    disk = tmp_path / "small_disk"
    reason = _mount_tmpfs(disk, "16m")
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the full-disk test must run on CI: {reason}")
        pytest.skip(reason)
    try:
        # width 192: ~0.9M parameters, model + Adam state ~11 MB per checkpoint: the first fits, the second not.
        args = [*FAST, "model.width=192", f"paths.root={disk}", f"paths.data_root={tmp_path / 'ds'}"]
        result = run("train.py", *args)
        assert result.returncode == 2, result
        errors = [ln for ln in result.output.splitlines() if "[ERROR]" in ln]
        assert len(errors) == 1 and "Out of disk space" in errors[0] and "MiB" in errors[0], result
        assert str(disk) in errors[0] and "Traceback" not in result.output, result
        state, path = CheckpointManager(disk / "default").load_latest()
        assert path.name in ("latest.pt", "step_00000003.pt") and state["train_state"]["step"] == 3
        assert not [p for p in (disk / "default").iterdir() if ".tmp." in p.name], "no temp file may be left"
        again = run("train.py", *args)  # the same command: the same message, the checkpoint still intact
        assert again.returncode == 2 and "Out of disk space" in again.output, again
        assert CheckpointManager(disk / "default").load_latest()[0]["train_state"]["step"] == 3
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# ---------------------------------------------------------------------------------- config changes on resume
def test_resume_applies_a_changed_learning_rate_and_max_steps(make_cfg, tmp_path: Path) -> None:
    fit(make_cfg(tmp_path, "trainer.max_steps=10", "schedule.warmup_steps=0"))
    resumed = fit(make_cfg(tmp_path, "trainer.max_steps=14", "schedule.warmup_steps=0", "optim.lr=0.01",
                           "optim.weight_decay=0.0"))
    group = resumed.trainer.optimizers[0].optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(0.01) and group["weight_decay"] == 0.0
    assert resumed.state.step == 14
    logged = [r for r in read_metrics(tmp_path / "ck" / "test", "train") if r["step"] > 10]
    assert all(r["lr/main"] == pytest.approx(0.01) for r in logged)


def test_resume_refuses_another_model_or_optimizer(make_cfg, tmp_path: Path) -> None:
    fit(make_cfg(tmp_path, "trainer.max_steps=4"))
    with pytest.raises(ConfigError, match=r"another class.*optim\._target_.*--fresh"):
        fit(make_cfg(tmp_path, "trainer.max_steps=8", "optim=sgd"))
    with pytest.raises(ConfigError, match=r"another model.*model\.dropout.*--fresh"):
        fit(make_cfg(tmp_path, "trainer.max_steps=8", "model.dropout=0.1"))


def test_a_read_only_run_directory_is_a_clear_error(tmp_path: Path) -> None:
    read_only = tmp_path / "read_only"
    if os.geteuid() == 0:  # root writes through chmod: a read-only tmpfs refuses it too
        read_only.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(read_only)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.fail(f"mount -o ro tmpfs failed: {proc.stderr.strip()}")
    else:
        read_only.mkdir(mode=0o555)
    try:
        for script in ("train.py", "pretrain.py"):
            result = run(script, *FAST, f"paths.root={read_only}", f"paths.data_root={tmp_path / 'ds'}")
            assert result.returncode == 2, result
            errors = [ln for ln in result.output.splitlines() if "[ERROR]" in ln]
            assert len(errors) == 1 and "Cannot write to the run directory" in errors[0], result
            assert "paths.root=" in errors[0] and "Traceback" not in result.output, result
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(read_only)], check=False)
