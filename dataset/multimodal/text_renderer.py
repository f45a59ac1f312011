"""Deterministic rendering of text and ARC grids to small grayscale images (the vision_unified inputs).

Determinism across machines is the point: the same string must give the same bytes everywhere, or a
dataset built on one machine would not match one built (or resumed) on another.

* The font is a fixed file, DejaVu Sans Mono as shipped inside matplotlib (no system font lookup).
* ``ImageFont.Layout.BASIC`` (no Raqm/HarfBuzz shaping, whose presence varies by install) and a
  monospaced font: every character advances by the same whole number of pixels, so line wrapping is
  a pure function of the character count.
* No antialiasing (``ImageDraw.fontmode = "1"``): pixels are 0 or 255, so differences in FreeType's
  antialiasing filters between versions cannot change the output. At ``font_size=8`` a character
  is 5 px wide and a line 10 px high; the monochrome glyphs are legible at that size (checked by eye).
* Non-printable characters become ``?`` and tabs expand to 4 spaces before layout.
* FreeType comes inside the Pillow wheel, so the same Pillow version renders the same pixels; another
  version could still change hinting, which the snapshot hash in tests/test_streaming.py catches.

Text is wrapped at the image width (character wrap: a mono font makes the column count exact) and
what does not fit is clipped: ``keep="start"`` keeps the first lines, ``keep="end"`` the last ones
(the builder uses ``"end"``: what comes right before the target is what matters).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Gray level per ARC colour 0..9; 0 (black) is reserved for "outside the grid" so the grid's extent
# is visible even when its background colour is 0.
ARC_GRAY_LEVELS: tuple[int, ...] = tuple(25 + 23 * c for c in range(10))  # 25, 48, ..., 232
OUTSIDE_GRID_LEVEL = 0


def font_path() -> Path:
    """DejaVu Sans Mono from matplotlib's bundled fonts (the same file on every machine with this matplotlib)."""
    import matplotlib  # local import: only the renderer needs it

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSansMono.ttf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the DejaVu fonts ship with matplotlib; reinstall matplotlib")
    return path


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_path()), size, layout_engine=ImageFont.Layout.BASIC)


def font_metrics(font_size: int) -> tuple[int, int]:
    """(character advance, line height) in pixels for the renderer's font at ``font_size``."""
    font = _font(font_size)
    advance = round(font.getlength("M"))
    if advance < 1 or font.getlength("M" * 10) != 10 * advance:
        # fractional advances would make the column count (and the glyph cache) inexact
        raise ValueError(f"font_size {font_size} gives a fractional character advance; pick another size (e.g. 7, 8, 10)")
    ascent, descent = font.getmetrics()
    return advance, max(1, ascent + descent)


def text_capacity(size: tuple[int, int], font_size: int) -> tuple[int, int]:
    """(lines, columns) of text that fit an image of ``size`` = (H, W)."""
    advance, line_h = font_metrics(font_size)
    return size[0] // line_h, size[1] // advance


def _clean(text: str) -> str:
    text = text.expandtabs(4).replace("\r\n", "\n").replace("\r", "\n")
    return "".join(ch if ch == "\n" or ch.isprintable() else "?" for ch in text)


def wrap_text(text: str, columns: int) -> list[str]:
    """Split at newlines, then cut every line into pieces of at most ``columns`` characters."""
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    out: list[str] = []
    for line in _clean(text).split("\n"):
        if not line:
            out.append("")
            continue
        out.extend(line[i : i + columns] for i in range(0, len(line), columns))
    return out


def _check_size(size: Sequence[int]) -> tuple[int, int]:
    if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in size):
        raise ValueError(f"size must be (H, W) with positive integers, got {tuple(size)!r}")
    return int(size[0]), int(size[1])


def render_text(
    text: str,
    size: tuple[int, int] = (64, 128),
    font_size: int = 8,
    keep: Literal["start", "end"] = "start",
    margin: int = 0,
) -> np.ndarray:
    """Render ``text`` white on black into a uint8 [H, W] array (values 0 or 255).

    Lines are wrapped at the width (minus ``margin`` on each side); lines that do not fit are clipped,
    keeping the first (``keep="start"``) or the last (``keep="end"``) ones.

    Pixels are identical to drawing each line with ``ImageDraw.text`` (``render_text_pil``; tested on
    the builder's own text and code), except that Pillow drops a line holding nothing but ``_`` and
    spaces (its string box misses the underscore), which is drawn here. Lines of ASCII text, the common case, are composed from a per-character glyph cache with numpy
    (~3x faster): each glyph is rasterised once in a cell of 3 x 3 character boxes (so parts that
    overhang their box are kept) and the cells are OR-ed into place, which is what Pillow does with
    FreeType's monochrome glyphs of a string whose advances are whole pixels. Other lines are drawn
    by Pillow directly: for some non-ASCII glyphs Pillow's string layout lands 1 px off the
    glyph-by-glyph result.
    """
    h, w = _check_size(size)
    lines, (advance, line_h) = _layout(text, h, w, font_size, keep, margin)
    out = np.zeros((h, w), dtype=np.uint8)
    fast = [line if line.isascii() else "" for line in lines]
    if any(fast):
        _compose_glyphs(out, fast, font_size, advance, line_h, margin)
    if any(line and not line.isascii() for line in lines):
        image = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(image)
        draw.fontmode = "1"
        for i, line in enumerate(lines):
            if line and not line.isascii():
                draw.text((margin, margin + i * line_h), line, fill=255, font=_font(font_size))
        np.maximum(out, np.asarray(image, dtype=np.uint8), out=out)
    return out


def _compose_glyphs(out: np.ndarray, lines: list[str], font_size: int, advance: int, line_h: int, margin: int) -> None:
    """OR the glyphs of ``lines`` (line i at y = margin + i * line_h) into ``out`` in place."""
    h, w = out.shape
    rows, cols = len(lines), max(len(line) for line in lines)
    atlas, index = _glyph_atlas(font_size, "".join(lines))
    ids = np.zeros((rows, cols), dtype=np.int64)  # id 0 is the space
    for r, line in enumerate(lines):
        ids[r, : len(line)] = [index[ch] for ch in line]
    cells = atlas[ids].reshape(rows, cols, 3, line_h, 3, advance)  # [R, C, dy, lh, dx, adv]
    canvas = np.zeros(((rows + 2) * line_h, (cols + 2) * advance), dtype=np.uint8)
    for dy in range(3):
        for dx in range(3):
            part = cells[:, :, dy, :, dx, :].transpose(0, 2, 1, 3).reshape(rows * line_h, cols * advance)
            view = canvas[dy * line_h : (dy + rows) * line_h, dx * advance : (dx + cols) * advance]
            np.maximum(view, part, out=view)
    # canvas pixel (line_h, advance) is the pen origin of the first character, image pixel (margin, margin)
    y0, x0 = line_h - margin, advance - margin
    src = canvas[max(0, y0) : y0 + h, max(0, x0) : x0 + w]
    top, left = max(0, -y0), max(0, -x0)
    view = out[top : top + src.shape[0], left : left + src.shape[1]]
    np.maximum(view, src[: view.shape[0], : view.shape[1]], out=view)


def render_text_pil(
    text: str,
    size: tuple[int, int] = (64, 128),
    font_size: int = 8,
    keep: Literal["start", "end"] = "start",
    margin: int = 0,
) -> np.ndarray:
    """Reference implementation of ``render_text``: every line drawn by ``ImageDraw.text`` (slower)."""
    h, w = _check_size(size)
    lines, (_, line_h) = _layout(text, h, w, font_size, keep, margin)
    image = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(image)
    draw.fontmode = "1"  # no antialiasing: see the module docstring
    for i, line in enumerate(lines):
        if line:
            draw.text((margin, margin + i * line_h), line, fill=255, font=_font(font_size))
    return np.asarray(image, dtype=np.uint8).copy()


def _layout(
    text: str, h: int, w: int, font_size: int, keep: str, margin: int
) -> tuple[list[str], tuple[int, int]]:
    if keep not in ("start", "end"):
        raise ValueError(f"keep must be 'start' or 'end', got {keep!r}")
    if margin < 0 or 2 * margin >= min(h, w):
        raise ValueError(f"margin {margin} leaves no room in a {h}x{w} image")
    advance, line_h = font_metrics(font_size)
    columns = (w - 2 * margin) // advance
    rows = (h - 2 * margin) // line_h
    if columns < 1 or rows < 1:
        raise ValueError(f"font_size {font_size} ({advance}x{line_h} px per character) does not fit a {h}x{w} image")
    lines = wrap_text(text, columns)
    return (lines[:rows] if keep == "start" else lines[-rows:]), (advance, line_h)


class _Atlas:
    """Glyph bitmaps of one font size, each in a [3 * line_h, 3 * advance] cell, grown on demand."""

    def __init__(self, font_size: int) -> None:
        self.font_size = font_size
        self.advance, self.line_h = font_metrics(font_size)
        self.index: dict[str, int] = {}
        self.cells: list[np.ndarray] = []
        self.array = np.zeros((0, 3 * self.line_h, 3 * self.advance), dtype=np.uint8)
        self.add(" ")

    def add(self, ch: str) -> None:
        cell = Image.new("L", (3 * self.advance, 3 * self.line_h), 0)
        draw = ImageDraw.Draw(cell)
        draw.fontmode = "1"
        draw.text((self.advance, self.line_h), ch, fill=255, font=_font(self.font_size))
        self.index[ch] = len(self.cells)
        self.cells.append(np.asarray(cell, dtype=np.uint8))


_ATLASES: dict[int, _Atlas] = {}


def _glyph_atlas(font_size: int, chars: str) -> tuple[np.ndarray, dict[str, int]]:
    atlas = _ATLASES.get(font_size)
    if atlas is None:
        atlas = _ATLASES[font_size] = _Atlas(font_size)
    new = [ch for ch in set(chars) if ch not in atlas.index]
    for ch in sorted(new):
        atlas.add(ch)
    if new or len(atlas.array) != len(atlas.cells):
        atlas.array = np.stack(atlas.cells)
    return atlas.array, atlas.index


def render_grid(grid: np.ndarray | Sequence[Sequence[int]], size: tuple[int, int] = (64, 64)) -> np.ndarray:
    """Render an ARC grid (colours 0..9) into a uint8 [H, W] array, top-left aligned.

    Each colour has a fixed gray level (``ARC_GRAY_LEVELS``); pixels outside the grid are 0. Cells are
    squares of ``min(H // rows, W // cols)`` pixels; a grid larger than the image in pixels is
    downsampled by nearest neighbour (deterministic index arithmetic, no resampling filter).
    """
    h, w = _check_size(size)
    g = np.asarray(grid)
    if g.ndim != 2 or g.shape[0] < 1 or g.shape[1] < 1:
        raise ValueError(f"a grid must be 2-D and non-empty, got shape {list(g.shape)}")
    if g.dtype.kind not in "iu" or g.min() < 0 or g.max() > 9:
        raise ValueError("grid cells must be integer colours 0..9")
    gh, gw = g.shape
    levels = np.asarray(ARC_GRAY_LEVELS, dtype=np.uint8)[g.astype(np.int64)]
    out = np.full((h, w), OUTSIDE_GRID_LEVEL, dtype=np.uint8)
    scale = min(h // gh, w // gw)
    if scale >= 1:
        block = np.repeat(np.repeat(levels, scale, axis=0), scale, axis=1)
        out[: block.shape[0], : block.shape[1]] = block
    else:  # too many cells for the pixels: keep the aspect ratio, pick the nearest cell per pixel
        ratio = max(gh / h, gw / w)
        ph, pw = max(1, int(gh / ratio)), max(1, int(gw / ratio))
        rows = np.minimum((np.arange(ph) * gh) // ph, gh - 1)
        cols = np.minimum((np.arange(pw) * gw) // pw, gw - 1)
        out[:ph, :pw] = levels[np.ix_(rows, cols)]
    return out


def render_grid_panel(
    pairs: Sequence[tuple[np.ndarray, np.ndarray | None]], size: tuple[int, int] = (64, 128)
) -> np.ndarray:
    """Render rows of (input, output) grids side by side; an output of None leaves its half empty.

    Row i occupies pixels [i*H//n, (i+1)*H//n) for n rows; the left half holds the input, the right
    half the output, with a 1-pixel gray separator (level 128) between the halves and between rows so
    the panel boundaries are visible.
    """
    h, w = _check_size(size)
    n = len(pairs)
    if n < 1:
        raise ValueError("render_grid_panel needs at least one pair")
    out = np.zeros((h, w), dtype=np.uint8)
    half = w // 2
    for i, (x, y) in enumerate(pairs):
        top, bottom = i * h // n, (i + 1) * h // n
        cell_h = bottom - top - (1 if i < n - 1 else 0)
        if cell_h < 1 or half < 2:
            raise ValueError(f"{n} rows of grids do not fit a {h}x{w} image")
        out[top : top + cell_h, : half - 1] = render_grid(x, (cell_h, half - 1))
        if y is not None:
            out[top : top + cell_h, half : half + (w - half)] = render_grid(y, (cell_h, w - half))
        out[top : top + cell_h, half - 1] = 128
        if i < n - 1:
            out[bottom - 1, :] = 128
    return out
