"""Training-curve figures, drawn from a run's metrics.jsonl into `<run_dir>/plots/*.png`.

- `make_plots(run_dir)`: loss (train and validation, total and per term), learning rates, gradient
  norms (total and per component), one panel per other validation metric (`val_metrics.png`: an
  accuracy in 0..1 and a cross-entropy of 4 would share no useful axis) and one per metric the model
  reports during training (`train_metrics.png`: names with a namespace, like `train/act/steps`). Used
  by the trainer and by `python -m utils.monitoring.report`; needs no service, only the run directory.
- `FigureMaker`: what the trainer calls at each evaluation (at most once every `min_interval_s`
  seconds, so plotting never dominates a fast run) and at the end. It also calls the model-family
  hook: any source (the unwrapped model, an evaluator) with a method
  `make_figures(run_dir: Path, step: int) -> dict[str, Path]` adds its own PNGs; every image is
  logged to the trackers (`log_images`). Rank 0 only; the hook must not use collectives.

matplotlib is used through its object API with the Agg canvas (no pyplot, no global backend, no
display needed).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PLOTS_DIR = "plots"
MAX_POINTS = 3000  # longer curves are subsampled before drawing
PANEL_COLUMNS = 3  # metric panels per row


def read_records(run_dir: Path | str) -> list[dict[str, Any]]:
    """metrics.jsonl records; a line cut by a kill is skipped; "nan"/"inf" strings become floats."""
    path = Path(run_dir) / "metrics.jsonl"
    records = []
    if not path.exists():
        return records
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            for k, v in rec.items():
                if isinstance(v, str) and v in ("nan", "inf", "-inf"):
                    rec[k] = float(v)
            records.append(rec)
    return records


def series_of(records: list[dict[str, Any]], kind: str) -> dict[str, tuple[list[int], list[float]]]:
    """{metric: (steps, values)} of the records of one kind ("train", "val")."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for rec in records:
        if rec.get("kind") != kind:
            continue
        for key, value in rec.items():
            if key in ("step", "kind") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            steps, values = out.setdefault(key, ([], []))
            steps.append(rec["step"])
            values.append(float(value))
    return out


def _thin(steps: list[int], values: list[float]) -> tuple[list[int], list[float]]:
    if len(steps) <= MAX_POINTS:
        return steps, values
    k = math.ceil(len(steps) / MAX_POINTS)
    return steps[::k], values[::k]


def _ema(values: list[float], alpha: float) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None or not math.isfinite(acc) else (1 - alpha) * acc + alpha * v
        out.append(acc)
    return out


def save_png(fig: Any, path: Path, dpi: int = 90) -> Path:
    """Write a matplotlib Figure to `path` through a temporary file: a reader never sees half a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, format="png", dpi=dpi)  # fixed margins (no bbox_inches="tight": that draws twice)
    os.replace(tmp, path)
    return path


def _figure(title: str) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5))
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.11, top=0.92)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    return fig, ax


def _log_scale_if_positive(ax: Any, curves: Iterable[list[float]]) -> None:
    finite = [v for c in curves for v in c if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 20:
        ax.set_yscale("log")


def _plot_lines(ax: Any, series: dict[str, tuple[list[int], list[float]]], keys: list[str], smooth: bool = False,
                colors: dict[str, str] | None = None, **style: Any) -> list[list[float]]:
    drawn = []
    for i, key in enumerate(keys):
        steps, values = _thin(*series[key])
        color = (colors or {}).get(key, f"C{i % 10}")
        if smooth and len(values) > 50:
            ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(steps, _ema(values, 0.1), color=color, label=key, **style)
        else:
            marker = "o" if len(values) < 30 else None
            ax.plot(steps, values, color=color, label=key, marker=marker, markersize=3, **style)
        drawn.append(values)
    return drawn


def _stage_starts(records: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """(step, name) of every curriculum stage change after the first stage (the last record per stage wins)."""
    starts: dict[int, tuple[int, str]] = {}
    for rec in records:
        if rec.get("kind") == "event" and rec.get("event") == "stage" and rec.get("stage", 0) > 0:
            starts[int(rec["stage"])] = (int(rec["step"]), str(rec.get("name", rec["stage"])))
    return [starts[k] for k in sorted(starts)]


def _mark_stages(ax: Any, stages: list[tuple[int, str]], label: bool = True) -> None:
    """A dotted vertical line at each stage change, labelled with the stage's name at the top."""
    for step, name in stages:
        ax.axvline(step, color="0.4", linestyle=":", linewidth=1.0)
        if label:
            ax.annotate(name, xy=(step, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -10),
                        textcoords="offset points", fontsize=7, color="0.3")


def metric_panels(title: str, keys: list[str], series: dict[str, tuple[list[int], list[float]]],
                   stages: list[tuple[int, str]], smooth: bool = False) -> Any:
    """A grid of small plots sharing the step axis, one per metric, each titled with its key and
    scaled to its own values."""
    from matplotlib.figure import Figure

    columns = min(PANEL_COLUMNS, len(keys))
    rows = math.ceil(len(keys) / columns)
    fig = Figure(figsize=(max(3.3 * columns + 0.5, 5.5), 2.4 * rows + 0.7), layout="constrained")
    fig.suptitle(title)
    grid = fig.subplots(rows, columns, sharex=True, squeeze=False)
    for i, key in enumerate(keys):
        ax = grid[i // columns][i % columns]
        ax.set_title(key, fontsize=9)
        ax.set_ylabel(key.rsplit("/", 1)[-1], fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
        _log_scale_if_positive(ax, _plot_lines(ax, series, [key], smooth=smooth, linewidth=1.4))
        _mark_stages(ax, stages, label=i < columns)  # stage names once, on the top row
        # The lowest panel of each column carries the step labels (sharex hides the others').
        if i + columns >= len(keys):
            ax.xaxis.set_tick_params(labelbottom=True)
            ax.set_xlabel("step", fontsize=8)
    for j in range(len(keys), rows * columns):
        grid[j // columns][j % columns].set_visible(False)
    return fig


def figure_keys(train: dict[str, Any], val: dict[str, Any]) -> dict[str, list[str]]:
    """Which metric goes to which figure: {"loss_train", "loss_val", "lr", "grad_norm", "val_metrics",
    "train_metrics": [keys]}, from the keys of the train and validation series."""
    grad_keys = sorted(k for k in train if k == "train/grad_norm" or k.startswith("train/grad_norm/"))
    # train/<name> is a loss term; train/<namespace>/<name> a metric of the model (train/act/steps, see
    # utils/contract.py), which gets a panel of its own.
    model_metric_keys = sorted(k for k in train if k.startswith("train/") and k.count("/") > 1 and k not in grad_keys)
    loss_terms = sorted(
        k.split("/", 1)[1] for k in train
        if k.startswith("train/") and k not in grad_keys and k not in model_metric_keys and k != "train/nonfinite_total"
    )
    loss_terms.sort(key=lambda t: t != "loss")  # the total first
    val_loss_keys = [f"val/{t}" for t in loss_terms if f"val/{t}" in val]
    if "val/loss" in val and "val/loss" not in val_loss_keys:
        val_loss_keys.insert(0, "val/loss")
    # Every other validation metric gets a panel; a loss term hidden below is drawn nowhere.
    val_metric_keys = sorted(k for k in val if k not in val_loss_keys)

    # A single term equal to the total everywhere (loss = ce) would only hide the total's line.
    loss_terms = [t for t in loss_terms if t == "loss" or train.get(f"train/{t}") != train.get("train/loss")]
    val_loss_keys = [k for k in val_loss_keys if k == "val/loss" or val.get(k) != val.get("val/loss")]
    return {
        "loss_train": [f"train/{t}" for t in loss_terms],
        "loss_val": val_loss_keys,
        "lr": sorted(k for k in train if k.startswith("lr/")),
        "grad_norm": grad_keys,
        "val_metrics": val_metric_keys,
        "train_metrics": model_metric_keys,
    }


def make_plots(run_dir: Path | str, records: list[dict[str, Any]] | None = None) -> dict[str, Path]:
    """Draw the standard figures into <run_dir>/plots/; returns {name: png path} (empty without metrics)."""
    run_dir = Path(run_dir)
    records = read_records(run_dir) if records is None else records
    train, val = series_of(records, "train"), series_of(records, "val")
    if not train and not val:
        return {}
    out_dir = run_dir / PLOTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    images: dict[str, Path] = {}
    stages = _stage_starts(records)
    keys = figure_keys(train, val)

    if keys["loss_train"] or keys["loss_val"]:
        terms = list(dict.fromkeys([k.split("/", 1)[1] for k in keys["loss_train"] + keys["loss_val"]]))
        colors = {f"{split}/{t}": f"C{i % 10}" for i, t in enumerate(terms) for split in ("train", "val")}
        fig, ax = _figure("loss (train: solid, smoothed over the raw curve; val: dashed)")
        drawn = _plot_lines(ax, train, keys["loss_train"], smooth=True, colors=colors, linewidth=1.6)
        drawn += _plot_lines(ax, val, keys["loss_val"], colors=colors, linestyle="--", linewidth=1.4)
        _log_scale_if_positive(ax, drawn)
        ax.legend(fontsize=8)
        _mark_stages(ax, stages)
        images["loss"] = save_png(fig, out_dir / "loss.png")

    if keys["lr"]:
        fig, ax = _figure("learning rate")
        _plot_lines(ax, train, keys["lr"])
        ax.legend(fontsize=8)
        _mark_stages(ax, stages)
        images["lr"] = save_png(fig, out_dir / "lr.png")

    if keys["grad_norm"]:
        fig, ax = _figure("gradient norm (before clipping; total and per component)")
        drawn = _plot_lines(ax, train, keys["grad_norm"], smooth=True)
        _log_scale_if_positive(ax, drawn)
        ax.legend(fontsize=8)
        _mark_stages(ax, stages)
        images["grad_norm"] = save_png(fig, out_dir / "grad_norm.png")

    if keys["val_metrics"]:
        fig = metric_panels("validation metrics", keys["val_metrics"], val, stages)
        images["val_metrics"] = save_png(fig, out_dir / "val_metrics.png")

    if keys["train_metrics"]:
        fig = metric_panels("metrics the model reports during training", keys["train_metrics"], train, stages, smooth=True)
        images["train_metrics"] = save_png(fig, out_dir / "train_metrics.png")
    return images


class FigureMaker:
    """Rate-limited figures during training, every figure at the end; images go to `log_images`."""

    def __init__(self, run_dir: Path, sources: Iterable[Any] = (), enabled: bool = True,
                 log_images: Callable[[dict[str, Path], int], None] | None = None,
                 min_interval_s: float = 30.0) -> None:
        self.run_dir = Path(run_dir)
        self.sources = [s for s in sources if callable(getattr(s, "make_figures", None))]
        self.enabled = enabled
        self.log_images = log_images
        self.min_interval_s = min_interval_s
        self._last = time.monotonic()  # the first figures come at an evaluation >= min_interval_s in
        self._failed: set[str] = set()

    def maybe(self, step: int) -> dict[str, Path]:
        """At an evaluation: draw if at least `min_interval_s` passed since the last time."""
        if not self.enabled or time.monotonic() - self._last < self.min_interval_s:
            return {}
        return self.now(step)

    def now(self, step: int) -> dict[str, Path]:
        if not self.enabled:
            return {}
        started = time.monotonic()
        images = self._guarded("plots", lambda: make_plots(self.run_dir))
        for source in self.sources:
            name = type(source).__name__
            extra = self._guarded(f"{name}.make_figures", lambda s=source: s.make_figures(self.run_dir, step))
            images.update({str(k): Path(v) for k, v in (extra or {}).items()})
        if images and self.log_images is not None:
            self._guarded("log_images", lambda: self.log_images(images, step) or {})
        self._last = time.monotonic()
        log.debug("figures at step %d in %.2fs: %s", step, self._last - started, ", ".join(images))
        return images

    def _guarded(self, what: str, fn: Callable[[], dict[str, Path] | None]) -> dict[str, Path]:
        """Figures never stop a run: a failure is logged (once per source) and skipped."""
        try:
            return dict(fn() or {})
        except Exception as err:  # noqa: BLE001
            if what not in self._failed:
                self._failed.add(what)
                log.warning("Figures: %s failed (%s: %s); training continues.", what, type(err).__name__, err)
            return {}
