"""Cogment: a refinement core with adaptive computation time, a surprise-gated long-term memory, and
heads and adapters for grids, token sequences and text.

One forward::

    x = heads.embed(inputs, task_type) + memory.read_out(episodic read of the example's cue)
    z = initial state, y = 0
    for n in 1 .. refinement_steps:                     (a runtime knob: the curriculum sets it per stage)
        z, edit = core(z, x, y, memory.persistent)      (ReasoningNet + persistent KeyValueMemory)
        y = y + edit                                    (the residual edit of the prediction state)
        logits_n = heads.logits(y, task_type)           (the step's prediction)
        h_n = (1 - eps) sigmoid(halting(mean of z))     (the step's halting probability)
    ACT (Graves 2016, models/cogment/act.py): weights p_n from h; logits = sum_n p_n logits_n;
    ponder cost N + R.

Batch: ``inputs``, ``labels`` (-100 = not scored), ``cue`` (Bool) and ``rotation`` [B, L], ``task_type``
[B], in a validation split with study documents also ``study_inputs``, ``study_labels`` and ``study_cue``
[B, L] (dataset/cogment/data_module.py). Outputs: ``logits`` [B, L, V] (the ACT mixture), ``step_logits``
(a list of [B, L, V], one per step), ``act_weights`` [B, T], ``halt_probs`` [B, T], ``ponder_steps`` (N)
and ``ponder_cost`` (N + R) [B], ``labels``, the memory's ``memory_keys`` / ``memory_values`` (for its
writes), with the runtime knob ``consistency`` in training also ``consistency_logits`` (the prediction for
the rotated grid rows ``consistency_rows``, turned back to the original positions), and ``metrics``.

The model is a ``Callback``: after every optimizer step taken in a stage whose ``memory_write_rate`` is
above 0, it writes the surprising answers of the batch into the episodic memory, decays it, and
consolidates it every ``consolidation_interval`` steps (outside backprop; all in buffers, so checkpoints
hold it). At fit start it logs its parameter budget per component (models/cogment/budget.py).

In an evaluation with ``memory_write_rate`` above 0, a batch that carries study documents (``study_inputs``,
``study_labels``, ``study_cue``: passkey_memory's held-out documents) is answered from a copy of the
episodic slots into which those documents were first written, with the same surprise gate as in training;
the copy is dropped after the batch. Writing needs no forward pass (the keys are codes of the cue, the
values codes of the answer tokens), so the questions, asked without their documents, can be answered only
through the memory. Training's memory is never changed by an evaluation (a resumed run stays bitwise
identical), and with writes off (0) nothing is written, so held-out answers cannot be recalled.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from models.cogment.act import graves_halting
from models.cogment.budget import budget_lines, component_counts
from models.cogment.heads import CogmentHeads
from models.cogment.episodic_memory import EpisodicSlots
from models.cogment.memory import GatedLTM
from models.cogment.refinement_core import RefinementCore
from models.components.act_halting import QHaltHead
from models.components.metrics import IGNORE_INDEX
from models.components.parameters import parameter_counts
from utils.training.callbacks import Callback

log = logging.getLogger(__name__)


def inverse_permutation(source: torch.Tensor) -> torch.Tensor:
    """[B, L] -> [B, L]: where each original position went. Position j of a permuted row holds original
    position ``source[j]``, so original position i is found at ``back[i]`` with ``back[source[j]] = j``."""
    positions = torch.arange(source.shape[1], device=source.device).expand_as(source)
    return torch.empty_like(source).scatter_(1, source, positions)


class Cogment(nn.Module, Callback):
    """See the module docstring. Data facts (from the data module): ``vocab_size``, ``max_seq_len``,
    ``num_task_types``, ``task_families``. Runtime knobs (plain attributes a curriculum stage may set):
    ``refinement_steps``, ``memory_write_rate``, ``consistency``, ``act_epsilon``."""

    def __init__(
        self,
        vocab_size: int,
        max_seq_len: int,
        num_task_types: int,
        task_families: list[int],
        hidden_size: int = 512,
        num_heads: int = 8,
        num_layers: int = 2,
        expansion: float = 4.0,
        adapter_rank: int = 128,
        refinement_steps: int = 4,
        act_epsilon: float = 0.01,
        halt_init_logit: float = -2.0,
        persistent_slots: int = 1700,
        episodic_slots: int = 4096,
        memory_key_dim: int = 256,
        memory_value_dim: int = 256,
        memory_write_rate: float = 0.0,
        memory_decay: float = 1e-3,
        surprise_threshold: float = 1.0,
        consolidation_interval: int = 100,
        max_writes_per_step: int = 256,
        consistency: bool = False,
        checkpointing: bool = False,
        rope_base: float = 10000.0,
        pad_token: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("refinement_steps", refinement_steps), ("consolidation_interval", consolidation_interval),
                            ("num_layers", num_layers)):
            if value < 1:
                raise ValueError(f"model.{name} must be >= 1, got {value}")
        self.heads = CogmentHeads(vocab_size, hidden_size, num_task_types, list(task_families), adapter_rank)
        self.core = RefinementCore(hidden_size, num_heads, num_layers, expansion, max_seq_len, rope_base)
        # The project's halting head; its first logit is the halting logit. A bias of -2 starts with h ~ 0.12 per
        # step, so early training uses most of the budget and the ponder cost has a gradient to work with.
        self.halting = QHaltHead(hidden_size, initial_logit=halt_init_logit)
        self.memory = GatedLTM(hidden_size, num_heads, vocab_size, max_seq_len, persistent_slots, episodic_slots,
                               memory_key_dim, memory_value_dim, surprise_threshold=surprise_threshold,
                               max_writes_per_step=max_writes_per_step)
        self.refinement_steps, self.act_epsilon = refinement_steps, act_epsilon
        self.memory_write_rate, self.memory_decay = memory_write_rate, memory_decay
        self.consolidation_interval, self.consistency, self.checkpointing = consolidation_interval, consistency, checkpointing
        self.pad_token = pad_token

    # ------------------------------------------------------------------ forward
    def forward(self, batch: dict[str, torch.Tensor], carry: Any = None) -> dict[str, Any]:
        if not 0 < int(self.refinement_steps):
            raise ValueError(f"model.refinement_steps must be >= 1, got {self.refinement_steps}")
        inputs, task_type, labels = batch["inputs"], batch["task_type"], batch["labels"]
        study = not self.training and float(self.memory_write_rate) > 0 and "study_inputs" in batch
        outputs = self.refine(inputs, task_type, batch.get("cue"), self._study(batch) if study else None)
        outputs["labels"] = labels
        if self.training and self.consistency and "rotation" in batch:
            outputs.update(self._rotated_prediction(batch))
        outputs["metrics"] = self._metrics(outputs, labels)
        return outputs

    @torch.no_grad()
    def _study(self, batch: dict[str, torch.Tensor]) -> EpisodicSlots:
        """A copy of the episodic slots with the batch's study documents written in (see the module docstring);
        each rank writes its own batch's documents into its own copy, so nothing is gathered."""
        slots = copy.deepcopy(self.memory.episodic)
        keys, values, _ = self.memory.recall(batch["study_inputs"], batch["study_cue"], slots)
        # Every document of the batch is written (max_writes_per_step bounds a training step's cost, not this).
        self.memory.write(keys, values, batch["study_labels"], float(self.memory_write_rate), slots, synchronize=False,
                          max_writes=len(slots.slot_mass))
        return slots

    def refine(self, inputs: torch.Tensor, task_type: torch.Tensor, cue: torch.Tensor | None,
               slots: EpisodicSlots | None = None) -> dict[str, Any]:
        """The refinement loop and ACT for one batch (see the module docstring); the episodic memory is read
        from ``slots`` (default: the model's own)."""
        keys, values, null = self.memory.recall(inputs, cue, slots)
        x = self.heads.embed(inputs, task_type)
        x = x + self.memory.read_out(values.to(x.dtype))
        state = self.core.initial_state.to(x.dtype).expand_as(x)
        prediction = torch.zeros_like(x)
        real = (inputs != self.pad_token).unsqueeze(-1).to(x.dtype)
        step_logits, halt_logits = [], []
        for _ in range(int(self.refinement_steps)):
            state, edit = self.core(state, x, prediction, self.memory.persistent, checkpointing=self.checkpointing)
            prediction = prediction + edit
            step_logits.append(self.heads.logits(prediction, task_type))
            pooled = (state * real).sum(1) / real.sum(1).clamp(min=1.0)
            halt_logits.append(self.halting(pooled)[0])
        # h_n = (1 - epsilon) sigmoid(logit): no single step closes the sum, so a row runs at least two steps
        # when the budget allows. With h_1 >= 1 - epsilon a row would halt at step 1 with R = 1, and neither the
        # ponder cost nor the answer would depend on h any more: a halting head that learnt to stop at once in
        # the 2-step sanity stage would get no gradient to ever ponder again in the longer stages.
        # The clamp: in float32 a saturated sigmoid (logit > ~17) rounds to exactly 1, and (1 - epsilon) * 1 would
        # close the sum at step 1 after all (seen as mean ponder steps below 2 in a 2-step stage).
        epsilon = float(self.act_epsilon)
        halt_probs = (1.0 - epsilon) * torch.sigmoid(torch.stack(halt_logits, dim=1).float()).clamp(max=1.0 - 1e-6)
        act = graves_halting(halt_probs, epsilon)
        weights = act.weights.t().to(step_logits[0].dtype)  # [T, B]
        logits = sum(w[:, None, None] * step for w, step in zip(weights, step_logits))
        return {"logits": logits, "step_logits": step_logits, "halt_probs": halt_probs, "act_weights": act.weights,
                "ponder_steps": act.steps, "ponder_cost": act.ponder_cost, "memory_keys": keys,
                "memory_values": values, "memory_null": null}

    def _rotated_prediction(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The prediction for the grid rows turned by 90 degrees, turned back (for the consistency loss)."""
        rotation = batch["rotation"]
        identity = torch.arange(rotation.shape[1], device=rotation.device).unsqueeze(0)
        rows = (rotation != identity).any(dim=1).nonzero().squeeze(1)
        if len(rows) == 0:
            return {}
        source = rotation[rows]
        cue = batch.get("cue")
        rotated = self.refine(batch["inputs"][rows].gather(1, source), batch["task_type"][rows],
                              None if cue is None else cue[rows].gather(1, source))
        back = inverse_permutation(source)
        aligned = rotated["logits"].gather(1, back.unsqueeze(-1).expand_as(rotated["logits"]))
        return {"consistency_logits": aligned, "consistency_rows": rows}

    @torch.no_grad()
    def _metrics(self, outputs: dict[str, Any], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        scored = labels != IGNORE_INDEX
        found = (outputs["memory_null"] < 0.5) & scored
        return {
            "act/ponder_steps": outputs["ponder_steps"].mean(),
            "act/ponder_cost": outputs["ponder_cost"].mean(),
            "act/first_halt_prob": outputs["halt_probs"][:, 0].mean(),
            "memory/recall_rate": found.sum() / scored.sum().clamp(min=1),
            "memory/slots_used": self.memory.episodic.occupied.float().mean(),
        }

    # ------------------------------------------------------------------ callback hooks
    def on_fit_start(self, trainer: Any) -> None:
        for line in budget_lines(component_counts(parameter_counts(self))):
            log.info("Cogment parameters: %s", line)

    def on_after_optimizer_step(self, trainer: Any, batch: Any, outputs: dict[str, Any]) -> None:
        """Surprise-gated writes, decay and consolidation, outside backprop, in stages that write."""
        rate = float(self.memory_write_rate)
        if rate <= 0:
            return
        episodic = self.memory.episodic
        stats = self.memory.write(outputs["memory_keys"], outputs["memory_values"], batch["labels"], rate)
        episodic.decay(float(self.memory_decay))
        if trainer.state.step % int(self.consolidation_interval) == 0:
            stats.update(episodic.consolidate())
            if trainer.dist.is_main:
                trainer.log_metrics({f"memory/{k}": v for k, v in stats.items()})
