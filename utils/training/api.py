"""The Python API: the launcher from a notebook or a script, over the same loop as the CLI.

    from utils.training.api import compose, train

    cfg = compose(["experiment=grokking", "trainer.max_steps=500"])   # validated exactly like the CLI
    result = train(cfg)                 # or train(["experiment=grokking", ...])
    result.metric, result.history, result.trainer.model

`train` resumes the run directory like the CLI does (`<paths.root>/<run_name>`; `fresh=True` starts
over, `run_dir=...` picks another place). A model instance can be passed in (`model=...`): it is trained
instead of `cfg.model`, with everything else from the config.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from utils.config.store import register_configs
from utils.config.training_json import expand_training_json
from utils.config.validation import validate_config
from utils.training.runner import fit, move_aside, resolve_run_dir
from utils.training.trainer import Trainer

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


@dataclass
class TrainResult:
    metric: float | None  # best value of trainer.monitor (None if never evaluated)
    history: list[dict[str, float]]  # one record per evaluation: {"step": ..., "val/...": ...}
    trainer: Trainer  # the model, optimizers, state and run directory of the run
    run_dir: Path

    @property
    def model(self) -> torch.nn.Module:
        return self.trainer.model


def compose(overrides: Sequence[str] = (), config_name: str = "config", validate: bool = True) -> DictConfig:
    """The config `python pretrain.py <overrides>` would run, checked the same way (ConfigError on a typo)."""
    register_configs()
    if GlobalHydra.instance().is_initialized():  # e.g. a notebook that composed before
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="api"):
        cfg = hydra_compose(config_name=config_name, overrides=expand_training_json(overrides), return_hydra_config=True)
    # `${hydra:runtime.choices...}` (e.g. the grokking run_name) resolves only while Hydra's config is set:
    # resolve it here, then forget it, so run directories come from paths.root / run_name as documented.
    HydraConfig.instance().set_config(cfg)
    try:
        job = OmegaConf.create(OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]),
                                                      resolve=True))
    finally:
        HydraConfig.instance().cfg = None
    return validate_config(job) if validate else job


def train(
    config: DictConfig | Sequence[str] = (),
    *,
    model: torch.nn.Module | None = None,
    run_dir: str | Path | None = None,
    fresh: bool = False,
) -> TrainResult:
    """Train (or resume) the run `config` describes: a composed config or a list of overrides."""
    cfg = config if isinstance(config, DictConfig) else compose(list(config), validate=False)
    cfg = validate_config(cfg, model_given=model is not None)
    if run_dir is not None:
        with open_dict(cfg):
            cfg.paths.run_dir = str(run_dir)
    target = resolve_run_dir(cfg)
    if fresh and target.exists():
        move_aside(target)
    result = fit(cfg, model=model)
    assert result.trainer is not None
    return TrainResult(metric=result.metric, history=list(result.state.history), trainer=result.trainer,
                       run_dir=result.run_dir)

