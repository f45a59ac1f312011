"""The family contract, checked for every experiment preset (conf/experiment/*.yaml): a new family gets
these checks by adding its experiment.

For each preset:
1. it composes and validates (with and without debug=fast);
2. `python train.py experiment=<name> debug=fast` runs in a subprocess (6 steps, evaluated and
   checkpointed at steps 3 and 6) and logs the preset's monitored metric at every evaluation;
3. resumed in this process from its step-3 checkpoint, it ends at step 6 bitwise identical to the
   uninterrupted run (weights, optimizers, schedules, EMA, filters, carried state, RNG streams, callbacks).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.cli_helpers import REPO_ROOT, assert_tensors_equal, load, paths, read_metrics, run_parallel
from tests.conftest import CONF_DIR, compose_config
from utils.config.validation import validate_config
from utils.training.runner import fit

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
ARC_DIR = REPO_ROOT.parent / "shared" / "data" / "arc"
# Data a preset cannot run without (no family's default run needs anything else).
REQUIRED_DATA = {"trm_arc": [f"data.arc_dir={ARC_DIR}"]}


def overrides(experiment: str) -> list[str]:
    return [f"experiment={experiment}", "debug=fast", "trainer.device=cpu", *REQUIRED_DATA.get(experiment, [])]


@pytest.fixture(scope="module")
def debug_fast_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, object]]:
    """Every preset through the real CLI at debug=fast, two at a time."""
    missing = [e for e in REQUIRED_DATA if not ARC_DIR.is_dir()]
    if missing:
        pytest.fail(f"{ARC_DIR} is missing: the contract test of {missing} needs the shared ARC data")
    base = tmp_path_factory.mktemp("contract")
    commands = {e: ["train.py", *overrides(e), *paths(base / e, base / "datasets")] for e in EXPERIMENTS}
    results = run_parallel(commands, timeout=400, max_parallel=2)
    return {e: (base / e, results[e]) for e in EXPERIMENTS}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_preset_composes_and_validates(experiment: str) -> None:
    for extra in ([], ["debug=fast"]):
        cfg = validate_config(compose_config(f"experiment={experiment}", "run_name=contract", *extra,
                                             *REQUIRED_DATA.get(experiment, [])))
        assert cfg.model is not None and cfg.data is not None and cfg.loss is not None


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_preset_runs_logs_its_monitor_and_resumes_bitwise(debug_fast_runs, make_cfg, experiment: str) -> None:
    root, result = debug_fast_runs[experiment]
    assert result.returncode == 0, result
    (run_dir,) = [p for p in root.iterdir() if (p / "latest.pt").exists()]
    monitor = load(run_dir / "latest.pt")["config"]["trainer"]["monitor"]
    evaluations = read_metrics(run_dir, "val")
    assert [r["step"] for r in evaluations] == [3, 6]
    assert all(monitor in r for r in evaluations), f"{monitor} not logged: {sorted(evaluations[-1])}"

    # Resume a copy of the run directory from its step-3 checkpoint, in this process.
    resumed_dir = root / "resumed"
    shutil.copytree(run_dir, resumed_dir, ignore=shutil.ignore_patterns("latest.pt*", "step_00000006.pt*", "wandb"))
    cfg = compose_config(*overrides(experiment), f"paths.root={root}", f"paths.data_root={root.parent / 'datasets'}",
                         f"paths.run_dir={resumed_dir}", f"run_name={run_dir.name}")
    resumed = fit(cfg)
    assert resumed.state.step == 6
    final, again = load(run_dir / "latest.pt"), load(resumed_dir / "latest.pt")
    for ckpt in (final, again):
        ckpt.pop("logger_run_ids")
        ckpt["config"].pop("paths")
    assert_tensors_equal(final, again, f"{experiment}: latest.pt")
