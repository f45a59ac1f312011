import math

import pytest
import torch

from utils.optim.schedules import (
    constant,
    cosine_annealing,
    cosine_with_warmup,
    reduce_on_plateau,
    steps_per_call,
)

BASE_LR = 0.1


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=BASE_LR, momentum=0.9)


def _lrs(optimizer: torch.optim.Optimizer, scheduler, steps: int) -> list[float]:
    """lr used at steps 0..steps-1 (scheduler stepped after each optimizer step, as the trainer does)."""
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_cosine_with_warmup_key_values() -> None:
    opt = _optimizer()
    sched = cosine_with_warmup(opt, total_steps=110, warmup_steps=10, lr_min_ratio=0.1)
    lrs = _lrs(opt, sched, 131)
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(0.05)  # halfway through warmup
    assert lrs[10] == pytest.approx(0.1)  # warmup end: base lr
    # Midpoint of the cosine (step 60): 0.1 * (0.1 + 0.9 * 0.5) = 0.055.
    assert lrs[60] == pytest.approx(0.055)
    # A quarter in (step 35): 0.1 * (0.1 + 0.9 * 0.5 * (1 + cos(pi/4))).
    assert lrs[35] == pytest.approx(0.1 * (0.1 + 0.45 * (1 + math.cos(math.pi / 4))))
    assert lrs[110] == pytest.approx(0.01)  # end: base lr * lr_min_ratio
    assert lrs[130] == pytest.approx(0.01)  # flat after total_steps
    assert all(a >= b for a, b in zip(lrs[10:111], lrs[11:111]))


def test_cosine_without_warmup_starts_at_base_lr() -> None:
    opt = _optimizer()
    lrs = _lrs(opt, cosine_with_warmup(opt, total_steps=10), 11)
    assert lrs[0] == pytest.approx(0.1) and lrs[5] == pytest.approx(0.05) and lrs[10] == pytest.approx(0.0)


def test_constant_with_warmup() -> None:
    opt = _optimizer()
    lrs = _lrs(opt, constant(opt, total_steps=50, warmup_steps=4), 10)
    assert lrs[:6] == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1, 0.1])
    assert lrs[9] == pytest.approx(0.1)


def test_cosine_annealing_with_and_without_warmup() -> None:
    opt = _optimizer()
    lrs = _lrs(opt, cosine_annealing(opt, total_steps=20, min_lr=0.01), 21)
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[10] == pytest.approx(0.055)
    assert lrs[20] == pytest.approx(0.01)

    opt = _optimizer()
    lrs = _lrs(opt, cosine_annealing(opt, total_steps=24, min_lr=0.01, warmup_steps=4), 25)
    assert lrs[0] == pytest.approx(0.0, abs=1e-8)
    assert lrs[2] == pytest.approx(0.05)
    assert lrs[4] == pytest.approx(0.1)  # warmup end
    assert lrs[14] == pytest.approx(0.055)  # cosine midpoint
    assert lrs[24] == pytest.approx(0.01)


@pytest.mark.parametrize(
    "factory",
    [
        lambda o: cosine_with_warmup(o, total_steps=40, warmup_steps=5, lr_min_ratio=0.2),
        lambda o: cosine_annealing(o, total_steps=40, min_lr=0.001, warmup_steps=5),
        lambda o: cosine_annealing(o, total_steps=40, min_lr=0.001),
        lambda o: constant(o, total_steps=40, warmup_steps=5),
    ],
    ids=["cosine_with_warmup", "cosine_annealing_warmup", "cosine_annealing", "constant"],
)
def test_state_dict_round_trip_gives_identical_lrs(factory, tmp_path) -> None:
    opt = _optimizer()
    sched = factory(opt)
    _lrs(opt, sched, 13)  # stop mid-warmup-or-decay
    path = tmp_path / "ckpt.pt"
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, path)
    expected = _lrs(opt, sched, 30)

    opt2 = _optimizer()
    sched2 = factory(opt2)
    state = torch.load(path, weights_only=True)
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    assert _lrs(opt2, sched2, 30) == expected


def test_reduce_on_plateau_reduces_after_patience_and_round_trips() -> None:
    opt = _optimizer()
    sched = reduce_on_plateau(opt, total_steps=1000, factor=0.5, patience=2)
    assert steps_per_call(sched) == "eval"
    sched.step(1.0)
    sched.step(1.0)  # no improvement: 1 bad epoch
    sched.step(1.0)  # 2 bad epochs == patience: not yet
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    state = sched.state_dict()
    sched.step(1.0)  # 3 > patience: reduce
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)

    opt2 = _optimizer()
    sched2 = reduce_on_plateau(opt2, total_steps=1000, factor=0.5, patience=2)
    sched2.load_state_dict(state)
    sched2.step(1.0)
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.05)


def test_steps_per_call_for_step_schedulers() -> None:
    opt = _optimizer()
    assert steps_per_call(constant(opt, total_steps=10)) == "step"
    assert steps_per_call(cosine_with_warmup(opt, total_steps=10)) == "step"


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        cosine_with_warmup(_optimizer(), total_steps=10, warmup_steps=-1)
    with pytest.raises(ValueError):
        cosine_with_warmup(_optimizer(), total_steps=10, lr_min_ratio=1.5)


def test_warmup_longer_than_the_run_is_allowed() -> None:
    # A shrunk run (debug=fast: 6 steps) keeps its preset's warm-up: the lr just never reaches its peak.
    opt = _optimizer()
    sched = constant(opt, total_steps=6, warmup_steps=10)
    lrs = []
    for _ in range(6):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    base = sched.base_lrs[0]
    assert lrs == pytest.approx([base * k / 10 for k in range(1, 7)])
