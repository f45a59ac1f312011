"""ARC-AGI scoring: undo each row's augmentation, vote across augmentations, pass@1 / pass@2.

Every validation row is one test input of one task under one augmentation (see dataset/reasoning/arc.py).
The evaluator crops the predicted grid, maps it back to the task's original frame and counts it as
a vote for that grid. Per (task, test input) the candidates are ranked by votes, then by the mean
halting confidence (``q_halt_logits``) of their voters, as in TRM; the top two are the two attempts
ARC Prize allows. A task scores the fraction of its test inputs solved, and the metric is the mean
over tasks. Unlike the sum-based evaluators it keeps the predictions themselves, gathered across
ranks in ``sync``.

``MultimodalArcEvaluator`` (at the end) scores the ARC rows of the vision-unified data
(dataset/streaming.py) the same way: byte-token targets, no augmentation.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dataset.reasoning.arc import SEQ_LEN, decode_grid, load_arc_tasks, unaugment_grid
from dataset.streaming import BYTE_OFFSET, EOS_TOKEN, decode_target
from utils.storage.atomic import atomic_write_text

log = logging.getLogger(__name__)

# A grid as a hashable, picklable value: (height, width, uint8 bytes row-major).
GridKey = tuple[int, int, bytes]
# Votes of one (task, test input): augmentation key -> (predicted grid or None if invalid, confidence).
Votes = dict[tuple[int, bytes], tuple[GridKey | None, float]]
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


class ArcEvaluator:
    """Collects predictions of the ARC val rows; ``compute`` votes and scores them.

    Batches must carry ``labels`` [B, 900], ``task_index``, ``test_index``, ``aug_transform`` [B]
    and ``aug_colors`` [B, 10] (dataset.reasoning.arc.ArcData does). ``arc_tasks_path`` (given by the trainer
    from the data module) names the tasks and says how many test inputs each evaluation task has:
    with it, test inputs that got no prediction count as unsolved and the score is the ARC Prize
    score over the whole evaluation subset; without it only the tasks seen are scored, named by
    their index. ``run_dir`` set: rank 0 writes ``<run_dir>/submission.json`` at every compute.
    """

    def __init__(
        self,
        name: str = "arc",
        logits_key: str = "logits",
        confidence_key: str = "q_halt_logits",
        arc_tasks_path: str | None = None,
        run_dir: str | None = None,
    ) -> None:
        self.name = name
        self.logits_key = logits_key
        self.confidence_key = confidence_key
        self.arc_tasks_path = arc_tasks_path
        self.run_dir = run_dir
        self._tasks: list[dict[str, Any]] | None = None
        if arc_tasks_path is not None:
            self._tasks = load_arc_tasks(arc_tasks_path)["tasks"]
        self.votes: dict[tuple[int, int], Votes] = {}
        self.truths: dict[tuple[int, int], GridKey] = {}
        self.reset()

    def reset(self) -> None:
        self.votes = {}
        self.truths = {}

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
            self._set_truth((task, test), truth)
            pred_aug = decode_grid(preds[i])
            pred = grid_key(unaugment_grid(pred_aug, transform, colors)) if pred_aug is not None else None
            # Keyed by augmentation: a row seen twice (a distributed sampler's padding) votes once.
            self.votes.setdefault((task, test), {})[(transform, colors.tobytes())] = (pred, float(q[i]))

    def _set_truth(self, key: tuple[int, int], truth: GridKey) -> None:
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
                self._set_truth(key, truth)
            for key, per_aug in votes.items():
                self.votes.setdefault(key, {}).update(per_aug)

    # -------------------------------------------------------------------------------- scoring
    def _scored_tasks(self) -> list[tuple[int, str, int]]:
        """(task index, task id, number of test inputs) for every task the score averages over."""
        seen = sorted({task for task, _ in self.votes})
        if self._tasks is None:
            num_test = {t: 1 + max(j for task, j in self.votes if task == t) for t in seen}
            return [(t, str(t), num_test[t]) for t in seen]
        for t in seen:
            if not (0 <= t < len(self._tasks) and self._tasks[t]["eval"]):
                raise ValueError(
                    f"ArcEvaluator: rows of task index {t} were evaluated but {self.arc_tasks_path} does not list it "
                    "as an evaluation task; the task list and the dataset do not match"
                )
        return [(i, t["id"], t["num_test"]) for i, t in enumerate(self._tasks) if t["eval"]]

    def compute(self) -> dict[str, float]:
        tasks = self._scored_tasks()
        pass1 = pass2 = 0.0
        predicted = 0
        total_tests = 0
        submission: dict[str, list[dict[str, list[list[int]]]]] = {}
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
        if self.run_dir is not None and not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
            self.write_submission(Path(self.run_dir) / SUBMISSION_FILE, submission)
        n = len(tasks)
        return {
            f"{self.name}_pass@1": pass1 / n if n else math.nan,
            f"{self.name}_pass@2": pass2 / n if n else math.nan,
            f"{self.name}_num_tasks": float(n),
            # Below 1 when the evaluation was cut short (trainer.eval_max_batches): unseen inputs score 0.
            f"{self.name}_coverage": predicted / total_tests if total_tests else math.nan,
        }

    @staticmethod
    def write_submission(path: Path, submission: dict[str, Any]) -> None:
        """Write atomically: a reader (or a crash) never sees a half-written submission."""
        atomic_write_text(path, json.dumps(submission, separators=(",", ":")) + "\n")
        log.debug("Wrote %s (%d tasks)", path, len(submission))


# ------------------------------------------------------------------------ vision-unified ARC rows
def parse_grid_bytes(text: bytes) -> GridKey | None:
    """``b"012\\n340"`` (digit rows separated by newlines) as a grid; None unless non-empty and rectangular."""
    rows = text.split(b"\n")
    width = len(rows[0])
    if width == 0 or any(len(r) != width for r in rows):
        return None
    digits = np.frombuffer(b"".join(rows), dtype=np.uint8) - ord("0")  # a non-digit wraps to > 9
    if digits.size == 0 or int(digits.max()) > 9:
        return None
    return len(rows), width, digits.tobytes()


def decode_byte_grid(tokens: np.ndarray) -> GridKey | None:
    """Predicted token ids (byte b -> b + 2) up to the first EOS as a grid; None without EOS or unparsable."""
    ends = np.flatnonzero(tokens == EOS_TOKEN)
    if ends.size == 0:
        return None
    body = tokens[: ends[0]].astype(np.int64)
    if body.size == 0 or int(body.min()) < BYTE_OFFSET or int(body.max()) >= BYTE_OFFSET + 256:
        return None
    return parse_grid_bytes((body - BYTE_OFFSET).astype(np.uint8).tobytes())


class MultimodalArcEvaluator(ArcEvaluator):
    """ARC Prize scoring of the ARC rows of the vision-unified data (``data=multimodal/vision_unified``).

    Scores rows with ``source == arc_source`` and ``test_index >= 0`` (a task's test inputs; the
    builder adds ``task_index`` / ``test_index`` to every row, dataset/streaming.py). The prediction
    is the argmax token of ``logits`` [B, T, vocab] per target position, read up to its first EOS as
    digit rows separated by newlines (bytes + 2); no EOS, a non-digit or ragged rows make it a wrong
    answer. The truth is ``target`` decoded the same way (a target cut by ``target_len``, without EOS,
    cannot be solved: that test input scores 0 and a warning names ``target_len``). There is no
    augmentation to undo and a (task, test input) has one row: it is that input's only vote (a row
    seen twice, a distributed sampler's padding, votes once), so attempt 2 repeats attempt 1 and
    pass@2 = pass@1; both are reported, as ``ArcEvaluator`` does.

    Scoring (ARC Prize): a task scores the fraction of its test inputs solved; ``<name>_pass@1`` /
    ``<name>_pass@2`` average that over the tasks that have evaluated rows, ``<name>_num_tasks``
    counts them. With ``arc_tasks_path`` (the dataset's ``arc_tasks.json``; the trainer passes it as a
    fact) tasks are named by id and a task's test inputs that got no row count as unsolved
    (``<name>_coverage`` < 1); without it tasks are named by index and only the test inputs seen count.
    Tasks with no evaluated row are not scored: validation holds only the held-out tasks of the first
    ``data.val_files`` consolidated files, so most listed tasks are never evaluated by design.
    ``run_dir`` set: rank 0 writes ``<run_dir>/submission.json`` ({task id: [{"attempt_1": grid,
    "attempt_2": grid}, ...]}) at every compute with ARC rows. No ARC rows at all: NaN pass@k, nothing
    written. ``sync`` gathers the votes of every rank (``all_gather_object``), as ``ArcEvaluator`` does.
    """

    def __init__(
        self,
        name: str = "arc",
        logits_key: str = "logits",
        target_key: str = "target",
        source_key: str = "source",
        arc_source: int = 0,
        arc_tasks_path: str | None = None,
        run_dir: str | None = None,
    ) -> None:
        super().__init__(name=name, logits_key=logits_key, arc_tasks_path=arc_tasks_path, run_dir=run_dir)
        self.target_key = target_key
        self.source_key = source_key
        self.arc_source = int(arc_source)
        self._warned_truncated = False

    def update(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> None:
        keys = (self.target_key, self.source_key, "task_index", "test_index")
        missing = [k for k in keys if k not in batch]
        if missing:
            raise KeyError(
                f"MultimodalArcEvaluator: batch lacks {missing}; it needs the vision_unified data module "
                f"(data=multimodal/vision_unified, a dataset of format >= 2); keys: {sorted(batch)}"
            )
        logits, target = outputs[self.logits_key], batch[self.target_key]
        if logits.ndim != 3 or tuple(logits.shape[:2]) != tuple(target.shape):
            raise ValueError(
                f"MultimodalArcEvaluator: {self.logits_key!r} has shape {list(logits.shape)}, expected "
                f"[{target.shape[0]}, {target.shape[1] if target.ndim > 1 else '?'}, vocab] like {self.target_key!r}"
            )
        keep = (batch[self.source_key].reshape(-1) == self.arc_source) & (batch["test_index"].reshape(-1) >= 0)
        rows = keep.nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        # Argmax on the model's device, then one small transfer; everything after is CPU/numpy.
        preds = logits.detach().index_select(0, rows.to(logits.device)).argmax(dim=-1).cpu().numpy()
        cpu = {k: batch[k].index_select(0, rows.to(batch[k].device)).cpu() for k in (self.target_key, "task_index", "test_index")}
        for i in range(len(preds)):
            task, test = int(cpu["task_index"][i]), int(cpu["test_index"][i])
            text, ended = decode_target(cpu[self.target_key][i])
            if ended:
                truth = parse_grid_bytes(text)
                if truth is None:
                    raise ValueError(
                        f"MultimodalArcEvaluator: the target of task {task}, test input {test} is not a grid "
                        f"({text[:40]!r}...); is source {self.arc_source} the ARC source of this dataset?"
                    )
                self._set_truth((task, test), truth)
            elif not self._warned_truncated:
                self._warned_truncated = True
                log.warning(
                    "%s: the target of ARC task %d, test input %d is cut short (no EOS): that test input cannot be "
                    "solved; raise data.target_len (a 30x30 grid needs 930) and rebuild", self.name, task, test,
                )
            self.votes.setdefault((task, test), {})[(0, b"")] = (decode_byte_grid(preds[i]), 0.0)

    def _scored_tasks(self) -> list[tuple[int, str, int]]:
        """(task index, task id, number of test inputs) of every task with evaluated rows."""
        seen = sorted({task for task, _ in self.votes})
        if self._tasks is None:
            return super()._scored_tasks()
        out = []
        for t in seen:
            if not 0 <= t < len(self._tasks):
                raise ValueError(
                    f"MultimodalArcEvaluator: rows of task index {t} were evaluated but {self.arc_tasks_path} lists "
                    f"{len(self._tasks)} tasks; the task list and the dataset do not match (rebuild the dataset)"
                )
            num_test = int(self._tasks[t]["num_test"])
            beyond = [j for task, j in self.votes if task == t and j >= num_test]
            if beyond:
                raise ValueError(
                    f"MultimodalArcEvaluator: task {self._tasks[t]['id']} has {num_test} test input(s) in "
                    f"{self.arc_tasks_path}, but rows of test input {max(beyond)} were evaluated; rebuild the dataset"
                )
            out.append((t, str(self._tasks[t]["id"]), num_test))
        return out

    def compute(self) -> dict[str, float]:
        if not self.votes:  # no ARC rows anywhere (all ranks agree after sync): nothing to score or write
            return {f"{self.name}_pass@1": math.nan, f"{self.name}_pass@2": math.nan,
                    f"{self.name}_num_tasks": 0.0, f"{self.name}_coverage": math.nan}
        return super().compute()
