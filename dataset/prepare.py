"""Build-or-wait hand-off used by train.py before training starts.

A data module decides what "ready" means: `prepare_data(rebuild=..., incremental=...)` (the contract
in utils/contract.py) builds what is missing (or waits for a builder already running) and returns when
training may start. Modules that build everything in one go ignore `incremental`; streaming builders
(multimodal pipeline) return as soon as the first consolidated shard exists and keep building in the
background.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hydra.utils import instantiate
from omegaconf import DictConfig

if TYPE_CHECKING:
    from utils.contract import DataModule


def prepare_dataset(cfg: DictConfig, rebuild: bool = False, incremental: bool = True) -> DataModule:
    """Instantiate the configured data module and make sure its dataset is ready; returns the module."""
    data = instantiate(cfg.data)
    data.prepare_data(rebuild=rebuild, incremental=incremental)
    return data
