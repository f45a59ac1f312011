"""Writing the ring attractor's figures: one PNG at a time, never half-written."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def save_figure(fig: Any, path: Path) -> Path:
    """Save a matplotlib Figure as PNG at `path` (via a temp file and a rename: readers see old or new)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, format="png", dpi=90)
    os.replace(tmp, path)
    return path
