"""The LPL rule and its stability mechanisms (models/lpl/), checked against numbers worked by hand.

Each term of the update (predictive, Hebbian, decorrelation) is checked twice: against a 2-unit,
2-sample example whose values are derived in the comments, and against the autograd gradient of the
layer-local loss it descends. Then the network's plumbing (every layer updated, layer 2 from layer 1's
output, learning rates per term), the squashing, input validation, and, through real training runs,
weight clipping, update-norm clipping, the stop at the first non-finite update and the diagnostics.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from models.lpl import sanity_check
from models.lpl.callbacks import Diagnostics
from models.lpl.network import LPLNetwork
from models.lpl.rule import lpl_error_signals, lpl_losses, lpl_weight_updates, squash, squash_slope
from tests.cli_helpers import read_metrics
from tests.conftest import trainer_stand_in
from utils.config.errors import ConfigError
from utils.training.callbacks import Callback
from utils.training.runner import fit
from utils.training.trainer import NonFiniteError

HIERARCHICAL = ["experiment=lpl_hierarchical", "debug=fast"]


# ----------------------------------------------------------------------------------------- the rule by hand
# Two linear units (M = 2), one input (D = 1), a batch of two (B = 2):
#   W = [[1.0], [0.5]], x(t) = [[1], [3]]  ->  z(t) = x W^T = [[1, 0.5], [3, 1.5]]
#   z(t - dt) = [[0.5, 0], [2, 2]] (given directly)
W = torch.tensor([[1.0], [0.5]])
X = torch.tensor([[1.0], [3.0]])
Z_PREVIOUS = torch.tensor([[0.5, 0.0], [2.0, 2.0]])


def hand_updates() -> dict[str, torch.Tensor]:
    z = X @ W.T
    return lpl_weight_updates(X, z, z, Z_PREVIOUS, squash_scale=None, epsilon=0.0)


def test_predictive_term_by_hand() -> None:
    # z - z_prev = [[0.5, 0.5], [1, -0.5]]; signal = -(z - z_prev) / (M B) = -(...) / 4
    # dW_0 = -(0.5 * 1 + 1 * 3) / 4 = -0.875;  dW_1 = -(0.5 * 1 - 0.5 * 3) / 4 = 0.25
    torch.testing.assert_close(hand_updates()["predictive"], torch.tensor([[-0.875], [0.25]]))


def test_hebbian_term_by_hand() -> None:
    # zbar = [2, 1], z - zbar = [[-1, -0.5], [1, 0.5]], sigma^2 = [2, 0.5] (B - 1 = 1), alpha = 2B/(B-1) = 4
    # signal_0 = 4 * [-1, 1] / 2 / 4 = [-0.5, 0.5]     -> dW_0 = -0.5 * 1 + 0.5 * 3 = 1
    # signal_1 = 4 * [-0.5, 0.5] / 0.5 / 4 = [-1, 1]    -> dW_1 = -1 * 1 + 1 * 3 = 2
    # (the gradient of -(1/2) sum_i log(2 w_i^2) is -1/w_i: -1 and -2, so the update is +1, +2)
    torch.testing.assert_close(hand_updates()["hebbian"], torch.tensor([[1.0], [2.0]]))


def test_decorrelation_term_by_hand() -> None:
    # C_01 = (-1)(-0.5) + (1)(0.5) = 1, beta = 4B/((B-1)(M-1)) = 8
    # signal_0 = -8 / 4 * (z_1 - zbar_1) C_01 = -2 * [-0.5, 0.5] = [1, -1]   -> dW_0 = 1 - 3 = -2
    # signal_1 = -2 * (z_0 - zbar_0) C_10 = -2 * [-1, 1] = [2, -2]           -> dW_1 = 2 - 6 = -4
    # (L_decorr = C_01^2 = (2 w_0 w_1)^2, whose gradient is (8 w_0 w_1^2, 8 w_0^2 w_1) = (2, 4))
    torch.testing.assert_close(hand_updates()["decorrelation"], torch.tensor([[-2.0], [-4.0]]))


def test_loss_values_by_hand() -> None:
    z = X @ W.T
    losses = lpl_losses(z, Z_PREVIOUS, epsilon=0.0)
    # predictive: (0.25 + 0.25 + 1 + 0.25) / (2 M B) = 1.75 / 8; Hebbian: -(log 2 + log 0.5) / 2 = 0;
    # decorrelation: (C_01^2 + C_10^2) / (M^2 - M) = 1
    assert float(losses["predictive"]) == pytest.approx(1.75 / 8)
    assert float(losses["hebbian"]) == pytest.approx(0.0, abs=1e-7)
    assert float(losses["decorrelation"]) == pytest.approx(1.0)


@pytest.mark.parametrize("squash_scale", [None, 5.0])
def test_each_term_is_the_negative_gradient_of_its_loss(squash_scale: float | None) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(8, 7, generator=generator, dtype=torch.float64)
    weight = (torch.randn(5, 7, generator=generator, dtype=torch.float64) * 2).requires_grad_()
    previous = torch.randn(8, 5, generator=generator, dtype=torch.float64)
    pre = x @ weight.T
    z = pre if squash_scale is None else squash(pre, squash_scale)
    updates = lpl_weight_updates(x, pre.detach(), z.detach(), previous, squash_scale, epsilon=1e-4)
    for name, loss in lpl_losses(z, previous, epsilon=1e-4).items():
        (gradient,) = torch.autograd.grad(loss, weight, retain_graph=True)
        torch.testing.assert_close(updates[name], -gradient, msg=f"{name} term")


def test_a_single_unit_has_no_decorrelation_term() -> None:
    z = torch.tensor([[0.5], [1.0], [2.0]])
    assert float(lpl_losses(z, z, 1e-4)["decorrelation"]) == 0.0
    assert torch.equal(lpl_error_signals(z, z, 1e-4)["decorrelation"], torch.zeros_like(z))


def test_squashing_is_the_seeds_tanh() -> None:
    a = torch.tensor([-100.0, -5.0, 0.0, 0.1, 5.0, 100.0])
    torch.testing.assert_close(squash(a, 5.0), torch.tanh(a / 5.0) * 5.0)
    assert float(squash(a, 5.0).abs().max()) <= 5.0
    torch.testing.assert_close(squash_slope(a, 5.0), 1 - torch.tanh(a / 5.0) ** 2)
    # a layer with huge weights still puts out bounded activity
    model = LPLNetwork(4, [3], init_std=1000.0)
    assert float(model.representations(torch.ones(2, 4))["activations"].abs().max()) <= 5.0


# ----------------------------------------------------------------------------------------- the network
def pairs(batch: int = 16, dim: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x1 = torch.rand(batch, dim, generator=generator)
    return {"x1": x1, "x2": (x1 + 0.05 * torch.randn(batch, dim, generator=generator)).clamp(0, 1)}


def test_local_update_writes_minus_the_rates_times_each_terms_update_for_every_layer() -> None:
    torch.manual_seed(0)
    model = LPLNetwork(12, [6, 4], lr_pred=0.3, lr_hebb=0.02, lr_stab=0.5)
    batch = pairs()
    with torch.no_grad():
        outputs = model(batch)
        model.local_update(batch, outputs)
    rates = {"predictive": 0.3, "hebbian": 0.02, "decorrelation": 0.5}
    layer1_out = squash(batch["x2"] @ model.layers[0].weight.T, 5.0)
    layer1_prev = squash(batch["x1"] @ model.layers[0].weight.T, 5.0)
    # layer 2 learns from layer 1's outputs for both frames
    inputs = [(batch["x2"], batch["x1"]), (layer1_out, layer1_prev)]
    for layer, (current, previous) in zip(model.layers, inputs):
        pre, prev_pre = current @ layer.weight.T, previous @ layer.weight.T
        updates = lpl_weight_updates(current, pre, squash(pre, 5.0), squash(prev_pre, 5.0), 5.0, 1e-4)
        expected = -sum(rates[name] * update for name, update in updates.items())
        torch.testing.assert_close(layer.weight.grad, expected)
    assert model.layers[1].weight.grad.shape == (4, 6)


def test_a_zero_rate_switches_its_term_off() -> None:
    batch = pairs()
    torch.manual_seed(0)
    model = LPLNetwork(12, [6], lr_pred=0.0, lr_hebb=1.0, lr_stab=0.0)  # the Hebbian term alone
    with torch.no_grad():
        model.local_update(batch, model(batch))
    weight = model.layers[0].weight
    pre = batch["x2"] @ weight.T
    previous = squash(batch["x1"] @ weight.T, 5.0)
    hebbian = lpl_weight_updates(batch["x2"], pre, squash(pre, 5.0), previous, 5.0, 1e-4)["hebbian"]
    torch.testing.assert_close(weight.grad, -hebbian)


def test_inputs_must_be_float32_in_the_unit_interval() -> None:
    model = LPLNetwork(12, [6])
    good = pairs()
    with pytest.raises(ConfigError, match=r"batch\['x1'\] is uint8.*float32 images in \[0, 1\]"):
        model({"x1": (good["x1"] * 255).to(torch.uint8), "x2": good["x2"]})
    with pytest.raises(ConfigError, match=r"batch\['x2'\] holds values in \[0, 2\]"):
        model({"x1": good["x1"], "x2": good["x2"] * 2})
    with pytest.raises(ConfigError, match=r"batch\['x2'\] holds values in \[nan"):
        model({"x1": good["x1"], "x2": torch.full_like(good["x2"], float("nan"))})


# ----------------------------------------------------------------------------------------- stability in real runs
class WeightTrace(Callback):
    """Keeps a copy of the model's weights after every step (the last instance is reachable)."""

    last: "WeightTrace | None" = None

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []
        WeightTrace.last = self

    def on_fit_start(self, trainer) -> None:
        self.weights.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})

    def on_after_optimizer_step(self, trainer, batch, outputs) -> None:
        self.weights.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})


def hierarchical_cfg(make_cfg, tmp_path: Path, *overrides: str):
    return make_cfg(tmp_path, *HIERARCHICAL, "+callbacks.trace={_target_:tests.test_lpl.WeightTrace}", *overrides,
                    shrink_trainer=False, tiny_grokking=False)


def test_weights_are_clipped_to_five(make_cfg, tmp_path: Path) -> None:
    fit(hierarchical_cfg(make_cfg, tmp_path, "model.init_std=3.0"))  # many initial weights beyond 5
    trace = WeightTrace.last
    assert trace is not None and len(trace.weights) == 7  # the start, then 6 steps
    flat = [torch.cat([w.flatten() for w in state.values()]) for state in trace.weights]
    assert float(flat[0].abs().max()) > 5.0
    assert all(float(weights.abs().max()) == 5.0 for weights in flat[1:])  # clipped after every step


def test_updates_are_clipped_to_norm_one(make_cfg, tmp_path: Path) -> None:
    # A Hebbian rate this large asks for steps of norm > 1; weight clipping is off so it cannot hide them.
    result = fit(hierarchical_cfg(make_cfg, tmp_path, "model.lr_hebb=50", "~callbacks.weight_clip"))
    trace = WeightTrace.last
    assert trace is not None and len(trace.weights) == 7
    for before, after in zip(trace.weights[:-1], trace.weights[1:]):
        step_norm = torch.sqrt(sum(((after[k] - before[k]) ** 2).sum() for k in after))
        assert 0.99 <= float(step_norm) <= 1.0 + 1e-5  # trainer.grad_clip=1.0, the seed's max update norm
    logged = [r["train/grad_norm"] for r in read_metrics(result.run_dir, "train")]
    assert len(logged) == 6 and min(logged) > 1.0  # the rule asked for more than the clip allowed


def test_the_first_nonfinite_update_warns_and_stops_the_run(make_cfg, tmp_path: Path, caplog) -> None:
    # All-zero weights give every unit zero variance; with epsilon 0 the Hebbian term is 0/0.
    cfg = hierarchical_cfg(make_cfg, tmp_path, "model.init_std=0", "model.epsilon=0")
    with caplog.at_level(logging.WARNING), pytest.raises(NonFiniteError, match="1 consecutive non-finite"):
        fit(cfg)  # the presets stop at the first one (trainer.max_consecutive_nonfinite=1); exit code 3
    assert "Step 1: non-finite" in caplog.text and "step skipped" in caplog.text


def test_diagnostics_log_weight_norms_and_variances_and_stop_on_nan(tmp_path: Path, caplog) -> None:
    model = LPLNetwork(12, [6, 4])
    batch = pairs()
    with torch.no_grad():
        outputs = model(batch)
    trainer = trainer_stand_in(tmp_path)
    trainer.model, trainer.state = model, type("State", (), {"step": 500})()
    logged: list[dict[str, float]] = []
    trainer.log_metrics = logged.append
    with caplog.at_level(logging.INFO):
        Diagnostics(every=500).on_after_optimizer_step(trainer, batch, outputs)
    values = logged[0]
    assert values["diagnostics/weight_norm/layers.0.weight"] == pytest.approx(float(model.layers[0].weight.detach().norm()))
    assert values["diagnostics/activation_var/layer2"] == pytest.approx(
        float(outputs["layer_outputs"][1].var(dim=0).mean()))
    assert "step 500 diagnostics" in caplog.text and "(no NaN)" in caplog.text
    trainer.state.step = 499  # not a diagnostics step: nothing happens
    Diagnostics(every=500).on_after_optimizer_step(trainer, batch, outputs)
    assert len(logged) == 1
    trainer.state.step = 1000
    with torch.no_grad():
        model.layers[1].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"NaN or inf at step 1000 in diagnostics/weight_norm/layers.1.weight"):
        Diagnostics(every=500).on_after_optimizer_step(trainer, batch, outputs)
    assert "NaN or inf in" in caplog.text


def test_sanity_check_prints_diagnostics_every_500_steps_and_flags_nan(capsys) -> None:
    assert sanity_check.main(["--steps", "1000", "--input-dim", "16", "--output-dim", "4", "--batch-size", "8"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert [line.split()[1] for line in lines] == ["500", "1000"]
    assert all("weight norm" in line and "activation variance" in line and "NaN: no" in line for line in lines)
    assert sanity_check.main(["--steps", "10", "--input-dim", "16", "--init-std", "0", "--epsilon", "0"]) == 1  # exit code 1
    assert "WARNING: NaN or inf at step 1" in capsys.readouterr().err
