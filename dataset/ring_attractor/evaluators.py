"""Validation metrics of the ring attractor's tasks, in degrees, and a figure of example trials.

`HeadingError` (val/<name>):
  heading_error_deg           mean |decoded - true heading| over the steps of loss_mask, all trials
  tracking_error_deg          the same over cue-tracking trials
  integration_error_deg       the same over angular-velocity integration trials
  integration_final_error_deg |error| at the last step of integration trials
  hold_final_error_deg        what holding the initial heading would get there (the baseline to beat)
A metric of a task the split has no trials of is left out. `BumpShape`: the bump's peak over the mean
E rate and its resultant length (concentration), over the same steps.
"""

from __future__ import annotations

import math
from pathlib import Path
import torch

from dataset.ring_attractor.tasks import CUE_TRACKING, INTEGRATION, TASK_NAMES
from models.ring_attractor.decoding import circular_difference
from utils.evaluators import SumEvaluator
from utils.monitoring.plots import save_png
from utils.training.callbacks import Callback

DEGREES = 180.0 / math.pi
EXAMPLE_TRIALS = 4  # trials drawn in heading_traces.png


def unwrap(angle: torch.Tensor) -> torch.Tensor:
    """A heading trace [T] without its jumps at +-pi (each step's change taken as the shortest turn)."""
    steps = circular_difference(angle[1:], angle[:-1])
    return torch.cat([angle[:1], angle[:1] + torch.cumsum(steps, dim=0)])


class HeadingError(SumEvaluator, Callback):
    sum_names = ("error", "steps", "tracking_error", "tracking_steps", "integration_error", "integration_steps",
                 "final_error", "hold_error", "integration_trials")

    def __init__(self) -> None:
        super().__init__()
        self.examples: dict[str, torch.Tensor] | None = None

    def reset(self) -> None:
        super().reset()
        self.examples = None

    def update(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> None:
        error = circular_difference(outputs["decoded_heading"], batch["heading"]).abs() * DEGREES
        mask, task = batch["loss_mask"], batch["task"]
        self.add("error", (error * mask).sum())
        self.add("steps", mask.sum())
        for name, task_id in (("tracking", CUE_TRACKING), ("integration", INTEGRATION)):
            rows = (task == task_id).to(mask.dtype)[:, None] * mask
            self.add(f"{name}_error", (error * rows).sum())
            self.add(f"{name}_steps", rows.sum())
        integrating = task == INTEGRATION
        hold = circular_difference(batch["cue_heading"][:, 0], batch["heading"][:, -1]).abs() * DEGREES
        self.add("final_error", error[:, -1][integrating].sum())
        self.add("hold_error", hold[integrating].sum())
        self.add("integration_trials", integrating.sum())
        if self.examples is None:  # the first trials of the first batch: the same ones at every evaluation
            keep = slice(0, EXAMPLE_TRIALS)
            self.examples = {"decoded": outputs["decoded_heading"][keep].detach().cpu(),
                             "true": batch["heading"][keep].cpu(), "task": batch["task"][keep].cpu(),
                             "cue_strength": batch["cue_strength"][keep].cpu(), "dt": batch["dt"][keep].cpu()}

    def compute(self) -> dict[str, float]:
        metrics = {"heading_error_deg": self._ratio("error", "steps")}
        if float(self.sums["tracking_steps"]) > 0:
            metrics["tracking_error_deg"] = self._ratio("tracking_error", "tracking_steps")
        if float(self.sums["integration_steps"]) > 0:
            metrics["integration_error_deg"] = self._ratio("integration_error", "integration_steps")
            metrics["integration_final_error_deg"] = self._ratio("final_error", "integration_trials")
            metrics["hold_final_error_deg"] = self._ratio("hold_error", "integration_trials")
        return metrics

    def make_figures(self, run_dir: Path, step: int) -> dict[str, Path]:
        """plots/heading_traces.png: true and decoded heading of a few validation trials (last evaluation)."""
        if self.examples is None:
            return {}
        from matplotlib.figure import Figure

        ex = self.examples
        count = len(ex["task"])
        fig = Figure(figsize=(9, 2.2 * count))
        fig.subplots_adjust(left=0.09, right=0.98, bottom=0.08, top=0.93, hspace=0.55)
        time = torch.arange(1, ex["true"].shape[1] + 1) * float(ex["dt"][0])
        for row in range(count):
            ax = fig.add_subplot(count, 1, row + 1)
            # Unwrapped, so a turn through +-180 deg is a smooth line; the decoded heading is drawn as true + error.
            true = unwrap(ex["true"][row])
            decoded = true + circular_difference(ex["decoded"][row], ex["true"][row])
            ax.plot(time, true * DEGREES, color="black", linewidth=1.5, label="true heading")
            ax.plot(time, decoded * DEGREES, color="C1", linewidth=1.2, linestyle="--", label="decoded")
            cue_on = ex["cue_strength"][row] > 0
            if bool(cue_on.any()) and not bool(cue_on.all()):
                ax.axvspan(0, float(time[cue_on].max()), color="C0", alpha=0.12, label="cue on")
            ax.set_ylabel("heading (deg)")
            ax.set_title(f"{TASK_NAMES[int(ex['task'][row])].replace('_', ' ')} (validation trial {row})", fontsize=9)
            ax.grid(True, alpha=0.3)
            if row == 0:
                ax.legend(fontsize=7, loc="upper right")
        ax.set_xlabel("time (s)")
        fig.suptitle(f"decoded vs true heading at step {step} (unwrapped)", fontsize=10)
        return {"heading_traces": save_png(fig, Path(run_dir) / "plots" / "heading_traces.png")}


class BumpShape(SumEvaluator):
    sum_names = ("peak_over_mean", "concentration", "steps")

    def update(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> None:
        mask = batch["loss_mask"]
        self.add("peak_over_mean", (outputs["peak_over_mean"] * mask).sum())
        self.add("concentration", (outputs["concentration"] * mask).sum())
        self.add("steps", mask.sum())

    def compute(self) -> dict[str, float]:
        return {"bump_peak_over_mean": self._ratio("peak_over_mean", "steps"),
                "bump_concentration": self._ratio("concentration", "steps")}

