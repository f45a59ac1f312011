"""Hydra entry point: `python pretrain.py [overrides]`, `torchrun ... pretrain.py`, `python pretrain.py -m ...`.

`main` only resolves the config and maps outcomes to exit codes; `run(cfg)` does the work and returns
the monitored metric, so tests and sweeps (Optuna) call it directly.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from utils.cli import exit_code, report
from utils.config.store import register_configs
from utils.config.training_json import expand_training_json
from utils.monitoring.run_logging import setup_logging
from utils.training.runner import fit, not_writable
from utils.training.trainer import TrainingInterrupted

log = logging.getLogger("pretrain")
register_configs()  # the typed schemas must be in Hydra's ConfigStore before @hydra.main composes


def run(cfg: DictConfig) -> float | None:
    """Train and return the best value of `trainer.monitor` (None if never evaluated)."""
    result = fit(cfg)
    if result.metric is not None:
        log.info("Best %s = %.6g at step %s", cfg.trainer.monitor, result.metric, result.state.best_step)
    return result.metric


def _exit_or_raise(code: int, err: Exception) -> None:
    """A single run exits with `code`. A multirun job raises instead, so Hydra records the job as failed and
    the sweep goes on to its sweeper's rule (Optuna: the trial is FAIL, the study continues up to
    `max_failure_rate`; the basic sweeper runs every job, then reports the failure). A signal (exit 75/130)
    still stops the whole sweep: running it again resumes every job."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise err
    sys.exit(code)


# An absolute config path: relative ones resolve as a Python package when pretrain is imported (train.py).
@hydra.main(version_base="1.3", config_path=str(Path(__file__).resolve().parent / "conf"), config_name="config")
def main(cfg: DictConfig) -> float | None:
    setup_logging(None)  # errors before the run directory exists still reach the console
    try:
        OmegaConf.resolve(cfg)  # ${hydra:...} interpolations only resolve inside Hydra's context
        return run(cfg)
    except (TrainingInterrupted, KeyboardInterrupt) as err:
        sys.exit(report(err, log))
    except Exception as err:
        if exit_code(err) == 1:  # a bug: the traceback
            raise
        _exit_or_raise(report(err, log), err)
    return None


def cli(argv: list[str] | None = None) -> None:
    """`python pretrain.py [args]`; train.py calls it with `argv` in its own process (no second start-up)."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    # Hydra then raises its override and composition errors instead of printing them and exiting 1:
    # a typo is a user error like any other (one message, exit 2).
    os.environ["HYDRA_FULL_ERROR"] = "1"
    if argv is not None:
        sys.argv = [str(Path(__file__).resolve()), *argv]  # what @hydra.main parses
    setup_logging(None)
    try:
        sys.argv[1:] = expand_training_json(sys.argv[1:])  # training_json=FILE -> the overrides it stands for
        main()
    except Exception as err:  # noqa: BLE001 - sorted by utils.cli: user errors exit 2, bugs re-raise
        unwritable = isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC)
        if unwritable and err.filename is not None:  # Hydra writing <run dir>/.hydra into a read-only or full place
            err = not_writable(Path(err.filename), err)
        sys.exit(report(err, log))


if __name__ == "__main__":
    cli()
