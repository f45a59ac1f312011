"""Latent planning of the multimodal TRM: COCONUT-style continuous thoughts over the reasoning state."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.components.initialization import trunc_normal_
from models.components.norms import rms_norm
from models.components.reasoning_net import ReasoningNet


class LatentPlanner(nn.Module):
    """COCONUT-style continuous thoughts (Hao et al. 2024, "Training LLMs to reason in a continuous latent space").

    From the reasoning state h [B, L, D], ``num_paths`` paths run in parallel (batched as B*P rows).
    Path p starts from a thought ``norm(mean(h) + path_embedding[p])`` (distinct starting points) and
    takes ``depth`` steps: the planning net reads ``[h ; thoughts so far]`` and its last hidden state
    becomes the next thought -- fed back directly as the next input embedding, no token is sampled.
    After the last step, the net's output at h's positions is the path's refined state; a learned head
    scores each path from its final thought, and the softmax-weighted sum of the paths' states is
    what the output head reads. Returns ``(state [B, L, D], path weights [B, P])``.
    """

    def __init__(self, hidden_size: int, num_paths: int, depth: int, num_layers: int, block: dict[str, Any]) -> None:
        super().__init__()
        for name, value in (("latent_num_paths", num_paths), ("latent_planning_depth", depth), ("latent_planning_layers", num_layers)):
            if value < 1:
                raise ValueError(f"model.{name} must be >= 1 when model.enable_latent_planning=true, got {value}")
        self.num_paths, self.depth = num_paths, depth
        self.net = ReasoningNet(num_layers, **block)
        self.path_embed = nn.Parameter(trunc_normal_(torch.empty(num_paths, hidden_size), std=1.0))
        self.score = nn.Linear(hidden_size, 1)
        self.gradient_checkpointing = False

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length, width = h.shape
        paths = self.num_paths
        context = h.unsqueeze(1).expand(batch, paths, length, width).reshape(batch * paths, length, width)
        start = h.mean(dim=1, keepdim=True).unsqueeze(1) + self.path_embed.to(h.dtype).view(1, paths, 1, width)
        thoughts = [rms_norm(start.reshape(batch * paths, 1, width))]
        out = context
        for _ in range(self.depth):
            out = self.net(torch.cat([context, *thoughts], dim=1), checkpointing=self.gradient_checkpointing)
            thoughts.append(out[:, -1:])  # the last hidden state is the next input embedding
        states = out[:, :length].reshape(batch, paths, length, width)
        scores = self.score(out[:, -1]).float().view(batch, paths)
        weights = scores.softmax(dim=-1)
        combined = (weights.to(states.dtype).view(batch, paths, 1, 1) * states).sum(dim=1)
        return rms_norm(combined), weights
