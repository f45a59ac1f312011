"""Curricula: training as an ordered list of stages, each changing a named set of things.

`curriculum=<name>` (conf/curriculum/) selects one; without it a run is a single stage that changes
nothing (no cost). A stage (schema: `utils.config.schema.StageConf`) may set

    data          overrides merged onto the `data` node (a node with `_target_` replaces it)
    batch_size    the global batch size
    loss_weights  {term: weight} of a CompositeLoss (terms not named keep their configured weight)
    grad_filter   inherit (as configured) | none (no filtering) | {alpha, lamb, window_size, components}
    freeze        module prefixes whose parameters are not updated in this stage
    lr_scale      {optimizer: factor}: that optimizer's learning rate relative to the configured one
    model         runtime knobs: attributes of the model (e.g. {refinement_steps: 4})

and ends after `max_steps` steps of its own, or earlier when its `advance` criterion holds after an
evaluation: `threshold` (the monitored metric reached it) or `patience` (no improvement above
`min_delta` in that many evaluations), on `monitor` (default: trainer.monitor). The run ends with the
last stage (or at trainer.max_steps). The current stage, its first step and its criterion state are in
the train state and in every checkpoint; a resumed run re-enters its stage exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from utils.config.errors import ConfigError
from utils.training.state import is_improvement

GRAD_FILTER_MODES = ("inherit", "none")


@dataclass(frozen=True)
class AdvanceCriterion:
    monitor: str
    mode: str  # max | min
    threshold: float | None = None
    patience: int | None = None
    min_delta: float = 0.0

    def improved(self, value: float, best: float | None) -> bool:
        return is_improvement(value, best, self.mode, self.min_delta)

    def reached(self, value: float) -> bool:
        if self.threshold is None:
            return False
        return value >= self.threshold if self.mode == "max" else value <= self.threshold

    def describe(self) -> str:
        if self.threshold is not None:
            return f"{self.monitor} {'>=' if self.mode == 'max' else '<='} {self.threshold}"
        return f"{self.monitor} plateaued ({self.patience} evaluations without a change above {self.min_delta})"


@dataclass(frozen=True)
class Stage:
    index: int
    name: str
    max_steps: int | None = None
    advance: AdvanceCriterion | None = None
    data: dict[str, Any] | None = None
    batch_size: int | None = None
    loss_weights: dict[str, float] = field(default_factory=dict)
    grad_filter: str | dict[str, Any] = "inherit"
    freeze: tuple[str, ...] = ()
    lr_scale: dict[str, float] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"stage {self.index} ({self.name})"


class Curriculum:
    """The stages of a run and the rules for leaving one."""

    def __init__(self, stages: list[Stage]) -> None:
        if not stages:
            raise ConfigError("curriculum.stages is empty: give at least one stage, or leave curriculum unset.")
        self.stages = stages

    @classmethod
    def from_config(cls, node: DictConfig | None, monitor: str, monitor_mode: str) -> "Curriculum":
        if node is None:
            return cls([Stage(index=0, name="main")])
        raw = OmegaConf.to_container(node, resolve=True)
        assert isinstance(raw, dict)
        stages = []
        for i, spec in enumerate(raw.get("stages") or []):
            where = f"curriculum.stages[{i}]"
            advance = spec.get("advance")
            criterion = None
            if advance is not None:
                criterion = AdvanceCriterion(
                    monitor=advance.get("monitor") or monitor,
                    mode=advance.get("mode") or monitor_mode,
                    threshold=advance.get("threshold"),
                    patience=advance.get("patience"),
                    min_delta=float(advance.get("min_delta") or 0.0),
                )
                if (criterion.threshold is None) == (criterion.patience is None):
                    raise ConfigError(f"{where}.advance needs exactly one of `threshold` or `patience`.")
                if criterion.mode not in ("min", "max"):
                    raise ConfigError(f"{where}.advance.mode must be 'min' or 'max', got {criterion.mode!r}.")
                if criterion.patience is not None and criterion.patience < 1:
                    raise ConfigError(f"{where}.advance.patience must be >= 1.")
            if spec.get("max_steps") is None and criterion is None and i < len(raw["stages"]) - 1:
                raise ConfigError(f"{where} ({spec.get('name')}) never ends: give it max_steps or an advance criterion.")
            for key in ("max_steps", "batch_size"):
                if spec.get(key) is not None and spec[key] <= 0:
                    raise ConfigError(f"{where}.{key} must be positive, got {spec[key]}.")
            grad_filter = spec.get("grad_filter", "inherit")
            if grad_filter is None or grad_filter is False:  # null, or YAML's `off`/`no`
                grad_filter = "none"
            if not isinstance(grad_filter, dict) and grad_filter not in GRAD_FILTER_MODES:
                raise ConfigError(f"{where}.grad_filter must be inherit, none or a dict of filter options, got {grad_filter!r}.")
            stages.append(Stage(
                index=i,
                name=str(spec.get("name") or f"stage{i}"),
                max_steps=spec.get("max_steps"),
                advance=criterion,
                data=spec.get("data"),
                batch_size=spec.get("batch_size"),
                loss_weights={str(k): float(v) for k, v in (spec.get("loss_weights") or {}).items()},
                grad_filter=grad_filter,
                freeze=tuple(spec.get("freeze") or ()),
                lr_scale={str(k): float(v) for k, v in (spec.get("lr_scale") or {}).items()},
                model=dict(spec.get("model") or {}),
            ))
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"curriculum stage names must be unique, got {names}.")
        return cls(stages)

    def __len__(self) -> int:
        return len(self.stages)

    def __getitem__(self, index: int) -> Stage:
        return self.stages[index]

    @property
    def single(self) -> bool:
        return len(self.stages) == 1 and self.stages[0].max_steps is None and self.stages[0].advance is None

    def data_configs(self, base: DictConfig) -> list[DictConfig]:
        """The data node of every stage (base merged with the stage's overrides), in stage order."""
        return [stage_data_config(base, stage) for stage in self.stages]

    def knob_names(self) -> set[str]:
        return {k for s in self.stages for k in s.model}

    def loss_weight_names(self) -> set[str]:
        return {k for s in self.stages for k in s.loss_weights}


def stage_data_config(base: DictConfig, stage: Stage) -> DictConfig:
    if not stage.data:
        return base
    if "_target_" in stage.data:
        return OmegaConf.create(stage.data)
    merged = OmegaConf.merge(base, stage.data)
    assert isinstance(merged, DictConfig)
    return merged
