"""The small network that recursive reasoning models apply again and again (TRM, HRM, the multimodal TRM).

A stack of post-norm blocks; every call adds an injection (the other latent, or the input) to the state
first, so one network can update either latent.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.components.attention import SelfAttention
from models.components.mlp import SequenceMLP, SwiGLU
from models.components.norms import rms_norm
from models.components.rotary import RotaryEmbedding

MIXERS = ("attention", "mlp")


class ReasoningBlock(nn.Module):
    """Post-norm block: x = norm(x + mix(x)); x = norm(x + mlp(x)).

    ``mixer`` is the token mixer: ``attention`` (non-causal self-attention, RoPE if ``rotary`` is given) or
    ``mlp`` (an MLP across the ``total_len`` positions, TRM's attention-free variant for fixed-size grids).
    """

    def __init__(self, width: int, num_heads: int, expansion: float, mixer: str, total_len: int, rotary: RotaryEmbedding | None) -> None:
        super().__init__()
        self.mix = SelfAttention(width, num_heads, rotary) if mixer == "attention" else SequenceMLP(total_len, expansion)
        self.mlp = SwiGLU(width, expansion)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = rms_norm(x + self.mix(x))
        return rms_norm(x + self.mlp(x))


class ReasoningNet(nn.Module):
    """A stack of ``num_layers`` ``ReasoningBlock``s applied to ``state + injection``."""

    def __init__(self, num_layers: int, **block_kwargs: Any) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ReasoningBlock(**block_kwargs) for _ in range(num_layers))

    def forward(self, state: torch.Tensor, injection: torch.Tensor | None = None, checkpointing: bool = False) -> torch.Tensor:
        """With ``checkpointing`` (and grad enabled) each block's activations are recomputed in backward
        instead of stored: same arithmetic, less memory. use_reentrant=False works with inputs that do not
        require grad and inside nested no_grad regions."""
        x = state if injection is None else state + injection
        use_checkpoint = checkpointing and torch.is_grad_enabled()
        for layer in self.layers:
            x = checkpoint(layer, x, use_reentrant=False) if use_checkpoint else layer(x)
        return x
