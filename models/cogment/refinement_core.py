"""RefinementCore: one refinement step, applied again and again.

Each step reads the input (token, task and episodic-memory embeddings), the previous prediction state
(through ``feedback``) and its own previous latent state, runs the project's ``ReasoningNet`` (post-norm
attention + SwiGLU blocks with rotary positions) and the persistent memory, and emits a residual edit of
the prediction state (``edit``). The output heads turn the prediction state into logits; the halting
head (models/cogment/model.py) reads the latent state. Parameters are shared across steps, so the
number of steps is a runtime knob.
"""

from __future__ import annotations

import torch
from torch import nn

from models.components.initialization import trunc_normal_
from models.components.memory import KeyValueMemory
from models.components.reasoning_net import ReasoningNet
from models.components.rotary import RotaryEmbedding


class RefinementCore(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, num_layers: int, expansion: float, max_seq_len: int,
                 rope_base: float = 10000.0) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"model.hidden_size={hidden_size} must be divisible by model.num_heads={num_heads}")
        rotary = RotaryEmbedding(hidden_size // num_heads, max_seq_len, base=rope_base)
        self.net = ReasoningNet(num_layers, width=hidden_size, num_heads=num_heads, expansion=expansion,
                                mixer="attention", total_len=max_seq_len, rotary=rotary)
        self.feedback = nn.Linear(hidden_size, hidden_size, bias=False)
        self.edit = nn.Linear(hidden_size, hidden_size, bias=False)
        self.register_buffer("initial_state", trunc_normal_(torch.empty(hidden_size), std=1.0))

    def forward(self, state: torch.Tensor, inputs: torch.Tensor, prediction: torch.Tensor, memory: KeyValueMemory,
                checkpointing: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One step: (new latent state, residual edit of the prediction state), all [B, L, D]."""
        state = self.net(state, inputs + self.feedback(prediction), checkpointing=checkpointing)
        state = memory(state)
        return state, self.edit(state)
