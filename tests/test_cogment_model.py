"""Cogment's parts on their own: Graves ACT, the surprise-gated memory, the model's forward and knobs, the
loss terms, the parameter budget of the full preset (on the meta device), the optimizers and the selective
Grokfast filter, and the StageEvaluator's convergence signals."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from dataset.cogment.data_module import SOURCES, CogmentData
from dataset.cogment.evaluator import StageEvaluator
from dataset.cogment.examples import pad_rows, pad_study
from dataset.cogment.tasks import Augmentation
from dataset.cogment.vocabulary import TASK_INDEX, Vocabulary, task_families
from losses.cogment import ConsistencyTerm, PonderTerm, ResidualImprovementTerm, StepSupervisionTerm, row_cross_entropy
from models.cogment.act import graves_halting
from models.cogment.budget import SEED_BUDGET, TOTAL_LIMIT, component_counts
from models.cogment.model import Cogment, inverse_permutation
from models.components.parameters import count_parameters
from tests.conftest import compose_config
from utils.optim.builder import build_optimizers
from utils.training.curriculum import Curriculum

VOCAB = Vocabulary(32)
TINY = dict(vocab_size=VOCAB.size, max_seq_len=256, num_task_types=len(TASK_INDEX), task_families=task_families(),
            hidden_size=32, num_heads=4, num_layers=1, expansion=2.0, adapter_rank=8, persistent_slots=8,
            episodic_slots=64, memory_key_dim=64, memory_value_dim=32)


def batch_of(task: str, count: int = 4, seq_len: int = 128, **options) -> dict[str, torch.Tensor]:
    src = SOURCES[task](VOCAB, seq_len, options, Augmentation(), 0)
    rng = np.random.default_rng(0)
    rows = [pad_rows(src.sample("train", rng), seq_len) for _ in range(count)]
    out = {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}
    out["task_type"] = torch.full((count,), TASK_INDEX[task])
    return out


# ------------------------------------------------------------------------------------------ ACT
def test_graves_act_halts_when_the_sum_reaches_one_minus_epsilon_and_weights_the_remainder() -> None:
    h = torch.tensor([[0.3, 0.5, 0.4, 0.9], [0.1, 0.1, 0.1, 0.1], [0.995, 0.2, 0.2, 0.2]], requires_grad=True)
    act = graves_halting(h, epsilon=0.01)
    assert act.steps.tolist() == [3.0, 4.0, 1.0]
    assert torch.allclose(act.weights, torch.tensor([[0.3, 0.5, 0.2, 0.0], [0.1, 0.1, 0.1, 0.7], [1.0, 0, 0, 0]]))
    assert torch.allclose(act.ponder_cost, torch.tensor([3.2, 4.7, 2.0]))
    act.ponder_cost.sum().backward()
    # The ponder cost N + R falls as any halting probability before the halting step rises.
    assert h.grad.tolist() == [[-1.0, -1.0, 0.0, 0.0], [-1.0, -1.0, -1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]


def test_the_model_mixes_its_steps_by_act_and_runs_as_many_steps_as_the_knob_says() -> None:
    torch.manual_seed(0)
    model = Cogment(**TINY)
    batch = batch_of("listops")
    for steps in (1, 3, 6):
        model.refinement_steps = steps
        out = model(batch)
        assert len(out["step_logits"]) == steps and out["act_weights"].shape == (4, steps)
        assert torch.allclose(out["act_weights"].sum(1), torch.ones(4))
        mixture = sum(w[:, None, None] * s for w, s in zip(out["act_weights"].t(), out["step_logits"]))
        assert torch.allclose(out["logits"], mixture, atol=1e-6)
        assert ((out["ponder_steps"] >= min(2, steps)) & (out["ponder_steps"] <= steps)).all()


def test_a_saturated_halting_head_still_runs_two_steps() -> None:
    # sigmoid(40) is exactly 1.0 in float32: without care h_1 = (1 - epsilon) * 1 closes the sum at step 1.
    torch.manual_seed(0)
    model = Cogment(**TINY)
    model.refinement_steps = 4
    with torch.no_grad():
        model.halting.bias.fill_(40.0)
    out = model(batch_of("listops"))
    assert out["ponder_steps"].tolist() == [2.0] * 4
    assert (out["halt_probs"] < 1.0 - model.act_epsilon).all()


def test_rotation_maps_invert_so_the_rotated_prediction_lands_on_the_original_cells() -> None:
    batch = batch_of("arc", seq_len=160, side=5, demos=2)
    source = batch["rotation"]
    x = torch.randn(*source.shape, 3)
    rotated = x.gather(1, source.unsqueeze(-1).expand_as(x))
    back = inverse_permutation(source).unsqueeze(-1).expand_as(x)
    assert torch.equal(rotated.gather(1, back), x)
    model = Cogment(**TINY, consistency=True).train()
    out = model(batch)
    assert out["consistency_logits"].shape == out["logits"][out["consistency_rows"]].shape
    assert len(out["consistency_rows"]) == 4  # every ARC row is a grid
    assert "consistency_logits" not in model(batch_of("listops"))  # no grid rows: no second forward


# ------------------------------------------------------------------------------------------ memory
def test_a_question_addresses_the_same_memory_with_or_without_its_context() -> None:
    model = Cogment(**TINY)
    src = SOURCES["passkey_memory"](VOCAB, 128, {"docs": 6, "heldout": 0.5, "query_fraction": 0.5}, Augmentation(), 0)
    rng = np.random.default_rng(0)
    examples = [src.sample("train", rng) for _ in range(40)]
    rows = [pad_rows(e, 128) for e in examples]
    inputs = torch.from_numpy(np.stack([r["inputs"] for r in rows]))
    cue = torch.from_numpy(np.stack([r["cue"] for r in rows]))
    keys, _, _ = model.memory.recall(inputs, cue)
    first_answer = [int(np.argmax(r["inputs"] == 3)) for r in rows]  # <answer> is id 3
    answer_keys = torch.stack([keys[i, j] for i, j in enumerate(first_answer)])
    doc = [int("".join(VOCAB.name(int(t)) for t in r["inputs"][j - 5:j - 2])) for r, j in zip(rows, first_answer)]
    same = torch.tensor([[a == b for b in doc] for a in doc])
    similarity = answer_keys @ answer_keys.t()
    assert torch.allclose(similarity[same], torch.ones(int(same.sum())), atol=1e-5)  # with and without context
    assert similarity[~same].abs().max() < 0.5  # other documents (one token apart): nearly orthogonal keys


def test_surprising_answers_are_written_once_recalled_after_and_nothing_changes_while_read_only() -> None:
    torch.manual_seed(0)
    model = Cogment(**TINY).train()
    episodic = model.memory.episodic
    batch = batch_of("passkey_memory", count=8, docs=6, query_fraction=0.99)
    out = model(batch)
    assert float(out["metrics"]["memory/recall_rate"]) == 0.0
    stats = model.memory.write(out["memory_keys"], out["memory_values"], batch["labels"], rate=0.1)
    assert stats["written"] > 0 and episodic.occupied.sum() > 0
    again = model(batch)
    assert float(again["metrics"]["memory/recall_rate"]) == 1.0
    scored = batch["labels"] != -100
    decoded = (again["memory_values"][scored] @ model.memory.codes.value.t()).argmax(-1)
    assert torch.equal(decoded, batch["labels"][scored])  # the memory's own prediction is the answer
    assert model.memory.write(again["memory_keys"], again["memory_values"], batch["labels"], 0.1)["written"] == 0
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("memory.episodic")}
    model.memory_write_rate = 0.0
    model.on_after_optimizer_step(None, batch, again)  # read-only: the hook does nothing
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_an_evaluation_writes_its_study_documents_into_a_copy_and_recalls_them_only_with_writes_on() -> None:
    torch.manual_seed(0)
    src = SOURCES["passkey_memory"](VOCAB, 128, {"docs": 8, "digits": 4}, Augmentation(), 0)
    rng = np.random.default_rng(0)
    examples = [src.sample("val", rng) for _ in range(16)]
    rows = [{**pad_rows(e, 128), **pad_study(e, 128)} for e in examples]
    batch = {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}
    batch["task_type"] = torch.full((16,), TASK_INDEX["passkey_memory"])
    model = Cogment(**TINY).eval()
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("memory.episodic")}
    model.memory_write_rate = 0.0  # writes off: nothing is written, nothing found
    assert float(model(batch)["metrics"]["memory/recall_rate"]) == 0.0
    model.memory_write_rate = 0.15
    on = model(batch)
    assert float(on["metrics"]["memory/recall_rate"]) == 1.0  # every answer token of every question is found
    scored = batch["labels"] != -100
    decoded = (on["memory_values"][scored] @ model.memory.codes.value.t()).argmax(-1)
    assert torch.equal(decoded, batch["labels"][scored])  # and it is the studied passkey
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # training's memory untouched
    without = {k: v for k, v in batch.items() if not k.startswith("study_")}
    assert float(model(without)["metrics"]["memory/recall_rate"]) == 0.0  # nothing was kept from the last batch
    model.train()
    assert float(model(batch)["metrics"]["memory/recall_rate"]) == 0.0  # training never studies


def test_decay_and_consolidation_forget_weak_slots_and_merge_duplicates() -> None:
    model = Cogment(**TINY)
    episodic = model.memory.episodic
    keys = torch.nn.functional.normalize(torch.randn(3, 64), dim=-1)
    values = model.memory.codes.value[:3]
    episodic.slot_keys[:3], episodic.slot_values[:3] = keys, values
    episodic.slot_mass[:3] = torch.tensor([0.1, 1e-4, 0.1])  # slot 1 is below min_mass
    episodic.slot_keys[2] = episodic.slot_keys[0]  # a duplicate of slot 0's key
    stats = episodic.consolidate()
    assert stats == {"freed": 1.0, "merged": 1.0}
    assert episodic.occupied.tolist()[:3] == [True, False, False]
    assert torch.isclose(episodic.slot_mass[0], torch.tensor(0.2))
    assert torch.allclose(episodic.slot_values[0], (values[0] + values[2]) / 2)
    episodic.decay(0.5)
    assert torch.isclose(episodic.slot_mass[0], torch.tensor(0.1))
    assert {"memory.episodic.slot_keys", "memory.episodic.slot_mass"} <= set(model.state_dict())
    assert not any(k.startswith("memory.codes") for k in model.state_dict())  # codes come from the seed
    assert torch.equal(Cogment(**TINY).memory.codes.hash_a, model.memory.codes.hash_a)


# ------------------------------------------------------------------------------------------ losses
def _outputs(step_logits: list[torch.Tensor], labels: torch.Tensor) -> dict:
    return {"step_logits": step_logits, "labels": labels, "logits": step_logits[-1]}


def test_deep_supervision_weights_steps_exponentially_and_improvement_penalises_worse_steps() -> None:
    labels = torch.tensor([[1, 2, -100]])
    good, bad = torch.zeros(1, 3, 4), torch.zeros(1, 3, 4)
    good[0, 0, 1] = good[0, 1, 2] = 5.0
    ce_good, ce_bad = row_cross_entropy(good, labels).item(), row_cross_entropy(bad, labels).item()
    term = StepSupervisionTerm(decay=0.5)
    assert term(_outputs([bad, bad, good], labels), {}).item() == pytest.approx((0.25 * ce_bad + 0.5 * ce_bad + ce_good) / 1.75)
    improve = ResidualImprovementTerm(margin=0.0)
    assert improve(_outputs([bad, good], labels), {}).item() == 0.0
    assert improve(_outputs([good, bad], labels), {}).item() == pytest.approx(ce_bad - ce_good)
    assert improve(_outputs([good], labels), {}).item() == 0.0


def test_consistency_is_zero_for_equivariant_predictions_and_ponder_is_n_plus_r() -> None:
    logits = torch.randn(2, 5, 4)
    labels = torch.tensor([[0, 1, 2, -100, -100]] * 2)
    outputs = {"logits": logits, "labels": labels, "consistency_logits": logits[[1]].clone(),
               "consistency_rows": torch.tensor([1]), "ponder_cost": torch.tensor([2.5, 3.5])}
    assert ConsistencyTerm()(outputs, {}).item() == pytest.approx(0.0, abs=1e-6)
    outputs["consistency_logits"] = torch.randn(1, 5, 4)
    assert ConsistencyTerm()(outputs, {}).item() > 0.01
    assert ConsistencyTerm()({"logits": logits, "labels": labels}, {}).item() == 0.0  # evaluation: no rotated pass
    assert PonderTerm()(outputs, {}).item() == 3.0


# ------------------------------------------------------------------------------------------ budget, optimizers
def _preset_model(experiment: str, *overrides: str) -> tuple[object, object]:
    cfg = compose_config(f"experiment={experiment}", *overrides)
    data = instantiate(cfg.data, data_root="/nonexistent")  # model facts only: nothing is built
    facts = {k: v for k, v in data.model_kwargs().items() if k != "task_names"}
    return cfg, lambda: instantiate(cfg.model, **facts)


def test_the_full_preset_fits_the_seed_budget_component_by_component() -> None:
    _, factory = _preset_model("cogment")
    counts = component_counts(count_parameters(factory))
    for name, planned in SEED_BUDGET.items():
        assert abs(counts[name] - planned) / planned < 0.02, (name, counts[name], planned)
    assert counts["total"] <= TOTAL_LIMIT


def test_core_memory_and_halting_get_their_own_optimizers_with_the_seed_settings() -> None:
    cfg, _ = _preset_model("cogment")
    model = Cogment(**TINY)
    optimizers = {o.name: o for o in build_optimizers(model, cfg.optim)}
    assert sorted(optimizers) == ["core", "halting", "main", "memory"]
    settings = {n: (o.optimizer.defaults["lr"], o.optimizer.defaults["weight_decay"], o.optimizer.defaults["betas"])
                for n, o in optimizers.items()}
    assert settings == {"core": (3e-4, 0.01, (0.9, 0.95)), "memory": (1e-4, 0.001, (0.9, 0.999)),
                        "halting": (5e-4, 0.01, (0.9, 0.95)), "main": (2e-4, 0.01, (0.9, 0.95))}
    assert all(n.startswith("halting.") for n in optimizers["halting"].param_names)
    assert all(n.startswith("heads.") for n in optimizers["main"].param_names)


def test_selective_grokfast_amplifies_core_and_memory_differently_never_halting_and_less_in_stages_3_4() -> None:
    cfg, _ = _preset_model("cogment")
    model = Cogment(**TINY)
    grad_filter = instantiate(cfg.grad_filter)
    curriculum = Curriculum.from_config(cfg.curriculum, "val/exact_acc", "max")

    def filtered() -> dict[str, float]:
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        grad_filter.apply(model)
        return {top: next(p.grad for n, p in model.named_parameters() if n.startswith(top)).flatten()[0].item()
                for top in ("core", "memory", "halting", "heads")}

    # The first EMA equals the gradient: g + lamb * g.
    assert filtered() == pytest.approx({"core": 3.0, "memory": 2.5, "halting": 1.0, "heads": 3.0})
    grad_filter.configure(**curriculum[3].grad_filter)  # math_text: lambda -40%
    assert filtered() == pytest.approx({"core": 2.2, "memory": 1.9, "halting": 1.0, "heads": 2.2})
    assert curriculum[0].grad_filter == "none" and curriculum[1].grad_filter == "inherit"


# ------------------------------------------------------------------------------------------ evaluator
def _evaluate(evaluator: StageEvaluator, loss: float, acc: float, step: int, train_acc: float = math.nan) -> dict:
    """One evaluation as the trainer runs it, with the convergence signals set from (loss, acc)."""
    evaluator.reset()
    evaluator.last_step = step
    evaluator.train_rows, evaluator.train_exact = (0.0, 0.0) if math.isnan(train_acc) else (100.0, 100.0 * train_acc)
    metrics = evaluator.compute()
    evaluator._pending.update(loss=loss, acc=acc)
    done = evaluator.check_stage_completion()
    evaluator.on_validation_end(_Stand(), {"val/stage_complete": float(done.complete)})
    return {"complete": done.complete, "plateaued": done.plateaued, "criterion": done.criterion_met,
            "onset": done.grokking_onset_step, "metrics": metrics}


class _Stand:
    """What on_validation_end reads of the trainer (nothing else is called with zero throughput time)."""

    class dist:  # noqa: N801
        is_main = False

    device = torch.device("cpu")

    def log_metrics(self, values: dict) -> None:
        pass


class _Stage:
    def __init__(self, name: str) -> None:
        self.name = name


def test_a_stage_completes_on_its_criterion_or_when_loss_and_accuracy_plateau() -> None:
    ev = StageEvaluator(task_names=["maze"], stages={"s": {"metric": "exact_acc", "threshold": 0.9, "patience": 2}})
    ev.on_stage_start(None, _Stage("s"))
    assert not _evaluate(ev, 1.0, 0.2, 10)["complete"]
    assert _evaluate(ev, 0.5, 0.95, 20)["criterion"]
    ev.on_stage_start(None, _Stage("t"))  # a new stage starts a fresh history (defaults: patience 5)
    ev.stage_settings["t"] = {**ev.defaults, "patience": 2}
    results = [_evaluate(ev, loss, 0.3, step) for loss, step in ((1.0, 10), (0.5, 20), (0.4999, 30), (0.5, 40))]
    assert [r["plateaued"] for r in results] == [False, False, False, True]


def test_memorising_extends_the_patience_and_grokking_onset_is_reported() -> None:
    ev = StageEvaluator(task_names=["maze"], patience=2, grokking_patience_factor=3.0, max_gap=0.2, grokking_delay=2,
                        grokking_rise=0.2, saturation=0.95)
    ev.on_stage_start(None, _Stage("s"))
    flat = [_evaluate(ev, 1.0, 0.1, 10 * i, train_acc=1.0) for i in range(1, 6)]
    assert not any(r["plateaued"] for r in flat)  # train 1.0 vs val 0.1: memorising, patience 6, not 2
    late = [_evaluate(ev, 0.2, acc, step, train_acc=1.0) for acc, step in ((0.2, 60), (0.5, 70), (0.9, 80))]
    assert [r["onset"] for r in late] == [-1, 70, 70]


def test_compute_reads_the_history_and_the_state_round_trips() -> None:
    ev = StageEvaluator()
    ev.on_stage_start(None, _Stage("s"))
    model = Cogment(**TINY)
    batch = batch_of("listops")
    out = model(batch)
    ev.update(out, batch)
    first, second = ev.compute(), ev.compute()
    assert first == pytest.approx(second, nan_ok=True) and ev.history == []  # compute() commits nothing
    assert {"exact_acc/listops", "first_step_exact_acc/listops", "step_exact_acc/1", "ponder_steps", "stage_complete"} <= set(first)
    assert "exact_acc/maze" not in first
    ev.on_validation_end(_Stand(), first)
    assert len(ev.history) == 1
    again = StageEvaluator()
    again.load_state_dict(ev.state_dict())
    assert again.state_dict() == ev.state_dict()


def test_stage_keys_are_checked(tmp_path: Path) -> None:
    from utils.config.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown key"):
        StageEvaluator(stages={"s": {"treshold": 0.5}})
    data = CogmentData(data_root=str(tmp_path), tasks=["maze"])
    assert StageEvaluator(task_names=data.model_kwargs()["task_names"]).task_names[0] == "linear_map"
