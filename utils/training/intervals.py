"""How often something happens: every N optimizer steps, or every N epochs.

One spelling for every interval key (`trainer.eval_interval`, `trainer.checkpoint.interval`,
`trainer.plot_interval`): a plain integer counts steps, a string names its unit::

    eval_interval: 100            # every 100 optimizer steps
    eval_interval: "100 steps"    # the same
    eval_interval: "5 epochs"     # at the end of every 5th pass over the training set

On the command line: `trainer.eval_interval=5_epochs` or `'trainer.eval_interval=5 epochs'`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from utils.config.errors import ConfigError

_SPELLING = re.compile(r"^\s*(\d+)(?:\s+|_)?(step|steps|epoch|epochs)?\s*$")


@dataclass(frozen=True)
class Interval:
    every: int
    unit: Literal["step", "epoch"] = "step"

    def due_after_step(self, step: int) -> bool:
        return self.unit == "step" and step % self.every == 0

    def due_after_epoch(self, epochs_done: int) -> bool:
        return self.unit == "epoch" and epochs_done % self.every == 0

    def __str__(self) -> str:
        return f"{self.every} {self.unit}{'s' if self.every != 1 else ''}"


def parse_interval(value: Any, key: str) -> Interval:
    """`100`, `"100 steps"` or `"5 epochs"` -> Interval; anything else is a ConfigError naming `key`."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} is not an interval; write a number of steps (100) or '5 epochs'.")
    if isinstance(value, int):
        every, unit = value, "step"
    else:
        match = _SPELLING.match(str(value))
        if match is None:
            raise ConfigError(
                f"{key}={value!r} is not an interval; write a number of steps (100, '100 steps') or of epochs ('5 epochs')."
            )
        every, unit = int(match.group(1)), (match.group(2) or "step").rstrip("s")
    if every <= 0:
        raise ConfigError(f"{key}={value!r} must be positive.")
    return Interval(every, unit)  # type: ignore[arg-type]
