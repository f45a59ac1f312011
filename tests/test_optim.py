import pytest
import torch
from omegaconf import OmegaConf

from utils.optim.builder import build_optimizers


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(4, 8)
        self.core = torch.nn.Linear(8, 8)
        self.q_head = torch.nn.Linear(8, 1)
        self.memory = torch.nn.Linear(8, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(x))
        h = torch.tanh(self.core(h)) + self.memory(h)
        return self.q_head(h)


def _group_of(opt: torch.optim.Optimizer, param: torch.nn.Parameter) -> dict:
    return next(g for g in opt.param_groups if any(p is param for p in g["params"]))


@pytest.mark.parametrize(
    "spec",
    [
        {"_target_": "torch.optim.Adam", "lr": 0.1},
        {"_target_": "torch.optim.AdamW", "lr": 0.1, "weight_decay": 0.01, "betas": [0.9, 0.98]},
        {"_target_": "torch.optim.SGD", "lr": 5e-2, "momentum": 0.9, "nesterov": True},
        {"_target_": "adam_atan2_pytorch.AdamAtan2", "lr": 0.1, "betas": [0.9, 0.99]},
    ],
    ids=["adam", "adamw", "sgd", "adam_atan2"],
)
def test_each_target_reduces_regression_loss(spec: dict) -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1
    model = torch.nn.Linear(4, 1)
    # Null keys for the other optimizers are in the schema; they must not reach the constructor.
    cfg = {**{"eps": None, "momentum": None, "nesterov": None, "betas": None, "weight_decay": None}, **spec}
    (named,) = build_optimizers(model, cfg)
    assert named.name == "main" and named.schedule_cfg is None
    assert named.param_names == ["weight", "bias"]

    def loss_fn() -> torch.Tensor:
        return torch.nn.functional.mse_loss(model(x), y)

    start = loss_fn().item()
    for _ in range(50):
        named.optimizer.zero_grad()
        loss_fn().backward()
        named.optimizer.step()
    assert loss_fn().item() < 0.5 * start


def test_null_keys_dropped_and_omegaconf_accepted() -> None:
    cfg = OmegaConf.create(
        {"_target_": "torch.optim.Adam", "lr": 1e-3, "weight_decay": None, "eps": None, "momentum": None,
         "nesterov": None, "betas": [0.8, 0.9], "param_groups": [], "components": {}}
    )
    (named,) = build_optimizers(Net(), cfg)
    group = named.optimizer.param_groups[0]
    assert isinstance(named.optimizer, torch.optim.Adam)
    assert group["eps"] == 1e-8 and group["weight_decay"] == 0.0  # Adam's own defaults
    assert tuple(group["betas"]) == (0.8, 0.9)


def test_param_groups_get_their_settings() -> None:
    model = Net()
    cfg = {
        "_target_": "torch.optim.AdamW",
        "lr": 1e-3,
        "weight_decay": 0.1,
        "param_groups": [
            {"params": "*.bias", "weight_decay": 0.0},
            {"params": "embed.*", "lr": 3e-4, "weight_decay": None},
        ],
    }
    (named,) = build_optimizers(model, cfg)
    opt = named.optimizer
    # First matching glob wins: embed.bias is a bias (wd 0, base lr), embed.weight gets the embed lr.
    assert _group_of(opt, model.embed.bias)["weight_decay"] == 0.0
    assert _group_of(opt, model.embed.bias)["lr"] == 1e-3
    assert _group_of(opt, model.embed.weight)["lr"] == 3e-4
    assert _group_of(opt, model.embed.weight)["weight_decay"] == 0.1  # null: inherit the optimizer's
    assert _group_of(opt, model.core.weight)["lr"] == 1e-3
    assert _group_of(opt, model.core.weight)["weight_decay"] == 0.1
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_param_group_glob_matching_nothing_is_an_error() -> None:
    cfg = {"_target_": "torch.optim.SGD", "lr": 0.1, "param_groups": [{"params": "decoder.*", "lr": 0.01}]}
    with pytest.raises(ValueError, match=r"decoder\.\*"):
        build_optimizers(Net(), cfg)


def test_components_disjoint_and_unclaimed_to_main() -> None:
    model = Net()
    cfg = {
        "_target_": "torch.optim.AdamW",
        "lr": 1e-3,
        "weight_decay": 0.1,
        "betas": [0.9, 0.98],
        "components": {
            "halting": {"modules": ["q_head"], "lr": 1e-4, "weight_decay": None, "schedule": {"name": "x"}},
            "memory": {"modules": ["memory"], "_target_": "torch.optim.SGD", "lr": 0.5, "momentum": 0.9},
        },
    }
    opts = build_optimizers(model, cfg)
    assert [o.name for o in opts] == ["main", "halting", "memory"]
    main, halting, memory = opts
    assert isinstance(main.optimizer, torch.optim.AdamW)
    assert main.param_names == ["embed.weight", "embed.bias", "core.weight", "core.bias"]
    assert halting.param_names == ["q_head.weight", "q_head.bias"]
    assert memory.param_names == ["memory.weight"]
    assert halting.schedule_cfg == {"name": "x"} and main.schedule_cfg is None and memory.schedule_cfg is None
    # Component inherits unset (null) keys from main and overrides the rest.
    hg = halting.optimizer.param_groups[0]
    assert isinstance(halting.optimizer, torch.optim.AdamW)
    assert hg["lr"] == 1e-4 and hg["weight_decay"] == 0.1 and tuple(hg["betas"]) == (0.9, 0.98)
    # A component switching class drops inherited keys the new class rejects (betas for SGD).
    mg = memory.optimizer.param_groups[0]
    assert isinstance(memory.optimizer, torch.optim.SGD)
    assert mg["lr"] == 0.5 and mg["momentum"] == 0.9 and mg["weight_decay"] == 0.1
    # Every trainable parameter lands in exactly one optimizer.
    ids = [id(p) for o in opts for g in o.optimizer.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_component_overlap_is_an_error() -> None:
    cfg = {
        "_target_": "torch.optim.Adam",
        "lr": 1e-3,
        "components": {"a": {"modules": ["core"]}, "b": {"modules": ["core.weight", "q_head"]}},
    }
    with pytest.raises(ValueError, match=r"core\.weight.*'a'.*'b'"):
        build_optimizers(Net(), cfg)


def test_component_matching_nothing_lists_submodules() -> None:
    cfg = {"_target_": "torch.optim.Adam", "lr": 1e-3, "components": {"halting": {"modules": ["qhead"]}}}
    with pytest.raises(ValueError, match="halting") as err:
        build_optimizers(Net(), cfg)
    for name in ("embed", "core", "q_head", "memory"):
        assert name in str(err.value)


def test_prefix_match_is_on_name_boundaries() -> None:
    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(2, 2)
            self.head2 = torch.nn.Linear(2, 2)

    cfg = {"_target_": "torch.optim.Adam", "lr": 1e-3, "components": {"h": {"modules": ["head"]}}}
    main, h = build_optimizers(M(), cfg)
    assert h.param_names == ["head.weight", "head.bias"]
    assert main.param_names == ["head2.weight", "head2.bias"]


def test_null_main_target() -> None:
    model = Net()
    comps = {"all": {"modules": ["embed", "core", "q_head", "memory"], "_target_": "torch.optim.SGD", "lr": 0.1}}
    opts = build_optimizers(model, {"_target_": None, "lr": 1e-3, "components": comps})
    assert [o.name for o in opts] == ["all"]
    partial = {"some": {"modules": ["core"], "_target_": "torch.optim.SGD"}}
    with pytest.raises(ValueError, match="_target_"):
        build_optimizers(model, {"_target_": None, "lr": 1e-3, "components": partial})


def test_frozen_params_excluded_and_no_trainable_gives_empty() -> None:
    model = Net()
    model.embed.requires_grad_(False)
    (main,) = build_optimizers(model, {"_target_": "torch.optim.Adam", "lr": 1e-3})
    assert not any(n.startswith("embed.") for n in main.param_names)
    model.requires_grad_(False)
    assert build_optimizers(model, {"_target_": "torch.optim.Adam", "lr": 1e-3}) == []
