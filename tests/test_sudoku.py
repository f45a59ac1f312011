"""Sudoku generator, CSV loader, augmentation, builder / data module and the SudokuValidity evaluator.

Uniqueness and validity are checked with a deliberately naive solver and checker written here, not
with the bitmask solver under test.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dataset.reasoning import puzzles as puzzles_module
from dataset.base import DiskDatasetBuilder
from dataset.reasoning.sudoku import (
    SudokuAugmentation,
    SudokuAugmentationBatch,
    SudokuBuilder,
    SudokuData,
    SudokuFileError,
    SudokuGenerationError,
    count_solutions,
    generate_puzzle,
    load_csv,
    write_csv,
)
from tests.cli_helpers import paths, run
from tests.conftest import CONF_DIR, compose_config
from utils.config.errors import ConfigError
from utils.config.validation import validate_config
from utils.signals import EXIT_CONFIG
from dataset.reasoning.evaluators import SudokuValidity

BOXES = {4: (2, 2), 6: (2, 3), 9: (3, 3)}


# ------------------------------------------------------------------------- independent reference
def ref_units(n: int) -> list[list[tuple[int, int]]]:
    br, bc = BOXES[n]
    rows = [[(r, c) for c in range(n)] for r in range(n)]
    cols = [[(r, c) for r in range(n)] for c in range(n)]
    boxes = [
        [(r0 + r, c0 + c) for r in range(br) for c in range(bc)] for r0 in range(0, n, br) for c0 in range(0, n, bc)
    ]
    return rows + cols + boxes


def ref_valid(grid: np.ndarray) -> bool:
    g = np.asarray(grid).reshape(int(np.sqrt(np.asarray(grid).size)), -1)
    n = g.shape[0]
    return all(sorted(int(g[cell]) for cell in unit) == list(range(1, n + 1)) for unit in ref_units(n))


def ref_count(grid: np.ndarray, limit: int = 2) -> int:
    """Solutions of a digit grid, by plain backtracking with sets (most-constrained cell first)."""
    g = [[int(v) for v in row] for row in np.asarray(grid)]
    n = len(g)
    units = ref_units(n)
    peers = {
        (r, c): {cell for unit in units if (r, c) in unit for cell in unit} - {(r, c)} for r in range(n) for c in range(n)
    }

    def count() -> int:
        best, best_options = None, None
        for r in range(n):
            for c in range(n):
                if g[r][c] == 0:
                    options = set(range(1, n + 1)) - {g[p][q] for p, q in peers[(r, c)]}
                    if best_options is None or len(options) < len(best_options):
                        best, best_options = (r, c), options
        if best is None:
            return 1
        total = 0
        for d in sorted(best_options):
            g[best[0]][best[1]] = d
            total += count()
            g[best[0]][best[1]] = 0
            if total >= limit:
                break
        return total

    return count()


SOLUTION_4 = np.array([[1, 2, 3, 4], [3, 4, 1, 2], [2, 1, 4, 3], [4, 3, 2, 1]])
SOLUTION_6 = np.array(
    [
        [1, 2, 3, 4, 5, 6],
        [4, 5, 6, 1, 2, 3],
        [2, 3, 1, 5, 6, 4],
        [5, 6, 4, 2, 3, 1],
        [3, 1, 2, 6, 4, 5],
        [6, 4, 5, 3, 1, 2],
    ]
)


# ---------------------------------------------------------------------------------- generation
@pytest.mark.parametrize(("n", "givens", "count"), [(4, 4, 12), (4, 6, 12), (6, 10, 6), (6, 14, 6), (9, 28, 2)])
def test_generated_puzzles_have_the_givens_and_a_unique_valid_solution(n: int, givens: int, count: int) -> None:
    rng = random.Random(n * 100 + givens)
    for _ in range(count):
        puzzle, solution = generate_puzzle(n, givens, rng)
        assert puzzle.shape == solution.shape == (n, n)
        assert int((puzzle != 0).sum()) == givens
        assert ref_valid(solution)
        assert np.all((puzzle == 0) | (puzzle == solution))
        assert ref_count(puzzle) == 1
        assert count_solutions(puzzle) == 1


def test_generation_is_seeded() -> None:
    a = [generate_puzzle(6, 12, random.Random(7)) for _ in range(2)]
    b = [generate_puzzle(6, 12, random.Random(7)) for _ in range(2)]
    for (pa, sa), (pb, sb) in zip(a, b):
        assert np.array_equal(pa, pb) and np.array_equal(sa, sb)


def test_unreachable_givens_fail_with_the_minimum_reached() -> None:
    with pytest.raises(SudokuGenerationError, match=r"got down to \d+ givens.*use data\.givens >= \d+"):
        generate_puzzle(9, 17, random.Random(0), max_attempts=2)
    with pytest.raises(ValueError, match="givens must be an integer in 8..36"):
        generate_puzzle(6, 5, random.Random(0))


def test_solution_counting_agrees_with_the_reference() -> None:
    empty_4 = np.zeros((4, 4), dtype=int)
    assert count_solutions(empty_4, limit=1000) == ref_count(empty_4, limit=1000) == 288  # all 4x4 grids
    clash = SOLUTION_4.copy()
    clash[0, 1] = 1  # two 1s in row 0
    assert count_solutions(clash) == 0


# -------------------------------------------------------------------------------- augmentation
def _puzzle_and_solution(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    return generate_puzzle(n, {4: 6, 6: 14, 9: 32}[n], random.Random(seed))


@pytest.mark.parametrize("n", [4, 6, 9])
def test_augmentation_preserves_validity_and_inverts_exactly(n: int) -> None:
    puzzle, solution = _puzzle_and_solution(n, 0)
    transposed = 0
    for seed in range(200):
        aug = SudokuAugmentation.random(n, np.random.default_rng(seed))
        transposed += aug.transpose
        new_puzzle, new_solution = aug.apply(puzzle), aug.apply(solution)
        assert ref_valid(new_solution)
        assert int((new_puzzle == 0).sum()) == int((puzzle == 0).sum())
        assert np.all((new_puzzle == 0) | (new_puzzle == new_solution))
        # Exact inverse on digits, tokens, flattened and batched arrays.
        assert np.array_equal(aug.invert(new_puzzle), puzzle)
        assert np.array_equal(aug.invert(aug.apply(solution.reshape(-1))), solution.reshape(-1))
        tokens = np.stack([puzzle.reshape(-1) + 1, solution.reshape(-1) + 1])
        aug_tokens = aug.apply(tokens, tokens=True)
        assert np.array_equal(aug_tokens[0] == 1, aug.apply(puzzle).reshape(-1) == 0)  # blanks stay blank
        assert np.array_equal(aug_tokens - 1, np.stack([new_puzzle.reshape(-1), new_solution.reshape(-1)]))
        assert np.array_equal(aug.invert(aug_tokens, tokens=True), tokens)
        random_digits = np.random.default_rng(seed).integers(0, n + 1, size=(n, n))
        assert np.array_equal(aug.invert(aug.apply(random_digits)), random_digits)
    if n == 6:
        assert transposed == 0  # 2x3 boxes would become 3x2
    else:
        assert 50 < transposed < 150


@pytest.mark.parametrize("n", [4, 6, 9])
def test_batched_augmentation_matches_the_single_one(n: int) -> None:
    pairs = [_puzzle_and_solution(n, s) for s in range(4)]
    puzzles = np.stack([p for p, _ in pairs]).reshape(4, n * n)
    solutions = np.stack([s for _, s in pairs])
    for seed in range(10):
        batch = SudokuAugmentationBatch.random(n, 4, np.random.default_rng(seed))
        assert len(batch) == 4 and (n != 6 or not batch.transpose.any())
        out_puzzles, out_solutions = batch.apply(puzzles + 1, tokens=True), batch.apply(solutions)
        assert out_puzzles.shape == (4, n * n) and out_solutions.shape == (4, n, n)
        for i in range(4):
            single = batch[i]  # validates the drawn permutations (bands / stacks kept together)
            assert np.array_equal(out_puzzles[i], single.apply(puzzles[i] + 1, tokens=True))
            assert np.array_equal(out_solutions[i], single.apply(solutions[i]))
            assert ref_valid(out_solutions[i]) and np.all((out_puzzles[i] == 1) | (out_puzzles[i] == out_solutions[i].reshape(-1) + 1))
            assert np.array_equal(single.invert(out_solutions[i]), solutions[i])


def test_augmentation_keeps_uniqueness_and_padding() -> None:
    puzzle, _ = _puzzle_and_solution(9, 3)
    for seed in range(3):
        assert ref_count(SudokuAugmentation.random(9, np.random.default_rng(seed)).apply(puzzle)) == 1
    aug = SudokuAugmentation.random(4, np.random.default_rng(0))
    padded = np.zeros(16, dtype=np.int64)
    assert np.array_equal(aug.apply(padded, tokens=True), padded)


def test_augmentation_rejects_symmetries_that_break_sudoku() -> None:
    with pytest.raises(ValueError, match="transposition breaks 2x3 boxes"):
        SudokuAugmentation(6, tuple(range(1, 7)), tuple(range(6)), tuple(range(6)), transpose=True)
    with pytest.raises(ValueError, match="out of its band"):
        SudokuAugmentation(4, (1, 2, 3, 4), (0, 2, 1, 3), (0, 1, 2, 3))
    with pytest.raises(ValueError, match=r"expected a \[\.\.\., 4, 4\]"):
        SudokuAugmentation.identity(4).apply(np.zeros((3, 3), dtype=int))


# ------------------------------------------------------------------------------------------ CSV
def _row(puzzle: np.ndarray, solution: np.ndarray, blank: str = ".") -> tuple[str, str]:
    return (
        "".join(str(d) if d else blank for d in puzzle.reshape(-1)),
        "".join(str(d) for d in solution.reshape(-1)),
    )


def test_csv_loading_accepts_public_formats(tmp_path: Path) -> None:
    pairs = [_puzzle_and_solution(4, s) for s in range(3)]
    extreme = tmp_path / "extreme.csv"  # sudoku-extreme's columns
    extreme.write_text(
        "source,question,answer,rating\n" + "".join(f"gen,{q},{a},3\n" for q, a in (_row(p, s) for p, s in pairs))
    )
    headerless = tmp_path / "plain.csv"
    headerless.write_text("".join(f"{q},{a}\n" for q, a in (_row(p, s, blank="0") for p, s in pairs)) + "\n")
    roundtrip = tmp_path / "written.csv"
    write_csv(roundtrip, np.stack([p for p, _ in pairs]), np.stack([s for _, s in pairs]))
    for path in (extreme, headerless, roundtrip):
        puzzles, solutions = load_csv(path, 4)
        assert puzzles.shape == solutions.shape == (3, 4, 4)
        for (p, s), lp, ls in zip(pairs, puzzles, solutions):
            assert np.array_equal(lp, p) and np.array_equal(ls, s)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda q, a: (q[:-1], a), "the puzzle has 15 characters, expected 16"),
        (lambda q, a: (q[:3] + "x" + q[4:], a), "the puzzle has 'x' at position 4"),
        (lambda q, a: (q, a[:5] + "5" + a[6:]), "the solution has '5' at position 6"),
        (lambda q, a: (q, a[1] + a[0] + a[2:]), "the solution is not a valid 4x4 Sudoku"),
        (lambda q, a: ("".join("1" if ch == "." else ch for ch in q), a), "not a valid|contradicts the puzzle"),
        (lambda q, a: (q, a[::-1]), "contradicts the puzzle|not a valid"),
        (lambda q, a: (q + ",", ""), "the solution has 0 characters"),
    ],
)
def test_malformed_csv_rows_name_file_and_line(tmp_path: Path, mutate, message: str) -> None:
    good = _row(*_puzzle_and_solution(4, 0))
    bad = mutate(*_row(*_puzzle_and_solution(4, 1)))
    path = tmp_path / "bad.csv"
    path.write_text(f"puzzle,solution\n{good[0]},{good[1]}\n\n{bad[0]},{bad[1]}\n")  # the bad row is line 4
    with pytest.raises(SudokuFileError, match=message) as info:
        load_csv(path, 4)
    assert isinstance(info.value, ConfigError)  # the entry points exit 2 with this message, no traceback
    assert f"{path}:4:" in str(info.value)


def test_non_utf8_csv_names_the_file_line_and_fix(tmp_path: Path) -> None:
    good = ",".join(_row(*_puzzle_and_solution(4, 0)))
    path = tmp_path / "latin1.csv"
    # Line 3 holds a Latin-1 'é' (one byte, 0xe9), as a spreadsheet saved in a legacy encoding writes it.
    path.write_bytes(f"puzzle,solution\n{good}\n{good},caf".encode() + b"\xe9\n")
    with pytest.raises(SudokuFileError) as info:
        load_csv(path, 4)
    assert isinstance(info.value, ConfigError)
    assert f"{path}:3: not UTF-8 text (byte 0xe9)" in str(info.value)
    assert "save the file as UTF-8" in str(info.value)


def test_bad_csv_row_exits_2_without_a_traceback(tmp_path: Path) -> None:
    """What a user sees: train.py names the file, line and problem in one line and exits 2."""
    good = ",".join(_row(*_puzzle_and_solution(4, 0)))
    q, a = _row(*_puzzle_and_solution(4, 1))
    path = tmp_path / "bad.csv"
    path.write_text(f"puzzle,solution\n{good}\n{q},{a[:-1]}9\n")
    result = run(
        "train.py", "--dataset-only", "data=reasoning/sudoku", "data.size=4", "data.givens=5",
        f"data.train_csv={path}", "data.num_train_puzzles=null", *paths(tmp_path / "runs"),
    )
    assert result.returncode == EXIT_CONFIG, result
    assert "Traceback" not in result.output, result
    assert f"{path}:3: the solution has '9' at position 16; expected 1..4" in result.output, result


def test_a_csv_of_another_size_says_which_data_size_to_set(tmp_path: Path) -> None:
    path = tmp_path / "six.csv"
    path.write_text("puzzle,solution\n" + ",".join(_row(*_puzzle_and_solution(6, 0))) + "\n")
    with pytest.raises(SudokuFileError, match=r"six\.csv:2: the puzzle has 36 characters, expected 16 for a 4x4 Sudoku; "
                       r"for 6x6 Sudokus set data\.size=6"):
        load_csv(path, 4)


def test_inconsistent_solution_is_reported(tmp_path: Path) -> None:
    # A valid grid that is not the puzzle's solution: swapping two digits everywhere keeps it valid.
    puzzle, solution = _puzzle_and_solution(4, 0)
    other = np.where(solution == 1, 2, np.where(solution == 2, 1, solution))
    q, a = _row(puzzle, other)
    path = tmp_path / "inconsistent.csv"
    path.write_text(f"question,answer\n{q},{a}\n")
    with pytest.raises(SudokuFileError, match=r"inconsistent\.csv:2: the solution contradicts the puzzle at cell"):
        load_csv(path, 4)


def test_csv_header_without_the_columns_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "header.csv"
    path.write_text("question,rating\n")
    with pytest.raises(SudokuFileError, match=r"header\.csv:1: header .* no solution column"):
        load_csv(path, 4)


# ------------------------------------------------------------------------- builder / data module
SMALL = {"size": 4, "num_train_puzzles": 60, "num_val_puzzles": 30, "givens": 5, "num_aug": 2, "seed": 1}


def test_builder_writes_marker_last_and_setup_loads_the_splits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = SudokuData(str(tmp_path), **SMALL)
    saves = []
    real_save = puzzles_module.save_split

    def save_and_check(path: Path, tensors: dict) -> None:
        # While data files are written, neither the temporary nor the final directory has the marker.
        assert not (path.parent / DiskDatasetBuilder.MARKER_NAME).exists()
        assert not data.builder.is_complete()
        saves.append(path.name)
        real_save(path, tensors)

    monkeypatch.setattr(puzzles_module, "save_split", save_and_check)
    data.prepare_data()
    assert saves == ["train.pt", "val.pt"]
    marker = data.builder.marker_path
    assert marker.is_file()
    assert all(marker.stat().st_mtime_ns >= (data.root / f).stat().st_mtime_ns for f in saves)

    summary = data.builder.read_summary()
    assert summary["num_base_puzzles"] == 60 and summary["num_train"] == 180 and summary["num_val"] == 30
    assert summary["givens_train"] == {"min": 5, "mean": 5.0, "max": 5}
    assert summary["bytes"] > 0

    data.setup()
    assert data.model_kwargs() == {"vocab_size": 6, "seq_len": 16, "num_puzzle_identifiers": 1}
    train, val = data.train_dataset.tensors, data.val_dataset.tensors
    assert train["inputs"].shape == train["labels"].shape == (180, 16)
    assert val["inputs"].shape == val["labels"].shape == (30, 16)
    assert train["puzzle_identifiers"].shape == (180,) and not train["puzzle_identifiers"].any()
    for split in (train, val):
        inputs, labels = split["inputs"].numpy(), split["labels"].numpy()
        assert inputs.dtype == labels.dtype == np.int64
        assert inputs.min() >= 1 and inputs.max() <= 5 and labels.min() >= 2 and labels.max() <= 5
        assert ((inputs >= 2).sum(axis=1) == 5).all()  # 5 givens in every row, augmented or not
        for x, y in zip(inputs, labels):
            assert ref_valid(y - 1)
            assert np.all((x == 1) | (x == y))
    # Held out: no validation puzzle is a training row (originals or augmented copies).
    train_rows = {tuple(r) for r in train["inputs"].tolist()}
    assert not any(tuple(r) in train_rows for r in val["inputs"].tolist())
    # Base puzzles come first and are distinct.
    assert len({tuple(r) for r in train["inputs"][:60].tolist()}) == 60
    batch = data.collate_fn(data.train_dataset.__getitems__([0, 1, 2]))
    assert set(batch) == {"inputs", "labels", "puzzle_identifiers"} and batch["inputs"].shape == (3, 16)


def test_build_once_rebuild_and_determinism(tmp_path: Path) -> None:
    data = SudokuData(str(tmp_path), **SMALL)
    data.prepare_data()
    marker = data.builder.marker_path
    first_stat = marker.stat()
    first = torch.load(data.root / "train.pt", weights_only=True)

    again = SudokuData(str(tmp_path), **SMALL)
    assert again.root == data.root
    again.prepare_data()
    assert (marker.stat().st_mtime_ns, marker.stat().st_ino) == (first_stat.st_mtime_ns, first_stat.st_ino)  # not rebuilt

    again.prepare_data(rebuild=True)
    # A new marker file (the old one still existed when it was written, so the inode differs).
    assert marker.stat().st_ino != first_stat.st_ino and marker.stat().st_mtime_ns >= first_stat.st_mtime_ns
    rebuilt = torch.load(data.root / "train.pt", weights_only=True)
    assert all(torch.equal(first[k], rebuilt[k]) for k in first)  # same seed, same files

    # Every content parameter changes the directory.
    names = {data.root.name}
    for key, value in [("seed", 2), ("givens", 6), ("num_aug", 1), ("num_train_puzzles", 61), ("size", 6)]:
        params = {**SMALL, key: value}
        if key == "size":
            params["givens"] = 12
        names.add(SudokuData(str(tmp_path), **params).root.name)
    assert len(names) == 6


def test_the_summary_is_logged_once_by_the_build_not_by_the_checks(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="dataset")
    # What a run does: train.py prepares the data, then the trainer prepares it on rank 0 and once more to check.
    for _ in range(3):
        SudokuData(str(tmp_path), **SMALL).prepare_data()
    summaries = [r for r in caplog.records if r.levelno >= logging.INFO and "'num_train': 180" in r.getMessage()]
    assert len(summaries) == 1 and summaries[0].getMessage().startswith("Built dataset")


def test_csv_splits_drop_validation_puzzles_seen_in_training(tmp_path: Path) -> None:
    pairs = [_puzzle_and_solution(4, s) for s in range(8)]
    train_csv, val_csv = tmp_path / "train.csv", tmp_path / "val.csv"
    write_csv(train_csv, np.stack([p for p, _ in pairs[:5]]), np.stack([s for _, s in pairs[:5]]))
    val_pairs = pairs[4:]  # pairs[4] is also a training puzzle
    write_csv(val_csv, np.stack([p for p, _ in val_pairs]), np.stack([s for _, s in val_pairs]))
    data = SudokuData(
        str(tmp_path / "data"), size=4, num_train_puzzles=None, num_val_puzzles=None, num_aug=1,
        train_csv=str(train_csv), val_csv=str(val_csv),
    )
    assert "csv" in data.root.name
    data.prepare_data()
    data.setup()
    assert len(data.train_dataset) == 10 and len(data.val_dataset) == 3
    assert data.summary["num_val_dropped_overlap"] == 1
    # Editing a file gives a new directory (its size / mtime are part of the name's hash).
    write_csv(train_csv, np.stack([p for p, _ in pairs[:4]]), np.stack([s for _, s in pairs[:4]]))
    edited = SudokuData(
        str(tmp_path / "data"), size=4, num_train_puzzles=None, num_val_puzzles=None, num_aug=1,
        train_csv=str(train_csv), val_csv=str(val_csv),
    )
    assert edited.root != data.root


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 5}, r"data\.size must be one of \[4, 6, 9\]"),
        ({"num_val_puzzles": 0}, r"data\.num_val_puzzles must be a positive integer"),
        ({"num_aug": -1}, r"data\.num_aug must be an integer >= 0"),
        ({"seed": "x"}, r"data\.seed must be an integer"),
        ({"givens": 2}, r"data\.givens must be an integer in 4\.\.16"),
        ({"train_csv": "/nonexistent/missing.csv"}, r"data\.train_csv: Sudoku CSV /nonexistent/missing\.csv not found"),
    ],
)
def test_bad_parameters_name_the_key(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SudokuData(str(tmp_path), **kwargs)


@pytest.mark.parametrize(
    ("damage", "file", "problem"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "train.pt", " is truncated or damaged"),
        (lambda p: p.write_bytes(b""), "val.pt", " is truncated or damaged"),
        (lambda p: p.unlink(), "train.pt", " is missing"),
        (lambda p: p.write_text('{"size": 4, "vocab'), "COMPLETE", ":1: not valid JSON"),
        (lambda p: p.write_bytes(b"\xff\xfe{}"), "COMPLETE", ":1: not UTF-8 text"),
        (lambda p: p.write_text("[]"), "COMPLETE", ": expected a JSON object"),
    ],
    ids=["train-cut-in-half", "val-empty", "train-missing", "marker-cut", "marker-binary", "marker-list"],
)
def test_damaged_built_dataset_names_the_file_and_says_to_rebuild(tmp_path: Path, damage, file: str, problem: str) -> None:
    data = SudokuData(str(tmp_path), **SMALL)
    data.prepare_data()
    damage(data.root / file)
    with pytest.raises(ConfigError) as info:
        SudokuData(str(tmp_path), **SMALL).setup()
    message = str(info.value)
    assert f"{data.root / file}{problem}" in message
    assert "--rebuild-dataset" in message and len(message.splitlines()) == 1
    data.prepare_data(rebuild=True)  # and the fix it names works
    data.setup()


def test_too_many_distinct_puzzles_fail_clearly(tmp_path: Path) -> None:
    builder = SudokuBuilder(tmp_path / "ds", size=4, num_train_puzzles=1, num_val_puzzles=1, givens=16, num_aug=0)
    # Complete 4x4 grids as "puzzles": only 288 exist.
    with pytest.raises(SudokuGenerationError, match=r"generated only \d+ distinct training 4x4 puzzles"):
        builder.generate_distinct(300, random.Random(0), set(), "training")


# ------------------------------------------------------------------------------------ evaluator
def _logits(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return F.one_hot(tokens, vocab).float() * 5.0 + 0.1 * torch.rand(*tokens.shape, vocab)


def test_sudoku_validity_counts_valid_and_consistent_grids() -> None:
    solution = torch.as_tensor(SOLUTION_4).reshape(-1) + 1  # tokens
    puzzle = solution.clone()
    puzzle[[1, 2, 5, 7, 8, 11, 12, 14, 15]] = 1  # blanks
    swapped = torch.where(solution == 2, 3, torch.where(solution == 3, 2, solution))  # digits 1<->2: valid, not consistent
    broken = solution.clone()
    broken[[0, 1]] = broken[[1, 0]]  # row 0 still a permutation, but columns 0/1 repeat
    latin = torch.tensor([[1, 2, 3, 4], [2, 3, 4, 1], [3, 4, 1, 2], [4, 1, 2, 3]]).reshape(-1) + 1  # boxes repeat
    blank_pred = solution.clone()
    blank_pred[3] = 1  # a blank is never a valid cell
    preds = torch.stack([solution, swapped, broken, latin, blank_pred])
    inputs = puzzle.expand(5, -1)
    assert (swapped != puzzle)[puzzle > 1].any()  # contradicts a given

    ev = SudokuValidity(seq_len=16)
    ev.update({"logits": _logits(preds, 6)}, {"inputs": inputs})
    assert ev.compute() == {"valid_grid": pytest.approx(2 / 5), "valid_grid_consistent": pytest.approx(1 / 5)}
    # Sums accumulate over batches; reset clears them.
    ev.update({"logits": _logits(solution[None], 6)}, {"inputs": puzzle[None]})
    assert ev.compute() == {"valid_grid": pytest.approx(3 / 6), "valid_grid_consistent": pytest.approx(2 / 6)}
    ev.reset()
    assert all(np.isnan(v) for v in ev.compute().values())


def test_sudoku_validity_6x6_boxes_and_errors() -> None:
    solution = torch.as_tensor(SOLUTION_6).reshape(-1) + 1
    assert ref_valid(SOLUTION_6)
    # Rows and columns stay permutations when rows 1 and 2 swap across a band, but 2x3 boxes break.
    rows_swapped = torch.as_tensor(SOLUTION_6[[0, 2, 1, 3, 4, 5]]).reshape(-1) + 1
    assert not ref_valid(SOLUTION_6[[0, 2, 1, 3, 4, 5]])
    ev = SudokuValidity(name="v")  # size inferred from the sequence length
    blanks = torch.ones(2, 36, dtype=torch.long)
    ev.update({"logits": _logits(torch.stack([solution, rows_swapped]), 8)}, {"inputs": blanks})
    assert ev.compute() == {"v": 0.5, "v_consistent": 0.5}
    with pytest.raises(ValueError, match="expected sequences of 16 cells, got 36"):
        SudokuValidity(seq_len=16).update({"logits": _logits(solution[None], 8)}, {"inputs": blanks[:1]})
    with pytest.raises(ValueError, match="seq_len must be n\\*n"):
        SudokuValidity(seq_len=20)
    with pytest.raises(ValueError, match="expected logits"):
        ev.update({"logits": torch.zeros(1, 16, 6)}, {"inputs": blanks[:1]})


def test_evaluators_yaml_instantiates() -> None:
    evaluators = OmegaConf.load(CONF_DIR / "evaluators" / "reasoning" / "sudoku.yaml")
    built = {name: instantiate(node) for name, node in evaluators.items()}
    assert isinstance(built["valid_grid"], SudokuValidity) and built["valid_grid"].seq_len is None
    assert instantiate(evaluators.valid_grid, seq_len=81).n == 9


# ------------------------------------------------------------------------------------ config
def test_config_composes_and_builds(tmp_path: Path) -> None:
    cfg = compose_config(
        "run_name=test",
        f"paths.data_root={tmp_path / 'data'}",
        "data=reasoning/sudoku",
        "evaluators=reasoning/sudoku",
        "data.num_train_puzzles=40",
        "data.num_val_puzzles=20",
        "data.num_aug=1",
    )
    validate_config(cfg)
    assert cfg.data._target_ == "dataset.reasoning.sudoku.SudokuData"
    data = instantiate(cfg.data)
    assert isinstance(data, SudokuData) and data.root.parent == tmp_path / "data"
    data.prepare_data()
    data.setup()
    facts = data.model_kwargs()
    assert facts == {"vocab_size": 6, "seq_len": 16, "num_puzzle_identifiers": 1}
    assert len(data.train_dataset) == 80 and len(data.val_dataset) == 20

    # The evaluators, given the data's seq_len the way the trainer passes facts, score a perfect model.
    evaluators = {
        name: instantiate(node, **({"seq_len": facts["seq_len"]} if "SudokuValidity" in node._target_ else {}))
        for name, node in cfg.evaluators.items()
    }
    batch = data.collate_fn(data.val_dataset.__getitems__(list(range(20))))
    outputs = {"logits": _logits(batch["labels"], facts["vocab_size"])}
    results = {}
    for ev in evaluators.values():
        ev.update(outputs, batch)
        results.update(ev.compute())
    assert results == {
        "exact_acc": 1.0, "token_acc": 1.0, "valid_grid": 1.0, "valid_grid_consistent": 1.0,
    }
