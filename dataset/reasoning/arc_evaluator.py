"""ARC-AGI scoring: undo each row's augmentation, vote across augmentations, pass@1 / pass@2.

Every validation row is one test input of one task under one augmentation (see dataset/reasoning/arc.py).
The evaluator crops the predicted grid, maps it back to the task's original frame and counts it as
a vote for that grid. Per (task, test input) the candidates are ranked by votes, then by the mean
halting confidence (``q_halt_logits``) of their voters, as in TRM; the top two are the two attempts
ARC Prize allows. A task scores the fraction of its test inputs solved, and the metric is the mean
over tasks. Unlike the sum-based evaluators it keeps the predictions themselves, gathered across
ranks in ``sync``.

The evaluator is a ``Callback``: after every evaluation (``on_validation_end``) rank 0 writes what the
last ``compute()`` produced as ``<run_dir>/submission.json`` (ARC Prize format). The vision-unified
data has its own subclass, ``dataset.multimodal.arc_evaluator.MultimodalArcEvaluator``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from dataset.reasoning.arc import SEQ_LEN, decode_grid, load_arc_tasks, unaugment_grid
from utils.storage.atomic import atomic_write_text
from utils.training.callbacks import Callback

if TYPE_CHECKING:
    from utils.training.trainer import Trainer

log = logging.getLogger(__name__)

# A grid as a hashable, picklable value: (height, width, uint8 bytes row-major).
GridKey = tuple[int, int, bytes]
# Votes of one (task, test input): augmentation key -> (predicted grid or None if invalid, confidence).
Votes = dict[tuple[int, bytes], tuple[GridKey | None, float]]
# ARC Prize's submission: {task id: [{"attempt_1": grid, "attempt_2": grid} per test input]}.
Submission = dict[str, list[dict[str, list[list[int]]]]]
SUBMISSION_FILE = "submission.json"
BATCH_KEYS = ("labels", "task_index", "test_index", "aug_transform", "aug_colors")


def grid_key(grid: np.ndarray) -> GridKey:
    grid = np.ascontiguousarray(grid, dtype=np.uint8)
    return int(grid.shape[0]), int(grid.shape[1]), grid.tobytes()


def key_to_list(key: GridKey) -> list[list[int]]:
    h, w, data = key
    return np.frombuffer(data, dtype=np.uint8).reshape(h, w).tolist()


def rank_candidates(votes: Votes) -> list[GridKey]:
    """Distinct valid predicted grids, best first: most votes, then highest mean confidence.

    Remaining ties are broken by the grid itself so the result does not depend on the order the
    rows arrived in (batches, ranks)."""
    counts: dict[GridKey, int] = {}
    confidence: dict[GridKey, float] = {}
    for pred, q in votes.values():
        if pred is None:
            continue  # an invalid crop is a wrong answer, not a candidate
        counts[pred] = counts.get(pred, 0) + 1
        confidence[pred] = confidence.get(pred, 0.0) + q
    return sorted(counts, key=lambda g: (-counts[g], -confidence[g] / counts[g], g))


class ArcEvaluator(Callback):
    """Collects predictions of the ARC val rows; ``compute`` votes and scores them.

    Batches must carry ``labels`` [B, 900], ``task_index``, ``test_index``, ``aug_transform`` [B]
    and ``aug_colors`` [B, 10] (dataset.reasoning.arc.ArcData does). ``arc_tasks_path`` (given by the trainer
    from the data module) names the tasks and says how many test inputs each evaluation task has:
    with it, test inputs that got no prediction count as unsolved and the score is the ARC Prize
    score over the whole evaluation subset; without it only the tasks seen are scored, named by
    their index. After every evaluation rank 0 writes ``<run_dir>/submission.json`` (``on_validation_end``).
    """

    def __init__(
        self,
        name: str = "arc",
        logits_key: str = "logits",
        confidence_key: str = "q_halt_logits",
        arc_tasks_path: str | None = None,
    ) -> None:
        self.name = name
        self.logits_key = logits_key
        self.confidence_key = confidence_key
        self.arc_tasks_path = arc_tasks_path
        self.tasks: list[dict[str, Any]] | None = None
        if arc_tasks_path is not None:
            self.tasks = load_arc_tasks(arc_tasks_path)["tasks"]
        self.votes: dict[tuple[int, int], Votes] = {}
        self.truths: dict[tuple[int, int], GridKey] = {}
        self.submission: Submission | None = None  # what the last compute() produced
        self.reset()

    def reset(self) -> None:
        self.votes = {}
        self.truths = {}
        self.submission = None

    # ------------------------------------------------------------------------------- collecting
    def update(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> None:
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise KeyError(f"ArcEvaluator: batch lacks {missing}; it needs the ARC data module (data=reasoning/arc)")
        logits = outputs[self.logits_key]
        if logits.ndim != 3 or logits.shape[1] != SEQ_LEN or logits.shape[0] != batch["labels"].shape[0]:
            raise ValueError(
                f"ArcEvaluator: {self.logits_key!r} has shape {list(logits.shape)}, expected "
                f"[{batch['labels'].shape[0]}, {SEQ_LEN}, vocab]"
            )
        rows = (batch["test_index"] >= 0).nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        # Argmax on the model's device, then one small transfer; everything after is CPU/numpy.
        preds = logits.index_select(0, rows.to(logits.device)).argmax(dim=-1).cpu().numpy()
        confidence = outputs.get(self.confidence_key)
        q = (
            confidence.detach().index_select(0, rows.to(confidence.device)).float().reshape(-1).cpu().numpy()
            if confidence is not None
            else np.zeros(len(preds), dtype=np.float32)
        )
        cpu = {k: batch[k].index_select(0, rows.to(batch[k].device)).cpu().numpy() for k in BATCH_KEYS}
        for i in range(len(preds)):
            task, test = int(cpu["task_index"][i]), int(cpu["test_index"][i])
            transform, colors = int(cpu["aug_transform"][i]), cpu["aug_colors"][i].astype(np.int64)
            truth_aug = decode_grid(cpu["labels"][i])
            if truth_aug is None:
                raise ValueError(f"ArcEvaluator: the labels of task {task}, test input {test} do not decode to a grid")
            truth = grid_key(unaugment_grid(truth_aug, transform, colors))
            self.set_truth((task, test), truth)
            pred_aug = decode_grid(preds[i])
            pred = grid_key(unaugment_grid(pred_aug, transform, colors)) if pred_aug is not None else None
            # Keyed by augmentation: a row seen twice (a distributed sampler's padding) votes once.
            self.votes.setdefault((task, test), {})[(transform, colors.tobytes())] = (pred, float(q[i]))

    def set_truth(self, key: tuple[int, int], truth: GridKey) -> None:
        """Record the answer of (task, test input); every row of it must agree."""
        previous = self.truths.setdefault(key, truth)
        if previous != truth:
            # All augmentations of a test input must map back to the same answer: a data bug otherwise.
            raise ValueError(
                f"ArcEvaluator: task {key[0]}, test input {key[1]}: augmented labels map back to different "
                "grids; the dataset's augmentation columns do not match its labels (rebuild the dataset)"
            )

    def sync(self) -> None:
        """Gather every rank's predictions, so that all ranks compute the same totals."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self.state())
        self.load_states(gathered)  # rank order: the same merge on every rank

    def state(self) -> tuple[dict[tuple[int, int], Votes], dict[tuple[int, int], GridKey]]:
        """What one rank collected (picklable)."""
        return self.votes, self.truths

    def load_states(self, states: list[tuple[dict[tuple[int, int], Votes], dict[tuple[int, int], GridKey]]]) -> None:
        """Replace what was collected by the union of ``states`` (a row seen on two ranks votes once)."""
        self.votes, self.truths = {}, {}
        for votes, truths in states:
            for key, truth in truths.items():
                self.set_truth(key, truth)
            for key, per_aug in votes.items():
                self.votes.setdefault(key, {}).update(per_aug)

    # -------------------------------------------------------------------------------- scoring
    def scored_tasks(self) -> list[tuple[int, str, int]]:
        """(task index, task id, number of test inputs) for every task the score averages over."""
        seen = sorted({task for task, _ in self.votes})
        if self.tasks is None:
            num_test = {t: 1 + max(j for task, j in self.votes if task == t) for t in seen}
            return [(t, str(t), num_test[t]) for t in seen]
        for t in seen:
            if not (0 <= t < len(self.tasks) and self.tasks[t]["eval"]):
                raise ValueError(
                    f"ArcEvaluator: rows of task index {t} were evaluated but {self.arc_tasks_path} does not list it "
                    "as an evaluation task; the task list and the dataset do not match"
                )
        return [(i, t["id"], t["num_test"]) for i, t in enumerate(self.tasks) if t["eval"]]

    def compute(self) -> dict[str, float]:
        tasks = self.scored_tasks()
        pass1 = pass2 = 0.0
        predicted = 0
        total_tests = 0
        submission: Submission = {}
        for task, task_id, num_test in tasks:
            solved1 = solved2 = 0
            attempts = []
            for test in range(num_test):
                ranked = rank_candidates(self.votes.get((task, test), {}))
                truth = self.truths.get((task, test))
                solved1 += int(truth is not None and ranked[:1] == [truth])
                solved2 += int(truth is not None and truth in ranked[:2])
                predicted += int((task, test) in self.votes)
                # ARC Prize wants two attempts per test input: repeat the first when there is one
                # candidate, and a placeholder [[0]] when there is none.
                first = key_to_list(ranked[0]) if ranked else [[0]]
                second = key_to_list(ranked[1]) if len(ranked) > 1 else first
                attempts.append({"attempt_1": first, "attempt_2": second})
            pass1 += solved1 / num_test
            pass2 += solved2 / num_test
            total_tests += num_test
            submission[task_id] = attempts
        self.submission = submission
        n = len(tasks)
        return {
            f"{self.name}_pass@1": pass1 / n if n else math.nan,
            f"{self.name}_pass@2": pass2 / n if n else math.nan,
            f"{self.name}_num_tasks": float(n),
            # Below 1 when the evaluation was cut short (trainer.eval_max_batches): unseen inputs score 0.
            f"{self.name}_coverage": predicted / total_tests if total_tests else math.nan,
        }

    def write_submission(self, path: Path) -> None:
        """Write what the last ``compute()`` produced, atomically: a reader (or a crash) never sees half a file."""
        if self.submission is None:
            raise RuntimeError(f"{type(self).__name__}: no submission to write to {path}; call compute() first")
        atomic_write_text(Path(path), json.dumps(self.submission, separators=(",", ":")) + "\n")
        log.debug("Wrote %s (%d tasks)", path, len(self.submission))

    def on_validation_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """Rank 0 writes ``<run_dir>/submission.json`` from this evaluation (when it scored something)."""
        if trainer.dist.is_main and self.submission is not None:
            self.write_submission(Path(trainer.run_dir) / SUBMISSION_FILE)
