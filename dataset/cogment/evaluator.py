"""StageEvaluator: Cogment's validation metrics per task, refinement efficiency, and when a stage is done.

Metrics (logged as ``val/<name>``):

* per task type present: ``exact_acc/<task>`` (every scored token right) and ``token_acc/<task>``;
  the benchmarks' own metrics are these: ListOps accuracy is ``exact_acc/listops``, passkey recall
  ``exact_acc/passkey`` (across contexts: ``exact_acc/passkey_memory``), GSM8K-like answer accuracy
  ``exact_acc/gsm8k``; overall ``exact_acc``, ``token_acc`` and ``answer_ce`` (the answer's
  cross-entropy); ``arc_pass@k``: a task counts as solved if one of k attempts is right, the attempts being
  the distinct predictions of the ACT mixture and of each refinement step, most confident first;
* refinement efficiency: ``step_exact_acc/<n>`` (the prediction after step n), per task
  ``first_step_exact_acc/<task>`` and ``last_step_exact_acc/<task>``, ``refinement_gain`` (last step minus
  first), the mean ``ponder_steps`` (ACT's N) and ``exact_acc_per_ponder_step``;
* convergence (``check_stage_completion``): ``stage_complete`` (1 when the stage's pass criterion holds or it
  has converged), ``criterion_met``, ``plateaued``, ``train_exact_acc`` (training batches since the last
  evaluation), ``train_val_gap`` and ``grokking_onset_step`` (-1 until grokking is seen).

Throughput and memory use of each evaluation are logged through ``trainer.log_metrics`` as
``eval/samples_per_s``, ``eval/tokens_per_s`` and ``eval/peak_rss_mib`` (wall-clock figures stay out of the
checkpointed history, so a resumed run is bitwise identical).

Convergence, per stage (``stages.<stage name>``, defaults at the top level):

* criterion: ``metric`` >= ``threshold`` (e.g. ``exact_acc/linear_map`` >= 0.8 in the sanity stage);
* plateau: ``answer_ce`` did not improve by ``min_delta`` and the criterion metric did not rise by
  ``min_delta`` for ``patience`` evaluations; while the model memorises (train minus validation accuracy
  above ``max_gap``), the patience is ``grokking_patience_factor`` times longer, since a late rise may come;
* grokking: the first evaluation, at least ``grokking_delay`` evaluations after training accuracy reached
  ``saturation``, where the criterion metric stands ``grokking_rise`` above its value at saturation.

A curriculum stage ends on ``advance: {monitor: val/stage_complete, threshold: 1}``. The history behind
these signals is this callback's state (checkpointed); ``compute`` only reads it, and the evaluation is
added to it in ``on_validation_end``, so the trainer's start-up check of the metric names (one batch,
no ``on_validation_end``) leaves it alone.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dataset.cogment.vocabulary import TASK_NAMES
from models.components.metrics import IGNORE_INDEX
from utils.config.errors import ConfigError
from utils.evaluators import SumEvaluator
from utils.monitoring.progress import peak_memory_mib
from utils.training.callbacks import Callback

log = logging.getLogger(__name__)

STAGE_KEYS = ("metric", "threshold", "patience", "min_delta", "max_gap")


@dataclass
class StageCompletion:
    complete: bool
    criterion_met: bool
    plateaued: bool
    train_val_gap: float
    grokking_onset_step: int  # -1: not seen
    reason: str


class StageEvaluator(SumEvaluator, Callback):
    def __init__(
        self,
        task_names: Sequence[str] = TASK_NAMES,
        stages: Mapping[str, Mapping[str, Any]] | None = None,
        metric: str = "exact_acc",
        threshold: float | None = None,
        patience: int = 5,
        min_delta: float = 1e-3,
        max_gap: float = 0.2,
        grokking_patience_factor: float = 3.0,
        saturation: float = 0.95,
        grokking_rise: float = 0.2,
        grokking_delay: int = 2,
        max_steps_tracked: int = 8,
        pass_k: int = 2,
    ) -> None:
        self.task_names = list(task_names)
        self.max_steps_tracked, self.pass_k = max_steps_tracked, pass_k
        self.defaults = {"metric": metric, "threshold": threshold, "patience": patience, "min_delta": min_delta,
                         "max_gap": max_gap}
        self.stage_settings: dict[str, dict[str, Any]] = {}
        for name, settings in (stages or {}).items():
            unknown = sorted(set(settings) - set(STAGE_KEYS))
            if unknown:
                raise ConfigError(f"evaluators.stage.stages.{name}: unknown key(s) {unknown}; the keys are {', '.join(STAGE_KEYS)}")
            self.stage_settings[str(name)] = {**self.defaults, **dict(settings)}
        self.grokking_patience_factor, self.saturation = grokking_patience_factor, saturation
        self.grokking_rise, self.grokking_delay = grokking_rise, grokking_delay
        names = ["rows", "exact", "tokens", "correct", "ce", "ponder", "samples", "input_tokens"]
        for task in self.task_names:
            names += [f"rows/{task}", f"exact/{task}", f"tokens/{task}", f"correct/{task}"]
            names += [f"step_exact/{task}/{n}" for n in range(1, max_steps_tracked + 1)]
        names += [f"step_rows/{n}" for n in range(1, max_steps_tracked + 1)]
        names += [f"step_exact/{n}" for n in range(1, max_steps_tracked + 1)]
        names += ["arc_rows"] + [f"arc_pass/{k}" for k in range(1, pass_k + 1)]
        self.sum_names = tuple(names)
        super().__init__()
        # Convergence state (checkpointed): this stage's evaluations and the training accuracy since the last.
        self.stage_name: str | None = None
        self.history: list[dict[str, float]] = []
        self.train_rows: Any = 0.0
        self.train_exact: Any = 0.0
        self.last_step = 0
        self._pending: dict[str, float] | None = None
        self._started = time.perf_counter()

    # ------------------------------------------------------------------ evaluation
    def reset(self) -> None:
        super().reset()
        self._started = time.perf_counter()

    @torch.no_grad()
    def update(self, outputs: dict[str, Any], batch: dict[str, Any]) -> None:
        labels, task_type = batch["labels"], batch["task_type"]
        scored = labels != IGNORE_INDEX
        counted = scored.any(dim=1)
        tokens = scored.sum(dim=1)

        def row_stats(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            right = (logits.argmax(-1) == labels) & scored
            return ((right | ~scored).all(dim=1) & counted), right.sum(dim=1)

        exact, correct = row_stats(outputs["logits"])
        ce = torch.nn.functional.cross_entropy(outputs["logits"].float().flatten(0, 1), labels.flatten().clamp(min=0),
                                               reduction="none").view_as(labels)
        row_ce = (ce * scored).sum(1) / tokens.clamp(min=1)
        self.add("rows", counted.sum()), self.add("exact", exact.sum()), self.add("tokens", tokens.sum())
        self.add("correct", correct.sum()), self.add("ce", (row_ce * counted).sum())
        self.add("ponder", outputs["ponder_steps"].sum())
        self.add("samples", labels.shape[0]), self.add("input_tokens", batch["inputs"].numel())
        steps = outputs["step_logits"][: self.max_steps_tracked]
        step_stats = [row_stats(s)[0] for s in steps]
        for n, step_exact in enumerate(step_stats, start=1):
            self.add(f"step_rows/{n}", counted.sum())
            self.add(f"step_exact/{n}", step_exact.sum())
        for index, task in enumerate(self.task_names):
            rows = (task_type == index) & counted
            if not bool(rows.any()):
                continue
            self.add(f"rows/{task}", rows.sum()), self.add(f"exact/{task}", (exact & rows).sum())
            self.add(f"tokens/{task}", (tokens * rows).sum()), self.add(f"correct/{task}", (correct * rows).sum())
            for n, step_exact in enumerate(step_stats, start=1):
                self.add(f"step_exact/{task}/{n}", (step_exact & rows).sum())
            if task == "arc":
                self._arc_pass_at_k(outputs, labels, rows)

    def _arc_pass_at_k(self, outputs: dict[str, Any], labels: torch.Tensor, rows: torch.Tensor) -> None:
        """Attempts: the ACT mixture, then each step's prediction (last step first); distinct ones, ranked by
        mean log-probability of the predicted tokens (the mixture first: it is the model's own answer)."""
        candidates = [outputs["logits"]] + list(reversed(outputs["step_logits"]))
        for row in rows.nonzero().squeeze(1).tolist():
            scored = labels[row] != IGNORE_INDEX
            target = labels[row][scored]
            attempts: list[tuple[float, torch.Tensor]] = []
            for rank, logits in enumerate(candidates):
                log_probs = logits[row][scored].float().log_softmax(-1)
                confidence, prediction = log_probs.max(-1)
                if any(torch.equal(prediction, p) for _, p in attempts):
                    continue
                attempts.append((math.inf if rank == 0 else float(confidence.mean()), prediction))
            attempts.sort(key=lambda a: -a[0])
            self.add("arc_rows", 1.0)
            for k in range(1, self.pass_k + 1):
                self.add(f"arc_pass/{k}", float(any(torch.equal(p, target) for _, p in attempts[:k])))

    def compute(self) -> dict[str, float]:
        s = {k: float(v) for k, v in self.sums.items()}
        ratio = lambda a, b: s[a] / s[b] if s[b] > 0 else math.nan  # noqa: E731
        metrics = {"exact_acc": ratio("exact", "rows"), "token_acc": ratio("correct", "tokens"),
                   "answer_ce": ratio("ce", "rows"), "ponder_steps": ratio("ponder", "rows")}
        steps = [n for n in range(1, self.max_steps_tracked + 1) if s[f"step_rows/{n}"] > 0]
        for task in self.task_names:
            if s[f"rows/{task}"] == 0:
                continue
            metrics[f"exact_acc/{task}"] = ratio(f"exact/{task}", f"rows/{task}")
            metrics[f"token_acc/{task}"] = ratio(f"correct/{task}", f"tokens/{task}")
            if steps:  # refinement per task: the first step's prediction against the last one's
                metrics[f"first_step_exact_acc/{task}"] = ratio(f"step_exact/{task}/1", f"rows/{task}")
                metrics[f"last_step_exact_acc/{task}"] = ratio(f"step_exact/{task}/{steps[-1]}", f"rows/{task}")
        for n in steps:
            metrics[f"step_exact_acc/{n}"] = ratio(f"step_exact/{n}", f"step_rows/{n}")
        if steps:
            metrics["refinement_gain"] = metrics[f"step_exact_acc/{steps[-1]}"] - metrics["step_exact_acc/1"]
        metrics["exact_acc_per_ponder_step"] = metrics["exact_acc"] / metrics["ponder_steps"] if s["rows"] else math.nan
        if s["arc_rows"] > 0:
            for k in range(1, self.pass_k + 1):
                metrics[f"arc_pass@{k}"] = ratio(f"arc_pass/{k}", "arc_rows")
        # Convergence: this evaluation as it would enter the history (it does in on_validation_end).
        settings = self.settings()
        self._pending = {"step": float(self.last_step), "loss": metrics["answer_ce"],
                         "acc": metrics.get(settings["metric"], math.nan), "train_acc": self._train_acc()}
        done = self.check_stage_completion()
        metrics.update({"stage_complete": float(done.complete), "criterion_met": float(done.criterion_met),
                        "plateaued": float(done.plateaued), "train_exact_acc": self._pending["train_acc"],
                        "train_val_gap": done.train_val_gap, "grokking_onset_step": float(done.grokking_onset_step)})
        self._throughput = (s["samples"], s["input_tokens"], time.perf_counter() - self._started)
        return metrics

    # ------------------------------------------------------------------ convergence
    def settings(self) -> dict[str, Any]:
        return self.stage_settings.get(self.stage_name or "", self.defaults)

    def _train_acc(self) -> float:
        rows = float(self.train_rows)
        return float(self.train_exact) / rows if rows > 0 else math.nan

    def check_stage_completion(self) -> StageCompletion:
        """Whether the current stage is done, from its evaluations so far and the one just computed."""
        settings = self.settings()
        history = self.history + ([self._pending] if self._pending is not None else [])
        if not history:
            return StageCompletion(False, False, False, math.nan, -1, "no evaluation yet")
        current = history[-1]
        threshold = settings["threshold"]
        criterion_met = threshold is not None and not math.isnan(current["acc"]) and current["acc"] >= threshold
        gap = current["train_acc"] - current["acc"]
        min_delta = float(settings["min_delta"])
        patience = int(settings["patience"])
        if not math.isnan(gap) and gap > float(settings["max_gap"]):
            patience = int(math.ceil(patience * self.grokking_patience_factor))
        stale = _evaluations_without_gain(history, min_delta)
        plateaued = stale >= patience
        onset = self._grokking_onset(history)
        if criterion_met:
            reason = f"{settings['metric']}={current['acc']:.4g} >= {threshold}"
        elif plateaued:
            reason = f"converged: answer_ce and {settings['metric']} flat for {stale} evaluations (patience {patience})"
        else:
            reason = "not yet"
        return StageCompletion(criterion_met or plateaued, criterion_met, plateaued, gap, onset, reason)

    def _grokking_onset(self, history: list[dict[str, float]]) -> int:
        saturated = next((i for i, h in enumerate(history) if h["train_acc"] >= self.saturation), None)
        if saturated is None:
            return -1
        base = history[saturated]["acc"]
        for h in history[saturated + self.grokking_delay:]:
            if not math.isnan(base) and h["acc"] - base >= self.grokking_rise:
                return int(h["step"])
        return -1

    # ------------------------------------------------------------------ callback hooks
    def on_stage_start(self, trainer: Any, stage: Any) -> None:
        if stage.name != self.stage_name:  # a new stage starts its own history (a resumed one gets it back)
            self.stage_name, self.history = stage.name, []
            self.train_rows, self.train_exact = 0.0, 0.0

    @torch.no_grad()
    def on_after_optimizer_step(self, trainer: Any, batch: Any, outputs: dict[str, Any]) -> None:
        labels = outputs["labels"]
        scored = labels != IGNORE_INDEX
        right = ((outputs["logits"].argmax(-1) == labels) | ~scored).all(dim=1) & scored.any(dim=1)
        self.train_rows = self.train_rows + scored.any(dim=1).sum().double()
        self.train_exact = self.train_exact + right.sum().double()
        self.last_step = trainer.state.step

    def on_validation_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        if self._pending is not None:
            self.history.append(self._pending)
            self._pending = None
            self.train_rows, self.train_exact = 0.0, 0.0
        if metrics.get("val/stage_complete") == 1.0:
            log.info("Stage %s complete: %s", self.stage_name, self.check_stage_completion().reason)
        samples, tokens, seconds = getattr(self, "_throughput", (0.0, 0.0, 0.0))
        if seconds > 0 and trainer.dist.is_main:
            trainer.log_metrics({"eval/samples_per_s": samples / seconds, "eval/tokens_per_s": tokens / seconds,
                                 **{f"eval/{k}": v for k, v in peak_memory_mib(trainer.device).items()}})

    def state_dict(self) -> dict[str, Any]:
        return {"stage_name": self.stage_name, "history": [dict(h) for h in self.history],
                "train_rows": float(self.train_rows), "train_exact": float(self.train_exact), "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage_name, self.history = state["stage_name"], [dict(h) for h in state["history"]]
        self.train_rows, self.train_exact = float(state["train_rows"]), float(state["train_exact"])
        self.last_step = int(state["last_step"])


def _evaluations_without_gain(history: list[dict[str, float]], min_delta: float) -> int:
    """Evaluations since the last one that lowered the loss or raised the accuracy by more than ``min_delta``."""
    best_loss, best_acc, stale = math.inf, -math.inf, 0
    for h in history:
        gained = h["loss"] < best_loss - min_delta or (not math.isnan(h["acc"]) and h["acc"] > best_acc + min_delta)
        best_loss = min(best_loss, h["loss"]) if not math.isnan(h["loss"]) else best_loss
        best_acc = max(best_acc, h["acc"]) if not math.isnan(h["acc"]) else best_acc
        stale = 0 if gained else stale + 1
    return stale
