"""The data module of the vision-unified data (``data=multimodal/vision_unified``).

A ``StreamingDataModule`` (build or wait, incremental pickup of consolidated files at epoch starts,
exact resume: ``dataset.streaming.data_module``) over a ``VisionUnifiedBuilder`` directory
``<data_root>/<name>``.

Batches (``collate_fn = collate_tensor_dicts``): ``images`` uint8 [B, 1, H, W] (0..255; the model
scales them) or ``capsules`` float16 [B, num_capsules, D] when pre-encoded, ``target`` int64
[B, target_len] (byte b -> b + 2, EOS 1, -100 after it), ``source`` int64 [B] (0 arc, 1 text, 2 code),
``task_index`` / ``test_index`` int64 [B] (ARC rows: the task in ``arc_tasks.json`` and its test input,
-1 for demonstration pairs and other sources; read by ``dataset.multimodal.arc_evaluator.MultimodalArcEvaluator``,
ignored by the model). ``model_kwargs()`` adds ``arc_tasks_path`` when the dataset has that file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from dataset.multimodal.tokens import BYTE_OFFSET, EOS_TOKEN, PAD_TOKEN, SOURCE_IDS, VOCAB_SIZE
from dataset.multimodal.vision_unified import ARC_TASKS_FILE, VisionUnifiedBuilder
from dataset.streaming.data_module import StreamingDataModule
from dataset.streaming.manifest import StreamingDatasetError, read_manifest
from utils.config.errors import ConfigError

DATA_CONFIG = "multimodal/vision_unified"
PRE_ENCODE_KEYS = (
    "encoder_factory",
    "encoder_kwargs",
    "encoder_checkpoint",
    "encoder_state_prefix",
    "encoder_batch_size",
    "encoder_device",
)


def plain(value: Any) -> Any:
    """OmegaConf containers (Hydra passes them) as plain lists/dicts, recursively; anything else as is."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


class VisionUnifiedData(StreamingDataModule):
    """Data module over a ``VisionUnifiedBuilder`` directory ``<data_root>/<name>`` (module docstring)."""

    builder: VisionUnifiedBuilder

    def __init__(
        self,
        data_root: str = "datasets",
        name: str = "vision_unified",
        arc_dir: str | None = None,
        arc_subsets: Sequence[str] = ("training",),
        arc_max_tasks: int | None = None,
        arc_demos: int = 0,
        text_dirs: Sequence[str] = (),
        text_globs: Sequence[str] = ("*.txt", "*.jsonl"),
        generate_stories: int = 1000,
        stories_per_file: int = 100,
        code_dirs: Sequence[str] = ("models", "utils", "dataset"),
        code_globs: Sequence[str] = ("*.py",),
        snapshot_code: bool = True,
        image_size: Sequence[int] = (64, 128),
        font_size: int = 8,
        context_chars: int = 128,
        text_stride: int = 64,
        context_lines: int = 8,
        target_len: int = 64,
        examples_per_batch: int = 32,
        batches_per_consolidated: int = 100,
        val_every: int = 10,
        val_files: int = 1,
        max_examples: int | None = None,
        seed: int = 0,
        pre_encode: Mapping[str, Any] | None = None,
        throttle_s: float = 0.0,
        poll_s: float = 1.0,
        log_every_s: float = 5.0,
        wait_timeout_s: float | None = None,
    ) -> None:
        if not name or "/" in str(name) or str(name).startswith("."):
            raise ConfigError(f"data.name must be a plain directory name, got {name!r}")
        # data_root is relative to the working directory like every other dataset's; made absolute here
        # so the background builder (started in the repository root) writes to the same place.
        root = (Path(data_root).expanduser() / str(name)).resolve()
        pre = plain(pre_encode)
        if pre is not None:
            if not isinstance(pre, dict):
                raise ConfigError(f"data.pre_encode must be null or a mapping, got {pre!r}")
            unknown = sorted(set(pre) - set(PRE_ENCODE_KEYS))
            if unknown:
                raise ConfigError(f"data.pre_encode: unknown keys {unknown}; accepted: {', '.join(PRE_ENCODE_KEYS)}")
            if not isinstance(pre.get("encoder_factory"), str):
                raise ConfigError("data.pre_encode.encoder_factory must be a dotted path, e.g. models.multimodal.capsule_encoder.CapsuleEncoder")
        # Everything the background builder needs, JSON-able (it gets it on its command line).
        builder_kwargs: dict[str, Any] = {
            "arc_dir": str(arc_dir) if arc_dir else None,
            "arc_subsets": list(plain(arc_subsets) or []),
            "arc_max_tasks": arc_max_tasks,
            "arc_demos": arc_demos,
            "text_dirs": [str(p) for p in plain(text_dirs) or []],
            "text_globs": list(plain(text_globs) or []),
            "generate_stories": generate_stories,
            "stories_per_file": stories_per_file,
            "code_dirs": [str(p) for p in plain(code_dirs) or []],
            "code_globs": list(plain(code_globs) or []),
            "snapshot_code": snapshot_code,
            "image_size": [int(s) for s in plain(image_size)],
            "font_size": font_size,
            "context_chars": context_chars,
            "text_stride": text_stride,
            "context_lines": context_lines,
            "target_len": target_len,
            "val_every": val_every,
            "seed": seed,
            "examples_per_batch": examples_per_batch,
            "batches_per_consolidated": batches_per_consolidated,
            "max_examples": max_examples,
            "throttle_s": throttle_s,
            **(pre or {}),
        }
        builder = VisionUnifiedBuilder(root, **builder_kwargs)  # validates every value
        row_keys = {"capsules" if builder.pre_encoded else "images", "target", "source", "task_index", "test_index"}
        super().__init__(builder, builder_kwargs, row_keys, val_files, poll_s, log_every_s, wait_timeout_s, DATA_CONFIG)

    @property
    def pre_encoded(self) -> bool:
        return self.builder.pre_encoded

    def model_kwargs(self) -> dict[str, Any]:
        """Facts the model (and evaluators) may take as constructor arguments."""
        b = self.builder
        facts: dict[str, Any] = {
            "vocab_size": VOCAB_SIZE,
            "target_len": b.target_len,
            "image_size": list(b.image_size),
            "in_channels": 1,
            "sources": b.source_names,
            "num_sources": len(SOURCE_IDS),
            "pad_token_id": PAD_TOKEN,
            "eos_token_id": EOS_TOKEN,
            "byte_offset": BYTE_OFFSET,
        }
        if self.pre_encoded:
            manifest = self._manifest or read_manifest(self.root)
            spec = (manifest or {}).get("row_spec") or {}
            if "capsules" not in spec:
                raise StreamingDatasetError(f"{self.root} has no pre-encoded rows yet: run prepare_data() first")
            facts["num_capsules"], facts["capsule_dim"] = spec["capsules"]["shape"]
        arc_tasks = self.root / ARC_TASKS_FILE
        if arc_tasks.is_file():  # the ARC scorer's task list (written before the first batch)
            facts["arc_tasks_path"] = str(arc_tasks)
        return facts
