"""Experience replay as a tensor ring buffer whose whole state lives in registered buffers.

Why buffers and not Python lists: the buffer is a submodule of the model, so ``model.state_dict()``
(what the launcher checkpoints and loads with ``weights_only=True``) carries every stored transition,
the write position, the fill level and the sampling RNG; a resumed run samples exactly the
transitions an uninterrupted one would. Nothing lives on the Python side.

Storage is one preallocated tensor per field (``capacity`` rows). ``push`` writes a batch of items at
the write position, wrapping around and overwriting the oldest ones once full. ``sample`` draws
indices uniformly (with replacement) among the filled rows with a ``torch.Generator`` whose state is
kept in the ``rng_state`` buffer (a CPU generator, so the draw is the same on any device).
``ready(n)`` is the warm-start gate: true once at least ``n`` items were stored.

Notes for the launcher's wrappers: DDP would broadcast rank 0's buffers at every forward (the whole
storage); a model that owns a replay buffer should list its buffer names in
``_ddp_params_and_buffers_to_ignore`` (``MultimodalTRM`` does), so each rank keeps its own experience
(the checkpoint then holds rank 0's). ``ModelEMA`` (use_buffers=True) lerps the float storage of its
copy; harmless (the evaluated copy never samples) but it costs one pass over the storage per step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

_STORAGE_PREFIX = "storage_"


class ReplayBuffer(nn.Module):
    """A ring buffer of named tensor fields.

    Args:
        capacity: number of items kept; older ones are overwritten.
        fields: ``name -> (item_shape, dtype)``, e.g. ``{"state": ((64,), torch.float32), "action": ((), torch.long)}``.
        seed: seed of the sampling generator.
    """

    def __init__(self, capacity: int, fields: Mapping[str, tuple[Sequence[int], torch.dtype]], seed: int = 0) -> None:
        super().__init__()
        if capacity < 1:
            raise ValueError(f"ReplayBuffer capacity must be >= 1, got {capacity}")
        if not fields:
            raise ValueError("ReplayBuffer needs at least one field")
        self.capacity = int(capacity)
        self.field_names: tuple[str, ...] = tuple(fields)
        for name, (shape, dtype) in fields.items():
            self.register_buffer(_STORAGE_PREFIX + name, torch.zeros((self.capacity, *shape), dtype=dtype))
        # Integer bookkeeping as 0-d long tensors: checkpointed, and copied (not averaged) by ModelEMA.
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("size", torch.zeros((), dtype=torch.long))
        self.register_buffer("pushed", torch.zeros((), dtype=torch.long))  # total items ever stored
        generator = torch.Generator(device="cpu")
        generator.manual_seed(int(seed))
        self.register_buffer("rng_state", generator.get_state())

    def storage(self, name: str) -> torch.Tensor:
        return getattr(self, _STORAGE_PREFIX + name)

    def __len__(self) -> int:
        return int(self.size)

    def ready(self, min_size: int) -> bool:
        """Warm-start gate: at least ``min_size`` items stored (and at least one)."""
        return int(self.size) >= max(int(min_size), 1)

    @torch.no_grad()
    def push(self, items: Mapping[str, torch.Tensor]) -> None:
        """Store a batch of items (dim 0); every field must be given, with the same number of rows."""
        missing = set(self.field_names) - set(items)
        unknown = set(items) - set(self.field_names)
        if missing or unknown:
            raise KeyError(f"ReplayBuffer.push: missing fields {sorted(missing)}, unknown fields {sorted(unknown)}")
        counts = {name: int(items[name].shape[0]) for name in self.field_names}
        n = next(iter(counts.values()))
        if any(c != n for c in counts.values()):
            raise ValueError(f"ReplayBuffer.push: fields have different numbers of rows {counts}")
        if n == 0:
            return
        skip = max(0, n - self.capacity)  # more items than slots: only the newest `capacity` survive
        start = (int(self.ptr) + skip) % self.capacity
        kept = n - skip
        device = self.ptr.device
        index = (start + torch.arange(kept, device=device)) % self.capacity  # distinct: kept <= capacity
        for name in self.field_names:
            store = self.storage(name)
            value = items[name][skip:].detach().to(device=store.device, dtype=store.dtype)
            if value.shape[1:] != store.shape[1:]:
                raise ValueError(f"ReplayBuffer.push: field {name!r} items have shape {list(value.shape[1:])}, "
                                 f"expected {list(store.shape[1:])}")
            store[index] = value
        self.ptr.fill_((start + kept) % self.capacity)
        self.size.fill_(min(int(self.size) + n, self.capacity))
        self.pushed.add_(n)

    @torch.no_grad()
    def sample(self, batch_size: int) -> dict[str, torch.Tensor]:
        """``batch_size`` items drawn uniformly with replacement from the filled slots."""
        size = int(self.size)
        if size == 0:
            raise RuntimeError("ReplayBuffer.sample on an empty buffer (gate it with ready(warmstart))")
        generator = torch.Generator(device="cpu")
        generator.set_state(self.rng_state.cpu())
        index = torch.randint(0, size, (int(batch_size),), generator=generator)
        self.rng_state.copy_(generator.get_state())
        index = index.to(self.ptr.device)
        return {name: self.storage(name)[index] for name in self.field_names}

    def buffer_names(self, prefix: str = "") -> list[str]:
        """Fully qualified names of this module's buffers (for ``_ddp_params_and_buffers_to_ignore``)."""
        return [f"{prefix}{name}" for name, _ in self.named_buffers()]

    def extra_repr(self) -> str:
        return f"capacity={self.capacity}, fields={list(self.field_names)}"
