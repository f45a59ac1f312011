"""The vision-unified dataset builder: a rendered context (an image) and the bytes that follow it.

The seed's "vision_unified" pipeline: ARC grids, text/stories and source code, each rendered to a
small grayscale image, with byte-token targets (``dataset.multimodal.tokens``). It is a streaming
builder (``dataset.streaming.shards``): training starts on the first consolidated file while the
rest is being written. ``dataset.multimodal.data_module.VisionUnifiedData`` starts it and reads it.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dataset.base import require_int
from dataset.errors import REBUILD_HINT
from dataset.multimodal.pre_encoder import FrozenEncoder
from dataset.multimodal.sources import (
    REPO_ROOT,
    ArcSource,
    CodeSource,
    Example,
    HeldOutSplit,
    TextSource,
    as_list,
    dir_files,
    dir_fingerprint,
    resolve_source_path,
)
from dataset.multimodal.story_generator import write_stories
from dataset.multimodal.text_renderer import render_grid, render_grid_panel, render_text, text_capacity
from dataset.multimodal.tokens import EOS_TOKEN, IGNORE_INDEX, SOURCE_IDS
from dataset.reasoning.arc import subset_files
from dataset.streaming.manifest import StreamingDatasetError, write_json
from dataset.streaming.shards import StreamingDatasetBuilder
from utils.config.errors import ConfigError
from utils.storage.atomic import fsync_dir

log = logging.getLogger(__name__)

ARC_TASKS_FILE = "arc_tasks.json"
STORIES_DIR = "stories"
CODE_SNAPSHOT_DIR = "code_snapshot"


class VisionUnifiedBuilder(StreamingDatasetBuilder):
    """Images of a context + byte-token targets from ARC grids, text/stories and source code.

    Sources (each optional, at least one needed; ``dataset.multimodal.sources``), interleaved
    round-robin (one example from each source in turn, exhausted sources drop out) so every shard
    mixes all of them:

    * ``arc`` (``arc_dir``): every pair (demonstration and test) of every task of ``arc_subsets``.
      Context: the pair's input grid rendered over the whole image (``render_grid``); with
      ``arc_demos=k > 0`` a panel instead: up to k other demonstration pairs of the task as rows of
      (input | output), then the pair's input with an empty output half (``render_grid_panel``).
      Target: the output grid as digit rows separated by newlines, then EOS (truncated, without EOS,
      when longer than ``target_len``: a 30x30 grid needs ``target_len >= 930``). A task's examples
      come in a seeded shuffle of the tasks.
    * ``text`` (``text_dirs`` + ``generate_stories`` generated stories): ``.txt`` files (documents
      separated by lines ``<|endoftext|>``; a file without one is one document) and ``.jsonl`` files
      (one document per line, its ``"text"`` field). A document yields windows every ``text_stride``
      characters: context = the ``context_chars`` characters before the position, target = the bytes
      from there (EOS if the document ends within ``target_len`` tokens).
    * ``code`` (``code_dirs``, files matching ``code_globs``): for each non-blank line after the first,
      context = up to ``context_lines`` preceding lines, target = that line's bytes then EOS (exact line
      completion; a line longer than ``target_len`` bytes is truncated and gets no EOS). With
      ``snapshot_code`` (default) the files are copied into ``<dir>/code_snapshot/`` when a build
      starts and read from there, so editing the repository cannot break the resume of a build.

    Targets are ``target_len`` tokens: byte b -> b + 2 (PAD 0, EOS 1, vocab 258), -100 after the end.
    Text is rendered with ``render_text(keep="end")`` (the end of the context, next to the target,
    always visible). File order within a source is a seeded shuffle of the sorted paths. Validation
    split: per document (``dataset.multimodal.sources.HeldOutSplit``).

    Rows: ``images`` uint8 [N, 1, H, W] (0..255; or ``capsules`` float16 [N, K, D] when pre-encoding),
    ``target`` int64 [N, target_len], ``source`` int64 [N] (0 arc, 1 text, 2 code), ``is_val`` bool [N],
    ``task_index`` int64 [N] (ARC: index of the task in ``arc_tasks.json``; -1 for other sources) and
    ``test_index`` int64 [N] (ARC: which test input of the task; -1 for demonstration pairs and other
    sources). For the ARC scorer (``dataset.multimodal.arc_evaluator.MultimodalArcEvaluator``).

    ``arc_tasks.json`` (written when ARC is a source): ``{"format": 2, "tasks": [{"id", "subset",
    "num_test", "eval"}, ...]}``, the tasks of every subset sorted by (id, subset), in ``task_index``
    order; ``num_test`` counts the task's test inputs that appear as rows (fewer than the task has
    when ``max_examples`` cuts the build short), ``eval`` is True for a held-out task (its rows are
    ``is_val``). A task id must be unique across ``arc_subsets``.

    Pre-encoding (``encoder_factory`` set): images go through a frozen encoder
    (``dataset.multimodal.pre_encoder.FrozenEncoder``) built by ``encoder_factory(**encoder_kwargs)``
    and loaded from ``encoder_checkpoint`` (``encoder_state_prefix`` selects a submodule's keys).
    """

    # 2: rows gained ``task_index`` / ``test_index`` and ARC builds write arc_tasks.json.
    FORMAT_VERSION = 2
    # The module this builder was first written in: part of the params hash of every dataset it built.
    BUILDER_ID = "dataset.streaming.VisionUnifiedBuilder"

    def __init__(
        self,
        root: Path | str,
        *,
        arc_dir: str | Path | None = None,
        arc_subsets: Sequence[str] = ("training",),
        arc_max_tasks: int | None = None,
        arc_demos: int = 0,
        text_dirs: Sequence[str | Path] = (),
        text_globs: Sequence[str] = ("*.txt", "*.jsonl"),
        generate_stories: int = 0,
        stories_per_file: int = 100,
        code_dirs: Sequence[str | Path] = (),
        code_globs: Sequence[str] = ("*.py",),
        snapshot_code: bool = True,
        image_size: Sequence[int] = (64, 128),
        font_size: int = 8,
        context_chars: int = 128,
        text_stride: int = 64,
        context_lines: int = 8,
        target_len: int = 64,
        val_every: int = 10,
        seed: int = 0,
        encoder_factory: str | Callable[..., torch.nn.Module] | None = None,
        encoder_kwargs: Mapping[str, Any] | None = None,
        encoder_checkpoint: str | Path | None = None,
        encoder_state_prefix: str = "",
        encoder_batch_size: int = 256,
        encoder_device: str = "cpu",
        examples_per_batch: int = 32,
        batches_per_consolidated: int = 100,
        max_examples: int | None = None,
        throttle_s: float = 0.0,
        fault_pause_s: float = 0.0,
    ) -> None:
        super().__init__(root, examples_per_batch, batches_per_consolidated, max_examples, throttle_s, fault_pause_s)
        size = [int(s) for s in as_list(image_size, "data.image_size")]
        if len(size) != 2 or min(size) < 8:
            raise ConfigError(f"data.image_size must be [H, W] with sides >= 8, got {image_size!r}")
        self.image_size = (size[0], size[1])
        self.font_size = require_int("data.font_size", font_size, 4)
        try:  # checked here, not at the first rendered example in the background builder
            lines, columns = text_capacity(self.image_size, self.font_size)
        except ValueError as e:
            raise ConfigError(f"data.font_size: {e}") from None
        if lines < 1 or columns < 1:
            raise ConfigError(f"data.font_size {font_size} does not fit a data.image_size={list(self.image_size)} image")
        self.context_chars = require_int("data.context_chars", context_chars, 1)
        self.text_stride = require_int("data.text_stride", text_stride, 1)
        self.context_lines = require_int("data.context_lines", context_lines, 1)
        self.target_len = require_int("data.target_len", target_len, 1)
        self.val_every = require_int("data.val_every", val_every, 2)
        self.arc_demos = require_int("data.arc_demos", arc_demos, 0)
        self.generate_stories = require_int("data.generate_stories", generate_stories, 0)
        self.stories_per_file = require_int("data.stories_per_file", stories_per_file, 1)
        encoder_batch_size = require_int("data.pre_encode.encoder_batch_size", encoder_batch_size, 1)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"data.seed must be an integer, got {seed!r}")
        self.seed = seed
        if arc_max_tasks is not None:
            require_int("data.arc_max_tasks", arc_max_tasks, 1)
        self.arc_max_tasks = arc_max_tasks
        self.arc_dir = resolve_source_path(arc_dir) if arc_dir not in (None, "") else None
        self.arc_subsets = [str(s) for s in as_list(arc_subsets, "data.arc_subsets")]
        if self.arc_dir is not None:
            missing = [str(p) for s in self.arc_subsets for p in subset_files(self.arc_dir, s) if not p.is_file()]
            if missing or not self.arc_subsets:
                raise ConfigError(
                    f"data.arc_dir={self.arc_dir}: ARC files missing: {', '.join(missing) or 'no data.arc_subsets given'} "
                    "(expected arc-agi_<subset>_challenges.json and arc-agi_<subset>_solutions.json)"
                )
        self.text_dirs = [resolve_source_path(p) for p in as_list(text_dirs, "data.text_dirs")]
        self.text_globs = [str(g) for g in as_list(text_globs, "data.text_globs")]
        self.code_dirs = [resolve_source_path(p) for p in as_list(code_dirs, "data.code_dirs")]
        self.code_globs = [str(g) for g in as_list(code_globs, "data.code_globs")]
        self.snapshot_code = bool(snapshot_code)
        for key, dirs in (("text_dirs", self.text_dirs), ("code_dirs", self.code_dirs)):
            for d in dirs:
                if not d.is_dir():
                    raise ConfigError(f"data.{key}: {d} is not a directory (relative paths are relative to {REPO_ROOT})")
        if not (self.arc_dir or self.text_dirs or self.generate_stories or self.code_dirs):
            raise ConfigError(
                "vision_unified needs at least one source: set data.arc_dir, data.text_dirs, data.generate_stories or data.code_dirs"
            )

        self.encoder: FrozenEncoder | None = None
        if encoder_factory is not None:
            checkpoint = resolve_source_path(encoder_checkpoint) if encoder_checkpoint else None
            if checkpoint is None or not checkpoint.is_file():
                raise ConfigError(
                    f"pre-encoding needs the frozen encoder's weights: data.pre_encode.encoder_checkpoint={encoder_checkpoint!r} "
                    "is not a file (a randomly initialised frozen encoder would store random features)"
                )
            self.encoder = FrozenEncoder(encoder_factory, checkpoint, encoder_kwargs, encoder_state_prefix,
                                         encoder_batch_size, encoder_device)
        self.split = HeldOutSplit(seed, self.val_every)

    # ----------------------------------------------------------------------------- identity
    @property
    def pre_encoded(self) -> bool:
        return self.encoder is not None

    @property
    def stories_dir(self) -> Path:
        return self.root / STORIES_DIR

    @property
    def source_names(self) -> list[str]:
        names = []
        if self.arc_dir is not None:
            names.append("arc")
        if self.text_dirs or self.generate_stories:
            names.append("text")
        if self.code_dirs:
            names.append("code")
        return names

    def _rel(self, path: Path) -> str:
        """Paths in params as written relative to the repository when inside it (machine independent)."""
        try:
            return path.relative_to(REPO_ROOT).as_posix()
        except ValueError:
            return str(path)

    def params(self) -> dict[str, Any]:
        encoder = self.encoder
        return {
            **super().params(),
            "arc_dir": self._rel(self.arc_dir) if self.arc_dir else None,
            "arc_subsets": self.arc_subsets if self.arc_dir else None,
            "arc_max_tasks": self.arc_max_tasks,
            "arc_demos": self.arc_demos,
            "text_dirs": [self._rel(p) for p in self.text_dirs],
            "text_globs": self.text_globs,
            "generate_stories": self.generate_stories,
            "stories_per_file": self.stories_per_file,
            "code_dirs": [self._rel(p) for p in self.code_dirs],
            "code_globs": self.code_globs,
            "snapshot_code": self.snapshot_code,
            "image_size": list(self.image_size),
            "font_size": self.font_size,
            "context_chars": self.context_chars,
            "text_stride": self.text_stride,
            "context_lines": self.context_lines,
            "target_len": self.target_len,
            "val_every": self.val_every,
            "seed": self.seed,
            "pre_encode": None
            if encoder is None
            else {
                "encoder_factory": encoder.factory_name(),
                "encoder_kwargs": encoder.kwargs,
                "encoder_checkpoint_sha256": encoder.checkpoint_sha256(),
                "encoder_state_prefix": encoder.state_prefix,
            },
        }

    # ------------------------------------------------------------------------------ sources
    def prepare_sources(self, fresh: bool) -> None:
        if self.generate_stories:
            write_stories(self.stories_dir, self.generate_stories, self.seed, self.stories_per_file)
        if self.code_dirs and self.snapshot_code:
            self._snapshot_code(fresh)

    def _snapshot_code(self, fresh: bool) -> None:
        """Copy the code sources into the dataset directory when a build starts; a resumed build reads the copy.

        The default code source is this repository, which changes while people work on it: reading a
        frozen copy keeps a resumed build identical to an uninterrupted one.
        """
        snapshot = self.root / CODE_SNAPSHOT_DIR
        for stale in self.root.glob(f"{CODE_SNAPSHOT_DIR}.tmp-*"):
            shutil.rmtree(stale)
        if not fresh:
            if not snapshot.is_dir():
                raise StreamingDatasetError(f"{snapshot} (the code sources of this build) is missing; {REBUILD_HINT}")
            return
        tmp = self.root / f"{CODE_SNAPSHOT_DIR}.tmp-{os.getpid()}"
        for k, root in enumerate(self.code_dirs):
            for path in dir_files(root, self.code_globs, "code_dirs"):
                dest = tmp / str(k) / path.relative_to(root)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, dest)
            (tmp / str(k)).mkdir(parents=True, exist_ok=True)
        if snapshot.exists():
            shutil.rmtree(snapshot)
        os.replace(tmp, snapshot)
        fsync_dir(self.root)

    # Document ids start with the source directory's *name*, not its path, so the validation split
    # does not depend on where the sources live on a machine.
    def _code_roots(self) -> list[tuple[str, Path, Path]]:
        """(key used in document ids, configured directory, directory read) per code dir."""
        if self.snapshot_code:
            return [(d.name, d, self.root / CODE_SNAPSHOT_DIR / str(k)) for k, d in enumerate(self.code_dirs)]
        return [(d.name, d, d) for d in self.code_dirs]

    def _text_roots(self) -> list[tuple[str, Path, Path]]:
        """(key used in document ids, configured directory, directory read) per text dir."""
        roots = [(d.name, d, d) for d in self.text_dirs]
        return roots + ([(STORIES_DIR, self.stories_dir, self.stories_dir)] if self.generate_stories else [])

    def arc_source(self) -> ArcSource:
        assert self.arc_dir is not None
        return ArcSource(self.arc_dir, self.arc_subsets, self.arc_max_tasks, self.arc_demos, self.target_len, self.split)

    def text_source(self) -> TextSource:
        roots = [(key, read) for key, _, read in self._text_roots()]
        return TextSource(roots, self.text_globs, self.context_chars, self.text_stride, self.target_len, self.split)

    def code_source(self) -> CodeSource:
        roots = [(key, read) for key, _, read in self._code_roots()]
        return CodeSource(roots, self.code_globs, self.context_lines, self.target_len, self.split)

    def source_fingerprint(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.arc_dir is not None:
            out["arc"] = self.arc_source().fingerprint()
        for kind, roots, globs in (("text", self._text_roots(), self.text_globs), ("code", self._code_roots(), self.code_globs)):
            for _, configured, root in roots:
                files, digest = dir_fingerprint(root, globs, f"{kind}_dirs")
                name = STORIES_DIR if root == self.stories_dir else self._rel(configured)
                out.setdefault(kind, []).append({"dir": name, "files": files, "sha256": digest})
        return out

    def iter_examples(self) -> Iterator[Example]:
        streams: list[Iterator[Example]] = []
        if self.arc_dir is not None:
            streams.append(self.arc_source().examples())
        if self.text_dirs or self.generate_stories:
            streams.append(self.text_source().examples())
        if self.code_dirs:
            streams.append(self.code_source().examples())
        while streams:  # round-robin; an exhausted stream drops out, the others go on in the same order
            alive = []
            for stream in streams:
                example = next(stream, None)
                if example is not None:
                    alive.append(stream)
                    yield example
            streams = alive

    def write_metadata(self) -> None:
        """``arc_tasks.json`` (class docstring) when ARC is a source."""
        if self.arc_dir is None:
            return
        tasks, index = self.arc_source().tasks()
        ordered = sorted(tasks, key=lambda t: index[(t.subset, t.task_id)])
        if self.max_examples is None:
            num_test = [len(t.test_inputs) for t in ordered]
        else:  # the test inputs among the first max_examples examples (iterating does not render)
            num_test = [0] * len(ordered)
            for ex in itertools.islice(self.iter_examples(), self.max_examples):
                if ex.test_index >= 0:
                    num_test[ex.task_index] = max(num_test[ex.task_index], ex.test_index + 1)
        write_json(self.root / ARC_TASKS_FILE, {
            "format": self.FORMAT_VERSION,
            "tasks": [
                {"id": t.task_id, "subset": t.subset, "num_test": n, "eval": self.split.is_val(f"arc:{t.subset}:{t.task_id}")}
                for t, n in zip(ordered, num_test)
            ],
        })

    # ------------------------------------------------------------------------------- encoding
    def render(self, example: Example) -> np.ndarray:
        """The context image, uint8 [H, W]."""
        if isinstance(example.context, str):
            return render_text(example.context, self.image_size, self.font_size, keep="end")
        if len(example.context) == 1 and not self.arc_demos:
            return render_grid(example.context[0][0], self.image_size)
        return render_grid_panel(example.context, self.image_size)

    def encode(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        n, (h, w) = len(examples), self.image_size
        images = np.zeros((n, 1, h, w), dtype=np.uint8)
        target = torch.full((n, self.target_len), IGNORE_INDEX, dtype=torch.long)
        for i, ex in enumerate(examples):
            images[i, 0] = self.render(ex)
            target[i, : len(ex.target)] = torch.tensor(ex.target, dtype=torch.long)
        out: dict[str, torch.Tensor] = {}
        if self.encoder is not None:
            out["capsules"] = self.encoder(torch.from_numpy(images))
        else:
            out["images"] = torch.from_numpy(images)
        out["target"] = target
        out["source"] = torch.tensor([SOURCE_IDS[ex.source] for ex in examples], dtype=torch.long)
        out["is_val"] = torch.tensor([ex.is_val for ex in examples], dtype=torch.bool)
        out["task_index"] = torch.tensor([ex.task_index for ex in examples], dtype=torch.long)
        out["test_index"] = torch.tensor([ex.test_index for ex in examples], dtype=torch.long)
        return out

    # --------------------------------------------------------------------------------- stats
    def example_stats(self, examples: list[Example]) -> dict[str, int]:
        stats: dict[str, int] = {}
        for ex in examples:
            key = f"{ex.source}_{'val' if ex.is_val else 'train'}"
            stats[key] = stats.get(key, 0) + 1
            if EOS_TOKEN not in ex.target:
                stats[f"{ex.source}_truncated"] = stats.get(f"{ex.source}_truncated", 0) + 1
        return stats

    def consolidated_info(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        return {"val_rows": int(tensors["is_val"].sum())}
