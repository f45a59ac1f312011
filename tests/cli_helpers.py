"""Shared helpers for the end-to-end tests that run the real CLI (train.py / pretrain.py) in subprocesses.

Nothing here is mocked: every helper starts the real scripts with `sys.executable` from the repository
root, reads the files they write, and sends them real signals.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# The smallest config that still exercises every code path: a 1-layer width-32 transformer on the p=23
# table (506 equations, 253 of them for training). A few ms per step on one core; on the CPU even where a
# GPU is visible (trainer.device=auto would pick it), so runs are comparable and DDP uses gloo.
CPU = "trainer.device=cpu"
# drop_last: the grokking preset keeps each epoch's short last batch; the tests count whole batches.
TINY = ["model.width=32", "model.num_layers=1", "trainer.global_batch_size=64", "data.p=23", "trainer.drop_last=true", CPU]

# One intra-op thread per process: the tests start several trainers at once on a 2-core machine and a
# tiny model gains nothing from more threads (with 2 competing threads per process a step takes ~100x
# longer). Also what torchrun sets for its workers.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ENV.pop("HYDRA_FULL_ERROR", None)

DEFAULT_TIMEOUT = 240


def paths(root: Path, data_root: Path | None = None) -> list[str]:
    """Overrides that keep a run inside the test's temporary directory."""
    data_root = data_root if data_root is not None else root.parent / "ds"
    return [f"paths.root={root}", f"paths.data_root={data_root}"]


@dataclass
class Result:
    cmd: list[str]
    returncode: int
    output: str  # stdout and stderr, interleaved as the process wrote them

    def __repr__(self) -> str:  # shown by pytest when an assertion on the result fails
        return f"$ {' '.join(self.cmd)}\n(exit {self.returncode})\n{self.output[-6000:]}"


def command(script: str, *args: str) -> list[str]:
    return [sys.executable, script, *args]


def start(script: str, *args: str) -> subprocess.Popen:
    """Start `python <script> args...` in the repository root, output (stdout + stderr) to a temp file.

    A file rather than a pipe: a long run logs every step, and a full pipe nobody reads would block it.
    """
    cmd = command(script, *args)
    out = tempfile.TemporaryFile()  # noqa: SIM115 - read and closed by finish()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=ENV, stdout=out, stderr=subprocess.STDOUT)
    proc.cmd = cmd  # type: ignore[attr-defined]
    proc.out = out  # type: ignore[attr-defined]
    return proc


def output_so_far(proc: subprocess.Popen) -> str:
    proc.out.seek(0)  # type: ignore[attr-defined]
    return proc.out.read().decode("utf-8", "replace")  # type: ignore[attr-defined]


def finish(proc: subprocess.Popen, timeout: float = DEFAULT_TIMEOUT) -> Result:
    """Wait for a process from `start` and collect its output; kills it (and fails) on timeout."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(
            f"timed out after {timeout}s: {' '.join(proc.cmd)}\n{output_so_far(proc)[-4000:]}"  # type: ignore[attr-defined]
        ) from None
    return Result(proc.cmd, proc.returncode, output_so_far(proc))  # type: ignore[attr-defined]


def run(script: str, *args: str, timeout: float = DEFAULT_TIMEOUT) -> Result:
    return finish(start(script, *args), timeout)


def run_parallel(commands: Mapping[Any, list[str]], timeout: float = DEFAULT_TIMEOUT,
                 max_parallel: int = 4) -> dict[Any, Result]:
    """Run independent `[script, *args]` commands, `max_parallel` at a time; results by key.

    Overlapping the interpreter/torch start-ups is what makes this worthwhile; more at once only thrashes.
    """
    pending = list(commands.items())
    running: dict[Any, subprocess.Popen] = {}
    results: dict[Any, Result] = {}
    deadline = time.monotonic() + timeout * max(1, len(pending))
    while pending or running:
        while pending and len(running) < max_parallel:
            key, cmd = pending.pop(0)
            running[key] = start(*cmd)
        for key, proc in list(running.items()):
            if proc.poll() is not None:
                results[key] = finish(proc)
                del running[key]
        if time.monotonic() > deadline:
            for proc in running.values():
                proc.kill()
            raise AssertionError(f"run_parallel timed out; still running: {list(running)}")
        time.sleep(0.05)
    return {key: results[key] for key in commands}


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, proc: subprocess.Popen | None = None,
             poll_s: float = 0.002) -> Any:
    """Poll until `predicate()` is truthy; fail if `proc` exits first or the time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            value = predicate()  # it may have come true just before the exit
            if value:
                return value
            raise AssertionError(f"process exited (code {proc.returncode}) before: {what}\n{finish(proc)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for: {what}")
        time.sleep(poll_s)


# ------------------------------------------------------------------------------------------- run dirs
def read_metrics(run_dir: Path, kind: str | None = None) -> list[dict[str, Any]]:
    """metrics.jsonl records (optionally of one kind); a line cut by a kill is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text("utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if kind is None or rec.get("kind") == kind:
            records.append(rec)
    return records


def train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir, "train")]


def step_files(run_dir: Path) -> list[int]:
    """Steps of the complete step_XXXXXXXX.pt files (sidecar written) in a run directory."""
    if not Path(run_dir).is_dir():
        return []
    steps = []
    for p in Path(run_dir).glob("step_*.pt"):
        if p.with_name(p.name + ".sha256").exists():
            steps.append(int(p.stem.split("_")[1]))
    return sorted(steps)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_tensors_equal(a: Any, b: Any, where: str = "state") -> int:
    """Recursive comparison: every tensor bitwise equal (torch.equal), every other leaf ==. Returns #tensors."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{list(a.shape)} != {b.dtype}{list(b.shape)}"
        assert torch.equal(a, b), f"{where}: tensors differ (max abs diff {(a.double() - b.double()).abs().max()})"
        return 1
    if isinstance(a, Mapping):
        assert sorted(map(str, a)) == sorted(map(str, b)), f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        return sum(assert_tensors_equal(a[k], b[k], f"{where}[{k!r}]") for k in a)
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        return sum(assert_tensors_equal(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b)))
    both_nan = isinstance(a, float) and math.isnan(a) and math.isnan(b)  # NaN == NaN for this purpose
    assert a == b or both_nan, f"{where}: {a!r} != {b!r}"
    return 0


def override(args: list[str], *new: str) -> list[str]:
    """`args` with each `key=value` in `new` replacing any override of the same key (`+`/`++` ignored)."""

    def key(a: str) -> str:
        return a.lstrip("+").split("=", 1)[0]

    replaced = {key(n) for n in new}
    return [a for a in args if key(a) not in replaced] + list(new)
