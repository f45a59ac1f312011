"""The vision front end of the multimodal TRM: an image -> a fixed number of capsule vectors."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.components.initialization import trunc_normal_
from models.components.mlp import SwiGLU
from models.components.norms import rms_norm


def _sincos_2d(height: int, width: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings [height*width, dim] (MAE/ViT style): parameter-free, so
    the encoder works for any image size."""
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / max(quarter, 1)))
    ys = torch.arange(height, device=device, dtype=torch.float32)
    xs = torch.arange(width, device=device, dtype=torch.float32)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    out_y = grid_y.reshape(-1, 1) * omega
    out_x = grid_x.reshape(-1, 1) * omega
    emb = torch.cat([out_y.sin(), out_y.cos(), out_x.sin(), out_x.cos()], dim=1)
    return F.pad(emb, (0, dim - emb.shape[1])).to(dtype)


class CapsuleEncoder(nn.Module):
    """Image -> ``num_capsules`` capsule vectors [B, N, capsule_dim].

    A conv stem (3x3 convs, stride 2, GroupNorm + GELU; each stage halves H and W) makes a feature map;
    every location becomes a ``capsule_dim`` vector with a fixed 2-D sine-cosine position code. Then
    ``routing_iters`` rounds of *routing by competition*: learned capsule queries attend over the
    locations with the softmax taken over the capsules (each location is shared out among the
    capsules that agree with it, as in dynamic routing / slot attention), each capsule takes the
    weighted mean of the locations it won, and is refined by a residual MLP.

    Why this and not Sabour et al.'s dynamic routing: dynamic routing needs a learned transform per
    (primary capsule, output capsule) pair -- parameters and memory grow with the feature-map size --
    and its iterations are hard to batch; the competition softmax keeps the routing idea (capsules
    compete for parts) with one batched matmul per iteration, linear in the number of locations, and
    learned (not sampled) queries keep the capsule order fixed, so capsule i means the same thing for
    every image (the reasoning model gives each capsule its own position).
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: Sequence[int] = (64, 256),
        num_capsules: int = 12,
        capsule_dim: int = 256,
        channels: Sequence[int] = (32, 64, 128),
        routing_iters: int = 3,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        image_size = tuple(int(s) for s in image_size)
        if len(image_size) != 2 or min(image_size) < 1:
            raise ValueError(f"model.image_size must be [H, W] with positive sizes, got {list(image_size)}")
        if not channels or min(channels) < 1:
            raise ValueError(f"model.encoder_channels must be a non-empty list of positive widths, got {list(channels)}")
        if num_capsules < 1:
            raise ValueError(f"model.num_capsules must be >= 1, got {num_capsules}")
        if capsule_dim < 4 or capsule_dim % 4:
            raise ValueError(f"model.capsule_dim must be a positive multiple of 4 (2-D position codes), got {capsule_dim}")
        if routing_iters < 1:
            raise ValueError(f"model.encoder_routing_iters must be >= 1, got {routing_iters}")
        self.in_channels, self.image_size = in_channels, image_size
        self.num_capsules, self.capsule_dim, self.routing_iters = num_capsules, capsule_dim, routing_iters

        stages: list[nn.Module] = []
        width = in_channels
        for out in channels:
            stages += [nn.Conv2d(width, out, 3, stride=2, padding=1), nn.GroupNorm(math.gcd(8, out), out), nn.GELU()]
            width = out
        self.stem = nn.Sequential(*stages)
        self.to_features = nn.Conv2d(width, capsule_dim, 1)
        self.queries = nn.Parameter(trunc_normal_(torch.empty(num_capsules, capsule_dim), std=1.0))
        self.to_q = nn.Linear(capsule_dim, capsule_dim, bias=False)
        self.to_k = nn.Linear(capsule_dim, capsule_dim, bias=False)
        self.to_v = nn.Linear(capsule_dim, capsule_dim, bias=False)
        self.mlp = SwiGLU(capsule_dim, 2.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` float [B, C, H, W] in [0, 1] -> capsules [B, num_capsules, capsule_dim] (unit RMS)."""
        feats = self.to_features(self.stem(images))
        batch, dim, height, width = feats.shape
        feats = feats.flatten(2).transpose(1, 2)  # [B, locations, D]
        feats = rms_norm(feats + _sincos_2d(height, width, dim, feats.device, feats.dtype))
        keys, values = self.to_k(feats), self.to_v(feats)
        capsules = self.queries.to(feats.dtype).expand(batch, -1, -1)
        for _ in range(self.routing_iters):
            logits = self.to_q(rms_norm(capsules)) @ keys.transpose(1, 2) / math.sqrt(dim)  # [B, N, locations]
            share = logits.float().softmax(dim=1)  # capsules compete for every location
            share = share / (share.sum(dim=-1, keepdim=True) + 1e-6)  # weighted mean over what each capsule won
            capsules = capsules + share.to(values.dtype) @ values
            capsules = capsules + self.mlp(rms_norm(capsules))
        return rms_norm(capsules)
