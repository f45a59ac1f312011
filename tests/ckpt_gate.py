"""Test-only callbacks that hold the trainer at a known point, so a test can signal or kill it then.

    +callbacks.gate._target_=tests.ckpt_gate.HoldCheckpointWrite
    +callbacks.gate.hold=step_00000005.pt +callbacks.gate.directory=<dir>

When the background writer has completely written the temp file of `hold` (before the rename that makes it
visible), it creates `<directory>/held` and waits until `<directory>/release` exists. Every other write, and
`hold` once released, goes through. No sleep in the launcher itself: this uses CheckpointManager's testing
hook `before_replace`.

    +callbacks.gate._target_=tests.ckpt_gate.HoldAfterStep +callbacks.gate.step=2 +callbacks.gate.directory=<dir>

`HoldAfterStep` holds the training loop itself (the main thread, inside the graceful-shutdown scope) right
after optimizer step `step`, the same way: `held`, then a wait for `release`. Signals are handled during the
wait, so what a signal does in the middle of a step does not depend on how long a step takes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from utils.training.callbacks import Callback

TIMEOUT_S = 120.0


def _hold(directory: Path, what: str) -> None:
    """Create `directory/held` (holding `what`), then wait until `directory/release` exists."""
    release = directory / "release"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "held").write_text(what)
    deadline = time.monotonic() + TIMEOUT_S
    while not release.exists():  # polled: a test process creates the file
        if time.monotonic() > deadline:
            raise RuntimeError(f"the test never created {release}")
        time.sleep(0.005)


class HoldAfterStep(Callback):
    def __init__(self, step: int, directory: str) -> None:
        self.step = step
        self.directory = Path(directory)

    def on_after_optimizer_step(self, trainer: Any, batch: Any, outputs: Any) -> None:
        if trainer.state.step == self.step and not (self.directory / "release").exists():
            _hold(self.directory, f"after step {self.step}")


class HoldCheckpointWrite(Callback):
    def __init__(self, hold: str, directory: str) -> None:
        self.hold = hold
        self.directory = Path(directory)

    def on_fit_start(self, trainer: Any) -> None:
        trainer.ckpt.before_replace = self._before_replace

    def _before_replace(self, temp_file: Path) -> None:
        if not temp_file.name.startswith(f".{self.hold}.tmp."):
            return
        if not (self.directory / "release").exists():
            _hold(self.directory, str(temp_file))
