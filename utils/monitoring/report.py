"""`python -m utils.monitoring.report <run_dir>`: a run's summary, and its plots redrawn from metrics.jsonl.

Reads only the run directory (metrics.jsonl, latest.pt, .hydra/config.yaml); no network, no tracker.
Prints steps, the best value of the monitored metric and its step, the last validation metrics, the
stop reason, non-finite steps, wall time (summed over the sessions that recorded a start and a stop),
tracker run ids and where their files are; then redraws `<run_dir>/plots/*.png`.

The best evaluation is the checkpoint's (what the trainer decided); without one it is found in
metrics.jsonl by the trainer's rule: an evaluation is the new best only when it beats the best so far
by more than `trainer.early_stopping.min_delta` (`is_improvement`).
Exit code 2 for a directory that is not a run directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from utils.monitoring.plots import make_plots, read_records
from utils.training.state import is_improvement

EXIT_NOT_A_RUN = 2


def _load_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "latest.pt"
    if not path.exists():
        return None
    try:
        import torch

        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a report still works from metrics.jsonl alone
        print(f"(latest.pt unreadable: {type(err).__name__}: {err})", file=sys.stderr)
        return None


def _trainer_config(run_dir: Path, ckpt: dict[str, Any] | None) -> dict[str, Any]:
    """The run's `trainer` config: the checkpoint's (the last session's), else .hydra/config.yaml's."""
    trainer = ((ckpt or {}).get("config") or {}).get("trainer") or {}
    hydra_cfg = run_dir / ".hydra" / "config.yaml"
    if not trainer and hydra_cfg.exists():
        from omegaconf import OmegaConf

        # resolve=False: an interpolation of the hydra node (${hydra:...}) cannot resolve outside a run
        trainer = (OmegaConf.to_container(OmegaConf.load(hydra_cfg), resolve=False) or {}).get("trainer") or {}
    return trainer


def best_evaluation(val: list[dict[str, Any]], monitor: str, mode: str, min_delta: float) -> tuple[float | None, int | None]:
    """(best value, its step) of `monitor` over validation records, chosen as the trainer chooses."""
    best, best_step = None, None
    for rec in val:
        value = rec.get(monitor)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and is_improvement(value, best, mode, min_delta):
            best, best_step = float(value), rec["step"]
    return best, best_step


def _fmt(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _wall_time(events: list[dict[str, Any]]) -> tuple[float | None, int]:
    """Seconds summed over start->stop pairs; also the number of sessions without a stop (killed)."""
    total, open_start, unmatched, known = 0.0, None, 0, False
    for ev in events:
        if ev.get("event") == "start":
            if open_start is not None:
                unmatched += 1
            open_start = ev.get("time")
        elif ev.get("event") == "stop" and open_start is not None and ev.get("time") is not None:
            total += ev["time"] - open_start
            known, open_start = True, None
    return (total if known else None), unmatched


def summarize(run_dir: Path) -> list[str]:
    records = read_records(run_dir)
    ckpt = _load_checkpoint(run_dir)
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    events = [r for r in records if r.get("kind") == "event"]
    t = (ckpt or {}).get("train_state") or {}
    trainer_cfg = _trainer_config(run_dir, ckpt)
    monitor, mode = trainer_cfg.get("monitor"), trainer_cfg.get("monitor_mode") or "min"
    min_delta = float((trainer_cfg.get("early_stopping") or {}).get("min_delta") or 0.0)

    lines = [f"run directory:   {run_dir}"]
    last_step = max([r["step"] for r in records] + [t.get("step", 0)], default=0)
    lines.append(f"steps:           {t.get('step', last_step)}" + ("" if ckpt else " (no checkpoint; from metrics.jsonl)"))

    best, best_step = t.get("best_metric"), t.get("best_step")
    if best is None and monitor:
        best, best_step = best_evaluation(val, monitor, mode, min_delta)
    if monitor:
        best_text = f"{_fmt(best)} at step {best_step}" if best is not None else "never evaluated"
        lines.append(f"best {monitor} ({mode}): {best_text}")
    if val:
        last = val[-1]
        shown = "  ".join(f"{k}={_fmt(v)}" for k, v in sorted(last.items()) if k not in ("step", "kind"))
        lines.append(f"last validation (step {last['step']}): {shown}")
    stops = [e for e in events if e.get("event") == "stop"]
    lines.append(f"stop reason:     {stops[-1].get('reason') if stops else 'none recorded (running, or killed)'}")
    nonfinite = t.get("total_nonfinite")
    if nonfinite is None and train:
        nonfinite = train[-1].get("train/nonfinite_total")
    lines.append(f"non-finite steps skipped: {nonfinite if nonfinite is not None else 'unknown'}")
    wall, unmatched = _wall_time(events)
    if wall is not None:
        extra = f" (+{unmatched} session(s) without a stop record, not counted)" if unmatched else ""
        lines.append(f"wall time:       {wall / 60:.1f} min ({wall:.0f} s in the training loop){extra}")
    else:
        lines.append("wall time:       unknown")
    if train:
        last = train[-1]
        perf = [f"{k}={_fmt(last[k])}" for k in ("time/step_s", "time/samples_per_s", "time/tokens_per_s",
                                                "memory/peak_rss_mib", "memory/peak_cuda_mib") if k in last]
        if perf:
            lines.append(f"last throughput: {'  '.join(perf)}")
    run_ids = (ckpt or {}).get("logger_run_ids") or {}
    for name, run_id in run_ids.items():
        lines.append(f"tracker {name}: " + (f"run id {run_id}" if run_id else "(no run id)"))
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    if offline:
        lines.append(f"W&B offline runs: {len(offline)}; upload with: wandb sync {offline[-1]}")
    if (run_dir / "tensorboard").is_dir():
        lines.append(f"TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}")
    return lines


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "metrics.jsonl").exists() or (path / "latest.pt").exists())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.monitoring.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory (<paths.root>/<run_name>)")
    parser.add_argument("--no-plots", action="store_true", help="only print the summary")
    args = parser.parse_args(argv)
    run_dir = args.run_dir.resolve()
    if not is_run_dir(run_dir):
        print(
            f"error: {args.run_dir} is not a run directory (no metrics.jsonl or latest.pt in it). "
            "Pass <paths.root>/<run_name>, e.g. checkpoints/default.",
            file=sys.stderr,
        )
        return EXIT_NOT_A_RUN
    for line in summarize(run_dir):
        print(line)
    if not args.no_plots:
        images = make_plots(run_dir)
        if images:
            print(f"plots:           {', '.join(str(p) for p in images.values())}")
        else:
            print("plots:           none (no train/val records yet)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
