"""The ring attractor family (models/ring_attractor/, dataset/ring_attractor/, losses/ring_attractor.py).

Decoding on hand-built bumps with known answers, the network's dynamics (a cue leaves a bump behind,
angular velocity turns it), the batched simulation against a per-sample one, the generated tasks, the
loss and the evaluators, the biological constraints after every step of a real run, and the training
presets composed and validated like any other config group (the contract test, tests/test_contract.py,
runs experiment=ring_attractor debug=fast through the CLI and checks its bitwise-exact resume).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from dataset.ring_attractor.data_module import HeadDirectionData
from dataset.ring_attractor.evaluators import BumpShape, HeadingError
from dataset.ring_attractor.tasks import CUE_TRACKING, INTEGRATION, bump_stability_trials
from losses.ring_attractor import BumpShapeTerm, CircularErrorTerm
from models.ring_attractor.constraints import ConstraintBounds, apply_constraints, constraint_violations
from models.ring_attractor.decoding import circular_difference, peak_over_mean, population_vector, preferred_directions
from models.ring_attractor.network import RingAttractorNetwork
from tests.cli_helpers import assert_tensors_equal, load, paths, read_metrics, run_parallel
from tests.conftest import compose_config
from utils.config.errors import ConfigError
from utils.config.validation import validate_config
from utils.training.callbacks import Callback
from utils.training.runner import fit

DEGREES = 180.0 / math.pi
# A ring small enough that a run of a few epochs takes about a second.
TINY_RING = ("experiment=ring_attractor", "model.n_exc=32", "model.n_inh=8", "data.num_train=32", "data.num_val=16",
             "data.duration=0.06", "data.cue_duration=0.03", "data.settle_time=0.01", "trainer.device=cpu")


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """One intra-op thread: these simulations are small, and on a shared 2-core machine two threads thrash."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def von_mises_bump(n: int, centre: float, concentration: float) -> torch.Tensor:
    return torch.exp(concentration * (torch.cos(preferred_directions(n) - centre) - 1.0))


# ------------------------------------------------------------------ decoding
def test_population_vector_decodes_a_hand_built_bump() -> None:
    kappa = 4.0
    rates = torch.stack([von_mises_bump(800, centre, kappa) for centre in (2.0, -3.0, 0.1)])
    heading, length = population_vector(rates, preferred_directions(800))
    assert torch.allclose(heading, torch.tensor([2.0, -3.0, 0.1]), atol=1e-5)
    # A von Mises profile has resultant length I1(k)/I0(k) and peak over mean e^k / I0(k) = 1 / i0e(k).
    k = torch.tensor(kappa)
    assert torch.allclose(length, torch.special.i1(k) / torch.special.i0(k), atol=1e-5)
    assert torch.allclose(peak_over_mean(rates), 1.0 / torch.special.i0e(k), rtol=1e-4)


def test_a_flat_or_silent_ring_has_no_bump() -> None:
    flat, silent = torch.full((800,), 0.3), torch.zeros(800)
    for rates in (flat, silent):
        _, length = population_vector(rates, preferred_directions(800))
        assert float(length) == pytest.approx(0.0, abs=1e-5)
        assert float(peak_over_mean(rates)) == pytest.approx(1.0)


def test_circular_difference_takes_the_short_way_round() -> None:
    a, b = torch.tensor([3.1, -3.1, 0.5]), torch.tensor([-3.1, 3.1, 0.2])
    assert torch.allclose(circular_difference(a, b), torch.tensor([6.2 - 2 * math.pi, 2 * math.pi - 6.2, 0.3]), atol=1e-6)


# ------------------------------------------------------------------ dynamics
def test_a_cue_leaves_a_bump_that_keeps_its_heading() -> None:
    net = RingAttractorNetwork()  # the 800/200 defaults, untrained
    trials = bump_stability_trials(4, cue_duration=0.1, free_duration=0.4, dt=0.002, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sim = net.simulate(trials["cue_heading"], trials["cue_strength"], trials["velocity_input"], 0.002, noise=False)
    error = circular_difference(sim.decoded_heading[:, -1], trials["heading"][:, -1]).abs() * DEGREES
    assert float(error.max()) < 1.0  # 0.4 s after the cue went away
    assert float(sim.peak_over_mean[:, -1].min()) > 3.0 and float(sim.concentration[:, -1].min()) > 0.8


def test_angular_velocity_turns_the_bump_at_velocity_gain_times_that_velocity() -> None:
    net = RingAttractorNetwork(velocity_gain=1.0)
    dt, cue_steps, turn_steps = 0.002, 50, 150
    velocity = torch.zeros(3, cue_steps + turn_steps)
    velocity[:, cue_steps:] = torch.tensor([-2.0, 1.0, 3.0])[:, None]
    strength = torch.zeros_like(velocity)
    strength[:, :cue_steps] = 2.0
    with torch.no_grad():
        sim = net.simulate(torch.zeros_like(velocity), strength, velocity, dt, noise=False)
    turned = circular_difference(sim.decoded_heading[:, -1], sim.decoded_heading[:, cue_steps - 1])
    expected = torch.tensor([-2.0, 1.0, 3.0]) * turn_steps * dt
    assert torch.allclose(turned, expected, rtol=0.03)


def test_the_batched_simulation_equals_one_trial_at_a_time() -> None:
    net = RingAttractorNetwork(n_exc=64, n_inh=16)
    data = HeadDirectionData(num_train=4, num_val=1, duration=0.1, cue_duration=0.04, settle_time=0.02)
    trials = data.train_dataset.tensors
    args = (trials["cue_heading"], trials["cue_strength"], trials["velocity_input"])
    with torch.no_grad():
        sim = net.simulate(*args, 0.002, noise=False, record_rates=True)
        alone = torch.cat([net.simulate(*(a[i:i + 1] for a in args), 0.002, noise=False).decoded_heading for i in range(4)])
    assert torch.allclose(sim.decoded_heading, alone, atol=1e-5)
    assert sim.rates_e.shape == (4, 50, 64)  # the recorded E rates are what was decoded
    assert torch.allclose(population_vector(sim.rates_e, net.preferred)[0], sim.decoded_heading)


def test_evaluation_noise_is_the_same_every_time_and_training_noise_follows_the_global_seed() -> None:
    net = RingAttractorNetwork(n_exc=64, n_inh=16)
    batch = HeadDirectionData(num_train=4, num_val=1, duration=0.1, cue_duration=0.04, settle_time=0.02).train_dataset[0:4]
    with torch.no_grad():
        net.eval()
        first, second = net(batch)["decoded_heading"], net(batch)["decoded_heading"]
        net.train()
        torch.manual_seed(1)
        a = net(batch)["decoded_heading"]
        torch.manual_seed(1)
        b = net(batch)["decoded_heading"]
        c = net(batch)["decoded_heading"]
    assert torch.equal(first, second) and torch.equal(a, b) and not torch.equal(b, c)


def test_bad_model_and_data_values_are_config_errors_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"model\.n_exc=4"):
        RingAttractorNetwork(n_exc=4)
    with pytest.raises(ConfigError, match=r"model\.w_ei_init=-1.0.*Dale"):
        RingAttractorNetwork(w_ei_init=-1.0)
    with pytest.raises(ConfigError, match=r"data\.task='spin'.*cue_tracking, integration, mixed"):
        HeadDirectionData(task="spin")
    with pytest.raises(ConfigError, match=r"data\.cue_duration=0\.5"):
        HeadDirectionData(cue_duration=0.5, duration=0.5)


# ------------------------------------------------------------------ the tasks
def test_the_generated_trials_are_what_each_task_says() -> None:
    data = HeadDirectionData(task="mixed", num_train=6, num_val=2, duration=0.3, cue_duration=0.1, seed=3)
    t = data.train_dataset.tensors
    assert t["task"].tolist() == [CUE_TRACKING, INTEGRATION] * 3
    assert t["trial"].tolist() == list(range(6)) and data.val_dataset.tensors["trial"].tolist() == [6, 7]
    tracking, integrating = t["task"] == CUE_TRACKING, t["task"] == INTEGRATION
    # Cue tracking: the cue is always on, at the heading; no velocity input.
    assert torch.equal(t["cue_heading"][tracking], t["heading"][tracking]) and bool((t["cue_strength"][tracking] > 0).all())
    assert bool((t["velocity_input"][tracking] == 0).all())
    # Integration: the cue shows the initial heading for 0.1 s (50 steps) while the head is still, then
    # only the velocity, whose integral is the heading.
    cue_on = t["cue_strength"][integrating] > 0
    assert bool(cue_on[:, :50].all()) and not bool(cue_on[:, 50:].any())
    heading = t["heading"][integrating]
    assert torch.allclose(heading[:, :50], t["cue_heading"][integrating][:, :50])
    turned = circular_difference(heading[:, 1:], heading[:, :-1])
    assert torch.allclose(turned, t["velocity_input"][integrating][:, 1:] * 0.002, atol=1e-5)
    assert bool((t["loss_mask"][:, :25] == 0).all()) and bool((t["loss_mask"][:, 25:] == 1).all())
    again = HeadDirectionData(task="mixed", num_train=6, num_val=2, duration=0.3, cue_duration=0.1, seed=3)
    assert torch.equal(again.train_dataset.tensors["heading"], t["heading"])


def test_loss_terms_and_evaluators_on_known_errors() -> None:
    data = HeadDirectionData(task="mixed", num_train=4, num_val=1, duration=0.2, cue_duration=0.1, seed=0)
    batch = data.train_dataset[0:4]
    error = math.radians(10.0)
    outputs = {"decoded_heading": batch["heading"] + error, "concentration": torch.full_like(batch["heading"], 0.9),
               "peak_over_mean": torch.full_like(batch["heading"], 5.0)}
    assert float(CircularErrorTerm()(outputs, batch)) == pytest.approx(1 - math.cos(error), rel=1e-4)
    assert float(BumpShapeTerm(min_concentration=0.5)(outputs, batch)) == 0.0
    dissolved = {**outputs, "concentration": torch.full_like(batch["heading"], 0.2)}
    assert float(BumpShapeTerm(min_concentration=0.5)(dissolved, batch)) == pytest.approx(0.09, rel=1e-5)

    heading_error, bump = HeadingError(), BumpShape()
    for evaluator in (heading_error, bump):
        evaluator.update(outputs, batch)
    metrics = heading_error.compute()
    for name in ("heading_error_deg", "tracking_error_deg", "integration_error_deg", "integration_final_error_deg"):
        assert metrics[name] == pytest.approx(10.0, rel=1e-4), name
    integrating = batch["task"] == INTEGRATION
    hold = circular_difference(batch["cue_heading"][integrating, 0], batch["heading"][integrating, -1]).abs().mean()
    assert metrics["hold_final_error_deg"] == pytest.approx(float(hold) * DEGREES, rel=1e-4)
    assert bump.compute() == pytest.approx({"bump_peak_over_mean": 5.0, "bump_concentration": 0.9})


# ------------------------------------------------------------------ constraints
def test_apply_constraints_moves_each_parameter_into_its_interval() -> None:
    net = RingAttractorNetwork(n_exc=16, n_inh=4)
    with torch.no_grad():
        for name, value in (("g_ee", 50.0), ("g_ei", -1.0), ("g_ie", 0.01), ("noise_rate_e", 0.0), ("noise_rate_i", 100.0)):
            getattr(net, name).fill_(value)
        net.W_EI[0, :3] = torch.tensor([-0.3, 5.0, 1.0])  # wrong sign (Dale), above 2.0, fine
        net.W_IE[0, :2] = torch.tensor([0.3, -2.0])  # wrong sign (Dale), fine
    moved = apply_constraints(net, ConstraintBounds())
    assert moved == {"g_ee": 1, "g_ei": 1, "g_ie": 1, "noise_rate_e": 1, "noise_rate_i": 1, "W_EI": 2, "W_IE": 1}
    assert net.ring_parameters() == pytest.approx(
        {"g_ee": 10.0, "g_ei": 0.1, "g_ie": 0.1, "noise_rate_e": 0.1, "noise_rate_i": 20.0, "velocity_gain": 0.7})
    assert net.W_EI[0, :3].tolist() == [0.0, 2.0, 1.0] and net.W_IE[0, :2].tolist() == [0.0, -2.0]
    assert set(constraint_violations(net, ConstraintBounds()).values()) == {0.0}
    # Without Dale's law the seed's box alone applies: slightly wrong-signed weights are allowed.
    assert ConstraintBounds(dale=False).interval("W_EI") == (-0.5, 2.0)
    assert ConstraintBounds(dale=False).interval("W_IE") == (-math.inf, 0.5)


class ConstraintChecker(Callback):
    """Runs after the constraints callback (later in the callbacks group) and records what it left."""

    instances: list["ConstraintChecker"] = []

    def __init__(self) -> None:
        self.violations: list[dict[str, float]] = []
        self.steps: list[int] = []
        ConstraintChecker.instances.append(self)

    def on_after_optimizer_step(self, trainer: Any, batch: Any, outputs: dict[str, Any]) -> None:
        self.steps.append(trainer.state.step)
        self.violations.append(constraint_violations(trainer.model, ConstraintBounds()))


def test_every_constraint_holds_after_every_step_of_a_run(make_cfg, tmp_path: Path) -> None:
    # lr 0.5 with eps 1e-8: every Adam step moves each entry by about 0.5, far outside the bounds if nothing
    # clamped it; the noise rates start next to their lower bound.
    cfg = make_cfg(tmp_path, *TINY_RING, "trainer.global_batch_size=8", "trainer.max_epochs=3", "optim.lr=0.5",
                   "optim.eps=1e-8",
                   "model.noise_rate_e=0.2", "model.noise_rate_i=0.2",
                   "+callbacks.check={_target_:tests.test_ring_attractor.ConstraintChecker}",
                   shrink_trainer=False, tiny_grokking=False)
    ConstraintChecker.instances.clear()
    result = fit(cfg)
    (checker,) = ConstraintChecker.instances
    assert checker.steps == list(range(1, 13)) and result.state.step == 12  # 32 trials / 8 = 4 steps x 3 epochs
    assert all(set(v.values()) == {0.0} for v in checker.violations), checker.violations
    clamped = [r for r in read_metrics(result.run_dir, "train") if "constraints/g_ee_clamped" in r][-1]
    for name in ("W_EI", "W_IE", "noise_rate_e"):  # the constraints had work to do
        assert clamped[f"constraints/{name}_clamped"] > 0, name


def test_a_run_resumed_from_an_epoch_checkpoint_ends_bitwise_identical(make_cfg, tmp_path: Path) -> None:
    # 3 epochs of 4 steps, a checkpoint every epoch (steps 4, 8, 12). Resuming a copy from step 8 must give
    # the same step-12 checkpoint: weights, AdamW and cosine state, noise RNG, param_history, clamp counts.
    overrides = (*TINY_RING, "trainer.global_batch_size=8", "trainer.max_epochs=3")
    first = fit(make_cfg(tmp_path, *overrides, shrink_trainer=False, tiny_grokking=False))
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(first.run_dir, resumed_dir, ignore=shutil.ignore_patterns("latest.pt*", "step_00000012.pt*"))
    again = fit(make_cfg(tmp_path, *overrides, f"paths.run_dir={resumed_dir}", shrink_trainer=False, tiny_grokking=False))
    assert again.state.step == 12
    final, resumed = load(first.run_dir / "latest.pt"), load(resumed_dir / "latest.pt")
    for checkpoint in (final, resumed):
        checkpoint["config"].pop("paths")
    assert_tensors_equal(final, resumed, "latest.pt")
    history = resumed["callbacks"]["callbacks/ring_parameters"]["param_history"]
    assert history["epoch"] == [0, 1, 2, 3]


# ------------------------------------------------------------------ presets and the CLI
@pytest.mark.parametrize(
    ("preset", "lr", "epochs", "weight_decay", "patience", "batch"),
    [("default", 1e-3, 100, 1e-4, 20, 32), ("conservative", 5e-4, 200, 1e-3, 30, 16), ("aggressive", 2e-3, 50, 1e-5, 10, 64)],
)
def test_training_presets_compose_validate_and_set_the_seed_values(preset, lr, epochs, weight_decay, patience, batch) -> None:
    extra = [] if preset == "default" else [f"ring={preset}"]
    cfg = validate_config(compose_config("experiment=ring_attractor", *extra))
    assert (cfg.optim.lr, cfg.trainer.max_epochs, cfg.optim.weight_decay) == (lr, epochs, weight_decay)
    assert (cfg.trainer.early_stopping.patience, cfg.trainer.global_batch_size) == (patience, batch)
    assert cfg.trainer.early_stopping.enabled and cfg.schedule.min_lr == 1e-6
    assert cfg.schedule._target_ == "utils.optim.schedules.cosine_annealing"


def test_a_typo_in_a_preset_or_a_value_stops_the_cli_with_one_line(tmp_path: Path) -> None:
    results = run_parallel({
        "preset": ["pretrain.py", "experiment=ring_attractor", "ring=fastest", "--cfg", "job"],
        "value": ["train.py", "experiment=ring_attractor", "debug=fast", "data.task=spin", *paths(tmp_path / "runs")],
    }, max_parallel=2)
    assert results["preset"].returncode == 2, results["preset"]
    assert "No config option 'ring/fastest'" in results["preset"].output
    assert "aggressive, conservative, default" in results["preset"].output
    assert results["value"].returncode == 2, results["value"]
    assert "data.task='spin' is not a task" in results["value"].output and "Traceback" not in results["value"].output
