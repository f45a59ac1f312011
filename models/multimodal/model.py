"""Multimodal TRM: images -> capsules -> recursive reasoning -> latent planning -> byte-level tokens.

The model of the "vision-unified" setting: every task (an ARC grid, a text or a code context) arrives
as a grayscale image; a capsule encoder turns it into ``num_capsules`` vectors, and a TRM
(one small ``ReasoningNet``, ``models/components/reasoning_net.py``, applied recursively, ``H_cycles`` x
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
See ``HaltingDQN`` for states, actions, rewards and the TD loss. The model is a ``Callback``: its
``on_after_optimizer_step`` hook tells the DQN that an optimizer step was taken (the target network is
refreshed on taken steps only, never on a step the trainer skipped).

Each part documents its choices where it is defined: ``CapsuleEncoder`` (routing,
models/multimodal/capsule_encoder.py), ``LatentPlanner`` (COCONUT, models/multimodal/latent_planner.py),
and in models/components/: ``KeyValueMemory`` (reads, optional EMA writes; memory.py),
``VectorQuantizer`` (placement and EMA; vector_quantizer.py), ``HaltingDQN`` (halting_dqn.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from models.components.halting_dqn import CONTINUE, HALT, HaltingDQN
from models.components.initialization import trunc_normal_
from models.components.memory import KeyValueMemory
from models.components.mlp import SwiGLU
from models.components.norms import rms_norm
from models.components.reasoning_net import ReasoningNet
from models.components.rotary import RotaryEmbedding
from models.components.vector_quantizer import VectorQuantizer, VQOutput
from models.multimodal.capsule_encoder import CapsuleEncoder
from models.multimodal.latent_planner import LatentPlanner
from utils.training.callbacks import Callback

ENCODERS = ("conv", "none")


class MultimodalTRM(nn.Module, Callback):
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
            ``dqn_gamma``, target network refreshed every ``dqn_target_update_interval`` optimizer steps taken,
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
        self.slot_embed = nn.Parameter(trunc_normal_(torch.empty(target_len, hidden_size), std=1.0))

        planning_depth = latent_planning_depth if enable_latent_planning else 0
        max_len = num_capsules + target_len + planning_depth
        rotary = RotaryEmbedding(hidden_size // num_heads, max_len, base=rope_base)
        # One RoPE table for every net: positions of [capsules ; output slots ; planning thoughts].
        block = {"width": hidden_size, "num_heads": num_heads, "expansion": expansion, "mixer": "attention",
                 "total_len": max_len, "rotary": rotary}
        self.net = ReasoningNet(num_layers, **block)
        # Initial latents: fixed random vectors (buffers, saved with the weights), as in TRM.
        self.register_buffer("H_init", trunc_normal_(torch.empty(hidden_size), std=1.0))
        self.register_buffer("L_init", trunc_normal_(torch.empty(hidden_size), std=1.0))

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
        caps = rms_norm(self.capsule_proj(rms_norm(capsules)))
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
                    z_L = self.net(z_L, z_H + x)
                z_H = self.net(z_H, z_L)
        if grad:
            for _ in range(self.L_cycles):
                z_L = self.net(z_L, z_H + x, checkpointing=ckpt)
            z_H = self.net(z_H, z_L, checkpointing=ckpt)
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
            vq = self.vq(rms_norm(self.vq_in(slots)), update=update)
            # Residual: the code adds a discrete summary to each slot instead of replacing it. Read through the
            # code alone, the answer hinged on the codebook's health: early in training every slot fell on one
            # code (usage 1/64) and the head predicted one byte everywhere, frozen at 20% token accuracy (measured).
            read = rms_norm(slots + self.vq_out(vq.quantized))
            out["vq"] = vq
        out["logits"] = self.lm_head(read)
        if self.mtp is not None:
            # From the continuous (pre-VQ) state: the heads are auxiliary; a code per slot need not hold K tokens.
            out["mtp_logits"] = torch.stack([self.lm_head(rms_norm(slots + head(slots))) for head in self.mtp], dim=1)
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
            dqn.count_training_forward()
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

    # ------------------------------------------------------------------ callback hooks
    def on_after_optimizer_step(self, trainer: Any, batch: Any, outputs: dict[str, Any]) -> None:
        """Called by the trainer after every optimizer step it takes (never after a skipped one): the DQN
        counts it and refreshes its target network every ``dqn_target_update_interval`` of them."""
        if self.dqn is not None:
            self.dqn.optimizer_step_taken()
