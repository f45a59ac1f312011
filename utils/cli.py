"""One error path for train.py and pretrain.py: an error's kind decides its exit code and how it is shown.

| kind                                                        | exit | console                          |
|-------------------------------------------------------------|------|----------------------------------|
| a user error: ConfigError (bad key, value, file, input),    | 2    | one short message naming the key |
| CheckpointError (a checkpoint that does not fit or is bad), |      | or file, the problem and the fix;|
| Hydra's own override/composition errors                     |      | the traceback goes to train.log  |
| NonFiniteError (too many non-finite or diverging steps)     | 3    | the message, naming the last good checkpoint |
| TrainingInterrupted (a signal; checkpoint saved)            | 75   | a warning: run again to resume   |
| KeyboardInterrupt (a second Ctrl+C)                         | 130  | a warning                        |
| anything else: a bug                                        | 1    | the traceback                    |
"""

from __future__ import annotations

import logging
import re
import sys
from typing import NoReturn

from hydra.errors import HydraException, InstantiationException
from omegaconf.errors import OmegaConfBaseException

from utils.config.errors import ConfigError, from_hydra, from_omegaconf
from utils.monitoring.run_logging import FILE_ONLY
from utils.signals import EXIT_ABORTED, EXIT_CONFIG, EXIT_INTERRUPTED, EXIT_NONFINITE
from utils.storage.checkpoint import CheckpointError
from utils.training.trainer import NonFiniteError, TrainingInterrupted


def as_user_error(err: BaseException) -> ConfigError | CheckpointError | None:
    """The user error `err` stands for, or None when it is a bug (or not an error at all)."""
    if isinstance(err, (ConfigError, CheckpointError)):
        return err
    if isinstance(err, InstantiationException):
        # A constructor refusing a config value (ValueError, which ConfigError is) is the user's to fix; any
        # other failure inside a constructor is a bug and keeps its traceback.
        cause = err.__cause__
        if isinstance(cause, (ConfigError, CheckpointError)):
            return cause
        if isinstance(cause, ValueError):
            node = re.search(r"full_key: (\S+)", str(err))
            target = re.search(r"target '([^']+)'", str(err))
            where = f"'{node.group(1)}'" if node else "a config node"
            return ConfigError(f"{where} ({target.group(1) if target else '?'}): {cause}. Fix that value in the config.")
        return None
    if isinstance(err, HydraException):
        return from_hydra(err)
    if isinstance(err, OmegaConfBaseException):
        return from_omegaconf(err)
    return None


def exit_code(err: BaseException) -> int:
    if as_user_error(err) is not None:
        return EXIT_CONFIG
    if isinstance(err, NonFiniteError):
        return EXIT_NONFINITE
    if isinstance(err, TrainingInterrupted):
        return EXIT_INTERRUPTED
    if isinstance(err, KeyboardInterrupt):
        return EXIT_ABORTED
    return 1


def report(err: BaseException, log: logging.Logger) -> int:
    """Show `err` the way its kind is shown (table above) and return its exit code; bugs are re-raised."""
    code = exit_code(err)
    if code == 1:
        raise err
    user = as_user_error(err)
    if user is not None:
        log.error("%s", str(user).strip())
        log.error("Traceback, for debugging:", exc_info=err, extra={FILE_ONLY: True})
    elif isinstance(err, TrainingInterrupted):
        log.warning("%s: checkpoint saved; run the same command again to resume.", err)
    elif isinstance(err, KeyboardInterrupt):
        log.warning("Aborted.")
    else:
        log.error("%s", err)
    return code


def exit_for(err: BaseException, log: logging.Logger) -> NoReturn:
    sys.exit(report(err, log))
