"""Build-or-wait hand-off used by train.py before training starts.

A data module decides what "ready" means: `prepare_data(rebuild=..., incremental=...)` builds what is
missing (or waits for a builder already running) and returns when training may start. Modules that
build everything in one go ignore `incremental`; streaming builders (multimodal pipeline) return as
soon as the first consolidated shard exists and keep building in the background.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def prepare_dataset(cfg: DictConfig, rebuild: bool = False, incremental: bool = True) -> Any:
    """Instantiate the configured data module and make sure its dataset is ready; returns the module."""
    data = instantiate(cfg.data)
    prepare = getattr(data, "prepare_data", None)
    if prepare is None:
        return data
    params = inspect.signature(prepare).parameters
    kwargs: dict[str, Any] = {}
    if "rebuild" in params:
        kwargs["rebuild"] = rebuild
    elif rebuild:
        log.warning("%s builds nothing on disk: --rebuild-dataset has no effect.", type(data).__name__)
    if "incremental" in params:
        kwargs["incremental"] = incremental
    prepare(**kwargs)
    return data
