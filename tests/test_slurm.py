"""A real sweep on a real (single-node) SLURM cluster through `hydra/launcher=slurm`, with a pre-emption.

`python pretrain.py -m hydra/launcher=slurm ... optim.lr=1e-3,3e-4` submits a job array of two jobs. While
both train, the lr=1e-3 job gets `scancel --signal=USR2` (what SLURM sends on pre-emption / before the time
limit for submitit jobs). The trainer finishes its step, saves a checkpoint and passes the signal on to
submitit's handler, which requeues the job; SLURM starts it again, it resumes from that checkpoint in the
same run directory and finishes with weights bitwise identical to an uninterrupted run of the same
overrides (run locally, no SLURM). Both jobs' returned metrics come back to the sweep.

The cluster comes from tests/slurm_cluster.py (installed and started on first use, reused afterwards).
Every wait here is bounded: without accounting, submitit would wait forever for a job that died.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.cli_helpers import (
    ENV,
    REPO_ROOT,
    TINY,
    assert_tensors_equal,
    command,
    finish,
    load,
    output_so_far,
    paths,
    read_metrics,
    start,
)
from tests.slurm_cluster import Cluster, slurm_cluster  # noqa: F401 - the session fixture

JOB_NAME = "launcher-test"  # every job the tests submit; cancelled before and after
STEPS = 1000
PREEMPT_AT = 150  # signal the victim once it has logged this many steps
SWEEP_TIMEOUT_S = 240

# The job: TINY (1-layer width-32 transformer, p=23, batch 64, ~15 ms a step on one core), no early stop.
TRAIN = [
    *TINY,
    "trainer.device=cpu",
    f"trainer.max_steps={STEPS}",
    "trainer.eval_interval=100",
    "trainer.log_interval=1",
    "trainer.early_stopping.enabled=false",
    "run_name=sweep",
]
# timeout_min >= 13: submitit counts any SIGUSR2 in the first min(0.8 T, T - 10 min) of a job as a pre-emption
# and later ones as time-outs (only max_num_timeout of those are requeued). signal_delay_s is SLURM's warning
# before the time limit (not reached here). One CPU per job: both jobs run at once on a 2-core node.
LAUNCHER = [
    "hydra/launcher=slurm",
    "hydra.launcher.timeout_min=15",
    "hydra.launcher.signal_delay_s=30",
    "hydra.launcher.cpus_per_task=1",
    f"hydra.launcher.name={JOB_NAME}",
]


def _events(run_dir: Path, name: str) -> list[dict]:
    return [m for m in read_metrics(run_dir, "event") if m.get("event") == name]


def _max_train_step(run_dir: Path) -> int:
    steps = [m["step"] for m in read_metrics(run_dir, "train")]
    return max(steps) if steps else 0


def _job_dir(sweep_dir: Path, lr: str) -> Path | None:
    found = [p for p in sweep_dir.glob(f"*optim.lr={lr},*") if p.is_dir()]
    return found[0] if found else None


def _submitit_logs(sweep_dir: Path, job_id: str) -> str:
    folder = sweep_dir / ".submitit" / job_id
    return "\n".join(p.read_text(errors="replace") for p in sorted(folder.glob("*_log.*")))


def _diagnostics(cluster: Cluster, sweep_dir: Path, sweep: subprocess.Popen) -> str:
    parts = [f"squeue:\n{cluster.queue()}", f"sweep output (tail):\n{output_so_far(sweep)[-3000:]}"]
    for log in sorted((sweep_dir / ".submitit").glob("*/*_log.*")):
        parts.append(f"{log}:\n{log.read_text(errors='replace')[-2500:]}")
    return "\n\n".join(parts)


@pytest.fixture
def own_jobs(slurm_cluster: Cluster):  # noqa: F811 - pytest fixture injection
    slurm_cluster.cancel(name=JOB_NAME)  # leftovers of an interrupted earlier run would hold the CPUs
    yield slurm_cluster
    slurm_cluster.cancel(name=JOB_NAME)


def _comparable(ckpt: dict) -> dict:
    """A checkpoint without what depends on where the run wrote (paths), and without the global RNG states:
    a run resumed mid-epoch draws one more number from torch's global generator (the DataLoader's base seed
    when its iterator is created) than an uninterrupted one. Nothing in this job draws from it afterwards
    (no dropout), so weights, optimizer and filter states still match bitwise, which is what is compared."""
    out = {k: v for k, v in ckpt.items() if k not in ("config", "rng_per_rank")}
    out["config"] = {k: v for k, v in ckpt["config"].items() if k != "paths"}
    return out


def test_sweep_on_slurm_survives_preemption_and_resumes_exactly(own_jobs: Cluster, tmp_path: Path):
    cluster = own_jobs
    t0 = time.monotonic()
    root, data_root = tmp_path / "ck", tmp_path / "ds"
    sweep_dir = root / "sweep_multirun"
    sweep = start("pretrain.py", "-m", *LAUNCHER, *TRAIN, *paths(root, data_root), "optim.lr=1e-3,3e-4")
    reference = None
    try:
        # ---- wait for the lr=1e-3 job to train, then pre-empt it
        deadline = time.monotonic() + 120
        victim_dir = None
        while True:
            if sweep.poll() is not None:
                pytest.fail(f"the sweep exited ({sweep.returncode}) before the pre-emption\n"
                            f"{_diagnostics(cluster, sweep_dir, sweep)}")
            if time.monotonic() > deadline:
                pytest.fail(f"the lr=1e-3 job did not reach step {PREEMPT_AT} in 120 s\n"
                            f"{_diagnostics(cluster, sweep_dir, sweep)}")
            victim_dir = victim_dir or _job_dir(sweep_dir, "0.001")
            if victim_dir is not None and _max_train_step(victim_dir) >= PREEMPT_AT:
                break
            time.sleep(0.05)
        # The launcher records the SLURM job id (array task, e.g. "7_0") in the job's Hydra config.
        job_id = str(OmegaConf.load(victim_dir / ".hydra" / "hydra.yaml").hydra.job.id)
        assert re.fullmatch(r"\d+_\d+", job_id), job_id
        signalled_at_step = _max_train_step(victim_dir)
        Cluster.cmd("scancel", "--signal=USR2", job_id)
        t_signal = time.monotonic() - t0

        # ---- the uninterrupted reference (same overrides, no SLURM) runs while the victim is requeued
        ref_root = tmp_path / "reference"
        reference = start("pretrain.py", *TRAIN, *paths(ref_root, data_root), "optim.lr=1e-3")

        # ---- wait for the sweep, watching the victim's restarts in SLURM
        restarts, states = 0, []
        deadline = time.monotonic() + SWEEP_TIMEOUT_S
        while sweep.poll() is None:
            fields = cluster.job_fields(job_id)
            if fields:
                restarts = max(restarts, int(fields.get("Restarts", "0")))
                if not states or states[-1] != fields.get("JobState"):
                    states.append(fields.get("JobState"))
            if time.monotonic() > deadline:
                pytest.fail(f"the sweep did not finish within {SWEEP_TIMEOUT_S}s of the pre-emption "
                            f"(victim {job_id} states {states})\n{_diagnostics(cluster, sweep_dir, sweep)}")
            time.sleep(0.5)
        result = finish(sweep)
        t_sweep = time.monotonic() - t0
        ref_result = finish(reference, timeout=180)
    finally:
        for proc in (sweep, reference):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert result.returncode == 0, f"{result}\n{_diagnostics(cluster, sweep_dir, sweep)}"
    assert ref_result.returncode == 0, ref_result

    # ---- requeued by SLURM (submitit's handler ran after our checkpoint), not failed or timed out
    final = cluster.job_fields(job_id)
    restarts = max(restarts, int(final.get("Restarts", "0")))
    logs = _submitit_logs(sweep_dir, job_id)
    assert restarts == 1, f"Restarts={restarts}, states {states}\n{logs[-4000:]}"
    assert "Caught signal SIGUSR2" in logs and "this job is preempted" in logs, logs[-4000:]
    assert f"Requeued job {job_id}" in logs, logs[-4000:]
    train_log = (victim_dir / "train.log").read_text()
    assert "SIGUSR2 received: finishing the current step" in train_log, train_log[-3000:]
    assert "passing SIGUSR2 on to the handler installed before training (SignalHandler.checkpoint_and_try_requeue)" \
        in train_log, train_log[-3000:]

    # ---- resumed from the checkpoint of the interrupted step, in the same run directory
    starts = [e["resumed_from_step"] for e in _events(victim_dir, "start")]
    stops = [(e["step"], e["reason"]) for e in _events(victim_dir, "stop")]
    assert len(starts) == 2 and starts[0] == 0, starts
    resumed = starts[1]
    assert resumed >= signalled_at_step > 0, (resumed, signalled_at_step)
    assert resumed - signalled_at_step < 100, f"signal at step >= {signalled_at_step}, checkpoint at {resumed}"
    assert stops == [(resumed, "interrupted by SIGUSR2"), (STEPS, f"max_steps={STEPS} reached")], stops
    assert f"Resumed from {victim_dir / 'latest.pt'} at step {resumed}" in train_log, train_log[-3000:]
    assert [m["step"] for m in read_metrics(victim_dir, "train")] == list(range(1, STEPS + 1))

    # ---- the other job ran once, untouched
    other_dir = _job_dir(sweep_dir, "0.0003")
    assert [e["resumed_from_step"] for e in _events(other_dir, "start")] == [0]

    # ---- same final state as the uninterrupted run, bitwise
    victim_ckpt = load(victim_dir / "latest.pt")
    ref_ckpt = load(ref_root / "sweep" / "latest.pt")
    assert victim_ckpt["trainer"]["step"] == STEPS
    assert_tensors_equal(victim_ckpt["model"], ref_ckpt["model"], "model")
    n = assert_tensors_equal(_comparable(victim_ckpt), _comparable(ref_ckpt), "checkpoint")
    assert n > 10

    # ---- the sweep got each job's return value (the best val/acc), the requeued one included
    from submitit.core.utils import pickle_load

    for run_dir in (victim_dir, other_dir):
        jid = str(OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.job.id)
        outcome, job_return = pickle_load(sweep_dir / ".submitit" / jid / f"{jid}_0_result.pkl")
        assert outcome == "success", job_return
        best = load(run_dir / "latest.pt")["trainer"]["best_metric"]
        assert job_return.return_value == best, (jid, job_return.return_value, best)
        assert f"Best val/acc = {best:.6g}" in (run_dir / "train.log").read_text()
    assert job_return.return_value is not None
    print(f"\n[test_slurm] victim {job_id}: USR2 at step >= {signalled_at_step} ({t_signal:.0f}s), "
          f"requeued (Restarts={restarts}, states {states}), resumed at step {resumed}; sweep done in {t_sweep:.0f}s; "
          f"cluster {cluster.timings}")


@pytest.mark.parametrize(("preset", "target"), [("slurm", "SlurmLauncher"), ("local", "LocalLauncher")])
def test_launcher_presets_extend_the_plugin_configs(preset, target):
    """conf/hydra/launcher/<preset>.yaml: our values on top of the plugin's submitit_slurm / submitit_local."""
    out = subprocess.run(
        command("pretrain.py", f"hydra/launcher={preset}", "hydra.launcher.timeout_min=7", "--cfg", "hydra",
                "-p", "hydra.launcher"),
        cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert cfg._target_ == f"hydra_plugins.hydra_submitit_launcher.submitit_launcher.{target}"
    assert cfg.timeout_min == 7 and cfg.tasks_per_node == 1
    assert cfg.submitit_folder == "${hydra.sweep.dir}/.submitit/%j"  # from the plugin
    if preset == "slurm":
        assert cfg.max_num_timeout > 0 and cfg.signal_delay_s == 120 and "partition" in cfg
