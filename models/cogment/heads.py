"""Cogment's input and output heads and its task adapters.

* input: token embedding (one vocabulary for every stage, dataset/cogment/vocabulary.py) plus a learned
  embedding of the task type, so one network knows whether it reads a maze, a ListOps expression or a
  story;
* task adapters: one bottleneck MLP per task family (grid, sequence, text) on the prediction state
  before the output projection, each starting as the identity (zero-initialised up-projection);
* output: a linear projection of the (normalised, adapted) prediction state to token logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.components.initialization import trunc_normal_
from models.components.norms import rms_norm


class TaskAdapters(nn.Module):
    """One bottleneck adapter per task family, ``x + up_f(silu(down_f(x)))`` (Houlsby et al. 2019) with ``up``
    zero-initialised; the weights of all families are stacked, so each row runs only its own adapter."""

    def __init__(self, num_families: int, width: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Parameter(trunc_normal_(torch.empty(num_families, width, rank), std=1.0 / math.sqrt(width)))
        self.up = nn.Parameter(torch.zeros(num_families, rank, width))

    def forward(self, x: torch.Tensor, family: torch.Tensor) -> torch.Tensor:
        """``x`` [B, L, D], ``family`` [B] -> the adapters' change [B, L, D]."""
        down, up = self.down[family].to(x.dtype), self.up[family].to(x.dtype)
        return torch.bmm(F.silu(torch.bmm(x, down)), up)


class CogmentHeads(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, num_task_types: int, task_families: list[int],
                 adapter_rank: int) -> None:
        super().__init__()
        if len(task_families) != num_task_types:
            raise ValueError(f"task_families has {len(task_families)} entries for {num_task_types} task types")
        self.embed_scale = math.sqrt(hidden_size)
        self.token_embedding = nn.Embedding(vocab_size, hidden_size)
        trunc_normal_(self.token_embedding.weight, std=1.0 / self.embed_scale)
        self.task_embedding = nn.Embedding(num_task_types, hidden_size)
        trunc_normal_(self.task_embedding.weight, std=1.0 / self.embed_scale)
        self.adapters = TaskAdapters(max(task_families) + 1, hidden_size, adapter_rank)
        self.output = nn.Linear(hidden_size, vocab_size, bias=False)
        self.register_buffer("family_of_task", torch.tensor(task_families, dtype=torch.long), persistent=False)

    def embed(self, inputs: torch.Tensor, task_type: torch.Tensor) -> torch.Tensor:
        """[B, L] ids and [B] task types -> [B, L, D]."""
        return self.embed_scale * (self.token_embedding(inputs) + self.task_embedding(task_type).unsqueeze(1))

    def logits(self, state: torch.Tensor, task_type: torch.Tensor) -> torch.Tensor:
        """Prediction state [B, L, D] -> logits [B, L, V], through each row's family adapter."""
        h = rms_norm(state)
        return self.output(h + self.adapters(h, self.family_of_task[task_type]))
