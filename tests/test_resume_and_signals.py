"""Resume and shutdown end to end: real trainer processes, killed or signalled at real moments.

* SIGKILL at a random checkpoint, rerun: the final state is bitwise identical to an uninterrupted run.
* SIGINT / SIGTERM / SIGUSR1: checkpoint, exit 75, resumable; a second SIGINT aborts with 130.
* A corrupt newest checkpoint is skipped with a warning; a diverging run stops with exit 3.
* SIGTERM / SIGUSR1 / SIGKILL while a background save is in flight (held there by tests/ckpt_gate.py):
  a valid checkpoint is left, and the resumed run is bitwise identical to an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from tests.cli_helpers import (
    CPU,
    TINY,
    assert_tensors_equal,
    finish,
    load,
    override,
    paths,
    read_metrics,
    run,
    start,
    step_files,
    train_steps,
    wait_for,
)
from utils.storage.checkpoint import CheckpointManager, load_checkpoint, tensors_in
from utils.signals import EXIT_ABORTED, EXIT_INTERRUPTED, EXIT_NONFINITE, GracefulShutdown

# ------------------------------------------------------------------------------- exact resume after SIGKILL
# 253 training equations / batch 32 = 7 batches per epoch (drop_last), 6 epochs = 42 steps. Checkpoints every
# 5 steps and at every evaluation (10): most of them fall mid-epoch (5 % 7 != 0), so a resume has to skip into
# the middle of an epoch. Dropout makes every step consume the RNG; EMA and Grokfast add state of their own.
BATCHES_PER_EPOCH = 7
EPOCHS = 6
EXACT = [
    *override(TINY, "trainer.global_batch_size=32"),
    "model.dropout=0.1",
    "grad_filter=grokfast_ema",
    "trainer.ema.enabled=true",
    "trainer.max_steps=1000",
    f"++trainer.max_epochs={EPOCHS}",
    "trainer.checkpoint.interval=5",
    "trainer.eval_interval=10",
    "trainer.log_interval=1",
    "trainer.early_stopping.enabled=false",
]
FINAL_STEP = BATCHES_PER_EPOCH * EPOCHS


class Background:
    """A run started now and waited for on first use (so it overlaps with other work)."""

    def __init__(self, root: Path, *args: str) -> None:
        self.root = root
        self.run_dir = root / "default"
        self.proc = start(*args)
        self._result = None

    def result(self):
        if self._result is None:
            self._result = finish(self.proc)
        return self._result


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    return tmp_path_factory.mktemp("datasets")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, datasets):
    """Run A: the reference, never interrupted."""
    root = tmp_path_factory.mktemp("exact_a") / "ck"
    a = Background(root, "pretrain.py", *EXACT, *paths(root, datasets))
    yield a
    if a.proc.poll() is None:
        a.proc.kill()
        a.proc.wait()


def comparable(ckpt: dict) -> dict:
    """Everything in a checkpoint except where it was written (paths differ between the two runs)."""
    out = {k: v for k, v in ckpt.items() if k != "config"}
    out["config"] = {k: v for k, v in ckpt["config"].items() if k != "paths"}
    return out


@pytest.mark.parametrize(("kill_at_or_after", "delay_s"), [(12, 0.0), (22, 0.03)])
def test_sigkill_then_rerun_is_bitwise_identical_to_an_uninterrupted_run(
    uninterrupted, datasets, tmp_path, kill_at_or_after, delay_s
):
    root = tmp_path / "ck"
    run_dir = root / "default"
    args = [*EXACT, *paths(root, datasets)]

    # Run B: SIGKILL as soon as a checkpoint at or past the kill point is on disk (plus a short delay).
    b = start("pretrain.py", *args)
    seen = wait_for(lambda: [s for s in step_files(run_dir) if s >= kill_at_or_after], timeout=180,
                    what=f"a checkpoint at step >= {kill_at_or_after}", proc=b, poll_s=0.001)
    time.sleep(delay_s)
    b.send_signal(signal.SIGKILL)
    killed = finish(b)
    assert killed.returncode == -signal.SIGKILL, f"run B finished before it could be killed (saw {seen})\n{killed}"

    # What a resume will start from: loaded with the launcher's own rules (latest.pt, else newest step file).
    state, resume_path = CheckpointManager(run_dir).load_latest()
    resume_step = state["train_state"]["step"]
    assert kill_at_or_after - 5 <= resume_step < FINAL_STEP, resume_step
    assert 0 < state["train_state"]["batches_in_epoch"] < BATCHES_PER_EPOCH, (
        f"the resume point (step {resume_step}) should be mid-epoch: {state['train_state']}"
    )

    rerun = run("pretrain.py", *args)
    assert rerun.returncode == 0, rerun
    assert f"Resumed from {resume_path} at step {resume_step}" in rerun.output, rerun

    a = uninterrupted.result()
    assert a.returncode == 0, a
    a_dir = uninterrupted.run_dir
    # the metrics history is what an uninterrupted run logs: every step once, with the same loss
    steps_b = train_steps(run_dir)
    assert steps_b == list(range(1, FINAL_STEP + 1)), steps_b
    losses_a = {r["step"]: r["train/loss"] for r in read_metrics(a_dir, "train")}
    losses_b = {r["step"]: r["train/loss"] for r in read_metrics(run_dir, "train")}
    differ = [s for s in losses_a if losses_a[s] != losses_b.get(s)]
    assert not differ, f"resumed at step {resume_step}; the loss differs from step {differ[0]} on"
    final_a, final_b = load(a_dir / "latest.pt"), load(run_dir / "latest.pt")
    assert final_a["train_state"]["step"] == final_b["train_state"]["step"] == FINAL_STEP
    assert final_a["train_state"]["epoch"] == EPOCHS, "the run must cross epoch boundaries"
    # model, optimizer, schedule, EMA, Grokfast state, RNG streams, progress and eval history: all identical
    n = assert_tensors_equal(comparable(final_a), comparable(final_b), "latest.pt")
    assert n > 20
    assert_tensors_equal(load(a_dir / "ema_model.pt"), load(run_dir / "ema_model.pt"), "ema_model.pt")
    assert_tensors_equal(load(a_dir / "best.pt"), load(run_dir / "best.pt"), "best.pt")


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(uninterrupted, datasets, tmp_path):
    a = uninterrupted.result()
    assert a.returncode == 0, a
    root = tmp_path / "ck"
    shutil.copytree(uninterrupted.root, root)
    run_dir = root / "default"
    *_, previous, newest = step_files(run_dir)
    latest, newest_path = run_dir / "latest.pt", run_dir / f"step_{newest:08d}.pt"
    # truncate latest.pt; flip one byte in the middle of the newest step file (a copy here, not a hard link)
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 2])
    raw = bytearray(newest_path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    newest_path.write_bytes(bytes(raw))

    result = run("pretrain.py", *override(EXACT, f"++trainer.max_epochs={EPOCHS + 1}"), *paths(root, datasets))
    assert result.returncode == 0, result
    assert f"Cannot load checkpoint {latest}" in result.output, result
    assert f"Cannot load checkpoint {newest_path}" in result.output, result
    assert f"Resumed from {run_dir / f'step_{previous:08d}.pt'} at step {previous}" in result.output, result
    final = load(run_dir / "latest.pt")
    assert final["train_state"]["step"] == BATCHES_PER_EPOCH * (EPOCHS + 1)
    assert train_steps(run_dir) == list(range(1, BATCHES_PER_EPOCH * (EPOCHS + 1) + 1))


# ----------------------------------------------------------------------- a signal or a kill during an async save
def holding(name: str, directory: Path) -> list[str]:
    """Overrides that hold the background write of checkpoint file `name` in flight (tests/ckpt_gate.py)."""
    return ["+callbacks.gate._target_=tests.ckpt_gate.HoldCheckpointWrite", f"+callbacks.gate.hold={name}",
            f"+callbacks.gate.directory={directory}"]


def start_with_a_held_write(step: int, tmp_path: Path, datasets) -> tuple:
    """Start the EXACT run with the write of step_<step>.pt held in flight; return once it is held:
    (process, run dir, gate directory, the run's arguments)."""
    root, gate = tmp_path / "ck", tmp_path / "gate"
    args = [*EXACT, *paths(root, datasets), *holding(f"step_{step:08d}.pt", gate)]
    proc = start("pretrain.py", *args)
    wait_for(lambda: (gate / "held").exists(), timeout=180, what=f"the write of step {step} to be held", proc=proc,
             poll_s=0.002)
    return proc, root / "default", gate, args


def trained_state(ckpt: dict) -> dict:
    """`comparable`, without the config and the test's own callback (run A has neither)."""
    out = comparable(ckpt)
    del out["config"]
    out["callbacks"] = {k: v for k, v in out["callbacks"].items() if k != "callbacks/gate"}
    return out


def assert_same_final_state(uninterrupted, run_dir: Path) -> None:
    a = uninterrupted.result()
    assert a.returncode == 0, a
    final_a, final_b = load(uninterrupted.run_dir / "latest.pt"), load(run_dir / "latest.pt")
    assert final_b["train_state"]["step"] == FINAL_STEP
    assert assert_tensors_equal(trained_state(final_a), trained_state(final_b), "latest.pt") > 20
    assert_tensors_equal(load(uninterrupted.run_dir / "ema_model.pt"), load(run_dir / "ema_model.pt"), "ema_model.pt")
    assert_tensors_equal(load(uninterrupted.run_dir / "best.pt"), load(run_dir / "best.pt"), "best.pt")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=lambda s: s.name)
def test_a_signal_while_a_save_is_in_flight_leaves_a_valid_checkpoint_and_resume_stays_exact(
    uninterrupted, datasets, tmp_path, sig
):
    proc, run_dir, gate, args = start_with_a_held_write(5, tmp_path, datasets)
    assert not (run_dir / "step_00000005.pt").exists() and Path((gate / "held").read_text()).exists()
    proc.send_signal(sig)  # training went on meanwhile; the next save waits for this write
    wait_for(lambda: f"{sig.name} received" in (run_dir / "train.log").read_text(), timeout=60,
             what=f"{sig.name} to be handled", proc=proc, poll_s=0.002)
    (gate / "release").touch()
    result = finish(proc, timeout=120)
    assert result.returncode == EXIT_INTERRUPTED, result
    assert "checkpoint saved; run the same command again to resume" in result.output, result
    stop = [m for m in read_metrics(run_dir, "event") if m["event"] == "stop"][-1]
    state, path = CheckpointManager(run_dir).load_latest()  # digests verified
    assert path.name == "latest.pt" and state["train_state"]["step"] == stop["step"] > 5, (path, stop)
    assert load_checkpoint(run_dir / "step_00000005.pt", require_digest=True)["train_state"]["step"] == 5
    assert not [p.name for p in run_dir.iterdir() if ".tmp." in p.name], "a temp file was left"

    rerun = run("pretrain.py", *args)
    assert rerun.returncode == 0, rerun
    assert f"Resumed from {run_dir / 'latest.pt'} at step {stop['step']}" in rerun.output, rerun
    assert train_steps(run_dir) == list(range(1, FINAL_STEP + 1))
    assert_same_final_state(uninterrupted, run_dir)


def test_sigkill_while_a_save_is_in_flight_leaves_the_previous_checkpoint_and_resume_stays_exact(
    uninterrupted, datasets, tmp_path
):
    proc, run_dir, gate, args = start_with_a_held_write(10, tmp_path, datasets)
    temp = Path((gate / "held").read_text())
    proc.send_signal(signal.SIGKILL)
    killed = finish(proc)
    assert killed.returncode == -signal.SIGKILL, killed
    # The killed write: complete, but under its hidden temp name only; the previous checkpoint is what loads.
    assert temp.exists() and temp.name.startswith(".") and not (run_dir / "step_00000010.pt").exists()
    state, path = CheckpointManager(run_dir).load_latest()
    assert path.name == "latest.pt" and state["train_state"]["step"] == 5, path

    (gate / "release").touch()
    rerun = run("pretrain.py", *args)
    assert rerun.returncode == 0, rerun
    assert f"Resumed from {run_dir / 'latest.pt'} at step 5" in rerun.output, rerun
    assert not temp.exists(), "the killed writer's temp file is removed by the next save"
    assert_same_final_state(uninterrupted, run_dir)


# ------------------------------------------------------------------------------------------ graceful signals
LONG = [*TINY, "trainer.max_steps=1000000", "trainer.log_interval=1", "trainer.early_stopping.enabled=false"]
SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1]


def has_train_record(run_dir: Path) -> bool:
    return bool(read_metrics(run_dir, "train"))


@pytest.fixture(scope="module")
def signalled(tmp_path_factory, datasets):
    """One long run per signal, started together; each gets its signal once it has logged a training step."""
    base = tmp_path_factory.mktemp("signals")
    runs = {}
    for sig in SIGNALS:
        root = base / sig.name / "ck"
        runs[sig] = {"root": root, "run_dir": root / "default",
                     "proc": start("pretrain.py", *LONG, *paths(root, datasets))}
    for sig, r in runs.items():  # one at a time, so each exit is timed on its own
        wait_for(lambda d=r["run_dir"]: has_train_record(d), timeout=180, what="a train record", proc=r["proc"])
        sent = time.monotonic()
        r["proc"].send_signal(sig)
        log = r["run_dir"] / "train.log"
        wait_for(lambda f=log: "Stopped: interrupted" in f.read_text(), timeout=60, what=f"the trainer to stop on {sig.name}",
                 proc=r["proc"], poll_s=0.01)
        r["stop_s"] = time.monotonic() - sent  # the loop noticed, saved and stopped
        r["result"] = finish(r["proc"], timeout=60)
        r["exit_s"] = time.monotonic() - sent  # ... and the process is gone
        r["metrics"] = read_metrics(r["run_dir"])
        r["log"] = (r["run_dir"] / "train.log").read_text()
        latest = r["run_dir"] / "latest.pt"
        r["ckpt_step"] = load(latest)["train_state"]["step"] if latest.exists() else None
    return runs


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_signal_saves_a_checkpoint_and_exits_75(signalled, sig):
    r = signalled[sig]
    result = r["result"]
    assert result.returncode == EXIT_INTERRUPTED, result
    # generous bounds: the 2-core CI machines are often shared; a tiny step takes milliseconds
    assert r["stop_s"] < 10, f"took {r['stop_s']:.1f}s to save and stop after {sig.name}"
    assert r["exit_s"] < 30, f"took {r['exit_s']:.1f}s to exit after {sig.name}"
    assert f"{sig.name} received: finishing the current step" in r["log"], r["log"][-3000:]
    assert f"Stopped: interrupted by {sig.name}" in r["log"]
    assert "checkpoint saved; run the same command again to resume" in result.output, result
    stops = [m for m in r["metrics"] if m["kind"] == "event" and m["event"] == "stop"]
    assert len(stops) == 1 and stops[0]["reason"] == f"interrupted by {sig.name}", stops
    last_logged = max(m["step"] for m in r["metrics"] if m["kind"] == "train")
    assert r["ckpt_step"] == stops[0]["step"]
    assert last_logged - 1 <= r["ckpt_step"] <= last_logged, (r["ckpt_step"], last_logged)
    assert r["ckpt_step"] in step_files(r["run_dir"])


def test_run_resumes_after_sigusr1(signalled, datasets):
    """SIGUSR1 is SLURM's warning before preemption: the requeued job runs the same command and goes on."""
    r = signalled[signal.SIGUSR1]
    step = r["ckpt_step"]
    assert step is not None, r["result"]
    resume = run("pretrain.py", *override(LONG, f"trainer.max_steps={step + 3}"), *paths(r["root"], datasets))
    assert resume.returncode == 0, resume
    assert f"Resumed from {r['run_dir'] / 'latest.pt'} at step {step}" in resume.output, resume
    assert train_steps(r["run_dir"]) == list(range(1, step + 4))
    assert load(r["run_dir"] / "latest.pt")["train_state"]["step"] == step + 3


def test_sigint_to_train_py_reaches_the_trainer(tmp_path, datasets):
    """train.py runs pretrain.py in its own process, so the pid the user (or SLURM) signals is the trainer itself."""
    root = tmp_path / "ck"
    run_dir = root / "default"
    proc = start("train.py", *LONG, *paths(root, datasets))
    wait_for(lambda: has_train_record(run_dir), timeout=180, what="a train record", proc=proc)
    proc.send_signal(signal.SIGINT)
    result = finish(proc, timeout=60)
    assert result.returncode == EXIT_INTERRUPTED, result
    assert "Handing off" in result.output and "SIGINT received" in result.output, result
    assert "checkpoint saved; run the same command again to resume" in result.output, result
    stop = [m for m in read_metrics(run_dir, "event") if m["event"] == "stop"][-1]
    assert load(run_dir / "latest.pt")["train_state"]["step"] == stop["step"]


def test_second_sigint_aborts_at_once_with_130(tmp_path, datasets):
    # The loop is held right after step 2 (tests/ckpt_gate.py), so both signals land while that step is still
    # being finished, however fast steps are: timing the second signal against a real step lost the race on an
    # idle machine (the run had finished its graceful stop before the second SIGINT was sent). The second is
    # sent once the first has been handled (logged): two signals sent back to back could be coalesced.
    root, gate = tmp_path / "ck", tmp_path / "gate"
    run_dir = root / "default"
    held = [CPU, "trainer.max_steps=1000000", "trainer.log_interval=1", "trainer.early_stopping.enabled=false",
            "+callbacks.gate._target_=tests.ckpt_gate.HoldAfterStep", "+callbacks.gate.step=2",
            f"+callbacks.gate.directory={gate}"]
    proc = start("pretrain.py", *held, *paths(root, datasets))
    wait_for(lambda: (gate / "held").exists(), timeout=180, what="the loop to be held after step 2", proc=proc)
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: "SIGINT received" in (run_dir / "train.log").read_text(), timeout=60,
             what="the first SIGINT to be handled", proc=proc, poll_s=0.0005)
    proc.send_signal(signal.SIGINT)
    result = finish(proc, timeout=60)
    assert result.returncode == EXIT_ABORTED, result
    assert "Second SIGINT: aborting now without a final checkpoint." in result.output, result
    assert "Aborted." in result.output, result
    assert not (run_dir / "latest.pt").exists(), "no checkpoint was due, and the abort must not write one"
    assert not [p.name for p in run_dir.iterdir() if ".tmp." in p.name], "an aborted save must not leave temp files"


# ------------------------------------------------------------------------------------------- NaN guard
def test_diverging_run_stops_with_exit_3_and_keeps_only_finite_checkpoints(tmp_path, datasets):
    # AdamW's first update moves every weight by ~lr: with lr=1e30 the next forward pass overflows to NaN.
    # (optim=sgd would be the classic choice; see test_cli.py::test_every_optimizer_listed_by_help_trains.)
    root = tmp_path / "ck"
    run_dir = root / "default"
    result = run("pretrain.py", "debug=fast", *TINY, "optim.lr=1e30", "++trainer.max_consecutive_nonfinite=3",
                 "trainer.max_steps=50", "trainer.checkpoint.interval=1", "trainer.ema.enabled=true",
                 *paths(root, datasets))
    assert result.returncode == EXIT_NONFINITE, result
    assert "3 consecutive non-finite or diverging steps" in result.output, result
    assert "non-finite loss (nan); step skipped" in result.output, result
    saved = sorted(run_dir.glob("*.pt"))
    assert any(p.name.startswith("step_") for p in saved), saved
    for path in saved:
        tensors = [t for t in tensors_in(load(path)) if t.is_floating_point()]
        assert tensors and all(bool(torch.isfinite(t).all()) for t in tensors), f"{path.name} has NaN/Inf"
    assert load(run_dir / "latest.pt")["train_state"]["step"] < 50


class _NonReentrantStream:
    """A log stream that, like io.BufferedWriter, refuses a write from inside one of its own writes, and
    that runs a signal handler in the middle of the first write (where EINTR lets CPython run one)."""

    def __init__(self, in_the_middle) -> None:
        self.lines: list[str] = []
        self.in_the_middle = in_the_middle
        self.writing = False

    def write(self, text: str) -> None:
        if self.writing:
            raise RuntimeError("reentrant call inside <_io.BufferedWriter>")
        self.writing = True
        try:
            if self.in_the_middle is not None:
                handler, self.in_the_middle = self.in_the_middle, None
                handler()
            self.lines.append(text)
        finally:
            self.writing = False

    def flush(self) -> None:
        pass


def test_a_signal_during_a_log_write_still_logs_that_it_was_received():
    shutdown = GracefulShutdown()
    stream = _NonReentrantStream(lambda: shutdown._handle(signal.SIGTERM, None))
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("utils.signals")
    logger.addHandler(handler)
    try:
        logging.getLogger("utils.signals").warning("a step's log line")
        deadline = time.monotonic() + 10
        while len(stream.lines) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        logger.removeHandler(handler)
    assert shutdown.requested and shutdown.signal_name == "SIGTERM"
    assert [line.strip() for line in stream.lines] == [
        "a step's log line", f"SIGTERM received: {shutdown.action}."
    ]


class _SignalOnFirstNotice(logging.Handler):
    """Sends this process one more SIGINT when the "received" line is written: it reaches the main thread
    while the first handler is still waiting for that line's thread (utils.signals._log_outside_handler)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.sent and "SIGINT received" in record.getMessage():
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)


def test_a_second_sigint_while_the_first_is_being_logged_aborts():
    handler = _SignalOnFirstNotice()
    logger = logging.getLogger("utils.signals")
    logger.addHandler(handler)
    try:
        with pytest.raises(KeyboardInterrupt), GracefulShutdown() as shutdown:
            os.kill(os.getpid(), signal.SIGINT)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # the handlers run here, between bytecodes
                time.sleep(0.01)
    finally:
        logger.removeHandler(handler)
    assert handler.sent and shutdown.requested and shutdown.signal_name == "SIGINT"
