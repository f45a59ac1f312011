"""The LPL objective's terms for CompositeLoss: logged, never back-propagated (LPL learns with its local rule).

The model computes each layer's predictive, Hebbian and decorrelation losses (models/lpl/rule.py) and
returns their sums over layers in outputs["lpl_terms"]; each term here reads one of them. The configured
weights are the rule's learning rates (conf/loss/lpl.yaml), so the weighted total `loss` is the objective
whose negative gradient the rule follows with SGD at lr 1.
"""

from __future__ import annotations

import torch
from torch import nn

from models.lpl.rule import TERMS


class LPLTerm(nn.Module):
    def __init__(self, term: str, weight: float = 1.0) -> None:
        super().__init__()
        if term not in TERMS:
            raise ValueError(f"LPLTerm: term must be one of {', '.join(TERMS)}, got {term!r}")
        self.term, self.weight = term, weight

    def forward(self, outputs: dict[str, dict[str, torch.Tensor]], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return outputs["lpl_terms"][self.term]
