"""The seed's Python view of the four-stage curriculum, read from the config the launcher runs.

    from dataset.cogment.curriculum import CurriculumStage, FourStageCurriculum

    config = FourStageCurriculum().get_stage_config(CurriculumStage.ARC_VISUAL)
    config.batch_size, config.sequence_length, config.augmentation_rate, config.augmentation_types
    # 8, 256, 0.8, ['rotate_90', 'rotate_180', 'rotate_270', 'flip_h', 'flip_v', 'color_permute']

There is one source of truth: ``conf/curriculum/<name>.yaml`` (the stages) merged onto
``conf/data/cogment/curriculum.yaml`` (the data every stage starts from), exactly as the trainer merges
them; ``FourStageCurriculum("cogment_tiny")`` reads the CPU-sized curriculum.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from utils.config.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


class CurriculumStage(IntEnum):
    SANITY = 0
    ARC_VISUAL = 1
    ALGORITHMIC = 2
    MATH_TEXT = 3
    LONG_CONTEXT = 4


@dataclass(frozen=True)
class StageConfig:
    stage: int
    name: str
    max_steps: int | None
    batch_size: int | None
    sequence_length: int
    tasks: list[str]
    augmentation_rate: float
    augmentation_types: list[str]
    refinement_steps: int | None
    memory_write_rate: float | None
    grokfast: Any  # "inherit" (the experiment's selective filter), "none", or the stage's options
    loss_weights: dict[str, float] = field(default_factory=dict)


class FourStageCurriculum:
    def __init__(self, name: str = "cogment", conf_dir: Path | str = CONF_DIR) -> None:
        conf_dir = Path(conf_dir)
        path = conf_dir / "curriculum" / f"{name}.yaml"
        if not path.is_file():
            raise ConfigError(f"no curriculum {path}; the Cogment curricula are cogment and cogment_tiny")
        self.path = path
        self._stages = OmegaConf.load(path).stages
        self._base_data = OmegaConf.load(conf_dir / "data" / "cogment" / "curriculum.yaml")

    def __len__(self) -> int:
        return len(self._stages)

    @property
    def stage_names(self) -> list[str]:
        return [str(s.name) for s in self._stages]

    def get_stage_config(self, stage: int | str | CurriculumStage) -> StageConfig:
        """The data-side (and training) settings of a stage, by index, enum member or name."""
        index = self._index(stage)
        spec = self._stages[index]
        data = OmegaConf.merge(self._base_data, spec.get("data") or {})
        model = spec.get("model") or {}
        plain = lambda node: OmegaConf.to_container(node, resolve=False) if node is not None else None  # noqa: E731
        return StageConfig(
            stage=index, name=str(spec.name), max_steps=spec.get("max_steps"), batch_size=spec.get("batch_size"),
            sequence_length=int(data.seq_len), tasks=list(data.tasks), augmentation_rate=float(data.augmentation_rate),
            augmentation_types=list(data.augmentation_types), refinement_steps=model.get("refinement_steps"),
            memory_write_rate=model.get("memory_write_rate"),
            grokfast=plain(spec.grad_filter) if OmegaConf.is_config(spec.get("grad_filter")) else spec.get("grad_filter", "inherit"),
            loss_weights=dict(plain(spec.get("loss_weights")) or {}),
        )

    def _index(self, stage: int | str | CurriculumStage) -> int:
        if isinstance(stage, str):
            if stage not in self.stage_names:
                raise ConfigError(f"no stage {stage!r} in {self.path}; the stages are {', '.join(self.stage_names)}")
            return self.stage_names.index(stage)
        index = int(stage)
        if not 0 <= index < len(self._stages):
            raise ConfigError(f"stage {index} is not in {self.path}: it has stages 0..{len(self._stages) - 1}")
        return index
