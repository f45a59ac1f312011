"""A test-only callback that holds one checkpoint write in flight, so a test can signal or kill the trainer then.

    +callbacks.gate._target_=tests.ckpt_gate.HoldCheckpointWrite
    +callbacks.gate.hold=step_00000005.pt +callbacks.gate.directory=<dir>

When the background writer has completely written the temp file of `hold` (before the rename that makes it
visible), it creates `<directory>/held` and waits until `<directory>/release` exists. Every other write, and
`hold` once released, goes through. No sleep in the launcher itself: this uses CheckpointManager's testing
hook `before_replace`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from utils.training.callbacks import Callback

TIMEOUT_S = 120.0


class HoldCheckpointWrite(Callback):
    def __init__(self, hold: str, directory: str) -> None:
        self.hold = hold
        self.directory = Path(directory)

    def on_fit_start(self, trainer: Any) -> None:
        trainer.ckpt.before_replace = self._before_replace

    def _before_replace(self, temp_file: Path) -> None:
        if not temp_file.name.startswith(f".{self.hold}.tmp."):
            return
        release = self.directory / "release"
        if release.exists():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "held").write_text(str(temp_file))
        deadline = time.monotonic() + TIMEOUT_S
        while not release.exists():  # polled: a test process creates the file
            if time.monotonic() > deadline:
                raise RuntimeError(f"the test never created {release}")
            time.sleep(0.005)
