"""Modular arithmetic data module and the build-once DiskDatasetBuilder."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from dataset.base import DiskDatasetBuilder
from dataset.grokking.modular_arithmetic import (
    MalformedDatasetError,
    check_data,
    ModularArithmeticBuilder,
    ModularArithmeticData,
    make_equations,
)
from dataset.tensors import collate_tensor_dicts
from utils.config.errors import ConfigError


def _reference_answer(x: int, y: int, op: str, p: int) -> int:
    if op == "add":
        return (x + y) % p
    if op == "sub":
        return (x - y) % p
    if op == "mul":
        return (x * y) % p
    # Division by brute force: the z with z * y == x (mod p). Independent of Fermat's inverse.
    return next(z for z in range(p) if (z * y) % p == x)


def _all_rows(dm: ModularArithmeticData) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = torch.cat([dm.train_dataset.tensors["inputs"], dm.val_dataset.tensors["inputs"]])
    targets = torch.cat([dm.train_dataset.tensors["target"], dm.val_dataset.tensors["target"]])
    return inputs, targets


# ------------------------------------------------------------------------------------ contents
@pytest.mark.parametrize("op", ["add", "sub", "mul", "div"])
def test_every_answer_is_correct(tmp_path: Path, op: str) -> None:
    p = 11
    dm = ModularArithmeticData(data_root=str(tmp_path), p=p, operation=op)
    dm.prepare_data()
    dm.setup()
    inputs, targets = _all_rows(dm)

    expected_n = p * (p - 1) if op == "div" else p * p
    assert inputs.shape == (expected_n, 4) and targets.shape == (expected_n,)
    assert inputs.dtype == targets.dtype == torch.long
    pairs = {(int(x), int(y)) for x, _, y, _ in inputs.tolist()}
    y_values = range(1, p) if op == "div" else range(p)
    assert pairs == {(x, y) for x in range(p) for y in y_values}  # every pair exactly once
    for (x, op_tok, y, eq_tok), z in zip(inputs.tolist(), targets.tolist()):
        assert (op_tok, eq_tok) == (p, p + 1)
        assert z == _reference_answer(x, y, op, p)


@pytest.mark.parametrize("op", ["add", "mul"])
def test_nonzero_y_leaves_out_y_zero_in_its_own_directory(tmp_path: Path, op: str) -> None:
    # Grokfast's task (experiment=grokking): x * y mod p for y in 1..p-1 only.
    p = 11
    dm = ModularArithmeticData(data_root=str(tmp_path), p=p, operation=op, nonzero_y=True)
    assert dm.root == tmp_path / f"modular_{op}_p11_f0.5_s0_y1"
    dm.prepare_data()
    dm.setup()
    inputs, targets = _all_rows(dm)
    assert {(int(x), int(y)) for x, _, y, _ in inputs.tolist()} == {(x, y) for x in range(p) for y in range(1, p)}
    assert all(z == _reference_answer(x, y, op, p) for (x, _, y, _), z in zip(inputs.tolist(), targets.tolist()))
    assert len(dm.train_dataset) == p * (p - 1) // 2
    # Without the option the table has y = 0 too, in a directory of its own.
    full = ModularArithmeticData(data_root=str(tmp_path), p=p, operation=op)
    assert full.root == tmp_path / f"modular_{op}_p11_f0.5_s0" and full.builder.params_hash() != dm.builder.params_hash()
    # A table with y = 0 rows is refused under nonzero_y (the loader checks the file against its options).
    full.prepare_data()
    with pytest.raises(MalformedDatasetError, match=r"has shape \[121, 4\], expected \[110, 4\]"):
        check_data(torch.load(full.data_path, weights_only=True), p, op, 0.5, full.data_path, nonzero_y=True)


def test_division_matches_modular_inverse() -> None:
    p = 97
    inputs, targets = make_equations(p, "div")
    for (x, _, y, _), z in zip(inputs.tolist()[::37], targets.tolist()[::37]):
        assert z == (x * pow(y, -1, p)) % p


def test_split_is_half_disjoint_and_complete(tmp_path: Path) -> None:
    dm = ModularArithmeticData(data_root=str(tmp_path))  # p=97, div, train_fraction=0.5
    dm.prepare_data()
    dm.setup()
    n = 97 * 96
    assert len(dm.train_dataset) == n // 2 and len(dm.val_dataset) == n - n // 2

    data = torch.load(dm.data_path, weights_only=True)
    train, val = set(data["train_idx"].tolist()), set(data["val_idx"].tolist())
    assert not train & val
    assert train | val == set(range(n))

    summary = dm.builder.read_summary()
    assert summary["num_equations"] == n and summary["num_train"] == n // 2 and summary["num_val"] == n - n // 2


def test_split_depends_on_seed_only(tmp_path: Path) -> None:
    def train_idx(root: Path, seed: int) -> list[int]:
        dm = ModularArithmeticData(data_root=str(root), p=7, operation="add", split_seed=seed)
        dm.prepare_data()
        return torch.load(dm.data_path, weights_only=True)["train_idx"].tolist()

    assert train_idx(tmp_path / "a", 0) == train_idx(tmp_path / "b", 0)
    assert train_idx(tmp_path / "a", 0) != train_idx(tmp_path / "a", 1)


def test_root_name_model_kwargs_and_batches(tmp_path: Path) -> None:
    dm = ModularArithmeticData(data_root=str(tmp_path), p=7, operation="mul", train_fraction=0.8, split_seed=3)
    assert dm.root == tmp_path / "modular_mul_p7_f0.8_s3"
    assert dm.model_kwargs() == {"vocab_size": 9, "seq_len": 4, "num_classes": 7}
    dm.prepare_data()
    dm.setup()

    loader = DataLoader(dm.train_dataset, batch_size=8, shuffle=True, collate_fn=dm.collate_fn)
    batch = next(iter(loader))
    assert set(batch) == {"inputs", "target"}
    assert batch["inputs"].shape == (8, 4) and batch["target"].shape == (8,)
    assert batch["inputs"].dtype == batch["target"].dtype == torch.long
    assert sum(len(b["target"]) for b in loader) == len(dm.train_dataset) == round(0.8 * 49)

    # The list-of-items path (e.g. a dataset without __getitems__) is stacked.
    items = [dm.val_dataset[i] for i in range(3)]
    stacked = collate_tensor_dicts(items)
    assert torch.equal(stacked["inputs"], dm.val_dataset.__getitems__([0, 1, 2])["inputs"])


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"operation": "pow"}, ["data.operation", "add", "div"]),
        ({"p": 91}, ["data.p must be a prime", "got 91"]),
        ({"p": 1}, ["data.p must be a prime"]),
        ({"train_fraction": 1.0}, ["data.train_fraction", "(0, 1)"]),
        ({"train_fraction": 0.0}, ["data.train_fraction", "(0, 1)"]),
        ({"split_seed": 0.5}, ["data.split_seed must be an integer"]),
    ],
)
def test_bad_config_raises_a_config_error_naming_the_key(tmp_path: Path, kwargs: dict, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        ModularArithmeticData(data_root=str(tmp_path), **kwargs)
    for word in words:
        assert word in str(info.value)


def test_setup_before_build_says_how_to_build(tmp_path: Path) -> None:
    dm = ModularArithmeticData(data_root=str(tmp_path), p=5)
    with pytest.raises(FileNotFoundError, match="--dataset-only"):
        dm.setup()


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda path: torch.save({"inputs": torch.zeros(3, 4, dtype=torch.long)}, path),  # wrong keys
        lambda path: torch.save(  # right keys, wrong shapes
            {k: torch.zeros(2, dtype=torch.long) for k in ("inputs", "targets", "train_idx", "val_idx")}, path
        ),
        lambda path: path.write_bytes(b"not a torch file"),
        lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
        lambda path: path.unlink(),
    ],
    ids=["wrong-keys", "wrong-shapes", "garbage", "cut-in-half", "missing"],
)
def test_malformed_data_file_gives_clear_error(tmp_path: Path, corrupt) -> None:
    dm = ModularArithmeticData(data_root=str(tmp_path), p=5, operation="add")
    dm.prepare_data()
    corrupt(dm.data_path)
    with pytest.raises(MalformedDatasetError) as info:
        dm.setup()
    assert isinstance(info.value, ConfigError)  # the entry points exit 2 with this message, no traceback
    assert str(dm.data_path) in str(info.value)
    assert "--rebuild-dataset" in str(info.value) and len(str(info.value).splitlines()) == 1

    dm.prepare_data(rebuild=True)  # and the suggested fix works
    dm.setup()
    assert len(dm.train_dataset) + len(dm.val_dataset) == 25


def test_wrong_answer_in_file_is_caught(tmp_path: Path) -> None:
    dm = ModularArithmeticData(data_root=str(tmp_path), p=5, operation="sub")
    dm.prepare_data()
    data = torch.load(dm.data_path, weights_only=True)
    data["targets"][7] = (data["targets"][7] + 1) % 5
    torch.save(data, dm.data_path)
    with pytest.raises(MalformedDatasetError, match="wrong answers"):
        dm.setup()


# ------------------------------------------------------------------------------------- builder
class CountingBuilder(DiskDatasetBuilder):
    """Writes one file; appends a line to ``counter`` per build so tests can count builds."""

    def __init__(self, root: Path | str, counter: Path | str, delay_s: float = 0.0, fail: bool = False) -> None:
        super().__init__(root)
        self.counter = Path(counter)
        self.delay_s = delay_s
        self.fail = fail
        self.observed_during_build: dict = {}

    def params(self) -> dict:
        return {"files": 1}

    def _build(self, tmp_dir: Path) -> dict:
        with open(self.counter, "a") as f:
            f.write(f"{os.getpid()}\n")
        self.observed_during_build = {
            "root_exists": self.root.exists(),
            "complete": self.is_complete(),
            "tmp_is_sibling": tmp_dir.parent == self.root.parent,
            "tmp_listing": sorted(p.name for p in tmp_dir.iterdir()),
        }
        time.sleep(self.delay_s)
        (tmp_dir / "payload.txt").write_text("hello")
        if self.fail:
            raise OSError("disk full (simulated)")
        return {"files": 1, "bytes": 5}


def _count(counter: Path) -> int:
    return len(counter.read_text().splitlines()) if counter.exists() else 0


def test_marker_is_written_last(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    builder = CountingBuilder(root, tmp_path / "count")
    summary = builder.build()

    assert summary == {"files": 1, "bytes": 5}
    assert builder.observed_during_build == {
        "root_exists": False,  # built elsewhere, so the root never exists half-written
        "complete": False,
        "tmp_is_sibling": True,  # same filesystem, so the final rename is atomic
        "tmp_listing": [],
    }
    assert builder.is_complete()
    assert json.loads(builder.marker_path.read_text()) == summary
    assert builder.marker_path.stat().st_mtime_ns >= (root / "payload.txt").stat().st_mtime_ns
    # No scratch directories are left next to the root.
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["ds"]


def test_second_build_is_noop_and_rebuild_rebuilds(tmp_path: Path) -> None:
    root, counter = tmp_path / "ds", tmp_path / "count"
    first = CountingBuilder(root, counter).build()
    second = CountingBuilder(root, counter).build()
    assert _count(counter) == 1 and second == first

    (root / "stale.txt").write_text("from the previous build")
    rebuilt = CountingBuilder(root, counter).build(rebuild=True)
    assert _count(counter) == 2 and rebuilt == first
    assert not (root / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["ds"]


def test_failed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    builder = CountingBuilder(tmp_path / "ds", tmp_path / "count", fail=True)
    with pytest.raises(OSError, match="simulated"):
        builder.build()
    assert not builder.is_complete() and not builder.root.exists()
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == []


def test_failed_rebuild_keeps_the_old_dataset(tmp_path: Path) -> None:
    root, counter = tmp_path / "ds", tmp_path / "count"
    CountingBuilder(root, counter).build()
    with pytest.raises(OSError):
        CountingBuilder(root, counter, fail=True).build(rebuild=True)
    assert CountingBuilder(root, counter).is_complete()
    assert (root / "payload.txt").read_text() == "hello"


def _concurrent_build(root: str, counter: str, barrier) -> None:
    barrier.wait()  # start both processes at the same moment
    CountingBuilder(root, counter, delay_s=0.5).build()


def test_concurrent_builders_build_once(tmp_path: Path) -> None:
    root, counter = tmp_path / "ds", tmp_path / "count"
    ctx = mp.get_context("spawn")  # like separate torchrun ranks: no shared interpreter state
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_concurrent_build, args=(str(root), str(counter), barrier)) for _ in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
    assert [proc.exitcode for proc in procs] == [0, 0]
    assert _count(counter) == 1
    assert CountingBuilder(root, counter).is_complete()


def test_real_builder_concurrent_threads(tmp_path: Path) -> None:
    # flock locks are per open file description, so threads in one process also serialise.
    builders = [ModularArithmeticBuilder(tmp_path / "m", p=5, operation="div") for _ in range(3)]
    results: list[dict] = []
    threads = [threading.Thread(target=lambda b=b: results.append(b.build())) for b in builders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and all(r == results[0] for r in results)
    assert results[0]["num_equations"] == 20


def test_wait_until_complete_times_out_with_clear_message(tmp_path: Path) -> None:
    builder = CountingBuilder(tmp_path / "ds", tmp_path / "count")
    start = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        builder.wait_until_complete(timeout_s=0.3, poll_s=0.05)
    assert 0.3 <= time.monotonic() - start < 5
    assert str(builder.root) in str(info.value)
    assert "python train.py --dataset-only" in str(info.value)


def test_wait_until_complete_reports_dead_builder(tmp_path: Path) -> None:
    builder = CountingBuilder(tmp_path / "ds", tmp_path / "count")
    with pytest.raises(RuntimeError, match="dataset builder died") as info:
        builder.wait_until_complete(timeout_s=30, poll_s=0.05, is_builder_alive=lambda: False)
    assert str(builder.root) in str(info.value)
    assert "--dataset-only" in str(info.value)


def test_wait_until_complete_returns_summary_once_built(tmp_path: Path) -> None:
    builder = CountingBuilder(tmp_path / "ds", tmp_path / "count", delay_s=0.2)
    thread = threading.Thread(target=builder.build)
    thread.start()
    try:
        summary = builder.wait_until_complete(timeout_s=30, poll_s=0.02, is_builder_alive=thread.is_alive)
    finally:
        thread.join()
    assert summary == {"files": 1, "bytes": 5}
