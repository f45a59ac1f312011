"""Hydra entry point: `python pretrain.py [overrides]`, `torchrun ... pretrain.py`, `python pretrain.py -m ...`.

`main` only resolves the config and maps outcomes to exit codes; `run(cfg)` does the work and returns
the monitored metric, so tests and sweeps (Optuna) call it directly.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from utils.config.errors import ConfigError
from utils.config.store import register_configs
from utils.monitoring.run_logging import setup_logging
from utils.signals import EXIT_ABORTED, EXIT_CONFIG, EXIT_INTERRUPTED, EXIT_NONFINITE
from utils.storage.checkpoint import CheckpointError
from utils.training.runner import fit
from utils.training.trainer import NonFiniteError, TrainingInterrupted

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


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    setup_logging(None)  # errors before the run directory exists still reach the console
    try:
        OmegaConf.resolve(cfg)  # ${hydra:...} interpolations only resolve inside Hydra's context
        return run(cfg)
    except (ConfigError, CheckpointError) as err:
        log.error("%s", err)
        _exit_or_raise(EXIT_CONFIG, err)
    except NonFiniteError as err:
        log.error("%s", err)
        _exit_or_raise(EXIT_NONFINITE, err)
    except TrainingInterrupted as err:
        log.warning("%s: checkpoint saved; run the same command again to resume.", err)
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        log.warning("Aborted.")
        sys.exit(EXIT_ABORTED)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
