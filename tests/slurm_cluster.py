"""A real single-node SLURM cluster for the tests (Debian's Slurm 22.05, no accounting).

`ensure_cluster()` makes one exist on this machine, as root:
1. installs `slurmctld slurmd slurm-client munge` with apt-get when they are missing (an `apt-get update`
   first when the package lists do not know them; services are kept from starting during the install);
2. writes /etc/slurm/slurm.conf for this node (from `slurmd -C`): no cgroups (proctrack/linuxproc,
   task/none), cons_tres, NodeAddr=127.0.0.1, and short timers so a requeued job restarts in seconds
   (AuthInfo=cred_expire=5, sched_interval=2, bf_interval=1, KillWait=5);
3. starts munged, slurmctld and slurmd (as daemons) and waits until `scontrol ping` says UP and
   `sinfo` shows the node idle.
An already running cluster with this configuration is reused as it is. The `slurm_cluster` fixture
stops, at the end of the session, exactly the daemons it started (`Cluster.started`): a cluster that
was up before the tests is left running, one the tests brought up is gone afterwards.

No accounting (slurmdbd + mariadb would add about a minute of installation on a fresh machine): the
tests do not need `sacct`. submitit then only sees results files and logs "Bypassing sacct error" on
its polls; a job that ends without a result (killed, cancelled) would make the sweep wait forever,
so the tests bound every wait themselves and cancel their jobs.

`slurm_cluster` is the session-scoped pytest fixture. It skips, printing why, only where a cluster
cannot be made: not Linux, not root, or no apt-get. With CI=true it fails instead of skipping.

By hand: `python -m tests.slurm_cluster [up|status|down]` (as root; `up` leaves the daemons running, so
the tests that follow reuse them and leave them running too).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "scontrol", "sinfo", "squeue", "sbatch", "srun", "scancel", "munged", "munge")
CONF_DIR = Path("/etc/slurm")
CONF = CONF_DIR / "slurm.conf"
MARKER = "# Written by tests/slurm_cluster.py"
STATE_DIR = Path("/var/spool/slurmctld")
SPOOL_DIR = Path("/var/spool/slurmd")
LOG_DIR = Path("/var/log/slurm")
MUNGE_RUN = Path("/run/munge")
MUNGE_KEY = Path("/etc/munge/munge.key")
PARTITION = "debug"
# Where each daemon writes its pid (slurm.conf below names the first two; munged's is its default).
PID_FILES = {
    "munged": MUNGE_RUN / "munged.pid",
    "slurmctld": Path("/run/slurmctld.pid"),
    "slurmd": Path("/run/slurmd.pid"),
}


class ClusterUnavailable(RuntimeError):
    """A cluster cannot be made on this machine; the message says why."""


@dataclass
class Cluster:
    node: str
    partition: str = PARTITION
    reused: bool = False
    timings: dict[str, float] = field(default_factory=dict)  # seconds per set-up stage
    started: list[str] = field(default_factory=list)  # daemons `ensure_cluster` started, in order (PID_FILES keys)

    @staticmethod
    def cmd(*args: str, check: bool = True, timeout: float = 30) -> str:
        res = subprocess.run(args, check=False, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({res.returncode}): {res.stderr.strip() or res.stdout.strip()}")
        return res.stdout

    def job_fields(self, job_id: str) -> dict[str, str]:
        """`scontrol -o show job <id>` as a dict (JobState, Restarts, ...); empty once the job is forgotten."""
        res = subprocess.run(["scontrol", "-o", "show", "job", job_id], check=False, capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", res.stdout.splitlines()[0] if res.stdout else ""))

    def queue(self) -> str:
        return self.cmd("squeue", "-o", "%.12i %.12j %.9T %.10M %R")

    def cancel(self, *names_or_ids: str, name: str | None = None) -> None:
        if name:
            self.cmd("scancel", "-n", name, check=False)
        if names_or_ids:
            self.cmd("scancel", *names_or_ids, check=False)


# ------------------------------------------------------------------------------------------ helpers
def _run(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=False, capture_output=True, text=True, timeout=timeout, env=env)


def _missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def cannot_run_reason() -> str | None:
    """Why no cluster can be made here (None if it can)."""
    if not sys.platform.startswith("linux"):
        return f"SLURM tests need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        if not _missing_binaries() and _ping_up():
            return None  # someone else's running cluster: usable without root
        return "not root: the SLURM tests need root to install (apt-get) and start a single-node SLURM cluster"
    if _missing_binaries() and shutil.which("apt-get") is None:
        return f"SLURM is not installed ({', '.join(_missing_binaries())} missing) and there is no apt-get to install it"
    return None


def _install(log) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Keep the packages' maintainer scripts from starting daemons with their default (absent) config.
    policy = Path("/usr/sbin/policy-rc.d")
    added_policy = not policy.exists()
    if added_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        lock = ["-o", "DPkg::Lock::Timeout=120"]  # wait for another apt/dpkg (e.g. unattended-upgrades) to finish
        cmd = ["apt-get", *lock, "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
        res = _run(*cmd, env=env)
        if res.returncode != 0:
            last = (res.stderr.strip().splitlines() or ["?"])[-1]
            log(f"apt-get install failed ({last}); running apt-get update first")
            upd = _run("apt-get", *lock, "update", "-q", env=env)
            if upd.returncode != 0:
                raise ClusterUnavailable(f"apt-get update failed:\n{upd.stderr[-2000:]}")
            res = _run(*cmd, env=env)
        if res.returncode != 0:
            raise ClusterUnavailable(f"apt-get install {' '.join(PACKAGES)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    finally:
        if added_policy:
            policy.unlink(missing_ok=True)
    if _missing_binaries():
        raise ClusterUnavailable(f"still missing after apt-get install: {', '.join(_missing_binaries())}")


def _munge_ok() -> bool:
    try:
        enc = subprocess.run(["munge", "-n"], check=False, capture_output=True, timeout=10)
        if enc.returncode != 0:
            return False
        dec = subprocess.run(["unmunge"], input=enc.stdout, check=False, capture_output=True, timeout=10)
        return dec.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _start_munge() -> bool:
    """Make munge work; True when that took starting munged."""
    if _munge_ok():
        return False
    MUNGE_RUN.mkdir(parents=True, exist_ok=True)
    shutil.chown(MUNGE_RUN, "munge", "munge")
    MUNGE_RUN.chmod(0o755)
    if not MUNGE_KEY.exists():
        res = _run("mungekey", "--create", "--keyfile", str(MUNGE_KEY))
        if res.returncode != 0:
            raise ClusterUnavailable(f"could not create {MUNGE_KEY}: {res.stderr}")
        shutil.chown(MUNGE_KEY, "munge", "munge")
        MUNGE_KEY.chmod(0o400)
    stale = MUNGE_RUN / "munge.socket.2.lock"  # left by a munged that was killed
    if stale.exists() and not _munge_ok():
        stale.unlink(missing_ok=True)
    res = _run("runuser", "-u", "munge", "--", "/usr/sbin/munged", timeout=30)
    if res.returncode != 0:
        raise ClusterUnavailable(f"munged did not start: {res.stderr.strip()}")
    _wait(_munge_ok, 15, "munge to work")
    return True


def _node_line(node: str) -> str:
    """The NodeName line from `slurmd -C`: topology as detected, RealMemory a little below what it reports."""
    out = _run("slurmd", "-C", timeout=30).stdout
    fields = dict(re.findall(r"(\w+)=(\S+)", out.splitlines()[0] if out else ""))
    if "CPUs" not in fields:
        raise ClusterUnavailable(f"`slurmd -C` gave no node description: {out!r}")
    keys = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
    topo = " ".join(f"{k}={fields[k]}" for k in keys if k in fields)
    mem = max(256, int(int(fields.get("RealMemory", "1024")) * 0.9))
    return f"NodeName={node} NodeAddr=127.0.0.1 {topo} RealMemory={mem} State=UNKNOWN"


def render_conf(node: str) -> str:
    return f"""{MARKER} for the test suite: a single-node cluster on this machine.
# Rewritten (and the daemons restarted) when the tests need a different one. See the module's docstring.
ClusterName=launcher-test
SlurmctldHost={node}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again only cred_expire+1 s after it ended: 5 is the minimum (default 120).
AuthInfo=cred_expire=5
StateSaveLocation={STATE_DIR}
SlurmdSpoolDir={SPOOL_DIR}
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile={LOG_DIR}/slurmctld.log
SlurmdLogFile={LOG_DIR}/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
# No cgroups here (no systemd as PID 1).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
KillWait=5
InactiveLimit=0
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
{_node_line(node)}
PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _ping_up() -> bool:
    try:
        res = subprocess.run(["scontrol", "ping"], check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0 and " is UP" in res.stdout


def _node_state(node: str) -> str:
    try:
        res = subprocess.run(["sinfo", "-h", "-N", "-n", node, "-o", "%t"], check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return res.stdout.strip().splitlines()[0] if res.returncode == 0 and res.stdout.strip() else ""


def _node_usable(node: str) -> bool:
    """Responding and taking jobs (a trailing * in sinfo means not responding)."""
    return _node_state(node) in ("idle", "mix", "alloc", "comp")


def _wait(predicate, timeout: float, what: str, log_file: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            tail = ""
            if log_file is not None and log_file.exists():
                tail = "\n" + "\n".join(log_file.read_text(errors="replace").splitlines()[-30:])
            raise ClusterUnavailable(f"timed out after {timeout:.0f}s waiting for {what}{tail}")
        time.sleep(0.2)


def _pid_alive(pid_file: Path) -> int | None:
    """The pid in `pid_file` if that process runs (a zombie left for a non-reaping PID 1 does not count)."""
    try:
        pid = int(pid_file.read_text().strip())
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    return None if stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X") else pid


def stop_pid_file(pid_file: Path, timeout: float = 15) -> bool:
    """SIGTERM the process named by `pid_file` and wait until it is gone; False when none was running."""
    pid = _pid_alive(pid_file)
    if pid is None:
        return False
    os.kill(pid, 15)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid_file) == pid and time.monotonic() < deadline:
        time.sleep(0.1)
    return True


def _stop_daemons() -> None:
    """Stop the slurmctld/slurmd started from our pid files (only those processes)."""
    for name in ("slurmd", "slurmctld"):
        stop_pid_file(PID_FILES[name])


def stop_started(cluster: Cluster, pid_files: dict[str, Path] = PID_FILES) -> list[str]:
    """Stop the daemons `ensure_cluster` started, the last started first; returns the ones that were running."""
    return [name for name in reversed(cluster.started) if stop_pid_file(pid_files[name])]


def _start_daemon(name: str, log_file: Path) -> None:
    """Start a Slurm daemon (it forks into the background and outlives this process)."""
    res = _run(f"/usr/sbin/{name}", timeout=60)
    if res.returncode != 0:
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-30:]) if log_file.exists() else ""
        raise ClusterUnavailable(f"{name} did not start ({res.returncode}): {res.stderr.strip()}\n{tail}")


def ensure_cluster(log=print) -> Cluster:
    """Install, configure and start the cluster if needed; return it once the node takes jobs."""
    reason = cannot_run_reason()
    if reason:
        raise ClusterUnavailable(reason)
    node = socket.gethostname().split(".")[0]
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    if os.geteuid() != 0:  # a running cluster that is not ours: use it as it is
        return Cluster(node=node, reused=True, timings=timings)
    started: list[str] = []
    if _missing_binaries():
        log(f"Installing {' '.join(PACKAGES)} with apt-get ...")
        _install(log)
        timings["install_s"] = time.monotonic() - t0
    t1 = time.monotonic()
    conf = render_conf(node)
    current = CONF.read_text() if CONF.exists() else None
    if current is not None and MARKER not in current:
        if _ping_up() and _node_usable(node):
            log(f"Using the running SLURM cluster configured by {CONF} (not written by the tests).")
            return Cluster(node=node, reused=True, timings=timings)
        raise ClusterUnavailable(
            f"{CONF} exists and was not written by the tests; not overwriting it. Move it aside to let the tests "
            "set up their own single-node cluster."
        )
    if _start_munge():
        started.append("munged")
    if current == conf and _ping_up() and _node_usable(node):
        log(f"Reusing the running SLURM cluster (node {node}: {_node_state(node)}).")
        timings["start_s"] = time.monotonic() - t1
        return Cluster(node=node, reused=True, timings=timings, started=started)
    if current != conf:
        _stop_daemons()
        CONF_DIR.mkdir(parents=True, exist_ok=True)
        CONF.write_text(conf)
    for d in (STATE_DIR, SPOOL_DIR, LOG_DIR):
        d.mkdir(parents=True, exist_ok=True)
    if not _ping_up():
        if _pid_alive(PID_FILES["slurmctld"]) is None:
            _start_daemon("slurmctld", LOG_DIR / "slurmctld.log")
            started.append("slurmctld")
        _wait(_ping_up, 30, "`scontrol ping` to report slurmctld UP", LOG_DIR / "slurmctld.log")
    if _pid_alive(PID_FILES["slurmd"]) is None:
        _start_daemon("slurmd", LOG_DIR / "slurmd.log")
        started.append("slurmd")
    state = _node_state(node)
    if state.startswith(("down", "drain", "fail")):  # e.g. left down by an earlier crash
        Cluster.cmd("scontrol", "update", f"NodeName={node}", "State=RESUME", check=False)
    _wait(lambda: _node_usable(node), 60,
          f"node {node} to be idle in sinfo (now {_node_state(node)!r})", LOG_DIR / "slurmd.log")
    timings["start_s"] = time.monotonic() - t1
    log(f"SLURM cluster up: node {node} {_node_state(node)} ({', '.join(f'{k} {v:.1f}' for k, v in timings.items())}).")
    return Cluster(node=node, reused=False, timings=timings, started=started)


def _on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Cluster]:
    """A running single-node SLURM cluster (skips with the reason where none can be made; fails on CI).

    At the end of the session it stops the daemons it started; a cluster that was already up stays up."""

    def log(msg: str) -> None:
        print(f"[slurm_cluster] {msg}", flush=True)

    try:
        cluster = ensure_cluster(log=log)
    except ClusterUnavailable as err:
        reason = f"no SLURM cluster: {err}"
        log(reason)
        if _on_ci():
            pytest.fail(f"{reason} (CI=true: the SLURM tests must run)", pytrace=False)
        pytest.skip(reason)
    yield cluster
    if cluster.started:
        stopped = stop_started(cluster)
        log(f"Stopped {', '.join(stopped) or 'nothing (already gone)'}: started for these tests.")


def main(argv: list[str]) -> int:
    action = argv[0] if argv else "up"
    if action == "up":
        try:
            cluster = ensure_cluster()
        except ClusterUnavailable as err:
            print(f"no SLURM cluster: {err}", file=sys.stderr)
            return 1
        print(cluster)
        return 0
    if action == "status":
        print(f"slurmctld {'UP' if _ping_up() else 'down'}")
        if _ping_up():
            print(Cluster.cmd("sinfo"), Cluster.cmd("squeue"), sep="")
        return 0
    if action == "down":
        _stop_daemons()
        print("slurmctld and slurmd stopped (munged left running)")
        return 0
    print("usage: python -m tests.slurm_cluster [up|status|down]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
