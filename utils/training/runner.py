"""`fit(cfg)`: validate a composed config, join the process group, set up logging, train.

The one entry point behind `pretrain.py` (the CLI, torchrun, SLURM, sweeps) and the Python API
(`utils.training.api.train`): there is no second training loop.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from utils.config.errors import ConfigError
from utils.config.validation import validate_config
from utils.distributed import cleanup_distributed, init_distributed
from utils.monitoring.run_logging import setup_logging
from utils.storage.locks import FileLock, is_locked, lock_holder
from utils.training.state import FitResult
from utils.training.trainer import Trainer


def resolve_run_dir(cfg: DictConfig) -> Path:
    """paths.run_dir if set; else Hydra's output dir (sweep jobs differ); else <paths.root>/<run_name>."""
    if cfg.paths.get("run_dir"):
        return Path(cfg.paths.run_dir)
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.paths.root) / cfg.run_name


RUN_LOCK = ".run.lock"  # held by rank 0 for the whole run; the kernel drops it when the process dies


def run_dir_in_use(run_dir: Path) -> ConfigError | None:
    """The error to stop with when another live process holds `run_dir` (None when it is free)."""
    if not is_locked(run_dir / RUN_LOCK):
        return None
    holder = lock_holder(run_dir / RUN_LOCK)
    return ConfigError(
        f"{run_dir} is in use by another run ({holder or 'a live process'}): two runs never share a run directory. "
        "Wait for that run to finish (or stop it), or give this one another run_name=... (or paths.root=...)."
    )


def not_writable(path: Path, err: OSError) -> ConfigError:
    return ConfigError(
        f"Cannot write to the run directory {path} ({err.strerror or err}). Fix its permissions (or free the disk), "
        "or write elsewhere with paths.root=... (or run_name=...)."
    )


def check_writable(run_dir: Path) -> None:
    """ConfigError unless `run_dir` (or the nearest existing folder it would be made in) is writable; creates nothing."""
    existing = run_dir.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK):  # a read-only filesystem refuses root too (EROFS)
        raise not_writable(run_dir, PermissionError(errno.EACCES, f"{existing} is not writable"))


def lock_run_dir(run_dir: Path) -> FileLock:
    """Create `run_dir` and hold its lock; ConfigError when it is not writable or another run holds it."""
    lock = FileLock(run_dir / RUN_LOCK)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        # A probe (is_locked) holds the lock for microseconds: a short timeout keeps one from refusing us.
        acquired = lock.acquire(timeout=0.5)
    except OSError as err:
        raise not_writable(run_dir, err) from None
    if not acquired:
        raise run_dir_in_use(run_dir) or ConfigError(f"{run_dir} is in use by another run.")
    return lock


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
    dist_info = init_distributed(cfg.trainer.device, cfg.trainer.dist_backend, cfg.trainer.dist_timeout_s)
    lock = None
    try:
        lock = lock_run_dir(run_dir) if dist_info.is_main else None
        setup_logging(run_dir, dist_info.rank)
        if cfg.trainer.deterministic:
            torch.use_deterministic_algorithms(True)
        if cfg.trainer.cpu_threads is not None:
            torch.set_num_threads(cfg.trainer.cpu_threads)
        return Trainer(cfg, dist_info, run_dir, model=model).fit()
    finally:
        if lock is not None:
            lock.release()
        cleanup_distributed()
