"""ARC Prize scoring of the vision-unified ARC rows (dataset.multimodal.arc_evaluator.MultimodalArcEvaluator) on rows
built by the real streaming builder from ../shared/data/arc (those tests skip, with the reason, where it
is absent): oracle predictions score 1 and reproduce the solutions in submission.json; wrong, ragged or
unterminated predictions fail their test input; non-ARC rows are ignored. Plus the dataset side: the
``task_index`` / ``test_index`` columns, ``arc_tasks.json``, the ``arc_tasks_path`` fact, the evaluator
as a callback writing ``submission.json`` at the end of a validation and the refusal of a directory written
by the previous format.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dataset.base import params_digest
from dataset.multimodal.arc_evaluator import MultimodalArcEvaluator, decode_byte_grid, parse_grid_bytes
from dataset.multimodal.data_module import VisionUnifiedData
from dataset.multimodal.tokens import BYTE_OFFSET, EOS_TOKEN, PAD_TOKEN, VOCAB_SIZE
from dataset.streaming.manifest import DatasetMismatchError, read_manifest
from tests.cli_helpers import REPO_ROOT
from tests.conftest import trainer_stand_in
from utils.training.callbacks import Callback

ARC_DIR = REPO_ROOT.parent / "shared" / "data" / "arc"
NUM_TASKS = 56  # the first 56 training tasks (sorted ids) include tasks with 2 and with 3 test inputs
NOT_A_TASK = 10**6


@pytest.fixture(scope="module")
def arc_data(tmp_path_factory: pytest.TempPathFactory) -> VisionUnifiedData:
    if not (ARC_DIR / "arc-agi_training_challenges.json").is_file():
        reason = f"no ARC files in {ARC_DIR}"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    data = VisionUnifiedData(
        str(tmp_path_factory.mktemp("data")), name="arc", arc_dir=str(ARC_DIR), arc_max_tasks=NUM_TASKS,
        generate_stories=0, code_dirs=[], target_len=1000, val_every=2, examples_per_batch=32, batches_per_consolidated=4,
    )
    data.prepare_data(incremental=False)
    data.setup()
    return data


def all_rows(data: VisionUnifiedData) -> dict[str, torch.Tensor]:
    """Every row of every consolidated file (train and held out), without ``is_val``: all test inputs."""
    manifest = read_manifest(data.root)
    assert manifest is not None and manifest["complete"]
    parts = [torch.load(data.root / c["file"], weights_only=True) for c in manifest["consolidated"]]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0] if k != "is_val"}


def tasks_of(data: VisionUnifiedData) -> list[dict[str, Any]]:
    return json.loads(Path(data.model_kwargs()["arc_tasks_path"]).read_text())["tasks"]


def solutions() -> dict[str, list[list[list[int]]]]:
    return json.loads((ARC_DIR / "arc-agi_training_solutions.json").read_text())


def tokens(text: bytes, length: int, eos: bool = True) -> torch.Tensor:
    row = torch.full((length,), PAD_TOKEN, dtype=torch.long)
    body = [b + BYTE_OFFSET for b in text] + ([EOS_TOKEN] if eos else [])
    row[: len(body)] = torch.tensor(body)
    return row


def score(rows: dict[str, torch.Tensor], pred: torch.Tensor, evaluator: MultimodalArcEvaluator,
          batch_size: int = 16) -> dict[str, float]:
    """Feed ``rows`` with one-hot logits of the predicted tokens ``pred`` [N, T], in batches; compute."""
    for start in range(0, len(pred), batch_size):
        batch = {k: v[start : start + batch_size] for k, v in rows.items()}
        logits = F.one_hot(pred[start : start + batch_size], VOCAB_SIZE).float()
        evaluator.update({"logits": logits}, batch)
    evaluator.sync()
    return evaluator.compute()


def oracle(rows: dict[str, torch.Tensor]) -> torch.Tensor:
    return rows["target"].clamp(min=PAD_TOKEN)  # -100 after EOS -> PAD: the argmax is the target


def test_rows_carry_task_and_test_index(arc_data: VisionUnifiedData) -> None:
    rows, tasks = all_rows(arc_data), tasks_of(arc_data)
    sols = solutions()
    assert [t["id"] for t in tasks] == sorted(sols)[:NUM_TASKS]
    assert [t["num_test"] for t in tasks] == [len(sols[t["id"]]) for t in tasks]  # no max_examples: all of them
    assert max(t["num_test"] for t in tasks) == 3 and sum(t["num_test"] == 2 for t in tasks) >= 2
    assert (rows["source"] == 0).all() and rows["task_index"].dtype == torch.long
    test = rows["test_index"] >= 0
    pairs = sorted(zip(rows["task_index"][test].tolist(), rows["test_index"][test].tolist()))
    assert pairs == [(i, j) for i, t in enumerate(tasks) for j in range(t["num_test"])]  # each test input once
    assert set(rows["task_index"].tolist()) == set(range(NUM_TASKS))
    # the data module's batches carry the columns (the model ignores keys it does not read)
    batch = arc_data.collate_fn(arc_data.val_dataset.__getitems__([0, 1]))
    assert set(batch) == {"images", "target", "source", "task_index", "test_index"}
    # held-out tasks (eval) are exactly those whose rows are validation rows
    held_out = {int(t) for t in arc_data.val_dataset.tensors["task_index"].tolist()}
    assert held_out <= {i for i, t in enumerate(tasks) if t["eval"]}


def test_oracle_predictions_score_one_and_write_the_solutions(arc_data: VisionUnifiedData, tmp_path: Path) -> None:
    rows = all_rows(arc_data)
    ev = MultimodalArcEvaluator(arc_tasks_path=arc_data.model_kwargs()["arc_tasks_path"])
    result = score(rows, oracle(rows), ev)
    assert result == {"arc_pass@1": 1.0, "arc_pass@2": 1.0, "arc_num_tasks": float(NUM_TASKS), "arc_coverage": 1.0}
    ev.write_submission(tmp_path / "submission.json")
    sols = solutions()
    expected = {
        task_id: [{"attempt_1": grid, "attempt_2": grid} for grid in sols[task_id]] for task_id in sorted(sols)[:NUM_TASKS]
    }
    assert json.loads((tmp_path / "submission.json").read_text()) == expected
    # a row seen twice (a distributed sampler's padding) votes once; without the task list: indices as names
    again = score(rows, oracle(rows), ev)
    assert again == result
    unnamed = MultimodalArcEvaluator()
    assert score(rows, oracle(rows), unnamed) == result
    # a test input with no row (evaluation cut short) counts as unsolved for its task; unseen tasks are not scored
    tasks = tasks_of(arc_data)
    three = next(i for i, t in enumerate(tasks) if t["num_test"] == 3)
    keep = ~((rows["task_index"] == three) & (rows["test_index"] == 1)) & (rows["task_index"] != 0)
    part = {k: v[keep] for k, v in rows.items()}
    cut = score(part, oracle(part), MultimodalArcEvaluator(arc_tasks_path=ev.arc_tasks_path))
    total = sum(t["num_test"] for t in tasks[1:])
    assert cut == {"arc_pass@1": pytest.approx((NUM_TASKS - 1 - 1 / 3) / (NUM_TASKS - 1)),
                   "arc_pass@2": pytest.approx((NUM_TASKS - 1 - 1 / 3) / (NUM_TASKS - 1)),
                   "arc_num_tasks": NUM_TASKS - 1, "arc_coverage": pytest.approx((total - 1) / total)}


def test_wrong_ragged_and_unterminated_predictions_fail(arc_data: VisionUnifiedData, tmp_path: Path) -> None:
    rows, tasks = all_rows(arc_data), tasks_of(arc_data)
    pred = oracle(rows).clone()
    length = pred.shape[1]
    multi = [i for i, t in enumerate(tasks) if t["num_test"] >= 2]
    two, three = next(i for i in multi if tasks[i]["num_test"] == 2), next(i for i in multi if tasks[i]["num_test"] == 3)
    wrong, no_eos = 0, 3  # every test input of these tasks
    assert tasks[wrong]["num_test"] == tasks[no_eos]["num_test"] == 1

    def row_of(task: int, test: int) -> int:
        hit = ((rows["task_index"] == task) & (rows["test_index"] == test)).nonzero().flatten().tolist()
        assert len(hit) == 1
        return hit[0]

    r = row_of(wrong, 0)  # one cell off
    first_digit = int((pred[r] >= BYTE_OFFSET + ord("0")).nonzero()[0])
    pred[r, first_digit] = BYTE_OFFSET + ord("0") + (int(pred[r, first_digit]) - BYTE_OFFSET - ord("0") + 1) % 10
    r = row_of(no_eos, 0)  # the right grid, but never ended: not an answer
    pred[r] = torch.where(pred[r] == EOS_TOKEN, torch.full_like(pred[r], BYTE_OFFSET + ord("\n")), pred[r])
    pred[row_of(two, 1)] = tokens(b"12\n34", length)  # a well-formed grid, the wrong one
    pred[row_of(three, 0)] = tokens(b"12\n3", length)  # ragged rows: no candidate at all

    # non-ARC rows are ignored, even when they name an ARC task: wrong predictions there change nothing
    n = 4
    extra = {
        "images": torch.zeros((n, *rows["images"].shape[1:]), dtype=torch.uint8),
        "target": torch.stack([tokens(b"text", length)] * n),
        "source": torch.tensor([1, 2, 1, 2]),
        "task_index": torch.tensor([1, 2, -1, -1]),
        "test_index": torch.tensor([0, 0, -1, -1]),
    }
    mixed = {k: torch.cat([v, extra[k]]) for k, v in rows.items()}
    mixed_pred = torch.cat([pred, torch.stack([tokens(b"9", length)] * n)])
    ev = MultimodalArcEvaluator(arc_tasks_path=arc_data.model_kwargs()["arc_tasks_path"])
    result = score(mixed, mixed_pred, ev)
    ev.write_submission(tmp_path / "submission.json")
    expected = (NUM_TASKS - 1 - 1 - 1 / 2 - 1 / 3) / NUM_TASKS
    assert result["arc_pass@1"] == pytest.approx(expected) and result["arc_pass@2"] == pytest.approx(expected)
    assert result["arc_num_tasks"] == NUM_TASKS and result["arc_coverage"] == 1.0
    sub = json.loads((tmp_path / "submission.json").read_text())
    sols = solutions()
    assert sub[tasks[wrong]["id"]][0]["attempt_1"] != sols[tasks[wrong]["id"]][0]
    assert sub[tasks[no_eos]["id"]] == [{"attempt_1": [[0]], "attempt_2": [[0]]}]  # no valid candidate: placeholder
    assert sub[tasks[two]["id"]] == [{"attempt_1": g, "attempt_2": g} for g in (sols[tasks[two]["id"]][0], [[1, 2], [3, 4]])]
    assert sub[tasks[three]["id"]][0]["attempt_1"] == [[0]] and sub[tasks[three]["id"]][1]["attempt_1"] == sols[tasks[three]["id"]][1]

    # two "ranks", each with half of the rows, merged as sync does: the same totals
    half = len(pred) // 2
    a, b = MultimodalArcEvaluator(arc_tasks_path=ev.arc_tasks_path), MultimodalArcEvaluator(arc_tasks_path=ev.arc_tasks_path)
    score({k: v[:half] for k, v in rows.items()}, pred[:half], a)
    score({k: v[half:] for k, v in rows.items()}, pred[half:], b)
    a.load_states([a.state(), b.state()])
    assert a.compute() == result


def test_no_arc_rows_gives_nan_and_writes_nothing(tmp_path: Path) -> None:
    ev = MultimodalArcEvaluator()
    batch = {"target": torch.stack([tokens(b"01\n23", 8)] * 2), "source": torch.tensor([1, 2]),
             "task_index": torch.tensor([0, -1]), "test_index": torch.tensor([0, -1])}
    ev.update({"logits": F.one_hot(batch["target"], VOCAB_SIZE).float()}, batch)
    ev.sync()
    result = ev.compute()
    assert math.isnan(result["arc_pass@1"]) and math.isnan(result["arc_pass@2"]) and result["arc_num_tasks"] == 0.0
    ev.on_validation_end(trainer_stand_in(tmp_path), result)
    assert not (tmp_path / "submission.json").exists()
    with pytest.raises(KeyError, match="task_index"):  # a dataset of the previous format
        ev.update({"logits": torch.zeros(1, 8, VOCAB_SIZE)}, {"target": batch["target"][:1], "source": torch.tensor([0])})


def test_grid_decoding() -> None:
    assert parse_grid_bytes(b"012\n340") == (2, 3, bytes([0, 1, 2, 3, 4, 0]))
    for bad in (b"", b"12\n3", b"1a", b"12\n", b"\n12"):
        assert parse_grid_bytes(bad) is None, bad
    assert decode_byte_grid(tokens(b"7\n8", 6).numpy()) == (2, 1, bytes([7, 8]))
    assert decode_byte_grid(tokens(b"78", 6, eos=False).numpy()) is None  # no EOS
    row = tokens(b"78", 6).numpy()
    row[0] = PAD_TOKEN
    assert decode_byte_grid(row) is None  # PAD is not a byte


def test_the_evaluator_gets_the_task_list_and_writes_the_submission_at_validation_end(
    arc_data: VisionUnifiedData, tmp_path: Path
) -> None:
    node = OmegaConf.load(REPO_ROOT / "conf" / "evaluators" / "multimodal" / "default.yaml")
    assert "arc_exact" in node and node.arc._target_ == "dataset.multimodal.arc_evaluator.MultimodalArcEvaluator"
    ev = instantiate(node.arc, arc_tasks_path=arc_data.model_kwargs()["arc_tasks_path"])  # the data fact
    assert isinstance(ev, MultimodalArcEvaluator) and isinstance(ev, Callback)
    assert ev.arc_tasks_path == str(arc_data.root / "arc_tasks.json")
    assert "run_dir" not in inspect.signature(MultimodalArcEvaluator).parameters  # no longer smuggled in as a fact

    rows = all_rows(arc_data)
    metrics = score(rows, oracle(rows), ev)
    others = tmp_path / "rank1"
    ev.on_validation_end(trainer_stand_in(others, rank=1, world_size=2), metrics)
    assert not others.exists()  # only rank 0 writes
    ev.on_validation_end(trainer_stand_in(tmp_path), metrics)
    sub = json.loads((tmp_path / "submission.json").read_text())
    assert len(sub) == NUM_TASKS and sub == ev.submission
    assert [p.name for p in tmp_path.iterdir()] == ["submission.json"]  # written atomically: no temp file left
    ev.reset()  # the next evaluation scores no ARC rows: the file of the last one stays as it was
    ev.on_validation_end(trainer_stand_in(tmp_path), ev.compute())
    assert json.loads((tmp_path / "submission.json").read_text()) == sub


def test_a_dataset_of_the_previous_format_is_refused(tmp_path: Path) -> None:
    kwargs = {"generate_stories": 2, "stories_per_file": 2, "code_dirs": [], "target_len": 16, "examples_per_batch": 4,
              "batches_per_consolidated": 2, "max_examples": 8, "val_every": 2}
    data = VisionUnifiedData(str(tmp_path), name="vu", **kwargs)
    data.prepare_data(incremental=False)
    manifest = read_manifest(data.root)
    assert manifest is not None and manifest["format"] == 2 and "arc_tasks_path" not in data.model_kwargs()
    old = {**manifest["params"], "format": 1}
    manifest.update(format=1, params=old, params_hash=params_digest(old))  # as format 1 wrote it
    (data.root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetMismatchError, match=r"differing: format\).*--rebuild-dataset"):
        VisionUnifiedData(str(tmp_path), name="vu", **kwargs).prepare_data()
