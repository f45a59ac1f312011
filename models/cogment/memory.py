"""GatedLTM: Cogment's long-term memory, a slow learned half and a fast surprise-gated half.

* ``persistent``: the project's ``KeyValueMemory`` (models/components/memory.py): learned key and value
  slots read by multi-head attention from every position of the refinement state, inside every
  refinement step. Trained by backprop like any weight (Titans' "persistent memory"): what holds across
  all tasks.
* ``episodic``: ``EpisodicSlots`` (models/cogment/episodic_memory.py): associations written during
  training when the memory was surprised by an answer, addressed by the example's cue, read once per
  forward and added to the input of every refinement step through ``read_out``. Writes, decay and
  consolidation run outside backprop, from the model's ``on_after_optimizer_step`` callback, at the
  stage's memory-write rate (0: read-only). During an evaluation, study documents (held-out documents the
  model is asked about without them) are written into a copy of the slots, never into the slots
  themselves (models/cogment/model.py).
"""

from __future__ import annotations

import torch
from torch import nn

from models.cogment.episodic_memory import AddressCodes, EpisodicSlots
from models.components.memory import KeyValueMemory


class GatedLTM(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, vocab_size: int, max_seq_len: int, persistent_slots: int,
                 episodic_slots: int, key_dim: int, value_dim: int, code_seed: int = 0, **episodic_options: float) -> None:
        super().__init__()
        self.persistent = KeyValueMemory(hidden_size, persistent_slots, num_heads)
        self.codes = AddressCodes(vocab_size, max_seq_len, key_dim, value_dim, seed=code_seed)
        self.episodic = EpisodicSlots(episodic_slots, key_dim, value_dim, **episodic_options)
        self.read_out = nn.Linear(value_dim, hidden_size, bias=False)
        nn.init.zeros_(self.read_out.weight)  # an empty memory adds nothing, and a new one starts neutral

    @torch.no_grad()
    def recall(self, inputs: torch.Tensor, cue: torch.Tensor | None, slots: EpisodicSlots | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys [B, L, K], values read [B, L, Dv], attention on "nothing stored" [B, L]) of a batch, read
        from ``slots`` (default: the episodic memory)."""
        if cue is None:
            cue = torch.zeros_like(inputs, dtype=torch.bool)
        keys = self.codes.keys(inputs, cue)
        values, null = (slots or self.episodic).read(keys)
        return keys, values, null

    def write(self, keys: torch.Tensor, values_read: torch.Tensor, labels: torch.Tensor, rate: float,
              slots: EpisodicSlots | None = None, synchronize: bool = True, max_writes: int | None = None
              ) -> dict[str, float]:
        return (slots or self.episodic).write(keys, values_read, labels, self.codes.value, rate, synchronize=synchronize,
                                              max_writes=max_writes)
