"""RGM on MNIST against two baselines, on one train/validation split, in one run.

    python -m bench.rgm [--mnist-root DIR] [--out DIR] [--threads T] [hydra overrides ...]

1. Trains `experiment=rgm_mnist` (plus the overrides) through the launcher's Python API, exactly as
   `python train.py experiment=rgm_mnist` would (figures and checkpoints included); the wall time is
   that run's. `--mnist-root DIR` sets `data.root=DIR` (e.g. ../shared/data/mnist: its 10,000 test
   digits split 8,000/2,000); without it the embedded 5,000 digits (4,000/1,000).
2. On the same split (the data module's own tensors):
   - reconstruction MSE per pixel of the validation images: the RGM's top-down generation from its top
     state against PCA (scikit-learn) with as many components as the top level has units, fitted on
     the training images;
   - linear probes (scikit-learn logistic regression on standardised features, fitted on the training
     images, accuracy on the validation images) of the frozen top state and of all states concatenated,
     against raw pixels and random features of the same widths (the states of the untrained RGM: the
     same architecture at its initial weights, a random ReLU network);
   - the prediction error of every level on the validation images at the start (initial weights) and
     at the end of training: the MSE, and the MSE relative to the variance of that level's state over
     the images (1 - R^2: a level whose states shrink cannot look better by shrinking).
It prints the table, the goals (met or not) and the machine's load. A measurement, not a test: it exits 0
whenever the measurement ran.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from models.rgm.model import RGM  # noqa: E402
from utils.training.api import compose, train  # noqa: E402
from utils.training.callbacks import Callback  # noqa: E402

SNAPSHOT = "+callbacks.bench_initial_weights={_target_:bench.rgm.InitialWeights}"


class InitialWeights(Callback):
    """Keeps a copy of the model as the run starts (before its first step): the "start" of the comparison."""

    def __init__(self) -> None:
        self.model: RGM | None = None

    def on_fit_start(self, trainer: Any) -> None:
        self.model = copy.deepcopy(trainer.model).cpu().eval()


@torch.no_grad()
def level_errors(model: RGM, x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per level 0..L-1: the prediction error's MSE, and that MSE over the variance of the level's state."""
    outputs = model({"x": x})
    mse, relative = [], []
    for level, prediction in enumerate(outputs["predictions"]):
        state = outputs["states"][level]
        error = float(torch.mean((state - prediction) ** 2))
        variance = float(state.var(dim=0).mean())
        mse.append(error)
        relative.append(error / variance if variance > 0 else float("nan"))
    return mse, relative


@torch.no_grad()
def features(model: RGM, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(top state, all states concatenated) of images x."""
    states = model.recognize(x)[1:]
    return states[-1].numpy(), torch.cat(states, dim=1).numpy()


def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray) -> float:
    """Validation accuracy of a logistic regression on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(train_x, train_y)
    return float(probe.score(val_x, val_y))


def pca_mse(train_x: np.ndarray, val_x: np.ndarray, components: int) -> float:
    from sklearn.decomposition import PCA

    pca = PCA(n_components=components, random_state=0).fit(train_x)
    reconstructed = pca.inverse_transform(pca.transform(val_x))
    return float(np.mean((reconstructed - val_x) ** 2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist-root", help="data.root for the run (IDX files in <root>/MNIST/raw/); default: embedded")
    parser.add_argument("--out", help="keep the run directory here (default: a temporary directory, removed)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the run")
    args, overrides = parser.parse_known_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_rgm_"))
    load_before = os.getloadavg()
    overrides = ["experiment=rgm_mnist", f"paths.root={out}", f"paths.data_root={out / 'datasets'}", SNAPSHOT,
                 *([f"data.root={args.mnist_root}"] if args.mnist_root else []), *overrides]
    try:
        cfg = compose(overrides)
        started = time.perf_counter()
        result = train(cfg, fresh=True)
        run_s = time.perf_counter() - started
        report(result, cfg, run_s, load_before)
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    return 0


def report(result: Any, cfg: Any, run_s: float, load_before: tuple[float, ...]) -> None:
    trainer = result.trainer
    model: RGM = trainer.model.cpu().eval()
    initial: RGM = dict(trainer.callbacks.named)["callbacks/bench_initial_weights"].model
    data = trainer.data
    train_x, train_y = data.train_dataset.tensors["x"], data.train_dataset.tensors["label"].numpy()
    val_x, val_y = data.val_dataset.tensors["x"], data.val_dataset.tensors["label"].numpy()
    top_width = model.sizes[-1]

    t0 = time.perf_counter()
    with torch.no_grad():
        rgm_mse = float(torch.mean((model({"x": val_x})["reconstruction"] - val_x) ** 2))
    pca = pca_mse(train_x.numpy(), val_x.numpy(), top_width)
    top_train, all_train = features(model, train_x)
    top_val, all_val = features(model, val_x)
    rand_top_train, rand_all_train = features(initial, train_x)
    rand_top_val, rand_all_val = features(initial, val_x)
    probes = {
        f"RGM top state ({top_width})": probe_accuracy(top_train, train_y, top_val, val_y),
        f"random features ({top_width}, untrained RGM top state)": probe_accuracy(rand_top_train, train_y, rand_top_val, val_y),
        f"RGM all states ({all_train.shape[1]})": probe_accuracy(all_train, train_y, all_val, val_y),
        f"random features ({all_train.shape[1]}, untrained RGM states)":
            probe_accuracy(rand_all_train, train_y, rand_all_val, val_y),
        f"raw pixels ({train_x.shape[1]})": probe_accuracy(train_x.numpy(), train_y, val_x.numpy(), val_y),
    }
    start_mse, start_rel = level_errors(initial, val_x)
    end_mse, end_rel = level_errors(model, val_x)
    baselines_s = time.perf_counter() - t0

    s = trainer.state
    print(f"\nRGM benchmark: {data.source}")
    print(f"  {len(train_y)} training / {len(val_y)} validation images; levels {model.sizes}; "
          f"{s.epoch} epochs, {s.step} steps; stopped: {s.stop_reason}")
    print(f"  final val/loss {s.history[-1]['val/loss']:.5f}; best {s.best_metric:.5f} at step {s.best_step}; "
          f"learning rate at the end {trainer.optimizers[0].optimizer.param_groups[0]['lr']:.3g}")
    print("\nReconstruction MSE per pixel, validation images (lower is better)")
    print(f"  {'RGM, generated top-down from the top state':<52} {rgm_mse:.5f}")
    print(f"  {f'PCA, {top_width} components':<52} {pca:.5f}")
    print("\nLinear-probe accuracy, validation images (logistic regression on frozen features)")
    for name, acc in probes.items():
        print(f"  {name:<52} {acc:.4f}")
    print("\nPrediction error per level, validation images: start -> end of training")
    print(f"  {'level':<28} {'MSE start':>11} {'MSE end':>11}   {'relative start':>14} {'relative end':>12}")
    for level in range(len(start_mse)):
        what = "pixels from level 1" if level == 0 else f"level {level} from level {level + 1}"
        print(f"  {f'{level} ({what})':<28} {start_mse[level]:>11.4g} {end_mse[level]:>11.4g}   "
              f"{start_rel[level]:>14.4g} {end_rel[level]:>12.4g}")
    top_probe = probes[f"RGM top state ({top_width})"]
    pixel_probe = probes[f"raw pixels ({train_x.shape[1]})"]
    goals = {
        "reconstruction better than PCA at the same width": rgm_mse < pca,
        "top-state probe above the raw-pixel probe": top_probe > pixel_probe,
        "prediction error (MSE) falling at every level": all(e < b for b, e in zip(start_mse, end_mse)),
        "relative prediction error falling at every level": all(e < b for b, e in zip(start_rel, end_rel)),
        "the run under 10 minutes": run_s < 600,
    }
    print("\nGoals")
    for goal, met in goals.items():
        print(f"  {'MET    ' if met else 'NOT MET'} {goal}")
    print(f"\nWall time: training run {run_s:.1f} s (figures and checkpoints included), baselines and probes "
          f"{baselines_s:.1f} s; torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs")
    print(f"Load average (1, 5, 15 min) before: {', '.join(f'{v:.2f}' for v in load_before)}; "
          f"after: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    sys.exit(main())
