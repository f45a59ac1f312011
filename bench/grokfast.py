"""Grokfast's headline on this launcher, as a distribution over seeds: iterations to 95% validation accuracy.

    python -m bench.grokfast                          # EMA and MA, 5 seeds each (about an hour on 2 CPU cores)
    python -m bench.grokfast --variants baseline --seeds 1 --max-steps 60000   # the long baseline run
    python -m bench.grokfast --variants ema --seeds 3 --parallel 2

Each variant and seed runs twice, interleaved: through the launcher, and through bench/grokfast_plain.py,
the same experiment written as one plain PyTorch script without any launcher code (`--loops` picks). A
gap between the two is the launcher's; a gap that both show is not.

Each launcher run is a real `python pretrain.py experiment=grokking ...` (x * y mod p for p=97 and y in 1..96, the
reference script's task, a 50% split drawn from the seed as the reference script draws it,
2-layer width-128 transformer with the reference implementation's block, initialisation and batching,
batch 512, Adam lr 1e-3 betas (0.9, 0.98)), evaluated every --eval-interval steps and stopped at the first
evaluation with val/acc >= target. Per variant, as in the paper (Lee et al. 2024): baseline weight decay 0;
EMA alpha 0.98, lambda 2.0, weight decay 0.005; MA window 100, lambda 5.0, weight decay 0.01 (Adam's
coupled L2 decay). Prints, per variant, every seed's count, the median and the range, and the speed-up as
the ratio of medians against the baseline when the baseline ran.
Paper (iterations to 95%): baseline 39890, EMA 910 (x43.8), MA 790 (x50.5). The reference script measured
here (ironjr/grokfast, one torch thread, validation every 10 iterations): EMA 910, 1340, 910, 1070, 1460
for seeds 0-4 (median 1070); MA 790, 900, 1050, 1310, 1570 for seeds 0-4 (median 1050).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
REFERENCE_SCRIPT = {"ema": [910, 1340, 910, 1070, 1460], "ma": [790, 900, 1050, 1310, 1570]}


def steps_to_target(run_dir: Path, target: float) -> int | None:
    """First evaluated step with val/acc >= target, from the run's metrics.jsonl."""
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            if rec.get("kind") == "val" and rec.get("val/acc", 0.0) >= target:
                return int(rec["step"])
    return None


def plain_command(name: str, seed: int, args: argparse.Namespace) -> list[str]:
    """The same run through bench/grokfast_plain.py: no launcher code at all."""
    return [sys.executable, "-m", "bench.grokfast_plain", f"--variant={name}", f"--seed={seed}",
            f"--max-steps={args.max_steps}", f"--eval-interval={args.eval_interval}", f"--target={args.target}",
            "--operation=mul"]  # experiment=grokking's task


def command(name: str, seed: int, args: argparse.Namespace, root: Path) -> list[str]:
    return [
        sys.executable, str(ROOT / "pretrain.py"),
        "experiment=grokking", f"run_name=bench_{name}_seed{seed}", f"paths.root={root}",
        f"paths.data_root={args.data_root}", f"seed={seed}", f"trainer.max_steps={args.max_steps}",
        # As the reference script: a seed draws its own train/validation split too (unless --fixed-split).
        f"data.split_seed={0 if args.fixed_split else seed}",
        f"trainer.eval_interval={args.eval_interval}", f"trainer.log_interval={max(args.eval_interval, 100)}",
        f"trainer.early_stopping.stop_at={args.target}", "trainer.checkpoint.interval=5000", "trainer.device=cpu",
        *VARIANTS[name],
    ]


Job = tuple[str, str, int]  # (loop, variant, seed); loop: "launcher" or "plain"


def run_all(jobs: list[Job], args: argparse.Namespace, root: Path) -> dict[Job, tuple[int | None, float]]:
    """Every (loop, variant, seed) run, `args.parallel` at a time, one torch thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    pending, running, results = list(jobs), {}, {}
    while pending or running:
        while pending and len(running) < args.parallel:
            job = pending.pop(0)
            loop, name, seed = job
            cmd = command(name, seed, args, root) if loop == "launcher" else plain_command(name, seed, args)
            log = open(root / f"{loop}_{name}_seed{seed}.log", "w", encoding="utf-8")  # noqa: SIM115 - closed below
            running[job] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT),
                            log, time.perf_counter())
        for job, (proc, log, started) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[job]
            loop, name, seed = job
            if proc.returncode != 0:
                raise SystemExit(f"{loop} {name} seed {seed} failed (exit {proc.returncode}); see {log.name}")
            if loop == "launcher":
                steps = steps_to_target(root / f"bench_{name}_seed{seed}", args.target)
            else:
                steps = json.loads(Path(log.name).read_text(encoding="utf-8").strip().splitlines()[-1])["steps"]
            results[job] = (steps, time.perf_counter() - started)
            shown = steps if steps is not None else f"> {args.max_steps}"
            print(f"  {loop:8s} {name:8s} seed {seed}: {shown} steps ({results[job][1]:.0f} s wall)", flush=True)
        time.sleep(1.0)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["ema", "ma"], choices=list(VARIANTS))
    parser.add_argument("--loops", nargs="+", default=["launcher", "plain"], choices=["launcher", "plain"],
                        help="launcher: pretrain.py; plain: bench/grokfast_plain.py, the same run without the launcher")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=6000)
    parser.add_argument("--eval-interval", type=int, default=10)
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (one torch thread each)")
    parser.add_argument("--fixed-split", action="store_true", help="every seed on the split of data.split_seed=0")
    parser.add_argument("--data-root", default=str(ROOT / "datasets"))
    parser.add_argument("--out", default=None, help="keep run directories here (default: a temp dir)")
    args = parser.parse_args()

    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_grokfast_"))
    root.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    split = "one split (data.split_seed=0)" if args.fixed_split else "a split per seed"
    print(f"x * y mod 97 (y in 1..96), eval every {args.eval_interval} steps, seeds {seeds}, {split}, runs in {root}", flush=True)
    # Interleaved, so that the two loops see the same load on the machine.
    results = run_all([(loop, v, s) for v in args.variants for s in seeds for loop in args.loops], args, root)

    print(f"\niterations to {args.target:.0%} validation accuracy (first evaluation at or above it)")
    print(f"{'loop':9s} {'variant':9s} {'seeds':>32s} {'median':>8s} {'range':>11s} {'paper':>6s}")
    medians: dict[tuple[str, str], float] = {}
    for loop in args.loops:
        for name in args.variants:
            counts = [results[(loop, name, s)][0] for s in seeds]
            reached = [c for c in counts if c is not None]
            shown = ", ".join(str(c) if c is not None else f">{args.max_steps}" for c in counts)
            if len(reached) == len(counts):
                medians[(loop, name)] = statistics.median(reached)
                median, spread = f"{medians[(loop, name)]:.0f}", f"{min(reached)}-{max(reached)}"
            else:
                median = f">{args.max_steps}" if len(reached) <= len(counts) // 2 else f"{statistics.median(reached):.0f}*"
                spread = "-"
            print(f"{loop:9s} {name:9s} {shown:>32s} {median:>8s} {spread:>11s} {PAPER[name]:>6d}")
    for name in args.variants:
        if ("launcher", name) in medians and ("plain", name) in medians:
            print(f"{name}: launcher / plain script, ratio of medians: "
                  f"{medians[('launcher', name)] / medians[('plain', name)]:.2f}")
    for loop in args.loops:
        if (loop, "baseline") in medians:
            for name in ("ema", "ma"):
                if (loop, name) in medians:
                    print(f"{loop} speed-up {name} (ratio of medians): "
                          f"x{medians[(loop, 'baseline')] / medians[(loop, name)]:.1f}"
                          f"  (paper x{PAPER['baseline'] / PAPER[name]:.1f})")
    print(f"reference script, measured on this machine before (seeds 0-4): {REFERENCE_SCRIPT}")


if __name__ == "__main__":
    main()
