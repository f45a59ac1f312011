"""Recursive reasoning with adaptive computation time: TRM and HRM in one configurable model.

One small network is applied recursively to a latent state. Two latents are carried:

* ``z_H`` — the answer-side state ("y" in TRM, the high-level state in HRM); logits are read from it;
* ``z_L`` — the reasoning-side state ("z" in TRM, the low-level state in HRM).

One *reasoning step* runs ``H_cycles`` outer cycles; each does ``L_cycles`` updates of ``z_L`` from
``(z_L, z_H + input)`` and then one update of ``z_H`` from ``(z_H, z_L)``. Only the last part runs
with gradients (TRM: the whole last cycle; HRM: the last L and H updates — its one-step gradient
approximation); everything before is a no-grad fixed-point refinement.

``architecture`` picks the variant (the presets in conf/model/ are just settings of this class):

* ``trm``   one shared network updates both latents (Jolicoeur-Martineau 2025);
* ``hrm``   a low-level network updates ``z_L`` and a separate high-level one ``z_H`` (Wang et al. 2025);
* ``plain`` no recursion: ``logits = head(network(input))`` — a same-sized transformer baseline.

``mixer`` picks the token mixer inside a block: ``attention`` (non-causal self-attention) or ``mlp``
(an MLP across the sequence, TRM's attention-free variant for small fixed-size grids).

ACT (adaptive computation time) with a carried state. Training does one reasoning step per batch
("deep supervision": every step of a puzzle is supervised, the state is carried to the next batch
detached). The carry holds the latents, the step count, halted flags and the puzzles being worked
on. At each forward, halted rows are refilled with fresh examples of the batch and their latents
reset; a Q-head reads ``z_H`` and predicts ``q_halt`` / ``q_continue``. A row halts when it reaches
``halt_max_steps`` or (training) when the Q-head says so, after a random minimum number of steps with
probability ``halt_exploration_prob``. Evaluation (``carry=None`` in eval mode) runs every row for
``halt_max_steps`` steps. With ``supervision_steps > 1`` a training forward instead runs that many
steps on a fresh batch (no carry), detaching between steps, and returns every step's outputs for
``losses.reasoning.DeepSupervisionTerm``.

Batches: ``inputs`` Long[B, L], ``labels`` Long[B, L] (-100 = not scored), ``puzzle_identifiers``
Long[B]. Outputs: ``logits`` [B, L, V], ``q_halt_logits`` / ``q_continue_logits`` [B], the ``labels``
the outputs belong to (in training these are the carried puzzles, not the batch's), ``steps``,
``halted``, optionally ``target_q_continue``, ``step_outputs``, plus ``metrics`` and ``carry``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.components.act_halting import HALT_POLICIES, QHaltHead, act_halted, q_halt_accuracy
from models.components.initialization import trunc_normal_
from models.components.metrics import rows_correct
from models.components.reasoning_net import MIXERS, ReasoningNet
from models.components.rotary import RotaryEmbedding

ARCHITECTURES = ("trm", "hrm", "plain")
POS_ENCODINGS = ("rope", "learned", "none")
CARRY_KEYS = ("z_H", "z_L", "steps", "halted", "inputs", "labels", "puzzle_identifiers")


class RecursiveReasoningModel(nn.Module):
    """TRM / HRM / plain-transformer with ACT; see the module docstring for the recursion and the carry."""

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        num_puzzle_identifiers: int = 1,
        architecture: str = "trm",
        mixer: str = "attention",
        pos_encodings: str = "rope",
        hidden_size: int = 512,
        num_heads: int = 8,
        expansion: float = 4.0,
        num_layers: int = 2,
        H_layers: int | None = None,
        H_cycles: int = 3,
        L_cycles: int = 6,
        puzzle_emb_ndim: int = 0,
        halt_max_steps: int = 16,
        halt_exploration_prob: float = 0.1,
        halt_policy: str = "q_halt",
        bootstrap_q_continue: bool = False,
        supervision_steps: int = 1,
        rope_base: float = 10000.0,
    ) -> None:
        super().__init__()
        for name, value, allowed in (
            ("architecture", architecture, ARCHITECTURES),
            ("mixer", mixer, MIXERS),
            ("pos_encodings", pos_encodings, POS_ENCODINGS),
            ("halt_policy", halt_policy, HALT_POLICIES),
        ):
            if value not in allowed:
                raise ValueError(f"model.{name} must be one of {list(allowed)}, got {value!r}")
        for name, value in (("H_cycles", H_cycles), ("L_cycles", L_cycles), ("halt_max_steps", halt_max_steps),
                            ("num_layers", num_layers), ("supervision_steps", supervision_steps)):
            if value < 1:
                raise ValueError(f"model.{name} must be >= 1, got {value}")
        if not 0.0 <= halt_exploration_prob <= 1.0:
            raise ValueError(f"model.halt_exploration_prob must be in [0, 1], got {halt_exploration_prob}")
        if supervision_steps > halt_max_steps:
            raise ValueError(f"model.supervision_steps={supervision_steps} exceeds halt_max_steps={halt_max_steps}")
        if architecture == "plain" and halt_max_steps != 1:
            raise ValueError("model.architecture=plain has no recurrent state to refine: set model.halt_max_steps=1")
        if bootstrap_q_continue and halt_policy == "q_halt":
            # TRM drops Q-continue; the bootstrapped target only makes sense when the policy uses it (HRM).
            raise ValueError("model.bootstrap_q_continue=true needs model.halt_policy=q_halt_vs_continue")

        self.architecture, self.mixer = architecture, mixer
        self.vocab_size, self.seq_len, self.hidden_size = vocab_size, seq_len, hidden_size
        self.H_cycles, self.L_cycles = H_cycles, L_cycles
        self.halt_max_steps, self.halt_exploration_prob = halt_max_steps, halt_exploration_prob
        self.halt_policy, self.bootstrap_q_continue = halt_policy, bootstrap_q_continue
        self.supervision_steps = supervision_steps

        # Puzzle embeddings occupy `puzzle_emb_len` prefix positions (zero-initialised, as in TRM, so an
        # unseen puzzle starts neutral). Trained by their own optimizer (optim.components.puzzle_emb).
        self.puzzle_emb_len = math.ceil(puzzle_emb_ndim / hidden_size) if puzzle_emb_ndim > 0 else 0
        self.puzzle_emb: nn.Embedding | None = None
        if puzzle_emb_ndim > 0:
            self.puzzle_emb = nn.Embedding(max(num_puzzle_identifiers, 1), puzzle_emb_ndim)
            nn.init.zeros_(self.puzzle_emb.weight)
        total_len = seq_len + self.puzzle_emb_len

        self.embed_scale = math.sqrt(hidden_size)
        self.embed_tokens = nn.Embedding(vocab_size, hidden_size)
        trunc_normal_(self.embed_tokens.weight, std=1.0 / self.embed_scale)
        self.embed_pos = None
        if pos_encodings == "learned":
            self.embed_pos = nn.Parameter(trunc_normal_(torch.empty(total_len, hidden_size), std=1.0 / self.embed_scale))
        rotary = None
        if pos_encodings == "rope" and mixer == "attention":
            rotary = RotaryEmbedding(hidden_size // num_heads, total_len, base=rope_base)

        block = dict(width=hidden_size, num_heads=num_heads, expansion=expansion, mixer=mixer, total_len=total_len, rotary=rotary)
        self.L_net = ReasoningNet(num_layers, **block)
        self.H_net = ReasoningNet(H_layers or num_layers, **block) if architecture == "hrm" else None

        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
        self.q_head = QHaltHead(hidden_size)  # starts by almost never halting, so early training explores every step
        # Initial latents: fixed random vectors (buffers, saved with the weights).
        self.register_buffer("H_init", trunc_normal_(torch.empty(hidden_size), std=1.0))
        self.register_buffer("L_init", trunc_normal_(torch.empty(hidden_size), std=1.0))

    # ------------------------------------------------------------------ the network
    def embed(self, inputs: torch.Tensor, puzzle_identifiers: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(inputs)
        if self.puzzle_emb is not None:
            prefix = self.puzzle_emb(puzzle_identifiers)
            pad = self.puzzle_emb_len * self.hidden_size - prefix.shape[-1]
            prefix = F.pad(prefix, (0, pad)).view(-1, self.puzzle_emb_len, self.hidden_size)
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
        if self.embed_pos is not None:
            x = 0.707106781 * (x + self.embed_pos)  # keeps the variance of the sum at that of each part
        return self.embed_scale * x

    def _update_H(self, z_H: torch.Tensor, z_L: torch.Tensor) -> torch.Tensor:
        net = self.H_net if self.H_net is not None else self.L_net
        return net(z_H, z_L)

    def recurse(self, z_H: torch.Tensor, z_L: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One reasoning step (H_cycles x (L_cycles + 1) network calls); gradients flow through the last part only."""
        if self.architecture == "plain":
            return self.L_net(x), z_L
        H, L = self.H_cycles, self.L_cycles
        # TRM back-propagates through its whole last cycle; HRM through its last L and last H update only.
        grad_L_updates = L if self.architecture == "trm" else 1
        with torch.no_grad():
            for h in range(H):
                last_cycle = h == H - 1
                no_grad_L = L - grad_L_updates if last_cycle else L
                for _ in range(no_grad_L):
                    z_L = self.L_net(z_L, z_H + x)
                if not last_cycle:
                    z_H = self._update_H(z_H, z_L)
        for _ in range(grad_L_updates):
            z_L = self.L_net(z_L, z_H + x)
        z_H = self._update_H(z_H, z_L)
        return z_H, z_L

    def heads(self, z_H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.lm_head(z_H[:, self.puzzle_emb_len:])
        q_halt, q_continue = self.q_head(z_H[:, 0])
        return logits, q_halt, q_continue

    # ------------------------------------------------------------------ ACT
    def initial_carry(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A carry whose rows are all halted, so the next step loads every row from the batch."""
        inputs = batch["inputs"]
        rows, device = inputs.shape[0], inputs.device
        shape = (rows, self.seq_len + self.puzzle_emb_len, self.hidden_size)
        return {
            "z_H": self.H_init.expand(shape).clone(),
            "z_L": self.L_init.expand(shape).clone(),
            "steps": torch.zeros(rows, dtype=torch.long, device=device),
            "halted": torch.ones(rows, dtype=torch.bool, device=device),
            "inputs": torch.zeros_like(inputs),
            "labels": torch.zeros_like(batch["labels"]),
            "puzzle_identifiers": torch.zeros_like(_puzzle_ids(batch)),
        }

    def _carry_matches(self, carry: Any, batch: dict[str, torch.Tensor]) -> bool:
        if not isinstance(carry, dict) or any(k not in carry for k in CARRY_KEYS):
            return False
        expected = (batch["inputs"].shape[0], self.seq_len + self.puzzle_emb_len, self.hidden_size)
        return tuple(carry["z_H"].shape) == expected and carry["inputs"].shape == batch["inputs"].shape

    def act_step(self, carry: dict[str, torch.Tensor], batch: dict[str, torch.Tensor] | None) -> tuple[dict, dict]:
        """Refill halted rows from ``batch`` (if given), run one reasoning step, decide who halts."""
        if batch is not None:
            reset = carry["halted"]
            row = reset.view(-1, 1)
            z_H = torch.where(row.unsqueeze(-1), self.H_init.to(carry["z_H"].dtype), carry["z_H"])
            z_L = torch.where(row.unsqueeze(-1), self.L_init.to(carry["z_L"].dtype), carry["z_L"])
            steps = torch.where(reset, torch.zeros_like(carry["steps"]), carry["steps"])
            inputs = torch.where(row, batch["inputs"], carry["inputs"])
            labels = torch.where(row, batch["labels"], carry["labels"])
            ids = torch.where(reset, _puzzle_ids(batch), carry["puzzle_identifiers"])
        else:
            z_H, z_L, steps = carry["z_H"], carry["z_L"], carry["steps"]
            inputs, labels, ids = carry["inputs"], carry["labels"], carry["puzzle_identifiers"]

        x = self.embed(inputs, ids)
        z_H, z_L = self.recurse(z_H, z_L, x)
        logits, q_halt, q_continue = self.heads(z_H)
        steps = steps + 1
        outputs: dict[str, Any] = {"logits": logits, "q_halt_logits": q_halt, "q_continue_logits": q_continue, "labels": labels}

        halted = act_halted(steps, self.halt_max_steps, q_halt, q_continue, self.halt_policy,
                            self.halt_exploration_prob, self.training)
        if self.training and self.halt_max_steps > 1 and self.bootstrap_q_continue:
            with torch.no_grad():
                # DQN-style target for "continue": the value of the best action at the next step.
                next_H, _ = self.recurse(z_H, z_L, x)
                _, next_halt, next_continue = self.heads(next_H)
                is_last = steps >= self.halt_max_steps
                target = torch.where(is_last, next_halt, torch.maximum(next_halt, next_continue))
                outputs["target_q_continue"] = torch.sigmoid(target)
        outputs["steps"], outputs["halted"] = steps, halted
        new_carry = {"z_H": z_H, "z_L": z_L, "steps": steps, "halted": halted, "inputs": inputs, "labels": labels, "puzzle_identifiers": ids}
        return new_carry, outputs

    # ------------------------------------------------------------------ forward
    def forward(self, batch: dict[str, torch.Tensor], carry: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        if not self.training:
            return self._evaluate(batch)
        if self.supervision_steps > 1:
            return self._deep_supervision(batch)
        if not self._carry_matches(carry, batch):
            carry = self.initial_carry(batch)  # first batch, or the batch size changed
        new_carry, outputs = self.act_step(carry, batch)
        outputs["metrics"] = self._halted_metrics(outputs)
        outputs["carry"] = new_carry
        return outputs

    def _evaluate(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        carry = self.initial_carry(batch)
        carry, outputs = self.act_step(carry, batch)
        for _ in range(self.halt_max_steps - 1):
            carry, outputs = self.act_step(carry, None)
        outputs["metrics"] = {"act/q_halt_acc": _q_halt_accuracy(outputs)}
        return outputs

    def _deep_supervision(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        carry = self.initial_carry(batch)
        step_outputs = []
        for step in range(self.supervision_steps):
            carry, outputs = self.act_step(carry, batch if step == 0 else None)
            step_outputs.append(outputs)
            carry = {k: v.detach() for k, v in carry.items()}  # each step is supervised on its own
        last = dict(step_outputs[-1])
        last["step_outputs"] = step_outputs
        last["metrics"] = {"act/q_halt_acc": _q_halt_accuracy(last)}
        return last

    def _halted_metrics(self, outputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Train metrics over the rows that finished at this step (TRM logs the same)."""
        with torch.no_grad():
            halted = outputs["halted"]
            count = halted.sum().clamp(min=1)
            correct = rows_correct(outputs["logits"], outputs["labels"])
            return {
                "act/halted_frac": halted.float().mean(),
                "act/steps": (outputs["steps"] * halted).sum() / count,
                "act/halted_exact_acc": (correct & halted).sum() / count,
                "act/q_halt_acc": q_halt_accuracy(outputs["q_halt_logits"], correct),
            }


def _puzzle_ids(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    ids = batch.get("puzzle_identifiers")
    if ids is None:
        return torch.zeros(batch["inputs"].shape[0], dtype=torch.long, device=batch["inputs"].device)
    return ids


def _q_halt_accuracy(outputs: dict[str, Any]) -> torch.Tensor:
    return q_halt_accuracy(outputs["q_halt_logits"], rows_correct(outputs["logits"], outputs["labels"]))
