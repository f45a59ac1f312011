"""The Cogment data module: one module, one vocabulary, every stage's task mix.

A curriculum stage changes the data by overriding keys of this node (``tasks``, ``seq_len``,
``augmentation_rate``, ...): every stage then gets its own dataset directory, built once
(``dataset.base.DiskDatasetBuilder``), but all stages share the vocabulary (``hash_buckets``) and the
model's longest sequence (``max_seq_len``), so the model built from stage 0's facts serves every stage.

``tasks`` lists the task types of the mix (dataset/cogment/vocabulary.py), ``task_weights`` optionally weights
them (equal by default; a list, so a stage's ``tasks`` replaces the base node's instead of merging with
it); each split holds ``num_train`` / ``num_val`` examples, shared out by weight. A batch is ``inputs``, ``labels``, ``cue``,
``rotation`` ([B, seq_len]) and ``task_type`` ([B]), and in a split where some example has a study document
(passkey_memory's validation) ``study_inputs``, ``study_labels`` and ``study_cue``; see
dataset/cogment/examples.py for their meaning.

Real files replace a task's generated stand-in when their path is set: ``arc_dir`` (ARC Prize JSON),
``gsm8k_path``, ``hotpotqa_path`` (JSONL), ``listops_path`` (LRA TSV), ``longbench_path`` and
``scrolls_path`` (JSONL; these two tasks exist only as real files). Nothing is downloaded.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from dataset.base import BUILD_HINT, DiskDatasetBuilder, params_digest, require_int
from dataset.cogment.arc_tasks import ArcTasks
from dataset.cogment.examples import STUDY_KEYS, pad_rows, pad_study
from dataset.cogment.listops import ListOps
from dataset.cogment.long_context import AssociativeRecall, LongBench, Passkey, PasskeyMemory, Scrolls
from dataset.cogment.puzzles import LinearMap, Maze, Sudoku
from dataset.cogment.tasks import Augmentation, TaskSource
from dataset.cogment.text_tasks import MultiHop, WordProblems
from dataset.cogment.vocabulary import TASK_INDEX, TASK_NAMES, Vocabulary, task_families, task_index
from dataset.errors import load_tensor_file
from dataset.reasoning.arc import file_sha256
from dataset.tensors import TensorDictDataset, collate_tensor_dicts
from utils.config.errors import ConfigError

log = logging.getLogger(__name__)

SOURCES: dict[str, type[TaskSource]] = {cls.name: cls for cls in (
    LinearMap, Maze, ArcTasks, Sudoku, ListOps, WordProblems, MultiHop, Passkey, AssociativeRecall, PasskeyMemory,
    LongBench, Scrolls)}
assert set(SOURCES) == set(TASK_NAMES), "every task type needs a source"
# Top-level keys naming a real file, and the task option they set.
REAL_FILE_KEYS = {"arc_dir": ("arc", "arc_dir"), "gsm8k_path": ("gsm8k", "path"), "hotpotqa_path": ("hotpotqa", "path"),
                  "listops_path": ("listops", "path"), "longbench_path": ("longbench", "path"),
                  "scrolls_path": ("scrolls", "path")}
FORMAT_VERSION = 2  # 2: study documents (passkey_memory's held-out validation)
SPLIT_FILES = {"train": "train.pt", "val": "val.pt"}
# Stored compactly (token ids and positions fit int16: the vocabulary and max_seq_len are checked), handed
# out as the launcher's int64 / bool.
STORED_DTYPES = {"inputs": torch.int16, "labels": torch.int16, "rotation": torch.int16, "cue": torch.bool,
                 "task_type": torch.int16, "study_inputs": torch.int16, "study_labels": torch.int16,
                 "study_cue": torch.bool}


def split_counts(weights: Mapping[str, float], total: int) -> dict[str, int]:
    """``total`` examples shared out by weight (largest remainders), every task with weight > 0 at least one."""
    names = list(weights)
    raw = np.array([float(weights[n]) for n in names])
    exact = raw / raw.sum() * total
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts))[: total - counts.sum()]:
        counts[i] += 1
    counts = np.maximum(counts, 1)
    return {n: int(c) for n, c in zip(names, counts)}


class CogmentDataset(TensorDictDataset):
    """The stored (compact) tensors of one split; batches in the launcher's dtypes."""

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        batch = super().__getitems__(indices)
        return {k: v.bool() if v.dtype == torch.bool else v.long() for k, v in batch.items()}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v.bool() if v.dtype == torch.bool else v.long() for k, v in super().__getitem__(index).items()}


class CogmentBuilder(DiskDatasetBuilder):
    """Writes ``train.pt`` and ``val.pt`` of one task mix."""

    def __init__(self, root: Path | str, sources: dict[str, TaskSource], weights: dict[str, float], seq_len: int,
                 num_train: int, num_val: int, vocab: Vocabulary, augmentation: Augmentation, seed: int,
                 real_files: dict[str, str]) -> None:
        super().__init__(root)
        self.sources, self.weights, self.seq_len = sources, weights, seq_len
        self.num_train, self.num_val, self.vocab = num_train, num_val, vocab
        self.augmentation, self.seed, self.real_files = augmentation, seed, real_files

    def params(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION, "tasks": self.weights, "seq_len": self.seq_len, "num_train": self.num_train,
            "num_val": self.num_val, "vocab_size": self.vocab.size, "seed": self.seed,
            "augmentation": {"rate": self.augmentation.rate, "types": list(self.augmentation.types),
                             "per_task": self.augmentation.per_task},
            "options": {name: {k: v for k, v in src.options.items()} for name, src in self.sources.items()},
            # Content hashes, not paths: a copy of the same files elsewhere reuses the dataset, an edit never does.
            "files": {key: _content_hash(path) for key, path in self.real_files.items()},
        }

    def dir_name(self) -> str:
        names = "+".join(sorted(self.weights))
        return f"cogment_{names}_L{self.seq_len}_n{self.num_train}_s{self.seed}_{params_digest(self.params())[:10]}"

    def _build(self, tmp_dir: Path) -> dict:
        summary: dict[str, Any] = {"vocab_size": self.vocab.size, "seq_len": self.seq_len, "splits": {}}
        for split_id, (split, total) in enumerate((("train", self.num_train), ("val", self.num_val))):
            counts = split_counts(self.weights, total)
            rows: dict[str, list[np.ndarray]] = {k: [] for k in STORED_DTYPES}
            studies = False
            for name, count in counts.items():
                rng = np.random.default_rng([self.seed, split_id, TASK_INDEX[name]])  # one stream per (split, task)
                source = self.sources[name]
                for _ in range(count):
                    example = source.sample(split, rng)
                    studies = studies or example.study is not None
                    for key, value in {**pad_rows(example, self.seq_len), **pad_study(example, self.seq_len)}.items():
                        rows[key].append(value)
                    rows["task_type"].append(np.array(TASK_INDEX[name]))
            if not studies:  # no study documents in this split: no columns for them
                for key in STUDY_KEYS:
                    rows.pop(key)
            tensors = {k: torch.from_numpy(np.stack(v)).to(STORED_DTYPES[k]) for k, v in rows.items()}
            torch.save(tensors, tmp_dir / SPLIT_FILES[split])
            summary["splits"][split] = counts
        skipped = getattr(self.sources.get("arc"), "skipped", None)
        if skipped:
            summary["arc_tasks_left_out"] = skipped
        summary["bytes"] = sum(p.stat().st_size for p in tmp_dir.iterdir())
        return summary


def _plain(value: Any) -> Any:
    """OmegaConf containers (Hydra passes them) as plain dicts and lists: the options are hashed as JSON."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _content_hash(path: str) -> str:
    p = Path(path).expanduser()
    if p.is_dir():
        return params_digest({f.name: file_sha256(f) for f in sorted(p.glob("*.json"))})
    return file_sha256(p) if p.is_file() else "missing"


class CogmentData:
    """Data module of the Cogment curriculum (see the module docstring)."""

    def __init__(
        self,
        data_root: str = "datasets",
        tasks: Sequence[str] = ("linear_map",),
        task_weights: Mapping[str, float] | None = None,
        seq_len: int = 128,
        max_seq_len: int = 2048,
        num_train: int = 2000,
        num_val: int = 256,
        hash_buckets: int = 256,
        augmentation_rate: float = 0.0,
        augmentation_types: Sequence[str] = (),
        augmentations_per_task: int = 300,
        task_options: Mapping[str, Mapping[str, Any]] | None = None,
        arc_dir: str | None = None,
        gsm8k_path: str | None = None,
        hotpotqa_path: str | None = None,
        listops_path: str | None = None,
        longbench_path: str | None = None,
        scrolls_path: str | None = None,
        seed: int = 0,
    ) -> None:
        tasks, task_weights, task_options = _plain(tasks), _plain(task_weights), _plain(task_options)
        augmentation_types = _plain(augmentation_types)
        if isinstance(tasks, str) or not tasks:
            raise ConfigError(f"data.tasks must be a non-empty list of task names, got {tasks!r}; the tasks are "
                              f"{', '.join(TASK_NAMES)}")
        for name in list(tasks) + list(task_weights or {}):
            task_index(name, "data.tasks / data.task_weights")
        weights = {}
        for name in dict.fromkeys(tasks):
            weight = (task_weights or {}).get(name, 1.0)  # weights of tasks not in this mix are ignored
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
                raise ConfigError(f"data.task_weights.{name} must be a positive number, got {weight!r}")
            weights[name] = float(weight)
        self.max_seq_len = require_int("data.max_seq_len", max_seq_len, 8)
        self.seq_len = require_int("data.seq_len", seq_len, 8)
        if self.seq_len > self.max_seq_len:
            raise ConfigError(f"data.seq_len={seq_len} exceeds data.max_seq_len={max_seq_len}, the longest sequence the "
                              "model is built for; raise data.max_seq_len (for every stage: it is a model fact)")
        if self.max_seq_len > torch.iinfo(torch.int16).max:
            raise ConfigError(f"data.max_seq_len must be at most {torch.iinfo(torch.int16).max}, got {max_seq_len}")
        num_train = require_int("data.num_train", num_train, 1)
        num_val = require_int("data.num_val", num_val, 1)
        self.vocab = Vocabulary(hash_buckets)
        if self.vocab.size > torch.iinfo(torch.int16).max:
            raise ConfigError(f"data.hash_buckets={hash_buckets} makes a vocabulary of {self.vocab.size} ids; the most is "
                              f"{torch.iinfo(torch.int16).max}")
        augmentation = Augmentation(float(augmentation_rate), tuple(augmentation_types), int(augmentations_per_task))
        options = {k: dict(v) for k, v in (task_options or {}).items()}
        for name in options:
            task_index(name, "data.task_options")
        real_files = {}
        for key, path in (("arc_dir", arc_dir), ("gsm8k_path", gsm8k_path), ("hotpotqa_path", hotpotqa_path),
                          ("listops_path", listops_path), ("longbench_path", longbench_path),
                          ("scrolls_path", scrolls_path)):
            task, option = REAL_FILE_KEYS[key]
            if path is not None and task in weights:
                options.setdefault(task, {})[option] = str(path)
                real_files[key] = str(path)
        sources = {name: SOURCES[name](self.vocab, self.seq_len, options.get(name), augmentation, seed) for name in weights}
        self.builder = CogmentBuilder.for_data_root(
            data_root, sources=sources, weights=weights, seq_len=self.seq_len, num_train=num_train, num_val=num_val,
            vocab=self.vocab, augmentation=augmentation, seed=seed, real_files=real_files)
        self.train_dataset: CogmentDataset | None = None
        self.val_dataset: CogmentDataset | None = None
        self.collate_fn = collate_tensor_dicts

    @property
    def root(self) -> Path:
        return self.builder.root

    def prepare_data(self, rebuild: bool = False, incremental: bool = True) -> None:
        """Build the split files once (written in one go, so ``incremental`` does not apply)."""
        self.builder.build(rebuild=rebuild)

    def setup(self) -> None:
        if not self.builder.is_complete():
            raise FileNotFoundError(f"dataset at {self.root} is not built; {BUILD_HINT}")
        splits = {split: load_tensor_file(self.root / name) for split, name in SPLIT_FILES.items()}
        self.train_dataset = CogmentDataset(splits["train"])
        self.val_dataset = CogmentDataset(splits["val"])
        log.debug("Loaded %s: %d train / %d val rows", self.root, len(self.train_dataset), len(self.val_dataset))

    def model_kwargs(self) -> dict[str, Any]:
        """Facts for the model and the evaluator: the same for every stage's data (see the module docstring)."""
        return {"vocab_size": self.vocab.size, "max_seq_len": self.max_seq_len, "num_task_types": len(TASK_NAMES),
                "task_families": task_families(), "task_names": list(TASK_NAMES)}
