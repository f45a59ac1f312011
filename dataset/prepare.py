"""Build-or-wait hand-off used by train.py before training starts.

A data module decides what "ready" means: `prepare_data(rebuild=..., incremental=...)` (the contract
in utils/contract.py) builds what is missing (or waits for a builder already running) and returns when
training may start. Modules that build everything in one go ignore `incremental`; streaming builders
(multimodal pipeline) return as soon as the first consolidated shard exists and keep building in the
background.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from utils.config.errors import ConfigError
from utils.training.curriculum import Curriculum

if TYPE_CHECKING:
    from utils.contract import DataModule


def instantiate_data(data_cfg: DictConfig) -> DataModule:
    """The data module `data_cfg` describes. A ConfigError of its constructor (`data.p must be a prime`) is
    raised as it is: Hydra would wrap it in an InstantiationException, which the entry points cannot tell
    from a bug."""
    try:
        return instantiate(data_cfg)
    except InstantiationException as err:
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        raise


def prepare_dataset(cfg: DictConfig, rebuild: bool = False, incremental: bool = True) -> list[DataModule]:
    """Make every dataset the run will use ready (each curriculum stage's, once); returns the data modules."""
    t = cfg.trainer
    curriculum = Curriculum.from_config(cfg.get("curriculum"), t.monitor, t.monitor_mode)
    modules, seen = [], []
    for data_cfg in curriculum.data_configs(cfg.data):
        plain = OmegaConf.to_container(data_cfg, resolve=True)
        if plain in seen:
            continue
        seen.append(plain)
        data = instantiate_data(data_cfg)
        data.prepare_data(rebuild=rebuild, incremental=incremental)
        modules.append(data)
    return modules
