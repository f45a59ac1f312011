"""ARC Prize scoring of the ARC rows of the vision-unified data (``data=multimodal/vision_unified``).

The same voting and scoring as ``dataset.reasoning.arc_evaluator.ArcEvaluator`` (and the same
``submission.json`` written by rank 0 after every evaluation), on byte-token targets without
augmentation: a target is an output grid as digit rows separated by newlines (bytes + 2), then EOS.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from dataset.multimodal.tokens import BYTE_OFFSET, EOS_TOKEN, decode_target
from dataset.reasoning.arc_evaluator import ArcEvaluator, GridKey

log = logging.getLogger(__name__)


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
    builder adds ``task_index`` / ``test_index`` to every row, dataset/multimodal/vision_unified.py). The
    prediction is the argmax token of ``logits`` [B, T, vocab] per target position, read up to its first EOS as
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
    After every evaluation with ARC rows rank 0 writes ``<run_dir>/submission.json`` ({task id:
    [{"attempt_1": grid, "attempt_2": grid}, ...]}; ``on_validation_end``). No ARC rows at all: NaN
    pass@k, nothing written. ``sync`` gathers the votes of every rank (``all_gather_object``), as ``ArcEvaluator`` does.
    """

    def __init__(
        self,
        name: str = "arc",
        logits_key: str = "logits",
        target_key: str = "target",
        source_key: str = "source",
        arc_source: int = 0,
        arc_tasks_path: str | None = None,
    ) -> None:
        super().__init__(name=name, logits_key=logits_key, arc_tasks_path=arc_tasks_path)
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
                self.set_truth((task, test), truth)
            elif not self._warned_truncated:
                self._warned_truncated = True
                log.warning(
                    "%s: the target of ARC task %d, test input %d is cut short (no EOS): that test input cannot be "
                    "solved; raise data.target_len (a 30x30 grid needs 930) and rebuild", self.name, task, test,
                )
            self.votes.setdefault((task, test), {})[(0, b"")] = (decode_byte_grid(preds[i]), 0.0)

    def scored_tasks(self) -> list[tuple[int, str, int]]:
        """(task index, task id, number of test inputs) of every task with evaluated rows."""
        seen = sorted({task for task, _ in self.votes})
        if self.tasks is None:
            return super().scored_tasks()
        out = []
        for t in seen:
            if not 0 <= t < len(self.tasks):
                raise ValueError(
                    f"MultimodalArcEvaluator: rows of task index {t} were evaluated but {self.arc_tasks_path} lists "
                    f"{len(self.tasks)} tasks; the task list and the dataset do not match (rebuild the dataset)"
                )
            num_test = int(self.tasks[t]["num_test"])
            beyond = [j for task, j in self.votes if task == t and j >= num_test]
            if beyond:
                raise ValueError(
                    f"MultimodalArcEvaluator: task {self.tasks[t]['id']} has {num_test} test input(s) in "
                    f"{self.arc_tasks_path}, but rows of test input {max(beyond)} were evaluated; rebuild the dataset"
                )
            out.append((t, str(self.tasks[t]["id"]), num_test))
        return out

    def compute(self) -> dict[str, float]:
        if not self.votes:  # no ARC rows anywhere (all ranks agree after sync): nothing to score or write
            self.submission = None
            return {f"{self.name}_pass@1": math.nan, f"{self.name}_pass@2": math.nan,
                    f"{self.name}_num_tasks": 0.0, f"{self.name}_coverage": math.nan}
        return super().compute()
