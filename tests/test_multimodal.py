"""The multimodal TRM (models/multimodal/), its components (VQ, memory, DQN halting), its loss terms, the
gradient monitor and the code evaluators.

Small CPU tests: VQ straight-through / usage / EMA by hand, MTP targets by hand, every feature switch
(outputs, loss terms, and exactly its own parameters), gradient checkpointing on = off, the DQN's
transitions, warm start and target-network refresh on taken optimizer steps, the tiny preset training a
few steps, parameter counts on the meta device (equal to a real instance's; the full preset's against the
architecture formula), and the presets composing and validating with Hydra.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from losses.composite import CompositeLoss
from losses.multimodal import DQNTerm, MTPTerm, VQTerm, active_terms, mtp_targets
from losses.reasoning import TokenCrossEntropyTerm
from models.components.halting_dqn import CONTINUE, HALT
from models.components.parameters import count_parameters, parameter_counts
from models.components.vector_quantizer import VectorQuantizer
from models.multimodal.capsule_encoder import CapsuleEncoder
from models.multimodal.model import MultimodalTRM
from tests.conftest import CONF_DIR, compose_config
from dataset.multimodal.code_evaluator import CodeEvaluator, SourceExactMatch
from utils.config.validation import validate_config

V, T, N, H, W = 258, 12, 4, 16, 32
FACTS = {"vocab_size": V, "target_len": T, "image_size": [H, W], "in_channels": 1, "num_capsules": N}
FEATURES = ("enable_latent_planning", "enable_memory", "enable_dqn", "enable_mtp", "use_vq_codebook")


def tiny_kwargs(**overrides) -> dict:
    kwargs = dict(
        FACTS, hidden_size=32, num_heads=4, expansion=2.0, num_layers=1, H_cycles=2, L_cycles=2, halt_max_steps=2,
        encoder_channels=(8, 16), encoder_routing_iters=2,
        enable_latent_planning=True, latent_num_paths=2, latent_planning_depth=2, latent_planning_layers=1,
        enable_memory=True, memory_slots=8, memory_write_decay=0.9,
        enable_dqn=True, dqn_buffer_capacity=256, dqn_warmstart_steps=0, dqn_batch_size=16, dqn_target_update_interval=3,
        dqn_hidden=16, dqn_state_dim=8,
        enable_mtp=True, mtp_heads=2,
        use_vq_codebook=True, vq_codebook_size=16, vq_dim=8,
    )
    kwargs.update(overrides)
    return kwargs


def tiny(seed: int = 0, **overrides) -> MultimodalTRM:
    torch.manual_seed(seed)
    return MultimodalTRM(**tiny_kwargs(**overrides))


def batch_of(rows: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(2, V, (rows, T), generator=g)
    for r in range(rows):  # EOS at a different place per row, ignored after it
        end = T - 3 - r
        target[r, end] = 1
        target[r, end + 1:] = -100
    return {
        "images": torch.randint(0, 256, (rows, 1, H, W), dtype=torch.uint8, generator=g),
        "target": target,
        "source": torch.arange(rows) % 3,
    }


def multimodal_loss() -> CompositeLoss:
    return instantiate(OmegaConf.load(CONF_DIR / "loss" / "multimodal" / "default.yaml"))


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------- VQ
def test_vq_straight_through_gradient_equals_the_output_gradient():
    torch.manual_seed(0)
    vq = VectorQuantizer(dim=4, codebook_size=8, ema=False, data_init=False, dead_code_threshold=0.0)
    z = torch.randn(3, 5, 4, requires_grad=True)
    out = vq(z)
    assert torch.allclose(out.quantized, vq.codebook[out.codes])  # forward value: the chosen codes
    upstream = torch.randn(3, 5, 4)
    (out.quantized * upstream).sum().backward()
    assert torch.equal(z.grad, upstream)


def test_vq_losses_usage_and_perplexity_by_hand():
    vq = VectorQuantizer(dim=2, codebook_size=4, beta=0.25, ema=False, data_init=False, dead_code_threshold=0.0)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]))
    two_codes = torch.tensor([[0.5, 0.0], [-0.5, 0.0], [10.0, 1.0], [9.0, 0.0]])
    out = vq(two_codes)
    assert out.codes.tolist() == [0, 0, 1, 1]
    assert out.usage.item() == pytest.approx(0.5)
    assert out.perplexity.item() == pytest.approx(2.0)  # two codes used equally: exp(ln 2)
    mse = (0.25 + 0.25 + 1.0 + 1.0) / 8  # mean over the 4 x 2 entries
    assert out.commitment_loss.item() == pytest.approx(mse)
    assert out.loss.item() == pytest.approx(mse * 1.25)  # codebook term + beta * commitment
    all_codes = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0], [1.0, 1.0], [9.0, 9.0]])
    out = vq(all_codes)  # counts 2, 1, 1, 2 out of 6
    probs = torch.tensor([2, 1, 1, 2]) / 6
    assert out.usage.item() == 1.0
    assert out.perplexity.item() == pytest.approx(math.exp(-(probs * probs.log()).sum().item()), rel=1e-6)


def test_vq_ema_moves_codes_towards_their_inputs():
    vq = VectorQuantizer(dim=2, codebook_size=2, ema=True, decay=0.5, data_init=False, dead_code_threshold=0.0)
    with torch.no_grad():
        for name in ("codebook", "embed_sum"):
            getattr(vq, name).copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    inputs = torch.ones(4, 2)  # all assigned to code 0
    vq.eval()
    vq(inputs)
    assert vq.codebook[0].tolist() == [0.0, 0.0]  # no update in eval mode
    vq.train()
    vq(inputs)
    # N_0 = 0.5 * 1 + 0.5 * 4 = 2.5, m_0 = 0.5 * 0 + 0.5 * (4, 4) = (2, 2): e_0 = (0.8, 0.8)
    assert torch.allclose(vq.codebook[0], torch.tensor([0.8, 0.8]))
    assert vq.codebook[1].tolist() == [10.0, 10.0]  # unused: unchanged
    before = (inputs - vq.codebook[0]).norm()
    vq(inputs)
    assert (inputs - vq.codebook[0]).norm() < before
    assert not any(p.requires_grad for p in vq.parameters())  # EMA codebooks are buffers


def test_vq_data_init_and_dead_code_restart():
    torch.manual_seed(0)
    inputs = torch.cat([torch.full((50, 2), 5.0), torch.full((50, 2), -5.0)]) + 0.1 * torch.randn(100, 2)
    vq = VectorQuantizer(dim=2, codebook_size=4, ema=True, decay=0.5)
    vq.eval()
    vq(inputs)
    assert not bool(vq.initialized)  # evaluation never touches the codebook
    vq.train()
    out = vq(inputs)
    assert bool(vq.initialized)
    nearest = torch.cdist(vq.codebook, inputs).min(dim=1).values
    assert nearest.max() < 1.0  # every code started on an input of the batch (then moved to its cluster's mean)
    assert out.perplexity.item() > 1.5  # both clusters in use

    vq = VectorQuantizer(dim=2, codebook_size=4, ema=True, decay=0.5, dead_code_threshold=0.3, data_init=False)
    with torch.no_grad():
        for name in ("codebook", "embed_sum"):
            getattr(vq, name).copy_(torch.tensor([[0.0, 0.0], [50.0, 50.0], [-50.0, 50.0], [50.0, -50.0]]))
    ones = torch.ones(8, 2)
    vq(ones)  # unused codes: N = 0.5, alive
    assert vq.codebook[1].tolist() == [50.0, 50.0]
    vq(ones)  # N = 0.25 < 0.3: restarted on the inputs
    assert torch.allclose(vq.codebook[1:], torch.ones(3, 2), atol=0.01)
    assert vq.cluster_size[1:].tolist() == [1.0, 1.0, 1.0]


# ---------------------------------------------------------------------------------- MTP
def test_mtp_targets_shift_by_k_with_ignore_padding():
    target = torch.tensor([[5, 6, 7, 1, -100]])
    out = mtp_targets(target, 2)
    assert out.shape == (1, 2, 5)
    assert out[0, 0].tolist() == [6, 7, 1, -100, -100]
    assert out[0, 1].tolist() == [7, 1, -100, -100, -100]
    assert mtp_targets(torch.tensor([[3, 4]]), 3)[0, 2].tolist() == [-100, -100]  # offset past the end


def test_mtp_term_is_the_mean_over_heads_of_the_shifted_cross_entropy():
    torch.manual_seed(0)
    target = torch.tensor([[5, 6, 7, 1, -100], [2, 3, 1, -100, -100]])
    logits = torch.randn(2, 2, 5, 9)
    value = MTPTerm(kind="softmax")({"mtp_logits": logits, "logits": logits[:, 0]}, {"target": target})
    expected = []
    shifted = mtp_targets(target, 2)
    for k in range(2):
        rows = [F.cross_entropy(logits[r, k], shifted[r, k], ignore_index=-100) for r in range(2)]
        expected.append(torch.stack(rows).mean())
    assert value.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)


# ---------------------------------------------------------------------------------- feature switches
def test_every_feature_switch_changes_parameters_outputs_and_loss_terms():
    loss_fn = multimodal_loss()
    assert set(loss_fn.terms) == {"lm", "mtp", "vq", "dqn"}
    batch = batch_of()
    full = tiny()
    full_out = full(batch)
    assert active_terms(full_out) == {"lm", "mtp", "vq", "dqn"}
    expected_missing = {
        "enable_latent_planning": ({"plan_weights"}, {"plan/path_entropy"}, set()),
        "enable_memory": (set(), set(), set()),
        "enable_dqn": ({"dqn_loss"}, {"dqn/buffer_size", "dqn/greedy_steps"}, {"dqn"}),
        "enable_mtp": ({"mtp_logits"}, set(), {"mtp"}),
        "use_vq_codebook": ({"vq_loss", "vq_codes"}, {"vq/perplexity", "vq/usage"}, {"vq"}),
    }
    for feature, (keys, metric_keys, terms) in expected_missing.items():
        model = tiny(**{feature: False})
        assert n_params(model) < n_params(full), feature
        out = model(batch)
        assert set(full_out) - set(out) == keys, feature
        assert metric_keys <= set(full_out["metrics"]) - set(out["metrics"]), feature
        assert active_terms(out) == {"lm", "mtp", "vq", "dqn"} - terms, feature
        losses = loss_fn(out, batch)
        for term in terms:
            assert losses[term].item() == 0.0  # an exact zero: logged, adds nothing
        manual = sum(t.weight * losses[name] for name, t in loss_fn.terms.items())
        assert losses["loss"].item() == pytest.approx(manual.item(), rel=1e-6)
        losses["loss"].backward()  # the zeros keep the graph intact
    assert "memory" not in dict(tiny(enable_memory=False).named_children())
    plain = tiny(**{f: False for f in FEATURES})
    assert set(plain(batch)) == {"logits", "steps", "metrics"}


def test_gradient_checkpointing_gives_identical_outputs_and_gradients():
    batch = batch_of()
    results = []
    for flag in (False, True):
        model = tiny(seed=1, enable_gradient_checkpointing=flag, enable_dqn=False)
        out = model(batch)
        loss = multimodal_loss()(out, batch)["loss"]
        loss.backward()
        results.append((model, out["logits"].detach(), loss.detach()))
    (m0, logits0, loss0), (m1, logits1, loss1) = results
    assert n_params(m0) == n_params(m1)
    assert torch.equal(logits0, logits1) and torch.equal(loss0, loss1)
    for (name, p0), (_, p1) in zip(m0.named_parameters(), m1.named_parameters()):
        if p0.grad is None:
            assert p1.grad is None, name
            continue
        assert torch.allclose(p0.grad, p1.grad, rtol=1e-5, atol=1e-7), name


def test_pre_encoded_capsules_and_encoder_none():
    batch = batch_of()
    full = tiny(enable_dqn=False)
    capsules = full.encoder(batch["images"].float() / 255).detach().half()
    pre = {"capsules": capsules, "target": batch["target"]}
    assert full(pre)["logits"].shape == (3, T, V)
    headless = tiny(encoder="none", enable_dqn=False)
    assert n_params(headless) < n_params(full)
    assert headless(pre)["logits"].shape == (3, T, V)
    with pytest.raises(ValueError, match="model.encoder"):
        headless(batch)
    with pytest.raises(ValueError, match="model.capsule_dim"):
        full({"capsules": capsules[..., :-1], "target": batch["target"]})


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="model.halt_max_steps"):
        tiny(halt_max_steps=1)
    with pytest.raises(ValueError, match="model.latent_num_paths"):
        tiny(latent_num_paths=0)
    with pytest.raises(ValueError, match="model.dqn_reward"):
        tiny(dqn_reward="bogus")
    with pytest.raises(ValueError, match="model.vq_codebook_size"):
        tiny(vq_codebook_size=1)
    long_target = {**batch_of(), "target": torch.zeros(3, T + 1, dtype=torch.long)}
    with pytest.raises(ValueError, match="model.target_len"):
        tiny()(long_target)


def test_shorter_targets_use_fewer_output_slots():
    batch = batch_of()
    batch["target"] = batch["target"][:, :7]
    out = tiny(enable_dqn=False)(batch)
    assert out["logits"].shape == (3, 7, V) and out["mtp_logits"].shape == (3, 2, 7, V)


# ---------------------------------------------------------------------------------- DQN
def test_dqn_transitions_warm_start_and_td_loss():
    model = tiny(dqn_warmstart_steps=10)
    rows, steps = 3, model.halt_max_steps
    buffer = model.dqn.buffer
    out = model(batch_of(rows))
    per_forward = rows * (2 * steps - 1)  # S halt + (S - 1) continue transitions per row
    assert len(buffer) == per_forward
    assert out["dqn_loss"].item() == 0.0 and out["dqn_loss"].requires_grad  # warm start: a connected zero
    actions = buffer.storage("action")[:per_forward]
    done = buffer.storage("done")[:per_forward]
    rewards = buffer.storage("reward")[:per_forward]
    assert (actions == HALT).sum() == rows * steps and torch.equal(done, actions == HALT)
    assert torch.all(rewards[actions == CONTINUE] == -model.dqn.step_penalty)
    assert torch.all((rewards[actions == HALT] == 0) | (rewards[actions == HALT] == 1))  # exact: 0 / 1
    assert torch.all(buffer.storage("next_forced")[:per_forward][actions == CONTINUE])  # S=2: the next step is the last
    model.zero_grad()
    out = model(batch_of(rows, seed=1))  # 2 x 9 = 18 >= 10 stored: the TD loss is on
    assert out["dqn_loss"].item() > 0
    out["dqn_loss"].backward()
    with_grad = {name.split(".")[0] for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == {"dqn"}  # only the Q-network learns from the TD loss
    assert all(p.grad is None for p in model.dqn.target_net.parameters())


def test_dqn_target_network_refreshes_on_taken_optimizer_steps_only():
    model = tiny(dqn_target_update_interval=3)
    dqn = model.dqn
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)

    def target() -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in dqn.target_net.parameters()]).clone()

    def online() -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in dqn.q_net.parameters()])

    def train_step(seed: int) -> dict:
        batch = batch_of(seed=seed)
        out = model(batch)
        optimizer.zero_grad()
        multimodal_loss()(out, batch)["loss"].backward()
        optimizer.step()
        return out

    # Optimizer steps the hook is not told about (as for a step the trainer skips) and forwards alone,
    # more of them than the interval: the target network stays the copy made at construction.
    initial = target()
    for i in range(4):
        train_step(seed=i)
    assert not torch.equal(online(), initial)  # the Q-network has learned something the target could copy
    for i in range(4):
        model(batch_of(seed=10 + i))
    assert torch.equal(target(), initial) and int(dqn.target_updates) == 0 and int(dqn.optimizer_steps) == 0
    assert int(dqn.train_steps) == 8  # training forwards are counted, taken or not

    snapshots, equal_after_hook = [], []
    for i in range(7):
        out = train_step(seed=20 + i)
        model.on_after_optimizer_step(None, batch_of(seed=20 + i), out)
        snapshots.append(target())
        equal_after_hook.append(torch.equal(snapshots[-1], online()))
    assert int(dqn.optimizer_steps) == 7 and int(dqn.target_updates) == 2
    # Refreshed after the 3rd and the 6th taken step (1-based), unchanged in between.
    assert equal_after_hook == [False, False, True, False, False, True, False]
    assert torch.equal(snapshots[0], initial) and torch.equal(snapshots[1], initial)
    assert torch.equal(snapshots[2], snapshots[3]) and torch.equal(snapshots[3], snapshots[4])
    assert torch.equal(snapshots[5], snapshots[6]) and not torch.equal(snapshots[4], snapshots[5])

    # The step counter is model state: a model resumed from this state_dict refreshes on the same step.
    resumed = tiny(seed=5, dqn_target_update_interval=3)
    resumed.load_state_dict(model.state_dict())
    for m in (model, resumed):
        for _ in range(2):
            m.on_after_optimizer_step(None, {}, {})
        assert int(m.dqn.optimizer_steps) == 9 and int(m.dqn.target_updates) == 3
    assert torch.equal(target(), torch.cat([p.flatten() for p in resumed.dqn.target_net.parameters()]))


def test_the_optimizer_step_hook_is_a_no_op_without_the_dqn():
    model = tiny(enable_dqn=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.on_after_optimizer_step(None, {}, {})
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_dqn_policy_decides_the_steps_at_evaluation():
    model = tiny(halt_max_steps=3).eval()
    last = model.dqn.q_net[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, 1.0]))  # Q(halt) > Q(continue): stop after the first step
    out = model(batch_of())
    assert out["steps"].tolist() == [1, 1, 1] and out["metrics"]["act/steps"].item() == 1.0
    assert out["q_values"].shape == (3, 2) and "dqn_loss" not in out
    with torch.no_grad():
        last.bias.copy_(torch.tensor([1.0, 0.0]))  # always continue: run to halt_max_steps
    assert model(batch_of())["steps"].tolist() == [3, 3, 3]
    plain = tiny(halt_max_steps=3, enable_dqn=False).eval()
    assert plain(batch_of())["steps"].tolist() == [3, 3, 3]


def test_model_state_is_checkpointable_and_memory_writes_only_in_training():
    model = tiny()
    batch = batch_of()
    written = model.memory.written.clone()
    model.eval()
    model(batch)
    assert torch.equal(model.memory.written, written)
    model.train()
    model(batch)
    model(batch)
    assert not torch.equal(model.memory.written, written)
    blob = io.BytesIO()
    torch.save(model.state_dict(), blob)
    blob.seek(0)
    state = torch.load(blob, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # what the trainer's compatibility check reads
    assert "dqn.buffer.storage_state" in state and "dqn.buffer.rng_state" in state
    fresh = tiny(seed=5)
    fresh.load_state_dict(state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key
    assert all(name.startswith("dqn.buffer.") for name in model._ddp_params_and_buffers_to_ignore)


# ---------------------------------------------------------------------------------- presets
def tiny_preset() -> MultimodalTRM:
    torch.manual_seed(0)
    node = OmegaConf.load(CONF_DIR / "model" / "multimodal" / "tiny.yaml")
    return instantiate(node, **FACTS)


def test_tiny_preset_trains_on_cpu():
    model = tiny_preset()
    loss_fn = multimodal_loss()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = batch_of(4)
    first = None
    for _ in range(12):
        out = model(batch)
        losses = loss_fn(out, batch)
        optimizer.zero_grad()
        losses["loss"].backward()
        assert torch.isfinite(losses["loss"])
        optimizer.step()
        first = losses["lm"].item() if first is None else first
    assert losses["lm"].item() < first  # it fits the batch
    trained = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None}
    assert {"encoder", "capsule_proj", "net", "memory", "planner", "vq_in", "vq_out", "lm_head", "mtp", "dqn"} <= trained
    model.eval()
    with torch.no_grad():
        out = model(batch)
    assert out["logits"].shape == (4, T, V) and torch.isfinite(out["logits"]).all()


def test_capsule_encoder_shapes():
    encoder = CapsuleEncoder(in_channels=1, image_size=(20, 36), num_capsules=5, capsule_dim=16, channels=(4,), routing_iters=1)
    caps = encoder(torch.rand(2, 1, 20, 36))
    assert caps.shape == (2, 5, 16)
    assert torch.allclose(caps.pow(2).mean(-1), torch.ones(2, 5), atol=1e-3)  # unit RMS


PRESET_FACTS = {"vocab_size": 258, "image_size": [64, 512], "in_channels": 1, "num_capsules": 12}
TINY_PRESET_FACTS = {"vocab_size": 258, "target_len": 64, "image_size": [32, 128], "in_channels": 1, "num_capsules": 8}
# The parameters each feature switch adds: the top-level submodules it creates (an EMA codebook is a buffer).
FEATURE_MODULES = {"enable_latent_planning": {"planner"}, "enable_memory": {"memory"}, "enable_dqn": {"dqn"},
                   "enable_mtp": {"mtp"}, "use_vq_codebook": {"vq_in", "vq", "vq_out"}}


def preset_counts(name: str, target_len: int = 256) -> dict[str, int]:
    cfg = compose_config(f"model={name}")
    facts = {**PRESET_FACTS, "target_len": target_len}
    facts = {k: v for k, v in facts.items() if k not in cfg.model}
    return count_parameters(lambda: instantiate(cfg.model, **facts))


def swiglu_parameters(width: int, expansion: float) -> int:
    """gate, up and down matrices of a SwiGLU whose inner width is 2/3 of expansion x width, rounded up to 8."""
    inner = math.ceil(max(8, round(expansion * width * 2 / 3)) / 8) * 8
    return 3 * width * inner


def test_counting_on_the_meta_device_equals_counting_a_real_instance():
    node = OmegaConf.load(CONF_DIR / "model" / "multimodal" / "tiny.yaml")
    on_meta = count_parameters(lambda: instantiate(node, **TINY_PRESET_FACTS))
    assert on_meta == parameter_counts(instantiate(node, **TINY_PRESET_FACTS))


def test_each_feature_switch_removes_exactly_its_own_parameters():
    node = OmegaConf.load(CONF_DIR / "model" / "multimodal" / "tiny.yaml")
    full = count_parameters(lambda: instantiate(node, **TINY_PRESET_FACTS))
    for feature, modules in FEATURE_MODULES.items():
        off = count_parameters(lambda f=feature: instantiate(node, **TINY_PRESET_FACTS, **{f: False}))
        assert not modules & set(off), feature
        assert off["total"] == full["total"] - sum(full.get(m, 0) for m in modules), feature
        assert {k: v for k, v in off.items() if k not in ("total", "trainable")} == \
            {k: v for k, v in full.items() if k not in modules | {"total", "trainable"}}, feature
    ckpt = count_parameters(lambda: instantiate(node, **TINY_PRESET_FACTS, enable_gradient_checkpointing=True))
    assert ckpt == full  # a parameter-free switch


def test_full_preset_matches_the_architecture_formula():
    cfg = compose_config("model=multimodal/hesc").model
    counts = preset_counts("multimodal/hesc")
    width = cfg.hidden_size
    block = 4 * width * width + swiglu_parameters(width, cfg.expansion)  # q, k, v, out + SwiGLU
    assert counts["net"] == cfg.num_layers * block
    assert counts["planner"] == cfg.latent_planning_layers * block + cfg.latent_num_paths * width + width + 1  # + scorer
    assert counts["memory"] == 2 * cfg.memory_slots * width + 2 * width * width  # keys, values, query, out
    assert counts["mtp"] == cfg.mtp_heads * swiglu_parameters(width, 1.0)
    q_net = (cfg.dqn_state_dim + 2) * cfg.dqn_hidden + cfg.dqn_hidden + cfg.dqn_hidden * 2 + 2
    assert counts["dqn"] == 2 * q_net  # the online and the target network
    assert counts["total"] - counts["trainable"] == q_net  # only the target network is frozen


def test_presets_compose_and_validate():
    cfg = validate_config(compose_config("model=multimodal/code_optimized", "loss=multimodal/default", "evaluators=multimodal/default"))
    assert cfg.model.hidden_size == 1024 and cfg.model.mtp_heads == 4  # hesc values + the code overrides
    for name in ("multimodal/hesc", "multimodal/text_optimized", "multimodal/tiny"):
        validate_config(compose_config(f"model={name}", "loss=multimodal/default", "evaluators=multimodal/default"))
    cfg = compose_config("model=multimodal/tiny")
    assert not {"vocab_size", "target_len", "image_size", "in_channels", "num_capsules"} & set(cfg.model)


# ---------------------------------------------------------------------------------- evaluators
def one_hot_logits(pred: list[list[int]], vocab: int = 6) -> torch.Tensor:
    return F.one_hot(torch.tensor(pred), vocab).float()


def test_code_evaluator_and_source_exact_match_by_hand():
    target = torch.tensor([[3, 4, 1, -100], [2, 2, 2, 1], [5, 1, -100, -100], [4, 4, 1, -100]])
    pred = [[3, 4, 1, 0], [2, 2, 2, 1], [5, 0, 3, 3], [4, 5, 1, 1]]
    batch = {"target": target, "source": torch.tensor([2, 0, 2, 2])}
    outputs = {"logits": one_hot_logits(pred)}
    code = CodeEvaluator()
    code.update(outputs, batch)
    code.sync()
    result = code.compute()
    # code rows 0, 2, 3: tokens 3 + 2 + 3 = 8 scored, right 3 + 1 + 2 = 6; whole lines right: row 0 only
    assert result == {"code_token_acc": pytest.approx(6 / 8), "code_line_exact": pytest.approx(1 / 3)}
    arc = SourceExactMatch(source=0, name="arc_exact")
    arc.update(outputs, batch)
    assert arc.compute() == {"arc_exact": 1.0}
    text = SourceExactMatch(source=1, name="text_exact")
    text.update(outputs, batch)
    assert math.isnan(text.compute()["text_exact"])  # no text rows: nothing measured
    code.reset()
    assert math.isnan(code.compute()["code_token_acc"])


def test_loss_terms_read_zero_when_outputs_are_absent():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    outputs, batch = {"logits": logits}, {"target": torch.tensor([[1, 2, -100], [3, 1, -100]])}
    for term in (MTPTerm(), VQTerm(), DQNTerm()):
        value = term(outputs, batch)
        assert value.item() == 0.0 and value.requires_grad
    lm = TokenCrossEntropyTerm(kind="softmax", labels_key="target")(outputs, batch)
    assert lm.item() > 0
