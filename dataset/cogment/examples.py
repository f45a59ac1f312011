"""The one example layout every Cogment task is written in, and the helpers that build it.

An example is four aligned rows of the stage's sequence length (padded with ``<pad>``):

* ``inputs``   token ids the model reads;
* ``labels``   the answer at the positions the model must fill, ``IGNORE_LABEL`` elsewhere;
* ``cue``      the positions that address the long-term memory: the question of a text task, the puzzle of
  a grid task (models/cogment/memory.py turns them into a memory key);
* ``rotation`` where each position's token comes from when every grid block of the example is turned by
  90 degrees (the identity for tasks that are not grids, and for grids a rotation would make invalid);
  the consistency loss compares the prediction for the rotated input with the rotated prediction.

An example may also carry a ``study`` example: a document the long-term memory writes, during an
evaluation, before the example is asked without it (passkey retrieval across contexts); it is stored as
``study_inputs``, ``study_labels`` and ``study_cue`` of the same length and is never scored.

Two shapes cover all tasks:

* **grid blocks**: ``side x side`` canvases flattened row-major, separated by ``<sep>``; a grid smaller than
  the canvas sits top-left with ``<gridpad>`` around it. Puzzles (maze, Sudoku) are one block whose
  labels are the solved grid; ARC tasks are demonstration pairs, the test input, and the test output as
  ``<answer>`` slots.
* **question answering**: ``context <sep> question <query> <answer> x slots``, labels are the answer's
  tokens then ``<eos>`` at the slots; the cue is the question and ``<query>``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dataset.cogment.vocabulary import ANSWER, EOS, GRIDPAD, PAD, QUERY, SEP

IGNORE_LABEL = -100


@dataclass
class Example:
    inputs: np.ndarray  # int64 [n]
    labels: np.ndarray  # int64 [n]
    cue: np.ndarray  # bool [n]
    rotation: np.ndarray | None = None  # int64 [n], or None for "no rotation"
    study: "Example | None" = None  # a document the memory writes before this example is asked (evaluation)

    def __post_init__(self) -> None:
        n = len(self.inputs)
        assert len(self.labels) == n and len(self.cue) == n, "example rows differ in length"
        assert self.rotation is None or len(self.rotation) == n

    def __len__(self) -> int:
        return len(self.inputs)


def pad_rows(example: Example, seq_len: int) -> dict[str, np.ndarray]:
    """The example's four rows padded to ``seq_len`` (the caller made sure it fits)."""
    n = len(example)
    if n > seq_len:
        raise ValueError(f"an example of {n} tokens does not fit seq_len {seq_len}")
    inputs = np.full(seq_len, PAD, dtype=np.int64)
    labels = np.full(seq_len, IGNORE_LABEL, dtype=np.int64)
    cue = np.zeros(seq_len, dtype=bool)
    rotation = np.arange(seq_len, dtype=np.int64)
    inputs[:n], labels[:n], cue[:n] = example.inputs, example.labels, example.cue
    if example.rotation is not None:
        rotation[:n] = example.rotation
    return {"inputs": inputs, "labels": labels, "cue": cue, "rotation": rotation}


STUDY_KEYS = ("study_inputs", "study_labels", "study_cue")


def pad_study(example: Example, seq_len: int) -> dict[str, np.ndarray]:
    """The ``study_*`` rows of an example: its study document padded to ``seq_len`` (nothing, all padding and
    unscored, for an example without one)."""
    rows = pad_rows(example.study if example.study is not None else Example(*(np.zeros(0, t) for t in (np.int64, np.int64, bool))),
                    seq_len)
    return {f"study_{k}": rows[k] for k in ("inputs", "labels", "cue")}


# --------------------------------------------------------------------------------------------- grids
def canvas(grid: np.ndarray, side: int, fill: int = GRIDPAD) -> np.ndarray:
    """A ``side x side`` canvas of token ids with ``grid`` (token ids) top-left and ``fill`` around it."""
    h, w = grid.shape
    if h > side or w > side:
        raise ValueError(f"a {h}x{w} grid does not fit a {side}x{side} canvas")
    out = np.full((side, side), fill, dtype=np.int64)
    out[:h, :w] = grid
    return out


def block_rotation(side: int, offset: int) -> np.ndarray:
    """Source positions of a ``side x side`` block at ``offset`` turned 90 degrees counter-clockwise
    (``np.rot90``): the new cell (i, j) holds the old cell (j, side - 1 - i)."""
    i, j = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    return (offset + j * side + (side - 1 - i)).reshape(-1)


def grid_blocks(blocks: list[np.ndarray], answer_blocks: set[int], cue_blocks: set[int], side: int,
                rotatable: bool = True) -> Example:
    """Blocks (canvases of token ids) joined by ``<sep>``; blocks in ``answer_blocks`` become ``<answer>``
    slots labelled with their content, the others are read. ``cue_blocks`` address the memory."""
    inputs, labels, cue, rotation = [], [], [], []
    position = 0
    for b, block in enumerate(blocks):
        if b > 0:
            inputs.append([SEP]), labels.append([IGNORE_LABEL]), cue.append([False]), rotation.append([position])
            position += 1
        flat = block.reshape(-1)
        if b in answer_blocks:
            inputs.append(np.full(flat.size, ANSWER)), labels.append(flat)
        else:
            inputs.append(flat), labels.append(np.full(flat.size, IGNORE_LABEL))
        cue.append(np.full(flat.size, b in cue_blocks))
        rotation.append(block_rotation(side, position) if rotatable else np.arange(position, position + flat.size))
        position += flat.size
    return Example(np.concatenate(inputs).astype(np.int64), np.concatenate(labels).astype(np.int64),
                   np.concatenate(cue), np.concatenate(rotation).astype(np.int64) if rotatable else None)


def solved_in_place(puzzle: np.ndarray, solution: np.ndarray, rotatable: bool) -> Example:
    """A one-block puzzle (maze, Sudoku): read the puzzle, predict the solved grid at the same cells."""
    side = puzzle.shape[0]
    flat = puzzle.reshape(-1).astype(np.int64)
    rotation = block_rotation(side, 0) if rotatable else None
    return Example(flat, solution.reshape(-1).astype(np.int64), np.ones(flat.size, dtype=bool), rotation)


# ---------------------------------------------------------------------------------- question answering
def question_answer(context: list[int], question: list[int], answer: list[int], slots: int) -> Example:
    """``context <sep> question <query> <answer> x slots``: labels are the answer, then ``<eos>``."""
    if len(answer) + 1 > slots:
        raise ValueError(f"an answer of {len(answer)} tokens needs {len(answer) + 1} slots, the task has {slots}")
    head = list(context) + [SEP] + list(question) + [QUERY] if context else list(question) + [QUERY]
    inputs = np.array(head + [ANSWER] * slots, dtype=np.int64)
    labels = np.full(len(inputs), IGNORE_LABEL, dtype=np.int64)
    start = len(head)
    labels[start:start + len(answer) + 1] = list(answer) + [EOS]
    cue = np.zeros(len(inputs), dtype=bool)
    cue[start - len(question) - 1:start] = True
    return Example(inputs, labels, cue)


def fit_context(context: list[int], budget: int) -> list[int]:
    """``context`` cut to ``budget`` tokens by dropping its middle (LongBench's truncation: the start and
    the end of a document carry most of what is asked)."""
    if len(context) <= budget:
        return list(context)
    if budget <= 0:
        return []
    head = budget // 2
    return list(context[:head]) + list(context[len(context) - (budget - head):])
