"""`fit(cfg)`: validate a composed config, join the process group, set up logging, train.

The one entry point behind `pretrain.py` (the CLI, torchrun, SLURM, sweeps) and the Python API
(`utils.training.api.train`): there is no second training loop.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from utils.config.validation import validate_config
from utils.distributed import cleanup_distributed, init_distributed
from utils.monitoring.run_logging import setup_logging
from utils.training.state import FitResult
from utils.training.trainer import Trainer


def resolve_run_dir(cfg: DictConfig) -> Path:
    """paths.run_dir if set; else Hydra's output dir (sweep jobs differ); else <paths.root>/<run_name>."""
    if cfg.paths.get("run_dir"):
        return Path(cfg.paths.run_dir)
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.paths.root) / cfg.run_name


def move_aside(run_dir: Path) -> Path:
    """`--fresh`: rename the old run directory to `<name>.before-fresh-<time>` (nothing is deleted)."""
    aside = run_dir.with_name(f"{run_dir.name}.before-fresh-{time.strftime('%Y%m%d-%H%M%S')}")
    shutil.move(str(run_dir), str(aside))
    return aside


def fit(cfg: DictConfig, model: torch.nn.Module | None = None) -> FitResult:
    """Train the run `cfg` describes (resuming its run directory); `model`: an instance to train instead of cfg.model."""
    cfg = validate_config(cfg, model_given=model is not None)
    run_dir = resolve_run_dir(cfg).resolve()
    with open_dict(cfg):
        cfg.paths.run_dir = str(run_dir)
    dist_info = init_distributed(cfg.trainer.device, cfg.trainer.dist_backend)
    setup_logging(run_dir, dist_info.rank)
    try:
        if cfg.trainer.deterministic:
            torch.use_deterministic_algorithms(True)
        if dist_info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        return Trainer(cfg, dist_info, run_dir, model=model).fit()
    finally:
        cleanup_distributed()
