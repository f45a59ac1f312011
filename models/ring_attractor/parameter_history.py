"""The evolution of the ring's trainable parameters: `param_history`, logged and drawn (a callback).

At the start of a run and after every evaluation (every epoch in experiment=ring_attractor) it records
the gains, the noise rates, the velocity gain and the mean and spread of the E->I and I->E weights:

    param_history = {"step": [0, 8, 16, ...], "epoch": [0, 1, 2, ...], "g_ee": [5.0, 4.99, ...], ...}

so `param_history["g_ee"][0]` is the initial value and `[-1]` the latest. The lists are checkpointed
(a resumed run continues them), logged as `ring/<name>` and drawn in `plots/ring_parameters.png`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from models.ring_attractor.network import RING_PARAMETERS
from utils.monitoring.plots import save_png
from utils.training.callbacks import Callback

if TYPE_CHECKING:
    from utils.training.trainer import Trainer

WEIGHT_SUMMARIES = ("W_EI_mean", "W_EI_std", "W_IE_mean", "W_IE_std")
RECORDED = (*RING_PARAMETERS, *WEIGHT_SUMMARIES)
TITLES = {"g_ee": "g_ee (E->E gain)", "g_ei": "g_ei (E->I gain)", "g_ie": "g_ie (I->E gain)",
          "noise_rate_e": "noise_rate_e (events/s)", "noise_rate_i": "noise_rate_i (events/s)",
          "velocity_gain": "velocity_gain (x tau_e)", "W_EI": "W_EI (E->I): mean +- std", "W_IE": "W_IE (I->E): mean +- std"}


def current_values(model: torch.nn.Module) -> dict[str, float]:
    """The recorded quantities of a RingAttractorNetwork now."""
    values = model.ring_parameters()  # type: ignore[operator]
    for name in ("W_EI", "W_IE"):
        weights = getattr(model, name).detach()
        values[f"{name}_mean"] = float(weights.mean())
        values[f"{name}_std"] = float(weights.std()) if weights.numel() > 1 else 0.0
    return values


class RingParameterHistory(Callback):
    def __init__(self) -> None:
        self.param_history: dict[str, list[float]] = {"step": [], "epoch": [], **{name: [] for name in RECORDED}}

    def _record(self, trainer: "Trainer") -> dict[str, float]:
        values = current_values(trainer.model)
        self.param_history["step"].append(trainer.state.step)
        self.param_history["epoch"].append(trainer.state.epoch)
        for name in RECORDED:
            self.param_history[name].append(values[name])
        return values

    def on_fit_start(self, trainer: "Trainer") -> None:
        if not self.param_history["step"]:  # a fresh run: the initial values (a resumed run has them already)
            self._record(trainer)

    def on_validation_end(self, trainer: "Trainer", metrics: dict[str, float]) -> None:
        values = self._record(trainer)
        trainer.log_metrics({f"ring/{name}": value for name, value in values.items()})

    def state_dict(self) -> dict[str, Any]:
        return {"param_history": {name: list(values) for name, values in self.param_history.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.param_history = {name: list(values) for name, values in state["param_history"].items()}

    def make_figures(self, run_dir: Path, step: int) -> dict[str, Path]:
        """plots/ring_parameters.png: one panel per parameter against the epoch."""
        history = self.param_history
        if len(history["step"]) < 2:
            return {}
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        fig = Figure(figsize=(12, 5.5))
        fig.subplots_adjust(left=0.06, right=0.98, bottom=0.1, top=0.88, wspace=0.35, hspace=0.5)
        epochs = history["epoch"]
        for i, name in enumerate((*RING_PARAMETERS, "W_EI", "W_IE")):
            ax = fig.add_subplot(2, 4, i + 1)
            if name in ("W_EI", "W_IE"):
                mean = torch.tensor(history[f"{name}_mean"])
                std = torch.tensor(history[f"{name}_std"])
                ax.plot(epochs, mean, color="C0", marker="o" if len(epochs) < 30 else None, markersize=3)
                ax.fill_between(epochs, mean - std, mean + std, color="C0", alpha=0.25)
            else:
                ax.plot(epochs, history[name], color="C0", marker="o" if len(epochs) < 30 else None, markersize=3)
            ax.set_title(TITLES[name], fontsize=9)
            ax.set_xlabel("epoch", fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.tick_params(labelsize=7)
            ax.ticklabel_format(axis="y", useOffset=False)
            ax.grid(True, alpha=0.3)
        fig.suptitle(f"ring parameters during training (step {step}; epoch 0 = initial values)", fontsize=10)
        return {"ring_parameters": save_png(fig, Path(run_dir) / "plots" / "ring_parameters.png")}
