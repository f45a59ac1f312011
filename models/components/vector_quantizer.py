"""Vector quantization with a straight-through estimator and optional EMA codebooks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass
class VQOutput:
    """What ``VectorQuantizer.forward`` returns."""

    quantized: torch.Tensor  # straight-through: forward = codes' vectors, backward = identity to the input
    codes: torch.Tensor  # Long, the input's shape without the last dim
    loss: torch.Tensor  # codebook_loss + beta * commitment_loss
    commitment_loss: torch.Tensor
    codebook_loss: torch.Tensor
    perplexity: torch.Tensor  # exp(entropy of the batch's code histogram)
    usage: torch.Tensor  # fraction of codes used in the batch


class VectorQuantizer(nn.Module):
    """Nearest-code vector quantization with a straight-through estimator (van den Oord et al. 2017).

    ``quantized = z + sg(e_k - z)`` with ``k = argmin_j |z - e_j|``: the forward value is the code, the
    gradient w.r.t. the input equals the gradient w.r.t. the quantized output. Losses: the commitment
    term ``|z - sg(e_k)|^2`` (weighted by ``beta``) and, unless ``ema``, the codebook term
    ``|sg(z) - e_k|^2``. With ``ema`` the codebook is a buffer moved by exponential moving averages of
    the assigned inputs instead (Razavi et al. 2019): ``N_k <- d N_k + (1-d) n_k``, ``m_k <- d m_k + (1-d)
    sum(z assigned to k)``, ``e_k = m_k / N_k``. ``N`` starts at 1 and ``m`` at the initial codes, so an
    unused code stays where it is (its ratio is unchanged by the decay).

    Against codebook collapse (every input on one code, measured: usage 1/64 after 40 steps without
    these): with ``data_init`` the first training batch initialises the codebook from its own inputs,
    and a code whose EMA count ``N_k`` (tracked in both modes) falls below ``dead_code_threshold`` is
    restarted on a random input of the batch (Jukebox's "random restarts"; 0 disables). Updates happen in
    training forwards with ``update=True`` only. Under torch.distributed counts and sums are
    all-reduced and new codes broadcast from rank 0, so every rank keeps the same codebook.
    """

    def __init__(self, dim: int, codebook_size: int, beta: float = 0.25, ema: bool = True, decay: float = 0.99,
                 dead_code_threshold: float = 0.1, data_init: bool = True, eps: float = 1e-5) -> None:
        super().__init__()
        if codebook_size < 2:
            raise ValueError(f"model.vq_codebook_size must be >= 2, got {codebook_size}")
        if dim < 1:
            raise ValueError(f"model.vq_dim must be >= 1, got {dim}")
        if beta < 0:
            raise ValueError(f"model.vq_beta must be >= 0, got {beta}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"model.vq_decay must be in [0, 1), got {decay}")
        if dead_code_threshold < 0:
            raise ValueError(f"model.vq_dead_code_threshold must be >= 0, got {dead_code_threshold}")
        self.dim, self.codebook_size, self.beta, self.ema, self.decay, self.eps = dim, codebook_size, beta, ema, decay, eps
        self.dead_code_threshold = dead_code_threshold
        init = torch.randn(codebook_size, dim)
        if ema:
            self.register_buffer("codebook", init)
            self.register_buffer("embed_sum", init.clone())
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("cluster_size", torch.ones(codebook_size))  # EMA of the per-step code counts
        self.register_buffer("initialized", torch.tensor(not data_init))

    def forward(self, z: torch.Tensor, update: bool = True) -> VQOutput:
        """Quantize ``z`` [..., dim]; ``update`` (training only) lets the codebook move (EMA, restarts, data init)."""
        flat = z.reshape(-1, self.dim).float()
        updating = update and self.training
        if updating and not bool(self.initialized):
            self._set_codes(torch.arange(self.codebook_size, device=flat.device), self._random_inputs(flat.detach(), self.codebook_size))
            self.initialized.fill_(True)
        codebook = self.codebook.float()
        distances = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1).unsqueeze(0)
        codes = distances.argmin(dim=1)
        chosen = F.embedding(codes, codebook)
        commitment = F.mse_loss(flat, chosen.detach())
        codebook_loss = F.mse_loss(chosen, flat.detach()) if not self.ema else flat.new_zeros(())
        quantized = flat + (chosen - flat).detach()
        with torch.no_grad():
            counts = torch.bincount(codes, minlength=self.codebook_size).float()
            probs = counts / counts.sum().clamp(min=1)
            perplexity = torch.exp(-(probs * torch.log(probs.clamp(min=1e-10))).sum())
            usage = (counts > 0).float().mean()
        if updating:
            self._update(flat.detach(), codes, counts)
        return VQOutput(
            quantized=quantized.view(z.shape).to(z.dtype),
            codes=codes.view(z.shape[:-1]),
            loss=codebook_loss + self.beta * commitment,
            commitment_loss=commitment,
            codebook_loss=codebook_loss,
            perplexity=perplexity,
            usage=usage,
        )

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        counts = counts.clone()
        if distributed:
            dist.all_reduce(counts)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        if self.ema:
            sums = torch.zeros_like(self.embed_sum).index_add_(0, codes, flat)
            if distributed:
                dist.all_reduce(sums)
            self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            alive = (self.cluster_size > self.eps).unsqueeze(1)
            self.codebook.copy_(torch.where(alive, self.embed_sum / self.cluster_size.clamp(min=self.eps).unsqueeze(1), self.codebook))
        if self.dead_code_threshold > 0:
            dead = (self.cluster_size < self.dead_code_threshold).nonzero().squeeze(1)  # same on every rank
            if dead.numel():
                self._set_codes(dead, self._random_inputs(flat, dead.numel()))

    def _random_inputs(self, flat: torch.Tensor, count: int) -> torch.Tensor:
        """``count`` inputs drawn at random (with replacement; tiny noise separates duplicates), rank 0's under DDP."""
        picked = flat[torch.randint(0, flat.shape[0], (count,), device=flat.device)]
        picked = picked + 1e-3 * torch.randn_like(picked)
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(picked, src=0)
        return picked

    @torch.no_grad()
    def _set_codes(self, index: torch.Tensor, vectors: torch.Tensor) -> None:
        self.codebook[index] = vectors.to(self.codebook.dtype)
        self.cluster_size[index] = 1.0  # the pseudo-count a fresh code starts with
        if self.ema:
            self.embed_sum[index] = vectors.to(self.embed_sum.dtype)
