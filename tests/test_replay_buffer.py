"""models/components/replay_buffer.py: ring overwrite, sampling, determinism, warm-start gate, exact state_dict round trip."""

from __future__ import annotations

import io

import pytest
import torch

from models.components.replay_buffer import ReplayBuffer


def make(capacity: int = 5, seed: int = 0) -> ReplayBuffer:
    return ReplayBuffer(capacity, {"x": ((), torch.long), "v": ((2,), torch.float32)}, seed=seed)


def items(ids: list[int]) -> dict[str, torch.Tensor]:
    x = torch.tensor(ids, dtype=torch.long)
    return {"x": x, "v": torch.stack([x.float(), -x.float()], dim=1)}


def test_ring_overwrites_the_oldest_items():
    buf = make(5)
    buf.push(items([0, 1, 2]))
    assert len(buf) == 3 and int(buf.ptr) == 3
    buf.push(items([3, 4, 5, 6]))
    assert len(buf) == 5 and int(buf.ptr) == 2 and int(buf.pushed) == 7
    assert buf.storage("x").tolist() == [5, 6, 2, 3, 4]
    assert buf.storage("v")[:, 1].tolist() == [-5.0, -6.0, -2.0, -3.0, -4.0]


def test_a_push_larger_than_the_capacity_keeps_the_newest():
    buf = make(4)
    buf.push(items([100]))  # ptr 1
    buf.push(items(list(range(10))))
    # Item j of the second push would land at (1 + j) % 4; items 6..9 survive at slots 3, 0, 1, 2.
    assert buf.storage("x").tolist() == [7, 8, 9, 6]
    assert int(buf.ptr) == (1 + 10) % 4 and len(buf) == 4


def test_sampling_draws_only_filled_slots():
    buf = make(100)
    buf.push(items([10, 11, 12, 13, 14]))
    drawn = buf.sample(1000)
    assert set(drawn["x"].tolist()) == {10, 11, 12, 13, 14}
    assert torch.equal(drawn["v"][:, 0], drawn["x"].float())  # fields of one item stay together


def test_sampling_is_deterministic_for_a_seed_and_advances():
    a, b, c = make(50, seed=3), make(50, seed=3), make(50, seed=4)
    for buf in (a, b, c):
        buf.push(items(list(range(40))))
    first_a, first_b, first_c = a.sample(16)["x"], b.sample(16)["x"], c.sample(16)["x"]
    assert torch.equal(first_a, first_b)
    assert not torch.equal(first_a, first_c)
    assert not torch.equal(a.sample(16)["x"], first_a)  # the generator state moved on


def test_warm_start_gate():
    buf = make(100)
    assert not buf.ready(0)  # an empty buffer is never ready
    buf.push(items(list(range(9))))
    assert not buf.ready(10)
    buf.push(items([9]))
    assert buf.ready(10)
    with pytest.raises(RuntimeError, match="empty"):
        make(3).sample(1)


def test_state_dict_round_trip_is_exact():
    buf = make(8, seed=1)
    buf.push(items(list(range(11))))
    buf.sample(5)  # move the generator
    blob = io.BytesIO()
    torch.save(buf.state_dict(), blob)
    blob.seek(0)
    state = torch.load(blob, weights_only=True)  # what the launcher's checkpoints allow
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    fresh = make(8, seed=99)
    fresh.load_state_dict(state)
    for key, value in buf.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key
    assert torch.equal(buf.sample(32)["x"], fresh.sample(32)["x"])  # resumed sampling continues identically
    fresh.push(items([50]))
    buf.push(items([50]))
    assert torch.equal(buf.storage("x"), fresh.storage("x"))


def test_push_checks_fields_and_shapes():
    buf = make(4)
    with pytest.raises(KeyError, match="missing fields"):
        buf.push({"x": torch.zeros(2, dtype=torch.long)})
    with pytest.raises(ValueError, match="different numbers of rows"):
        buf.push({"x": torch.zeros(2, dtype=torch.long), "v": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match="shape"):
        buf.push({"x": torch.zeros(2, dtype=torch.long), "v": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(0, {"x": ((), torch.long)})
