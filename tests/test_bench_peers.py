"""bench/peers.py without Lightning (a benchmark-only dependency, absent on CI): --help works, and a run
says in one line how to install it. The runs themselves need Lightning and are not tested here."""

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

