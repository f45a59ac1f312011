"""Measures of a learned representation, and the command that reports them over exported files.

    python -m models.lpl.analysis checkpoints/lpl_hierarchical            # every export of a run directory
    python -m models.lpl.analysis outputs/activations/activations_after.pt  # or the files themselves

For every representation in a file (`activations`, `layer1_activations`, `layer2_activations`,
`embeddings`) it prints:

* linear-probe accuracy: a multinomial logistic regression (scikit-learn) on standardised features,
  fitted on the first 75% of the rows and scored on the rest (the exports are in a fixed shuffle);
* per-unit activation std: the mean and the fraction of units below 0.1 (collapsed units);
* the invariance score, when the second frames' file is next to it (`<name>_second_frame.pt`, written
  by the export callback): the mean cosine similarity of the two frames' representations minus that of
  random pairs of different rows, so 0 means "no more alike than strangers" and 1 means invariant.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from dataset.errors import load_tensor_file
from utils.config.errors import ConfigError

REPRESENTATION_KEYS = ("activations", "layer1_activations", "layer2_activations", "embeddings")
COLLAPSE_STD = 0.1
SECOND_FRAME_SUFFIX = "_second_frame"


def linear_probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                          max_iter: int = 300, regularization: float = 1.0) -> float:
    """Held-out accuracy of a logistic regression on standardised features (scikit-learn)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, C=regularization))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a probe stopped at max_iter is still a probe
        probe.fit(np.asarray(train_x, dtype=np.float64), np.asarray(train_y))
    return float(probe.score(np.asarray(test_x, dtype=np.float64), np.asarray(test_y)))


def probe_split(features: torch.Tensor, labels: torch.Tensor, train_fraction: float = 0.75) -> float:
    """Linear-probe accuracy with the first `train_fraction` of the rows for fitting, the rest for scoring."""
    cut = int(len(features) * train_fraction)
    x, y = features.double().numpy(), labels.numpy()
    return linear_probe_accuracy(x[:cut], y[:cut], x[cut:], y[cut:])


def unit_std(features: torch.Tensor) -> torch.Tensor:
    """Per-unit standard deviation over the rows."""
    return features.double().std(dim=0)


def invariance_score(first: torch.Tensor, second: torch.Tensor, seed: int = 0) -> float:
    """Mean cosine of the two frames of each pair minus the mean cosine of random pairs of different rows.

    Features are centred first (with the mean over both frames), so a constant offset shared by every
    row does not count as similarity.
    """
    mean = torch.cat([first, second]).double().mean(dim=0, keepdim=True)
    a = torch.nn.functional.normalize(first.double() - mean, dim=1)
    b = torch.nn.functional.normalize(second.double() - mean, dim=1)
    same = (a * b).sum(dim=1).mean()
    generator = torch.Generator().manual_seed(seed)
    n = len(a)
    other = (torch.arange(n) + torch.randint(1, n, (n,), generator=generator)) % n  # never the row itself
    random_pairs = (a * b[other]).sum(dim=1).mean()
    return float(same - random_pairs)


def summarize(features: torch.Tensor, labels: torch.Tensor, pair: torch.Tensor | None = None) -> dict[str, float]:
    std = unit_std(features)
    summary = {
        "probe_acc": probe_split(features, labels),
        "mean_std": float(std.mean()),
        "collapsed_fraction": float((std < COLLAPSE_STD).double().mean()),
    }
    if pair is not None:
        summary["invariance"] = invariance_score(features, pair)
    return summary


def analyze_file(path: Path) -> dict[str, dict[str, float]]:
    """Summaries of every representation in one exported file."""
    data = load_tensor_file(path, error=ConfigError, hint="point the command at a file the export callback wrote")
    if not isinstance(data, dict) or "labels" not in data:
        raise ConfigError(f"{path}: not an exported representation file (no 'labels' key).")
    keys = [k for k in REPRESENTATION_KEYS if k in data]
    if not keys:
        raise ConfigError(f"{path}: holds none of {', '.join(REPRESENTATION_KEYS)}; keys are {sorted(data)}.")
    pair_path = path.with_name(f"{path.stem}{SECOND_FRAME_SUFFIX}.pt")
    pairs = load_tensor_file(pair_path, error=ConfigError, hint="re-export it") if pair_path.exists() else {}
    return {key: summarize(data[key], data["labels"], pairs.get(key)) for key in keys}


def exported_files(target: Path) -> list[Path]:
    """`target` itself, or every export under a run directory (its outputs/activations/)."""
    if target.is_file():
        return [target]
    files = sorted(target.glob("**/outputs/activations/*.pt")) or sorted(target.glob("*.pt"))
    files = [f for f in files if not f.stem.endswith(SECOND_FRAME_SUFFIX)]
    if not files:
        raise ConfigError(f"{target}: no exported .pt files found (looked in {target}/outputs/activations/).")
    return files


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path, help="exported .pt files or run directories")
    args = parser.parse_args(argv)
    try:
        files = [f for target in args.paths for f in exported_files(target)]
        print(f"{'file':<48} {'representation':<20} {'probe acc':>9} {'mean std':>9} {'collapsed':>9} {'invariance':>10}")
        for path in files:
            for key, s in analyze_file(path).items():
                invariance = f"{s['invariance']:>10.3f}" if "invariance" in s else f"{'-':>10}"
                print(f"{path.name:<48} {key:<20} {s['probe_acc']:>9.3f} {s['mean_std']:>9.3f} "
                      f"{s['collapsed_fraction']:>9.2f} {invariance}")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
