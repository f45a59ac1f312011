"""A learned key-value memory bank, read by attention from every position of a state."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from models.components.attention import merge_heads, split_heads
from models.components.initialization import trunc_normal_
from models.components.norms import rms_norm


class KeyValueMemory(nn.Module):
    """``state <- norm(state + out(attend(q(state), keys, values [+ written])))`` with ``num_heads`` heads.

    Keys and values are parameters (slow, learned by backprop: facts shared across tasks). With
    ``write_decay`` set, a ``written`` buffer (zero at start, checkpointed with the weights) adds an EMA
    of the states that addressed each slot: after every training forward called with ``write=True``,
    slot m moves towards the mean of the detached states weighted by their (full-width, single-head)
    addressing softmax over the slots -- a fast, cross-batch cache of recent reasoning states, not
    trained by backprop. Under DDP the buffer is broadcast from rank 0 at each forward, so ranks stay
    consistent.
    """

    def __init__(self, hidden_size: int, slots: int, num_heads: int, write_decay: float | None = None) -> None:
        super().__init__()
        if slots < 1:
            raise ValueError(f"model.memory_slots must be >= 1, got {slots}")
        if write_decay is not None and not 0.0 <= write_decay < 1.0:
            raise ValueError(f"model.memory_write_decay must be in [0, 1) or null, got {write_decay}")
        self.num_heads, self.write_decay = num_heads, write_decay
        self.keys = nn.Parameter(trunc_normal_(torch.empty(slots, hidden_size), std=1.0))
        self.values = nn.Parameter(trunc_normal_(torch.empty(slots, hidden_size), std=1.0))
        self.query = nn.Linear(hidden_size, hidden_size, bias=False)
        self.out = nn.Linear(hidden_size, hidden_size, bias=False)
        if write_decay is not None:
            self.register_buffer("written", torch.zeros(slots, hidden_size))
        else:
            self.written = None

    def forward(self, state: torch.Tensor, write: bool = False) -> torch.Tensor:
        """Read for ``state`` [B, L, D] -> [B, L, D]; ``write`` also updates ``written`` (if it exists)."""
        batch = state.shape[0]
        q = self.query(state)
        values = self.values if self.written is None else self.values + self.written
        k = split_heads(self.keys.to(q.dtype).unsqueeze(0), self.num_heads).expand(batch, -1, -1, -1)
        v = split_heads(values.to(q.dtype).unsqueeze(0), self.num_heads).expand(batch, -1, -1, -1)
        read = F.scaled_dot_product_attention(split_heads(q, self.num_heads), k, v)
        out = rms_norm(state + self.out(merge_heads(read)))
        if write and self.written is not None:
            self._write(q.detach(), state.detach())
        return out

    @torch.no_grad()
    def _write(self, q: torch.Tensor, state: torch.Tensor) -> None:
        address = (q.float().flatten(0, 1) @ self.keys.float().t() / math.sqrt(q.shape[-1])).softmax(dim=-1)  # [BL, M]
        mass = address.sum(dim=0)  # [M]
        total = address.t() @ state.float().flatten(0, 1)  # [M, D]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(mass)
            dist.all_reduce(total)
        mean = total / mass.clamp(min=1e-6).unsqueeze(1)
        updated = self.written * self.write_decay + mean * (1.0 - self.write_decay)
        self.written.copy_(torch.where((mass > 1e-6).unsqueeze(1), updated, self.written))
