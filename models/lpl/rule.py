"""The Latent Predictive Learning rule of one layer (Halvagal & Zenke, Nature Neuroscience 2023).

A layer computes a = W x and z = f(a). Its layer-local objective over a minibatch of B pairs of
temporally adjacent inputs (x(t - dt), x(t)) has three terms, each averaged over the M units:

    predictive     L_pred   = 1/(2MB) sum_b sum_i (z_i^b(t) - SG[z_i^b(t - dt)])^2
    Hebbian        L_hebb   = -1/M sum_i log(sigma_i^2 + eps),  sigma_i^2 = 1/(B-1) sum_b (z_i^b - zbar_i)^2
    decorrelation  L_decorr = 1/(M^2 - M) sum_i sum_{k != i} C_ik^2,
                   C_ik = 1/(B-1) sum_b (z_i^b - zbar_i)(z_k^b - zbar_k)

(SG: no gradient flows into the previous output, it is the target.) The update is the negative
gradient of each term, written in the local form of the paper's Eq. (7) as corrected by the authors'
erratum (the published Eq. (6)/(7) squared each product inside the batch sum; the erratum squares the
covariance itself, so the stabilisation term is a sum over the other units' activity weighted by the
covariance C_ik):

    dW_ij = 1/(MB) sum_b ( -(z_i^b - z_i^b(t - dt))                                    predictive
                           + alpha / (sigma_i^2 + eps) (z_i^b - zbar_i)                 Hebbian
                           - beta sum_{k != i} (z_k^b - zbar_k) C_ik ) f'(a_i^b) x_j^b   decorrelation

with alpha = 2B/(B-1) and beta = 4B/((B-1)(M-1)), the constants that make each term exactly the
negative gradient of its loss above (the erratum's dL_decorr/dW has the factor 4/((B-1)(M^2-M))).
Each term keeps its own learning rate (the seed's lr_pred, lr_hebb, lr_stab, i.e. eta, eta*lambda_1,
eta*lambda_2 of the paper), and the paper's weight decay -eta*eta_w*W is the optimizer's weight_decay.

The rule is written out by hand rather than through autograd because it *is* the model: every factor is
local to a synapse (presynaptic x_j, postsynaptic z_i and f'(a_i), and the unit's running statistics),
and tests check each term against the autograd gradient of its loss and against numbers worked by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TERMS = ("predictive", "hebbian", "decorrelation")


def squash(pre_activation: torch.Tensor, scale: float) -> torch.Tensor:
    """f(a) = scale * tanh(a / scale): the identity for |a| << scale, bounded by +-scale (the seed's tanh(a/5)*5)."""
    return scale * torch.tanh(pre_activation / scale)


def squash_slope(pre_activation: torch.Tensor, scale: float) -> torch.Tensor:
    """f'(a) = 1 - tanh(a / scale)^2."""
    return 1.0 - torch.tanh(pre_activation / scale) ** 2


@dataclass
class LayerStatistics:
    """What the rule needs of one layer's outputs at time t (rows: batch, columns: units)."""

    centered: torch.Tensor  # z - zbar, (B, M)
    variance: torch.Tensor  # sigma^2 per unit, (M,)
    covariance: torch.Tensor  # C with its diagonal set to zero, (M, M)

    @classmethod
    def of(cls, outputs: torch.Tensor) -> "LayerStatistics":
        batch = outputs.shape[0]
        if batch < 2:
            raise ValueError("the LPL rule estimates variances over the batch: it needs at least 2 pairs per batch")
        centered = outputs - outputs.mean(dim=0, keepdim=True)
        covariance = centered.T @ centered / (batch - 1)
        variance = torch.diagonal(covariance).clone()
        covariance.fill_diagonal_(0.0)
        return cls(centered, variance, covariance)


def lpl_losses(outputs: torch.Tensor, previous_outputs: torch.Tensor, epsilon: float) -> dict[str, torch.Tensor]:
    """The three layer-local losses (for logging, and for tests against the closed-form update)."""
    batch, units = outputs.shape
    stats = LayerStatistics.of(outputs)
    predictive = ((outputs - previous_outputs) ** 2).sum() / (2 * units * batch)
    hebbian = -torch.log(stats.variance + epsilon).mean()
    if units > 1:
        decorrelation = (stats.covariance**2).sum() / (units**2 - units)
    else:  # a single unit has nothing to decorrelate from
        decorrelation = torch.zeros((), dtype=outputs.dtype, device=outputs.device)
    return {"predictive": predictive, "hebbian": hebbian, "decorrelation": decorrelation}


def lpl_error_signals(outputs: torch.Tensor, previous_outputs: torch.Tensor, epsilon: float) -> dict[str, torch.Tensor]:
    """Per term, the postsynaptic factor of the update, (B, M): the bracket of Eq. (7) times 1/(MB).

    dW_term = (signal * f'(a))^T x; each signal is minus the derivative of its loss with respect to z
    (the batch mean zbar is treated as a constant, as in the paper: its derivative sums to zero anyway).
    """
    batch, units = outputs.shape
    stats = LayerStatistics.of(outputs)
    norm = 1.0 / (units * batch)
    alpha = 2.0 * batch / (batch - 1)
    predictive = -norm * (outputs - previous_outputs)
    hebbian = norm * alpha * stats.centered / (stats.variance + epsilon)
    if units > 1:
        beta = 4.0 * batch / ((batch - 1) * (units - 1))
        decorrelation = -norm * beta * stats.centered @ stats.covariance  # (b, i): sum_k (z_k - zbar_k) C_ik
    else:
        decorrelation = torch.zeros_like(outputs)
    return {"predictive": predictive, "hebbian": hebbian, "decorrelation": decorrelation}


def lpl_weight_updates(
    inputs: torch.Tensor,
    pre_activations: torch.Tensor,
    outputs: torch.Tensor,
    previous_outputs: torch.Tensor,
    squash_scale: float | None,
    epsilon: float,
) -> dict[str, torch.Tensor]:
    """Per term, the ascent direction dW (M, D) of Eq. (7) for inputs x (B, D) at time t.

    `squash_scale=None`: a linear unit (f' = 1), as in the paper's toy model.
    """
    slope = torch.ones_like(pre_activations) if squash_scale is None else squash_slope(pre_activations, squash_scale)
    signals = lpl_error_signals(outputs, previous_outputs, epsilon)
    return {name: (signal * slope).T @ inputs for name, signal in signals.items()}
