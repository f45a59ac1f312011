"""The streaming vision_unified dataset: renderer, builder (atomic shards, consolidation, resume after
SIGKILL / SIGTERM / SIGINT), the trainer-side data module (build-or-wait, dead-builder detection,
incremental refresh with exact resume, pre-encoding) and `train.py --dataset-only` / `--rebuild-dataset`.

Real processes, real signals, real files; tiny settings (4 examples per batch, 3 batches per consolidated
file) so the whole module runs in well under a minute on one core. The ARC test reads ../shared/data/arc
and skips, with the reason, where it is absent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from dataset.multimodal.data_module import VisionUnifiedData
from dataset.multimodal.tokens import EOS_TOKEN, IGNORE_INDEX, decode_target, serialize_grid, target_tokens
from dataset.multimodal.vision_unified import VisionUnifiedBuilder
from dataset.streaming.manifest import (
    LOCK_FILE,
    DatasetMismatchError,
    StreamingDatasetError,
    consolidated_name,
    read_manifest,
)
from dataset.streaming.shards import BuilderBusyError
from dataset.multimodal.text_renderer import (
    ARC_GRAY_LEVELS,
    render_grid,
    render_grid_panel,
    render_text,
    render_text_pil,
    wrap_text,
)
from tests.cli_helpers import ENV, REPO_ROOT
from utils.config.errors import ConfigError
from utils.storage.locks import FileLock, is_locked, lock_holder

ARC_DIR = REPO_ROOT.parent / "shared" / "data" / "arc"

# Snapshot of one rendering: a change here means another machine (or Pillow/FreeType version) would
# build different images. Update only together with a deliberate rendering change.
TEXT_SNAPSHOT = "fe9e1bb561e0b1d861ba9f23cf012a706b1a0f92bad57242169918c79f8dc9a1"
GRID_SNAPSHOT = "e1e0a7509ae9d01a214f5c8b3ad99a0ac446948660b194183948459ea7993456"
SNAPSHOT_TEXT = "Once upon a time, a fox named Ada found a red ball.\ndef f(x):\n    return x + 1  # ok"


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(a.tobytes()).hexdigest()


@pytest.fixture
def code_dir(tmp_path: Path) -> Path:
    """A small, fixed code source (the repository's own files change while people work on it)."""
    root = tmp_path / "code_src"
    (root / "pkg").mkdir(parents=True)
    for k in range(3):
        lines = [f"def function_{k}_{i}(x):\n    return x * {i} + {k}\n\n" for i in range(8)]
        (root / "pkg" / f"module_{k}.py").write_text(f'"""Module {k}."""\n\n' + "".join(lines), encoding="utf-8")
    (root / "notes.txt").write_text("not code\n", encoding="utf-8")  # not matched by *.py
    return root


def tiny(code_dir: Path, **overrides: Any) -> dict[str, Any]:
    """Builder / data-module keyword arguments of a tiny dataset: 50 examples -> 13 batches -> 5 files."""
    kwargs: dict[str, Any] = {
        "generate_stories": 6,
        "stories_per_file": 3,
        "code_dirs": [str(code_dir)],
        "context_chars": 48,
        "text_stride": 24,
        "context_lines": 4,
        "target_len": 24,
        "val_every": 3,
        "examples_per_batch": 4,
        "batches_per_consolidated": 3,
        "max_examples": 50,
        "seed": 0,
    }
    kwargs.update(overrides)
    return kwargs


def load_all(root: Path) -> dict[str, torch.Tensor]:
    manifest = read_manifest(root)
    assert manifest is not None
    parts = [torch.load(root / c["file"], weights_only=True) for c in manifest["consolidated"]]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def assert_same_dataset(a: Path, b: Path) -> None:
    ma, mb = read_manifest(a), read_manifest(b)
    assert ma is not None and mb is not None and ma["complete"] and mb["complete"]
    for key in ("params_hash", "batches_written", "examples_written", "consolidated", "stats", "row_spec"):
        assert ma[key] == mb[key], key
    ta, tb = load_all(a), load_all(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def start_builder(root: Path, kwargs: dict[str, Any], *extra: str) -> subprocess.Popen:
    config = json.dumps({"root": str(root), **kwargs})
    log = open(root.parent / f"{root.name}.out", "ab")  # noqa: SIM115 - closed with the process
    builder = "dataset.multimodal.vision_unified.VisionUnifiedBuilder"
    return subprocess.Popen(
        [sys.executable, "-m", "dataset.streaming", "build", "--builder", builder, "--config-json", config, *extra],
        cwd=REPO_ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT,
    )


def wait_for(predicate: Any, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def check_consistent(root: Path) -> dict[str, Any]:
    """Every visible .pt loads; the manifest lists only files that exist."""
    manifest = read_manifest(root)
    assert manifest is not None
    for path in root.glob("*.pt"):
        data = torch.load(path, weights_only=True)
        assert isinstance(data, dict) and set(data) == {"images", "target", "source", "is_val", "task_index", "test_index"}, path
    first = sum(c["num_batches"] for c in manifest["consolidated"])
    for c in manifest["consolidated"]:
        assert len(torch.load(root / c["file"], weights_only=True)["target"]) == c["rows"]
    for i in range(first, manifest["batches_written"]):
        assert (root / f"batch_{i:05d}.pt").is_file()
    return manifest


# ------------------------------------------------------------------------------------------ renderer
def test_render_text_is_deterministic_and_matches_snapshot() -> None:
    a = render_text(SNAPSHOT_TEXT, (64, 128), 8)
    b = render_text(SNAPSHOT_TEXT, (64, 128), 8)
    assert a.dtype == np.uint8 and a.shape == (64, 128)
    assert a.tobytes() == b.tobytes()
    assert set(np.unique(a).tolist()) <= {0, 255}  # no antialiasing
    assert _sha(a) == TEXT_SNAPSHOT, "rendering changed: another font file, Pillow or FreeType version?"
    assert _sha(render_text(SNAPSHOT_TEXT.replace("fox", "cat"), (64, 128), 8)) != TEXT_SNAPSHOT
    # wrap at the width (25 columns of 5 px), clip to 6 lines of 10 px; keep="end" keeps the last lines
    assert wrap_text("x" * 60, 25) == ["x" * 25, "x" * 25, "x" * 10]
    many = "\n".join(f"line {i}" for i in range(10))
    assert np.array_equal(render_text(many, (64, 128), keep="end"), render_text("\n".join(f"line {i}" for i in range(4, 10))))
    assert not np.array_equal(render_text(many, (64, 128), keep="start"), render_text(many, (64, 128), keep="end"))


def test_render_text_equals_pillow_drawing_each_line(code_dir: Path, tmp_path: Path) -> None:
    """The glyph-cache composition gives Pillow's pixels on the text the builder renders."""
    builder = VisionUnifiedBuilder(tmp_path / "ds", **tiny(code_dir))
    builder.prepare_sources(fresh=True)
    contexts = [ex.context for ex in builder.iter_examples() if isinstance(ex.context, str)]
    contexts += ["naïve café → 中文 ok", "tab\tand\rcontrol\x07chars", "", "   "]
    assert len(contexts) > 50
    for text in contexts:
        for size, font_size, margin in (((64, 128), 8, 0), ((32, 100), 10, 2)):
            for keep in ("start", "end"):
                fast = render_text(text, size, font_size, keep=keep, margin=margin)  # type: ignore[arg-type]
                slow = render_text_pil(text, size, font_size, keep=keep, margin=margin)  # type: ignore[arg-type]
                assert np.array_equal(fast, slow), (text, size, keep)


def test_render_grid_levels_scaling_and_snapshot() -> None:
    grid = np.arange(30).reshape(5, 6) % 10
    img = render_grid(grid, (32, 32))
    assert _sha(img) == GRID_SNAPSHOT
    assert img.tobytes() == render_grid(grid.tolist(), (32, 32)).tobytes()
    scale = 32 // 6  # 5 px cells, top-left aligned, 0 outside the grid
    assert img[0, 0] == ARC_GRAY_LEVELS[0] and img[0, scale] == ARC_GRAY_LEVELS[1]
    assert (img[5 * scale :, :] == 0).all() and (img[:, 6 * scale :] == 0).all()
    big = render_grid(np.ones((30, 30), dtype=np.uint8), (16, 16))  # downsampled, still deterministic
    assert (big == ARC_GRAY_LEVELS[1]).all()
    panel = render_grid_panel([(grid, grid), (grid, None)], (64, 128))
    assert panel.shape == (64, 128) and (panel[40:, 70:] == 0).all()  # the query's output half stays empty
    with pytest.raises(ValueError, match="0..9"):
        render_grid(np.array([[10]]), (8, 8))


def test_target_tokens() -> None:
    assert target_tokens(b"ab", True, 5) == (ord("a") + 2, ord("b") + 2, EOS_TOKEN)
    assert target_tokens(b"abcdef", True, 4) == tuple(b + 2 for b in b"abcd")  # cut: no EOS
    assert decode_target(torch.tensor([ord("h") + 2, EOS_TOKEN, IGNORE_INDEX])) == (b"h", True)
    assert serialize_grid(np.array([[0, 1], [2, 3]])) == "01\n23"


# ------------------------------------------------------------------------------------------ builder
def test_consolidation_counts_and_rows(code_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    builder = VisionUnifiedBuilder(root, **tiny(code_dir))
    manifest = builder.build()
    # 50 examples -> 13 batch files (12 x 4 + 2) -> groups of 3 batches: 3, 3, 3, 3, 1 (the last partial)
    assert manifest["complete"] and manifest["batches_written"] == 13 and manifest["examples_written"] == 50
    assert [c["file"] for c in manifest["consolidated"]] == [consolidated_name(i) for i in range(5)]
    assert [c["num_batches"] for c in manifest["consolidated"]] == [3, 3, 3, 3, 1]
    assert [c["rows"] for c in manifest["consolidated"]] == [12, 12, 12, 12, 2]
    assert not list(root.glob("batch_*.pt")) and not list(root.glob("*.tmp"))  # consolidated batches deleted
    assert read_manifest(root) == manifest
    data = load_all(root)
    assert data["images"].dtype == torch.uint8 and data["images"].shape == (50, 1, 64, 128)
    assert data["target"].dtype == torch.long and data["target"].shape == (50, 24)
    assert data["source"].dtype == torch.long and set(data["source"].tolist()) == {1, 2}  # text, code
    assert data["is_val"].dtype == torch.bool and 0 < int(data["is_val"].sum()) < 50
    for key in ("task_index", "test_index"):  # ARC-only columns: -1 on text / code rows
        assert data[key].dtype == torch.long and (data[key] == -1).all(), key
    assert manifest["params"]["format"] == 2 and not (root / "arc_tasks.json").exists()  # no ARC source
    assert [c["val_rows"] for c in manifest["consolidated"]] == [
        int(torch.load(root / c["file"], weights_only=True)["is_val"].sum()) for c in manifest["consolidated"]
    ]
    assert sum(manifest["stats"].get(f"{s}_{split}", 0) for s in ("text", "code") for split in ("train", "val")) == 50
    # rows in the iteration order, round-robin text / code, tokens: bytes + 2, EOS, then -100
    examples = list(builder.iter_examples())[:50]
    assert [e.source for e in examples[:4]] == ["text", "code", "text", "code"]
    expected = builder.encode(examples)
    for key in data:
        assert torch.equal(data[key], expected[key]), key
    for row in data["target"]:
        valid = row != IGNORE_INDEX
        n = int(valid.sum())
        assert valid[:n].all() and not valid[n:].any() and ((row[:n] >= 1) & (row[:n] < 258)).all()
    # a code target is the next line, exactly
    code_rows = (data["source"] == 2).nonzero().flatten().tolist()
    text, ended = decode_target(data["target"][code_rows[0]])
    assert ended and text.decode() in (code_dir / "pkg" / "module_0.py").read_text() + "".join(
        (code_dir / "pkg" / f"module_{k}.py").read_text() for k in (1, 2)
    )
    # a complete dataset is returned as is; other parameters are refused with the fix
    assert VisionUnifiedBuilder(root, **tiny(code_dir)).build() == manifest
    with pytest.raises(DatasetMismatchError, match="--rebuild-dataset"):
        VisionUnifiedBuilder(root, **tiny(code_dir, seed=1)).build()
    # the split is per document: no document has rows on both sides
    docs = {}
    for e in examples:
        docs.setdefault(e.doc_id, set()).add(e.is_val)
    assert all(len(v) == 1 for v in docs.values())


def test_builder_lock_and_resume_in_steps(code_dir: Path, tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    VisionUnifiedBuilder(ref, **tiny(code_dir)).build()
    root = tmp_path / "steps"
    lock = FileLock(root / LOCK_FILE)
    assert lock.acquire(blocking=False)
    assert is_locked(root / LOCK_FILE) and lock_holder(root / LOCK_FILE).pid == os.getpid()  # type: ignore[union-attr]
    with pytest.raises(BuilderBusyError, match=rf"another dataset builder \(pid {os.getpid()} on .*builder\.log"):
        VisionUnifiedBuilder(root, **tiny(code_dir)).build()
    lock.release()
    assert not VisionUnifiedBuilder(root, **tiny(code_dir)).is_building()
    for stop in (2, 4, 7, None):  # stop mid-group and at group boundaries, then finish
        manifest = VisionUnifiedBuilder(root, **tiny(code_dir)).build(stop_after_batches=stop)
        check_consistent(root)
        assert manifest["complete"] == (stop is None)
    assert_same_dataset(ref, root)
    # an edited source file cannot sneak into a resumed build: the code was snapshotted at the start
    VisionUnifiedBuilder(tmp_path / "edit", **tiny(code_dir)).build(stop_after_batches=2)
    (code_dir / "pkg" / "module_0.py").write_text("changed = True\n", encoding="utf-8")
    VisionUnifiedBuilder(tmp_path / "edit", **tiny(code_dir)).build()
    assert_same_dataset(ref, tmp_path / "edit")


def test_text_sources_stories_and_changed_sources(tmp_path: Path) -> None:
    from dataset.multimodal.story_generator import generate_story, write_stories

    assert generate_story(3, seed=1) == generate_story(3, seed=1) != generate_story(4, seed=1)
    files = write_stories(tmp_path / "gen", 5, seed=1, stories_per_file=2)
    assert [p.name for p in files] == ["stories_000.txt", "stories_001.txt", "stories_002.txt"]
    assert write_stories(tmp_path / "gen", 5, seed=1, stories_per_file=2) == files  # reused as is

    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("First document, long enough for windows.\n<|endoftext|>\nSecond one here.\n", encoding="utf-8")
    (texts / "b.jsonl").write_text(json.dumps({"text": "A jsonl document."}) + "\n\n" + json.dumps({"text": "Another."}) + "\n")
    kwargs = {"text_dirs": [str(texts)], "context_chars": 16, "text_stride": 8, "target_len": 8,
              "examples_per_batch": 2, "batches_per_consolidated": 2}
    builder = VisionUnifiedBuilder(tmp_path / "ds", **kwargs)
    examples = list(builder.iter_examples())
    assert {e.doc_id for e in examples} == {"text:texts/a.txt:0", "text:texts/a.txt:1", "text:texts/b.jsonl:0", "text:texts/b.jsonl:1"}
    first = next(e for e in examples if e.doc_id == "text:texts/a.txt:0")
    assert first.context == "First document, " and bytes(t - 2 for t in first.target) == b"long eno"
    last = [e for e in examples if e.doc_id == "text:texts/b.jsonl:1"][-1]
    assert last.target[-1] == EOS_TOKEN  # the document ends inside the target
    builder.build(stop_after_batches=1)
    (texts / "a.txt").write_text("Edited.\n", encoding="utf-8")
    with pytest.raises(DatasetMismatchError, match="source files changed"):
        VisionUnifiedBuilder(tmp_path / "ds", **kwargs).build()
    (texts / "b.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(StreamingDatasetError, match=r"b\.jsonl:2: expected an object with a string field 'text'"):
        list(VisionUnifiedBuilder(tmp_path / "other", **kwargs).iter_examples())
    (texts / "b.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')  # Latin-1, not UTF-8
    with pytest.raises(StreamingDatasetError, match=r"b\.jsonl:2: not UTF-8 text \(byte 0xe9\); save the file as UTF-8"):
        list(VisionUnifiedBuilder(tmp_path / "other", **kwargs).iter_examples())
    (texts / "b.jsonl").unlink()
    (texts / "a.txt").write_bytes(b"One.\n<|endoftext|>\nTwo \x80.\n")
    with pytest.raises(StreamingDatasetError, match=r"a\.txt:3: not UTF-8 text \(byte 0x80\)") as info:
        list(VisionUnifiedBuilder(tmp_path / "other", **kwargs).iter_examples())
    assert isinstance(info.value, ConfigError)  # the entry points exit 2 with this message, no traceback


@pytest.mark.parametrize("kind", ["batch", "consolidated"])
def test_sigkill_mid_write_leaves_no_partial_file_and_resume_is_identical(kind: str, code_dir: Path, tmp_path: Path) -> None:
    kwargs = tiny(code_dir)
    ref = tmp_path / "ref"
    VisionUnifiedBuilder(ref, **kwargs).build()
    root = tmp_path / "killed"
    root.mkdir()
    # fault_pause_s: the builder sleeps between a file's complete temporary copy and its rename
    proc = start_builder(root, {**kwargs, "fault_pause_s": 0.15})
    target = "consolidated_001.pt" if kind == "consolidated" else "batch_00004.pt"
    try:
        wait_for(lambda: any(p.name.startswith(target) and p.name.endswith(".tmp") for p in root.iterdir()),
                 what=f"a temporary {target}")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert list(root.glob("*.tmp")), "the kill should have landed mid-write"
    assert not (root / target).exists()
    manifest = check_consistent(root)
    assert not manifest["complete"]
    VisionUnifiedBuilder(root, **kwargs).build()  # resume
    assert not list(root.glob("*.tmp")) and not list(root.glob("batch_*.pt"))
    assert_same_dataset(ref, root)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_signal_stops_after_the_current_file(sig: int, code: int, code_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    root.mkdir()
    proc = start_builder(root, tiny(code_dir), "--throttle-s", "0.2")
    try:
        wait_for(lambda: (m := read_manifest(root)) is not None and m["batches_written"] >= 2, what="2 batch files")
        proc.send_signal(sig)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code
    manifest = check_consistent(root)
    assert not manifest["complete"] and not list(root.glob("*.tmp"))
    assert "stopped by" in (tmp_path / "ds.out").read_text()


# ------------------------------------------------------------------------------------- data module
def test_prepare_data_waits_for_the_first_consolidated_file_only(code_dir: Path, tmp_path: Path) -> None:
    kwargs = tiny(code_dir, max_examples=36, throttle_s=0.3)  # 9 batch files, 3 consolidated, >= 2.7 s
    data = VisionUnifiedData(str(tmp_path), name="vu", poll_s=0.1, log_every_s=0.5, **kwargs)
    assert not data.builder.is_building()
    start = time.monotonic()
    data.prepare_data()
    waited = time.monotonic() - start
    manifest = read_manifest(data.root)
    assert manifest is not None and len(manifest["consolidated"]) >= 1
    assert not manifest["complete"], "prepare_data should return before the build completes"
    assert data.builder.is_building()
    data.setup()
    first_rows = len(data.train_dataset)
    assert len(data.val_dataset) > 0 and set(data.train_dataset[0]) == {"images", "target", "source", "task_index", "test_index"}
    data.refresh(0)
    wait_for(lambda: not data.builder.is_building(), timeout=90, what="the background builder to finish")
    assert read_manifest(data.root)["complete"]  # type: ignore[index]
    assert data.refresh(1) and len(data.train_dataset) > first_rows
    assert data.state_dict()["num_consolidated"] == 3
    assert "builder started" in (data.root / "builder.log").read_text()
    print(f"prepare_data returned after {waited:.1f}s, build complete later")


def test_prepare_data_raises_when_the_builder_dies(code_dir: Path, tmp_path: Path) -> None:
    data = VisionUnifiedData(str(tmp_path), name="vu", poll_s=0.1, **tiny(code_dir, throttle_s=5.0))
    errors: list[BaseException] = []
    finished = threading.Event()

    def run() -> None:
        try:
            data.prepare_data()
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            errors.append(e)
        finished.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_for(lambda: data.builder.is_building(), what="the builder to take its lock")
    holder = data.builder.holder()
    assert holder is not None and holder.pid != os.getpid()
    pid = holder.pid
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    assert finished.wait(15), "prepare_data kept waiting for a dead builder"
    assert time.monotonic() - killed < 5
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
    message = str(errors[0])
    assert "died before" in message and str(data.root / "builder.log") in message and "rerun" in message
    assert not (data.root / consolidated_name(0)).exists()


def test_a_builder_that_fails_before_building_gives_the_same_message(code_dir: Path, tmp_path: Path) -> None:
    data = VisionUnifiedData(str(tmp_path), name="vu", poll_s=0.1, **tiny(code_dir))
    for path in sorted(code_dir.rglob("*"), reverse=True):  # the background builder will not find its source
        path.rmdir() if path.is_dir() else path.unlink()
    code_dir.rmdir()
    with pytest.raises(RuntimeError) as err:
        data.prepare_data()
    message = str(err.value)
    assert "died before it started building" in message and "(exit code 2)" in message  # a config error
    assert str(data.root / "builder.log") in message and "rerun" in message
    assert "data.code_dirs: " in message and "is not a directory" in message  # the end of builder.log says why
    assert "Traceback" not in message


def test_epoch_start_hook_reloads_the_loader_only_when_the_train_set_changes(code_dir: Path, tmp_path: Path) -> None:
    kwargs = tiny(code_dir)
    VisionUnifiedBuilder(tmp_path / "vu", **kwargs).build(stop_after_batches=3)  # consolidated_000 only
    data = VisionUnifiedData(str(tmp_path), name="vu", **kwargs)
    data.setup()
    first_rows = len(data.train_dataset)
    VisionUnifiedBuilder(tmp_path / "vu", **kwargs).build()  # five files now
    reloads: list[int] = []
    trainer = SimpleNamespace(state=SimpleNamespace(epoch=0, step=0))
    trainer.reload_train_data = lambda: reloads.append(trainer.state.epoch)
    data.on_train_epoch_start(trainer)
    assert reloads == [0] and len(data.train_dataset) > first_rows
    data.on_train_epoch_start(trainer)  # the same epoch again (a resume): the recorded count, no reload
    trainer.state.epoch = 1
    data.on_train_epoch_start(trainer)  # nothing new since
    assert reloads == [0] and data.state_dict()["epoch"] == 1 and data.state_dict()["num_consolidated"] == 5


def test_refresh_is_deterministic_and_resumes_the_recorded_count(code_dir: Path, tmp_path: Path) -> None:
    kwargs = tiny(code_dir)
    root = tmp_path / "vu"
    VisionUnifiedBuilder(root, **kwargs).build(stop_after_batches=3)  # consolidated_000 only
    data = VisionUnifiedData(str(tmp_path), name="vu", **kwargs)
    VisionUnifiedBuilder(root, **kwargs).build()  # the builder finished while epoch 0 was being planned
    data2 = VisionUnifiedData(str(tmp_path), name="vu", **kwargs)

    # epoch 0 fixed at one file (rank 0 said so through sync), although five exist now
    data.setup()
    assert data.refresh(0, sync=lambda n: 1)
    epoch0 = {k: v.clone() for k, v in data.train_dataset.tensors.items()}
    state = data.state_dict()
    assert state["epoch"] == 0 and state["num_consolidated"] == 1
    assert not data.refresh(0)  # same epoch again (resumed inside it): the recorded count, whatever exists
    assert data.refresh(1) and data.state_dict()["num_consolidated"] == 5
    assert len(data.train_dataset) > len(epoch0["target"])
    assert not data.refresh(2)  # nothing new

    # a new process resuming inside epoch 0: setup sees five files, the checkpoint says one
    data2.setup()
    data2.load_state_dict(json.loads(json.dumps(state)))  # survives a checkpoint round trip
    assert data2.refresh(0) and data2.state_dict() == state
    for k, v in epoch0.items():
        assert torch.equal(data2.train_dataset.tensors[k], v), k
    assert data2.refresh(1) and len(data2.train_dataset) == len(data.train_dataset)
    # the train rows are the non-held-out rows of the files, in order
    all_rows = load_all(root)
    keep = ~all_rows["is_val"]
    assert torch.equal(data2.train_dataset.tensors["target"], all_rows["target"][keep])

    # a checkpoint of another dataset, or more files than exist, is refused
    with pytest.raises(StreamingDatasetError, match="other parameters"):
        data2.load_state_dict({**state, "params_hash": "0" * 64})
    data2.load_state_dict({**state, "epoch": 3, "num_consolidated": 9})
    with pytest.raises(StreamingDatasetError, match="only 5 exist"):
        data2.refresh(3)
    facts = data.model_kwargs()
    assert facts == {
        "vocab_size": 258, "target_len": 24, "image_size": [64, 128], "in_channels": 1, "sources": ["text", "code"],
        "num_sources": 3, "pad_token_id": 0, "eos_token_id": 1, "byte_offset": 2,
    }


def test_setup_rejects_malformed_files_and_mismatched_config(
    code_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kwargs = tiny(code_dir)
    data = VisionUnifiedData(str(tmp_path), name="vu", **kwargs)
    data.prepare_data(incremental=False)  # foreground build
    assert read_manifest(data.root)["complete"]  # type: ignore[index]
    caplog.set_level(logging.INFO, logger="dataset")
    caplog.clear()
    data.prepare_data()  # the trainer's checks of a complete dataset say nothing
    data.prepare_data()
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("dataset")]
    with pytest.raises(DatasetMismatchError, match="--rebuild-dataset"):
        VisionUnifiedData(str(tmp_path), name="vu", **tiny(code_dir, target_len=32)).prepare_data()
    path = data.root / consolidated_name(1)
    good = torch.load(path, weights_only=True)
    torch.save({**good, "target": good["target"][:, :5]}, path)
    with pytest.raises(StreamingDatasetError, match=rf"{path.name}.*--rebuild-dataset"):
        data.setup()
    path.write_bytes(b"not a torch file")
    with pytest.raises(StreamingDatasetError, match=rf"{path.name} is truncated or damaged \(UnpicklingError.*--rebuild-dataset"):
        data.setup()
    manifest = data.root / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(StreamingDatasetError, match=rf"{manifest}:\d+: not valid JSON .*--rebuild-dataset") as info:
        data.setup()
    assert isinstance(info.value, ConfigError)
    data.prepare_data(rebuild=True, incremental=False)
    data.setup()
    assert len(data.train_dataset) + len(data.val_dataset) <= 50


class TinyEncoder(torch.nn.Module):
    """Stands in for models.multimodal.capsule_encoder.CapsuleEncoder: float images [B,1,H,W] -> [B, 3, 4]."""

    def __init__(self, num_capsules: int = 3, dim: int = 4) -> None:
        super().__init__()
        self.num_capsules, self.dim = num_capsules, dim
        self.proj = torch.nn.Linear(64, num_capsules * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, (8, 8)).flatten(1)
        return self.proj(pooled).view(len(x), self.num_capsules, self.dim)


def test_pre_encode_with_a_frozen_encoder(code_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    encoder = TinyEncoder()
    ckpt = tmp_path / "encoder.pt"
    torch.save({"model": {f"vision.{k}": v for k, v in encoder.state_dict().items()}}, ckpt)  # a trainer checkpoint
    pre = {
        "encoder_factory": "tests.test_streaming.TinyEncoder",
        "encoder_kwargs": {"num_capsules": 3, "dim": 4},
        "encoder_checkpoint": str(ckpt),
        "encoder_state_prefix": "vision.",
    }
    data = VisionUnifiedData(str(tmp_path), name="pre", pre_encode=pre, **tiny(code_dir, max_examples=12))
    data.prepare_data(incremental=False)
    data.setup()
    batch = data.collate_fn(data.train_dataset.__getitems__([0, 1]))
    assert set(batch) == {"capsules", "target", "source", "task_index", "test_index"}
    assert batch["capsules"].dtype == torch.float16 and batch["capsules"].shape == (2, 3, 4)
    facts = data.model_kwargs()
    assert facts["num_capsules"] == 3 and facts["capsule_dim"] == 4
    # the stored capsules are the encoder's output on the rendered images
    builder = VisionUnifiedBuilder(tmp_path / "img", **tiny(code_dir, max_examples=12))
    builder.build()
    images = load_all(tmp_path / "img")["images"]
    with torch.no_grad():  # in the builder's batches (4 rows), so the float arithmetic is the same
        expected = torch.cat([encoder(chunk.float() / 255.0).half() for chunk in images.split(4)])
    assert torch.equal(load_all(data.root)["capsules"], expected)
    # a checkpoint that does not fit is an error naming the file
    bad = VisionUnifiedBuilder(
        tmp_path / "bad", encoder_factory=TinyEncoder, encoder_kwargs={"num_capsules": 5}, encoder_checkpoint=ckpt,
        encoder_state_prefix="vision.", **tiny(code_dir, max_examples=12),
    )
    with pytest.raises(StreamingDatasetError, match="encoder.pt does not fit"):
        bad.build()
    with pytest.raises(ConfigError, match="data.pre_encode.encoder_checkpoint=None is not a file"):
        VisionUnifiedBuilder(tmp_path / "none", encoder_factory=TinyEncoder, **tiny(code_dir))


@pytest.mark.skipif(not (ARC_DIR / "arc-agi_training_challenges.json").is_file(), reason=f"no ARC files in {ARC_DIR}")
def test_arc_source(tmp_path: Path) -> None:
    from dataset.reasoning.arc import load_subset

    builder = VisionUnifiedBuilder(
        tmp_path / "arc", arc_dir=str(ARC_DIR), arc_max_tasks=3, target_len=1000, examples_per_batch=4,
        batches_per_consolidated=3, max_examples=10, val_every=2,
    )
    manifest = builder.build()
    data = load_all(tmp_path / "arc")
    assert manifest["complete"] and len(data["target"]) == 10 and (data["source"] == 0).all()
    outputs = {serialize_grid(y) for t in load_subset(ARC_DIR, "training", 3) for y in [p[1] for p in t.train] + t.test_outputs}
    for row, image in zip(data["target"], data["images"]):
        text, ended = decode_target(row)
        assert ended and text.decode() in outputs  # the whole output grid, then EOS
        assert (image > 0).any()
    # task_index points into arc_tasks.json (sorted ids); test_index >= 0 exactly on test inputs
    tasks = json.loads((tmp_path / "arc" / "arc_tasks.json").read_text())["tasks"]
    by_id = {t.task_id: t for t in load_subset(ARC_DIR, "training", 3)}
    assert [t["id"] for t in tasks] == sorted(by_id) and all(t["subset"] == "training" for t in tasks)
    for row, task, test in zip(data["target"], data["task_index"].tolist(), data["test_index"].tolist()):
        arc_task = by_id[tasks[task]["id"]]
        grids = [p[1] for p in arc_task.train] if test < 0 else [arc_task.test_outputs[test]]
        assert decode_target(row)[0].decode() in {serialize_grid(g) for g in grids}
    # num_test: the test inputs among the 10 rows written (max_examples cut one task short: 0)
    seen = {(a, b) for a, b in zip(data["task_index"].tolist(), data["test_index"].tolist()) if b >= 0}
    assert [t["num_test"] for t in tasks] == [sum(1 for a, _ in seen if a == i) for i in range(3)]
    panel = VisionUnifiedBuilder(tmp_path / "panel", arc_dir=str(ARC_DIR), arc_max_tasks=1, arc_demos=2, max_examples=4)
    example = next(panel.iter_examples())
    assert len(example.context) == 3 and example.context[-1][1] is None  # two demonstrations + the query
    assert panel.render(example).shape == (64, 128)


# --------------------------------------------------------------------------------------------- CLI
def test_train_py_dataset_only_and_rebuild(code_dir: Path, tmp_path: Path) -> None:
    overrides = [
        "data=multimodal/vision_unified", f"paths.data_root={tmp_path / 'data'}", f"paths.root={tmp_path / 'ck'}",
        "data.examples_per_batch=4", "data.batches_per_consolidated=3", "data.max_examples=30",
        "data.generate_stories=4", f"data.code_dirs=['{code_dir}']", "data.val_every=3", "data.target_len=24",
    ]
    root = tmp_path / "data" / "vision_unified"

    def train_py(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "train.py", *args, *overrides], check=False, cwd=REPO_ROOT, env=ENV,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120,
        )

    first = train_py("--dataset-only")
    assert first.returncode == 0, first.stdout
    manifest = read_manifest(root)
    assert manifest is not None and manifest["complete"] and len(manifest["consolidated"]) == 3  # 8 batches: 3+3+2
    assert not is_locked(root / LOCK_FILE) and "--dataset-only: dataset ready" in first.stdout
    before = load_all(root)
    (root / "marker").write_text("from the first build")
    again = train_py("--dataset-only", "--rebuild-dataset")
    assert again.returncode == 0, again.stdout
    assert "deleting the contents" in again.stdout and not (root / "marker").exists()
    after = load_all(root)
    assert all(torch.equal(before[k], after[k]) for k in before)  # deterministic: the same dataset again
