"""Entry point: `python train.py [--fresh] [--rebuild-dataset] [--dataset-only] [--no-incremental] [overrides]`.

1. Composes the same Hydra config pretrain.py will use, to find the run directory.
2. Auto-resume: reports the newest valid checkpoint there (pretrain.py resumes from it);
   `--fresh` moves the old run directory aside instead.
3. Makes sure the dataset exists (build, or wait for a builder that is already running).
4. Runs pretrain.py's entry point in this process, or execs torchrun when trainer.nproc_per_node > 1.
Everything that is not one of the flags above is passed to pretrain.py unchanged (Hydra overrides,
`-m`, `--cfg job`, ...), except `training_json=FILE`, which becomes the overrides its "training" block
stands for (utils/config/training_json.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dataset.prepare import prepare_dataset
from utils.cli import exit_for
from utils.config.errors import ConfigError
from utils.config.store import register_configs
from utils.config.training_json import expand_training_json
from utils.config.validation import validate_config
from utils.monitoring.run_logging import setup_logging
from utils.storage.checkpoint import CheckpointError, CheckpointManager
from utils.training.curriculum import Curriculum
from utils.training.runner import check_writable, move_aside, run_dir_in_use
from utils.training.state import TrainState
from utils.training.trainer import finished_reason

ROOT = Path(__file__).resolve().parent
log = logging.getLogger("train")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Hydra overrides and flags go after these, e.g. `python train.py experiment=grokking optim.lr=3e-4`.",
    )
    parser.add_argument("--fresh", action="store_true", help="start over; the old run directory is moved aside")
    parser.add_argument("--rebuild-dataset", action="store_true", help="delete and rebuild the dataset first")
    parser.add_argument("--dataset-only", action="store_true", help="build the dataset and exit")
    parser.add_argument(
        "--no-incremental", action="store_true", help="wait for the complete dataset instead of starting on the first shard"
    )
    return parser.parse_known_args(argv)


def compose_config(overrides: list[str]) -> DictConfig:
    """The config pretrain.py will see (hydra node included, so the run directory resolves)."""
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3", job_name="pretrain"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # so ${hydra:...} interpolations (run_name) resolve here too
    return cfg


def report_resume(run_dir: Path, cfg: DictConfig) -> None:
    """Say what the run will do: start, continue from a checkpoint, or report that it is finished."""
    try:
        loaded = CheckpointManager(run_dir).load_latest()
    except CheckpointError as err:
        raise ConfigError(f"{err} Use --fresh to start over (the old files are kept aside).") from None
    if loaded is None:
        log.info("No checkpoint in %s: starting a new run.", run_dir)
        return
    ckpt, path = loaded
    state = TrainState.from_dict(ckpt["train_state"])
    curriculum = Curriculum.from_config(cfg.get("curriculum"), cfg.trainer.monitor, cfg.trainer.monitor_mode)
    finished = finished_reason(state, cfg.trainer, curriculum)
    if finished:
        log.info("%s is at step %d: the run is finished (%s); nothing to train. Use --fresh to start over.",
                 path, state.step, finished)
    else:
        log.info("Auto-resume: %s is at step %d; training continues from there.", path, state.step)


def preflight(cfg: DictConfig, run_dir: Path) -> None:
    """What would otherwise fail in every rank of a torchrun job (one message instead of a traceback each)."""
    if (busy := run_dir_in_use(run_dir)) is not None:
        raise busy
    check_writable(run_dir)
    t = cfg.trainer
    if t.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={t.device}, but no CUDA GPU is visible; use trainer.device=auto or cpu.")
    batch_sizes = {"trainer.global_batch_size": t.global_batch_size}
    for i, stage in enumerate((cfg.get("curriculum") or {}).get("stages") or []):
        if stage.get("batch_size") is not None:
            batch_sizes[f"curriculum.stages[{i}].batch_size"] = stage.batch_size
    for key, size in batch_sizes.items():
        if size % t.nproc_per_node:
            raise ConfigError(
                f"{key}={size} is not divisible by trainer.nproc_per_node={t.nproc_per_node} (each process takes an "
                f"equal share of the global batch); pick a multiple of {t.nproc_per_node}."
            )


def torchrun_command(cfg: DictConfig, passthrough: list[str]) -> list[str]:
    nproc = cfg.trainer.nproc_per_node
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(ROOT / "pretrain.py"), *passthrough]


# Hydra's flags that take a value (`--cfg job`, `-p trainer`): the value is not an override.
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                "--config-dir", "-cd", "--experimental-rerun"}


def split_hydra_args(passthrough: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra's flags with their values, the overrides)."""
    flags, overrides = [], []
    args = iter(passthrough)
    for arg in args:
        if arg.startswith("-"):
            flags.append(arg)
            if arg in _VALUE_FLAGS:
                flags.append(next(args, ""))
        else:
            overrides.append(arg)
    return flags, overrides


def main(argv: list[str] | None = None) -> None:
    args, passthrough = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(None)
    try:
        passthrough = expand_training_json(passthrough)  # training_json=FILE -> the overrides it stands for
        hydra_flags, overrides = split_hydra_args(passthrough)
        single_run = not hydra_flags  # -m, --cfg, --help ...: pretrain.py/Hydra handles everything
        if single_run or args.dataset_only:
            cfg = compose_config(overrides)
            run_dir = Path(cfg.hydra.run.dir)
            # validate without the hydra node: a config typo should fail here, before any building
            job_cfg = validate_config(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
            preflight(job_cfg, run_dir)
            if args.fresh and run_dir.exists():
                log.info("--fresh: moved the previous run to %s", move_aside(run_dir))
            elif single_run:
                report_resume(run_dir, job_cfg)
            # --dataset-only waits for the whole dataset: a streaming builder would otherwise return at its first shard
            incremental = not (args.no_incremental or args.dataset_only)
            prepare_dataset(job_cfg, rebuild=args.rebuild_dataset, incremental=incremental)
            if args.dataset_only:
                log.info("--dataset-only: dataset ready, not training.")
                return
        else:  # sweep values (a,b / range(...)): any one value tells us nproc_per_node
            cfg = compose_config([o for o in overrides if not ("," in o or "(" in o)])
            job_cfg = validate_config(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
    except Exception as err:  # noqa: BLE001 - sorted by utils.cli: user errors exit 2, bugs re-raise
        exit_for(err, log)
    if job_cfg.trainer.nproc_per_node == 1:
        log.info("Handing off to pretrain.py in this process: %s", " ".join(passthrough) or "(no overrides)")
        import pretrain  # here: torchrun jobs and early exits do not pay for its imports

        pretrain.cli(passthrough)  # the same process, so the pid a user or SLURM signals is the trainer's
        return
    cmd = torchrun_command(job_cfg, passthrough)
    log.info("Handing off: %s", " ".join(cmd))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)  # replaces this process, so signals reach torchrun directly


if __name__ == "__main__":
    main()
