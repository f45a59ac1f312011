"""Shared helpers for the in-process launcher tests (tests/test_config.py, tests/test_trainer.py).

The real config is composed with Hydra's compose API, shrunk to a model and data set that train in a
fraction of a second, and handed to `pretrain.fit` / `pretrain.run` in this process (the way
lightning-hydra-template tests its training entry point). No mocks: assertions read the FitResult,
the files in the run directory and `metrics.jsonl`.

Notes:
* `hydra.compose` does not set HydraConfig, so a `${hydra:runtime.choices...}` interpolation (the
  `experiment=grokking` run_name) cannot resolve here; the helpers always set `run_name`. For the same
  reason `pretrain.resolve_run_dir` falls through to <paths.root>/<run_name>.
* Keys that exist only in the typed schema (utils/config/schema.py), not in conf/, must be added with
  `++` on the command line (e.g. `++trainer.max_epochs=1`); see test_config.py for why that matters.
* Runs use one intra-op thread: the models are tiny, and on the 2-core CI machines (often shared
  with other jobs) two threads per op made a 60-step run take 15 s instead of 0.3 s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from utils.config.store import register_configs
from utils.distributed import DistInfo

register_configs()  # the typed schemas, as pretrain.py registers them

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"

# A tiny, fast job: 1-layer width-32 transformer on x/y mod 23 (253 train / 253 val equations), on the
# CPU whatever the machine has ...
TINY_OVERRIDES: tuple[str, ...] = (
    "run_name=test",
    "data.p=23",
    "model.width=32",
    "model.num_layers=1",
    "trainer.device=cpu",
    "trainer.drop_last=true",  # the grokking preset keeps each epoch's short last batch; the tests count whole ones
)
# ... with batch 64 (3 steps per epoch), every step logged, 20 steps, evaluated at steps 10 and 20.
TINY_TRAINER_OVERRIDES: tuple[str, ...] = (
    "trainer.global_batch_size=64",
    "trainer.log_interval=1",
    "trainer.max_steps=20",
    "trainer.eval_interval=10",
)

# Environment variables utils.distributed.init_distributed reads to join a process group.
_DIST_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def trainer_stand_in(run_dir: Path, rank: int = 0, world_size: int = 1) -> SimpleNamespace:
    """What a callback's hooks read of the Trainer here (run_dir, dist), for components tested on their own."""
    return SimpleNamespace(run_dir=Path(run_dir), dist=DistInfo(rank=rank, world_size=world_size))


def compose_config(*overrides: str) -> DictConfig:
    """conf/config.yaml composed with `overrides` (no hydra node, nothing resolved)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def remove_launcher_log_handlers() -> None:
    """utils.monitoring.run_logging.setup_logging leaves a train.log FileHandler open on the root logger."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_launcher", False):
            root.removeHandler(handler)
            handler.close()


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One dataset directory for the whole session: the modular-arithmetic table is built once."""
    return tmp_path_factory.mktemp("data") / "ds"


@pytest.fixture
def single_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make sure a run stays a single process: no torchrun/SLURM variables, no process group."""
    for name in _DIST_ENV:
        monkeypatch.delenv(name, raising=False)
    assert not dist.is_initialized()
    yield
    assert not dist.is_initialized(), "a test left torch.distributed initialised"


@pytest.fixture
def make_cfg(data_root: Path, single_process: None) -> Iterator[Callable[..., DictConfig]]:
    """`make_cfg(tmp_path, *overrides)`: the real config, shrunk, writing under <tmp_path>/ck.

    Runs land in <tmp_path>/ck/test (paths.root=<tmp_path>/ck, run_name=test); pass another directory
    as the first argument for a second, independent run in the same test. `shrink_trainer=False` keeps
    the trainer's composed batch/step/eval settings (to test a preset such as debug=fast);
    `tiny_grokking=False` leaves out the shrunk grokking model and data (for another experiment).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def make(tmp_path: Path, *overrides: str, shrink_trainer: bool = True, tiny_grokking: bool = True) -> DictConfig:
        return compose_config(
            f"paths.root={Path(tmp_path) / 'ck'}",
            f"paths.data_root={data_root}",
            *(TINY_OVERRIDES if tiny_grokking else ("run_name=test", "trainer.device=cpu")),
            *(TINY_TRAINER_OVERRIDES if shrink_trainer else ()),
            *overrides,
        )

    try:
        yield make
    finally:
        torch.set_num_threads(threads)
        remove_launcher_log_handlers()
