"""Typed schemas for the launcher's own config groups.

The composed Hydra config is merged onto `LauncherConfig` before anything runs, so an unknown key
(`optim.lrr=1`) or a value of the wrong type (`trainer.max_steps=abc`) fails at once with an error
naming the key. Groups whose content depends on the chosen class (`model`, `data`, `loss`,
`evaluators`, `schedule`, `grad_filter`) are `_target_` nodes: they are checked against the target's
constructor signature instead (see `utils.config.validation`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class ParamGroupConf:
    params: str = "???"  # fnmatch glob on full parameter names
    lr: Optional[float] = None
    weight_decay: Optional[float] = None


@dataclass
class OptimComponentConf:
    """An extra optimizer over named submodules (e.g. core / memory / halting)."""

    modules: List[str] = field(default_factory=list)
    _target_: Optional[str] = None
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    betas: Optional[List[float]] = None
    eps: Optional[float] = None
    momentum: Optional[float] = None
    nesterov: Optional[bool] = None
    schedule: Optional[Any] = None  # a `schedule` node overriding the global one for this optimizer


@dataclass
class OptimConf:
    """The main optimizer. Keys left null are not passed to the optimizer class."""

    _target_: Optional[str] = "torch.optim.AdamW"
    lr: float = 1e-3
    weight_decay: Optional[float] = None
    betas: Optional[List[float]] = None
    eps: Optional[float] = None
    momentum: Optional[float] = None
    nesterov: Optional[bool] = None
    param_groups: List[ParamGroupConf] = field(default_factory=list)
    components: Dict[str, OptimComponentConf] = field(default_factory=dict)


@dataclass
class EMAConf:
    enabled: bool = False
    decay: float = 0.999
    use_for_eval: bool = True


@dataclass
class EarlyStoppingConf:
    enabled: bool = False
    patience: int = 10  # evaluations without improvement before stopping
    min_delta: float = 0.0
    stop_at: Optional[float] = None  # stop as soon as the monitored metric reaches this value


@dataclass
class CheckpointConf:
    interval: int = 500  # steps between `latest.pt` saves (also saved at every evaluation and on shutdown)
    keep_last: int = 3
    save_best: bool = True
    resume: bool = True  # auto-resume from the run directory's newest valid checkpoint


@dataclass
class GradMonitorConf:
    """Per-layer gradient norms with vanishing/exploding flags (utils/monitoring/grad_monitor.py), on logging steps."""

    enabled: bool = False
    vanishing_threshold: float = 1e-7
    exploding_threshold: float = 1e3
    history_size: int = 100  # norms kept per layer
    cleanup_interval: int = 1000  # steps between freeing the history and the cached layer list
    warn_interval: int = 100  # at most one warning per this many steps


@dataclass
class TrainerConf:
    max_steps: int = 1000
    max_epochs: Optional[int] = None  # stop after this many passes over the train set (whichever comes first)
    global_batch_size: int = 512  # split across ranks
    eval_batch_size: Optional[int] = None  # per rank; defaults to the per-rank train batch size
    eval_interval: int = 100  # steps
    eval_max_batches: Optional[int] = None
    log_interval: int = 10
    monitor: str = "val/loss"
    monitor_mode: str = "min"  # min | max
    early_stopping: EarlyStoppingConf = field(default_factory=EarlyStoppingConf)
    ema: EMAConf = field(default_factory=EMAConf)
    checkpoint: CheckpointConf = field(default_factory=CheckpointConf)
    grad_monitor: GradMonitorConf = field(default_factory=GradMonitorConf)
    grad_clip: Optional[float] = 1.0  # max total grad norm; null disables
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 uses a GradScaler, GPU only)
    compile: bool = False
    detect_anomaly: bool = False
    max_consecutive_nonfinite: int = 10
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    num_workers: int = 0
    nproc_per_node: int = 1  # >1: train.py starts torchrun itself
    dist_backend: Optional[str] = None  # default: nccl on GPU, gloo on CPU
    deterministic: bool = False  # torch.use_deterministic_algorithms


@dataclass
class PathsConf:
    root: str = "checkpoints"  # every run writes to <root>/<run_name>
    data_root: str = "datasets"
    run_dir: Optional[str] = None  # filled in at start-up from Hydra's output dir (or <root>/<run_name>)


@dataclass
class LauncherConfig:
    run_name: str = "default"
    seed: int = 0
    model: Any = None
    data: Any = None
    loss: Any = None
    evaluators: Dict[str, Any] = field(default_factory=dict)
    optim: OptimConf = field(default_factory=OptimConf)
    schedule: Any = None
    grad_filter: Any = None
    trainer: TrainerConf = field(default_factory=TrainerConf)
    # Experiment trackers by name (`_target_` nodes); the local train.log and metrics.jsonl are always written.
    logger: Dict[str, Any] = field(default_factory=dict)
    paths: PathsConf = field(default_factory=PathsConf)
    notes: Optional[str] = None
