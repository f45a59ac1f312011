"""Maze generator, text loader, dihedral augmentation and builder / data module.

Shortest paths are re-checked with a BFS written here, not with the one under test.
"""

from __future__ import annotations

import random
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from dataset.reasoning import puzzles as puzzles_module
from dataset.base import DiskDatasetBuilder
from dataset.reasoning.maze import (
    MazeAugmentation,
    MazeData,
    MazeFileError,
    MazeGenerationError,
    generate_maze,
    load_mazes,
    maze_to_text,
    solve,
    write_mazes,
)
from tests.conftest import compose_config
from utils.config.errors import ConfigError
from utils.config.validation import validate_config

WALL, OPEN, START, GOAL, PATH = 1, 2, 3, 4, 5


# ------------------------------------------------------------------------- independent reference
def ref_distance(grid: np.ndarray, allowed: set[int]) -> int:
    """Moves from S to G through cells whose token is in ``allowed`` (S and G always allowed); -1 if none."""
    n = grid.shape[0]
    (start,) = [tuple(p) for p in np.argwhere(grid == START)]
    seen = {start: 0}
    queue = deque([start])
    while queue:
        r, c = queue.popleft()
        if grid[r, c] == GOAL:
            return seen[(r, c)]
        for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
            if 0 <= nr < n and 0 <= nc < n and (nr, nc) not in seen and int(grid[nr, nc]) in allowed | {START, GOAL}:
                seen[(nr, nc)] = seen[(r, c)] + 1
                queue.append((nr, nc))
    return -1


def check_maze(inputs: np.ndarray, labels: np.ndarray, min_length: int = 1) -> int:
    """Asserts the labels mark a shortest S -> G path; returns its length in moves."""
    assert set(np.unique(inputs).tolist()) <= {WALL, OPEN, START, GOAL}
    assert int((inputs == START).sum()) == 1 and int((inputs == GOAL).sum()) == 1
    assert np.array_equal(np.where(labels == PATH, OPEN, labels), inputs)  # only open cells become path
    length = ref_distance(inputs, {OPEN})
    assert length >= min_length
    assert int((labels == PATH).sum()) == length - 1
    assert ref_distance(labels, {PATH}) == length  # the marked cells alone connect S to G
    return length


def open_tree(grid: np.ndarray) -> bool:
    """Whether the open cells form a tree (connected, edges = cells - 1): the path is then unique."""
    passable = grid != WALL
    cells = int(passable.sum())
    edges = int((passable[1:] & passable[:-1]).sum() + (passable[:, 1:] & passable[:, :-1]).sum())
    start = tuple(np.argwhere(grid == START)[0])
    seen, queue = {start}, deque([start])
    while queue:
        r, c = queue.popleft()
        for nb in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
            if passable[nb] and nb not in seen:
                seen.add(nb)
                queue.append(nb)
    return edges == cells - 1 and len(seen) == cells


# ---------------------------------------------------------------------------------- generation
@pytest.mark.parametrize(("size", "min_length"), [(5, 4), (9, 9), (15, 15), (29, 40)])
def test_generated_mazes_mark_the_unique_shortest_path(size: int, min_length: int) -> None:
    rng = random.Random(size)
    for _ in range(10):
        inputs, labels = generate_maze(size, min_length, rng)
        assert inputs.shape == labels.shape == (size, size)
        check_maze(inputs, labels, min_length)
        assert open_tree(inputs)
        assert (inputs[0] == WALL).all() and (inputs[:, -1] == WALL).all()  # closed border
        assert np.array_equal(solve(inputs), labels)


def test_generation_is_seeded_and_fails_clearly() -> None:
    a, b = generate_maze(15, 15, random.Random(3)), generate_maze(15, 15, random.Random(3))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    with pytest.raises(MazeGenerationError, match=r"at least 50 moves .*longest seen: \d+"):
        generate_maze(5, 50, random.Random(0), max_attempts=5)
    with pytest.raises(ValueError, match="odd size"):
        generate_maze(8, 4, random.Random(0))


# -------------------------------------------------------------------------------- augmentation
def test_dihedral_transforms_are_distinct_and_invertible() -> None:
    rng = np.random.default_rng(0)
    for size in (5, 9):
        grid = rng.integers(0, 6, size=(size, size))
        images = []
        for k in range(8):
            aug = MazeAugmentation(size, k)
            out = aug.apply(grid)
            images.append(out.tobytes())
            assert np.array_equal(aug.invert(out), grid)
            flat = grid.reshape(-1)
            assert np.array_equal(aug.invert(aug.apply(flat)), flat) and aug.apply(flat).shape == flat.shape
            batch = rng.integers(0, 6, size=(3, size * size))
            assert np.array_equal(aug.invert(aug.apply(batch)), batch)
            assert np.array_equal(aug.apply(batch)[1], aug.apply(batch[1]))
        assert len(set(images)) == 8  # a random grid has no symmetry: all 8 images differ
        assert MazeAugmentation(size, 0).apply(grid).tobytes() == grid.tobytes()
    with pytest.raises(ValueError, match="dihedral index"):
        MazeAugmentation(5, 8)


def test_augmented_mazes_keep_their_shortest_path() -> None:
    inputs, labels = generate_maze(15, 15, random.Random(1))
    length = check_maze(inputs, labels)
    for k in range(8):
        aug = MazeAugmentation(15, k)
        assert check_maze(aug.apply(inputs), aug.apply(labels)) == length
        assert np.array_equal(solve(aug.apply(inputs)), aug.apply(labels))


# -------------------------------------------------------------------------------------- text I/O
def test_text_round_trip(tmp_path: Path) -> None:
    rng = random.Random(0)
    mazes = [generate_maze(9, 9, rng) for _ in range(4)]
    with_path = tmp_path / "with_path.txt"
    write_mazes(with_path, np.stack([lab for _, lab in mazes]))
    without_path = tmp_path / "without_path.txt"
    write_mazes(without_path, np.stack([inp for inp, _ in mazes]))
    for path in (with_path, without_path):
        inputs, labels = load_mazes(path, 9)
        assert inputs.shape == labels.shape == (4, 9, 9)
        for (inp, lab), li, ll in zip(mazes, inputs, labels):
            assert np.array_equal(li, inp) and np.array_equal(ll, lab)
    text = with_path.read_text()
    assert text.count("\n\n") == 3 and set(text) <= set("# SGo\n")
    assert maze_to_text(mazes[0][1]).splitlines()[0] == "#" * 9


GOOD = """\
#######
#S    #
##### #
#     #
# #####
#    G#
#######"""


@pytest.mark.parametrize(
    ("bad_maze", "row", "message"),
    [
        (GOOD.replace("#S    #", "#S   #"), 1, "maze row has 6 characters, expected 7"),
        (GOOD.replace("#     #", "#  x  #"), 3, r"unexpected character 'x' at column 4"),
        ("\n".join(GOOD.splitlines()[:6]), 0, "has 6 rows, expected 7"),
        (GOOD.replace("#    G#", "#S   G#"), 5, r"second 'S' at column 2"),
        (GOOD.replace("G", " "), 0, "no 'G' cell"),
        (GOOD.replace("##### #", "#######"), 0, "G is not reachable from S"),
        (GOOD.replace("#     #", "#ooooo#"), 0, r"'o' cells .* \(5\) are not the shortest S -> G path \(16 moves"),
        (GOOD.replace("#S    #", "#Sooo #"), 0, "are not the shortest"),
    ],
    ids=["row_length", "bad_char", "row_count", "two_S", "no_G", "unreachable", "wrong_path", "partial_path"],
)
def test_malformed_maze_files_name_file_and_line(tmp_path: Path, bad_maze: str, row: int, message: str) -> None:
    path = tmp_path / "mazes.txt"
    # Lines 1-7: a good maze; 8-9: empty; the bad maze starts at line 10.
    path.write_text(GOOD + "\n\n\n" + bad_maze + "\n")
    with pytest.raises(MazeFileError, match=message) as info:
        load_mazes(path, 7)
    assert isinstance(info.value, ConfigError)  # the entry points exit 2 with this message, no traceback
    assert f"{path}:{10 + row}:" in str(info.value)


def test_non_utf8_maze_file_names_the_file_line_and_fix(tmp_path: Path) -> None:
    path = tmp_path / "mazes.txt"
    lines = GOOD.encode().split(b"\n")
    lines[3] = b"#  \xb7  #"  # a Latin-1 middle dot in row 4
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(MazeFileError) as info:
        load_mazes(path, 7)
    assert f"{path}:4: not UTF-8 text (byte 0xb7); save the file as UTF-8" in str(info.value)


def test_good_maze_and_marked_path_load(tmp_path: Path) -> None:
    path = tmp_path / "good.txt"
    marked = GOOD.replace("#S    #", "#Soooo#").replace("##### #", "#####o#").replace("#     #", "#ooooo#")
    marked = marked.replace("# #####", "#o#####").replace("#    G#", "#ooooG#")
    path.write_text(GOOD + "\n\n" + marked + "\n")
    inputs, labels = load_mazes(path, 7)
    assert np.array_equal(inputs[0], inputs[1]) and np.array_equal(labels[0], labels[1])
    assert check_maze(inputs[0], labels[0]) == 16


def test_ambiguous_shortest_path_is_rejected(tmp_path: Path) -> None:
    room = "#####\n#S  #\n#   #\n#  G#\n#####"
    path = tmp_path / "room.txt"
    path.write_text(room + "\n")
    with pytest.raises(MazeFileError, match=rf"{path.name}:1: .*several shortest S -> G paths of length 4"):
        load_mazes(path, 5)
    # Marking one of the equally short paths does not make the target unambiguous.
    path.write_text("#####\n#Soo#\n#  o#\n#  G#\n#####\n")
    with pytest.raises(MazeFileError, match="several shortest"):
        load_mazes(path, 5)
    # Two routes of different lengths are fine: the shorter one is the target.
    loop = "#######\n#S   G#\n# ### #\n# ### #\n# ### #\n#     #\n#######"
    path.write_text(loop + "\n")
    inputs, labels = load_mazes(path, 7)
    assert check_maze(inputs[0], labels[0]) == 4


# ------------------------------------------------------------------------- builder / data module
SMALL = {"size": 9, "num_train": 40, "num_val": 20, "num_aug": 3, "seed": 0}


def test_builder_writes_marker_last_and_setup_loads_the_splits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = MazeData(str(tmp_path), **SMALL)
    real_save = puzzles_module.save_split

    def save_and_check(path: Path, tensors: dict) -> None:
        assert not (path.parent / DiskDatasetBuilder.MARKER_NAME).exists() and not data.builder.is_complete()
        real_save(path, tensors)

    monkeypatch.setattr(puzzles_module, "save_split", save_and_check)
    data.prepare_data()
    monkeypatch.undo()  # the rebuild below replaces a complete dataset
    marker = data.builder.marker_path
    assert all(marker.stat().st_mtime_ns >= (data.root / f).stat().st_mtime_ns for f in ("train.pt", "val.pt"))
    data.setup()
    assert data.model_kwargs() == {"vocab_size": 6, "seq_len": 81, "num_puzzle_identifiers": 1}
    assert data.summary["num_base_mazes"] == 40 and data.summary["path_length_train"]["min"] >= 9
    train, val = data.train_dataset.tensors, data.val_dataset.tensors
    assert train["inputs"].shape == train["labels"].shape == (160, 81)
    assert val["inputs"].shape == (20, 81) and not train["puzzle_identifiers"].any()
    for split in (train, val):
        for x, y in zip(split["inputs"].numpy(), split["labels"].numpy()):
            check_maze(x.reshape(9, 9), y.reshape(9, 9), 9)
    train_rows = {tuple(r) for r in train["inputs"].tolist()}
    assert len(train_rows) == 160  # copies use distinct non-identity symmetries
    assert not any(tuple(r) in train_rows for r in val["inputs"].tolist())

    # Built once; rebuild=True writes a new marker with the same (seeded) content.
    first_stat = marker.stat()
    first = torch.load(data.root / "train.pt", weights_only=True)
    MazeData(str(tmp_path), **SMALL).prepare_data()
    assert (marker.stat().st_mtime_ns, marker.stat().st_ino) == (first_stat.st_mtime_ns, first_stat.st_ino)
    MazeData(str(tmp_path), **SMALL).prepare_data(rebuild=True)
    assert marker.stat().st_ino != first_stat.st_ino
    rebuilt = torch.load(data.root / "train.pt", weights_only=True)
    assert all(torch.equal(first[k], rebuilt[k]) for k in first)
    names = {MazeData(str(tmp_path), **{**SMALL, k: v}).root.name for k, v in
             [("seed", 1), ("num_aug", 2), ("size", 11), ("num_val", 21), ("min_path_length", 5)]}
    assert len(names | {data.root.name}) == 6


def test_file_splits(tmp_path: Path) -> None:
    rng = random.Random(5)
    mazes = [generate_maze(7, 6, rng)[1] for _ in range(6)]
    train_file, val_file = tmp_path / "train.txt", tmp_path / "val.txt"
    write_mazes(train_file, np.stack(mazes[:4]))
    write_mazes(val_file, np.stack(mazes[3:]))  # mazes[3] is also in training: dropped
    data = MazeData(str(tmp_path / "data"), size=7, num_train=None, num_val=None, num_aug=1,
                    train_file=str(train_file), val_file=str(val_file))
    data.prepare_data()
    data.setup()
    assert len(data.train_dataset) == 8 and len(data.val_dataset) == 2
    assert data.summary["num_val_dropped_overlap"] == 1
    assert np.array_equal(data.train_dataset.tensors["labels"][0].numpy().reshape(7, 7), mazes[0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_aug": 8}, r"data\.num_aug must be an integer in 0\.\.7"),
        ({"size": 10}, r"data\.size: generated mazes need an odd size"),
        ({"num_train": None}, r"data\.num_train must be a positive integer"),
        ({"min_path_length": 0}, r"data\.min_path_length must be a positive integer"),
        ({"train_file": "/nonexistent/mazes.txt"}, r"data\.train_file: maze file /nonexistent/mazes\.txt not found"),
    ],
)
def test_bad_parameters_name_the_key(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        MazeData(str(tmp_path), **kwargs)


def test_config_composes_and_builds(tmp_path: Path) -> None:
    cfg = compose_config(
        "run_name=test", f"paths.data_root={tmp_path / 'data'}", "data=reasoning/maze", "evaluators=reasoning/maze",
        "data.size=9", "data.num_train=30", "data.num_val=10",
    )
    validate_config(cfg)
    data = instantiate(cfg.data)
    assert isinstance(data, MazeData)
    data.prepare_data()
    data.setup()
    assert len(data.train_dataset) == 120 and len(data.val_dataset) == 10
    batch = data.collate_fn(data.val_dataset.__getitems__(list(range(10))))
    logits = torch.nn.functional.one_hot(batch["labels"], 6).float()
    for node in cfg.evaluators.values():
        ev = instantiate(node)
        ev.update({"logits": logits}, batch)
        assert all(v == 1.0 for v in ev.compute().values())
