"""Entry point: `python train.py [--fresh] [--rebuild-dataset] [--dataset-only] [--no-incremental] [overrides]`.

1. Composes the same Hydra config pretrain.py will use, to find the run directory.
2. Auto-resume: reports the newest valid checkpoint there (pretrain.py resumes from it);
   `--fresh` moves the old run directory aside instead.
3. Makes sure the dataset exists (build, or wait for a builder that is already running).
4. Hands off to pretrain.py in this process (exec), or to torchrun when trainer.nproc_per_node > 1.
Everything that is not one of the flags above is passed to pretrain.py unchanged (Hydra overrides,
`-m`, `--cfg job`, ...).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dataset.prepare import prepare_dataset
from utils.config.errors import ConfigError
from utils.config.store import register_configs
from utils.config.validation import validate_config
from utils.monitoring.run_logging import setup_logging
from utils.signals import EXIT_CONFIG
from utils.storage.checkpoint import CheckpointError, CheckpointManager
from utils.training.runner import move_aside

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


def report_resume(run_dir: Path) -> None:
    try:
        loaded = CheckpointManager(run_dir).load_latest()
    except CheckpointError as err:
        raise ConfigError(f"{err} Use --fresh to start over (the old files are kept aside).") from None
    if loaded is None:
        log.info("No checkpoint in %s: starting a new run.", run_dir)
    else:
        state, path = loaded
        log.info("Auto-resume: %s is at step %d; training continues from there.", path, state["train_state"]["step"])


def pretrain_command(cfg: DictConfig, passthrough: list[str]) -> list[str]:
    script = str(ROOT / "pretrain.py")
    nproc = cfg.trainer.nproc_per_node
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *passthrough]
    return [sys.executable, script, *passthrough]


def main(argv: list[str] | None = None) -> None:
    args, passthrough = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(None)
    hydra_flags = [a for a in passthrough if a.startswith("-")]
    overrides = [a for a in passthrough if not a.startswith("-")]
    single_run = not hydra_flags  # -m, --cfg, --help ...: pretrain.py/Hydra handles everything
    try:
        if single_run or args.dataset_only:
            cfg = compose_config(overrides)
            run_dir = Path(cfg.hydra.run.dir)
            # validate without the hydra node: a config typo should fail here, before any building
            job_cfg = validate_config(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
            if args.fresh and run_dir.exists():
                log.info("--fresh: moved the previous run to %s", move_aside(run_dir))
            elif single_run:
                report_resume(run_dir)
            # --dataset-only waits for the whole dataset: a streaming builder would otherwise return at its first shard
            incremental = not (args.no_incremental or args.dataset_only)
            prepare_dataset(job_cfg, rebuild=args.rebuild_dataset, incremental=incremental)
            if args.dataset_only:
                log.info("--dataset-only: dataset ready, not training.")
                return
        else:  # sweep values (a,b / range(...)): any one value tells us nproc_per_node
            cfg = compose_config([o for o in overrides if not ("," in o or "(" in o)])
            job_cfg = validate_config(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
    except ConfigError as err:
        log.error("%s", err)
        sys.exit(EXIT_CONFIG)
    except Exception as err:  # Hydra's own override/compose errors: show the message without a traceback
        if type(err).__module__.startswith(("hydra", "omegaconf")):
            log.error("%s", err)
            sys.exit(EXIT_CONFIG)
        raise
    cmd = pretrain_command(job_cfg, passthrough)
    log.info("Handing off: %s", " ".join(cmd))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)  # replaces this process, so signals reach the trainer directly


if __name__ == "__main__":
    main()
