"""Multi-head self-attention: the non-causal one of TRM/HRM (bias-free, optional RoPE) and a causal,
GPT-2-style one (biases, dropout). Both run the same head split and scaled dot-product attention
(``self_attention``); they differ in their projections, hence in their parameter names."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.components.rotary import RotaryEmbedding


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, L, D] -> [B, heads, L, D / heads] (a view)."""
    batch, seq, width = x.shape
    return x.view(batch, seq, num_heads, width // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, L, head_dim] -> [B, L, heads * head_dim]."""
    batch, heads, seq, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, seq, heads * head_dim)


def self_attention(
    qkv: torch.Tensor,
    num_heads: int,
    causal: bool,
    rotary: RotaryEmbedding | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention of packed projections ``qkv`` [B, L, 3D] (queries, keys, values) -> [B, L, D], heads merged.

    ``rotary`` rotates queries and keys by their positions; ``dropout_p`` drops attention weights (pass 0
    outside training).
    """
    q, k, v = (split_heads(part, num_heads) for part in qkv.chunk(3, dim=-1))
    if rotary is not None:
        q, k = rotary(q), rotary(k)
    attended = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)
    return merge_heads(attended)


class SelfAttention(nn.Module):
    """Non-causal multi-head self-attention without biases (every cell of a grid sees every other)."""

    def __init__(self, width: int, num_heads: int, rotary: RotaryEmbedding | None) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"hidden_size={width} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)
        self.rotary = rotary

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self_attention(self.qkv(x), self.num_heads, causal=False, rotary=self.rotary))


class CausalSelfAttention(nn.Module):
    """Causal multi-head self-attention with biases and dropout (GPT-2): position t sees positions <= t."""

    def __init__(self, width: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dropout_p = self.dropout if self.training else 0.0
        attended = self_attention(self.qkv(x), self.num_heads, causal=True, dropout_p=dropout_p)
        return self.resid_dropout(self.proj(attended))
