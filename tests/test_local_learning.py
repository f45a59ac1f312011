"""Local learning (utils/contract.py: LocalLearner) end to end, with Oja's rule (experiment=oja_pca).

Checked against the closed form (the weights converge to the leading principal components of the data,
with unit norm), with EMA, with the non-finite guard, with exact resume, and under torchrun with two
processes (the updates are averaged across ranks, so the ranks hold the same weights at every step
and follow the one-process run with the same global batch).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch

from dataset.oja.gaussian import GaussianData
from tests.cli_helpers import CPU, assert_tensors_equal, load, paths, run
from utils.config.errors import ConfigError
from utils.training.callbacks import Callback
from utils.training.runner import fit
from utils.training.trainer import NonFiniteError

OJA = ["experiment=oja_pca", "run_name=test", "trainer.early_stopping.enabled=false"]


class WeightTrace(Callback):
    """Every rank writes a digest of its weights after every step (to compare ranks) and keeps them."""

    last: "WeightTrace | None" = None

    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []
        WeightTrace.last = self

    def on_after_optimizer_step(self, trainer: Any, batch: Any, outputs: dict[str, Any]) -> None:
        weight = trainer.model.weight.detach().clone()
        self.weights.append(weight)
        digest = hashlib.sha256(weight.numpy().tobytes()).hexdigest()
        with open(Path(trainer.run_dir) / f"weights_rank{trainer.dist.rank}.txt", "a", encoding="utf-8") as f:
            f.write(f"{trainer.state.step} {digest}\n")


def oja_cfg(make_cfg, tmp_path: Path, *overrides: str):
    return make_cfg(tmp_path, *OJA, *overrides, shrink_trainer=False, tiny_grokking=False)


def test_oja_converges_to_the_first_principal_component(make_cfg, tmp_path: Path) -> None:
    result = fit(oja_cfg(make_cfg, tmp_path, "trainer.max_steps=400"))
    weight = result.trainer.model.weight.detach()[0]
    first_pc = GaussianData().principal_components[0]
    assert result.trainer.learns_locally
    assert abs(float(torch.dot(weight / weight.norm(), first_pc))) > 0.999
    assert float(weight.norm()) == pytest.approx(1.0, abs=0.02)
    # the reconstruction error reaches the closed-form optimum: the variance the first component leaves out
    variances = GaussianData().variances
    optimum = float(variances[1:].sum()) / len(variances)
    assert result.state.history[-1]["val/mse"] == pytest.approx(optimum, rel=0.05)


def test_sanger_rule_finds_the_leading_components_in_order(make_cfg, tmp_path: Path) -> None:
    result = fit(oja_cfg(make_cfg, tmp_path, "model.num_components=2", "trainer.max_steps=1500", "optim.lr=0.02"))
    weight = result.trainer.model.weight.detach()
    pcs = GaussianData().principal_components[:2]
    cosines = (weight / weight.norm(dim=1, keepdim=True) * pcs).sum(dim=1).abs()
    assert bool((cosines > 0.99).all()), cosines


def test_ema_averages_the_locally_learned_weights(make_cfg, tmp_path: Path) -> None:
    result = fit(oja_cfg(make_cfg, tmp_path, "trainer.max_steps=20", "trainer.ema.enabled=true", "trainer.ema.decay=0.8",
                         "+callbacks.trace={_target_:tests.test_local_learning.WeightTrace}"))
    trace = WeightTrace.last
    assert trace is not None and len(trace.weights) == 20
    expected = trace.weights[0].clone()  # AveragedModel copies the first update, then averages
    for w in trace.weights[1:]:
        expected = 0.8 * expected + 0.2 * w
    torch.testing.assert_close(result.trainer.ema.module.weight.detach(), expected, rtol=1e-6, atol=1e-7)


def test_the_nonfinite_guard_sees_local_updates(make_cfg, tmp_path: Path) -> None:
    # A learning rate this large makes the weights (and so the updates) overflow within a few steps.
    cfg = oja_cfg(make_cfg, tmp_path, "optim.lr=1.0e30", "trainer.grad_clip=null", "trainer.max_steps=50",
                  "trainer.max_consecutive_nonfinite=3")
    with pytest.raises(NonFiniteError, match="3 consecutive non-finite or diverging steps"):
        fit(cfg)


def test_resume_of_a_local_learner_is_bitwise_exact(make_cfg, tmp_path: Path) -> None:
    straight = fit(oja_cfg(make_cfg, tmp_path / "a", "trainer.max_steps=60", "trainer.checkpoint.interval=10"))
    fit(oja_cfg(make_cfg, tmp_path / "b", "trainer.max_steps=25", "trainer.checkpoint.interval=10"))
    resumed = fit(oja_cfg(make_cfg, tmp_path / "b", "trainer.max_steps=60", "trainer.checkpoint.interval=10"))
    assert torch.equal(straight.trainer.model.weight, resumed.trainer.model.weight)
    a, b = load(tmp_path / "a" / "ck" / "test" / "latest.pt"), load(tmp_path / "b" / "ck" / "test" / "latest.pt")
    assert_tensors_equal(a["optimizers"], b["optimizers"])


def test_a_detached_loss_of_a_backprop_model_is_an_error(make_cfg, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="has no gradient"):
        fit(make_cfg(tmp_path, "loss.terms.ce._target_=tests.test_local_learning.DetachedCrossEntropy"))


class DetachedCrossEntropy(torch.nn.Module):
    """A loss term detached by mistake: without the check, the model would silently not learn."""

    def __init__(self, weight: float = 1.0, ignore_index: int = -100) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(outputs["logits"].detach(), batch["target"])


def test_two_processes_stay_in_sync_and_follow_one_process(tmp_path: Path) -> None:
    args = [*OJA, CPU, "trainer.max_steps=30", "trainer.eval_interval=10", "trainer.checkpoint.interval=10",
            "+callbacks.trace={_target_:tests.test_local_learning.WeightTrace}"]
    one = run("pretrain.py", *args, *paths(tmp_path / "one"))
    two = run("train.py", *args, "trainer.nproc_per_node=2", *paths(tmp_path / "two"))
    assert one.returncode == 0, one
    assert two.returncode == 0, two
    run_dir = tmp_path / "two" / "test"
    rank0 = (run_dir / "weights_rank0.txt").read_text().splitlines()
    rank1 = (run_dir / "weights_rank1.txt").read_text().splitlines()
    assert len(rank0) == 30 and rank0 == rank1  # identical weights on both ranks after every step
    w_one = load(tmp_path / "one" / "test" / "latest.pt")["model"]["weight"]
    w_two = load(run_dir / "latest.pt")["model"]["weight"]
    # Averaging two half-batch means equals the full-batch mean up to rounding.
    torch.testing.assert_close(w_two, w_one, rtol=1e-5, atol=1e-6)
