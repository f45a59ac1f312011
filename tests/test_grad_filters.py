import pytest
import torch

from utils.optim.grad_filters import GradFilter, GrokfastEMA, GrokfastMA, NoFilter


class TwoParams(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(3))
        self.b = torch.nn.Parameter(torch.zeros(2, 2))


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.core = torch.nn.Linear(3, 4)
        self.memory = torch.nn.Linear(4, 4)
        self.q_head = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_head(torch.tanh(self.memory(torch.tanh(self.core(x)))))


def _fixed_grads(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return {"a": torch.randn(3, generator=g), "b": torch.randn(2, 2, generator=g)}


def _set_grads(model: torch.nn.Module, grads: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        p.grad = grads[name].clone()


def _backward(model: Net, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(8, 3, generator=g)
    model.zero_grad()
    model(x).pow(2).mean().backward()


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_ema_matches_hand_computation_over_three_steps() -> None:
    alpha, lamb = 0.9, 2.0
    model, filt = TwoParams(), GrokfastEMA(alpha=alpha, lamb=lamb)
    ema: dict[str, torch.Tensor] = {}
    for step in range(3):
        raw = _fixed_grads(step)
        _set_grads(model, raw)
        filt.apply(model)
        for name, g in raw.items():
            ema[name] = g.clone() if name not in ema else alpha * ema[name] + (1 - alpha) * g
            expected = g + lamb * ema[name]
            torch.testing.assert_close(dict(model.named_parameters())[name].grad, expected, rtol=1e-6, atol=1e-6)


def test_ema_skips_params_without_grad_and_configure_keeps_the_history() -> None:
    model, filt = TwoParams(), GrokfastEMA(alpha=0.5, lamb=1.0)
    model.a.grad = torch.ones(3)
    filt.apply(model)  # b has no grad: untouched, no state
    assert model.b.grad is None
    assert set(filt.state_dict()["ema"]) == {"a"}
    torch.testing.assert_close(model.a.grad, torch.full((3,), 2.0))
    filt.configure(lamb=0.6)  # a curriculum stage lowers lamb by 40%
    model.a.grad = torch.ones(3)
    filt.apply(model)  # ema stays 1 -> g = 1 + 0.6 * 1
    torch.testing.assert_close(model.a.grad, torch.full((3,), 1.6))
    filt.configure()  # back to the constructor's options (a stage with grad_filter: inherit)
    model.a.grad = torch.ones(3)
    filt.apply(model)
    torch.testing.assert_close(model.a.grad, torch.full((3,), 2.0))
    filt.configure(components={"b": None})  # a component switched off; a has the defaults
    model.a.grad, model.b.grad = torch.ones(3), torch.ones(2, 2)
    filt.apply(model)
    torch.testing.assert_close(model.a.grad, torch.full((3,), 2.0))
    torch.testing.assert_close(model.b.grad, torch.ones(2, 2))
    with pytest.raises(ValueError, match="unknown option"):
        filt.configure(window_size=3)


def test_ma_warmup_and_window_mean() -> None:
    window, lamb = 3, 5.0
    model, filt = TwoParams(), GrokfastMA(window_size=window, lamb=lamb, warmup=True)
    history: list[dict[str, torch.Tensor]] = []
    for step in range(6):
        raw = _fixed_grads(step)
        history.append(raw)
        _set_grads(model, raw)
        filt.apply(model)
        for name, g in raw.items():
            got = dict(model.named_parameters())[name].grad
            if step < window - 1:
                torch.testing.assert_close(got, g, rtol=0, atol=0)  # window not full: unfiltered
            else:
                mean = torch.stack([h[name] for h in history[-window:]]).mean(0)
                torch.testing.assert_close(got, g + lamb * mean, rtol=1e-5, atol=1e-5)


def test_ma_without_warmup_uses_partial_window() -> None:
    model, filt = TwoParams(), GrokfastMA(window_size=4, lamb=1.0, warmup=False)
    g0, g1 = _fixed_grads(0), _fixed_grads(1)
    _set_grads(model, g0)
    filt.apply(model)
    torch.testing.assert_close(model.a.grad, 2 * g0["a"])
    _set_grads(model, g1)
    filt.apply(model)
    torch.testing.assert_close(model.a.grad, g1["a"] + (g0["a"] + g1["a"]) / 2)


@pytest.mark.parametrize("make", [lambda c: GrokfastEMA(alpha=0.8, lamb=2.0, components=c),
                                  lambda c: GrokfastMA(window_size=2, lamb=2.0, warmup=False, components=c)],
                         ids=["ema", "ma"])
def test_component_override_and_excluded_component(make) -> None:
    torch.manual_seed(0)
    comps = {"memory": {"lamb": 0.5}, "q_head": None}
    model, ref = Net(), Net()
    ref.load_state_dict(model.state_dict())
    filtered, plain = make(comps), make(None)
    for step in range(3):
        _backward(model, step)
        _backward(ref, step)
        raw = _grads(model)
        filtered.apply(model)
        plain.apply(ref)
        got, default = _grads(model), _grads(ref)
        for name in ("q_head.weight", "q_head.bias"):
            torch.testing.assert_close(got[name], raw[name], rtol=0, atol=0)  # excluded: untouched
        for name in ("core.weight", "core.bias"):
            torch.testing.assert_close(got[name], default[name])  # unmatched: defaults
        for name in ("memory.weight", "memory.bias"):
            # lamb 0.5 instead of 2: g + 0.5*slow, while default gives g + 2*slow.
            slow = (default[name] - raw[name]) / 2.0
            torch.testing.assert_close(got[name], raw[name] + 0.5 * slow, rtol=1e-5, atol=1e-6)
    state = filtered.state_dict()
    per_param = state["ema"] if "ema" in state else state["buffers"]
    assert per_param and not any(k.startswith("q_head") for k in per_param)  # no state kept for excluded


def test_longest_prefix_wins() -> None:
    model = Net()
    filt = GrokfastEMA(alpha=0.5, lamb=1.0, components={"memory": None, "memory.weight": {"lamb": 3.0}})
    _backward(model, 0)
    raw = _grads(model)
    filt.apply(model)
    torch.testing.assert_close(model.memory.bias.grad, raw["memory.bias"], rtol=0, atol=0)
    torch.testing.assert_close(model.memory.weight.grad, 4.0 * raw["memory.weight"])


def test_unknown_component_raises_at_first_apply() -> None:
    filt = GrokfastEMA(components={"memroy": {"lamb": 1.0}})
    model = Net()
    _backward(model, 0)
    with pytest.raises(ValueError, match="memroy"):
        filt.apply(model)
    with pytest.raises(ValueError, match="unknown option"):
        GrokfastEMA(components={"memory": {"window_size": 3}})


@pytest.mark.parametrize("make", [lambda: GrokfastEMA(alpha=0.9, lamb=2.0, components={"memory": {"alpha": 0.5}}),
                                  lambda: GrokfastMA(window_size=3, lamb=1.5, components={"q_head": {"lamb": 0.1}})],
                         ids=["ema", "ma"])
def test_state_dict_round_trip_is_bitwise(make, tmp_path) -> None:
    model = Net()
    filt = make()
    for step in range(4):  # MA: window (3) wraps once, so the ring index is mid-lap
        _backward(model, step)
        filt.apply(model)
    filt.configure(lamb=0.6)
    path = tmp_path / "filter.pt"
    torch.save(filt.state_dict(), path)

    restored = make()
    restored.configure(lamb=0.6)  # options come from the config (the stage), the history from the checkpoint
    restored.load_state_dict(torch.load(path, weights_only=True))
    for step in range(4, 9):
        _backward(model, step)
        raw = _grads(model)
        filt.apply(model)
        expected = _grads(model)
        for name, p in model.named_parameters():
            p.grad = raw[name].clone()
        restored.apply(model)
        for name, g in _grads(model).items():
            assert torch.equal(g, expected[name]), name
        for name, p in model.named_parameters():
            p.grad = expected[name]


def test_no_filter_is_identity() -> None:
    model = Net()
    _backward(model, 0)
    raw = _grads(model)
    for filt in (NoFilter(), GradFilter()):
        filt.apply(model)
        filt.configure()
        assert filt.state_dict() == {}
        filt.load_state_dict({})
    for name, g in _grads(model).items():
        assert torch.equal(g, raw[name])
