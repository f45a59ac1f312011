"""Normalisation without parameters, as TRM/HRM use it between every residual update."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Parameter-free RMSNorm over the last dim, computed in float32 (bf16 sums lose precision) and cast back."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)
