"""The data module of the ring attractor: trials of one task, or of both, generated in memory.

`task`: "cue_tracking", "integration" or "mixed" (even-numbered trials track a cue, odd-numbered ones
integrate angular velocity, so one network learns both). The training and validation trials come from
two generators seeded from `seed`; every trial carries its number (`trial`), which seeds the network's
noise in evaluation. All trials of a split have the same length (`duration` seconds at `dt`), so they
batch as plain tensors (dataset/tensors.py).
"""

from __future__ import annotations

from typing import Any

import torch

from dataset.ring_attractor.tasks import cue_tracking_trials, velocity_integration_trials
from dataset.tensors import TensorDictDataset, collate_tensor_dicts
from utils.config.errors import ConfigError

TASKS = ("cue_tracking", "integration", "mixed")


class HeadDirectionData:
    def __init__(
        self,
        task: str = "mixed",
        num_train: int = 256,
        num_val: int = 64,
        duration: float = 0.5,
        dt: float = 0.002,
        cue_strength: float = 2.0,
        cue_duration: float = 0.1,
        settle_time: float = 0.05,
        speed_std: float = 1.5,
        speed_timescale: float = 0.3,
        seed: int = 0,
    ) -> None:
        if task not in TASKS:
            raise ConfigError(f"data.task={task!r} is not a task; pick one of {', '.join(TASKS)}.")
        if num_train < 1 or num_val < 1:
            raise ConfigError(f"data.num_train={num_train}, data.num_val={num_val}: both splits need at least one trial.")
        if not 0.0 < dt <= 0.005:
            raise ConfigError(f"data.dt={dt} s: the Euler step must be in (0, 0.005] s (the time constants are 5-10 ms).")
        if task != "cue_tracking" and not settle_time <= cue_duration < duration:
            raise ConfigError(
                f"data.cue_duration={cue_duration} s must lie between data.settle_time={settle_time} s and "
                f"data.duration={duration} s: the cue must start the bump and leave time to integrate."
            )
        self.task, self.dt = task, dt
        self.trial_kwargs = dict(duration=duration, dt=dt, cue_strength=cue_strength, speed_std=speed_std,
                                 speed_timescale=speed_timescale, settle_time=settle_time)
        self.cue_duration = cue_duration
        generator = torch.Generator().manual_seed(seed)
        self.train_dataset = TensorDictDataset(self._trials(num_train, generator, first_trial=0))
        self.val_dataset = TensorDictDataset(self._trials(num_val, generator, first_trial=num_train))
        self.collate_fn = collate_tensor_dicts

    def _trials(self, num_trials: int, generator: torch.Generator, first_trial: int) -> dict[str, torch.Tensor]:
        if self.task == "cue_tracking":
            trials = cue_tracking_trials(num_trials, generator=generator, **self.trial_kwargs)
        elif self.task == "integration":
            trials = velocity_integration_trials(num_trials, generator=generator, cue_duration=self.cue_duration,
                                                 **self.trial_kwargs)
        else:
            tracking = cue_tracking_trials((num_trials + 1) // 2, generator=generator, **self.trial_kwargs)
            integration = velocity_integration_trials(num_trials // 2, generator=generator,
                                                      cue_duration=self.cue_duration, **self.trial_kwargs)
            trials = {key: _interleave(tracking[key], integration[key]) for key in tracking}
        trials["trial"] = torch.arange(first_trial, first_trial + num_trials)
        return trials

    def prepare_data(self, rebuild: bool = False, incremental: bool = True) -> None:
        """Nothing on disk to build: the trials are made in memory in __init__."""

    def setup(self) -> None:
        """The splits were made in __init__."""

    def model_kwargs(self) -> dict[str, Any]:
        return {}


def _interleave(even: torch.Tensor, odd: torch.Tensor) -> torch.Tensor:
    """Rows of `even` at 0, 2, 4, ... and of `odd` at 1, 3, 5, ... (len(even) == len(odd) or len(odd) + 1)."""
    out = torch.empty((len(even) + len(odd), *even.shape[1:]), dtype=even.dtype)
    out[0::2], out[1::2] = even, odd
    return out
