"""Typed schemas of the launcher's own config: each default is written here, once.

`utils.config.store.register_configs()` registers them with Hydra's ConfigStore: `launcher_schema` is the
first entry of conf/config.yaml's defaults list, so every YAML file and command-line override is merged
onto these types while Hydra composes; an unknown key (`trainer.max_stepz=5`) or a value of the wrong
type (`trainer.max_steps=abc`) fails with the key named. `trainer/default` and `paths/default` are these
dataclasses too (conf/trainer/ddp.yaml builds on the first).

Groups whose keys depend on the chosen class (`model`, `data`, `loss`, `evaluators`, `optim`,
`schedule`, `grad_filter`, `logger`, `callbacks`) are `_target_` nodes: their schema is the target's own
signature, checked by `utils.config.validation` (the code is the schema, so AdamAtan2's or `fused`
options need no entry here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class EMAConf:
    enabled: bool = False
    decay: float = 0.999
    use_for_eval: bool = True  # evaluate (and pick best.pt by) the EMA weights


@dataclass
class EarlyStoppingConf:
    enabled: bool = False
    patience: int = 10  # evaluations without improvement before stopping
    min_delta: float = 0.0
    stop_at: Optional[float] = None  # stop as soon as the monitored metric reaches this value


@dataclass
class CheckpointConf:
    # Steps (500, "500 steps") or epochs ("5 epochs") between saves; also saved at every evaluation, at a
    # stage change and on shutdown.
    interval: Any = 500
    keep_last: int = 3
    save_best: bool = True
    resume: bool = True  # auto-resume from the run directory's newest valid checkpoint
    # Copy the state to host memory and write it in a background thread (docs/checkpoints.md#asynchronous-saves):
    # the loop stalls for the copy only. The same files and guarantees either way; false writes in the loop.
    async_save: bool = True
    # With async_save: weights and optimizer states are copied while the next step's forward and backward run
    # (the step waits for the copy before its update). false: everything is copied before the save returns,
    # for a model whose forward pass changes its parameters in place through `.data` (not detectable).
    overlap_copy: bool = True
    # With async_save: the writer thread's nice value above the process's (0-19; Linux, per thread). It then
    # takes the cores only when the training and copy threads leave them idle; 0 competes on equal terms.
    writer_nice: int = 10


@dataclass
class GradMonitorConf:
    """Per-layer gradient norms with vanishing/exploding flags (utils/monitoring/grad_monitor.py), on logging steps."""

    enabled: bool = False
    vanishing_threshold: float = 1e-7
    exploding_threshold: float = 1e3
    warn_interval: int = 100  # at most one warning per this many steps


@dataclass
class DivergenceConf:
    """A step whose loss or gradient norm exceeds a bound counts as non-finite: skipped, and part of the streak
    that stops the run after max_consecutive_nonfinite (a loss or update that explodes while still finite)."""

    max_loss: Optional[float] = None
    max_grad_norm: Optional[float] = None  # before clipping (a local learner's update norm)


@dataclass
class TrainerConf:
    max_steps: int = 1000
    max_epochs: Optional[int] = None  # stop after this many passes over the train set (whichever comes first)
    global_batch_size: int = 512  # the batch of one optimizer step, split across ranks
    drop_last: bool = True  # false: keep each epoch's last, shorter batch (as the Grokfast reference does)
    eval_batch_size: Optional[int] = None  # per rank; defaults to the per-rank train batch size
    eval_interval: Any = 100  # steps (100, "100 steps") or epochs ("5 epochs"), see utils/training/intervals.py
    eval_max_batches: Optional[int] = None  # evaluate on a subset (a fixed shuffle of the validation set)
    log_interval: int = 10  # steps
    log_verbose: bool = False  # console lines with every metric (they always go to metrics.jsonl and the trackers)
    # Training-curve figures: null draws them at evaluations (at most every 30 s) and at the end; an
    # interval (steps or epochs) draws them exactly then.
    plot_interval: Any = None
    monitor: str = "val/loss"  # the metric early stopping, best.pt and sweeps use
    monitor_mode: str = "min"  # min | max
    early_stopping: EarlyStoppingConf = field(default_factory=EarlyStoppingConf)
    ema: EMAConf = field(default_factory=EMAConf)
    checkpoint: CheckpointConf = field(default_factory=CheckpointConf)
    grad_monitor: GradMonitorConf = field(default_factory=GradMonitorConf)
    grad_clip: Optional[float] = 1.0  # max total grad norm (or local-update norm); null disables
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 uses a GradScaler, GPU only)
    compile: bool = False
    detect_anomaly: bool = False
    max_consecutive_nonfinite: int = 10
    divergence: DivergenceConf = field(default_factory=DivergenceConf)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    num_workers: int = 0
    # torch's intra-op threads per process; null: torch's default (one per core). On CPU cores that other
    # jobs share, OpenMP threads that wait for each other make small models many times slower.
    cpu_threads: Optional[int] = None
    nproc_per_node: int = 1  # >1: train.py starts torchrun itself
    dist_backend: Optional[str] = None  # default: nccl on GPU, gloo on CPU
    # ddp: every rank holds the whole model (DistributedDataParallel); fsdp: parameters, gradients and optimizer
    # state sharded across the ranks (FSDP2 fully_shard, utils/training/fsdp.py), for models that do not fit one GPU
    strategy: str = "ddp"
    # How long a collective waits for a rank that stopped answering (a hung or unreachable node) before the
    # others fail; null: torch's default (10 min nccl, 30 min gloo). A dead process is noticed at once anyway.
    dist_timeout_s: Optional[float] = None
    deterministic: bool = False  # torch.use_deterministic_algorithms


@dataclass
class AdvanceConf:
    """When a curriculum stage ends before its budget: exactly one of `threshold` or `patience`."""

    monitor: Optional[str] = None  # default: trainer.monitor
    mode: Optional[str] = None  # min | max; default: trainer.monitor_mode
    threshold: Optional[float] = None  # the metric reached this value
    patience: Optional[int] = None  # this many evaluations without an improvement above min_delta
    min_delta: float = 0.0


@dataclass
class StageConf:
    """One curriculum stage (utils/training/curriculum.py); every key but `name` is optional."""

    name: str = "???"
    max_steps: Optional[int] = None  # the stage's own step budget
    advance: Optional[AdvanceConf] = None
    data: Optional[Any] = None  # merged onto `data` (a node with `_target_` replaces it)
    batch_size: Optional[int] = None  # the global batch size in this stage
    loss_weights: Dict[str, float] = field(default_factory=dict)
    grad_filter: Any = "inherit"  # inherit | none | {alpha, lamb, window_size, components}
    freeze: List[str] = field(default_factory=list)  # module prefixes not updated in this stage
    lr_scale: Dict[str, float] = field(default_factory=dict)  # optimizer name -> factor on its learning rate
    model: Dict[str, Any] = field(default_factory=dict)  # runtime knobs: attributes of the model


@dataclass
class CurriculumConf:
    stages: List[StageConf] = field(default_factory=list)


@dataclass
class PathsConf:
    # Relative paths resolve against the directory you launch from (the repository root in the README).
    root: str = "checkpoints"  # every run writes to <root>/<run_name>
    data_root: str = "datasets"  # built datasets, one directory per parameter set
    run_dir: Optional[str] = None  # filled in at start-up from Hydra's output dir (or <root>/<run_name>)


@dataclass
class LauncherConfig:
    run_name: str = "default"
    seed: int = 0
    notes: Optional[str] = None
    model: Any = None
    data: Any = None
    loss: Any = None
    evaluators: Dict[str, Any] = field(default_factory=dict)
    # The main optimizer as a `_partial_` `_target_` node, plus the launcher's `param_groups` (fnmatch globs
    # with their own settings) and `components` (extra optimizers over named submodules): utils/optim/builder.py.
    optim: Any = None
    schedule: Any = None  # a `_partial_` factory(optimizer, total_steps): utils/optim/schedules.py
    grad_filter: Any = None
    trainer: TrainerConf = field(default_factory=TrainerConf)
    # None: one stage that changes nothing. Typed as Any so a stage list can also be given inline on the
    # command line; validate_config checks it against CurriculumConf.
    curriculum: Any = None
    callbacks: Dict[str, Any] = field(default_factory=dict)  # named `_target_` nodes (utils/training/callbacks.py)
    # Experiment trackers by name (`_target_` nodes); the local train.log and metrics.jsonl are always written.
    logger: Dict[str, Any] = field(default_factory=dict)
    paths: PathsConf = field(default_factory=PathsConf)
