"""Evaluators specific to grid puzzles (sums only, so all-reduce across ranks is exact)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dataset.reasoning.sudoku import box_shape
from utils.evaluators import SumEvaluator


class SudokuValidity(SumEvaluator):
    """Fraction of predicted grids that are valid complete Sudokus, and valid *and* keep the givens.

    The prediction is ``argmax(outputs[logits_key])`` over tokens (digit d = token - 1, see
    dataset/reasoning/sudoku.py). A grid is valid when every row, column and box holds each digit 1..n exactly
    once. This credits any correct solution, not only the stored label (which is the unique solution of
    generated puzzles, but a model could still solve an ambiguous file puzzle differently).
    """

    sum_names = ("valid", "valid_consistent", "rows")

    def __init__(
        self,
        name: str = "valid_grid",
        seq_len: int | None = None,
        logits_key: str = "logits",
        inputs_key: str = "inputs",
    ) -> None:
        super().__init__()
        self.name, self.logits_key, self.inputs_key = name, logits_key, inputs_key
        self.seq_len = seq_len
        if seq_len is not None:
            self.n = self._size_for(seq_len)

    @staticmethod
    def _size_for(seq_len: int) -> int:
        n = math.isqrt(int(seq_len))
        if n * n != seq_len or n not in (4, 6, 9):
            raise ValueError(f"SudokuValidity: seq_len must be n*n for n in 4, 6, 9 (16, 36, 81), got {seq_len}")
        return n

    def update(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> None:
        logits, inputs = outputs[self.logits_key], batch[self.inputs_key]
        if logits.ndim != 3 or logits.shape[:2] != inputs.shape:
            raise ValueError(
                f"SudokuValidity: {self.logits_key!r} has shape {list(logits.shape)} but {self.inputs_key!r} has "
                f"shape {list(inputs.shape)}; expected logits [B, L, V] and inputs [B, L]"
            )
        length = logits.shape[1]
        if self.seq_len is not None and length != self.seq_len:
            raise ValueError(f"SudokuValidity: expected sequences of {self.seq_len} cells, got {length}")
        n = self.n if self.seq_len is not None else self._size_for(length)
        br, bc = box_shape(n)
        batch_size = logits.shape[0]

        pred = logits.argmax(dim=-1)  # tokens
        digits = pred - 1
        in_range = ((digits >= 1) & (digits <= n)).all(dim=1)
        # One-hot over digits 1..n (out-of-range cells count as nothing and fail via in_range).
        onehot = F.one_hot((digits - 1).clamp(0, n - 1), n).view(batch_size, n, n, n)
        # A unit of n cells holds every digit exactly once iff each digit's count in it is 1.
        rows_ok = (onehot.sum(dim=2) == 1).flatten(1).all(dim=1)
        cols_ok = (onehot.sum(dim=1) == 1).flatten(1).all(dim=1)
        boxes = onehot.view(batch_size, n // br, br, n // bc, bc, n).sum(dim=(2, 4))
        boxes_ok = (boxes == 1).flatten(1).all(dim=1)
        valid = in_range & rows_ok & cols_ok & boxes_ok

        # Givens are input tokens >= 2 (0 = padding, 1 = blank); a consistent grid keeps them all.
        given = inputs >= 2
        consistent = (~given | (pred == inputs)).all(dim=1)
        self.add("valid", valid.sum())
        self.add("valid_consistent", (valid & consistent).sum())
        self.add("rows", batch_size)

    def compute(self) -> dict[str, float]:
        return {
            self.name: self._ratio("valid", "rows"),
            f"{self.name}_consistent": self._ratio("valid_consistent", "rows"),
        }
