"""bench/peers.py without Lightning (a benchmark-only dependency, absent on CI): --help works, a run that
needs it says in one line how to install it, and the contestants that do not need it run. The Lightning
runs themselves are not tested here."""

from __future__ import annotations

import subprocess
import sys

from tests.cli_helpers import ENV, REPO_ROOT

# `sys.modules[name] = None` makes `import lightning` raise ImportError, as on a machine without it,
# whether or not this venv has it installed.
WITHOUT_LIGHTNING = (
    "import runpy, sys; sys.modules['lightning'] = None; sys.argv = ['bench.peers', *sys.argv[1:]]; "
    "runpy.run_module('bench.peers', run_name='__main__', alter_sys=True)"
)


def run_without_lightning(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_LIGHTNING, *args], cwd=REPO_ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)


def test_help_works_without_lightning() -> None:
    proc = run_without_lightning("--help")
    assert proc.returncode == 0, proc.stderr
    assert "--workloads" in proc.stdout and "requirements-bench.txt" in proc.stdout


def test_missing_lightning_is_one_line_with_the_fix() -> None:
    proc = run_without_lightning("--rounds", "1")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Lightning is not installed" in lines[0] and "make bench-peers" in lines[0]
    assert "pip install -r requirements-bench.txt" in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""



def test_the_launcher_with_and_without_the_fused_optimizer_runs_without_lightning() -> None:
    """The contestants that need no Lightning run for real (a few tiny steps) and are reported side by side:
    the launcher at its defaults (fused Adam) and with optim.fused=false (torch's default, as the hand loop)."""
    proc = run_without_lightning("--workloads", "tiny", "--contestants", "hand", "launcher", "launcher_unfused",
                                 "--rounds", "1", "--tiny-steps", "20", "--warmup", "5", "--checkpoint-every", "10")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "same initial weights everywhere: yes" in out
    for ratio in ("launcher / hand:", "launcher_unfused / hand:", "launcher / launcher_unfused:"):
        assert ratio in out, out
    assert "lightning" not in out.split("ratios of steps/s")[1], out  # no Lightning pair without Lightning runs
