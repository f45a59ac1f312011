"""ListOps (Nangia & Bowman 2018; the Long Range Arena version): nested list operations on digits.

``[MAX 2 9 [MIN 4 7 ] 0 ]`` is 9. Operators: ``[MAX``, ``[MIN``, ``[MED`` (the median, truncated to an
integer as the LRA generator does) and ``[SM`` (sum modulo 10); ``]`` closes a list.

* Generated: expressions of depth at most ``max_depth`` with at most ``max_args`` arguments per list,
  no longer than the sequence allows.
* Real files: the LRA TSV (``data.listops_path``): a header ``Source<TAB>Target``, then one expression and
  its value per line; the parentheses of the LRA files are dropped (they only group tokens).

Example layout: ``expression <query> <answer> <answer>``, labelled ``value <eos>``.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Union

import numpy as np

from dataset.cogment.examples import Example, question_answer
from dataset.cogment.real_files import read_text_lines
from dataset.cogment.tasks import TaskSource
from dataset.cogment.vocabulary import LISTOPS_OPERATORS
from utils.config.errors import ConfigError

Expression = Union[int, tuple[str, list["Expression"]]]


def evaluate(expr: Expression) -> int:
    if isinstance(expr, int):
        return expr
    op, args = expr
    values = [evaluate(a) for a in args]
    if op == "[MAX":
        return max(values)
    if op == "[MIN":
        return min(values)
    if op == "[MED":
        return int(statistics.median(values))
    if op == "[SM":
        return sum(values) % 10
    raise ValueError(f"unknown ListOps operator {op!r}")


def to_tokens(expr: Expression) -> list[str]:
    if isinstance(expr, int):
        return [str(expr)]
    op, args = expr
    return [op] + [t for a in args for t in to_tokens(a)] + ["]"]


def parse(tokens: list[str], where: str) -> Expression:
    """The expression of LRA tokens (parentheses already dropped); ConfigError naming ``where`` if malformed."""
    position = 0

    def node() -> Expression:
        nonlocal position
        if position >= len(tokens):
            raise ConfigError(f"{where}: the expression ends inside a list (a ']' is missing)")
        token = tokens[position]
        position += 1
        if token in LISTOPS_OPERATORS:
            args = []
            while position < len(tokens) and tokens[position] != "]":
                args.append(node())
            if position >= len(tokens):
                raise ConfigError(f"{where}: the expression ends inside a list (a ']' is missing)")
            position += 1
            if not args:
                raise ConfigError(f"{where}: {token} has no arguments")
            return (token, args)
        if token.isdigit() and len(token) == 1:
            return int(token)
        raise ConfigError(f"{where}: unexpected token {token!r}; ListOps tokens are digits, "
                          f"{', '.join(LISTOPS_OPERATORS)} and ']'")

    expr = node()
    if position != len(tokens):
        raise ConfigError(f"{where}: tokens after the end of the expression ({' '.join(tokens[position:][:5])} ...)")
    return expr


def shuffle_arguments(expr: Expression, rng: np.random.Generator) -> Expression:
    """The same value with every list's arguments in another order (all four operators are symmetric)."""
    if isinstance(expr, int):
        return expr
    op, args = expr
    shuffled = [shuffle_arguments(a, rng) for a in args]
    return (op, [shuffled[i] for i in rng.permutation(len(shuffled))])


def read_listops_tsv(path: str | Path) -> list[tuple[Expression, int]]:
    """(expression, value) rows of an LRA ListOps TSV; every problem is a ConfigError naming the file and line."""
    rows = []
    lines = read_text_lines(path, "data.listops_path")
    if not lines or lines[0].strip().split("\t")[:2] != ["Source", "Target"]:
        raise ConfigError(f"{path}:1: expected the LRA header 'Source<TAB>Target'; data.listops_path must be an "
                          "LRA ListOps TSV (e.g. basic_train.tsv)")
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 2:
            raise ConfigError(f"{path}:{number}: expected 'expression<TAB>value', got {len(parts)} tab-separated fields")
        source, target = parts
        tokens = [t for t in source.split() if t not in ("(", ")")]
        expr = parse(tokens, f"{path}:{number}")
        if not target.strip().isdigit() or not 0 <= int(target) <= 9:
            raise ConfigError(f"{path}:{number}: the value must be a digit 0..9, got {target!r}")
        if evaluate(expr) != int(target):
            raise ConfigError(f"{path}:{number}: the expression evaluates to {evaluate(expr)}, the file says {target}")
        rows.append((expr, int(target)))
    if not rows:
        raise ConfigError(f"{path}: no expressions after the header")
    return rows


class ListOps(TaskSource):
    name = "listops"
    OPTIONS = {"max_depth": 3, "max_args": 4, "path": None, "val_fraction": 0.1}

    def check_options(self) -> None:
        self.max_depth = self.require_int("max_depth", 1, 20)
        self.max_args = self.require_int("max_args", 2, 10)
        self.budget = self.seq_len - 3  # <query> and two answer slots
        self.rows: dict[str, list[tuple[Expression, int]]] | None = None
        if self.options["path"] is not None:
            rows = [r for r in read_listops_tsv(self.options["path"]) if len(to_tokens(r[0])) <= self.budget]
            if not rows:
                raise ConfigError(f"{self.options['path']}: no expression fits data.seq_len={self.seq_len}; raise it")
            order = np.random.default_rng([self.seed, 3003]).permutation(len(rows))
            n_val = max(1, int(len(rows) * float(self.options["val_fraction"])))
            self.rows = {"val": [rows[i] for i in order[:n_val]], "train": [rows[i] for i in order[n_val:]] or rows}

    def _random_expression(self, rng: np.random.Generator, depth: int) -> Expression:
        if depth == 0 or (depth < self.max_depth and rng.random() < 0.3):
            return int(rng.integers(10))
        op = LISTOPS_OPERATORS[int(rng.integers(len(LISTOPS_OPERATORS)))]
        count = int(rng.integers(2, self.max_args + 1))
        return (op, [self._random_expression(rng, depth - 1) for _ in range(count)])

    def sample(self, split: str, rng: np.random.Generator) -> Example:
        if self.rows is not None:
            expr, value = self.rows[split][int(rng.integers(len(self.rows[split])))]
        else:
            for _ in range(100):
                expr = self._random_expression(rng, self.max_depth)
                if isinstance(expr, tuple) and len(to_tokens(expr)) <= self.budget:
                    break
            else:
                raise self.too_long(len(to_tokens(expr)), f"lower {self.option_key('max_depth')} or "
                                    f"{self.option_key('max_args')}, or raise data.seq_len")
            value = evaluate(expr)
        if self.augmentation.applies(rng, split) and self.augmentation.allows("shuffle_ops"):
            expr = shuffle_arguments(expr, rng)
        return question_answer([], self.vocab.ids(to_tokens(expr)), [self.vocab.id(str(value))], slots=2)
