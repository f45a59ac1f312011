"""A Hydra callback that ends every multirun with a table of `trainer.monitor` per job.

Registered in conf/config.yaml under `hydra.callbacks.sweep_summary`. It works with any launcher,
including ones that run jobs in other processes or on other machines (submitit), because it passes
nothing in memory between jobs and the sweep:

* `on_multirun_start` (the sweep's process) writes a fresh sweep id to `<sweep dir>/.sweep_id` (and
  fixes the sweep directory for every job, see below).
* `on_job_end` (the job's process, wherever it runs) writes `<job dir>/sweep_result.json`: the job's
  number, overrides, status, return value (`pretrain.run`: the best value of `trainer.monitor`) and error.
* `on_multirun_end` (the sweep's process) reads the results carrying this sweep's id, prints the table
  and writes it to `<sweep dir>/summary.tsv`. The best job (by `trainer.monitor_mode`) is marked `*`.

Results left in the sweep directory by an earlier, different sweep carry another id and are not listed.
Only rank 0 writes (a sweep started under torchrun runs the callback on every rank).
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

RESULT_FILE = "sweep_result.json"
SWEEP_ID_FILE = ".sweep_id"
SWEEP_DIR_ENV = "LAUNCHER_SWEEP_DIR"


def _is_rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0) == 0


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _finite_or_none(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _split_override(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


class SweepSummary(Callback):
    def __init__(self, filename: str = "summary.tsv") -> None:
        self.filename = filename
        self.sweep_id: str | None = None

    # ------------------------------------------------------------------ the sweep's process
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra 1.3 sets HydraConfig only inside each job, so a `${hydra:...}` in the sweep directory (the
        # grokking run_name uses ${hydra:runtime.choices.grad_filter}) fails in the sweeper and the launcher
        # ("HydraConfig was not set", Hydra issues #1786 / #3427). Set it to the sweep's config, as a
        # single run does; this hook runs before the sweeper is created.
        if not HydraConfig.initialized():
            HydraConfig.instance().set_config(config)
        # Resolved once here: every job of this sweep uses this directory (conf/config.yaml reads it), even
        # a job whose own run_name differs because it changes a group the name is derived from.
        sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        os.environ[SWEEP_DIR_ENV] = str(sweep_dir)
        if not _is_rank_zero():
            return
        self.sweep_id = uuid.uuid4().hex
        _write_atomic(sweep_dir / SWEEP_ID_FILE, self.sweep_id + "\n")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not _is_rank_zero():
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        print(write_summary(sweep_dir, self.sweep_id, self.filename), flush=True)

    # ------------------------------------------------------------------ each job's process
    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN or not _is_rank_zero():
            return
        job_dir = Path(config.hydra.runtime.output_dir)
        sweep_id_file = Path(config.hydra.sweep.dir) / SWEEP_ID_FILE
        completed = job_return.status == JobStatus.COMPLETED
        raw = job_return._return_value  # the property would re-raise a failed job's exception
        trainer = OmegaConf.select(config, "trainer") or {}
        record = {
            "sweep_id": sweep_id_file.read_text().strip() if sweep_id_file.exists() else None,
            "job_num": int(config.hydra.job.num),
            "override_dirname": str(config.hydra.job.override_dirname),
            "overrides": list(job_return.overrides or []),
            "status": job_return.status.name,
            "value": _finite_or_none(raw) if completed else None,
            "monitor": trainer.get("monitor"),
            "monitor_mode": trainer.get("monitor_mode"),
            "error": None if completed else f"{type(raw).__name__}: {raw}",
            "run_dir": str(job_dir),
        }
        # One file per job directory, holding this sweep's jobs that ran there: two Optuna trials that draw
        # the same parameters share a directory (the second resumes the first's finished run).
        kept = [r for r in _read_records(job_dir / RESULT_FILE)
                if r.get("sweep_id") == record["sweep_id"] and r.get("job_num") != record["job_num"]]
        _write_atomic(job_dir / RESULT_FILE, json.dumps({"results": [*kept, record]}, indent=1) + "\n")
        if record["sweep_id"] is not None:  # the table so far, should the sweep not reach its end
            write_summary(Path(config.hydra.sweep.dir), record["sweep_id"], self.filename)


def write_summary(sweep_dir: Path, sweep_id: str | None, filename: str = "summary.tsv") -> str:
    """Write `<sweep_dir>/<filename>` from the results of sweep `sweep_id`; return the table as text."""
    rows = collect_results(sweep_dir, sweep_id)
    if not rows:
        return f"Sweep summary: no job results under {sweep_dir}"
    header, table, best = summary_table(rows)
    out = Path(sweep_dir) / filename
    _write_atomic(out, "\n".join("\t".join(r) for r in [header, *table]) + "\n")
    return format_table(header, table, best, title=f"Sweep summary ({len(rows)} jobs, also in {out}):")


def collect_results(sweep_dir: Path, sweep_id: str | None = None) -> list[dict[str, Any]]:
    """Job results under `sweep_dir` (only those of `sweep_id` when given), by job number."""
    rows = []
    for path in Path(sweep_dir).glob(f"**/{RESULT_FILE}"):
        rows += [r for r in _read_records(path) if sweep_id is None or r.get("sweep_id") == sweep_id]
    return sorted(rows, key=lambda r: r["job_num"])


def _read_records(path: Path) -> list[dict[str, Any]]:
    try:
        return list(json.loads(path.read_text("utf-8"))["results"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def summary_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]], int | None]:
    """(header, rows of cells, index of the best row) for summary.tsv. Columns: job, the overrides that
    differ between jobs (all of them for a single job), the monitored metric (full precision), status,
    error, run directory."""
    parsed = [dict(_split_override(o) for o in r["overrides"]) for r in rows]
    keys: list[str] = []
    for p in parsed:
        keys += [k for k in p if k not in keys]
    varying = [k for k in keys if len({p.get(k) for p in parsed}) > 1] or (keys if len(rows) == 1 else [])
    monitors = {r.get("monitor") for r in rows}
    one_monitor = len(monitors) == 1
    header = ["job", *varying, str(next(iter(monitors))) if one_monitor else "value",
              *([] if one_monitor else ["monitor"]), "status", "error", "run_dir"]

    best = None
    if one_monitor:  # different metrics are not comparable
        for i, r in enumerate(rows):
            if r["value"] is None:
                continue
            higher = r.get("monitor_mode") == "max"
            if best is None or ((r["value"] > rows[best]["value"]) if higher else (r["value"] < rows[best]["value"])):
                best = i

    table = []
    for r, p in zip(rows, parsed):
        cells = [str(r["job_num"]), *(p.get(k, "") for k in varying), "" if r["value"] is None else repr(r["value"])]
        if not one_monitor:
            cells.append(str(r.get("monitor")))
        error = " ".join(str(r.get("error") or "").split())  # one line, no tabs
        cells += [r["status"], error, r["run_dir"]]
        table.append(cells)
    return header, table, best


def format_table(header: list[str], table: list[list[str]], best: int | None, title: str) -> str:
    """The console view: metric to 6 significant digits, errors cut short, no run_dir column."""
    value_col = header.index("status") - (1 if header[header.index("status") - 1] != "monitor" else 2)
    shown = []
    for row in table:
        cells = list(row[:-1])
        if cells[value_col]:
            cells[value_col] = f"{float(cells[value_col]):.6g}"
        cells[-1] = cells[-1][:60] + ("..." if len(cells[-1]) > 60 else "")
        shown.append(cells)
    cols = header[:-1]
    widths = [max(len(c), *(len(r[i]) for r in shown)) for i, c in enumerate(cols)]
    lines = [title, ("  " + "  ".join(c.ljust(w) for c, w in zip(cols, widths))).rstrip()]
    for i, row in enumerate(shown):
        mark = "* " if i == best else "  "
        lines.append((mark + "  ".join(c.ljust(w) for c, w in zip(row, widths))).rstrip())
    if best is not None:
        lines.append("(* best)")
    return "\n".join(lines)
