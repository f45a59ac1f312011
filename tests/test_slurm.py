"""A real sweep on a real (single-node) SLURM cluster through `hydra/launcher=slurm`, with interruptions.

`python pretrain.py -m hydra/launcher=slurm ... optim.lr=1e-3,3e-4` submits a job array of two jobs, one
CPU each, so both train at once. Mid-run:

* the lr=1e-3 job gets `scancel --signal=USR2` (what SLURM sends submitit jobs on pre-emption and before the
  time limit): the trainer finishes its step, saves a checkpoint and passes the signal on to submitit's
  handler, which requeues the job. It restarts, resumes from that checkpoint in the same run directory and
  ends with weights bitwise identical to an uninterrupted run of the same overrides (run locally, no SLURM);
* the lr=3e-4 job gets `scontrol requeue` (SIGTERM, which submitit itself ignores): the trainer saves a
  checkpoint and exits, SLURM requeues it and it resumes too.

Both jobs' return values come back to the sweep (submitit's result files, the sweep summary).

The cluster comes from tests/slurm_cluster.py (installed and started on first use, reused afterwards).
Every wait here is bounded: without accounting, submitit would wait forever for a job that died.
"""

from __future__ import annotations

import csv
import re
import subprocess
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.cli_helpers import (
    REPO_ROOT,
    TINY,
    assert_tensors_equal,
    finish,
    load,
    output_so_far,
    paths,
    read_metrics,
    start,
)
from tests.slurm_cluster import PID_FILES, Cluster, slurm_cluster, stop_started  # noqa: F401 - the session fixture

JOB_NAME = "launcher-test"  # every job the tests submit; cancelled before and after
# Long enough that the signal lands mid-run even on an idle machine (~4 ms a step there: 1000 steps were
# over before `scontrol requeue`'s SIGTERM arrived), short enough under load (~15 ms a step).
STEPS = 4000
INTERRUPT_AT = 150  # interrupt a job once it has logged this many steps
START_TIMEOUT_S = 150  # submission to both jobs at INTERRUPT_AT
FINISH_TIMEOUT_S = 300  # from there to the end of the sweep

# The job: TINY (1-layer width-32 transformer, p=23, batch 64, ~4-15 ms a step on one core), no early stop.
TRAIN = [
    *TINY,
    "trainer.device=cpu",
    f"trainer.max_steps={STEPS}",
    "trainer.eval_interval=100",
    "trainer.log_interval=1",
    "trainer.early_stopping.enabled=false",
    "run_name=sweep",
]
# timeout_min >= 13: submitit counts a SIGUSR2 in the first min(0.8 T, T - 10 min) of a job as a pre-emption
# and later ones as time-outs. signal_delay_s is SLURM's warning before the time limit (not reached here).
# One CPU per job: both jobs run at once on a 2-core node.
LAUNCHER = [
    "hydra/launcher=slurm",
    "hydra.launcher.timeout_min=15",
    "hydra.launcher.signal_delay_s=30",
    "hydra.launcher.cpus_per_task=1",
    f"hydra.launcher.name={JOB_NAME}",
]


def _events(run_dir: Path, name: str) -> list[dict]:
    return [m for m in read_metrics(run_dir, "event") if m.get("event") == name]


def _max_train_step(run_dir: Path | None) -> int:
    steps = [m["step"] for m in read_metrics(run_dir, "train")] if run_dir is not None else []
    return max(steps) if steps else 0


def _job_dir(sweep_dir: Path, lr: str) -> Path | None:
    found = [p for p in sweep_dir.glob(f"*optim.lr={lr},*") if p.is_dir()]
    return found[0] if found else None


def _slurm_job_id(run_dir: Path) -> str:
    """The launcher records the SLURM job id (an array task, e.g. "7_0") in the job's Hydra config."""
    job_id = str(OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.job.id)
    assert re.fullmatch(r"\d+_\d+", job_id), job_id
    return job_id


def _submitit_logs(sweep_dir: Path, job_id: str) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((sweep_dir / ".submitit" / job_id).glob("*_log.*")))


def _diagnostics(cluster: Cluster, sweep_dir: Path, sweep: subprocess.Popen) -> str:
    parts = [f"squeue:\n{cluster.queue()}", f"sweep output (tail):\n{output_so_far(sweep)[-3000:]}"]
    for log in sorted((sweep_dir / ".submitit").glob("*/*_log.*")):
        parts.append(f"{log}:\n{log.read_text(errors='replace')[-2500:]}")
    return "\n\n".join(parts)


def _comparable(ckpt: dict) -> dict:
    """A checkpoint without what depends on where the run wrote (paths); RNG states included."""
    out = {k: v for k, v in ckpt.items() if k != "config"}
    out["config"] = {k: v for k, v in ckpt["config"].items() if k != "paths"}
    return out


@pytest.fixture
def own_jobs(slurm_cluster: Cluster):  # noqa: F811 - pytest fixture injection
    slurm_cluster.cancel(name=JOB_NAME)  # leftovers of an interrupted earlier run would hold the CPUs
    yield slurm_cluster
    slurm_cluster.cancel(name=JOB_NAME)


def test_sweep_on_slurm_is_requeued_after_preemption_and_resumes_exactly(own_jobs: Cluster, tmp_path: Path):
    cluster = own_jobs
    t0 = time.monotonic()
    root, data_root, ref_root = tmp_path / "ck", tmp_path / "ds", tmp_path / "reference"
    sweep_dir = root / "sweep_multirun"
    sweep = start("pretrain.py", "-m", *LAUNCHER, *TRAIN, *paths(root, data_root), "optim.lr=1e-3,3e-4")
    reference = None
    try:
        # ---- each job, once it has trained INTERRUPT_AT steps: the lr=1e-3 one is pre-empted (USR2), the
        # lr=3e-4 one requeued (SIGTERM); the uninterrupted reference (same overrides as the USR2 job, no
        # SLURM) starts meanwhile. Their states and restarts in SLURM are watched until the sweep ends.
        jobs = {"usr2": {"lr": "0.001"}, "requeue": {"lr": "0.0003"}}
        for j in jobs.values():
            j["restarts"], j["states"] = 0, []
        deadline = time.monotonic() + START_TIMEOUT_S + FINISH_TIMEOUT_S
        while sweep.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail(f"the sweep did not finish in {START_TIMEOUT_S + FINISH_TIMEOUT_S}s ({jobs})\n"
                            f"{_diagnostics(cluster, sweep_dir, sweep)}")
            for kind, j in jobs.items():
                j["dir"] = j.get("dir") or _job_dir(sweep_dir, j["lr"])
                if "job_id" not in j and _max_train_step(j["dir"]) >= INTERRUPT_AT:
                    j["job_id"] = _slurm_job_id(j["dir"])
                    j["signalled_at_step"] = _max_train_step(j["dir"])
                    if kind == "usr2":
                        Cluster.cmd("scancel", "--signal=USR2", j["job_id"])
                        reference = start("pretrain.py", *TRAIN, *paths(ref_root, data_root), "optim.lr=1e-3")
                    else:
                        Cluster.cmd("scontrol", "requeue", j["job_id"])
                    j["t_signal"] = time.monotonic() - t0
                fields = cluster.job_fields(j["job_id"]) if "job_id" in j else {}
                if fields:
                    j["restarts"] = max(j["restarts"], int(fields.get("Restarts", "0")))
                    if not j["states"] or j["states"][-1] != fields.get("JobState"):
                        j["states"].append(fields.get("JobState"))
            time.sleep(0.05)
        result = finish(sweep)
        t_sweep = time.monotonic() - t0
        assert all("job_id" in j for j in jobs.values()), f"a job ended before step {INTERRUPT_AT}: {jobs}\n{result}"
        ref_result = finish(reference, timeout=300)
    finally:
        for proc in (sweep, reference):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert result.returncode == 0, f"{result}\n{_diagnostics(cluster, sweep_dir, sweep)}"
    assert ref_result.returncode == 0, ref_result

    for kind, j in jobs.items():
        run_dir, job_id = j["dir"], j["job_id"]
        sig = "SIGUSR2" if kind == "usr2" else "SIGTERM"
        train_log = (run_dir / "train.log").read_text()
        logs = _submitit_logs(sweep_dir, job_id)

        # ---- requeued by SLURM once, after the trainer's checkpoint
        j["restarts"] = max(j["restarts"], int(cluster.job_fields(job_id).get("Restarts", "0")))
        assert j["restarts"] == 1, f"{kind}: {j}\n{logs[-4000:]}"
        assert f"{sig} received: finishing the current step" in train_log, train_log[-3000:]
        if kind == "usr2":  # submitit's handler requeued it, as a pre-emption (not a time-out)
            assert ("passing SIGUSR2 on to the handler installed before training "
                    "(SignalHandler.checkpoint_and_try_requeue)") in train_log, train_log[-3000:]
            assert "Caught signal SIGUSR2" in logs and "this job is preempted" in logs, logs[-4000:]
            assert f"Requeued job {job_id}" in logs, logs[-4000:]

        # ---- resumed from the checkpoint of the step it was interrupted at, in the same run directory
        starts = [e["resumed_from_step"] for e in _events(run_dir, "start")]
        stops = [(e["step"], e["reason"]) for e in _events(run_dir, "stop")]
        assert len(starts) == 2 and starts[0] == 0, (kind, starts)
        j["resumed"] = resumed = starts[1]
        assert resumed >= j["signalled_at_step"] > 0, (kind, resumed, j["signalled_at_step"])
        assert resumed - j["signalled_at_step"] < 100, (kind, resumed, j["signalled_at_step"])
        assert stops == [(resumed, f"interrupted by {sig}"), (STEPS, f"max_steps={STEPS} reached")], (kind, stops)
        assert f"Resumed from {run_dir / 'latest.pt'} at step {resumed}" in train_log, train_log[-3000:]
        assert [m["step"] for m in read_metrics(run_dir, "train")] == list(range(1, STEPS + 1)), kind

        # ---- its return value (the best val/acc) reached the sweep
        from submitit.core.utils import pickle_load

        outcome, job_return = pickle_load(sweep_dir / ".submitit" / job_id / f"{job_id}_0_result.pkl")
        assert outcome == "success", job_return
        j["best"] = best = load(run_dir / "latest.pt")["train_state"]["best_metric"]
        assert best is not None and job_return.return_value == best, (kind, job_return.return_value, best)
        assert f"Best val/acc = {best:.6g}" in train_log

    # ---- the pre-empted job ends exactly where the uninterrupted one does
    victim = load(jobs["usr2"]["dir"] / "latest.pt")
    ref = load(ref_root / "sweep" / "latest.pt")
    assert victim["train_state"]["step"] == STEPS
    assert_tensors_equal(victim["model"], ref["model"], "model")
    assert assert_tensors_equal(_comparable(victim), _comparable(ref), "checkpoint") > 10

    # ---- the sweep's summary lists both jobs as completed, with their metric
    summary = sweep_dir / "summary.tsv"
    if summary.exists():  # written by the sweep_summary callback (conf/config.yaml)
        rows = {r["optim.lr"]: r for r in csv.DictReader(summary.open(), delimiter="\t")}
        for j in jobs.values():
            assert rows[j["lr"]]["status"] == "COMPLETED", rows
            assert abs(float(rows[j["lr"]]["val/acc"]) - j["best"]) < 1e-5, rows
        assert "Sweep summary" in result.output, result

    print(f"\n[test_slurm] cluster {cluster.timings or 'reused'}; sweep done in {t_sweep:.0f}s")
    for kind, j in jobs.items():
        print(f"[test_slurm] {kind}: job {j['job_id']} interrupted at step >= {j['signalled_at_step']} "
              f"({j['t_signal']:.0f}s), states {j['states']}, Restarts={j['restarts']}, resumed at step {j['resumed']}, "
              f"best val/acc {j['best']:.6g}")


# The job of test_a_two_task_job_trains_as_one_two_process_torchrun_run: two tasks (ranks) of one CPU each.
TWO_TASKS = [
    "hydra/launcher=slurm_multinode",
    "hydra.launcher.nodes=1",  # one machine here; the preset's 2 nodes need a second one
    "hydra.launcher.tasks_per_node=2",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.timeout_min=15",
    f"hydra.launcher.name={JOB_NAME}",
]


@pytest.mark.slow  # 51-62 s here (2 shared cores): Python start-ups, the two runs and submitit's queue polling
def test_a_two_task_job_trains_as_one_two_process_torchrun_run(own_jobs: Cluster, tmp_path: Path):
    """`hydra/launcher=slurm_multinode` with one node of two tasks: srun starts two ranks, which find each
    other from the step's variables (no torchrun) and train as `torchrun --nproc_per_node=2` does: the same
    losses within the tolerance of tests/test_distributed.py, the same validation accuracy (measured: no
    difference at all, both are the same 2 ranks with gloo)."""
    import math

    from tests.test_distributed import ATOL, COMPARE, RTOL, TORCHRUN

    cluster = own_jobs
    root, data_root, ref_root = tmp_path / "ck", tmp_path / "ds", tmp_path / "torchrun"
    prep = start("train.py", "--dataset-only", *COMPARE, *paths(tmp_path / "prep", data_root))
    assert finish(prep).returncode == 0
    sweep = start("pretrain.py", "-m", *TWO_TASKS, *COMPARE, *paths(root, data_root))
    reference = start(*TORCHRUN, "pretrain.py", *COMPARE, *paths(ref_root, data_root))
    sweep_dir = root / "default_multirun"
    try:
        result = finish(sweep, timeout=240)
        ref_result = finish(reference, timeout=240)
    except AssertionError as err:
        raise AssertionError(f"{err}\n{_diagnostics(cluster, sweep_dir, sweep)}") from None
    finally:
        for proc in (sweep, reference):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert result.returncode == 0, f"{result}\n{_diagnostics(cluster, sweep_dir, sweep)}"
    assert ref_result.returncode == 0, ref_result
    (job_dir,) = [p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    (submitit_dir,) = [p for p in (sweep_dir / ".submitit").iterdir() if p.is_dir()]  # the job's, named by its id
    # one SLURM job of two tasks, each a rank of one process group
    assert sorted(p.name.split("_log")[0] for p in submitit_dir.glob("*_log.out")) == [
        f"{submitit_dir.name}_0", f"{submitit_dir.name}_1"]
    train_log = (job_dir / "train.log").read_text()
    assert "Training default on cpu x2: steps 0 -> 40, batch 32 per rank" in train_log, train_log[-3000:]
    assert "[rank1]" not in train_log
    assert load(job_dir / "latest.pt")["world_size"] == 2
    for kind, key in (("train", "train/loss"), ("val", "val/loss"), ("val", "val/acc")):
        a = {r["step"]: r[key] for r in read_metrics(job_dir, kind)}
        b = {r["step"]: r[key] for r in read_metrics(ref_root / "default", kind)}
        assert sorted(a) == sorted(b) == (list(range(1, 41)) if kind == "train" else [10, 20, 30, 40]), (a, b)
        bad = [s for s in a if not math.isclose(a[s], b[s], rel_tol=RTOL, abs_tol=ATOL)]
        assert not bad, f"{key} differs at steps {bad[:5]}: {[(a[s], b[s]) for s in bad[:5]]}"
        print(f"[test_slurm] 2 SLURM tasks vs torchrun x2: {key} max |diff| = {max(abs(a[s] - b[s]) for s in a):.2e}")


@pytest.mark.parametrize(("preset", "target"), [("slurm", "SlurmLauncher"), ("local", "LocalLauncher"),
                                                ("slurm_multinode", "SlurmLauncher")])
def test_launcher_presets_extend_the_plugin_configs(preset, target):
    """conf/hydra/launcher/<preset>.yaml: our values on top of the plugin's submitit_slurm / submitit_local."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", [f"hydra/launcher={preset}", "hydra.launcher.timeout_min=7"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == f"hydra_plugins.hydra_submitit_launcher.submitit_launcher.{target}"
    assert launcher.timeout_min == 7
    assert OmegaConf.to_container(launcher)["submitit_folder"] == "${hydra.sweep.dir}/.submitit/%j"  # the plugin's
    if preset.startswith("slurm"):  # slurm_multinode builds on slurm
        assert launcher.max_num_timeout > 0 and launcher.signal_delay_s == 120 and launcher.partition is None
    if preset == "slurm_multinode":  # one task (rank) per GPU on each of 2 nodes
        assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 4, 4)
        with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", [f"hydra/launcher={preset}", "hydra.launcher.gpus_per_node=8"],
                          return_hydra_config=True)
        assert cfg.hydra.launcher.tasks_per_node == 8
    else:
        assert launcher.tasks_per_node == 1 and launcher.nodes == 1


# ----------------------------------------------------------- in this process, no cluster: the pieces it relies on
def test_the_session_stops_only_the_daemons_it_started(tmp_path: Path):
    """The slurm_cluster fixture's finalizer, on stand-in daemons (sleep processes named by pid files):
    what ensure_cluster started is stopped; what was running before, and a reused cluster, are left alone."""
    started_by_tests = subprocess.Popen(["sleep", "120"])
    running_before = subprocess.Popen(["sleep", "120"])
    try:
        pid_files = {name: tmp_path / f"{name}.pid" for name in PID_FILES}
        pid_files["slurmd"].write_text(f"{started_by_tests.pid}\n")
        pid_files["slurmctld"].write_text(f"{running_before.pid}\n")
        # munged is listed as started, but its pid file names no process (it already exited): skipped.
        assert stop_started(Cluster(node="n", started=["munged", "slurmd"]), pid_files) == ["slurmd"]
        assert started_by_tests.wait(timeout=10) == -15  # SIGTERM, as the daemons are stopped
        assert running_before.poll() is None
        assert stop_started(Cluster(node="n", reused=True), pid_files) == []  # was up before: left as it was
        assert running_before.poll() is None
    finally:
        for proc in (started_by_tests, running_before):
            proc.kill()
            proc.wait()


def test_graceful_shutdown_passes_the_signal_on_to_the_handler_installed_before():
    import os
    import signal

    from utils.signals import GracefulShutdown

    calls: list[int] = []
    before = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))  # submitit's place
    try:
        with GracefulShutdown() as shutdown:
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.01)  # Python runs the handler between bytecodes of the main thread
            assert shutdown.requested and shutdown.signal_name == "SIGUSR2" and calls == []
        assert shutdown.chain_previous() is True
        assert calls == [signal.SIGUSR2]
        # Python's own SIGINT handler (KeyboardInterrupt) and SIG_DFL are never chained
        with GracefulShutdown() as shutdown:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
        assert shutdown.requested and shutdown.chain_previous() is False
    finally:
        signal.signal(signal.SIGUSR2, before)


def test_an_interrupted_fit_saves_its_checkpoint_before_passing_the_signal_on(tmp_path: Path, make_cfg):
    """What submitit's SIGUSR2 handler sees when the trainer hands it the signal: the checkpoint is on disk."""
    import os
    import signal
    import threading

    import pretrain
    from utils.training.trainer import TrainingInterrupted

    cfg = make_cfg(tmp_path, "trainer.max_steps=100000", "trainer.eval_interval=100000")
    run_dir = tmp_path / "ck" / "test"
    seen: list[int] = []

    def submitit_like(signum, frame):  # records the newest checkpoint's step when it is called
        seen.append(load(run_dir / "latest.pt")["train_state"]["step"])

    def send_when_training():
        deadline = time.monotonic() + 120
        while not read_metrics(run_dir, "train") and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGUSR2)

    before = signal.signal(signal.SIGUSR2, submitit_like)
    sender = threading.Thread(target=send_when_training, daemon=True)
    try:
        sender.start()
        with pytest.raises(TrainingInterrupted, match="interrupted by SIGUSR2"):
            pretrain.fit(cfg)
    finally:
        sender.join(5)
        signal.signal(signal.SIGUSR2, before)
    stop = [e for e in read_metrics(run_dir, "event") if e["event"] == "stop"][-1]
    assert seen == [stop["step"]] and stop["step"] >= 1, (seen, stop)


def test_a_requeued_job_that_had_stopped_early_just_returns_its_metric(tmp_path: Path, make_cfg):
    """SLURM may requeue a job after its last step: the rerun must not train on past early stopping."""
    import pretrain

    overrides = ("trainer.max_steps=200", "trainer.eval_interval=5", "trainer.early_stopping.enabled=true",
                 "trainer.early_stopping.stop_at=0.0")  # val/acc >= 0 at the first evaluation
    first = pretrain.fit(make_cfg(tmp_path, *overrides))
    assert first.state.step == 5 and "reached" in first.state.stop_reason, first.state.stop_reason
    again = pretrain.fit(make_cfg(tmp_path, *overrides))
    assert again.state.step == 5 and again.state.stop_reason.startswith("already finished"), again.state.stop_reason
    assert again.metric == first.metric
    assert [m["step"] for m in read_metrics(tmp_path / "ck" / "test", "train")] == [1, 2, 3, 4, 5]
