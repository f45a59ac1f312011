"""utils/storage/checkpoint.py against real files: round trips, pruning, corruption, unsafe pickles, SIGKILL mid-save."""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from utils.storage.atomic import atomic_write_bytes, atomic_write_text
from utils.training.callbacks import Callback, CallbackList
from utils.storage.checkpoint import (
    CheckpointError,
    CheckpointManager,
    assert_finite_state,
    load_checkpoint,
    save_with_sidecar,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
LOGGER = "utils.storage.checkpoint"
MARKER_VALUE = 1234.5  # a float we can find inside the tensor payload of a saved file


# --------------------------------------------------------------------------------------------------- helpers
def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Recursive equality that also checks container types (tuple stays tuple, deque stays deque)."""
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping) and list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple, collections.deque)):
        assert len(a) == len(b), where
        if isinstance(a, collections.deque):
            assert a.maxlen == b.maxlen, where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def small_state(step: int) -> dict:
    return {"step": step, "w": torch.full((256,), MARKER_VALUE), "meta": {"lr": 0.1, "tags": ["a", "b"]}}


def flip_bit_in_payload(path: Path) -> None:
    """Flip one mantissa bit of a float inside tensor data, in place (the zip structure stays valid)."""
    data = bytearray(path.read_bytes())
    idx = data.find(struct.pack("<f", MARKER_VALUE) * 8)
    assert idx > 0, "tensor payload not found"
    data[idx + 100] ^= 0x01
    with open(path, "r+b") as f:
        f.write(data)


def warnings_about(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and name in r.getMessage()]


# ------------------------------------------------------------------------------------------------ round trip
def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


def test_round_trip_of_realistic_training_state(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.99))
    scaler = torch.amp.GradScaler("cpu")
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 8)).square().mean().backward()
        opt.step()
        sched.step()
        ema.update_parameters(model)

    state = {
        "model": model.state_dict(),
        "optimizers": {"main": opt.state_dict()},
        "schedulers": {"main": sched.state_dict()},
        "ema": ema.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": {"python": random.getstate(), "torch": torch.get_rng_state(), "numpy_as_list": [1, 2, 3]},
        "trainer": {"step": 3, "best_metric": None, "history": [{"step": 1, "loss": 0.5}], "ok": True},
        "nested": {"a": [1, 2.5, "x", None, (1, (2.0, "y"))], "b": {"c": torch.arange(5)}},
        "recent_losses": list(collections.deque([0.3, 0.2], maxlen=5)),
        "misc": {"dtype": torch.bfloat16, "device": torch.device("cpu"), "seen": {1, 2}, "blob": b"\x00"},
        "ordered": collections.OrderedDict(z=1, a=2),
        "float": 0.25,
    }
    manager = CheckpointManager(tmp_path)
    path = manager.save(state, step=3)
    assert path == tmp_path / "step_00000003.pt"

    loaded, loaded_from = manager.load_latest()
    assert loaded_from == tmp_path / "latest.pt"
    assert_same(state, loaded)

    # And it really restores: fresh objects accept every piece.
    model2 = make_model()
    model2.load_state_dict(loaded["model"])
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    opt2.load_state_dict(loaded["optimizers"]["main"])
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: min(1.0, (s + 1) / 10))
    sched2.load_state_dict(loaded["schedulers"]["main"])
    assert sched2.get_last_lr() == sched.get_last_lr()
    ema2 = torch.optim.swa_utils.AveragedModel(model2)
    ema2.load_state_dict(loaded["ema"])
    torch.amp.GradScaler("cpu").load_state_dict(loaded["scaler"])
    random.setstate(loaded["rng"]["python"])
    torch.set_rng_state(loaded["rng"]["torch"])

    named = manager.save_named("ema_model.pt", {"model": ema.module.state_dict(), "step": 3})
    assert_same(load_checkpoint(named, require_digest=True), {"model": ema.module.state_dict(), "step": 3})
    assert manager.checkpoints() == [path]  # named files are not step files


def test_state_the_safe_loader_would_refuse_is_rejected_at_save(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    bad = {"model": {"w": torch.ones(2)}, "history": collections.deque([1.0]), "rng": {"np": [CustomObject()]}}
    with pytest.raises(CheckpointError) as err:
        manager.save(bad, 1)
    assert "state['history'] (collections.deque)" in str(err.value)
    assert "state['rng']['np'][0]" in str(err.value)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_atomic_writes_replace_and_clean_up(tmp_path: Path) -> None:
    target = tmp_path / "notes.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"

    ckpt = tmp_path / "best.pt"
    save_with_sidecar({"v": torch.ones(3)}, ckpt)
    before = ckpt.read_bytes()
    with pytest.raises(CheckpointError):
        save_with_sidecar({"f": lambda: 0}, ckpt)  # refused before anything is written
    with pytest.raises(TypeError):
        atomic_write_bytes(ckpt, "not bytes")  # type: ignore[arg-type]  # fails after the temp file exists
    assert ckpt.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "best.pt.sha256", "notes.txt"]


# --------------------------------------------------------------------------------------------------- pruning
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_keep_last_prunes_and_latest_tracks_newest(tmp_path: Path, async_save: bool) -> None:
    manager = CheckpointManager(tmp_path / "run", keep_last=2, async_save=async_save)
    assert manager.load_latest() is None  # directory does not even exist yet
    for step in range(1, 6):
        manager.save(small_state(step), step)
        state, _ = manager.load_latest()
        assert state["step"] == step
    assert [p.name for p in manager.checkpoints()] == ["step_00000004.pt", "step_00000005.pt"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "latest.pt",
        "latest.pt.sha256",
        "step_00000004.pt",
        "step_00000004.pt.sha256",
        "step_00000005.pt",
        "step_00000005.pt.sha256",
    ]


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_prune_never_deletes_what_latest_points_to(tmp_path: Path, async_save: bool) -> None:
    # Resumed from an older step while a newer (bad) step file exists: the fresh save must survive pruning.
    manager = CheckpointManager(tmp_path, keep_last=1, async_save=async_save)
    manager.save(small_state(10), 10)
    manager.save(small_state(7), 7)
    state, _ = manager.load_latest()
    assert state["step"] == 7
    assert (tmp_path / "step_00000007.pt").exists()


def test_a_step_file_written_after_latest_was_last_pointed_is_loaded_first(tmp_path: Path) -> None:
    # Killed after step 15's file was complete but before latest.pt was pointed at it: resume from 15, not 10.
    manager = CheckpointManager(tmp_path, keep_last=3)
    manager.save(small_state(10), 10)
    latest_at_10 = (tmp_path / "latest.pt").read_bytes(), (tmp_path / "latest.pt.sha256").read_bytes()
    os.link(tmp_path / "latest.pt", tmp_path / "kept")  # latest.pt as it was: a hard link to step 10
    manager.save(small_state(15), 15)
    os.replace(tmp_path / "kept", tmp_path / "latest.pt")
    (tmp_path / "latest.pt.sha256").write_bytes(latest_at_10[1])
    assert (tmp_path / "latest.pt").read_bytes() == latest_at_10[0]
    state, path = manager.load_latest()
    assert (state["step"], path.name) == (15, "step_00000015.pt")
    manager.save(small_state(16), 16)  # and once latest.pt is current again, it is what loads
    state, path = manager.load_latest()
    assert (state["step"], path.name) == (16, "latest.pt")


# ------------------------------------------------------------------------------------------ asynchronous saves
class HoldWrites:
    """`CheckpointManager.before_replace` hook: holds the writer once a temp file is complete, until released, so a
    save is in flight for as long as a test needs (deterministic, no sleeps)."""

    def __init__(self) -> None:
        self.held = threading.Event()
        self.released = threading.Event()
        self.temp_files: list[Path] = []

    def __call__(self, temp_file: Path) -> None:
        self.temp_files.append(temp_file)
        self.held.set()
        assert self.released.wait(60), "the test never released the held write"


def training_state() -> tuple[dict, torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 8)).square().mean().backward()
        opt.step()
        sched.step()
    weight = model[0].weight.detach()
    state = {
        "model": model.state_dict(),  # an OrderedDict with _metadata
        "optimizers": {"main": opt.state_dict()},
        "schedulers": {"main": sched.state_dict()},
        "shared": [weight, weight, weight[:3]],  # one storage three times: written once
        "rng": {"python": random.getstate(), "torch": torch.get_rng_state()},
        "misc": {"seen": {1, 2}, "dtype": torch.float16, "t": (1, "x", None), "ordered": collections.OrderedDict(b=1)},
    }
    return state, model, opt


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="thread nice values need os.setpriority (POSIX)")
def test_the_writer_thread_runs_at_a_lower_priority_and_the_caller_keeps_its_own(tmp_path: Path) -> None:
    caller = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen: list[int] = []

    def record(temp_file: Path) -> None:  # runs in the writer thread
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    for nice, expected in ((0, caller), (7, min(caller + 7, 19))):
        manager = CheckpointManager(tmp_path / f"nice{nice}", async_save=True, writer_nice=nice)
        manager.before_replace = record
        manager.save(small_state(1), 1)
        manager.close()
        assert seen[-1] == expected
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == caller
    with pytest.raises(ValueError, match="writer_nice"):
        CheckpointManager(tmp_path, writer_nice=20)


def test_an_async_save_writes_the_bytes_of_a_sync_save_at_the_moment_of_the_call(tmp_path: Path) -> None:
    state, model, opt = training_state()
    CheckpointManager(tmp_path / "sync").save(state, 7)
    manager = CheckpointManager(tmp_path / "async", async_save=True)
    hold = HoldWrites()
    manager.before_replace = hold
    manager.save(state, 7)
    assert hold.held.wait(30)
    # In flight: only the hidden temp file exists. Training goes on and changes every live tensor meanwhile.
    assert [p.name for p in (tmp_path / "async").iterdir()] == [hold.temp_files[0].name]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for per_param in opt.state.values():
        per_param["exp_avg"].mul_(2.0)
    hold.released.set()
    manager.wait()
    for name in ("step_00000007.pt", "step_00000007.pt.sha256", "latest.pt", "latest.pt.sha256"):
        assert (tmp_path / "async" / name).read_bytes() == (tmp_path / "sync" / name).read_bytes(), name
    assert os.path.samefile(tmp_path / "async" / "latest.pt", tmp_path / "async" / "step_00000007.pt")
    loaded, path = manager.load_latest()  # verifies the digest
    assert path.name == "latest.pt"
    assert_same(loaded["shared"], [loaded["model"]["0.weight"]] * 2 + [loaded["model"]["0.weight"][:3]])
    assert loaded["shared"][0].untyped_storage().data_ptr() == loaded["shared"][2].untyped_storage().data_ptr()
    manager.close()


def every_tensor(t: torch.Tensor) -> bool:
    return True


def test_a_deferred_copy_writes_the_bytes_of_a_sync_save_at_the_moment_of_the_call(tmp_path: Path) -> None:
    # overlap_copy: the weights and optimizer states are copied after save() returns, while the next step's
    # forward runs; the step's update comes after wait_for_snapshots() and must not reach the file.
    state, model, opt = training_state()
    CheckpointManager(tmp_path / "sync").save(state, 7)
    CheckpointManager(tmp_path / "sync").save_named("ema_model.pt", {"model": model.state_dict()})
    manager = CheckpointManager(tmp_path / "async", async_save=True)
    manager.save(state, 7, defer=every_tensor)
    manager.save_named("ema_model.pt", {"model": model.state_dict()}, defer=every_tensor)
    manager.wait_for_snapshots()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for per_param in opt.state.values():
        per_param["exp_avg"].mul_(2.0)
    manager.close()
    for name in ("step_00000007.pt", "latest.pt", "ema_model.pt", "ema_model.pt.sha256"):
        assert (tmp_path / "async" / name).read_bytes() == (tmp_path / "sync" / name).read_bytes(), name


def test_a_deferred_tensor_changed_before_its_copy_was_taken_is_not_written_and_is_copied_at_once_after(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    manager = CheckpointManager(tmp_path, async_save=True)
    weights = {"w": torch.zeros(4), "b": torch.zeros(2)}
    manager.save({"model": weights, "step": 1}, 1, defer=every_tensor)
    manager.wait()
    # A forward pass that changes a weight in place while the copy of step 2 may still be running: that copy
    # can mix the two states, so it is not written.
    manager.save({"model": weights, "step": 2}, 2, defer=every_tensor)
    weights["w"].add_(1.0)
    manager.wait_for_snapshots()
    assert "Checkpoint of step 2 not written: model.w changed in place" in caplog.text
    assert "model.b" not in caplog.text
    manager.wait()
    assert [p.name for p in manager.checkpoints()] == ["step_00000001.pt"]
    assert manager.load_latest()[0]["step"] == 1
    # From then on `w` is copied before save() returns: the same change no longer costs the checkpoint.
    caplog.clear()
    manager.save({"model": weights, "step": 3}, 3, defer=every_tensor)
    weights["w"].add_(1.0)
    manager.close()
    assert "not written" not in caplog.text
    loaded = manager.load_latest()[0]
    assert loaded["step"] == 3 and loaded["model"]["w"].tolist() == [1.0] * 4


def test_a_save_waits_for_the_previous_write_of_its_file_only(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2, async_save=True)
    hold = HoldWrites()
    manager.before_replace = hold
    manager.save(small_state(1), 1)
    assert hold.held.wait(30)
    # best.pt has host buffers of its own: it is queued behind the step file and returns at once ...
    named = threading.Thread(target=manager.save_named, args=("best.pt", small_state(1)))
    named.start()
    named.join(timeout=20)
    assert not named.is_alive(), "save_named waited for the step file's write"
    # ... the next step file waits for the previous one (its buffers are reused)
    second = threading.Thread(target=manager.save, args=(small_state(2), 2))
    second.start()
    second.join(timeout=0.5)
    assert second.is_alive(), "the second save did not wait for the first write"
    hold.released.set()
    second.join(timeout=30)
    manager.wait()
    assert [p.name for p in manager.checkpoints()] == ["step_00000001.pt", "step_00000002.pt"]
    assert manager.load_latest()[0]["step"] == 2
    assert load_checkpoint(tmp_path / "best.pt", require_digest=True)["step"] == 1
    assert manager.last_wait_s > 0.4


def test_discard_waits_for_the_write_in_flight(tmp_path: Path) -> None:
    # The trainer discards the checkpoint just before a non-finite streak: it may still be being written.
    manager = CheckpointManager(tmp_path, async_save=True)
    manager.save(small_state(1), 1)
    manager.wait()
    hold = HoldWrites()
    manager.before_replace = hold
    manager.save(small_state(2), 2)
    assert hold.held.wait(30)
    discard = threading.Thread(target=manager.discard, args=(2,))
    discard.start()
    discard.join(timeout=0.5)
    assert discard.is_alive(), "discard did not wait for the write of the file it removes"
    hold.released.set()
    discard.join(timeout=30)
    assert [p.name for p in manager.checkpoints()] == ["step_00000001.pt"]
    assert manager.load_latest()[0]["step"] == 1


def test_nonfinite_weights_are_refused_by_the_writer_and_raised_by_the_next_call(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, async_save=True)
    good = {"model": {"w": torch.ones(4)}, "step": 1}
    manager.save(good, 1, finite={"model": "model weights"})
    manager.wait()
    bad = {"model": {"w": torch.tensor([1.0, float("nan"), 2.0, 3.0])}, "step": 2}
    manager.save(bad, 2, finite={"model": "model weights"})  # returns: the check runs on the copy, in the writer
    with pytest.raises(CheckpointError) as raised:
        manager.save({"model": {"w": torch.ones(4)}, "step": 3}, 3)
    with pytest.raises(CheckpointError) as direct:  # a sync save says the same
        CheckpointManager(tmp_path / "sync").save(bad, 2, finite={"model": "model weights"})
    assert str(raised.value) == str(direct.value)
    assert "Refusing to save model weights: non-finite values (NaN/Inf) in w" in str(raised.value)
    assert not (tmp_path / "step_00000002.pt").exists() and not list(tmp_path.glob(".*"))
    assert manager.load_latest()[0]["step"] == 1
    manager.save({"model": {"w": torch.ones(4)}, "step": 3}, 3)  # the error was raised once; saving goes on
    manager.close()
    assert manager.load_latest()[0]["step"] == 3


def test_a_failed_async_write_raises_the_message_of_a_sync_save_at_wait(tmp_path: Path) -> None:
    state = {"step": 1, "losses": collections.deque([1.0, 2.0])}  # refused: the safe loader cannot read a deque
    with pytest.raises(CheckpointError) as direct:
        CheckpointManager(tmp_path).save(state, 1)
    manager = CheckpointManager(tmp_path, async_save=True)
    manager.save(state, 1)
    with pytest.raises(CheckpointError) as raised:
        manager.close()
    assert str(raised.value) == str(direct.value) and "deque" in str(raised.value)
    assert list(tmp_path.iterdir()) == []


def test_a_run_saving_async_writes_the_checkpoints_of_a_run_saving_sync(make_cfg, tmp_path: Path) -> None:
    from utils.training.runner import fit  # the trainer, in this process

    # Saves at steps 2, 4 and 6: the copies of 2 and 4 overlap the next step's forward and backward (async).
    common = ("trainer.max_steps=6", "trainer.checkpoint.interval=2", "trainer.ema.enabled=true",
              "grad_filter=grokfast_ema")
    modes = {"sync": ["trainer.checkpoint.async_save=false"],
             "async": ["trainer.checkpoint.async_save=true"],  # overlap_copy=true, the default
             "async_copy_first": ["trainer.checkpoint.async_save=true", "trainer.checkpoint.overlap_copy=false"]}
    runs = {mode: tmp_path / mode / "ck" / "test" for mode in modes}
    for mode, overrides in modes.items():
        fit(make_cfg(tmp_path / mode, *common, *overrides))
    names = sorted(p.name for p in runs["sync"].iterdir() if p.suffix in (".pt", ".sha256"))
    assert {"latest.pt", "best.pt", "ema_model.pt", "step_00000002.pt", "step_00000006.pt"} <= set(names)
    for mode in ("async", "async_copy_first"):
        assert names == sorted(p.name for p in runs[mode].iterdir() if p.suffix in (".pt", ".sha256")), mode
        assert not [p for p in runs[mode].iterdir() if ".tmp." in p.name]
        for name in (n for n in names if n.endswith(".pt")):
            sync, async_ = (load_checkpoint(runs[m] / name, require_digest=True) for m in ("sync", mode))
            for state in (sync, async_):
                state.pop("config", None)  # paths and async_save differ; everything else is the same run
            assert_same(sync, async_, f"{mode} {name}")


class ShrinkWeightsAtBatchStart(Callback):
    """Changes every weight in place before each forward, as a constraint applied there would."""

    def on_train_batch_start(self, trainer: Any, batch: Any) -> None:
        with torch.no_grad():
            for p in trainer.model.parameters():
                p.mul_(0.99)


def test_a_callback_changing_weights_at_batch_start_gets_the_checkpoints_of_a_sync_run(make_cfg, tmp_path: Path) -> None:
    # The hook runs before the forward, while the copy of the last save may still be running: the loop
    # waits for the copy before a hook that some callback implements (CallbackList.implements).
    from utils.training.runner import fit

    hook = "+callbacks.shrink={_target_:tests.test_checkpoint.ShrinkWeightsAtBatchStart}"
    common = ("trainer.max_steps=5", "trainer.checkpoint.interval=2", hook)
    for mode in ("sync", "async"):
        fit(make_cfg(tmp_path / mode, *common, f"trainer.checkpoint.async_save={mode == 'async'}"))
    for name in ("step_00000002.pt", "step_00000004.pt", "latest.pt"):
        sync, async_ = (load_checkpoint(tmp_path / m / "ck" / "test" / name, require_digest=True) for m in ("sync", "async"))
        assert_same(sync["model"], async_["model"], name)
        assert_same(sync["optimizers"], async_["optimizers"], name)


class NoHooks(Callback):
    pass


def test_callback_list_knows_which_hooks_are_implemented() -> None:
    callbacks = CallbackList([("shrink", ShrinkWeightsAtBatchStart()), ("plain", NoHooks())])
    assert callbacks.implements("on_train_batch_start")
    assert not callbacks.implements("on_train_epoch_start")
    assert not CallbackList([("plain", NoHooks())]).implements("on_train_batch_start")


# ------------------------------------------------------------------------------------------------ corruption
def test_truncated_latest_falls_back_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save(small_state(1), 1)
    manager.save(small_state(2), 2)
    latest = tmp_path / "latest.pt"
    data = latest.read_bytes()
    latest.unlink()  # a new inode: the step file it was linked to stays intact
    latest.write_bytes(data[: len(data) // 2])

    caplog.set_level(logging.WARNING, logger=LOGGER)
    state, path = manager.load_latest()
    assert (state["step"], path.name) == (2, "step_00000002.pt")
    [msg] = warnings_about(caplog, "latest.pt")
    assert "corrupt or truncated" in msg and "falling back to step_00000002.pt" in msg.lower()

    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(latest)  # without the sidecar the zip reader catches truncation too
    (tmp_path / "latest.pt.sha256").unlink()
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(latest)


def test_bit_flip_in_tensor_data_is_detected(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save(small_state(1), 1)
    newest = manager.save(small_state(2), 2)
    latest = tmp_path / "latest.pt"
    flip_bit_in_payload(newest)
    if not os.path.samefile(newest, latest):  # latest.pt is a copy where hard links are unsupported
        flip_bit_in_payload(latest)

    caplog.set_level(logging.WARNING, logger=LOGGER)
    state, path = manager.load_latest()
    assert (state["step"], path.name) == (1, "step_00000001.pt")
    assert "sha256" in warnings_about(caplog, "latest.pt")[0]
    assert "falling back to step_00000001.pt" in warnings_about(caplog, "step_00000002.pt")[-1].lower()


def test_missing_sidecar_means_incomplete(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save(small_state(1), 1)
    manager.save(small_state(2), 2)
    (tmp_path / "latest.pt.sha256").unlink()
    (tmp_path / "step_00000002.pt.sha256").unlink()  # as if killed between checkpoint and sidecar
    caplog.set_level(logging.WARNING, logger=LOGGER)
    state, _ = manager.load_latest()
    assert state["step"] == 1
    assert "incomplete" in warnings_about(caplog, "step_00000002.pt")[0]


def test_all_corrupt_raises_listing_every_file(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    for step in (1, 2):
        manager.save(small_state(step), step)
    for p in tmp_path.glob("*.pt"):
        p.unlink()
        p.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError) as err:
        manager.load_latest()
    for name in ("latest.pt", "step_00000001.pt", "step_00000002.pt"):
        assert name in str(err.value)


# ---------------------------------------------------------------------------------------------------- safety
class RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


class CustomObject:
    def __init__(self) -> None:
        self.x = 1


def test_pickle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "step_00000001.pt"
    torch.save({"model": {}, "payload": RunsCode(marker)}, evil)
    with pytest.raises(CheckpointError, match="security") as err:
        load_checkpoint(evil)
    assert str(evil) in str(err.value)
    assert not marker.exists()

    # Even with a valid sidecar (anyone can write one) the manager refuses it. (save_with_sidecar itself refuses
    # to write such a state, so forge the sidecar by hand.)
    digest = hashlib.sha256(evil.read_bytes()).hexdigest()
    (tmp_path / "step_00000001.pt.sha256").write_text(f"{digest}  step_00000001.pt\n")
    with pytest.raises(CheckpointError, match="security"):
        CheckpointManager(tmp_path).load_latest()
    assert not marker.exists()

    custom = tmp_path / "custom.pt"
    torch.save({"obj": CustomObject()}, custom)
    with pytest.raises(CheckpointError, match="security"):
        load_checkpoint(custom)


def test_assert_finite_state() -> None:
    assert_finite_state({"w": torch.ones(3), "n": torch.tensor([1, 2]), "x": 3}, "model weights")
    with pytest.raises(CheckpointError, match="layer.weight"):
        assert_finite_state({"ok": torch.ones(2), "layer.weight": torch.tensor([1.0, float("nan")])}, "weights")
    with pytest.raises(CheckpointError, match="head.bias"):
        assert_finite_state({"head.bias": torch.tensor([float("inf")], dtype=torch.bfloat16)}, "weights")


# ------------------------------------------------------------------------------------------ kill during save
# One interpreter imports torch once (2+ s) and forks a fresh saver per round; the test SIGKILLs the saver at
# a random moment, so each round costs a fraction of a second instead of a torch import.
KILL_DRIVER = r"""
import os, sys
import torch
torch.set_num_threads(1)
from utils.storage.checkpoint import CheckpointManager

directory, numel = sys.argv[1], int(sys.argv[2])
while True:
    line = sys.stdin.readline()
    if not line:
        break
    step = int(line)
    pid = os.fork()
    if pid == 0:
        manager = CheckpointManager(directory, keep_last=2)
        while True:
            manager.save({"step": step, "w": torch.full((numel,), float(step)), "meta": {"hist": [step] * 50}}, step)
            step += 1
    print(pid, flush=True)
    os.waitpid(pid, 0)
    print("reaped", flush=True)
"""
NUMEL = 2_000_000  # 8 MB per save


def check_complete(state: dict) -> int:
    step = state["step"]
    assert state["meta"] == {"hist": [step] * 50}
    assert state["w"].shape == (NUMEL,) and bool((state["w"] == float(step)).all())
    return step


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_sigkill_during_save_never_loses_the_last_good_checkpoint(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.save({"step": 0, "w": torch.zeros(NUMEL), "meta": {"hist": [0] * 50}}, 0)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    driver = subprocess.Popen(
        [sys.executable, "-c", KILL_DRIVER, str(tmp_path), str(NUMEL)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    rng = random.Random(1234)
    last_step = 0
    try:
        for round_ in range(5):
            driver.stdin.write(f"{last_step + 1}\n")  # resume after the last good checkpoint, like a restart
            driver.stdin.flush()
            pid_line = driver.stdout.readline()
            assert pid_line.strip().isdigit(), f"driver failed: {pid_line!r} {driver.stderr.read()}"
            delay = rng.uniform(0.05, 0.5)
            time.sleep(delay)
            os.kill(int(pid_line), signal.SIGKILL)
            assert driver.stdout.readline().strip() == "reaped"

            loaded = manager.load_latest()
            assert loaded is not None, f"round {round_}: nothing loadable after kill at {delay:.2f}s"
            step = check_complete(loaded[0])
            assert step >= last_step, f"round {round_}: went back from step {last_step} to {step}"
            last_step = step

            # Nothing under a real name is partial: every visible .pt unpickles completely. Temp files are hidden.
            step_files = manager.checkpoints()
            for entry in tmp_path.iterdir():
                if entry.name.startswith("."):
                    assert ".tmp." in entry.name
                    continue
                assert entry.name == "latest.pt" or entry in step_files or entry.name.endswith(".pt.sha256")
                if entry.suffix == ".pt":
                    check_complete(torch.load(entry, weights_only=True))
            # Every step file but the newest (possibly killed before its sidecar) verifies against its sidecar.
            for p in step_files[:-1]:
                check_complete(load_checkpoint(p, require_digest=True))
        assert last_step > 0, "the saver never completed a checkpoint between kills"
    finally:
        driver.stdin.close()
        driver.kill()
        driver.wait()
        driver.stdout.close()
        driver.stderr.close()
