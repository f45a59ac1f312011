"""A linear layer that learns the principal subspace of its input with a local Hebbian rule.

y = W x. Sanger's generalized Hebbian algorithm (Oja's rule for one unit, Oja 1982; Sanger 1989):

    dW = E[y x^T] - lower_triangle(E[y y^T]) W

drives the rows of W to the leading eigenvectors of the input covariance, in order, with unit norm.
There is no loss to back-propagate: the rule is local (each weight sees only its input and output).
The model is a `LocalLearner` (utils/contract.py): it writes -dW into `weight.grad`, and the configured
optimizer (`optim=sgd`, lr = the rule's learning rate) applies it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class OjaNetwork(nn.Module):
    def __init__(self, input_dim: int, num_components: int = 1, init_std: float = 0.1) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_components, input_dim) * init_std)

    def forward(self, batch: dict[str, torch.Tensor], carry: Any = None) -> dict[str, torch.Tensor]:
        y = batch["x"] @ self.weight.T
        return {"y": y, "reconstruction": y @ self.weight}

    def local_update(self, batch: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        x, y = batch["x"], outputs["y"]
        hebbian = y.T @ x / len(x)  # E[y x^T]
        decay = torch.tril(y.T @ y / len(x)) @ self.weight  # keeps the rows unit-norm and decorrelated
        self.weight.grad = -(hebbian - decay)  # a descent direction: SGD adds lr * dW
