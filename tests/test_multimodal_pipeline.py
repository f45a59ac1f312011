"""Acceptance of the seed-003 pipeline through the real CLI: `python train.py experiment=multimodal_tiny`.

The dataset is built by a background process while training starts on the first consolidated file and
takes in later files at epoch starts; Ctrl+C (SIGINT) stops the trainer with a checkpoint while the
builder goes on, and the same command resumes both. `--no-incremental` waits for the whole dataset.
Shrunk: 4 examples per batch file, 3 batch files per consolidated file, a throttled builder so that
training really overlaps the build, a repository-independent code source.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from dataset.streaming.manifest import LOCK_FILE, read_manifest
from tests.cli_helpers import CPU, finish, load, read_metrics, run, start, wait_for
from utils.storage.locks import is_locked, lock_holder


@pytest.fixture
def code_dir(tmp_path: Path) -> Path:
    root = tmp_path / "code_src"
    root.mkdir()
    for k in range(4):
        body = "".join(f"def f_{k}_{i}(x):\n    return x * {i} + {k}\n\n" for i in range(10))
        (root / f"module_{k}.py").write_text(body, encoding="utf-8")
    return root


def small_args(tmp_path: Path, code_dir: Path) -> list[str]:
    return [
        "experiment=multimodal_tiny", f"paths.root={tmp_path / 'runs'}", f"paths.data_root={tmp_path / 'data'}", CPU,
        "data.examples_per_batch=4", "data.batches_per_consolidated=3", "data.max_examples=240", "data.generate_stories=20",
        f"data.code_dirs=['{code_dir}']", "data.val_every=3", "data.target_len=24", "data.throttle_s=0.5",
        "trainer.global_batch_size=8", "trainer.max_steps=40", "trainer.eval_interval=20", "trainer.eval_max_batches=2",
        "trainer.log_interval=1", "trainer.checkpoint.interval=5", "model.dqn_warmstart_steps=8",
    ]


def stop_builder(root: Path) -> None:
    holder = lock_holder(root / LOCK_FILE)
    if holder is not None and is_locked(root / LOCK_FILE):
        os.kill(holder.pid, signal.SIGTERM)


def epoch_file_counts(output: str) -> list[int]:
    return [int(n) for n in re.findall(r"Epoch \d+ trains on (\d+) consolidated files", output)]


def test_incremental_training_ctrl_c_and_resume_of_builder_and_trainer(tmp_path, code_dir):
    args = small_args(tmp_path, code_dir)
    root, run_dir = tmp_path / "data" / "vision_unified_tiny", tmp_path / "runs" / "multimodal_tiny"
    try:
        proc = start("train.py", *args)
        wait_for(lambda: len([m for m in read_metrics(run_dir) if "train/lm" in m]) >= 6 if run_dir.exists() else False,
                 timeout=180, what="six training steps", proc=proc)
        manifest = read_manifest(root)
        assert manifest is not None and not manifest["complete"], "six steps trained while the dataset is still being built"
        proc.send_signal(signal.SIGINT)
        first = finish(proc)
        assert first.returncode == 75, first
        assert "interrupted by SIGINT" in first.output and (run_dir / "latest.pt").exists(), first
        stopped_at = load(run_dir / "latest.pt")["train_state"]["step"]

        # The builder was not part of the Ctrl+C: it keeps writing while no trainer runs.
        written = read_manifest(root)["batches_written"]
        wait_for(lambda: read_manifest(root)["batches_written"] > written or read_manifest(root)["complete"],
                 timeout=30, what="the builder to go on after Ctrl+C")

        second = run("train.py", *args)
        assert second.returncode == 0, second
        assert f"Resumed from {run_dir / 'latest.pt'} at step {stopped_at}" in second.output, second
        counts = epoch_file_counts(first.output + second.output)
        assert len(set(counts)) >= 2 and counts == sorted(counts), f"later consolidated files were taken in: {counts}"
        steps = [m["step"] for m in read_metrics(run_dir) if "train/lm" in m]
        assert steps[-1] == 40 and steps.count(stopped_at + 1) == 1
        val = [m for m in read_metrics(run_dir) if "val/token_acc" in m]
        for key in ("val/lm", "val/mtp", "val/vq", "val/dqn", "val/code_token_acc", "val/code_line_exact"):
            assert key in val[-1], key
        train = [m for m in read_metrics(run_dir) if "train/lm" in m][-1]
        for key in ("train/lm", "train/mtp", "train/vq", "train/dqn", "train/vq/perplexity", "train/grad_monitor/max_norm"):
            assert key in train, key
    finally:
        stop_builder(root)


def test_no_incremental_waits_for_the_whole_dataset(tmp_path, code_dir):
    args = [*small_args(tmp_path, code_dir), "trainer.max_steps=2", "trainer.eval_interval=2", "data.throttle_s=0.0"]
    root = tmp_path / "data" / "vision_unified_tiny"
    try:
        result = run("train.py", "--no-incremental", *args)
        assert result.returncode == 0, result
        before_training = result.output.split("Training multimodal_tiny")[0]
        assert "complete=True" in before_training, result
        assert read_manifest(root)["complete"]
    finally:
        stop_builder(root)


def test_builder_that_died_stops_training_with_a_clear_error(tmp_path, code_dir):
    args = [*small_args(tmp_path, code_dir), "data.throttle_s=2.0"]
    root = tmp_path / "data" / "vision_unified_tiny"
    proc = start("train.py", *args)
    try:
        wait_for(lambda: is_locked(root / LOCK_FILE), timeout=60, what="the background builder", proc=proc)
        os.kill(lock_holder(root / LOCK_FILE).pid, signal.SIGKILL)  # type: ignore[union-attr]
        result = finish(proc, timeout=60)
        assert result.returncode != 0, result
        assert "builder" in result.output and "died" in result.output and "builder.log" in result.output, result
    finally:
        if proc.poll() is None:
            proc.kill()
        stop_builder(root)
    time.sleep(0.1)
