"""Feed-forward blocks: SwiGLU over the channels, and an MLP across the sequence (a token mixer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swiglu_width(width: int, expansion: float) -> int:
    """Inner width of a SwiGLU with the parameter count of an ``expansion``x MLP: 2/3 of the width
    (it has three matrices instead of two), at least 8 and rounded up to a multiple of 8."""
    inner = max(8, round(expansion * width * 2 / 3))
    return (inner + 7) // 8 * 8


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` without biases (Shazeer 2020); gate and up are one matmul."""

    def __init__(self, width: int, expansion: float) -> None:
        super().__init__()
        inner = swiglu_width(width, expansion)
        self.gate_up = nn.Linear(width, 2 * inner, bias=False)
        self.down = nn.Linear(inner, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class SequenceMLP(nn.Module):
    """Token mixing by a SwiGLU across the sequence (TRM-MLP, MLP-Mixer style): needs a fixed length."""

    def __init__(self, seq_len: int, expansion: float) -> None:
        super().__init__()
        self.mlp = SwiGLU(seq_len, expansion)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [B, seq_len, D] -> [B, seq_len, D]."""
        return self.mlp(x.transpose(1, 2)).transpose(1, 2)
