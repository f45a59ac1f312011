"""The RGM's seven figures, drawn from arrays (no model, no trainer): models/rgm/figures.py feeds them.

Each `draw_*` function returns a matplotlib `Figure` (object API with the Agg canvas: no pyplot, no
display); `save` writes it as a PNG atomically. Images are 2-D arrays of pixels in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from utils.monitoring.plots import save_png

DPI = 100
LOSS_TERMS = ("loss", "reconstruction", "prediction_error", "sparsity", "consistency")
TERM_TITLES = {"loss": "total (weighted sum)", "reconstruction": "reconstruction (MSE per pixel)",
               "prediction_error": "prediction error (mean over levels)", "sparsity": "sparsity (mean |state|)",
               "consistency": "hierarchical consistency"}


def save(fig: Figure, path: Path) -> Path:
    """Write `fig` to `path` at the family's resolution, never half-written."""
    return save_png(fig, path, dpi=DPI)


def tile(images: np.ndarray, per_row: int, gap: int = 1) -> np.ndarray:
    """[n, h, w] images as one [rows*(h+gap)-gap, per_row*(w+gap)-gap] mosaic, NaN between the tiles.

    One `imshow` of a mosaic instead of one axes per image: drawing a figure of 100 digits takes a tenth
    of the time (the figures are drawn every few epochs, inside the run)."""
    n, h, w = images.shape
    rows = math.ceil(n / per_row)
    mosaic = np.full((rows * (h + gap) - gap, per_row * (w + gap) - gap), np.nan)
    for k in range(n):
        r, c = divmod(k, per_row)
        mosaic[r * (h + gap): r * (h + gap) + h, c * (w + gap): c * (w + gap) + w] = images[k]
    return mosaic


def _grey_ink() -> Any:
    """Pixels 0..1 as white paper and dark ink (MNIST is white on black), NaN gaps light grey."""
    return colormaps["gray_r"].with_extremes(bad="0.85")


def _image_rows(fig: Figure, rows: Sequence[tuple[str, np.ndarray]], captions: Sequence[Sequence[str]],
                left: float = 0.13) -> None:
    """One strip of images per row, labelled on the left, with a caption above each image."""
    n_rows = len(rows)
    grid = fig.add_gridspec(n_rows, 1, left=left, right=0.99, top=0.84, bottom=0.02, hspace=0.35)
    cmap = _grey_ink()
    for r, (label, images) in enumerate(rows):
        ax = fig.add_subplot(grid[r, 0])
        ax.imshow(tile(images, per_row=len(images)), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9, labelpad=8)
        width = images.shape[2] + 1
        for c, caption in enumerate(captions[r]):
            if caption:
                ax.text(c * width + images.shape[2] / 2 - 0.5, -1.5, caption, ha="center", va="bottom", fontsize=7)


# ------------------------------------------------------------------------------------------------ 1
def draw_reconstructions(inputs: np.ndarray, one_level: np.ndarray, from_top: np.ndarray, labels: Sequence[int],
                         title_suffix: str) -> Figure:
    """Input digits, what level 1 predicts of them, and what the top state generates (the reconstruction)."""
    fig = Figure(figsize=(1.0 * len(inputs) + 1.8, 4.0))
    mse_one = ((one_level - inputs) ** 2).mean(axis=(1, 2))
    mse_top = ((from_top - inputs) ** 2).mean(axis=(1, 2))
    rows = [("input", inputs), ("predicted\nby level 1", one_level), ("generated\nfrom the top", from_top)]
    captions = [[f"digit {y}" for y in labels], [f"MSE {m:.3f}" for m in mse_one], [f"MSE {m:.3f}" for m in mse_top]]
    _image_rows(fig, rows, captions)
    fig.suptitle(f"Validation digits and their reconstructions{title_suffix}\n"
                 f"mean MSE per pixel: level 1 {mse_one.mean():.4f}, top-down from the top {mse_top.mean():.4f}",
                 fontsize=10)
    return fig


# ------------------------------------------------------------------------------------------------ 2
def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """A centred moving average (no lag), edges padded with the end values."""
    if len(values) < 2 * window:
        return values
    half = window // 2
    padded = np.concatenate([np.full(half, values[0]), values, np.full(window - 1 - half, values[-1])])
    return np.convolve(padded, np.ones(window) / window, mode="valid")


def draw_loss_components(train: dict[str, tuple[np.ndarray, np.ndarray]], val: dict[str, tuple[np.ndarray, np.ndarray]],
                         weights: dict[str, float], title_suffix: str) -> Figure:
    """One panel per term (unweighted values) and the total: training (smoothed) and validation, per epoch;
    a last panel with the validation prediction error of each level."""
    terms = [t for t in LOSS_TERMS if t in train or t in val]
    levels = sorted(k for k in val if k.startswith("rel_pred_error/level"))
    n_cols = 3
    n_rows = max(1, math.ceil((len(terms) + bool(levels)) / n_cols))
    fig = Figure(figsize=(13, 3.6 * n_rows))
    fig.subplots_adjust(left=0.07, right=0.99, top=0.86, bottom=0.1, wspace=0.32, hspace=0.45)
    for i, term in enumerate(terms):
        ax = fig.add_subplot(n_rows, n_cols, i + 1)
        if term in train:
            epochs, values = train[term]
            ax.plot(epochs, values, color="C0", alpha=0.2, linewidth=0.8)
            ax.plot(epochs, _smooth(values, 10), color="C0", linewidth=1.6, label="train (smoothed)")
        if term in val:
            epochs, values = val[term]
            ax.plot(epochs, values, color="C3", marker="o", markersize=4, linewidth=1.4, label="validation")
        finite = [v for series in (train, val) if term in series for v in series[term][1] if np.isfinite(v)]
        if finite and min(finite) > 0 and max(finite) / min(finite) > 10:
            ax.set_yscale("log")
        weight = f", weight {weights[term]:g}" if term in weights else ""
        ax.set_title(TERM_TITLES.get(term, term) + weight, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("value")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if levels:
        ax = fig.add_subplot(n_rows, n_cols, len(terms) + 1)
        for i, key in enumerate(levels):
            ax.plot(*val[key], color=f"C{i}", marker="o", markersize=4,
                    label=f"level {key.removeprefix('rel_pred_error/level')}")
        ax.set_yscale("log")
        ax.set_title("relative prediction error per level (validation)", fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("MSE / variance of the state")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Loss components (unweighted; the total is their weighted sum){title_suffix}", fontsize=12)
    return fig


# ------------------------------------------------------------------------------------------------ 3
def draw_learning_rate(lr: tuple[np.ndarray, np.ndarray], val_loss: tuple[np.ndarray, np.ndarray] | None,
                       title_suffix: str) -> Figure:
    """The learning rate per epoch (log scale, drops marked) with the validation loss it reacts to."""
    fig = Figure(figsize=(9, 4.5))
    fig.subplots_adjust(left=0.1, right=0.88, top=0.88, bottom=0.12)
    ax = fig.add_subplot(1, 1, 1)
    epochs, values = lr
    ax.step(epochs, values, where="post", color="C0", linewidth=1.8, label="learning rate")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate", color="C0")
    ax.grid(True, alpha=0.3, which="both")
    for i in range(1, len(values)):
        if values[i] < values[i - 1] * (1 - 1e-9):
            ax.axvline(epochs[i], color="C0", linestyle=":", linewidth=1)
            ax.annotate(f"{values[i - 1]:.2g} -> {values[i]:.2g}", xy=(epochs[i], values[i]), xytext=(4, 6),
                        textcoords="offset points", fontsize=8, color="C0")
    if len(values) and values.min() == values.max():  # a flat line: show a decade around it
        ax.set_ylim(values[0] / 3, values[0] * 3)
    if val_loss is not None and len(val_loss[0]):
        twin = ax.twinx()
        twin.plot(*val_loss, color="C3", marker="o", markersize=4, linewidth=1.2, label="val/loss")
        twin.set_ylabel("validation loss (the plateau monitor)", color="C3")
    ax.set_title(f"Learning rate (ReduceLROnPlateau on val/loss){title_suffix}", fontsize=11)
    return fig


# ------------------------------------------------------------------------------------------------ 4
def draw_state_activations(states: Sequence[np.ndarray], labels: np.ndarray, title_suffix: str,
                           shown_images: int = 60) -> Figure:
    """Per level: the states of validation images (sorted by digit) as a heat map, and how often each unit is on."""
    digits = np.unique(labels)
    per_digit = max(1, shown_images // max(1, len(digits)))
    order = np.concatenate([np.flatnonzero(labels == d)[:per_digit] for d in digits])  # the same few of each digit
    n = len(states)
    fig = Figure(figsize=(13, 3.2 * n))
    grid = fig.add_gridspec(n, 3, width_ratios=[3.2, 0.08, 1.3], left=0.07, right=0.98, top=0.9, bottom=0.06,
                            wspace=0.45, hspace=0.55)
    for i, s in enumerate(states):
        level = i + 1
        ax = fig.add_subplot(grid[i, 0])
        shown = s[order]
        signed = bool((s < 0).any())  # a linear level (the top) has signed states
        if signed:
            bound = max(float(np.percentile(np.abs(shown), 99)), 1e-6)
            im = ax.imshow(shown, aspect="auto", cmap="RdBu_r", vmin=-bound, vmax=bound, interpolation="nearest")
        else:
            vmax = max(float(np.percentile(shown, 99)), 1e-6)
            im = ax.imshow(shown, aspect="auto", cmap="magma", vmin=0.0, vmax=vmax, interpolation="nearest")
        ticks = [k for k in range(len(order)) if k == 0 or labels[order][k] != labels[order][k - 1]]
        ax.set_yticks(ticks, [f"digit {labels[order][k]}" for k in ticks], fontsize=7)
        ax.set_xlabel(f"unit of level {level} ({s.shape[1]} units)")
        ax.set_title(f"level {level}: states of {len(order)} validation images, sorted by digit", fontsize=10)
        cbar = fig.colorbar(im, cax=fig.add_subplot(grid[i, 1]))
        cbar.set_label("activation", fontsize=8)
        hist = fig.add_subplot(grid[i, 2])
        if signed:
            hist.hist(s.reshape(-1), bins=60, color="C0", edgecolor="white")
            hist.set_xlabel("activation (every unit of every image)")
            hist.set_ylabel("count")
            hist.set_title(f"level {level} (linear): mean |state| {np.abs(s).mean():.3g}", fontsize=9)
        else:
            on_fraction = (s > 0).mean(axis=0)
            hist.hist(on_fraction, bins=np.linspace(0, 1, 21), color="C2", edgecolor="white")
            hist.set_xlabel("fraction of images where the unit is > 0")
            hist.set_ylabel("units")
            hist.set_title(f"level {level}: {on_fraction.mean():.0%} of states > 0\n"
                           f"{(on_fraction == 0).mean():.0%} of units never on", fontsize=9)
        hist.grid(True, alpha=0.3)
    fig.suptitle(f"State activation patterns per level{title_suffix}", fontsize=12)
    return fig


# ------------------------------------------------------------------------------------------------ 5
def draw_features(fields: Sequence[np.ndarray], units: Sequence[np.ndarray], title_suffix: str,
                  per_row: int = 16) -> Figure:
    """Per level, the generative field of its most active units as images (red: adds ink, blue: removes it).

    fields[i]: [units, rows, columns] for level i + 1; units[i]: their indices in the level. Each field
    is scaled to its own largest magnitude (the shapes matter here, not the sizes).
    """
    heights = [math.ceil(len(f) / per_row) for f in fields]
    fig = Figure(figsize=(per_row * 0.75 + 0.5, sum(heights) * 0.8 + 0.75 * len(fields) + 0.7))
    grid = fig.add_gridspec(len(fields), 1, height_ratios=heights, left=0.01, right=0.99,
                            top=1 - 0.75 / fig.get_figheight(), bottom=0.01, hspace=0.45)
    cmap = colormaps["RdBu_r"].with_extremes(bad="0.85")
    for i, (level_fields, level_units) in enumerate(zip(fields, units)):
        level = i + 1
        scale = np.abs(level_fields).reshape(len(level_fields), -1).max(axis=1)
        normalised = level_fields / np.where(scale > 0, scale, 1.0)[:, None, None]
        ax = fig.add_subplot(grid[i, 0])
        ax.imshow(tile(normalised, per_row), cmap=cmap, vmin=-1.0, vmax=1.0, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        how = "columns of G1" if level == 1 else f"columns of G1···G{level}, projected to pixels"
        ax.set_title(f"level {level}: the generative weights of its {len(level_fields)} most active units "
                     f"({how}); unit number above each", fontsize=9, loc="left")
        h, w = level_fields.shape[1:]
        for k, unit in enumerate(level_units):
            r, c = divmod(k, per_row)
            ax.text(c * (w + 1) + 0.5, r * (h + 1) + 0.5, str(int(unit)), fontsize=5.5, va="top", ha="left",
                    color="0.25")
    fig.suptitle(f"Feature visualisation: generative weights per level as images{title_suffix}", fontsize=11)
    return fig


# ------------------------------------------------------------------------------------------------ 6
def draw_hierarchy(inputs: np.ndarray, generated_by_level: Sequence[np.ndarray], labels: Sequence[int],
                   title_suffix: str) -> Figure:
    """What each level's state generates on its own, down to pixels, next to the input."""
    rows = [("input", inputs)]
    captions = [[f"digit {y}" for y in labels]]
    for i, images in enumerate(generated_by_level):
        mse = ((images - inputs) ** 2).mean(axis=(1, 2))
        rows.append((f"from level {i + 1}\n(MSE {mse.mean():.3f})", images))
        captions.append([""] * len(labels))
    fig = Figure(figsize=(1.0 * len(inputs) + 1.8, 1.15 * len(rows) + 0.9))
    _image_rows(fig, rows, captions)
    fig.suptitle(f"Hierarchical representations: each level's state alone, generated down to pixels{title_suffix}",
                 fontsize=10)
    return fig


# ------------------------------------------------------------------------------------------------ 7
def draw_error_distributions(errors: Sequence[np.ndarray], level_sizes: Sequence[int], title_suffix: str) -> Figure:
    """Per level, the distribution of the prediction errors s_l - p_l (every unit of every image)."""
    n = len(errors)
    n_cols = min(n, 4)
    n_rows = math.ceil(n / n_cols)
    fig = Figure(figsize=(3.6 * n_cols + 0.6, 3.4 * n_rows + 0.6))
    fig.subplots_adjust(left=0.07, right=0.98, top=0.82, bottom=0.14, wspace=0.3, hspace=0.5)
    for level, e in enumerate(errors):
        ax = fig.add_subplot(n_rows, n_cols, level + 1)
        flat = e.reshape(-1)
        bound = float(np.percentile(np.abs(flat), 99.9)) or 1e-6
        beyond = float(np.mean(np.abs(flat) > bound))
        ax.hist(flat, bins=80, range=(-bound, bound), color=f"C{level}", alpha=0.85)  # the rarest 0.1% left out
        ax.set_yscale("log")
        what = "pixels predicted by level 1" if level == 0 else f"level {level} predicted by level {level + 1}"
        ax.set_title(f"level {level}: {what}", fontsize=9)
        ax.set_xlabel("prediction error  state - prediction")
        ax.set_ylabel("count (log)")
        ax.grid(True, alpha=0.3)
        ax.text(0.02, 0.97, f"MSE {np.mean(flat ** 2):.2e}\nmean {flat.mean():+.1e}\nstd {flat.std():.2e}\n"
                f"{level_sizes[level]} units\n{beyond:.2%} beyond ±{bound:.2g}", transform=ax.transAxes, fontsize=7, va="top",
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "0.8"})
    fig.suptitle(f"Prediction error distributions per level (validation images){title_suffix}", fontsize=11)
    return fig
