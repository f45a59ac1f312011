import pytest
import torch

from utils.optim.ema import ModelEMA


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.norm = torch.nn.BatchNorm1d(2)


def _set_weights(model: Net, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
        model.norm.running_mean.fill_(value)
        model.norm.num_batches_tracked.fill_(int(value * 10))


def test_update_matches_hand_computed_decayed_average() -> None:
    decay = 0.9
    model = Net()
    ema = ModelEMA(model, decay=decay)
    values = [1.0, 2.0, 4.0, -1.0]
    expected = None
    for v in values:
        _set_weights(model, v)
        ema.update(model)
        # First update copies (AveragedModel convention), then ema = d*ema + (1-d)*w.
        expected = v if expected is None else decay * expected + (1 - decay) * v
    for name, p in ema.module.named_parameters():
        torch.testing.assert_close(p, torch.full_like(p, expected), msg=name)
    torch.testing.assert_close(ema.module.norm.running_mean, torch.full((2,), expected))  # buffers averaged
    assert ema.module.norm.num_batches_tracked.item() == -10  # integer buffer copied, not averaged
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert model.lin.weight.requires_grad  # the live model is untouched


def test_state_dict_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    model = Net()
    ema = ModelEMA(model, decay=0.8)
    for step in range(3):
        _set_weights(model, float(step))
        ema.update(model)
    path = tmp_path / "ema.pt"
    torch.save(ema.state_dict(), path)

    restored = ModelEMA(Net(), decay=0.8)
    restored.load_state_dict(torch.load(path, weights_only=True))
    for step in range(3, 7):
        _set_weights(model, float(step) ** 0.5)
        ema.update(model)
        restored.update(model)
    for (name, a), b in zip(ema.module.state_dict().items(), restored.module.state_dict().values()):
        assert torch.equal(a, b), name


def test_unwraps_wrapped_model_and_validates() -> None:
    model = Net()
    compiled_like = torch.nn.Module()
    compiled_like._orig_mod = model  # what torch.compile's OptimizedModule exposes
    ema = ModelEMA(compiled_like, decay=0.5)
    assert isinstance(ema.module, Net)
    _set_weights(model, 2.0)
    ema.update(compiled_like)
    torch.testing.assert_close(ema.module.lin.bias, torch.full((2,), 2.0))
    with pytest.raises(ValueError):
        ModelEMA(model, decay=1.5)


def test_buffers_that_ddp_ignores_are_not_averaged() -> None:
    class WithStorage(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(2, 2)
            self.register_buffer("running", torch.zeros(3))
            self.register_buffer("storage", torch.zeros(3))  # e.g. a replay buffer: per-process state
            self._ddp_params_and_buffers_to_ignore = ["storage"]

    model = WithStorage()
    ema = ModelEMA(model, decay=0.5)
    ema.update(model)  # the first update copies everything
    model.running.fill_(4.0)
    model.storage.fill_(4.0)
    ema.update(model)
    assert torch.equal(ema.module.running, torch.full((3,), 2.0)), "ordinary buffers are averaged"
    assert torch.equal(ema.module.storage, torch.zeros(3)), "ignored buffers keep the first copy"
    state = ema.state_dict()
    ema.load_state_dict(state)  # loading copies in place: the skip set still matches
    model.running.fill_(8.0)
    model.storage.fill_(8.0)
    ema.update(model)
    assert torch.equal(ema.module.running, torch.full((3,), 5.0)) and torch.equal(ema.module.storage, torch.zeros(3))
