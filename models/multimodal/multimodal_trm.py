"""Multimodal TRM: images -> capsules -> recursive reasoning -> latent planning -> byte-level tokens.

The model of the "vision-unified" setting: every task (an ARC grid, a text or a code context) arrives
as a grayscale image; a capsule encoder turns it into ``num_capsules`` vectors, and a TRM
(``models.reasoning.recursive_reasoning``: one small ``ReasoningNet`` applied recursively, ``H_cycles`` x
(``L_cycles`` updates of the reasoning latent z_L + one update of the answer latent z_H), gradients
through the last cycle only) reasons over the sequence ``[capsules ; target_len output slots]``. The
output slots (learned position embeddings) are read out in parallel (non-autoregressive, like TRM on
grids) as byte-level tokens: PAD=0, EOS=1, byte b -> b + 2 (vocab 258).

Pipeline of one forward (every stage after the reasoning is a config switch)::

    images uint8 [B,1,H,W] --CapsuleEncoder--> capsules [B,N,Dc]     (or batch["capsules"], pre-encoded)
      -> x = [norm(proj(capsules)) ; slot embeddings]  [B, N+T, D]
      -> halt_max_steps reasoning steps (TRM recursion; no grad except the last step's last cycle)
      -> memory read            (enable_memory)           key-value bank, attention from every position
      -> latent planning        (enable_latent_planning)  COCONUT-style continuous thoughts, P paths
      -> output slots [B,T,D]
      -> vector quantization    (use_vq_codebook)         discrete code per output slot, straight-through
      -> lm_head -> logits [B,T,V];  MTP heads (enable_mtp) -> mtp_logits [B,K,T,V]
    DQN halting (enable_dqn): a Q-network over the pooled state of each step decides when to stop (eval).

Batch: ``images`` uint8 [B, C, H, W] (or float in [0, 1]) or ``capsules`` float [B, N, Dc] (used when
present); ``target`` Long [B, T] (-100 = ignored; T <= target_len); ``source`` Long [B] (not used here).

Outputs: ``logits`` [B, T, V]; ``steps`` Long[B] (reasoning steps each row ran); ``mtp_logits``
[B, K, T, V] (MTP); ``vq_loss`` scalar and ``vq_codes`` Long[B, T] (VQ); ``plan_weights`` [B, P]
(planning); ``dqn_loss`` scalar (DQN, training only); ``q_values`` [B, 2] (DQN: Q(continue), Q(halt) at
the step each row stopped); ``metrics`` (scalar tensors: ``vq/perplexity``, ``vq/usage``,
``plan/path_entropy``, ``dqn/*``, ``act/steps``). A feature switched off leaves its keys out, so its loss
term (losses/multimodal.py) reads as an exact zero. No ``carry``: each forward starts from fresh latents.

ACT / DQN design (the simplest correct one): one forward runs ``halt_max_steps`` reasoning steps.
Training always runs all of them (no grad except the last; the loss reads the last step) and, with the
DQN on, reads the answer out at every step (no grad) to build transitions; evaluation runs the steps
until the DQN's greedy policy halts a row (that row's latents are then frozen), or all are done.
See ``HaltingDQN`` for states, actions, rewards and the TD loss.

Why these choices are documented per class below: ``CapsuleEncoder`` (routing), ``KeyValueMemory``
(reads, optional EMA writes), ``LatentPlanner`` (COCONUT), ``VectorQuantizer`` (placement and EMA),
``HaltingDQN``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from losses.reasoning import IGNORE_INDEX, rows_correct
from models.reasoning.recursive_reasoning import (
    ReasoningNet,
    RotaryEmbedding,
    SwiGLU,
    _rms_norm,
    _trunc_normal_,
)
from models.components.replay_buffer import ReplayBuffer

ENCODERS = ("conv", "none")
DQN_REWARDS = ("exact", "token_accuracy")
BUFFER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CONTINUE, HALT = 0, 1  # DQN actions (column order of the Q-values)


def _run_layers(net: ReasoningNet, state: torch.Tensor, injection: torch.Tensor | None, checkpointing: bool) -> torch.Tensor:
    """``ReasoningNet.forward`` with optional activation checkpointing per block.

    Same arithmetic as ``net(state, injection)``; with ``checkpointing`` and grad enabled each block's
    activations are recomputed in backward instead of stored (use_reentrant=False: works with inputs
    that do not require grad and with nested no_grad regions).
    """
    x = state if injection is None else state + injection
    use_checkpoint = checkpointing and torch.is_grad_enabled()
    for layer in net.layers:
        x = checkpoint(layer, x, use_reentrant=False) if use_checkpoint else layer(x)
    return x


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


# ====================================================================================== vision
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
        self.queries = nn.Parameter(_trunc_normal_(torch.empty(num_capsules, capsule_dim), std=1.0))
        self.to_q = nn.Linear(capsule_dim, capsule_dim, bias=False)
        self.to_k = nn.Linear(capsule_dim, capsule_dim, bias=False)
        self.to_v = nn.Linear(capsule_dim, capsule_dim, bias=False)
        self.mlp = SwiGLU(capsule_dim, 2.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` float [B, C, H, W] in [0, 1] -> capsules [B, num_capsules, capsule_dim] (unit RMS)."""
        feats = self.to_features(self.stem(images))
        batch, dim, height, width = feats.shape
        feats = feats.flatten(2).transpose(1, 2)  # [B, locations, D]
        feats = _rms_norm(feats + _sincos_2d(height, width, dim, feats.device, feats.dtype))
        keys, values = self.to_k(feats), self.to_v(feats)
        capsules = self.queries.to(feats.dtype).expand(batch, -1, -1)
        for _ in range(self.routing_iters):
            logits = self.to_q(_rms_norm(capsules)) @ keys.transpose(1, 2) / math.sqrt(dim)  # [B, N, locations]
            share = logits.float().softmax(dim=1)  # capsules compete for every location
            share = share / (share.sum(dim=-1, keepdim=True) + 1e-6)  # weighted mean over what each capsule won
            capsules = capsules + share.to(values.dtype) @ values
            capsules = capsules + self.mlp(_rms_norm(capsules))
        return _rms_norm(capsules)


# ====================================================================================== memory
class KeyValueMemory(nn.Module):
    """A learned key-value memory bank read by multi-head attention from every position of the state.

    ``state <- norm(state + out(attend(q(state), keys, values [+ written])))``. Keys and values are
    parameters (slow, learned by backprop: facts shared across tasks). With ``write_decay`` set, a
    ``written`` buffer (zero at start, checkpointed with the weights) adds an EMA of the states that
    addressed each slot: after every training forward, slot m moves towards the mean of the detached
    states weighted by their (full-width, single-head) addressing softmax over the slots -- a fast,
    cross-batch cache of recent reasoning states, not trained by backprop. Under DDP the buffer is
    broadcast from rank 0 at each forward, so ranks stay consistent.
    """

    def __init__(self, hidden_size: int, slots: int, num_heads: int, write_decay: float | None = None) -> None:
        super().__init__()
        if slots < 1:
            raise ValueError(f"model.memory_slots must be >= 1, got {slots}")
        if write_decay is not None and not 0.0 <= write_decay < 1.0:
            raise ValueError(f"model.memory_write_decay must be in [0, 1) or null, got {write_decay}")
        self.num_heads, self.write_decay = num_heads, write_decay
        self.keys = nn.Parameter(_trunc_normal_(torch.empty(slots, hidden_size), std=1.0))
        self.values = nn.Parameter(_trunc_normal_(torch.empty(slots, hidden_size), std=1.0))
        self.query = nn.Linear(hidden_size, hidden_size, bias=False)
        self.out = nn.Linear(hidden_size, hidden_size, bias=False)
        if write_decay is not None:
            self.register_buffer("written", torch.zeros(slots, hidden_size))
        else:
            self.written = None

    def forward(self, state: torch.Tensor, write: bool = False) -> torch.Tensor:
        batch, seq, width = state.shape
        heads, head_dim = self.num_heads, width // self.num_heads
        q = self.query(state)
        values = self.values if self.written is None else self.values + self.written
        k = self.keys.to(q.dtype).view(1, -1, heads, head_dim).transpose(1, 2)
        v = values.to(q.dtype).view(1, -1, heads, head_dim).transpose(1, 2)
        q_heads = q.view(batch, seq, heads, head_dim).transpose(1, 2)
        read = F.scaled_dot_product_attention(q_heads, k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1))
        out = _rms_norm(state + self.out(read.transpose(1, 2).reshape(batch, seq, width)))
        if write and self.written is not None:
            self._write(q.detach(), state.detach())
        return out

    @torch.no_grad()
    def _write(self, q: torch.Tensor, state: torch.Tensor) -> None:
        address = (q.float().flatten(0, 1) @ self.keys.float().t() / math.sqrt(q.shape[-1])).softmax(dim=-1)  # [BL, M]
        mass = address.sum(dim=0)  # [M]
        total = address.t() @ state.float().flatten(0, 1)  # [M, D]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(mass)
            dist.all_reduce(total)
        mean = total / mass.clamp(min=1e-6).unsqueeze(1)
        updated = self.written * self.write_decay + mean * (1.0 - self.write_decay)
        self.written.copy_(torch.where((mass > 1e-6).unsqueeze(1), updated, self.written))


# ====================================================================================== planning
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
        self.path_embed = nn.Parameter(_trunc_normal_(torch.empty(num_paths, hidden_size), std=1.0))
        self.score = nn.Linear(hidden_size, 1)
        self.gradient_checkpointing = False

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length, width = h.shape
        paths = self.num_paths
        context = h.unsqueeze(1).expand(batch, paths, length, width).reshape(batch * paths, length, width)
        start = h.mean(dim=1, keepdim=True).unsqueeze(1) + self.path_embed.to(h.dtype).view(1, paths, 1, width)
        thoughts = [_rms_norm(start.reshape(batch * paths, 1, width))]
        out = context
        for _ in range(self.depth):
            out = _run_layers(self.net, torch.cat([context, *thoughts], dim=1), None, self.gradient_checkpointing)
            thoughts.append(out[:, -1:])  # the last hidden state is the next input embedding
        states = out[:, :length].reshape(batch, paths, length, width)
        scores = self.score(out[:, -1]).float().view(batch, paths)
        weights = scores.softmax(dim=-1)
        combined = (weights.to(states.dtype).view(batch, paths, 1, 1) * states).sum(dim=1)
        return _rms_norm(combined), weights


# ====================================================================================== VQ
@dataclass
class VQOutput:
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


# ====================================================================================== DQN halting
class HaltingDQN(nn.Module):
    """A DQN that learns when to stop reasoning.

    * **State** of a row after reasoning step t: ``[P(norm(mean of z_H over the output slots)) ; t / S ;
      mean over slots of the answer's max softmax probability]`` (detached). ``P`` is the identity, or a
      fixed random Gaussian projection to ``state_dim`` (a buffer: Johnson-Lindenstrauss keeps distances)
      so that a large replay buffer stays small (hesc: 500k transitions x 66 bf16 values).
    * **Actions**: 0 = continue, 1 = halt. At the last step S only halting is possible.
    * **Rewards**: halting at step t pays ``reward(t)`` -- 1 if the answer read out at step t is exactly
      right, else 0 (``reward="exact"``), or its token accuracy (``"token_accuracy"``); it ends the
      episode. Continuing costs ``step_penalty`` and leads to the state of step t + 1.
    * **Transitions**: the forward is deterministic given the input, so one training forward that runs
      all S steps reveals the outcome of *both* actions at every step. Each row stores S halt
      transitions and S - 1 continue transitions (``2S - 1``) -- full-information, policy-independent
      experience, so no epsilon-greedy exploration is needed.
    * **Learning**: once ``warmstart`` transitions are stored, each training forward samples
      ``batch_size`` of them uniformly and returns the Huber TD loss of
      ``Q(s, a)`` against ``r + gamma * (1 - done) * V'(s')``, ``V'(s') = max_a Q_target(s', a)`` (or
      ``Q_target(s', halt)`` when s' is the last step). ``Q_target`` is a copy of the Q-network (not
      trained: requires_grad=False) refreshed every ``target_update_interval`` training forwards.
    * **Policy** (evaluation): greedy -- halt at the first step where ``Q(s, halt) >= Q(s, continue)``.
    """

    def __init__(
        self,
        hidden_size: int,
        max_steps: int,
        capacity: int,
        warmstart: int,
        batch_size: int,
        gamma: float,
        target_update_interval: int,
        step_penalty: float,
        reward: str,
        q_hidden: int,
        state_dim: int | None,
        buffer_dtype: str,
        seed: int,
    ) -> None:
        super().__init__()
        if max_steps < 2:
            raise ValueError(f"model.enable_dqn=true needs model.halt_max_steps >= 2 (something to decide), got {max_steps}")
        for name, value in (("dqn_buffer_capacity", capacity), ("dqn_batch_size", batch_size),
                            ("dqn_target_update_interval", target_update_interval), ("dqn_hidden", q_hidden)):
            if value < 1:
                raise ValueError(f"model.{name} must be >= 1, got {value}")
        if warmstart < 0:
            raise ValueError(f"model.dqn_warmstart_steps must be >= 0, got {warmstart}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"model.dqn_gamma must be in [0, 1], got {gamma}")
        if reward not in DQN_REWARDS:
            raise ValueError(f"model.dqn_reward must be one of {list(DQN_REWARDS)}, got {reward!r}")
        if buffer_dtype not in BUFFER_DTYPES:
            raise ValueError(f"model.dqn_buffer_dtype must be one of {list(BUFFER_DTYPES)}, got {buffer_dtype!r}")
        if state_dim is not None and state_dim < 1:
            raise ValueError(f"model.dqn_state_dim must be >= 1 or null, got {state_dim}")
        self.max_steps, self.warmstart, self.batch_size = max_steps, warmstart, batch_size
        self.gamma, self.target_update_interval = gamma, target_update_interval
        self.step_penalty, self.reward = step_penalty, reward
        if state_dim is not None:
            self.register_buffer("projection", torch.randn(hidden_size, state_dim) / math.sqrt(hidden_size))
        else:
            self.projection = None
        self.feature_dim = (state_dim or hidden_size) + 2
        self.q_net = nn.Sequential(nn.Linear(self.feature_dim, q_hidden), nn.SiLU(), nn.Linear(q_hidden, 2))
        self.target_net = copy.deepcopy(self.q_net).requires_grad_(False)
        dtype = BUFFER_DTYPES[buffer_dtype]
        self.buffer = ReplayBuffer(capacity, {
            "state": ((self.feature_dim,), dtype), "action": ((), torch.long), "reward": ((), torch.float32),
            "next_state": ((self.feature_dim,), dtype), "done": ((), torch.bool), "next_forced": ((), torch.bool),
        }, seed=seed)
        self.register_buffer("train_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("target_updates", torch.zeros((), dtype=torch.long))

    def features(self, slots: torch.Tensor, step: int, logits: torch.Tensor) -> torch.Tensor:
        """The DQN state [B, feature_dim] of rows whose output slots are ``slots`` after step ``step``."""
        with torch.no_grad():
            pooled = _rms_norm(slots.float().mean(dim=1))
            if self.projection is not None:
                pooled = pooled @ self.projection.float()
            step_frac = pooled.new_full((pooled.shape[0], 1), step / self.max_steps)
            confidence = logits.float().softmax(dim=-1).amax(dim=-1).mean(dim=-1, keepdim=True)
            return torch.cat([pooled, step_frac, confidence], dim=-1)

    def halt_reward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Reward [B] for halting with these answers."""
        with torch.no_grad():
            if self.reward == "exact":
                return rows_correct(logits, target).float()
            scored = target != IGNORE_INDEX
            right = ((logits.argmax(-1) == target) & scored).sum(-1).float()
            return right / scored.sum(-1).clamp(min=1).float()

    def q_values(self, features: torch.Tensor, target: bool = False) -> torch.Tensor:
        net = self.target_net if target else self.q_net
        return net(features.to(net[0].weight.dtype)).float()

    def start_training_step(self) -> None:
        """Count a training forward; refresh the target network every ``target_update_interval`` of them."""
        with torch.no_grad():
            self.train_steps.add_(1)
            if int(self.train_steps) % self.target_update_interval == 0:
                for target, online in zip(self.target_net.parameters(), self.q_net.parameters()):
                    target.copy_(online)
                self.target_updates.add_(1)

    def store(self, features: torch.Tensor, rewards: torch.Tensor) -> None:
        """Store the transitions of trajectories: ``features`` [S, B, F], halting ``rewards`` [S, B]."""
        steps, rows, width = features.shape
        device = features.device
        halt = {
            "state": features.reshape(-1, width),
            "action": torch.full((steps * rows,), HALT, dtype=torch.long, device=device),
            "reward": rewards.reshape(-1).float(),
            "next_state": torch.zeros(steps * rows, width, device=device),
            "done": torch.ones(steps * rows, dtype=torch.bool, device=device),
            "next_forced": torch.zeros(steps * rows, dtype=torch.bool, device=device),
        }
        n = (steps - 1) * rows
        next_is_last = torch.arange(1, steps, device=device).eq(steps - 1).repeat_interleave(rows)
        cont = {
            "state": features[:-1].reshape(-1, width),
            "action": torch.full((n,), CONTINUE, dtype=torch.long, device=device),
            "reward": torch.full((n,), -self.step_penalty, device=device),
            "next_state": features[1:].reshape(-1, width),
            "done": torch.zeros(n, dtype=torch.bool, device=device),
            "next_forced": next_is_last,
        }
        self.buffer.push({k: torch.cat([halt[k], cont[k]]) for k in halt})

    def td_loss(self) -> torch.Tensor:
        """Huber TD loss on a uniform sample of the buffer; a graph-connected zero while warm-starting."""
        if not self.buffer.ready(self.warmstart):
            return (sum(p.sum() for p in self.q_net.parameters()) * 0.0).abs()  # abs: no -0.0 in the logs
        sample = self.buffer.sample(self.batch_size)
        q = self.q_values(sample["state"].float()).gather(1, sample["action"].unsqueeze(1)).squeeze(1)
        with torch.no_grad():
            q_next = self.q_values(sample["next_state"].float(), target=True)
            v_next = torch.where(sample["next_forced"], q_next[:, HALT], q_next.max(dim=1).values)
            target = sample["reward"] + self.gamma * (~sample["done"]).float() * v_next
        return F.smooth_l1_loss(q, target)

    @torch.no_grad()
    def greedy_metrics(self, features: torch.Tensor, rewards: torch.Tensor) -> dict[str, torch.Tensor]:
        """Where the greedy policy would halt on these trajectories ([S, B, F], [S, B]) and what it would earn."""
        steps = features.shape[0]
        q = self.q_values(features.flatten(0, 1)).view(steps, -1, 2)
        wants = q[..., HALT] >= q[..., CONTINUE]
        wants[-1] = True
        first = wants.float().argmax(dim=0)  # index of the first step that halts
        earned = rewards.gather(0, first.unsqueeze(0)).squeeze(0) - self.step_penalty * first.float()
        return {
            "dqn/greedy_steps": (first + 1).float().mean(),
            "dqn/greedy_return": earned.mean(),
            "dqn/q_halt": q[..., HALT].mean(),
            "dqn/q_continue": q[:-1, :, CONTINUE].mean(),
            "dqn/buffer_size": self.buffer.size.float(),
        }


# ====================================================================================== the model
class MultimodalTRM(nn.Module):
    """Capsules -> TRM recursion -> [memory] -> [latent planning] -> [VQ] -> byte logits [+ MTP]; [DQN halting].

    Data facts (filled from the data module when the config leaves them unset): ``vocab_size``,
    ``target_len`` (the most output slots; a batch's ``target`` may be shorter), ``image_size`` [H, W],
    ``in_channels``, ``num_capsules``, ``capsule_dim``.

    Args (all config keys ``model.<name>``):
        encoder: ``conv`` (the trainable ``CapsuleEncoder``; batches may still bring ``capsules``, which
            are then used instead) or ``none`` (no encoder: every batch must bring pre-encoded
            ``capsules``; use this when the data builder pre-encodes, or DDP sees unused parameters).
        capsule_dim: width of the capsules (default: ``hidden_size``); must match pre-encoded ones.
        encoder_channels, encoder_routing_iters: conv stem widths (one stride-2 stage each), routing rounds.
        hidden_size, num_heads, expansion, num_layers, rope_base: the TRM network (``ReasoningNet`` of
            ``num_layers`` post-norm attention blocks with RoPE over [capsules ; slots ; thoughts]).
        H_cycles, L_cycles: recursion per reasoning step (TRM: grad through the last H cycle only).
        halt_max_steps: reasoning steps per forward (no grad except the last); the DQN may stop earlier at eval.
        enable_latent_planning, latent_num_paths, latent_planning_depth, latent_planning_layers: COCONUT
            continuous thoughts (``LatentPlanner``); its net has its own ``latent_planning_layers`` blocks.
        enable_memory, memory_slots, memory_write_decay: key-value memory (``KeyValueMemory``); a decay
            (e.g. 0.99) turns on EMA writes of recent states into a checkpointed buffer, null = read only.
        enable_dqn, dqn_*: DQN halting (``HaltingDQN``): replay ``dqn_buffer_capacity`` transitions, TD loss
            from ``dqn_warmstart_steps`` stored transitions on, minibatch ``dqn_batch_size``, discount
            ``dqn_gamma``, target network refreshed every ``dqn_target_update_interval`` training forwards,
            ``dqn_step_penalty`` per continue, ``dqn_reward`` (exact | token_accuracy), Q-MLP width
            ``dqn_hidden``, stored state width ``dqn_state_dim`` (null: hidden_size), storage dtype
            ``dqn_buffer_dtype``, sampling seed ``dqn_seed``.
        enable_mtp, mtp_heads: multi-token prediction: head k (1..mtp_heads) predicts target[i + k] from
            output slot i (a residual SwiGLU per head, then the shared ``lm_head``), from the state before VQ.
        use_vq_codebook, vq_codebook_size, vq_dim, vq_beta, vq_ema, vq_decay, vq_dead_code_threshold: VQ of
            the output slots' state (projected to ``vq_dim``, RMS-normalised, quantized, projected back and added
            to the slot) right before ``lm_head``; codes initialised from the first training batch, dead codes
            restarted.
        enable_gradient_checkpointing: recompute every reasoning/planning block's activations in backward.
    """

    def __init__(
        self,
        vocab_size: int = 258,
        target_len: int = 64,
        image_size: Sequence[int] | None = None,
        in_channels: int = 1,
        num_capsules: int = 12,
        capsule_dim: int | None = None,
        encoder: str = "conv",
        encoder_channels: Sequence[int] = (32, 64, 128),
        encoder_routing_iters: int = 3,
        hidden_size: int = 256,
        num_heads: int = 4,
        expansion: float = 4.0,
        num_layers: int = 2,
        H_cycles: int = 2,
        L_cycles: int = 3,
        halt_max_steps: int = 1,
        rope_base: float = 10000.0,
        enable_latent_planning: bool = False,
        latent_num_paths: int = 4,
        latent_planning_depth: int = 2,
        latent_planning_layers: int = 2,
        enable_memory: bool = False,
        memory_slots: int = 256,
        memory_write_decay: float | None = None,
        enable_dqn: bool = False,
        dqn_buffer_capacity: int = 100_000,
        dqn_warmstart_steps: int = 1_000,
        dqn_batch_size: int = 256,
        dqn_gamma: float = 0.99,
        dqn_target_update_interval: int = 1_000,
        dqn_step_penalty: float = 0.01,
        dqn_reward: str = "exact",
        dqn_hidden: int = 256,
        dqn_state_dim: int | None = None,
        dqn_buffer_dtype: str = "float32",
        dqn_seed: int = 0,
        enable_mtp: bool = False,
        mtp_heads: int = 2,
        use_vq_codebook: bool = False,
        vq_codebook_size: int = 512,
        vq_dim: int = 64,
        vq_beta: float = 0.25,
        vq_ema: bool = True,
        vq_decay: float = 0.99,
        vq_dead_code_threshold: float = 0.1,
        enable_gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if encoder not in ENCODERS:
            raise ValueError(f"model.encoder must be one of {list(ENCODERS)}, got {encoder!r}")
        for name, value in (("vocab_size", vocab_size), ("target_len", target_len), ("in_channels", in_channels),
                            ("num_capsules", num_capsules), ("hidden_size", hidden_size), ("num_heads", num_heads),
                            ("num_layers", num_layers), ("H_cycles", H_cycles), ("L_cycles", L_cycles),
                            ("halt_max_steps", halt_max_steps)):
            if value < 1:
                raise ValueError(f"model.{name} must be >= 1, got {value}")
        if hidden_size % num_heads or (hidden_size // num_heads) % 2:
            raise ValueError(f"model.hidden_size={hidden_size} must be divisible by model.num_heads={num_heads} "
                             "into an even head size (RoPE)")
        if enable_mtp and mtp_heads < 1:
            raise ValueError(f"model.mtp_heads must be >= 1 when model.enable_mtp=true, got {mtp_heads}")
        image_size = tuple(int(s) for s in (image_size if image_size is not None else (64, 256)))
        capsule_dim = int(capsule_dim) if capsule_dim is not None else hidden_size

        self.vocab_size, self.target_len, self.image_size = vocab_size, target_len, image_size
        self.in_channels, self.num_capsules, self.capsule_dim = in_channels, num_capsules, capsule_dim
        self.hidden_size, self.H_cycles, self.L_cycles = hidden_size, H_cycles, L_cycles
        self.halt_max_steps = halt_max_steps
        self.gradient_checkpointing = enable_gradient_checkpointing

        self.encoder = (
            CapsuleEncoder(in_channels, image_size, num_capsules, capsule_dim, encoder_channels, encoder_routing_iters)
            if encoder == "conv" else None
        )
        self.capsule_proj = nn.Linear(capsule_dim, hidden_size, bias=False)
        self.slot_embed = nn.Parameter(_trunc_normal_(torch.empty(target_len, hidden_size), std=1.0))

        planning_depth = latent_planning_depth if enable_latent_planning else 0
        max_len = num_capsules + target_len + planning_depth
        rotary = RotaryEmbedding(hidden_size // num_heads, max_len, base=rope_base)
        # One RoPE table for every net: positions of [capsules ; output slots ; planning thoughts].
        block = {"width": hidden_size, "num_heads": num_heads, "expansion": expansion, "mixer": "attention",
                 "total_len": max_len, "rotary": rotary}
        self.net = ReasoningNet(num_layers, **block)
        # Initial latents: fixed random vectors (buffers, saved with the weights), as in TRM.
        self.register_buffer("H_init", _trunc_normal_(torch.empty(hidden_size), std=1.0))
        self.register_buffer("L_init", _trunc_normal_(torch.empty(hidden_size), std=1.0))

        self.memory = KeyValueMemory(hidden_size, memory_slots, num_heads, memory_write_decay) if enable_memory else None
        self.planner = None
        if enable_latent_planning:
            self.planner = LatentPlanner(hidden_size, latent_num_paths, latent_planning_depth, latent_planning_layers, block)
            self.planner.gradient_checkpointing = enable_gradient_checkpointing
        self.vq = self.vq_in = self.vq_out = None
        if use_vq_codebook:
            self.vq_in = nn.Linear(hidden_size, vq_dim, bias=False)
            self.vq = VectorQuantizer(vq_dim, vq_codebook_size, vq_beta, vq_ema, vq_decay, vq_dead_code_threshold)
            self.vq_out = nn.Linear(vq_dim, hidden_size, bias=False)
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
        self.mtp = nn.ModuleList(SwiGLU(hidden_size, 1.0) for _ in range(mtp_heads)) if enable_mtp else None
        self.dqn = None
        if enable_dqn:
            self.dqn = HaltingDQN(hidden_size, halt_max_steps, dqn_buffer_capacity, dqn_warmstart_steps, dqn_batch_size,
                                  dqn_gamma, dqn_target_update_interval, dqn_step_penalty, dqn_reward, dqn_hidden,
                                  dqn_state_dim, dqn_buffer_dtype, dqn_seed)
            # DDP must not broadcast the replay storage from rank 0 at every forward (see models/components/replay_buffer.py).
            self._ddp_params_and_buffers_to_ignore = self.dqn.buffer.buffer_names("dqn.buffer.")

    # ------------------------------------------------------------------ inputs
    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Capsules [B, N, capsule_dim] of a batch: its pre-encoded ``capsules`` if present, else the encoder's."""
        capsules = batch.get("capsules")
        if capsules is not None:
            if capsules.ndim != 3 or capsules.shape[1] != self.num_capsules or capsules.shape[2] != self.capsule_dim:
                raise ValueError(f"batch['capsules'] has shape {list(capsules.shape)}, expected [B, model.num_capsules="
                                 f"{self.num_capsules}, model.capsule_dim={self.capsule_dim}]")
            return capsules.to(self.capsule_proj.weight.dtype)
        images = batch.get("images")
        if images is None:
            raise KeyError(f"MultimodalTRM needs batch['images'] or batch['capsules']; the batch has {sorted(batch)}")
        if self.encoder is None:
            raise ValueError("model.encoder=none expects pre-encoded batch['capsules'], but the batch has only 'images'; "
                             "set model.encoder=conv to encode images in the model")
        if images.ndim == 3:
            images = images.unsqueeze(1)
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"batch['images'] has shape {list(images.shape)}, expected [B, model.in_channels={self.in_channels}, H, W]")
        pixels = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        return self.encoder(pixels)

    def embed(self, capsules: torch.Tensor, num_slots: int) -> torch.Tensor:
        """The input injection x = [norm(proj(capsules)) ; slot embeddings] [B, N + num_slots, D] (unit RMS)."""
        caps = _rms_norm(self.capsule_proj(_rms_norm(capsules)))
        slots = self.slot_embed[:num_slots].to(caps.dtype).expand(caps.shape[0], -1, -1)
        return torch.cat([caps, slots], dim=1)

    # ------------------------------------------------------------------ reasoning
    def reason(self, z_H: torch.Tensor, z_L: torch.Tensor, x: torch.Tensor, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One TRM reasoning step: H_cycles x (L_cycles z_L updates + one z_H update); with ``grad`` the
        last cycle runs with gradients (everything before is a no-grad refinement)."""
        ckpt = self.gradient_checkpointing
        with torch.no_grad():
            for _ in range(self.H_cycles - 1 if grad else self.H_cycles):
                for _ in range(self.L_cycles):
                    z_L = _run_layers(self.net, z_L, z_H + x, False)
                z_H = _run_layers(self.net, z_H, z_L, False)
        if grad:
            for _ in range(self.L_cycles):
                z_L = _run_layers(self.net, z_L, z_H + x, ckpt)
            z_H = _run_layers(self.net, z_H, z_L, ckpt)
        return z_H, z_L

    def readout(self, z_H: torch.Tensor, num_slots: int, update: bool) -> dict[str, Any]:
        """State -> [memory] -> [planning] -> output slots -> [VQ] -> logits [+ MTP]. ``update`` lets this
        call write the memory and move the EMA codebook (once per training forward, on the final state)."""
        out: dict[str, Any] = {}
        h = z_H
        if self.memory is not None:
            h = self.memory(h, write=update and self.training)
        if self.planner is not None:
            h, weights = self.planner(h)
            out["plan_weights"] = weights
        slots = h[:, self.num_capsules:self.num_capsules + num_slots]
        out["slots"] = slots
        read = slots
        if self.vq is not None:
            # Unit-RMS code space: inputs on the scale of the N(0, 1) codes, so the nearest code depends on the
            # direction and the codebook does not collapse onto the few codes of smallest norm.
            vq = self.vq(_rms_norm(self.vq_in(slots)), update=update)
            # Residual: the code adds a discrete summary to each slot instead of replacing it. Read through the
            # code alone, the answer hinged on the codebook's health: early in training every slot fell on one
            # code (usage 1/64) and the head predicted one byte everywhere, frozen at 20% token accuracy (measured).
            read = _rms_norm(slots + self.vq_out(vq.quantized))
            out["vq"] = vq
        out["logits"] = self.lm_head(read)
        if self.mtp is not None:
            # From the continuous (pre-VQ) state: the heads are auxiliary; a code per slot need not hold K tokens.
            out["mtp_logits"] = torch.stack([self.lm_head(_rms_norm(slots + head(slots))) for head in self.mtp], dim=1)
        return out

    # ------------------------------------------------------------------ forward
    def forward(self, batch: dict[str, torch.Tensor], carry: Any = None) -> dict[str, Any]:
        """See the module docstring for the batch and the outputs; ``carry`` is accepted and ignored."""
        target = batch.get("target")
        num_slots = self.target_len if target is None else target.shape[1]
        if num_slots > self.target_len:
            raise ValueError(f"batch['target'] has {num_slots} positions but model.target_len={self.target_len}: raise "
                             "model.target_len (or leave it unset so the data module sets it)")
        if self.dqn is not None and self.training and target is None:
            raise KeyError("model.enable_dqn=true trains on the answers' correctness: the batch needs 'target'")
        x = self.embed(self.encode(batch), num_slots)
        batch_size, seq, width = x.shape
        z_H = self.H_init.to(x.dtype).expand(batch_size, seq, width)
        z_L = self.L_init.to(x.dtype).expand(batch_size, seq, width)
        if self.training:
            return self._train_forward(z_H, z_L, x, num_slots, target)
        return self._eval_forward(z_H, z_L, x, num_slots)

    def _train_forward(self, z_H: torch.Tensor, z_L: torch.Tensor, x: torch.Tensor, num_slots: int,
                       target: torch.Tensor | None) -> dict[str, Any]:
        dqn = self.dqn
        features: list[torch.Tensor] = []
        rewards: list[torch.Tensor] = []
        if dqn is not None:
            dqn.start_training_step()
        for step in range(1, self.halt_max_steps):
            with torch.no_grad():
                z_H, z_L = self.reason(z_H, z_L, x, grad=False)
                if dqn is not None:
                    draft = self.readout(z_H, num_slots, update=False)
                    features.append(dqn.features(draft["slots"], step, draft["logits"]))
                    rewards.append(dqn.halt_reward(draft["logits"], target))
        z_H, z_L = self.reason(z_H, z_L, x, grad=True)
        readout = self.readout(z_H, num_slots, update=True)
        outputs, metrics = self._outputs(readout)
        outputs["steps"] = torch.full((x.shape[0],), self.halt_max_steps, dtype=torch.long, device=x.device)
        if dqn is not None:
            logits = readout["logits"].detach()
            features.append(dqn.features(readout["slots"], self.halt_max_steps, logits))
            rewards.append(dqn.halt_reward(logits, target))
            trajectory, halt_rewards = torch.stack(features), torch.stack(rewards)
            dqn.store(trajectory, halt_rewards)
            outputs["dqn_loss"] = dqn.td_loss()
            metrics.update(dqn.greedy_metrics(trajectory, halt_rewards))
        outputs["metrics"] = metrics
        return outputs

    @torch.no_grad()
    def _eval_forward(self, z_H: torch.Tensor, z_L: torch.Tensor, x: torch.Tensor, num_slots: int) -> dict[str, Any]:
        rows = x.shape[0]
        steps = torch.full((rows,), self.halt_max_steps, dtype=torch.long, device=x.device)
        halted = torch.zeros(rows, dtype=torch.bool, device=x.device)
        q_values = None
        readout = None
        for step in range(1, self.halt_max_steps + 1):
            new_H, new_L = self.reason(z_H, z_L, x, grad=False)
            frozen = halted.view(-1, 1, 1)
            z_H, z_L = torch.where(frozen, z_H, new_H), torch.where(frozen, z_L, new_L)  # halted rows keep their state
            readout = None
            if self.dqn is not None:
                readout = self.readout(z_H, num_slots, update=False)
                q = self.dqn.q_values(self.dqn.features(readout["slots"], step, readout["logits"]))
                q_values = q if q_values is None else torch.where(halted.view(-1, 1), q_values, q)
                if step < self.halt_max_steps:
                    halt_now = ~halted & (q[:, HALT] >= q[:, CONTINUE])
                    steps = torch.where(halt_now, torch.full_like(steps, step), steps)
                    halted = halted | halt_now
                    if bool(halted.all()):
                        break  # every row has stopped: the remaining steps would change nothing
        if readout is None:
            readout = self.readout(z_H, num_slots, update=False)
        outputs, metrics = self._outputs(readout)
        outputs["steps"] = steps
        if q_values is not None:
            outputs["q_values"] = q_values
            metrics["act/steps"] = steps.float().mean()
        outputs["metrics"] = metrics
        return outputs

    def _outputs(self, readout: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        outputs: dict[str, Any] = {"logits": readout["logits"]}
        metrics: dict[str, torch.Tensor] = {}
        if "mtp_logits" in readout:
            outputs["mtp_logits"] = readout["mtp_logits"]
        if "vq" in readout:
            vq: VQOutput = readout["vq"]
            outputs["vq_loss"], outputs["vq_codes"] = vq.loss, vq.codes
            metrics.update({"vq/perplexity": vq.perplexity, "vq/usage": vq.usage,
                            "vq/commitment": vq.commitment_loss.detach()})
        if "plan_weights" in readout:
            weights = readout["plan_weights"]
            outputs["plan_weights"] = weights
            entropy = -(weights * torch.log(weights.clamp(min=1e-10))).sum(-1).mean()
            metrics["plan/path_entropy"] = entropy.detach()
        return outputs, metrics

    # ------------------------------------------------------------------ introspection
    def parameter_counts(self) -> dict[str, int]:
        """Parameters per component (target network included under ``dqn``), and the trainable total."""
        groups: dict[str, int] = {}
        for name, param in self.named_parameters():
            top = name.split(".")[0]
            groups[top] = groups.get(top, 0) + param.numel()
        groups["total"] = sum(p.numel() for p in self.parameters())
        groups["trainable"] = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return groups


def count_parameters(factory: Callable[[], nn.Module]) -> dict[str, int]:
    """Build a model on the meta device (no memory for the weights) and count its parameters."""
    with torch.device("meta"):
        model = factory()
    counts = getattr(model, "parameter_counts", None)
    if counts is not None:
        return counts()
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
