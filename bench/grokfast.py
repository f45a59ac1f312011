"""Grokfast's headline on this launcher: iterations to 95% validation accuracy, baseline vs Grokfast.

    python -m bench.grokfast                      # baseline, grokfast_ema, grokfast_ma
    python -m bench.grokfast --variants ema ma    # just the filters (minutes on 2 CPU cores)
    python -m bench.grokfast --max-steps 60000 --eval-interval 10

Each variant is a real `python pretrain.py experiment=grokking ...` run (modular division, p=97,
50% split, 2-layer width-128 transformer, batch 512, AdamW lr 1e-3 betas (0.9, 0.98)) that stops at
the first evaluation with val/acc >= target. Settings per variant follow the paper (Lee et al. 2024):
baseline weight decay 0; EMA alpha 0.98, lambda 2.0, weight decay 0.005; MA window 100, lambda 5.0,
weight decay 0.01. The count has the resolution of --eval-interval.
Paper (iterations to 95%): baseline 39890, EMA 910 (x43.8), MA 790 (x50.5).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

VARIANTS = {
    "baseline": ["grad_filter=none", "optim.weight_decay=0.0"],
    "ema": ["grad_filter=grokfast_ema", "grad_filter.alpha=0.98", "grad_filter.lamb=2.0", "optim.weight_decay=0.005"],
    "ma": ["grad_filter=grokfast_ma", "grad_filter.window_size=100", "grad_filter.lamb=5.0", "optim.weight_decay=0.01"],
}
PAPER = {"baseline": 39890, "ema": 910, "ma": 790}


def steps_to_target(run_dir: Path, target: float) -> int | None:
    """First evaluated step with val/acc >= target, from the run's metrics.jsonl."""
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            if rec.get("kind") == "val" and rec.get("val/acc", 0.0) >= target:
                return int(rec["step"])
    return None


def run_variant(name: str, args: argparse.Namespace, root: Path) -> tuple[int | None, float]:
    overrides = [
        "experiment=grokking",
        f"run_name=bench_{name}",
        f"paths.root={root}",
        f"paths.data_root={args.data_root}",
        f"seed={args.seed}",
        f"trainer.max_steps={args.max_steps}",
        f"trainer.eval_interval={args.eval_interval}",
        f"trainer.log_interval={max(args.eval_interval, 50)}",
        f"trainer.early_stopping.stop_at={args.target}",
        "trainer.checkpoint.interval=5000",
        *VARIANTS[name],
    ]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "pretrain.py"), *overrides], cwd=ROOT, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
        raise SystemExit(f"variant {name} failed with exit code {proc.returncode}")
    return steps_to_target(root / f"bench_{name}", args.target), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--max-steps", type=int, default=60000)
    parser.add_argument("--eval-interval", type=int, default=10)
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default=str(ROOT / "datasets"))
    parser.add_argument("--out", default=None, help="keep run directories here (default: a temp dir)")
    args = parser.parse_args()

    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_grokfast_"))
    results: dict[str, tuple[int | None, float]] = {}
    for name in args.variants:
        results[name] = run_variant(name, args, root)
        steps, secs = results[name]
        print(f"{name:9s} steps to {args.target:.0%} val acc: {steps if steps is not None else f'> {args.max_steps}'}"
              f"   ({secs:.0f} s wall, paper: {PAPER[name]})", flush=True)

    base = results.get("baseline", (None, 0.0))[0]
    print(f"\nmodular division p=97, seed {args.seed}, eval every {args.eval_interval} steps, runs in {root}")
    for name in ("ema", "ma"):
        if name in results and base is not None and results[name][0]:
            print(f"speed-up {name}: x{base / results[name][0]:.1f}  (paper x{PAPER['baseline'] / PAPER[name]:.1f})")


if __name__ == "__main__":
    main()
