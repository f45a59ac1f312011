"""TRM/HRM with ACT (models/reasoning/recursive_reasoning.py), its loss terms and the sign-SGD embedding optimizer.

Unit tests on tiny inputs: carry shapes, halting and refilling, where gradients flow, every loss term
against a value computed by hand, loss-weight schedules and the presets' parameter counts against the
architecture formula.
"""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate

from losses.composite import CompositeLoss
from losses.reasoning import (
    DeepSupervisionTerm,
    PonderCostTerm,
    QContinueTerm,
    QHaltTerm,
    TokenCrossEntropyTerm,
    stablemax_cross_entropy,
)
from losses.weight_schedules import CosineRamp, LinearRamp, StepValues
from models.reasoning.recursive_reasoning import CARRY_KEYS, RecursiveReasoningModel
from tests.conftest import compose_config
from utils.optim.sign_sgd import SignSGD

VOCAB, SEQ = 6, 16


def tiny(**overrides) -> RecursiveReasoningModel:
    torch.manual_seed(0)
    kwargs = dict(vocab_size=VOCAB, seq_len=SEQ, hidden_size=32, num_heads=4, num_layers=1, H_cycles=2, L_cycles=3,
                  halt_max_steps=3, halt_exploration_prob=0.0)
    kwargs.update(overrides)
    return RecursiveReasoningModel(**kwargs)


def batch_of(rows: int, seed: int, num_ids: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "inputs": torch.randint(1, VOCAB, (rows, SEQ), generator=g),
        "labels": torch.randint(2, VOCAB, (rows, SEQ), generator=g),
        "puzzle_identifiers": torch.randint(0, num_ids, (rows,), generator=g),
    }


def set_halting(model: RecursiveReasoningModel, q_halt: float, q_continue: float = -5.0) -> None:
    with torch.no_grad():
        model.q_head.weight.zero_()
        model.q_head.bias.copy_(torch.tensor([q_halt, q_continue]))


# ---------------------------------------------------------------------------------- the carry
def test_carry_shapes_and_halting_at_max_steps():
    model = tiny(halt_max_steps=3).train()
    batch = batch_of(5, 0)
    out = model(batch)
    carry = out["carry"]
    assert set(carry) == set(CARRY_KEYS)
    assert carry["z_H"].shape == carry["z_L"].shape == (5, SEQ, 32)
    assert carry["steps"].tolist() == [1] * 5 and not carry["halted"].any()  # q_halt starts at -5: nobody halts
    assert torch.equal(carry["inputs"], batch["inputs"]) and torch.equal(out["labels"], batch["labels"])
    assert out["logits"].shape == (5, SEQ, VOCAB) and out["q_halt_logits"].shape == (5,)
    other = batch_of(5, 1)
    out = model(other, carry=carry)  # the rows keep working on their puzzles, not on the new batch
    assert out["carry"]["steps"].tolist() == [2] * 5
    assert torch.equal(out["carry"]["inputs"], batch["inputs"]) and torch.equal(out["labels"], batch["labels"])
    out = model(other, carry=out["carry"])
    assert out["carry"]["halted"].all(), "every row halts at halt_max_steps"
    assert out["metrics"]["act/steps"].item() == 3 and out["metrics"]["act/halted_frac"].item() == 1.0


def test_only_halted_rows_are_refilled_and_reset():
    model = tiny().train()
    first, second = batch_of(6, 0), batch_of(6, 1)
    carry = model(first)["carry"]
    halted = torch.tensor([True, False, True, False, False, True])
    carry["halted"] = halted
    out = model(second, carry=carry)
    new = out["carry"]
    assert torch.equal(new["inputs"][halted], second["inputs"][halted])
    assert torch.equal(new["inputs"][~halted], first["inputs"][~halted])
    assert torch.equal(out["labels"][halted], second["labels"][halted])
    assert new["steps"].tolist() == [1, 2, 1, 2, 2, 1]
    # A refilled row starts from the initial latents: same result as a fresh carry on that puzzle.
    fresh = model(second)["logits"]
    assert torch.allclose(out["logits"][halted], fresh[halted], atol=1e-5)
    assert not torch.allclose(out["logits"][~halted], fresh[~halted], atol=1e-3)


def test_q_head_halts_in_training_but_evaluation_runs_every_step():
    model = tiny(halt_max_steps=4).train()
    set_halting(model, q_halt=5.0)
    assert model(batch_of(4, 0))["carry"]["halted"].all(), "q_halt > 0 halts after one step"
    calls = []
    model.L_net.register_forward_hook(lambda *args: calls.append(1))
    model.eval()
    with torch.no_grad():
        out = model(batch_of(4, 0))
    # eval: halt_max_steps steps, each H_cycles * (L_cycles + 1) network calls (TRM shares one net)
    assert len(calls) == 4 * 2 * (3 + 1)
    assert out["steps"].tolist() == [4] * 4


def test_exploration_forces_a_minimum_number_of_steps():
    model = tiny(halt_max_steps=4, halt_exploration_prob=1.0).train()
    set_halting(model, q_halt=5.0)
    out = model(batch_of(64, 0))
    assert not out["carry"]["halted"].any(), "the minimum number of steps is at least 2"


def test_hrm_policy_compares_q_halt_with_q_continue():
    model = tiny(architecture="hrm", halt_policy="q_halt_vs_continue").train()
    set_halting(model, q_halt=1.0, q_continue=2.0)
    assert not model(batch_of(4, 0))["carry"]["halted"].any()
    set_halting(model, q_halt=2.0, q_continue=1.0)
    assert model(batch_of(4, 0))["carry"]["halted"].all()


@pytest.mark.parametrize("architecture,expected_grad_calls", [("trm", 3 + 1), ("hrm", 2)])
def test_only_the_last_cycle_back_propagates(architecture, expected_grad_calls):
    model = tiny(architecture=architecture).train()
    grad_calls = []
    for net in filter(None, (model.L_net, model.H_net)):
        net.register_forward_hook(lambda *args: grad_calls.append(torch.is_grad_enabled()))
    model(batch_of(2, 0))
    assert len(grad_calls) == 2 * (3 + 1)  # H_cycles * (L_cycles + 1)
    assert sum(grad_calls) == expected_grad_calls


def test_bootstrapped_q_continue_target():
    model = tiny(architecture="hrm", halt_policy="q_halt_vs_continue", bootstrap_q_continue=True, halt_max_steps=2).train()
    set_halting(model, q_halt=-1.0, q_continue=0.5)
    out = model(batch_of(3, 0))
    # not the last step: target = sigmoid(max(next q_halt, next q_continue)) = sigmoid(0.5)
    assert torch.allclose(out["target_q_continue"], torch.full((3,), torch.sigmoid(torch.tensor(0.5)).item()))
    out = model(batch_of(3, 0), carry=out["carry"])
    # last step: target = sigmoid(next q_halt) = sigmoid(-1)
    assert torch.allclose(out["target_q_continue"], torch.full((3,), torch.sigmoid(torch.tensor(-1.0)).item()))


def test_puzzle_embeddings_are_prefix_tokens():
    model = tiny(puzzle_emb_ndim=40, num_puzzle_identifiers=7)
    assert model.puzzle_emb_len == 2  # ceil(40 / 32)
    out = model.train()(batch_of(3, 0, num_ids=7))
    assert out["carry"]["z_H"].shape == (3, SEQ + 2, 32)
    assert out["logits"].shape == (3, SEQ, VOCAB)  # the prefix is not decoded


def test_invalid_settings_fail_with_the_key_name():
    with pytest.raises(ValueError, match="architecture"):
        tiny(architecture="lstm")
    with pytest.raises(ValueError, match="halt_policy=q_halt_vs_continue"):
        tiny(bootstrap_q_continue=True)
    with pytest.raises(ValueError, match="halt_max_steps=1"):
        tiny(architecture="plain", halt_max_steps=4)


def test_in_forward_deep_supervision_returns_every_step():
    model = tiny(supervision_steps=3, halt_max_steps=3).train()
    out = model(batch_of(4, 0))
    assert "carry" not in out and len(out["step_outputs"]) == 3
    assert [int(o["steps"][0]) for o in out["step_outputs"]] == [1, 2, 3]
    inner = TokenCrossEntropyTerm()
    expected = sum(inner(o, {}) for o in out["step_outputs"]) / 3
    assert torch.allclose(DeepSupervisionTerm(TokenCrossEntropyTerm())(out, {}), expected)
    linear = DeepSupervisionTerm(TokenCrossEntropyTerm(), step_weighting="linear")(out, {})
    assert torch.allclose(linear, sum((t + 1) * inner(o, {}) for t, o in enumerate(out["step_outputs"])) / 6)
    # gradients reach the weights from every step
    DeepSupervisionTerm(TokenCrossEntropyTerm())(out, {}).backward()
    assert model.lm_head.weight.grad is not None


# ---------------------------------------------------------------------------------- loss terms
def test_stablemax_cross_entropy_by_hand():
    logits = torch.tensor([[[0.0, 1.0, -1.0], [2.0, 0.0, 0.0]]])
    labels = torch.tensor([[1, -100]])
    # s = [1, 2, 1/2]: p(label 1) = 2 / 3.5
    per_token = stablemax_cross_entropy(logits, labels)
    assert per_token[0, 0].item() == pytest.approx(-math.log(2 / 3.5), rel=1e-9)
    assert per_token[0, 1].item() == 0.0
    term = TokenCrossEntropyTerm(kind="stablemax")
    assert term({"logits": logits}, {"labels": labels}).item() == pytest.approx(-math.log(2 / 3.5), rel=1e-6)


def test_stablemax_gradient_is_finite_where_the_unused_branch_divides_by_zero():
    logits = torch.tensor([[[1.0, 0.0, -2.0]]], requires_grad=True)  # 1 / (1 - x) is inf at x = 1
    stablemax_cross_entropy(logits, torch.tensor([[0]])).sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_token_cross_entropy_averages_per_row_then_over_rows():
    logits = torch.zeros(2, 3, 4)
    labels = torch.tensor([[0, 1, 2], [3, -100, -100]])
    # uniform softmax: every scored token costs log 4, whatever the number of scored tokens per row
    assert TokenCrossEntropyTerm(kind="softmax")({"logits": logits}, {"labels": labels}).item() == pytest.approx(math.log(4))
    # labels in the outputs (the carried puzzles) win over the batch's
    wrong_batch = {"labels": torch.full((2, 3), 7)}
    assert TokenCrossEntropyTerm(kind="softmax")({"logits": logits, "labels": labels}, wrong_batch).item() == pytest.approx(math.log(4))


def test_q_halt_loss_targets_exact_correctness():
    logits = torch.tensor([[[5.0, 0.0], [0.0, 5.0]], [[5.0, 0.0], [5.0, 0.0]]])  # predicts [0,1] and [0,0]
    labels = torch.tensor([[0, 1], [0, 1]])  # row 0 right, row 1 wrong
    q = torch.tensor([0.0, 2.0])
    expected = (-math.log(torch.sigmoid(torch.tensor(0.0)).item()) - math.log(1 - torch.sigmoid(torch.tensor(2.0)).item())) / 2
    assert QHaltTerm()({"logits": logits, "labels": labels, "q_halt_logits": q}, {}).item() == pytest.approx(expected, rel=1e-6)


def test_q_continue_loss_and_its_absence():
    out = {"q_continue_logits": torch.zeros(2), "target_q_continue": torch.tensor([0.25, 0.25])}
    assert QContinueTerm()(out, {}).item() == pytest.approx(math.log(2), rel=1e-6)  # -(.25 log .5 + .75 log .5)
    assert QContinueTerm()({"q_continue_logits": torch.zeros(2)}, {}).item() == 0.0


def test_ponder_cost_is_the_expected_continue_probability():
    out = {"q_halt_logits": torch.tensor([0.0, math.log(3.0)]), "q_continue_logits": torch.tensor([0.0, 0.0])}
    assert PonderCostTerm(policy="q_halt")(out, {}).item() == pytest.approx((0.5 + 0.25) / 2, rel=1e-6)
    assert PonderCostTerm(policy="q_halt_vs_continue")(out, {}).item() == pytest.approx((0.5 + 0.25) / 2, rel=1e-6)


def test_every_term_is_reported_separately_by_the_act_loss_config():
    loss = instantiate(compose_config("model=reasoning/trm", "loss=reasoning/act").loss)
    model = tiny().train()
    batch = batch_of(4, 0)
    values = loss(model(batch), batch)
    assert set(values) == {"loss", "lm", "q_halt", "q_continue", "ponder"}
    assert values["loss"].item() == pytest.approx(values["lm"].item() + 0.5 * (values["q_halt"].item() + values["q_continue"].item()), rel=1e-5)


# ---------------------------------------------------------------------------------- weight schedules
def test_weight_schedules():
    ramp = LinearRamp(0.0, 1.0, start_step=10, end_step=20)
    assert [ramp(s) for s in (0, 10, 15, 20, 99)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert CosineRamp(0.0, 1.0, 0, 10)(5) == pytest.approx(0.5)
    steps = StepValues([5, 10], [0.0, 0.1, 0.2])
    assert [steps(s) for s in (0, 5, 9, 10)] == [0.0, 0.1, 0.1, 0.2]
    with pytest.raises(ValueError):
        StepValues([5], [0.0])


def test_weight_schedule_from_config_sets_the_weight_by_step():
    cfg = compose_config(
        "model=reasoning/trm", "loss=reasoning/act",
        "+loss.terms.ponder.weight_schedule={_target_:losses.weight_schedules.LinearRamp,end_value:0.02,end_step:100}",
    )
    loss = instantiate(cfg.loss)
    assert set(loss.weight_schedules) == {"ponder"}
    loss.update_weights(50)
    assert loss.weights["ponder"] == pytest.approx(0.01)
    loss.update_weights(1000)
    assert loss.weights["ponder"] == pytest.approx(0.02)
    with pytest.raises(ValueError, match="unknown loss terms"):
        CompositeLoss({"a": QHaltTerm()}, weight_schedules={"b": LinearRamp()})


# ---------------------------------------------------------------------------------- sign-SGD
def test_sign_sgd_updates_only_the_rows_a_batch_used():
    emb = torch.nn.Embedding(5, 3)
    before = emb.weight.detach().clone()
    opt = SignSGD(emb.parameters(), lr=0.1, weight_decay=0.5)
    (emb(torch.tensor([1, 3])) * torch.tensor([1.0, -2.0, 3.0])).sum().backward()
    opt.step()
    after = emb.weight.detach()
    for row in (0, 2, 4):
        assert torch.equal(after[row], before[row])
    for row in (1, 3):
        expected = before[row] * (1 - 0.1 * 0.5) - 0.1 * torch.tensor([1.0, -1.0, 1.0])
        assert torch.allclose(after[row], expected)


def test_puzzle_embeddings_get_their_own_sign_sgd_optimizer():
    from utils.optim.builder import build_optimizers

    cfg = compose_config(
        "optim=adam_atan2",
        "+optim.components.puzzle_emb={_target_:utils.optim.sign_sgd.SignSGD,modules:[puzzle_emb],lr:0.01,weight_decay:0.1}",
    )
    model = tiny(puzzle_emb_ndim=32, num_puzzle_identifiers=4)
    named = {o.name: o for o in build_optimizers(model, cfg.optim)}
    assert named["puzzle_emb"].param_names == ["puzzle_emb.weight"]
    assert "puzzle_emb.weight" not in named["main"].param_names


# ---------------------------------------------------------------------------------- presets
def swiglu_parameters(width: int, expansion: float) -> int:
    """gate, up and down matrices of a SwiGLU whose inner width is 2/3 of expansion x width, rounded up to 8."""
    inner = math.ceil(max(8, round(expansion * width * 2 / 3)) / 8) * 8
    return 3 * width * inner


@pytest.mark.parametrize("preset", ["trm", "trm_mlp", "hrm", "transformer_baseline"])
def test_model_presets_match_the_architecture_formula(preset):
    cfg = compose_config(f"model=reasoning/{preset}").model
    vocab, seq = 11, 81
    model = instantiate(cfg, vocab_size=vocab, seq_len=seq, num_puzzle_identifiers=1)
    width = cfg.hidden_size
    mixer = 4 * width * width if cfg.mixer == "attention" else swiglu_parameters(seq, cfg.expansion)  # q, k, v, out
    block = mixer + swiglu_parameters(width, cfg.expansion)
    blocks = cfg.num_layers + ((cfg.H_layers or cfg.num_layers) if cfg.architecture == "hrm" else 0)
    embeddings_and_heads = 2 * vocab * width + 2 * width + 2  # token embedding, lm head, Q-head (weights + biases)
    # TRM (attention, hidden 512 x 2 layers) is the paper's ~7M parameters.
    assert sum(p.numel() for p in model.parameters()) == blocks * block + embeddings_and_heads
