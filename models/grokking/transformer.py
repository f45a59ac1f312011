"""Small decoder-only (causal) transformer, as used for algorithmic data in Grokfast.

Three switches reproduce the Grokfast reference implementation's model exactly where this launcher's
defaults (a GPT-2 style pre-LayerNorm block) differ from it:
- `norm_placement`: "pre" (x = x + attn(ln(x))) or "input" (the block normalises its input and keeps
  the normalised stream: x = ln(x); x = x + attn(x); x = x + mlp(ln(x)), as in Power et al.'s
  and the Grokfast reference code);
- `init_std`: normal(0, std) weights (GPT-2) or null for PyTorch's default initialisation, with the
  attention projections initialised as nn.MultiheadAttention does (Xavier-uniform, zero biases);
- `head_bias`, and `num_classes` (null: one logit per vocabulary token, as the reference's head).
"""

from __future__ import annotations

import torch
from torch import nn

from models.components.attention import CausalSelfAttention


NORM_PLACEMENTS = ("pre", "input")


class Block(nn.Module):
    """x = x + attn(ln(x)) ("pre") or x = ln(x); x = x + attn(x) ("input"); then x = x + mlp(ln(x))."""

    def __init__(self, width: int, num_heads: int, dropout: float, norm_placement: str = "pre") -> None:
        super().__init__()
        self.norm_placement = norm_placement
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, num_heads, dropout)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width),
            nn.GELU(),
            nn.Linear(4 * width, width),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_placement == "input":
            x = self.ln1(x)
            x = x + self.attn(x)
        else:
            x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class DecoderTransformer(nn.Module):
    """Causal transformer that classifies the token sequence from its last position.

    ``forward(batch)`` reads ``batch["inputs"]`` (Long[B, T], T <= seq_len) and returns
    ``{"logits": Float[B, num_classes]}`` taken at the last position (the answer follows "=").
    """

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        num_classes: int | None = None,
        width: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        dropout: float = 0.0,
        init_std: float | None = 0.02,
        norm_placement: str = "pre",
        head_bias: bool = True,
    ) -> None:
        super().__init__()
        for name, value in {"vocab_size": vocab_size, "seq_len": seq_len, "width": width,
                            "num_layers": num_layers, "num_heads": num_heads}.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if width % num_heads != 0:
            raise ValueError(
                f"width ({width}) must be divisible by num_heads ({num_heads}); "
                f"e.g. width={num_heads * max(1, width // num_heads)} or num_heads=1"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if norm_placement not in NORM_PLACEMENTS:
            raise ValueError(f"norm_placement must be one of {NORM_PLACEMENTS}, got {norm_placement!r}")
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.num_classes = vocab_size if num_classes is None else num_classes

        self.tok_emb = nn.Embedding(vocab_size, width)
        self.pos_emb = nn.Embedding(seq_len, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, num_heads, dropout, norm_placement) for _ in range(num_layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, self.num_classes, bias=head_bias)
        if init_std is not None:
            self._init_weights(num_layers, init_std)
        else:
            self._init_attention_like_torch()

    def _init_weights(self, num_layers: int, std: float) -> None:
        # GPT-2 style; draws only from the global RNG, so torch.manual_seed makes it reproducible.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        # Scale residual-branch outputs so the residual stream's variance doesn't grow with depth.
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(proj.weight, mean=0.0, std=std / (2 * num_layers) ** 0.5)

    def _init_attention_like_torch(self) -> None:
        # nn.MultiheadAttention's own initialisation of its packed projection (the reference model uses it).
        for block in self.blocks:
            nn.init.xavier_uniform_(block.attn.qkv.weight)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.zeros_(block.attn.proj.bias)

    def hidden_states(self, inputs: torch.Tensor) -> torch.Tensor:
        """Final (post-LayerNorm) hidden states for every position: Float[B, T, width]."""
        if inputs.ndim != 2:
            raise ValueError(f"inputs must be [batch, seq] token ids, got shape {list(inputs.shape)}")
        t = inputs.shape[1]
        if not 1 <= t <= self.seq_len:
            raise ValueError(f"sequence length {t} must be in 1..seq_len={self.seq_len}")
        positions = torch.arange(t, device=inputs.device)
        x = self.drop(self.tok_emb(inputs) + self.pos_emb(positions))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def forward(self, batch: dict[str, torch.Tensor], carry: object = None) -> dict[str, torch.Tensor]:
        # No carried state: carry is accepted for interface compatibility and ignored.
        h = self.hidden_states(batch["inputs"])
        return {"logits": self.head(h[:, -1])}
