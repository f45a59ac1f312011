"""Halting learned by a DQN: when to stop a fixed-size reasoning loop, from replayed full-information experience."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from models.components.metrics import row_token_accuracy, rows_correct
from models.components.norms import rms_norm
from models.components.replay_buffer import ReplayBuffer

DQN_REWARDS = ("exact", "token_accuracy")
BUFFER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CONTINUE, HALT = 0, 1  # actions (column order of the Q-values)


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
      trained: requires_grad=False) refreshed every ``target_update_interval`` optimizer steps taken:
      the model's ``on_after_optimizer_step`` hook calls ``optimizer_step_taken``, so a step the trainer
      skips (non-finite gradients) does not count, and a forward alone never refreshes it.
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
        # Counters as 0-d buffers, so a resumed run refreshes the target network on the same steps.
        self.register_buffer("train_steps", torch.zeros((), dtype=torch.long))  # training forwards, taken or skipped
        self.register_buffer("target_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("optimizer_steps", torch.zeros((), dtype=torch.long))  # optimizer steps taken

    def features(self, slots: torch.Tensor, step: int, logits: torch.Tensor) -> torch.Tensor:
        """The DQN state [B, feature_dim] of rows whose output slots are ``slots`` after step ``step``."""
        with torch.no_grad():
            pooled = rms_norm(slots.float().mean(dim=1))
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
            return row_token_accuracy(logits, target)

    def q_values(self, features: torch.Tensor, target: bool = False) -> torch.Tensor:
        net = self.target_net if target else self.q_net
        return net(features.to(net[0].weight.dtype)).float()

    @torch.no_grad()
    def count_training_forward(self) -> None:
        """Count a training forward (whether or not the trainer then takes its optimizer step)."""
        self.train_steps.add_(1)

    @torch.no_grad()
    def optimizer_step_taken(self) -> None:
        """Count an optimizer step that was taken; refresh the target network every ``target_update_interval``."""
        self.optimizer_steps.add_(1)
        if int(self.optimizer_steps) % self.target_update_interval == 0:
            self.refresh_target()

    @torch.no_grad()
    def refresh_target(self) -> None:
        """Copy the online Q-network into the target network."""
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
