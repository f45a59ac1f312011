"""Loss terms, CompositeLoss and the sum-based evaluators, checked on hand-built tensors."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from losses.classification import CrossEntropyTerm
from losses.composite import CompositeLoss
from utils.evaluators import Accuracy, ExactMatch


class ConstantTerm(torch.nn.Module):
    """A term whose value is fixed, so weighted totals are easy to check by hand."""

    def __init__(self, value: float, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = weight
        self.value = torch.nn.Parameter(torch.tensor(value))

    def forward(self, outputs: dict, batch: dict) -> torch.Tensor:
        return self.value * 1.0


# ---------------------------------------------------------------------------------------- CE
def test_cross_entropy_matches_hand_computation() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0]])
    target = torch.tensor([1, 0])
    # Row 0: softmax = [1/4, 3/4] -> -log(3/4). Row 1: uniform -> log 2.
    expected = (-math.log(0.75) + math.log(2.0)) / 2
    value = CrossEntropyTerm()({"logits": logits}, {"target": target})
    assert value.shape == ()
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_cross_entropy_ignore_index_and_sequence_dim() -> None:
    logits = torch.tensor([[[0.0, math.log(3.0)], [5.0, -5.0]], [[1.0, 1.0], [0.0, 0.0]]])  # [B=2, T=2, V=2]
    target = torch.tensor([[1, -100], [0, -100]])
    expected = (-math.log(0.75) + math.log(2.0)) / 2  # ignored positions count for nothing
    value = CrossEntropyTerm()({"logits": logits}, {"target": target})
    assert value.item() == pytest.approx(expected, rel=1e-6)

    custom = CrossEntropyTerm(ignore_index=0, logits_key="out", target_key="y")
    value = custom({"out": logits[:, 0]}, {"y": torch.tensor([1, 0])})
    assert value.item() == pytest.approx(-math.log(0.75), rel=1e-6)


def test_cross_entropy_all_ignored_is_zero_not_nan() -> None:
    logits = torch.randn(3, 5, requires_grad=True)
    value = CrossEntropyTerm()({"logits": logits}, {"target": torch.full((3,), -100)})
    assert value.item() == 0.0
    value.backward()  # still differentiable


def test_cross_entropy_shape_mismatch_is_clear() -> None:
    with pytest.raises(ValueError, match="expected logits"):
        CrossEntropyTerm()({"logits": torch.zeros(4, 3)}, {"target": torch.zeros(5, dtype=torch.long)})


# --------------------------------------------------------------------------------- composite
def test_composite_weights_keys_and_set_weight() -> None:
    loss = CompositeLoss({"a": ConstantTerm(2.0, weight=0.5), "b": ConstantTerm(3.0, weight=2.0)})
    out = loss({}, {})
    assert set(out) == {"loss", "a", "b"}
    assert out["loss"].item() == pytest.approx(0.5 * 2.0 + 2.0 * 3.0)
    assert out["a"].item() == 2.0 and out["b"].item() == 3.0  # unweighted
    assert out["loss"].requires_grad and not out["a"].requires_grad  # per-term values are detached

    loss.set_weight("b", 0.0)
    assert loss.weights == {"a": 0.5, "b": 0.0}
    assert loss({}, {})["loss"].item() == pytest.approx(1.0)
    with pytest.raises(KeyError, match="'c'"):
        loss.set_weight("c", 1.0)


def test_composite_zero_weight_nan_term_does_not_poison_total() -> None:
    loss = CompositeLoss({"ok": ConstantTerm(1.5), "bad": ConstantTerm(float("nan"), weight=0.0)})
    out = loss({}, {})
    assert out["loss"].item() == 1.5 and math.isnan(out["bad"].item())


def test_composite_weight_one_gives_the_term_bitwise_and_its_gradient() -> None:
    """A weight of 1 is not multiplied in (one autograd op less per step): the total and the gradient are
    exactly the term's; a weight of 1 set later, and other weights, still apply."""
    logits = torch.randn(16, 7, generator=torch.Generator().manual_seed(0), requires_grad=True)
    batch = {"target": torch.arange(16) % 7}
    plain = CrossEntropyTerm()({"logits": logits}, batch)
    (grad_plain,) = torch.autograd.grad(plain, logits)
    loss = CompositeLoss({"ce": CrossEntropyTerm(weight=1.0)})
    total = loss({"logits": logits}, batch)["loss"]
    (grad_total,) = torch.autograd.grad(total, logits)
    assert torch.equal(total, plain) and torch.equal(grad_total, grad_plain)
    loss.set_weight("ce", 3.0)
    tripled = loss({"logits": logits}, batch)["loss"]
    assert torch.equal(tripled, 3.0 * plain)
    two = CompositeLoss({"a": ConstantTerm(2.0), "b": ConstantTerm(3.0, weight=0.5)})({}, {})
    assert two["loss"].item() == 2.0 + 1.5


def test_composite_all_zero_weights_still_backpropagates() -> None:
    term = ConstantTerm(4.0, weight=0.0)
    out = CompositeLoss({"t": term})({}, {})
    assert out["loss"].item() == 0.0
    out["loss"].backward()
    assert term.value.grad is not None and term.value.grad.item() == 0.0


def test_composite_built_by_hydra_like_the_config() -> None:
    cfg = OmegaConf.create(
        {
            "_target_": "losses.composite.CompositeLoss",
            "terms": {
                "ce": {"_target_": "losses.classification.CrossEntropyTerm", "weight": 1.0},
                "ce2": {"_target_": "losses.classification.CrossEntropyTerm", "weight": 0.25},
            },
        }
    )
    loss = instantiate(cfg)
    assert loss.weights == {"ce": 1.0, "ce2": 0.25}
    logits, target = torch.tensor([[1.0, 1.0]]), torch.tensor([0])
    out = loss({"logits": logits}, {"target": target})
    assert out["ce"].item() == pytest.approx(math.log(2.0))
    assert out["loss"].item() == pytest.approx(1.25 * math.log(2.0))

    # Unbuilt configs are accepted too (e.g. when instantiated with _recursive_=False).
    lazy = CompositeLoss({"ce": {"_target_": "losses.classification.CrossEntropyTerm", "weight": 2.0}})
    assert lazy.weights == {"ce": 2.0}
    assert lazy({"logits": logits}, {"target": target})["loss"].item() == pytest.approx(2.0 * math.log(2.0))


def test_composite_rejects_bad_terms() -> None:
    with pytest.raises(ValueError, match="at least one term"):
        CompositeLoss({})
    with pytest.raises(ValueError, match="'loss'"):
        CompositeLoss({"loss": ConstantTerm(1.0)})
    with pytest.raises(TypeError, match="weight"):
        CompositeLoss({"x": torch.nn.Identity()})


# -------------------------------------------------------------------------------- evaluators
def _one_hot_logits(pred: list, num_classes: int = 5) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(pred), num_classes).float()


def test_accuracy_on_hand_built_batches() -> None:
    acc = Accuracy()
    acc.update({"logits": _one_hot_logits([0, 1, 2, 3])}, {"target": torch.tensor([0, 1, 4, 4])})  # 2/4
    acc.update({"logits": _one_hot_logits([4, 4])}, {"target": torch.tensor([4, -100])})  # 1/1, one ignored
    acc.sync()  # no process group: a no-op
    assert acc.compute() == {"acc": pytest.approx(3 / 5)}
    assert all(v.dtype == torch.float64 for v in acc.sums.values())
    assert acc.sums["correct"].item() == 3 and acc.sums["count"].item() == 5

    acc.reset()
    assert math.isnan(acc.compute()["acc"])  # nothing counted


def test_accuracy_custom_keys_and_sequences() -> None:
    acc = Accuracy(logits_key="out", target_key="y", name="tok_acc", ignore_index=0)
    logits = _one_hot_logits([[1, 2, 3], [1, 1, 1]])  # [2, 3, 5]
    acc.update({"out": logits}, {"y": torch.tensor([[1, 2, 4], [1, 0, 0]])})
    assert acc.compute() == {"tok_acc": pytest.approx(3 / 4)}


def test_exact_match_rows() -> None:
    em = ExactMatch()
    logits = _one_hot_logits([[1, 2, 3], [1, 2, 3], [4, 4, 4], [0, 0, 0]])
    target = torch.tensor(
        [
            [1, 2, 3],  # all right
            [1, 2, 0],  # one wrong
            [4, -100, 1],  # wrong on a non-ignored position
            [0, -100, -100],  # right where it counts
        ]
    )
    em.update({"logits": logits}, {"target": target})
    em.update({"logits": _one_hot_logits([[0, 0]])}, {"target": torch.tensor([[-100, -100]])})  # not counted
    assert em.compute() == {"exact_match": pytest.approx(2 / 4)}

    single = ExactMatch(name="em")  # no sequence dim: each row is one token
    single.update({"logits": _one_hot_logits([1, 2, 3])}, {"target": torch.tensor([1, 2, 4])})
    assert single.compute() == {"em": pytest.approx(2 / 3)}


def test_sync_all_reduces_with_gloo(tmp_path) -> None:
    # A one-process gloo group exercises the real all_reduce path without extra processes.
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        acc = Accuracy()
        acc.update({"logits": _one_hot_logits([0, 1])}, {"target": torch.tensor([0, 0])})
        acc.sync()
        assert acc.sums["correct"].dtype == torch.float64
        assert acc.compute() == {"acc": pytest.approx(0.5)}
    finally:
        dist.destroy_process_group()
