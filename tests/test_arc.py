"""ARC-AGI: augmentations, encoding, the dataset builder on the real ARC-AGI-1 files, malformed source
files, the ARC evaluator (voting, pass@1/pass@2, submission.json) and the Hydra data module.

The real-data tests read ../shared/data/arc (ARC Prize files) relative to the repository and skip, with
the reason, when it is absent. They build a small subset (5 tasks per subset, 3 augmentations) once.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from dataset.reasoning.arc import (
    EOS_TOKEN,
    GRID_SIZE,
    NUM_COLORS,
    NUM_TRANSFORMS,
    PAD_TOKEN,
    SEQ_LEN,
    VOCAB_SIZE,
    ArcBuilder,
    ArcData,
    ArcFormatError,
    apply_colors,
    augment_grid,
    decode_grid,
    dihedral,
    encode_grid,
    encode_label,
    inverse_dihedral,
    invert_colors,
    load_arc_tasks,
    random_color_permutation,
    task_augmentations,
    unaugment_grid,
)
from dataset.prepare import instantiate_data
from dataset.reasoning.puzzles import IGNORE_LABEL, check_split, load_split
from tests.conftest import compose_config, trainer_stand_in
from dataset.reasoning.arc_evaluator import ArcEvaluator
from utils.config.errors import ConfigError
from utils.config.validation import validate_config

ARC_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "arc"
SUBSETS = ("training", "evaluation")
ARC_FILES = [ARC_DIR / f"arc-agi_{s}_{kind}.json" for s in SUBSETS for kind in ("challenges", "solutions")]
needs_arc = pytest.mark.skipif(
    not all(p.is_file() for p in ARC_FILES),
    reason=f"ARC-AGI-1 files not found in {ARC_DIR} "
    "(expected arc-agi_{training,evaluation}_{challenges,solutions}.json)",
)
MAX_TASKS = 5
NUM_AUG = 3
N_AUG = NUM_AUG + 1


def _load(subset: str, kind: str) -> dict[str, Any]:
    with open(ARC_DIR / f"arc-agi_{subset}_{kind}.json", encoding="utf-8") as f:
        return json.load(f)


def _first_ids(subset: str) -> list[str]:
    return sorted(_load(subset, "challenges"))[:MAX_TASKS]


@pytest.fixture(scope="module")
def small_arc(tmp_path_factory: pytest.TempPathFactory) -> ArcData:
    """5 training + 5 evaluation tasks, 3 augmentations each, built once for the module."""
    if not all(p.is_file() for p in ARC_FILES):
        pytest.skip(f"ARC-AGI-1 files not found in {ARC_DIR}")
    dm = ArcData(
        data_root=str(tmp_path_factory.mktemp("arc_data")),
        arc_dir=str(ARC_DIR),
        max_tasks_per_subset=MAX_TASKS,
        num_aug=NUM_AUG,
    )
    dm.prepare_data()
    dm.setup()
    return dm


# ------------------------------------------------------------------------------------ augmentations
def test_dihedral_transforms_and_colour_permutations_invert() -> None:
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (2, 5), (7, 3), (30, 30), (1, 30)]:
        grid = rng.integers(0, NUM_COLORS, size=shape).astype(np.uint8)
        images = set()
        for k in range(NUM_TRANSFORMS):
            out = dihedral(grid, k)
            assert out.shape == (shape if k in (0, 2, 4, 5) else shape[::-1])
            assert np.array_equal(inverse_dihedral(out, k), grid)
            images.add((out.shape, out.tobytes()))
            for _ in range(5):
                perm = random_color_permutation(rng)
                assert perm[0] == 0 and sorted(perm.tolist()) == list(range(NUM_COLORS))
                aug = augment_grid(grid, k, perm)
                assert np.array_equal(aug == 0, dihedral(grid, k) == 0)  # background stays background
                assert np.array_equal(invert_colors(apply_colors(grid, perm), perm), grid)
                assert np.array_equal(unaugment_grid(aug, k, perm), grid)
        if shape == (7, 3):
            assert len(images) == NUM_TRANSFORMS  # an asymmetric grid has 8 distinct images: the full group
    with pytest.raises(ValueError, match="0..7"):
        dihedral(np.zeros((2, 2), dtype=np.uint8), 8)
    with pytest.raises(ValueError, match="permutation"):
        apply_colors(np.zeros((2, 2), dtype=np.uint8), np.zeros(NUM_COLORS, dtype=np.int64))


def test_task_augmentations_are_seeded_distinct_and_start_with_identity() -> None:
    augs = task_augmentations("007bbfb7", num_aug=50, seed=3)
    assert len(augs) == 51
    assert augs[0][0] == 0 and augs[0][1].tolist() == list(range(NUM_COLORS))
    assert len({(t, p.tobytes()) for t, p in augs}) == 51
    assert all(p[0] == 0 for _, p in augs)
    again = task_augmentations("007bbfb7", num_aug=50, seed=3)
    assert all(t1 == t2 and np.array_equal(p1, p2) for (t1, p1), (t2, p2) in zip(augs, again))
    other = task_augmentations("007bbfb7", num_aug=50, seed=4)
    assert any(t1 != t2 or not np.array_equal(p1, p2) for (t1, p1), (t2, p2) in zip(augs[1:], other[1:]))


# ----------------------------------------------------------------------------------------- encoding
@pytest.mark.parametrize("shape", [(1, 1), (30, 30), (1, 30), (30, 1), (3, 7), (29, 29), (12, 5)])
def test_encoding_round_trip(shape: tuple[int, int]) -> None:
    h, w = shape
    grid = np.random.default_rng(h * 31 + w).integers(0, NUM_COLORS, size=shape).astype(np.uint8)
    tokens = encode_grid(grid)
    labels = encode_label(grid)
    assert tokens.shape == labels.shape == (SEQ_LEN,) and tokens.dtype == np.int64
    canvas = tokens.reshape(GRID_SIZE, GRID_SIZE)
    assert np.array_equal(canvas[:h, :w], grid.astype(np.int64) + 2)
    # EOS: the row right below and the column right after the grid, where they fit.
    eos = np.zeros((GRID_SIZE, GRID_SIZE), dtype=bool)
    if h < GRID_SIZE:
        eos[h, :w] = True
    if w < GRID_SIZE:
        eos[:h, w] = True
    assert np.array_equal(canvas == EOS_TOKEN, eos)
    colour = np.zeros_like(eos)
    colour[:h, :w] = True
    assert np.array_equal(canvas == PAD_TOKEN, ~(eos | colour))
    assert np.array_equal(labels == IGNORE_LABEL, tokens == PAD_TOKEN)
    assert np.array_equal(labels[tokens != PAD_TOKEN], tokens[tokens != PAD_TOKEN])
    assert np.array_equal(decode_grid(tokens), grid)
    assert np.array_equal(decode_grid(labels), grid)
    assert np.array_equal(decode_grid(torch.from_numpy(tokens).numpy()), grid)


def test_encoding_rejects_large_grids_and_invalid_crops_decode_to_none() -> None:
    with pytest.raises(ValueError, match="1..30"):
        encode_grid(np.zeros((31, 3), dtype=np.uint8))
    assert decode_grid(np.zeros(SEQ_LEN, dtype=np.int64)) is None  # all padding
    tokens = encode_grid(np.ones((4, 4), dtype=np.uint8))
    holed = tokens.copy().reshape(GRID_SIZE, GRID_SIZE)
    holed[2, 2] = EOS_TOKEN  # a hole inside the rectangle bounded by row 0 and column 0
    assert decode_grid(holed.reshape(-1)) is None
    first = tokens.copy()
    first[0] = EOS_TOKEN
    assert decode_grid(first) is None


# ------------------------------------------------------------------------------------ real builder
@needs_arc
def test_builder_counts_ids_and_contents_match_the_json(small_arc: ArcData) -> None:
    summary = small_arc.builder.read_summary()
    chall = {s: _load(s, "challenges") for s in SUBSETS}
    sols = {s: _load(s, "solutions") for s in SUBSETS}
    ids = {s: _first_ids(s) for s in SUBSETS}
    n_demo = {s: sum(len(chall[s][t]["train"]) for t in ids[s]) for s in SUBSETS}
    n_test = {s: sum(len(chall[s][t]["test"]) for t in ids[s]) for s in SUBSETS}

    # Complete summary.
    assert summary["vocab_size"] == VOCAB_SIZE == 12 and summary["seq_len"] == SEQ_LEN == 900
    assert summary["num_tasks"] == 2 * MAX_TASKS and summary["num_eval_tasks"] == MAX_TASKS
    assert summary["num_puzzle_identifiers"] == 2 * MAX_TASKS * N_AUG + 1
    assert summary["num_aug"] == NUM_AUG and summary["augmentations_per_task"] == N_AUG
    for s in SUBSETS:
        assert summary["subsets"][s] == {"tasks": MAX_TASKS, "demonstration_pairs": n_demo[s], "test_pairs": n_test[s]}
    assert summary["train_rows"] == N_AUG * (n_demo["training"] + n_test["training"] + n_demo["evaluation"])
    assert summary["val_rows"] == N_AUG * n_test["evaluation"]
    assert summary["train_subsets"] == list(SUBSETS) and summary["eval_subset"] == "evaluation"
    assert summary["max_tasks_per_subset"] == MAX_TASKS and summary["seed"] == 0
    files = {p.name: p.stat().st_size for p in small_arc.root.iterdir() if p.name != "COMPLETE"}
    assert summary["file_bytes"] == files and summary["bytes"] == sum(files.values())

    train, val = small_arc.train_dataset.tensors, small_arc.val_dataset.tensors
    assert len(train["inputs"]) == summary["train_rows"] and len(val["inputs"]) == summary["val_rows"]
    for split in ("train.pt", "val.pt"):
        path = small_arc.root / split
        data = load_split(path)
        check_split(data, path, 12, 900, summary["num_puzzle_identifiers"])
        assert set(data) == {"inputs", "labels", "puzzle_identifiers", "task_index", "test_index",
                             "aug_transform", "aug_colors"}
        assert all(v.dtype == torch.long for v in data.values()) and data["aug_colors"].shape[1] == NUM_COLORS

    tasks = json.loads(Path(small_arc.model_kwargs()["arc_tasks_path"]).read_text())["tasks"]
    assert [t["id"] for t in tasks] == ids["training"] + ids["evaluation"]
    assert [t["eval"] for t in tasks] == [False] * MAX_TASKS + [True] * MAX_TASKS

    # Every (task, augmentation) has one id (1..), shared by its val rows and its demonstration rows.
    pid = train["puzzle_identifiers"]
    assert sorted(pid.unique().tolist()) == list(range(1, 2 * MAX_TASKS * N_AUG + 1))
    for i in range(len(val["inputs"])):
        same = pid == val["puzzle_identifiers"][i]
        assert int(same.sum()) == len(chall["evaluation"][tasks[int(val["task_index"][i])]["id"]]["train"])
        assert bool((train["task_index"][same] == val["task_index"][i]).all())
        assert bool((train["test_index"][same] == -1).all())
        assert bool((train["aug_transform"][same] == val["aug_transform"][i]).all())
        assert bool((train["aug_colors"][same] == val["aug_colors"][i]).all())

    # Contents: undo each row's augmentation and find the original pair.
    def original(data: dict[str, torch.Tensor], i: int, key: str) -> list[list[int]]:
        grid = decode_grid(data[key][i].numpy())
        assert grid is not None
        return unaugment_grid(grid, int(data["aug_transform"][i]), data["aug_colors"][i].numpy()).tolist()

    for i in range(len(val["inputs"])):
        task_id, j = tasks[int(val["task_index"][i])]["id"], int(val["test_index"][i])
        assert original(val, i, "inputs") == chall["evaluation"][task_id]["test"][j]["input"]
        assert original(val, i, "labels") == sols["evaluation"][task_id][j]
    for i in range(len(train["inputs"])):
        task = tasks[int(train["task_index"][i])]
        j = int(train["test_index"][i])
        pair = (original(train, i, "inputs"), original(train, i, "labels"))
        source = chall[task["subset"]][task["id"]]
        if j < 0:
            assert {"input": pair[0], "output": pair[1]} in source["train"]
        else:
            assert task["subset"] == "training"  # test pairs of evaluation tasks never reach train
            assert pair == (source["test"][j]["input"], sols["training"][task["id"]][j])


@needs_arc
def test_dataset_dir_depends_on_every_parameter(tmp_path: Path, small_arc: ArcData) -> None:
    base = {"arc_dir": ARC_DIR, "max_tasks_per_subset": MAX_TASKS, "num_aug": NUM_AUG, "seed": 0}
    root = ArcBuilder.for_data_root(tmp_path, **base).root
    assert root.name == small_arc.root.name and root.name.startswith("arc_training+evaluation_eval-evaluation_aug3")
    variants = [{"num_aug": 2}, {"seed": 1}, {"max_tasks_per_subset": 4}, {"train_subsets": ["training"]},
                {"max_tasks_per_subset": None}]
    names = {ArcBuilder.for_data_root(tmp_path, **{**base, **v}).root.name for v in variants}
    assert len(names) == len(variants) and root.name not in names


# --------------------------------------------------------------------------------- malformed files
def _task(n_test: int = 1) -> dict[str, Any]:
    return {
        "train": [{"input": [[1, 0], [0, 1]], "output": [[2]]}, {"input": [[3]], "output": [[4, 4]]}],
        "test": [{"input": [[5, 6, 7]]} for _ in range(n_test)],
    }


def _write_arc_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for subset, ids in (("training", ["aaaa0001", "aaaa0002"]), ("evaluation", ["bbbb0001", "bbbb0002"])):
        challenges = {t: _task(n_test=2 if t.endswith("2") else 1) for t in ids}
        solutions = {t: [[[9, 8]]] * len(challenges[t]["test"]) for t in ids}
        (path / f"arc-agi_{subset}_challenges.json").write_text(json.dumps(challenges))
        (path / f"arc-agi_{subset}_solutions.json").write_text(json.dumps(solutions))
    return path


def _edit(path: Path, edit: Any) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _ragged(d: dict) -> None:
    d["bbbb0002"]["train"][1]["input"] = [[1, 2], [3]]


def _colour_12(d: dict) -> None:
    d["aaaa0002"]["test"][1]["input"] = [[1, 12]]


def _colour_11(d: dict) -> None:
    d["bbbb0001"]["train"][0]["output"] = [[0, 1], [11, 2]]


def _too_large(d: dict) -> None:
    d["bbbb0001"]["train"][0]["output"] = [[0] * 31]


def _no_test(d: dict) -> None:
    del d["aaaa0001"]["test"]


def _drop_solution(d: dict) -> None:
    del d["bbbb0002"]


def _short_solutions(d: dict) -> None:
    d["aaaa0002"] = d["aaaa0002"][:1]


def _bool_cell(d: dict) -> None:
    d["bbbb0001"]["test"][0]["input"] = [[True]]


@pytest.mark.parametrize(
    ("file", "edit", "expected"),
    [
        ("evaluation_challenges", _ragged, [r"task 'bbbb0002', train pair 1, input", "rectangular"]),
        ("training_challenges", _colour_12, [r"task 'aaaa0002', test pair 1, input", "12", r"0\.\.9"]),
        ("evaluation_challenges", _colour_11, [r"task 'bbbb0001', train pair 0, output: cell \(1, 0\) is 11", r"0\.\.9"]),
        ("evaluation_challenges", _too_large, [r"task 'bbbb0001', train pair 0, output", "1x31", "30x30"]),
        ("training_challenges", _no_test, [r"task 'aaaa0001'", "'test'"]),
        ("evaluation_solutions", _drop_solution, [r"task 'bbbb0002'", "no solutions"]),
        ("training_solutions", _short_solutions, [r"task 'aaaa0002', test pair 1", "no solution"]),
        ("evaluation_challenges", _bool_cell, [r"task 'bbbb0001', test pair 0, input", "True"]),
    ],
    ids=["ragged", "colour12", "colour11", "too_large", "no_test", "missing_solution", "short_solutions", "bool_cell"],
)
def test_malformed_files_name_the_file_and_task(tmp_path: Path, file: str, edit: Any, expected: list[str]) -> None:
    arc_dir = _write_arc_dir(tmp_path / "arc")
    # The untouched files build (and the synthetic set is a valid dataset).
    ok = ArcData(data_root=str(tmp_path / "ok"), arc_dir=str(arc_dir), num_aug=1)
    ok.prepare_data()
    ok.setup()
    path = arc_dir / f"arc-agi_{file}.json"
    _edit(path, edit)
    dm = ArcData(data_root=str(tmp_path / "data"), arc_dir=str(arc_dir), num_aug=1)
    with pytest.raises(ArcFormatError) as info:
        dm.prepare_data()
    assert isinstance(info.value, ConfigError)  # the entry points exit 2 with this message, no traceback
    message = str(info.value)
    assert str(path) in message
    for pattern in expected:
        assert re.search(pattern, message), (pattern, message)
    assert not dm.builder.is_complete() and not dm.root.exists()


def test_truncated_json_names_the_file_and_position(tmp_path: Path) -> None:
    arc_dir = _write_arc_dir(tmp_path / "arc")
    path = arc_dir / "arc-agi_training_challenges.json"
    path.write_text(path.read_text()[:57])
    with pytest.raises(ArcFormatError, match=rf"{path}.*not valid JSON.*line 1, column.*download the file again"):
        ArcData(data_root=str(tmp_path / "data"), arc_dir=str(arc_dir)).prepare_data()


def test_non_utf8_json_names_the_file_and_line(tmp_path: Path) -> None:
    arc_dir = _write_arc_dir(tmp_path / "arc")
    path = arc_dir / "arc-agi_evaluation_solutions.json"
    path.write_bytes(b'{"bbbb0001":\n[[[1]]],\n"caf\xe9": []}')  # a Latin-1 task id on line 3
    with pytest.raises(ArcFormatError, match=rf"{path}:3: not UTF-8 text \(byte 0xe9\); save the file as UTF-8"):
        ArcData(data_root=str(tmp_path / "data"), arc_dir=str(arc_dir)).prepare_data()


def test_damaged_task_list_says_to_rebuild(tmp_path: Path) -> None:
    dm = ArcData(data_root=str(tmp_path / "data"), arc_dir=str(_write_arc_dir(tmp_path / "arc")), num_aug=1)
    dm.prepare_data()
    dm.tasks_path.write_text('{"tasks": [{"id": "aaaa0001",')
    with pytest.raises(ConfigError, match=rf"{re.escape(str(dm.tasks_path))}:1: not valid JSON .*--rebuild-dataset"):
        load_arc_tasks(dm.tasks_path)
    dm.tasks_path.write_text('{"tasks": [{"id": 7}]}')
    with pytest.raises(ConfigError, match=rf"{re.escape(str(dm.tasks_path))}: expected .*--rebuild-dataset"):
        load_arc_tasks(dm.tasks_path)


def test_missing_arc_dir_or_files_say_how_to_set_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.arc_dir=/path/to/arc-prize-files"):
        ArcData(data_root=str(tmp_path), arc_dir=None)
    arc_dir = _write_arc_dir(tmp_path / "arc")
    (arc_dir / "arc-agi_evaluation_solutions.json").unlink()
    with pytest.raises(ConfigError, match=r"arc-agi_evaluation_solutions\.json.*data\.arc_dir="):
        ArcData(data_root=str(tmp_path), arc_dir=str(arc_dir))
    with pytest.raises(ConfigError, match=r"data\.train_subsets lists a subset twice"):
        ArcData(data_root=str(tmp_path), arc_dir=str(arc_dir), train_subsets=["training", "training"])
    with pytest.raises(ConfigError, match=r"data\.num_aug must be an integer >= 0"):
        ArcData(data_root=str(tmp_path), arc_dir=str(arc_dir), num_aug=-1)


def test_synthetic_tasks_with_eval_subset_outside_train_subsets(tmp_path: Path) -> None:
    arc_dir = _write_arc_dir(tmp_path / "arc")
    dm = ArcData(data_root=str(tmp_path / "d"), arc_dir=str(arc_dir), train_subsets=["training"], num_aug=2)
    dm.prepare_data()
    dm.setup()
    s = dm.summary
    # training: 2 tasks x (2 demos) + 3 tests; evaluation: 2 x 2 demos to train, 3 tests to val; x3 augs.
    assert (s["train_rows"], s["val_rows"], s["num_puzzle_identifiers"]) == (3 * (4 + 3 + 4), 3 * 3, 13)


# -------------------------------------------------------------------------------------- evaluator
def _val_rows(dm: ArcData) -> dict[str, torch.Tensor]:
    return dict(dm.val_dataset.tensors)


def _one_hot(tokens: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(tokens.clamp(min=0), VOCAB_SIZE).float()


def _feed(ev: ArcEvaluator, rows: dict[str, torch.Tensor], logits: torch.Tensor, q: torch.Tensor | None = None,
          batch_size: int = 7, seed: int = 0) -> None:
    """Rows in a shuffled order, in batches, like a validation loader with several augmentations mixed."""
    order = torch.randperm(len(logits), generator=torch.Generator().manual_seed(seed))
    for idx in order.split(batch_size):
        outputs = {"logits": logits[idx]}
        if q is not None:
            outputs["q_halt_logits"] = q[idx]
        ev.update(outputs, {k: v[idx] for k, v in rows.items()})


@needs_arc
def test_evaluator_oracle_scores_one_and_writes_the_solutions(small_arc: ArcData, tmp_path: Path) -> None:
    rows = _val_rows(small_arc)
    facts = small_arc.model_kwargs()
    ev = ArcEvaluator(arc_tasks_path=facts["arc_tasks_path"])
    _feed(ev, rows, _one_hot(rows["labels"]))
    ev.sync()
    metrics = ev.compute()
    assert metrics == {"arc_pass@1": 1.0, "arc_pass@2": 1.0, "arc_num_tasks": 5.0, "arc_coverage": 1.0}
    ev.on_validation_end(trainer_stand_in(tmp_path), metrics)  # rank 0 writes <run_dir>/submission.json
    submission = json.loads((tmp_path / "submission.json").read_text())
    solutions = _load("evaluation", "solutions")
    assert list(submission) == _first_ids("evaluation")
    assert {t: [a["attempt_1"] for a in v] for t, v in submission.items()} == {t: solutions[t] for t in submission}
    assert all(a["attempt_2"] == a["attempt_1"] for v in submission.values() for a in v)
    assert not [p for p in tmp_path.iterdir() if p.name != "submission.json"]  # no temp file left behind

    # Same rows in another order and batch size: same result; reset() forgets everything.
    ev2 = ArcEvaluator(arc_tasks_path=facts["arc_tasks_path"])
    _feed(ev2, rows, _one_hot(rows["labels"]), batch_size=3, seed=5)
    assert ev2.compute() == metrics
    ev2.reset()
    assert ev2.compute()["arc_pass@1"] == 0.0 and ev2.compute()["arc_coverage"] == 0.0


def _predict(rows: dict[str, torch.Tensor], i: int, grid: np.ndarray | None) -> torch.Tensor:
    """Tokens of an original-frame grid as row i would predict it (in that row's augmented frame)."""
    if grid is None:
        return torch.zeros(SEQ_LEN, dtype=torch.long)  # all padding: an invalid crop
    aug = augment_grid(grid, int(rows["aug_transform"][i]), rows["aug_colors"][i].numpy())
    return torch.from_numpy(encode_grid(aug))


def _wrong(grid: np.ndarray, delta: int) -> np.ndarray:
    out = grid.copy()
    out[0, 0] = (int(out[0, 0]) + delta) % NUM_COLORS
    return out


@needs_arc
def test_evaluator_votes_rank_by_count_then_confidence(small_arc: ArcData, tmp_path: Path) -> None:
    rows = _val_rows(small_arc)
    tasks_path = small_arc.model_kwargs()["arc_tasks_path"]
    tasks = json.loads(Path(tasks_path).read_text())["tasks"]
    eval_idx = [i for i, t in enumerate(tasks) if t["eval"]]
    a_task, b_task, c_task, d_task, e_task = eval_idx
    n = len(rows["labels"])
    preds = rows["labels"].clamp(min=0).clone()
    q = torch.zeros(n)
    wrong: dict[tuple[int, int], np.ndarray] = {}
    for i in range(n):
        task, test = int(rows["task_index"][i]), int(rows["test_index"][i])
        aug = (int(rows["puzzle_identifiers"][i]) - 1) % N_AUG
        truth_aug = decode_grid(rows["labels"][i].numpy())
        truth = unaugment_grid(truth_aug, int(rows["aug_transform"][i]), rows["aug_colors"][i].numpy())
        w1, w2 = _wrong(truth, 1), _wrong(truth, 2)
        wrong[task, test] = w1
        if task == a_task and aug < 3:  # 3 of 4 vote W1: truth second
            preds[i] = _predict(rows, i, w1)
        elif task == b_task:  # 2 vote W1, 2 are invalid crops: truth absent
            preds[i] = _predict(rows, i, w1 if aug < 2 else None)
        elif task == c_task:  # 2 vs 2, the truth more confident: truth first
            preds[i] = _predict(rows, i, w1 if aug < 2 else truth)
            q[i] = -1.0 if aug < 2 else 2.0
        elif task == d_task:  # 2 vs 2, W2 more confident: truth second
            preds[i] = _predict(rows, i, w2 if aug < 2 else truth)
            q[i] = 3.0 if aug < 2 else 0.5
            wrong[task, test] = w2
    keep = rows["task_index"] != e_task  # task E gets no prediction at all
    ev = ArcEvaluator(arc_tasks_path=tasks_path)
    _feed(ev, {k: v[keep] for k, v in rows.items()}, _one_hot(preds[keep]), q[keep])
    metrics = ev.compute()
    ev.write_submission(tmp_path / "run" / "submission.json")
    # pass@1: only C; pass@2: A, C, D. E is scored (it is an evaluation task) and fails.
    assert metrics["arc_pass@1"] == pytest.approx(1 / 5)
    assert metrics["arc_pass@2"] == pytest.approx(3 / 5)
    assert metrics["arc_num_tasks"] == 5.0
    n_tests = {i: tasks[i]["num_test"] for i in eval_idx}
    assert metrics["arc_coverage"] == pytest.approx(1 - n_tests[e_task] / sum(n_tests.values()))

    submission = json.loads((tmp_path / "run" / "submission.json").read_text())
    solutions = _load("evaluation", "solutions")
    assert list(submission) == [tasks[i]["id"] for i in eval_idx]
    for t in eval_idx:
        entry = submission[tasks[t]["id"]]
        assert len(entry) == n_tests[t]
        for j, attempts in enumerate(entry):
            assert set(attempts) == {"attempt_1", "attempt_2"}
            truth, w = solutions[tasks[t]["id"]][j], wrong[t, j].tolist()
            expected = {a_task: (w, truth), b_task: (w, w), c_task: (truth, w), d_task: (w, truth),
                        e_task: ([[0]], [[0]])}[t]
            assert (attempts["attempt_1"], attempts["attempt_2"]) == expected


def test_evaluator_without_task_list_scores_seen_tasks() -> None:
    grid = np.array([[1, 2], [3, 0]], dtype=np.uint8)
    rows: dict[str, list] = {k: [] for k in ("labels", "task_index", "test_index", "aug_transform", "aug_colors")}
    logits = []
    rng = np.random.default_rng(0)
    for task, test in ((7, 0), (7, 1), (9, 0)):
        for k in range(NUM_TRANSFORMS):
            perm = random_color_permutation(rng)
            aug = augment_grid(grid, k, perm)
            rows["labels"].append(torch.from_numpy(encode_label(aug)))
            pred = aug if (task, test) != (7, 1) else augment_grid(_wrong(grid, 1), k, perm)
            logits.append(_one_hot(torch.from_numpy(encode_grid(pred))))
            for key, value in (("task_index", task), ("test_index", test), ("aug_transform", k)):
                rows[key].append(torch.tensor(value))
            rows["aug_colors"].append(torch.from_numpy(perm))
    batch = {k: torch.stack(v) for k, v in rows.items()}
    # A demonstration row (test_index -1) in the same batch is ignored.
    batch["test_index"][0] = -1
    ev = ArcEvaluator(name="arc_eval")
    ev.update({"logits": torch.stack(logits)}, batch)
    assert ev.compute() == {"arc_eval_pass@1": 0.75, "arc_eval_pass@2": 0.75, "arc_eval_num_tasks": 2.0,
                            "arc_eval_coverage": 1.0}
    with pytest.raises(KeyError, match="aug_colors"):
        ev.update({"logits": torch.stack(logits)}, {k: v for k, v in batch.items() if k != "aug_colors"})
    empty = ArcEvaluator().compute()
    assert np.isnan(empty["arc_pass@1"]) and empty["arc_num_tasks"] == 0.0


def _sync_worker(rank: int, init_file: str, rows: dict[str, torch.Tensor], logits: torch.Tensor, tasks_path: str,
                 run_dir: str, queue: Any) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        ev = ArcEvaluator(arc_tasks_path=tasks_path)
        # Rank r sees rows r, r+2, ... plus row 0 again (a sampler's padding duplicate).
        idx = torch.cat([torch.arange(rank, len(logits), 2), torch.tensor([0])])
        ev.update({"logits": logits[idx]}, {k: v[idx] for k, v in rows.items()})
        ev.sync()
        votes = sum(len(v) for v in ev.votes.values())
        metrics = ev.compute()
        ev.on_validation_end(trainer_stand_in(Path(run_dir) / str(rank), rank, world_size=2), metrics)
        queue.put((rank, (metrics, votes)))
    finally:
        torch.distributed.destroy_process_group()


@needs_arc
def test_evaluator_sync_gathers_every_rank(small_arc: ArcData, tmp_path: Path) -> None:
    rows = _val_rows(small_arc)
    tasks_path = small_arc.model_kwargs()["arc_tasks_path"]
    logits = _one_hot(rows["labels"])
    ctx = mp.get_context("fork")  # the children reuse this process's imports: ~1 s instead of ~10 s
    queue = ctx.Queue()
    procs = [ctx.Process(target=_sync_worker, args=(r, str(tmp_path / "init"), rows, logits, tasks_path,
                                                    str(tmp_path), queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = dict(queue.get(timeout=60) for _ in procs)
        for p in procs:
            p.join(timeout=30)
            assert p.exitcode == 0
    finally:
        for p in procs:  # never leave a hung rank behind
            if p.is_alive():
                p.kill()
                p.join()
    single = ArcEvaluator(arc_tasks_path=tasks_path)
    _feed(single, rows, logits)
    # Both ranks hold every row's vote once (the duplicate of row 0 does not count twice).
    assert results[0] == results[1] == (single.compute(), len(logits))
    assert (tmp_path / "0" / "submission.json").is_file() and not (tmp_path / "1").exists()  # rank 0 writes


# ------------------------------------------------------------------------------------ Hydra config
@needs_arc
def test_hydra_composed_data_module_and_evaluators(tmp_path: Path) -> None:
    cfg = compose_config(
        "run_name=test",
        "data=reasoning/arc",
        "evaluators=reasoning/arc",
        f"data.arc_dir={ARC_DIR}",
        f"paths.data_root={tmp_path / 'data'}",
        "data.max_tasks_per_subset=2",
        "data.num_aug=1",
    )
    validate_config(cfg)
    assert cfg.data.train_subsets == ["training", "evaluation"] and cfg.data.eval_subset == "evaluation"
    dm = instantiate(cfg.data)
    assert isinstance(dm, ArcData) and dm.root.parent == tmp_path / "data"
    dm.prepare_data()
    dm.setup()
    facts = dm.model_kwargs()
    assert facts == {"vocab_size": 12, "seq_len": 900, "num_puzzle_identifiers": 2 * 2 * 2 + 1,
                     "arc_tasks_path": str(dm.root / "tasks.json")}
    assert Path(facts["arc_tasks_path"]).is_file()
    # Evaluators as the trainer builds them: facts the target accepts and the config leaves unset.
    evaluators = {name: instantiate(node, **({"arc_tasks_path": facts["arc_tasks_path"]} if name == "arc" else {}))
                  for name, node in cfg.evaluators.items()}
    assert set(evaluators) == {"exact_acc", "token_acc", "arc"}
    batch = dm.collate_fn(dm.val_dataset.__getitems__(list(range(len(dm.val_dataset)))))
    outputs = {"logits": _one_hot(batch["labels"])}
    metrics = {}
    for ev in evaluators.values():
        ev.reset()
        ev.update(outputs, batch)
        ev.sync()
        metrics.update(ev.compute())
    assert metrics == {"exact_acc": 1.0, "token_acc": 1.0, "arc_pass@1": 1.0, "arc_pass@2": 1.0,
                       "arc_num_tasks": 2.0, "arc_coverage": 1.0}
    evaluators["arc"].on_validation_end(trainer_stand_in(tmp_path), metrics)
    assert (tmp_path / "submission.json").is_file()


def test_config_without_arc_dir_fails_with_the_fix() -> None:
    cfg = compose_config("run_name=test", "data=reasoning/arc", "evaluators=reasoning/arc")
    validate_config(cfg)  # the yaml itself is valid; the missing directory is reported at instantiation
    with pytest.raises(ConfigError, match=r"data\.arc_dir=/path/to/arc-prize-files"):
        instantiate_data(cfg.data)  # the constructor's ConfigError, not Hydra's InstantiationException around it
