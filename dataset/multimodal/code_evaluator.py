"""Per-source evaluators for the vision-unified data (batch ``source``: 0 arc, 1 text, 2 code).

Both follow the ``SumEvaluator`` protocol (utils/evaluators.py): sums over the rows of one source,
all-reduced exactly across ranks. Targets are byte-level tokens with -100 after EOS (ignored).

* ``CodeEvaluator`` (rows with ``source == 2``): ``<name>_token_acc`` -- next-token accuracy over the
  scored target tokens (EOS included) -- and ``<name>_line_exact`` -- the fraction of rows whose whole
  completion up to and including EOS is right.
* ``SourceExactMatch(source, name)``: exact match of the rows of one source, e.g. ARC rows' whole
  output grid (``source: 0, name: arc_exact``).

A source with no rows in the validation set reports NaN (not 0: nothing was measured).
"""

from __future__ import annotations

import torch

from utils.evaluators import SumEvaluator, predictions_and_targets

SOURCES = {"arc": 0, "text": 1, "code": 2}


def _rows_of_source(evaluator: str, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], logits_key: str,
                    target_key: str, source_key: str, source: int) -> tuple[torch.Tensor, torch.Tensor]:
    pred, target = predictions_and_targets(evaluator, outputs, batch, logits_key, target_key)
    sources = batch.get(source_key)
    if sources is None:
        raise KeyError(f"{evaluator}: the batch has no {source_key!r} (per-row source ids); keys: {sorted(batch)}")
    keep = sources.reshape(-1).to(pred.device) == source
    rows = pred.shape[0]
    return pred.reshape(rows, -1)[keep], target.reshape(rows, -1)[keep]


class CodeEvaluator(SumEvaluator):
    """Next-token accuracy and exact line completion over the code rows (``source == source_id``)."""

    sum_names = ("correct_tokens", "tokens", "correct_lines", "lines")

    def __init__(self, logits_key: str = "logits", target_key: str = "target", source_key: str = "source",
                 source_id: int = SOURCES["code"], name: str = "code", ignore_index: int = -100) -> None:
        super().__init__()
        self._set_keys(logits_key, target_key, name, ignore_index)
        self.source_key, self.source_id = source_key, source_id

    def update(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> None:
        pred, target = _rows_of_source(type(self).__name__, outputs, batch, self.logits_key, self.target_key,
                                       self.source_key, self.source_id)
        scored = target != self.ignore_index
        hit = (pred == target) & scored
        self.add("correct_tokens", hit.sum())
        self.add("tokens", scored.sum())
        counted = scored.any(dim=1)
        self.add("correct_lines", ((hit | ~scored).all(dim=1) & counted).sum())
        self.add("lines", counted.sum())

    def compute(self) -> dict[str, float]:
        return {f"{self.name}_token_acc": self._ratio("correct_tokens", "tokens"),
                f"{self.name}_line_exact": self._ratio("correct_lines", "lines")}


class SourceExactMatch(SumEvaluator):
    """Fraction of the rows of one ``source`` whose every scored target token is predicted right."""

    sum_names = ("correct_rows", "rows")

    def __init__(self, source: int, name: str, logits_key: str = "logits", target_key: str = "target",
                 source_key: str = "source", ignore_index: int = -100) -> None:
        super().__init__()
        self._set_keys(logits_key, target_key, name, ignore_index)
        self.source_key, self.source = source_key, int(source)

    def update(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> None:
        pred, target = _rows_of_source(type(self).__name__, outputs, batch, self.logits_key, self.target_key,
                                       self.source_key, self.source)
        scored = target != self.ignore_index
        counted = scored.any(dim=1)
        self.add("correct_rows", (((pred == target) | ~scored).all(dim=1) & counted).sum())
        self.add("rows", counted.sum())

    def compute(self) -> dict[str, float]:
        return {self.name: self._ratio("correct_rows", "rows")}
