"""Sweeps end to end: `python pretrain.py -m ...` in subprocesses, tiny debug-sized jobs (~1 minute in all).

* A 2x2 grid: one deterministic directory per job, a summary table of the monitored metric (printed and
  in <sweep dir>/summary.tsv, from the utils.monitoring.sweep_summary callback); the same command again resumes
  every job (no new training) and reports the same table.
* `hparams_search=grokking_optuna`: the Optuna sweeper runs its trials and writes optimization_results.yaml;
  a failing trial is recorded as FAILED and the study goes on.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from tests.cli_helpers import (
    REPO_ROOT,
    load,
    paths,
    read_metrics,
    run,
    run_parallel,
    train_steps,
)

SMALL = ["debug=fast", "model.num_layers=1", "data.p=23", "trainer.device=cpu"]  # 6 steps, evaluated at 3 and 6
GRID = ["pretrain.py", "-m", "optim.lr=1e-3,3e-4", "model.width=32,64", *SMALL]
GRID_DIRS = {
    f"data.p=23,model.num_layers=1,model.width={width},optim.lr={lr},trainer.device=cpu": (width, lr)
    for width in (32, 64)
    for lr in (0.001, 0.0003)
}
OPTUNA = ["pretrain.py", "-m", "hparams_search=grokking_optuna", "hydra.sweeper.n_trials=3", "model.width=32",
          *SMALL]
SEARCHED = {"optim.lr", "optim.weight_decay", "grad_filter.lamb", "grad_filter.alpha"}
# Three trials over one categorical parameter, TPE seed 0: they draw 100000, 32, 100000 (optuna 2.10). A batch
# larger than the training set is a config error, so trials 0 and 2 fail.
FAILING = ["pretrain.py", "-m", "hparams_search=grokking_optuna", "hydra.sweeper.n_trials=3",
           "hydra.sweeper.params=null", "trainer.global_batch_size=choice(32,100000)", "model.width=32", *SMALL]
# submitit's local executor (each job a subprocess) over a group that the experiment's run_name derives from
# (`grokking_${data.operation}_${hydra:runtime.choices.grad_filter}`): one sweep dir, one table.
SUBMITIT = ["pretrain.py", "-m", "hydra/launcher=local", "experiment=grokking", "grad_filter=none,grokfast_ema",
            "model.width=32", *SMALL]


def read_summary(sweep_dir: Path) -> list[dict[str, str]]:
    with open(sweep_dir / "summary.tsv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    base = tmp_path_factory.mktemp("sweeps")
    data_root = base / "ds"
    prep = run("train.py", "--dataset-only", *SMALL, *paths(base / "prep", data_root))
    assert prep.returncode == 0, prep
    roots = {name: base / name for name in ("grid", "optuna", "failing", "submitit")}
    first = run_parallel({
        "grid": [*GRID, *paths(roots["grid"], data_root)],
        "optuna": [*OPTUNA, *paths(roots["optuna"], data_root)],
        "failing": [*FAILING, *paths(roots["failing"], data_root)],
        "submitit": [*SUBMITIT, *paths(roots["submitit"], data_root)],
    }, max_parallel=4)
    grid_dir = roots["grid"] / "default_multirun"
    first_summary = read_summary(grid_dir) if (grid_dir / "summary.tsv").exists() else None
    again = run(*GRID, *paths(roots["grid"], data_root))  # the same command: every job resumes
    return {"roots": roots, "first": first, "first_summary": first_summary, "again": again, "grid_dir": grid_dir}


# ------------------------------------------------------------------------------------------ grid
def test_grid_sweep_runs_every_combination_in_its_own_deterministic_dir(sweeps):
    result = sweeps["first"]["grid"]
    assert result.returncode == 0, result
    sweep_dir = sweeps["grid_dir"]
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == sorted(GRID_DIRS), sorted(sweep_dir.iterdir())
    for name, (width, lr) in GRID_DIRS.items():
        ckpt = load(sweep_dir / name / "latest.pt")
        assert ckpt["train_state"]["step"] == 6
        assert ckpt["config"]["optim"]["lr"] == lr and ckpt["config"]["model"]["width"] == width
        assert ckpt["config"]["paths"]["run_dir"] == str(sweep_dir / name)


def test_grid_sweep_ends_with_a_summary_table_of_the_monitored_metric(sweeps):
    result, rows = sweeps["first"]["grid"], sweeps["first_summary"]
    assert "Sweep summary (4 jobs" in result.output, result
    assert rows is not None and len(rows) == 4, rows
    assert list(rows[0]) == ["job", "optim.lr", "model.width", "val/acc", "status", "error", "run_dir"]
    assert sorted((r["model.width"], r["optim.lr"]) for r in rows) == sorted(
        (str(w), str(lr)) for w, lr in GRID_DIRS.values())
    for r in rows:
        assert r["status"] == "COMPLETED" and r["error"] == ""
        ckpt = load(Path(r["run_dir"]) / "latest.pt")
        # the table holds what pretrain.run returned: the best val/acc of that job
        assert float(r["val/acc"]) == ckpt["train_state"]["best_metric"]
        assert 0.0 <= float(r["val/acc"]) <= 1.0
    table = result.output[result.output.index("Sweep summary (4 jobs"):].splitlines()
    assert table[1].split() == ["job", "optim.lr", "model.width", "val/acc", "status", "error"], table
    assert sum(line.startswith("* ") for line in table[2:6]) == 1, "the best job is marked"


def test_rerunning_the_same_sweep_resumes_every_job_without_training(sweeps):
    again = sweeps["again"]
    assert again.returncode == 0, again
    assert again.output.count("Resumed from") == 4, again
    for name in GRID_DIRS:
        job_dir = sweeps["grid_dir"] / name
        starts = [r for r in read_metrics(job_dir, "event") if r["event"] == "start"]
        assert [s["resumed_from_step"] for s in starts] == [0, 6], starts
        assert train_steps(job_dir) == [1, 2, 3, 4, 5, 6], "no step may be trained twice"
    # the same table: each resumed job returns the best metric stored in its checkpoint
    before = {r["run_dir"]: r["val/acc"] for r in sweeps["first_summary"]}
    after = {r["run_dir"]: r["val/acc"] for r in read_summary(sweeps["grid_dir"])}
    assert after == before


# ------------------------------------------------------------------------------------------ optuna
def test_optuna_search_runs_its_trials_and_reports_the_best(sweeps):
    result = sweeps["first"]["optuna"]
    assert result.returncode == 0, result
    sweep_dir = sweeps["roots"]["optuna"] / "grokking_optuna_multirun"
    trials = [p for p in sweep_dir.iterdir() if (p / "latest.pt").exists()]
    assert len(trials) == 3, sorted(sweep_dir.iterdir())
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert best["name"] == "optuna" and set(best["best_params"]) == SEARCHED, best
    assert 1e-4 <= best["best_params"]["optim.lr"] <= 1e-2
    assert 0.8 <= best["best_params"]["grad_filter.alpha"] <= 0.99
    rows = read_summary(sweep_dir)
    assert len(rows) == 3 and all(r["status"] == "COMPLETED" for r in rows), rows
    assert best["best_value"] == max(float(r["val/acc"]) for r in rows)
    for path in trials:  # each trial trained the grokking experiment with the parameters in its dir name
        cfg = load(path / "latest.pt")["config"]
        assert cfg["run_name"] == "grokking_optuna" and cfg["trainer"]["monitor"] == "val/acc"
        assert f"optim.lr={cfg['optim']['lr']}" in path.name
        assert f"grad_filter.lamb={cfg['grad_filter']['lamb']}" in path.name


@pytest.mark.parametrize(("mode", "direction"), [("max", "maximize"), ("min", "minimize")])
def test_optuna_direction_follows_the_monitor_mode(mode, direction):
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", ["hparams_search=grokking_optuna", f"trainer.monitor_mode={mode}"],
                      return_hydra_config=True)
    assert cfg.hydra.sweeper.direction == direction
    assert cfg.hydra.sweeper.sampler.seed == 0 and cfg.hydra.sweeper.n_trials == 20
    assert cfg.hydra.sweeper.max_failure_rate == 1.0


def test_a_failing_optuna_trial_does_not_stop_the_study(sweeps):
    result = sweeps["first"]["failing"]
    assert result.returncode == 0, result
    assert result.output.count("Failed experiment: The training set has 253 examples") == 2, result
    sweep_dir = sweeps["roots"]["failing"] / "grokking_optuna_multirun"
    rows = read_summary(sweep_dir)
    assert [(r["job"], r["trainer.global_batch_size"], r["status"]) for r in rows] == [
        ("0", "100000", "FAILED"), ("1", "32", "COMPLETED"), ("2", "100000", "FAILED")], rows
    assert rows[0]["error"].startswith("ConfigError: The training set has 253 examples")
    assert rows[0]["val/acc"] == "" and math.isfinite(float(rows[1]["val/acc"]))
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert best["best_params"] == {"trainer.global_batch_size": 32}


# ------------------------------------------------------------------------------------------ submitit
def test_summary_works_with_submitit_jobs_and_a_run_name_from_a_swept_group(sweeps):
    result = sweeps["first"]["submitit"]
    assert result.returncode == 0, result
    root = sweeps["roots"]["submitit"]
    assert sorted(p.name for p in root.iterdir()) == ["grokking_mul_grokfast_ema_multirun"]  # the sweep's name
    sweep_dir = root / "grokking_mul_grokfast_ema_multirun"
    assert (sweep_dir / ".submitit").is_dir(), "the jobs ran through submitit"
    rows = read_summary(sweep_dir)
    assert [(r["grad_filter"], r["status"]) for r in rows] == [("none", "COMPLETED"), ("grokfast_ema", "COMPLETED")]
    for r in rows:
        job_dir = Path(r["run_dir"])
        assert job_dir.parent == sweep_dir and (job_dir / "latest.pt").exists()
        assert float(r["val/acc"]) == load(job_dir / "latest.pt")["train_state"]["best_metric"]
    assert "Sweep summary (2 jobs" in result.output, result
