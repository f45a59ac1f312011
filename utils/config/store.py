"""Registers the typed schemas (utils/config/schema.py) with Hydra's ConfigStore.

Call `register_configs()` before Hydra composes (pretrain.py, train.py and the Python API do): the
defaults list of conf/config.yaml starts with `launcher_schema`, and `trainer=default` / `paths=default`
are these dataclasses.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from utils.config.schema import LauncherConfig, PathsConf, TrainerConf


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="launcher_schema", node=LauncherConfig)
    store.store(group="trainer", name="default", node=TrainerConf)
    store.store(group="paths", name="default", node=PathsConf)
